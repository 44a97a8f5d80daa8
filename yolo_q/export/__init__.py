"""ONNX export: float graphs (and, via the legacy exporter, QDQ graphs of fake-quant models),
optional end-to-end NMS for ONNX Runtime or TensorRT."""
from .onnx import (E2E_OUTPUTS, add_nms_onnxruntime, add_nms_tensorrt, export_onnx, onnx_info,
                   shared_initializers)

__all__ = ["E2E_OUTPUTS", "add_nms_onnxruntime", "add_nms_tensorrt", "export_onnx", "onnx_info",
           "shared_initializers"]
