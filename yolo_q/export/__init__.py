"""ONNX export: float graphs (and, via the legacy exporter, QDQ graphs of fake-quant models),
optional end-to-end NMS (ONNX NonMaxSuppression, or the EfficientNMS_TRT plugin), and the FP16
rewrite for strongly typed TensorRT builds."""
from .fp16 import convert_fp16, is_fp16_graph, write_fp16
from .onnx import (E2E_OUTPUTS, add_nms_onnxruntime, add_nms_tensorrt, export_onnx, onnx_info,
                   shared_initializers)

__all__ = ["E2E_OUTPUTS", "add_nms_onnxruntime", "add_nms_tensorrt", "convert_fp16",
           "export_onnx", "is_fp16_graph", "onnx_info", "shared_initializers", "write_fp16"]
