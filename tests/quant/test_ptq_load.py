"""Quantized checkpoints: the agreed format round-trips through load_quantized / load_model."""
import pytest
import torch

from test_ptq_fixtures import IMG, setup
from yolo_q import load_model
from yolo_q.config import config_to_dict
from yolo_q.io import CheckpointError, save_checkpoint
from yolo_q.eval import TorchBackend
from yolo_q.quant import load_quantized, quant_state, quantized_layers
from yolo_q.quant.ptq import quantize_model
from yolo_q.quant.modules import QuantLayerMixin


def _ptq_checkpoint(tmp_path, skip=()):
    cfg, fused, batches, _, _ = setup()
    q = quantize_model(fused, cfg, batches, skip=skip, progress=False)
    path = save_checkpoint({"model": q.state_dict(), "config": config_to_dict(cfg),
                            "quant": quant_state(q), "ptq": {"calib": "percentile"},
                            "skip_layers": list(skip)}, tmp_path / "ptq.pt")
    return cfg, q, path


def test_load_quantized_round_trip(tmp_path):
    skip = ["neck.Rep_p3.block.0.rbr_reparam"]
    cfg, q, path = _ptq_checkpoint(tmp_path, skip)
    raw = torch.load(path, weights_only=True)  # plain types only
    assert any(k.endswith("_input_quantizer._amax") for k in raw["model"])
    assert raw["quant"]["skip"] == skip
    x = torch.rand(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = q.eval()(x)
        assert not torch.equal(ref, setup()[1].eval()(x))  # really quantized
        again = load_quantized(cfg, raw["model"], raw["quant"])
        assert not again.training
        assert torch.equal(again(x), ref)
        assert quantized_layers(again) == quantized_layers(q)
        assert not isinstance(again.get_submodule(skip[0]), QuantLayerMixin)
        # through yolo_q.load_model (config from the checkpoint) ...
        loaded = load_model(path)
        assert torch.equal(loaded(x), ref)
        # ... and the torch eval backend, which fuses a copy (tools/eval.py --weights)
        assert torch.equal(TorchBackend(loaded, fuse=True)(x), ref)


def test_load_quantized_names_mismatches(tmp_path):
    cfg, q, path = _ptq_checkpoint(tmp_path)
    raw = torch.load(path, weights_only=True)
    sd = dict(raw["model"])
    key = next(k for k in sd if k.endswith("_input_quantizer._amax"))
    del sd[key]
    with pytest.raises(CheckpointError, match="missing.*" + key.replace(".", r"\.")):
        load_quantized(cfg, sd, raw["quant"], source="x.pt")
    with pytest.raises(ValueError, match="not a yolo_q quant state"):
        load_quantized(cfg, raw["model"], {"flavour": "tensorrt"})
