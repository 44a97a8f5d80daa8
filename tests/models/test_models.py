import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from yolo_q import build_model, load_config
from yolo_q.models import BLOCKS
from yolo_q.models.blocks import LinearAddBlock, RealVGGBlock, RepVGGBlock, fuse_modules

# official YOLOv6 v3.0 deploy counts (../shared/reference/README.md)
OFFICIAL = {"n": (4_646_957, 11.316), "s": (18_537_293, 44.967), "m": (34_855_958, 85.087),
            "l": (59_607_563, 149.467)}


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("size", ["n", "s", "m", "l"])
def test_fused_counts_match_official(size, repo_root):
    model = build_model(load_config(repo_root / f"configs/yolov6{size}.yaml")).eval().fuse()
    params, gflops = OFFICIAL[size]
    assert abs(n_params(model) - params) / params < 0.005
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        out = model(torch.zeros(1, 3, 640, 640))
    assert abs(fc.get_total_flops() / 1e9 - gflops) / gflops < 0.01  # FLOPs = 2 x MACs
    assert out.shape == (1, 8400, 85)


@pytest.mark.parametrize("size", ["n", "s", "m", "l"])
def test_fuse_is_exact(size, repo_root, randomize):
    model = randomize(build_model(load_config(repo_root / f"configs/yolov6{size}.yaml"))).eval()
    x = torch.rand(2, 3, 128, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        fused = model.fuse()
        assert fused.is_fused
        out = fused(x)
    assert not any(isinstance(m, RepVGGBlock) and hasattr(m, "rbr_dense") for m in fused.modules())
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel < 1e-4, rel


@pytest.mark.parametrize("size", ["n", "s"])
def test_state_dict_keys_match_official(size, repo_root):
    path = repo_root.parent / "shared/reference" / f"yolov6_v3_state_dict_{size}.json"
    if not path.exists():  # the project's shared/ folder sits beside the checkout in CI
        pytest.skip(f"{path} not found (shared/ is not beside this checkout)")
    ref = json.loads(path.read_text())["plain"]
    model = build_model(load_config(repo_root / f"configs/yolov6{size}.yaml"))
    for form in ("train", "deploy"):
        if form == "deploy":
            model.fuse()
        ours = {k: list(v.shape) for k, v in model.state_dict().items()}
        assert ours == ref[form]


def test_output_layout_eval(repo_root, randomize):
    cfg = load_config(repo_root / "configs/yolov6n.yaml", ["model.nc=7", "model.width_multiple=0.125"])
    model = randomize(build_model(cfg)).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 96, 128))
    n = 12 * 16 + 6 * 8 + 3 * 4
    assert out.shape == (1, n, 12)
    assert torch.all(out[..., 4] == 1)
    assert torch.all((out[..., 5:] >= 0) & (out[..., 5:] <= 1))


def test_fresh_head_decodes_anchor_boxes(repo_root):
    # a fresh head predicts distances (1, 1, 1, 1) everywhere: a 2-stride square per anchor
    cfg = load_config(repo_root / "configs/yolov6n.yaml", ["model.nc=2", "model.width_multiple=0.125"])
    model = build_model(cfg).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 96))
    assert torch.allclose(out[0, 0, :4], torch.tensor([4.0, 4.0, 16.0, 16.0]))  # cell (0,0), s=8
    assert torch.allclose(out[0, 1, :4], torch.tensor([12.0, 4.0, 16.0, 16.0]))  # cell (0,1)
    last = out[0, -1, :4]  # cell (1, 2) of the stride-32 level (2 x 3 grid)
    assert torch.allclose(last, torch.tensor([80.0, 48.0, 64.0, 64.0]))
    assert torch.allclose(out[0, :, 5:], torch.full_like(out[0, :, 5:], 0.01), atol=1e-6)


def test_train_mode_outputs(repo_root):
    cfg = load_config(repo_root / "configs/yolov6m.yaml", ["model.nc=5", "model.width_multiple=0.25",
                                                          "model.depth_multiple=0.33"])
    model = build_model(cfg).train()
    feats, cls, reg = model(torch.rand(2, 3, 64, 64))
    assert len(feats) == 3 and cls.shape == (2, 84, 5) and reg.shape == (2, 84, 68)


@pytest.mark.parametrize("block", ["repvgg", "realvgg", "linearadd", "conv_relu", "conv_silu"])
def test_block_types_fuse_exactly(block, randomize):
    torch.manual_seed(0)
    m = BLOCKS.get(block)(8, 8, 3, 1)
    if isinstance(m, LinearAddBlock):
        with torch.no_grad():
            for s in (m.scale_conv, m.scale_1x1, m.scale_identity):
                s.weight.uniform_(0.5, 1.5)
    randomize(m).eval()
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        ref = m(x)
        fuse_modules(m)
        out = m(x)
    assert not any(isinstance(c, torch.nn.BatchNorm2d) for c in m.modules())
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_block_choice_changes_structure(repo_root):
    for block, cls in (("realvgg", RealVGGBlock), ("linearadd", LinearAddBlock)):
        cfg = load_config(repo_root / "configs/yolov6n.yaml", [f"model.block={block}"])
        model = build_model(cfg)
        assert isinstance(model.backbone.stem, cls)
        assert not any(isinstance(m, RepVGGBlock) for m in model.modules())


def test_registry_unknown_name_suggests():
    with pytest.raises(KeyError, match="did you mean 'repvgg'"):
        BLOCKS.get("repvgq")


def test_batchnorm_settings_from_config(repo_root):
    cfg = load_config(repo_root / "configs/yolov6n.yaml", ["model.width_multiple=0.125"])
    bns = [m for m in build_model(cfg).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and {(m.eps, m.momentum) for m in bns} == {(1e-3, 0.03)}  # the official recipe
    for block in ("repvgg", "realvgg", "linearadd", "conv_silu"):
        cfg = load_config(repo_root / "configs/yolov6n.yaml", [
            "model.width_multiple=0.125", f"model.block={block}", "model.bn_eps=1e-5",
            "model.bn_momentum=0.1"])
        bns = [m for m in build_model(cfg).modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert {(m.eps, m.momentum) for m in bns} == {(1e-5, 0.1)}, block


@pytest.mark.parametrize("eps", [1e-3, 1e-5])
@pytest.mark.parametrize("block", ["repvgg", "realvgg", "linearadd", "conv_silu"])
def test_fuse_uses_each_bn_eps(randomize, eps, block):
    """Variances of the order of eps, where a fold with another eps would be visibly off."""
    from yolo_q.models.yolo import set_batchnorm
    m = set_batchnorm(randomize(BLOCKS.get(block)(8, 8)), eps, 0.03).eval()
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.running_var.mul_(eps)
    x = torch.rand(2, 8, 12, 12) * 1e-2
    with torch.no_grad():
        ref = m(x)
        fuse_modules(m)
        out = m(x)
    assert not any(isinstance(b, torch.nn.BatchNorm2d) for b in m.modules())
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_bad_bn_settings_name_the_key(repo_root):
    from yolo_q.config import ConfigError
    with pytest.raises(ConfigError, match="model.bn_eps"):
        load_config(repo_root / "configs/yolov6n.yaml", ["model.bn_eps=0"])
    with pytest.raises(ConfigError, match="model.bn_momentum"):
        load_config(repo_root / "configs/yolov6n.yaml", ["model.bn_momentum=1.5"])
