"""Checkpoints written by the REAL official YOLOv6 code (tests/fixtures/official, made by
make_official_fixture.py from a meituan/YOLOv6 checkout) load through ``yolo_q.load_model`` and
give the official eval-mode output: training form, anchor-aided training form and deploy form."""
import pickle

import numpy as np
import pytest
import torch

from yolo_q import load_config, load_model
from yolo_q.io.official import _plain, _RestrictedUnpickler, read_official
from yolo_q.models.yolo import set_batchnorm

FIXTURES = "tests/fixtures/official"
OVERRIDES = ["model.width_multiple=0.03125", "model.nc=5"]


def _errors(out, ref):
    box = ((out[..., :4] - ref[..., :4]).abs() / ref[..., :4].abs().clamp(min=1.0)).max().item()
    return box, (out[..., 5:] - ref[..., 5:]).abs().max().item()


@pytest.fixture(scope="module")
def reference(repo_root):
    return torch.load(repo_root / FIXTURES / "n_reference.pt", weights_only=True)


@pytest.mark.parametrize("name", ["n_plain", "n_fuseab", "n_deploy"])
@pytest.mark.parametrize("config_eps", [None, 1e-5])
def test_real_official_checkpoint_gives_official_output(repo_root, reference, name, config_eps):
    """The config's own bn_eps (default or a different one) does not matter: the weights' wins."""
    extra = [] if config_eps is None else [f"model.bn_eps={config_eps}"]
    cfg = load_config(repo_root / "configs/yolov6n.yaml", OVERRIDES + extra)
    model = load_model(repo_root / FIXTURES / f"{name}.pt", cfg=cfg)
    assert model.is_fused == (name == "n_deploy")
    with torch.no_grad():
        out = model(reference["input"])
    assert out.shape == reference[name].shape
    box, cls = _errors(out, reference[name])
    assert box < 1e-3 and cls < 1e-3, (box, cls)
    if name != "n_deploy":
        assert model.yolo_q_config.model.bn_eps == pytest.approx(1e-3)
        assert model.yolo_q_config.model.bn_momentum == pytest.approx(0.03)
        # the check has teeth: PyTorch's default eps (yolo_q before) gives another function
        set_batchnorm(model, 1e-5, 0.1)
        with torch.no_grad():
            box, cls = _errors(model(reference["input"]), reference[name])
        assert box > 1e-2 and cls > 1e-2


def test_real_official_metadata_and_ema(repo_root):
    off = read_official(repo_root / FIXTURES / "n_plain.pt")
    assert off.meta["epoch"] == 9 and off.meta["updates"] == 1234
    assert off.meta["results"] == (0.5123, 0.3456)  # numpy float64 scalars -> Python floats
    assert all(type(r) is float for r in off.meta["results"])
    raw = read_official(repo_root / FIXTURES / "n_plain.pt", prefer="model").state_dict
    k = "backbone.stem.rbr_dense.conv.weight"
    assert not torch.equal(raw[k], off.state_dict[k])  # 'ema' is preferred over 'model'


def _restricted(obj, protocol=2):
    import io
    return _plain(_RestrictedUnpickler(io.BytesIO(pickle.dumps(obj, protocol=protocol))).load())


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numeric_numpy_is_rebuilt(protocol):
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.asfortranarray(np.eye(3)),
              np.array([1, -2], dtype=">i8"), np.array([True, False]), np.zeros((0, 4), np.uint8)]
    scalars = [np.float64(0.25), np.int64(-3), np.float16(1.5), np.bool_(True), np.complex64(1j)]
    got = _restricted({"a": arrays, "s": scalars}, protocol)
    for a, b in zip(got["a"], arrays):
        assert isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b)
    assert got["s"] == [0.25, -3, 1.5, True, 1j]


@pytest.mark.parametrize("obj", [np.array(["a", "b"]), np.array([object()], dtype=object),
                                 np.zeros(2, dtype=[("x", "f4"), ("y", "i4")]),
                                 np.str_("text"), np.datetime64("2020-01-01")],
                         ids=["str-array", "object-array", "structured", "str-scalar", "datetime"])
def test_non_numeric_numpy_is_refused(obj):
    with pytest.raises(pickle.UnpicklingError, match="refused"):
        _restricted(obj)


def test_getattr_is_only_a_method_name_of_a_pickled_module():
    """The official fuse_model stores ``forward = forward_fuse`` (a bound method, pickled as
    ``getattr(module, name)``); a bound method of anything else is refused."""
    with pytest.raises(pickle.UnpicklingError, match="refused global 'builtins.getattr' on list"):
        _restricted([1, 2].append)


def test_convert_keeps_the_official_settings(tmp_path, repo_root, reference):
    """tools/convert.py: official -> yolo_q checkpoint (weights_only) with the carried settings."""
    import subprocess
    import sys
    src = repo_root / FIXTURES / "n_plain.pt"
    out = tmp_path / "converted.pt"
    r = subprocess.run([sys.executable, str(repo_root / "tools/convert.py"), str(src), str(out),
                        "--config", str(repo_root / "configs/yolov6n.yaml"), *OVERRIDES],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    stored = torch.load(out, weights_only=True)["config"]["model"]
    assert (stored["bn_eps"], stored["bn_momentum"]) == (1e-3, 0.03)
    with torch.no_grad():
        box, cls = _errors(load_model(out)(reference["input"]), reference["n_plain"])
    assert box < 1e-3 and cls < 1e-3
