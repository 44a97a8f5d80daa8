"""A model put on a dataset (issue #21): the image size must be a multiple of the model's max
stride (config validation, the eval API), and the model's class count must equal the dataset's,
checked by one function (``yolo_q.data.check_model_nc``) in eval on every backend, PTQ, QAT and
export — one line naming both, before any work (it used to exit 0 with a score)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from eval.eval_testutils import tiny_detector
from reliability_utils import REPO, tiny_dataset
from yolo_q.config import ConfigError, load_config
from yolo_q.data import DataError
from yolo_q.io import save_checkpoint
from yolo_q.engine.trainer import config_dict
from yolo_q.config import resolve_config
from yolo_q.eval.api import run_eval

TINY = ["model.width_multiple=0.125", "model.depth_multiple=0.1", "data.img_size=64",
        "data.workers=0", "eval.batch_size=4", "train.device=cpu"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """An 8-class dataset, a 3-class copy of its YAML, and nc=3 / nc=8 float checkpoints whose
    stored config names the 8-class dataset."""
    d = tmp_path_factory.mktemp("ncchk")
    y8 = tiny_dataset(d / "data", n_train=4, n_val=4, size=64)
    y3 = y8.parent / "three.yaml"
    y3.write_text("path: .\ntrain: images/train\nval: images/val\nnc: 3\nnames: [a, b, c]\n")
    out = {"dir": d, "y8": y8, "y3": y3}
    for nc in (3, 8):
        cfg = load_config(REPO / "configs/yolov6n.yaml", TINY + [f"model.nc={nc}",
                                                                 f"data.dataset={y8}"])
        model = tiny_detector(nc=nc)
        save_checkpoint({"model": model.state_dict(), "config": config_dict(cfg)},
                        d / f"nc{nc}.pt")
        out[f"cfg{nc}"], out[f"model{nc}"] = cfg, model
    return out


def _names_both(err, *parts):
    msg = str(err.value)
    assert len(msg.splitlines()) == 1, msg
    for p in parts:
        assert str(p) in msg, (p, msg)


# ------------------------------------------------------------------------ C: stride multiples
@pytest.mark.parametrize("size", [50, 0, -64, 100])
def test_config_rejects_img_size_not_a_stride_multiple(size):
    with pytest.raises(ConfigError, match=rf"invalid value {size} for 'data.img_size'.*"
                                          r"multiple of the model's max stride 32") as e:
        load_config(None, [f"data.img_size={size}"])
    assert len(str(e.value).splitlines()) == 1
    # a larger max stride is the model's, not a constant
    with pytest.raises(ConfigError, match="max stride 64"):
        load_config(None, ["model.head.strides=[8,16,32,64]", "data.img_size=96"])
    assert load_config(None, ["data.img_size=96"]).data.img_size == 96


def test_train_api_rejects_img_size_before_the_run_dir(tmp_path):
    from omegaconf import OmegaConf

    from yolo_q.training import train
    cfg = load_config(None, [f"train.output_dir={tmp_path / 'runs'}"])
    cfg.data.img_size = 50  # set after validation (an API caller, not a YAML)
    with pytest.raises(ConfigError, match="invalid value 50 for 'data.img_size'"):
        train(OmegaConf.create(OmegaConf.to_container(cfg)), verbose=False)
    assert not (tmp_path / "runs").exists()


def test_eval_entry_rejects_img_size_before_work(env, monkeypatch):
    import yolo_q.eval.api as api
    monkeypatch.setattr(api, "build_backend", lambda *a, **k: pytest.fail("model was loaded"))
    with pytest.raises(ConfigError, match=r"invalid value 50 for '--imgsz'"):
        run_eval(env["cfg8"], "torch", env["model8"], img_size=50, verbose=False)
    # a checkpoint's stored config + a command-line override: validated like a YAML
    with pytest.raises(ConfigError, match=r"nc8.pt \(stored config\) \+ command line: invalid "
                                          r"value 50 for 'data.img_size'"):
        resolve_config(None, ["data.img_size=50"], str(env["dir"] / "nc8.pt"))


def test_eval_tool_imgsz_one_line(env):
    r = subprocess.run([sys.executable, REPO / "tools/eval.py", "--weights", env["dir"] / "nc8.pt",
                        "--imgsz", "50"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "'--imgsz'" in r.stderr and "stride 32" in r.stderr


# ------------------------------------------------------------------------ D: nc
def test_eval_torch_model_and_checkpoint(env):
    # an nn.Module (its docstring accepts one; it raised TypeError: unexpected keyword 'cfg')
    res = run_eval(env["cfg8"], "torch", env["model8"], batch_size=4, verbose=False)
    assert res["images"] == 4 and 0 <= res["map50_95"] <= 1
    with pytest.raises(DataError) as e:
        run_eval(env["cfg8"], "torch", env["model3"], batch_size=4, verbose=False)
    _names_both(e, "predicts 3 classes", "nc=8", env["y8"])
    # a checkpoint (cfg=None was passed, so nc was never checked): exit 0 with a score
    with pytest.raises(DataError) as e:
        run_eval(env["cfg8"], "torch", str(env["dir"] / "nc3.pt"), batch_size=4, verbose=False)
    _names_both(e, "nc3.pt predicts 3 classes", "nc=8", env["y8"])


def test_eval_onnx_output_channels(env, tmp_path):
    from yolo_q.eval import OrtBackend
    from yolo_q.export.onnx import export_onnx
    path = tmp_path / "nc3.onnx"
    export_onnx(env["model3"], path, img_size=64, simplify=False, fuse=True)
    assert OrtBackend(path).nc == 3
    with pytest.raises(DataError) as e:
        run_eval(env["cfg8"], "onnxruntime", str(path), batch_size=4, verbose=False)
    _names_both(e, "nc3.onnx predicts 3 classes", "nc=8", env["y8"])


def test_eval_tensorrt_output_channels(env, tmp_path, monkeypatch):
    """TensorRT cannot run here: a stand-in runner with an (1, N, 5 + 3) output binding."""
    import types

    import yolo_q.eval.backends as B

    class Runner:
        def __init__(self, path, device=None):
            self.device, self.output_names = torch.device("cpu"), ["outputs"]
            self.output_shapes = {"outputs": (1, 84, 8)}
            self.input_hw, self.fixed_batch, self.max_batch = (64, 64), 1, 1

    fake = types.SimpleNamespace(require_tensorrt=lambda: None, TrtRunner=Runner)
    monkeypatch.setattr(B, "load_deploy_trt", lambda: fake)
    engine = tmp_path / "nc3.engine"
    engine.write_bytes(b"stand-in")
    assert B.TrtBackend(engine).nc == 3
    with pytest.raises(DataError) as e:
        run_eval(env["cfg8"], "tensorrt", str(engine), batch_size=4, verbose=False)
    _names_both(e, "nc3.engine predicts 3 classes", "nc=8", env["y8"])


def test_ptq_checks_nc_before_calibration(env, monkeypatch, tmp_path):
    import yolo_q.quant.ptq as ptq
    monkeypatch.setattr(ptq, "calibration_batches", lambda *a, **k: pytest.fail("calibrated"))
    with pytest.raises(DataError) as e:
        ptq.run_ptq(env["cfg3"], str(env["dir"] / "nc3.pt"), run_dir=tmp_path / "ptq",
                    progress=False, verbose=False)
    _names_both(e, "nc3.pt predicts 3 classes", "nc=8", env["y8"])
    assert not (tmp_path / "ptq" / "ptq.pt").exists()


def test_qat_checks_nc_before_training(env, tmp_path):
    from yolo_q.quant import calibrate, convert, quant_state
    from yolo_q.quant.qat import run_qat
    cfg = env["cfg8"]
    q = convert(tiny_detector(nc=8).fuse(), cfg,
                flavour="onnxruntime")
    calibrate(q, [torch.rand(2, 3, 64, 64)], method="max", progress=False)
    ptq8 = tmp_path / "ptq8.pt"
    save_checkpoint({"model": q.state_dict(), "config": config_dict(cfg), "quant": quant_state(q)},
                    ptq8)
    runs = tmp_path / "runs"
    with pytest.raises(DataError) as e:
        run_qat(None, weights=str(ptq8), verbose=False,
                overrides=[f"data.dataset={env['y3']}", "quant.distill.enabled=false",
                           f"train.output_dir={runs}", "quant.qat.epochs=1"])
    _names_both(e, "ptq8.pt predicts 8 classes", "nc=3", env["y3"])
    assert not runs.exists()  # nothing trained or written


def test_export_checks_nc_against_the_data_yaml(env, tmp_path):
    from yolo_q.export.api import export_model
    out = tmp_path / "m.onnx"
    with pytest.raises(DataError) as e:
        export_model(env["cfg8"], str(env["dir"] / "nc3.pt"), flavour="float", out=out)
    _names_both(e, "nc3.pt predicts 3 classes", "nc=8", env["y8"])
    assert not out.exists()
    res = export_model(env["cfg8"], str(env["dir"] / "nc8.pt"), flavour="float", out=out,
                       simplify=False)
    assert Path(res["path"]).is_file()
