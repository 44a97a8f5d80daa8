"""BatchNorm settings belong to the weights: yolo_q checkpoints saved before ``model.bn_eps``
existed (trained with PyTorch's 1e-5) keep their outputs under today's default (1e-3)."""
import pytest
import torch

from yolo_q import build_model, load_config, load_model
from yolo_q.config import config_from_dict, config_to_dict
from yolo_q.io import save_checkpoint
from yolo_q.config import resolve_config

SMALL = ["model.width_multiple=0.125", "model.nc=3"]


def _legacy_checkpoint(tmp_path, repo_root, randomize):
    """A checkpoint as yolo_q wrote it before: BN eps 1e-5 / momentum 0.1, no keys for them."""
    cfg = load_config(repo_root / "configs/yolov6n.yaml", SMALL + ["model.bn_eps=1e-5",
                                                                   "model.bn_momentum=0.1"])
    model = randomize(build_model(cfg)).eval()
    stored = config_to_dict(cfg)
    del stored["model"]["bn_eps"], stored["model"]["bn_momentum"]
    path = save_checkpoint({"model": model.state_dict(), "config": stored}, tmp_path / "old.pt")
    return path, model


def test_config_without_bn_keys_means_the_old_values():
    cfg = config_from_dict({"model": {"name": "yolov6n"}})
    assert (cfg.model.bn_eps, cfg.model.bn_momentum) == (1e-5, 0.1)
    cfg = config_from_dict({"model": {"bn_eps": 1e-3, "bn_momentum": 0.03}})
    assert (cfg.model.bn_eps, cfg.model.bn_momentum) == (1e-3, 0.03)
    assert (config_from_dict({}).model.bn_eps, load_config(None).model.bn_eps) == (1e-3, 1e-3)


@pytest.mark.parametrize("with_cfg", [False, True])
def test_legacy_checkpoint_keeps_its_outputs(tmp_path, repo_root, randomize, with_cfg):
    path, model = _legacy_checkpoint(tmp_path, repo_root, randomize)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    # a config with today's default (1e-3) passed along: the checkpoint's settings still win
    cfg = load_config(repo_root / "configs/yolov6n.yaml", SMALL) if with_cfg else None
    loaded = load_model(path, cfg=cfg)
    assert loaded.yolo_q_config.model.bn_eps == 1e-5
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
        fused = load_model(path, cfg=cfg, fuse=True)
        assert (fused(x) - ref).abs().max() <= 1e-4 * ref.abs().max()
    # the same weights under today's default compute something else (the test has teeth)
    new = build_model(load_config(repo_root / "configs/yolov6n.yaml", SMALL)).eval()
    new.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (new(x) - ref).abs().max() > 1e-3 * ref.abs().max()


def test_eval_config_of_legacy_checkpoint(tmp_path, repo_root, randomize):
    path, _ = _legacy_checkpoint(tmp_path, repo_root, randomize)
    assert resolve_config(None, (), str(path)).model.bn_eps == 1e-5


def test_resume_keeps_the_runs_bn_settings(tmp_path):
    """--resume of a run written before model.bn_eps existed goes on with 1e-5 / 0.1."""
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "reliability"))
    from reliability_utils import tiny_cfg, tiny_dataset
    from yolo_q.io import load_checkpoint
    from yolo_q.training import train
    data = tiny_dataset(tmp_path / "data", n_train=4, n_val=2)
    run = train(tiny_cfg(data, tmp_path / "runs", epochs=2, extra=["model.bn_eps=1e-5",
                                                                   "model.bn_momentum=0.1"]),
                verbose=False)
    last = load_checkpoint(run["last"])
    del last["config"]["model"]["bn_eps"], last["config"]["model"]["bn_momentum"]
    last["epoch"] = 0  # one epoch left to do
    save_checkpoint(last, run["last"])
    resumed = train(tiny_cfg(data, tmp_path / "runs", epochs=2), resume=run["last"], verbose=False)
    model_cfg = load_checkpoint(resumed["last"])["config"]["model"]
    assert (model_cfg["bn_eps"], model_cfg["bn_momentum"]) == (1e-5, 0.1)
