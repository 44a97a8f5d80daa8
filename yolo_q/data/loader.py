"""DataLoader construction: batch collation, seeded samplers/workers, DDP, datasets from config.

Batch contract: ``(imgs, targets, paths, shapes)`` with ``imgs`` uint8 ``(B, 3, S, S)`` RGB,
``targets`` float32 ``(M, 6)`` = ``[batch_index, cls, x1, y1, x2, y2]`` pixels of ``imgs``,
``paths`` list[str], ``shapes`` list of ``((h0, w0), ((ratio_h, ratio_w), (pad_w, pad_h)))``.

Per epoch call :func:`set_epoch` (sampler order + dataset augmentation seed / close-mosaic).
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler

from .dataset import DetectionDataset
from .formats import DataNotFoundError, load_data_yaml


def collate_fn(batch: Sequence[Tuple[torch.Tensor, torch.Tensor, str, Any]]):
    """Stack samples into the batch contract (targets get the batch index in column 0)."""
    imgs, labels, paths, shapes = zip(*batch)
    targets = [torch.cat([torch.full((len(l), 1), float(i)), l], 1) for i, l in enumerate(labels)]
    return torch.stack(imgs, 0), torch.cat(targets, 0), list(paths), list(shapes)


class SeededRandomSampler(Sampler[int]):
    """Random permutation that depends only on ``(seed, epoch)``: reproducible and resumable
    (call :meth:`set_epoch`)."""

    def __init__(self, data_source, seed: int = 0):
        self.n = len(data_source)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed python/numpy from the worker's torch seed and keep
    each worker single-threaded (OpenCV, torch) so that workers do not oversubscribe cores."""
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(1)
    try:
        import cv2
        cv2.setNumThreads(0)
    except ImportError:  # pragma: no cover
        pass


def build_dataloader(dataset, batch_size: int, shuffle: bool, workers: int, seed: int = 0,
                     rank: int = 0, world_size: int = 1, drop_last: bool = False,
                     persistent_workers: bool = True, prefetch_factor: Optional[int] = None
                     ) -> DataLoader:
    """DataLoader with :func:`collate_fn`, a seeded sampler (``DistributedSampler`` when
    ``world_size > 1``, else :class:`SeededRandomSampler` / sequential) and seeded workers.

    ``workers`` is capped at the CPU count. Same seed -> same batches, for any worker count
    (augmentation depends on ``(dataset.seed, epoch, index)`` only).
    """
    workers = max(0, min(int(workers), os.cpu_count() or 1))
    if world_size > 1:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                     seed=seed, drop_last=drop_last)
    elif shuffle:
        sampler = SeededRandomSampler(dataset, seed)
    else:
        sampler = None  # sequential
    g = torch.Generator().manual_seed(int(seed) + int(rank))
    kwargs: Dict[str, Any] = {}
    if workers > 0:
        kwargs.update(worker_init_fn=seed_worker, persistent_workers=persistent_workers)
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, shuffle=False,
                      num_workers=workers, collate_fn=collate_fn, drop_last=drop_last,
                      generator=g, pin_memory=False, **kwargs)


def set_epoch(loader: DataLoader, epoch: int, total_epochs: Optional[int] = None) -> None:
    """Call before iterating epoch ``epoch`` (0-based): reshuffles the sampler and sets the
    dataset's augmentation epoch / close-mosaic state."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch, total_epochs)


def resolve_data_yaml(path: str) -> Path:
    """A data YAML path as given, else relative to the cwd, else to the repository root."""
    p = Path(os.path.expanduser(str(path)))
    if p.is_absolute() or p.exists():
        return p
    repo = Path(__file__).resolve().parents[2]
    return repo / p if (repo / p).exists() else p


def build_datasets_from_config(cfg, splits: Sequence[str] = ("train", "val"), verbose: bool = True
                               ) -> Tuple[Optional[DetectionDataset], Optional[DetectionDataset],
                                          Dict[str, Any]]:
    """Build ``(train_ds, val_ds, data_info)`` from ``cfg.data`` (``dataset`` YAML, ``img_size``,
    ``augment``, ``cache_labels``, ``root``); a split not in ``splits`` is returned as None.

    ``data_info`` is :func:`load_data_yaml`'s dict (absolute paths, ``nc``, ``names``,
    ``coco_ids``, ``train_json``, ``val_json``, ``yaml_file``).
    """
    d = cfg.data
    yaml_path = resolve_data_yaml(d.dataset)
    info = load_data_yaml(yaml_path, root=d.get("root", None) if hasattr(d, "get") else None)
    seed = int(cfg.train.seed) if "train" in cfg else 0
    common = dict(img_size=int(d.img_size), hyp=d.augment, nc=info["nc"], names=info["names"],
                  coco_ids=info["coco_ids"], cache=bool(d.cache_labels), seed=seed, verbose=verbose)
    out: List[Optional[DetectionDataset]] = []
    for split, augment in (("train", True), ("val", False)):
        if split not in splits:
            out.append(None)
            continue
        if info[split] is None:
            raise DataNotFoundError(f"{info['yaml_file']}: key '{split}' missing")
        out.append(DetectionDataset(info[split], augment=augment, json_file=info[f"{split}_json"],
                                    prefix=split, **common))
    return out[0], out[1], info
