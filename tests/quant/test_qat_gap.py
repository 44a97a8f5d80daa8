"""benchmarks/reference/qat_gap.py: the quantizer-group breakdown of a quantized checkpoint.
Checked on its arithmetic: with no quantizer on, the model computes the fused float network of
its weights; every row is a distinct configuration; the model is left as it was given."""
import importlib.util
from pathlib import Path

import torch

import test_qat_fixtures as F
from yolo_q import load_model

REPO = Path(__file__).resolve().parents[2]


def _qat_gap():
    spec = importlib.util.spec_from_file_location("qat_gap", REPO / "benchmarks/reference/qat_gap.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_breakdown_rows_and_restore():
    mod = _qat_gap()
    torch.manual_seed(0)
    x = torch.rand(2, 3, 64, 64)
    model = load_model(F.calibrated_checkpoint("onnxruntime")).eval()
    fused_float = load_model(F.float_checkpoint()).eval()
    outs = {}

    def evaluate(m):
        with torch.no_grad():
            y = m(x)
        y = y[0] if isinstance(y, (list, tuple)) else y
        outs[len(outs)] = y
        return float(y.double().sum())

    before = evaluate(model)
    rows = mod.breakdown(model, evaluate)
    assert list(rows) == ["all quantized", "weights only", "none (trained weights, float)",
                          "activations only", "backbone activations float",
                          "neck activations float", "head level 0 activations float",
                          "head level 1 activations float", "head level 2 activations float"]
    with torch.no_grad():
        ref = fused_float(x)
    ref = ref[0] if isinstance(ref, (list, tuple)) else ref
    assert torch.allclose(outs[3], ref, atol=1e-4)  # 'none': the fused float network
    assert len({round(v, 3) for v in rows.values()}) == len(rows)  # every row computes something else
    assert rows["all quantized"] == before and evaluate(model) == before  # left as given
