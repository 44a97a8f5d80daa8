import pytest
import torch
import torch.nn.functional as F

from yolo_q import build_model, load_config
from yolo_q.models.blocks import LinearAddBlock, RealVGGBlock
from yolo_q.optim.repopt import (RepOptimizer, ScalesError, extract_scales, load_scales,
                                 prepare_repopt, save_scales)


def _pair(c_in, c_out, stride, seed=0):
    """A LinearAddBlock with constant random scales, and the RealVGG block RepOpt derives from it."""
    torch.manual_seed(seed)
    multi = LinearAddBlock(c_in, c_out, 3, stride)
    with torch.no_grad():
        for s in (multi.scale_conv, multi.scale_1x1, multi.scale_identity):
            if s is not None:
                s.weight.uniform_(0.3, 1.5)
                s.weight.requires_grad_(False)  # constant scales, as after hyper-search
    plain = RealVGGBlock(c_in, c_out, 3, stride)
    scales = {"blk": extract_scales(torch.nn.ModuleDict({"blk": multi}))["blk"]}
    holder = torch.nn.ModuleDict({"blk": plain})
    masks, offsets = prepare_repopt(holder, scales, reinit=False)
    with torch.no_grad():  # start from the same function: W = s3 W3 + s1 pad(W1) + sid I
        w = multi.conv.weight * multi.scale_conv.weight.view(-1, 1, 1, 1)
        w = w + F.pad(multi.conv_1x1.weight, [1, 1, 1, 1]) * multi.scale_1x1.weight.view(-1, 1, 1, 1)
        if multi.scale_identity is not None:
            w = w + offsets[plain.conv.weight]
        plain.conv.weight.copy_(w)
        plain.bn.load_state_dict(multi.bn.state_dict())
    return multi, plain, masks, offsets


@pytest.mark.parametrize("c_in,c_out,stride", [(6, 6, 1), (4, 8, 2)])
@pytest.mark.parametrize("nesterov", [False, True])
def test_repopt_equals_multibranch_sgd(c_in, c_out, stride, nesterov):
    multi, plain, masks, offsets = _pair(c_in, c_out, stride)
    hp = dict(lr=0.05, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    # weight decay on conv weights only (BN params without decay), like the trainer's groups
    sgd = torch.optim.SGD([{"params": [multi.conv.weight, multi.conv_1x1.weight]},
                           {"params": [multi.bn.weight, multi.bn.bias], "weight_decay": 0.0}], **hp)
    rep = RepOptimizer([{"params": [plain.conv.weight]},
                        {"params": [plain.bn.weight, plain.bn.bias], "weight_decay": 0.0}],
                       grad_masks=masks, decay_offsets=offsets, **hp)
    g = torch.Generator().manual_seed(1)
    target = torch.randn(3, c_out, 8 // stride, 8 // stride, generator=g)
    for _ in range(8):
        x = torch.randn(3, c_in, 8, 8, generator=g)
        for model, opt in ((multi, sgd), (plain, rep)):
            opt.zero_grad()
            F.mse_loss(model(x), target).backward()
            opt.step()
    multi.eval(), plain.eval()
    x = torch.randn(2, c_in, 8, 8, generator=g)
    with torch.no_grad():
        a, b = multi(x), plain(x)
    assert not torch.allclose(plain.conv.weight, _pair(c_in, c_out, stride)[1].conv.weight)  # it moved
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (a - b).abs().max()


def test_mask_values_and_reinit():
    multi, plain, masks, offsets = _pair(4, 4, 1)
    m = masks[plain.conv.weight]
    s3, s1 = multi.scale_conv.weight, multi.scale_1x1.weight
    assert torch.allclose(m[:, :, 0, 0], (s3 ** 2).view(-1, 1).expand(4, 4))
    assert torch.allclose(m[:, :, 1, 1], (s3 ** 2 + s1 ** 2).view(-1, 1).expand(4, 4))
    off = offsets[plain.conv.weight]
    assert torch.allclose(off[:, :, 1, 1], torch.diag(multi.scale_identity.weight))


def test_scales_file_round_trip_and_errors(tmp_path, repo_root):
    hs = build_model(load_config(repo_root / "configs/yolov6n.yaml",
                                 ["model.block=linearadd", "model.width_multiple=0.125"]))
    path = save_scales(hs, tmp_path / "scales.pt")
    scales = load_scales(path)
    assert "backbone.stem" in scales and scales["backbone.stem"]["scale_identity"] is None
    opt_model = build_model(load_config(repo_root / "configs/yolov6n.yaml",
                                        ["model.block=realvgg", "model.width_multiple=0.125"]))
    masks, offsets = prepare_repopt(opt_model, scales, path)
    n_plain = sum(isinstance(m, RealVGGBlock) for m in opt_model.modules())
    assert len(masks) == n_plain and 0 < len(offsets) < n_plain

    bad = dict(scales)
    bad.pop("neck.Rep_p3.conv1")
    with pytest.raises(ScalesError, match="no scales for layer 'neck.Rep_p3.conv1'"):
        prepare_repopt(opt_model, bad, path)
    wrong = {k: dict(v) for k, v in scales.items()}
    wrong["backbone.stem"]["scale_conv"] = torch.ones(3)
    with pytest.raises(ScalesError, match=r"layer 'backbone.stem': scale_conv has shape \(3,\)"):
        prepare_repopt(opt_model, wrong, path)
    other = build_model(load_config(repo_root / "configs/yolov6n.yaml",
                                    ["model.block=realvgg", "model.width_multiple=0.25"]))
    with pytest.raises(ScalesError, match="backbone.stem"):
        prepare_repopt(other, scales, path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ScalesError, match="junk.pt"):
        load_scales(tmp_path / "junk.pt")
    with pytest.raises(ScalesError, match="missing.pt"):
        load_scales(tmp_path / "missing.pt")
