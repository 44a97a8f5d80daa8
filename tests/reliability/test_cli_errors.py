"""One place turns failures into messages (issue #21): ``yolo_q.cli.run_tool`` prints every
expected failure — any ``OSError``, a model file ONNX Runtime / OpenVINO / TensorRT cannot load,
data, config and checkpoint errors — as one line naming the file, exit 2; a genuine bug gets its
traceback plus "internal error (please report ...)", exit 1. Every tool runs through it.
Checkpoint files: a text file or a directory is named as such (no pickle jargon); a refused
malicious checkpoint is explained in our words, without PyTorch's advice to load it unsafely;
checkpoints are written with the process umask, not mkstemp's 0600."""
import ast
import errno
import os
import stat

import pytest
import torch

from reliability_utils import REPO, run_tool
from yolo_q.cli import run_tool as cli_run_tool
from yolo_q.io import (CheckpointError, load_checkpoint, read_checkpoint_any, save_checkpoint,
                       write_json)


def _one_line(r, *parts):
    assert r.returncode == 2, r.stdout[-1500:] + r.stderr[-3000:]
    err = r.stderr.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    for p in parts:
        assert str(p) in err, (p, err)
    return err


# ------------------------------------------------------------------------- run_tool
def _run(exc, capsys):
    def main(argv):
        raise exc
    rc = cli_run_tool(main, [])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("exc, shown", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/out.json"),
     "/data/out.json: Permission denied"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "runs/m.json"),
     "runs/m.json: Is a directory"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "a_file/x.pt"),
     "a_file/x.pt: Not a directory"),
    (OSError(errno.ENOSPC, "No space left on device", "runs/train/exp/weights/last.pt"),
     "runs/train/exp/weights/last.pt: No space left on device"),
    (OSError(errno.EXDEV, "Invalid cross-device link", "a.tmp", None, "b.pt"),
     "a.tmp -> b.pt: Invalid cross-device link"),
    (ModuleNotFoundError("No module named 'openvino'", name="openvino"), "pip install openvino"),
])
def test_os_errors_and_missing_packages_are_one_line(exc, shown, capsys):
    rc, err = _run(exc, capsys)
    assert rc == 2, err
    assert err == f"error: {shown}\n" if "pip" not in shown else shown in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_missing_package_reraised_by_our_code_is_one_line(capsys):
    def main(argv):
        try:
            import yolo_q_no_such_runtime  # noqa: F401
        except ImportError:
            raise RuntimeError("needs yolo_q_no_such_runtime: pip install it") from None
    with pytest.raises(ModuleNotFoundError):  # the import really fails (a name yolo_q never has)
        import yolo_q_no_such_runtime  # noqa: F401
    assert cli_run_tool(main, []) == 2
    assert capsys.readouterr().err == "error: needs yolo_q_no_such_runtime: pip install it\n"


def test_onnxruntime_exception_types_are_one_line(capsys):
    from onnxruntime.capi import onnxruntime_pybind11_state as ortstate
    for name in ("InvalidGraph", "Fail", "InvalidProtobuf", "NoSuchFile"):
        cls = getattr(ortstate, name)
        rc, err = _run(cls(f"[ONNXRuntimeError] : Load model from m.onnx failed: {name}\nmore"),
                       capsys)
        want = f"error: [ONNXRuntimeError] : Load model from m.onnx failed: {name}\n"
        assert rc == 2 and err == want, err


def test_errors_raised_inside_openvino_code_are_one_line(capsys):
    """OpenVINO raises plain RuntimeError from its own modules: recognised by where it was
    raised (a function whose module is ``openvino.*``), also when wrapped by our code."""
    ns = {"__name__": "openvino._ov_api"}
    exec("def read_model(p):\n    raise RuntimeError(f'Exception from src/frontends: {p} bad')", ns)

    def main(argv):
        try:
            ns["read_model"]("m.xml")
        except RuntimeError as e:
            raise RuntimeError("m.xml: OpenVINO could not read the model") from e
    assert cli_run_tool(main, []) == 2
    assert capsys.readouterr().err == "error: m.xml: OpenVINO could not read the model\n"


