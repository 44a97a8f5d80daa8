"""Atomic checkpoints: a process SIGKILLed while it saves never leaves a truncated last.pt or
best.pt; the previous file stays loadable (weights_only) and stale temp files are ignored."""
import errno
import os
import random
import signal
import subprocess
import time

import pytest
import torch

from reliability_utils import PY, subprocess_env
from yolo_q.io import load_checkpoint, save_checkpoint
from yolo_q.engine.hooks import _atomic_copy

# A zygote imports torch once, then forks one saver per round; the test SIGKILLs the saver at a
# random moment. The saver writes last.pt (save_checkpoint) and copies it to best.pt
# (_atomic_copy, as CheckpointHook does) in a loop; each checkpoint is self-describing.
SAVER = r"""
import os, sys, torch
from pathlib import Path
from yolo_q.io import save_checkpoint
from yolo_q.engine.hooks import _atomic_copy
last = Path(sys.argv[1]); best = last.with_name("best.pt")
big = torch.zeros(int(sys.argv[2]))
for line in sys.stdin:
    n = int(line)
    pid = os.fork()
    if pid == 0:
        while True:
            n += 1
            big[0] = big[-1] = n
            save_checkpoint({"n": n, "data": big, "tail": torch.full((4,), float(n))}, last)
            _atomic_copy(last, best)
            os.write(1, b"saved %d\n" % n)
    print("child", pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""
NUMEL = 6_000_000  # 24 MB per file: a save takes long enough for kills to land inside it
ROUNDS = 8


def _check(path):
    ck = load_checkpoint(path)  # weights_only=True; raises CheckpointError if truncated
    n = ck["n"]
    assert ck["data"].shape == (NUMEL,) and ck["data"][0] == ck["data"][-1] == n
    assert torch.equal(ck["tail"], torch.full((4,), float(n)))
    return n


def test_sigkill_during_saves_never_leaves_a_truncated_checkpoint(tmp_path):
    last = tmp_path / "weights" / "last.pt"
    zygote = subprocess.Popen([PY, "-c", SAVER, str(last), str(NUMEL)], env=subprocess_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    rng = random.Random(7)
    stale, n, kills = set(), 0, []
    try:
        for _ in range(ROUNDS):
            zygote.stdin.write(f"{n}\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline().split()[1])
            first = zygote.stdout.readline()  # one full save done: a previous file exists
            assert first.startswith("saved"), first
            saved = int(first.split()[1])
            t0 = time.monotonic()
            time.sleep(rng.uniform(0.0, 0.4))
            os.kill(pid, signal.SIGKILL)
            for line in zygote.stdout:
                if line.startswith("reaped"):
                    break
                saved = int(line.split()[1])
            kills.append((round(time.monotonic() - t0, 3), saved))
            n_last, n_best = _check(last), _check(tmp_path / "weights" / "best.pt")
            assert n_last >= saved and n_best >= saved - 1, (n_last, n_best, saved)
            n = n_last
            tmps = {p.name for p in last.parent.iterdir() if p.name not in ("last.pt", "best.pt")}
            assert all(t.startswith((".last.pt.", ".best.pt.")) and t.endswith(".tmp")
                       for t in tmps), tmps
            stale |= tmps
    finally:
        zygote.kill()
        zygote.wait()
    # kills landed inside saves: their partial temp files are left behind (and are partial) ...
    assert stale, f"no kill hit a save in {ROUNDS} rounds ({kills} s); test did not exercise it"
    full = last.stat().st_size
    sizes = [(last.parent / t).stat().st_size for t in stale]
    assert min(sizes) < full, sizes
    # ... but never under a checkpoint name: nothing looks for *.pt and finds them
    assert sorted(p.name for p in last.parent.glob("*.pt")) == ["best.pt", "last.pt"]
    # and they do not disturb later saves or loads
    save_checkpoint({"n": n + 1, "data": torch.full((NUMEL,), float(n + 1)),
                     "tail": torch.full((4,), float(n + 1))}, last)
    assert _check(last) == n + 1


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """Disk full in the middle of a save: the error propagates, last.pt is the previous one,
    and the partial temp file is removed."""
    last = tmp_path / "last.pt"
    save_checkpoint({"n": 1, "w": torch.arange(1000.0)}, last)
    before = last.read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint({"n": 2, "w": torch.zeros(1000)}, last)
    monkeypatch.setattr(torch, "save", real_save)
    assert last.read_bytes() == before and load_checkpoint(last)["n"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    # same for the best.pt copy
    _atomic_copy(last, tmp_path / "best.pt")

    def failing_copy(src, dst, *a, **k):
        with open(dst, "wb") as f:
            f.write(b"PK partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("yolo_q.engine.hooks.shutil.copyfile", failing_copy)
    with pytest.raises(OSError):
        _atomic_copy(last, tmp_path / "best.pt")
    assert (tmp_path / "best.pt").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]


def test_keep_same_leaves_an_identical_file_alone(tmp_path):
    """``atomic_path(keep_same=True)``: identical bytes keep the old file (its mtime, which
    later stages' fingerprints hold); different bytes replace it; no temp file stays behind."""
    from yolo_q.io import atomic_path
    path = tmp_path / "float.pt"
    save_checkpoint({"w": torch.arange(4.0)}, path)
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    with atomic_path(path, keep_same=True) as tmp:
        save_checkpoint({"w": torch.arange(4.0)}, tmp)
    assert path.stat().st_mtime_ns == 1_000_000_000
    with atomic_path(path, keep_same=True) as tmp:
        save_checkpoint({"w": torch.arange(4.0) + 1}, tmp)
    assert path.stat().st_mtime_ns != 1_000_000_000
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(4.0) + 1)
    assert [p.name for p in tmp_path.iterdir()] == ["float.pt"]
