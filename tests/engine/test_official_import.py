"""Official YOLOv6 checkpoints (pickled ``yolov6.*`` module trees, fp16) import without the
official code and without executing pickled code."""
import os
import pickle
import sys
import types

import pytest
import torch

from yolo_q import build_model, load_config, load_model
from yolo_q.io import CheckpointError, read_official_checkpoint

# our class name -> (official module, official class name)
OFFICIAL_NAMES = {
    "Model": ("yolov6.models.yolo", "Model"),
    "EfficientRep": ("yolov6.models.efficientrep", "EfficientRep"),
    "CSPBepBackbone": ("yolov6.models.efficientrep", "CSPBepBackbone"),
    "RepBiFPANNeck": ("yolov6.models.reppan", "RepBiFPANNeck"),
    "CSPRepBiFPANNeck": ("yolov6.models.reppan", "CSPRepBiFPANNeck"),
    "EffiDeHead": ("yolov6.models.effidehead", "Detect"),
    "ConvBNAct": ("yolov6.layers.common", "ConvBNReLU"),
    "SPPF": ("yolov6.layers.common", "SimSPPF"),
    "CSPSPPF": ("yolov6.layers.common", "SimCSPSPPF"),
}


def _official_pickle(model: torch.nn.Module, path, extra=None):
    """Save ``model`` the way the official trainer does: whole modules of ``yolov6.*`` classes, fp16."""
    fake = {}
    originals = {}
    for m in model.modules():
        cls = type(m)
        if not cls.__module__.startswith("yolo_q."):
            continue
        mod_name, name = OFFICIAL_NAMES.get(cls.__name__, ("yolov6.layers.common", cls.__name__))
        key = (mod_name, name, cls)
        if key not in fake:
            parts = mod_name.split(".")
            for i in range(1, len(parts) + 1):  # register yolov6, yolov6.models, ... for import
                sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
            module = sys.modules[mod_name]
            new_cls = type(name, (cls,), {"__module__": mod_name, "__qualname__": name})
            setattr(module, name, new_cls)
            fake[key] = new_cls
        originals[m] = cls
        m.__class__ = fake[key]
    try:
        ckpt = {"model": model.half(), "ema": model, "updates": 10, "epoch": 3,
                "optimizer": {"state": {}, "param_groups": []}}
        ckpt.update(extra or {})
        torch.save(ckpt, path)
    finally:
        for m, cls in originals.items():
            m.__class__ = cls
        model.float()
        for mod_name in [k for k in sys.modules if k == "yolov6" or k.startswith("yolov6.")]:
            del sys.modules[mod_name]
    assert "yolov6" not in sys.modules


def _half_rounded(model):
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.copy_(t.half().float())
    return model


@pytest.mark.parametrize("fused,eps", [(False, 1e-3), (True, 1e-3), (False, 1e-5)])
def test_official_checkpoint_loads_with_identical_outputs(tmp_path, repo_root, randomize, fused,
                                                          eps):
    cfg = load_config(repo_root / "configs/yolov6n.yaml", [f"model.bn_eps={eps}"])
    model = _half_rounded(randomize(build_model(cfg))).eval()
    if fused:
        model.fuse()
        _half_rounded(model)
    x = torch.rand(1, 3, 96, 96)
    with torch.no_grad():
        ref = model(x)
    path = tmp_path / "yolov6n.pt"
    _official_pickle(model, path)
    assert "yolov6" not in sys.modules

    loaded = load_model(path)  # config inferred from the weights' shapes (yolov6n)
    assert loaded.yolo_q_config.model.name == "yolov6n"
    assert loaded.is_fused == fused
    if not fused:  # the BN eps of the pickled modules, not the default of yolov6n.yaml
        assert loaded.yolo_q_config.model.bn_eps == eps
        assert {m.eps for m in loaded.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {eps}
    with torch.no_grad():
        out = loaded(x)
    assert torch.equal(out, ref)
    assert "yolov6" not in sys.modules


def test_training_only_branches_are_dropped(tmp_path, repo_root):
    cfg = load_config(repo_root / "configs/yolov6n.yaml", ["model.width_multiple=0.125", "model.nc=3"])
    model = build_model(cfg)
    model.detect.cls_preds_ab = torch.nn.ModuleList(torch.nn.Conv2d(8, 3, 1) for _ in range(3))
    path = tmp_path / "ab.pt"
    _official_pickle(model, path)
    sd = read_official_checkpoint(path)
    assert not any("cls_preds_ab" in k for k in sd)
    loaded = load_model(path, cfg=cfg)
    assert loaded.detect.nc == 3


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ.get("YOLOQ_EVIL_MARK", "/tmp/yoloq_evil"),))


