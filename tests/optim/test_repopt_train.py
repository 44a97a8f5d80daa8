"""Hyper-search -> scales file -> RepOpt training through the real train() path, and the RepOpt
(plain) model through the same fuse / quantize / export path as any model."""
import pytest
import torch

from yolo_q import build_model, load_config
from yolo_q.data.synthetic import generate
from yolo_q.training import train
from yolo_q.models.blocks import RealVGGBlock
from yolo_q.optim.repopt import RepOptimizer, ScalesError, load_scales

TINY = ["model.width_multiple=0.125", "data.img_size=64", "data.workers=0", "train.epochs=1",
        "train.batch_size=4", "train.nominal_batch=4", "train.eval_interval=1", "train.seed=0",
        "train.progress_bar=false", "train.tensorboard=false", "eval.batch_size=4"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return str(generate(tmp_path_factory.mktemp("syn"), n_train=8, n_val=4, size=64, seed=3))


def test_hyper_search_then_repopt_training(tiny_data, tmp_path, repo_root):
    common = TINY + [f"data.dataset={tiny_data}", f"train.output_dir={tmp_path}"]
    hs = load_config(repo_root / "configs/repopt/yolov6n_hs.yaml",
                     common + ["train.epochs=2", "train.warmup_epochs=0"])
    res = train(hs, verbose=False)
    scales_path = tmp_path / "yolov6n_hs" / "scales.pt"
    scales = load_scales(scales_path)
    assert "backbone.stem" in scales and "neck.Rep_n4.block.2" in scales
    # the learned scales moved away from their initial value of 1
    assert any(not torch.allclose(v["scale_conv"], torch.ones_like(v["scale_conv"]))
               for v in scales.values())
    assert res["last"].endswith("last.pt")

    opt = load_config(repo_root / "configs/repopt/yolov6n_opt.yaml",
                      common + [f"model.scales={scales_path}"])
    res = train(opt, verbose=False)
    ck = torch.load(res["last"], weights_only=True)
    from yolo_q.config import config_from_dict
    model = build_model(config_from_dict(ck["config"]))
    model.load_state_dict(ck["model"])
    assert isinstance(model.backbone.stem, RealVGGBlock)

    bad = load_config(repo_root / "configs/repopt/yolov6n_opt.yaml",
                      common + [f"model.scales={tmp_path / 'missing.pt'}"])
    with pytest.raises(ScalesError, match="missing.pt"):
        train(bad, verbose=False)


def test_build_optimizer_gives_repoptimizer_with_masks(repo_root, tmp_path):
    from yolo_q.engine.session import build_optimizer_for
    from yolo_q.optim.repopt import save_scales
    hs = build_model(load_config(repo_root / "configs/repopt/yolov6n_hs.yaml", TINY))
    save_scales(hs, tmp_path / "s.pt")
    cfg = load_config(repo_root / "configs/repopt/yolov6n_opt.yaml",
                      TINY + [f"model.scales={tmp_path / 's.pt'}"])
    model = build_model(cfg)
    opt = build_optimizer_for(model, cfg)
    assert isinstance(opt, RepOptimizer)
    n_plain = sum(isinstance(m, RealVGGBlock) for m in model.modules())
    assert len(opt.grad_masks) == n_plain


def test_repopt_model_quantizes_and_exports(repo_root, tmp_path, randomize):
    import onnx

    from yolo_q.quant import calibrate, convert
    from yolo_q.export.qdq import export_qdq
    cfg = load_config(repo_root / "configs/yolov6n.yaml",
                      ["model.block=realvgg", "model.width_multiple=0.125", "model.nc=3"])
    model = randomize(build_model(cfg)).eval().fuse()
    assert model.is_fused and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    q = convert(model, cfg)
    batches = [torch.rand(2, 3, 64, 64) for _ in range(2)]
    calibrate(q, batches, method="max", progress=False)
    path = export_qdq(q, tmp_path / "repopt_qdq.onnx", img_size=64)
    graph = onnx.load(str(path)).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) > 10
