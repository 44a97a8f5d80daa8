"""Quantization: fake-quant quantizers, calibrators, module swap (:func:`convert`), PTQ
calibration, shared concat scales and an integer-arithmetic check. Models know nothing about
it: ``convert(model.fuse(), cfg)`` returns a quantized copy.

Typical PTQ::

    qmodel = convert(build_model(cfg).fuse(), cfg)       # cfg.quant drives the options
    calibrate(qmodel, loader, num_batches=cfg.quant.calib_batches)
    save_checkpoint({"model": qmodel.state_dict(), "quant_state": quant_state(qmodel)}, path)
    # later: restore(build_model(cfg).fuse(), ckpt["quant_state"], ckpt["model"])

:func:`yolo_q.load_model` (:mod:`.load`) rebuilds a saved checkpoint. The workflows, which
also evaluate and export, are imported from their modules (this package's top holds only the
quantization core, so that evaluation and export may use it without an import cycle):
:mod:`.ptq` (``run_ptq``, ``quantize_model``, ``calibration_batches``), :mod:`.sensitivity`,
:mod:`.partial` (``search_max_drop``, ``skip_top``), :mod:`.qat` (``run_qat``).
"""
from .calibrators import HistogramCalibrator, MaxCalibrator, make_calibrator
from .convert import (DFL_LAYERS, FLAVOURS, OUTPUT_LAYERS, CalibrationError, QuantStateError,
                      activation_quantizers, all_quantizers, apply_shared_scales, calibrate,
                      calibrate_weights, capture_layer_outputs, convert, disable_layers,
                      enable_range_ema, floor_learned_scales, floor_weight_scales,
                      is_quantized, layer_modules, layer_output_errors, learn_activation_scales,
                      quant_state, quantize_only, quantized_layers,
                      resolve_settings, restore, set_quant_enabled, weight_quantizers)
from .integer import (bias_overflow_lines, int32_bias_overflow, integer_check,
                      quantize_multiplier, requantize)
from .modules import QUANT_MODULES, QuantConv2d, QuantConvTranspose2d, QuantMaxPool2d
from .load import load_model, load_quantized
from .tensor_quantizer import AMAX_EPS, QuantizerError, TensorQuantizer

__all__ = ["AMAX_EPS", "CalibrationError", "DFL_LAYERS", "FLAVOURS", "HistogramCalibrator",
           "MaxCalibrator", "OUTPUT_LAYERS", "QUANT_MODULES", "QuantConv2d",
           "QuantConvTranspose2d", "QuantMaxPool2d", "QuantStateError", "QuantizerError",
           "TensorQuantizer", "activation_quantizers", "all_quantizers", "apply_shared_scales",
           "calibrate", "calibrate_weights", "capture_layer_outputs", "convert",
           "bias_overflow_lines", "disable_layers", "enable_range_ema", "floor_learned_scales",
           "floor_weight_scales", "learn_activation_scales",
           "int32_bias_overflow", "integer_check", "is_quantized",
           "layer_modules", "layer_output_errors", "make_calibrator", "quant_state",
           "quantize_multiplier", "quantize_only", "quantized_layers", "requantize",
           "resolve_settings", "restore", "set_quant_enabled", "weight_quantizers",
           "load_model", "load_quantized"]
