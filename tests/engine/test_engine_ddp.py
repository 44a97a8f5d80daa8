"""Two-process DDP (gloo, CPU): both ranks end with identical weights."""
import multiprocessing as mp
import os
import socket
import time

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, nan_iter: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from torch.utils.data import DataLoader, DistributedSampler

    from engine_testutils import SyntheticBoxes, TinyDetector, collate, detection_loss, make_cfg
    from yolo_q.engine import (EMAHook, Hook, Trainer, WarmupLRHook, get_world_size,
                               init_distributed, seed_everything)
    from yolo_q.engine.distributed import cleanup
    from yolo_q.optim import build_optimizer

    info = init_distributed()
    assert info.world_size == world == get_world_size() and dist.get_backend() == "gloo"
    seed_everything(0, rank=rank)  # different init per rank: DDP must broadcast rank 0's
    model = TinyDetector()
    init = {k: p.detach().clone() for k, p in model.named_parameters()}
    ds = SyntheticBoxes(32)
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=0,
                                 drop_last=True)
    loader = DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=collate, drop_last=True)
    cfg = make_cfg(epochs=2, nominal_batch=16)  # 4 * 2 ranks * accumulate 2
    loss, holder = detection_loss(), []

    def loss_fn(outputs, targets, epoch):  # a non-finite loss on rank 1 only
        total, parts = loss(outputs, targets, epoch)
        if rank == 1 and holder[0].iter == nan_iter:
            total = total / 0.0
        return total, parts

    class Paths(Hook):
        def __init__(self):
            self.paths = []

        def before_step(self):
            self.paths.append((self.trainer.epoch, list(self.trainer.batch[2])))

    paths = Paths()
    tr = Trainer(model, build_optimizer(model, cfg, world_size=world), loader, loss_fn, cfg,
                 hooks=[WarmupLRHook(), EMAHook(), paths])
    holder.append(tr)
    tr.train()
    torch.save({"params": {k: p.detach() for k, p in tr.model.named_parameters()},
                "ema": {k: p.detach() for k, p in tr.ema.ema.named_parameters()},
                "init": init, "bad": tr.total_bad_steps, "losses": tr.epoch_losses,
                "accumulate": tr.accumulate, "paths": paths.paths},
               os.path.join(out_dir, f"rank{rank}.pt"))
    cleanup()


def test_two_process_ddp_identical_weights(tmp_path):
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, str(tmp_path), 1)) for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 90
    for p in procs:
        p.join(timeout=max(deadline - time.monotonic(), 0.1))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "DDP workers hung"
    assert [p.exitcode for p in procs] == [0, 0]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["accumulate"] == 2
    assert not torch.equal(r0["init"]["cls.0.weight"], r1["init"]["cls.0.weight"])
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k
        assert torch.equal(r0["ema"][k], r1["ema"][k]), k
    assert any(not torch.equal(r0["params"][k], r0["init"][k]) for k in r0["params"])
    # rank 1's bad step (iteration 1, a synchronising one) was skipped on both ranks and its
    # accumulation window carried into iteration 2
    assert r0["bad"] == r1["bad"] == 1
    assert r0["losses"] == r1["losses"] and r0["losses"]
    for (e0, p0), (e1, p1) in zip(r0["paths"], r1["paths"]):  # ranks see disjoint data
        assert e0 == e1 and not set(p0) & set(p1)
    assert len(r0["paths"]) == 8