def test_malicious_checkpoint_is_refused_without_running(tmp_path, monkeypatch):
    mark = tmp_path / "pwned"
    monkeypatch.setenv("YOLOQ_EVIL_MARK", str(mark))
    path = tmp_path / "evil.pt"
    torch.save({"model": _Evil()}, path)
    with pytest.raises(CheckpointError, match=r"evil.pt.*refused global '(posix|os)\.system'"):
        load_model(path)
    assert not mark.exists()


def test_plain_state_dict_loads(tmp_path, repo_root, randomize):
    cfg = load_config(repo_root / "configs/yolov6n.yaml", ["model.width_multiple=0.125", "model.nc=3"])
    model = randomize(build_model(cfg)).eval()
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    loaded = load_model(tmp_path / "sd.pt", cfg=cfg)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_mismatched_weights_name_the_keys(tmp_path, repo_root):
    cfg = load_config(repo_root / "configs/yolov6n.yaml", ["model.width_multiple=0.125", "model.nc=3"])
    torch.save(build_model(cfg).state_dict(), tmp_path / "sd.pt")
    other = load_config(repo_root / "configs/yolov6n.yaml", ["model.width_multiple=0.125", "model.nc=4"])
    with pytest.raises(CheckpointError, match=r"sd.pt: does not match the model: .*shape.*cls_preds"):
        load_model(tmp_path / "sd.pt", cfg=other)
    with pytest.raises(CheckpointError, match="none of configs"):
        load_model(tmp_path / "sd.pt")


def _tiny(repo_root):
    cfg = load_config(repo_root / "configs/yolov6n.yaml", ["model.width_multiple=0.125", "model.nc=3"])
    return cfg, build_model(cfg).eval()


def _set_dilation(m):
    m.backbone.stem.rbr_dense.conv.dilation = (2, 2)


def _set_act(m):
    m.neck.reduce_layer0.block.act = torch.nn.Hardswish()


def _set_eps(m):
    m.neck.reduce_layer1.block.bn.eps = 1e-4


def _set_offset(m):
    m.detect.grid_cell_offset = 0.0


def _set_pool(m):
    m.backbone.ERBlock_5[2].cspsppf.m.kernel_size = 3


@pytest.mark.parametrize("change,message", [
    (_set_dilation, r"cannot honour official backbone.stem.rbr_dense.conv.dilation = \(2, 2\) "
                    r"\(yolo_q's model has \(1, 1\)\)"),
    (_set_act, r"cannot honour official neck.reduce_layer0.block.act activation = 'Hardswish'"),
    (_set_eps, r"BatchNorm eps differs between layers \(0.001 at backbone.stem.*, 0.0001 at "
               r"neck.reduce_layer1.block.bn\)"),
    (_set_offset, r"cannot honour official detect.grid_cell_offset = 0.0"),
    (_set_pool, r"cannot honour official backbone.ERBlock_5.2.cspsppf.m.kernel_size = 3"),
], ids=["conv-dilation", "activation", "mixed-bn-eps", "grid-offset", "pool-kernel"])
def test_function_changing_attribute_is_refused_by_name(tmp_path, repo_root, change, message):
    """Attributes that change the function and that yolo_q cannot build are refused (one line
    naming the attribute), not silently replaced by yolo_q's own."""
    cfg, model = _tiny(repo_root)
    change(model)
    path = tmp_path / "changed.pt"
    _official_pickle(model, path)
    with pytest.raises(CheckpointError, match=message) as e:
        load_model(path, cfg=cfg)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
