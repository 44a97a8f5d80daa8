"""The one float-checkpoint writer (:func:`yolo_q.models.loading.write_float_checkpoint`, used by
tools/convert.py, the pipeline's ``float_weights`` and the reference shipping): what it writes
loads back to the same outputs, its float16 form is the shipped reference's format, and a
failed write leaves the previous file as it was."""
import pytest
import torch

from yolo_q import build_model, load_config, load_model
from yolo_q.config import config_to_dict
from yolo_q.models.loading import write_float_checkpoint

SMALL = ["model.width_multiple=0.125", "model.nc=3"]


def _model(repo_root, randomize, fuse=False):
    cfg = load_config(repo_root / "configs/yolov6n.yaml", SMALL)
    model = randomize(build_model(cfg)).eval()
    model.yolo_q_config = cfg
    return model.fuse() if fuse else model


@pytest.mark.parametrize("fuse,fp16", [(False, False), (True, True)])
def test_written_checkpoint_loads_to_the_same_outputs(tmp_path, repo_root, randomize, fuse, fp16):
    model = _model(repo_root, randomize, fuse)
    path = write_float_checkpoint(model, tmp_path / "w.pt", fp16=fp16, source="x.pt", epoch=-1)
    ck = torch.load(path, map_location="cpu", weights_only=True)
    assert set(ck) == {"model", "config", "fused", "source", "epoch"}
    assert ck["fused"] is fuse and ck["source"] == "x.pt" and ck["epoch"] == -1
    assert ck["config"] == config_to_dict(model.yolo_q_config)
    dtypes = {v.dtype for v in ck["model"].values() if v.is_floating_point()}
    assert dtypes == {torch.float16 if fp16 else torch.float32}
    x = torch.rand(1, 3, 64, 64)
    loaded = load_model(path)
    assert loaded.is_fused is fuse
    with torch.no_grad():
        ref, out = model(x), loaded(x)
    if fp16:  # float16 storage: close, not equal
        assert (out - ref).abs().max() <= 2e-2 * ref.abs().max()
    else:
        assert torch.equal(out, ref)


def _kept(old, new) -> bool:
    """Every key of ``old`` (nested dicts) has the same value in ``new``; keys the schema gained
    since ``old`` was written may be added."""
    if isinstance(old, dict):
        return isinstance(new, dict) and all(k in new and _kept(v, new[k]) for k, v in old.items())
    return old == new


def test_shipped_reference_rewrites_bit_identical(tmp_path, repo_root):
    """Loading the shipped fp16 reference (written before the writer was shared) and writing it
    again as the shipping code does gives the same tensors, config and flags."""
    shipped = repo_root / "benchmarks/reference/yolov6n_repvgg.pt"
    if not shipped.is_file():
        pytest.skip("no reference model shipped")
    old = torch.load(shipped, map_location="cpu", weights_only=True)
    model = load_model(shipped, fuse=True)
    new = torch.load(write_float_checkpoint(model, tmp_path / "r.pt", fp16=True,
                                            source=old["source"]), weights_only=True)
    assert new.keys() == old.keys() and _kept(old["config"], new["config"])
    assert (new["fused"], new["source"]) == (old["fused"], old["source"])
    assert new["model"].keys() == old["model"].keys()
    for k, v in old["model"].items():
        assert new["model"][k].dtype == v.dtype and torch.equal(new["model"][k], v), k


def test_failed_write_keeps_the_previous_file(tmp_path, repo_root, randomize):
    model = _model(repo_root, randomize)
    path = write_float_checkpoint(model, tmp_path / "w.pt", source="first")
    before = path.read_bytes()
    with pytest.raises(Exception):  # a value torch.save cannot pickle: fails mid-write
        write_float_checkpoint(model, path, source=lambda: None)
    with torch.no_grad():  # beyond float16's range: refused before anything is written
        next(model.parameters()).view(-1)[0] = 1e6
    with pytest.raises(ValueError, match="float16"):
        write_float_checkpoint(model, path, fp16=True)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pt"]  # no temp file left
