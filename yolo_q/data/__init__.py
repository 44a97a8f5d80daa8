"""Data pipeline: data YAML + formats (YOLO txt, COCO JSON), dataset with augmentation,
loaders with the batch contract, and the synthetic benchmark generator."""
from .dataset import DetectionDataset
from .formats import (DataError, DataNotFoundError, check_model_nc, img2label_path, load_data_yaml,
                      to_coco_dict)
from .loader import (SeededRandomSampler, build_dataloader, build_datasets_from_config, collate_fn,
                     set_epoch)
from .transforms import letterbox, unletterbox_boxes

__all__ = ["DataError", "DataNotFoundError", "DetectionDataset", "check_model_nc",
           "SeededRandomSampler",
           "build_dataloader", "build_datasets_from_config", "collate_fn", "img2label_path",
           "letterbox", "load_data_yaml", "set_epoch", "to_coco_dict", "unletterbox_boxes"]