def test_real_openvino_load_errors_are_one_line(tmp_path, capsys):
    ov = pytest.importorskip("openvino")
    bad = tmp_path / "model.onnx"
    bad.write_text("this is not a model\n")

    def main(argv):
        ov.Core().read_model(str(bad))
    assert cli_run_tool(main, []) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "model.onnx" in err and len(err.strip().splitlines()) == 1
    assert "Exception from src/" not in err, err


def test_tensorrt_load_errors_are_one_line(capsys):
    from yolo_q.eval.backends import load_deploy_trt
    trt = load_deploy_trt()
    rc, err = _run(trt.TensorRTError("m.engine: could not deserialize the engine"), capsys)
    assert rc == 2 and err == "error: m.engine: could not deserialize the engine\n"


def test_bugs_keep_their_traceback_and_ask_for_a_report(capsys):
    def main(argv):
        return {}["x"] if argv else 1 / 0
    assert cli_run_tool(main, []) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ZeroDivisionError" in err
    assert err.strip().splitlines()[-1].startswith("internal error (please report")


def test_a_wrong_call_into_a_runtime_is_still_a_bug(capsys):
    ns = {"__name__": "onnx.helper"}
    exec("def make_node(op):\n    raise TypeError('make_node() missing 1 argument')", ns)
    assert cli_run_tool(lambda argv: ns["make_node"]("Conv"), []) == 1
    assert "internal error (please report" in capsys.readouterr().err


def test_every_tool_runs_through_run_tool():
    tools = sorted((REPO / "tools").glob("*.py")) + sorted((REPO / "datasets").glob("*.py"))
    assert len(tools) >= 11
    for path in tools:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        mains = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.dump(n.test)]
        assert len(mains) == 1, path
        calls = [ast.unparse(c) for c in ast.walk(mains[0]) if isinstance(c, ast.Call)]
        assert "run_tool(main)" in calls, (path, calls)


def test_eval_onnx_on_a_text_file_is_one_line(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("this is not an ONNX model\n")
    _one_line(run_tool("eval.py", "--onnx", bad, cwd=tmp_path), bad, "ONNX Runtime")


# ------------------------------------------------------------------------- checkpoint files
def test_weights_text_file_or_directory_named_as_such(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello, these are my notes\n")
    folder = tmp_path / "weights.pt"
    folder.mkdir()
    for load in (load_checkpoint, read_checkpoint_any):
        with pytest.raises(CheckpointError, match="notes.pt: not a PyTorch checkpoint "
                                                  r"\(a text file"):
            load(text)
        with pytest.raises(CheckpointError, match="weights.pt: is a directory"):
            load(folder)
    err = _one_line(run_tool("eval.py", "--weights", text, cwd=tmp_path), text,
                    "not a PyTorch checkpoint")
    assert "Memo" not in err
    _one_line(run_tool("export.py", "--weights", folder, cwd=tmp_path), folder, "is a directory")


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_malicious_checkpoint_refusal_in_our_words(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"model": _Payload(marker), "epoch": 1}, path)
    for load in (load_checkpoint, read_checkpoint_any):
        with pytest.raises(CheckpointError) as e:
            load(path)
        msg = str(e.value)
        assert msg.startswith(f"{path}: refused global") and "exec" in msg, msg
        assert "weights_only" not in msg and "trust the source" not in msg, msg
        assert "\x1b[" not in msg, msg
        assert len(msg.splitlines()) == 1
    err = _one_line(run_tool("train.py", "--config", "configs/yolov6n.yaml", "--resume", path,
                             f"train.output_dir={tmp_path / 'runs'}"), path, "refused global")
    assert "weights_only" not in err
    assert not marker.exists() and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------- file modes
@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_checkpoints_and_json_get_the_process_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        ck = save_checkpoint({"w": torch.zeros(2)}, tmp_path / "a" / "last.pt")
        js = write_json(tmp_path / "a" / "m.json", {"x": 1})
        save_checkpoint({"w": torch.ones(2)}, ck)  # replacing keeps the umask mode too
    finally:
        os.umask(old)
    for p in (ck, js):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask, (p, oct(p.stat().st_mode))
    assert torch.equal(load_checkpoint(ck)["w"], torch.ones(2))
