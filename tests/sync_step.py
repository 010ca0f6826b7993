"""One distributed training step of an OCRHead with SyncBatchNorm, run under torchrun.

    torchrun --nproc_per_node=2 tests/sync_step.py OUT_DIR

Every rank builds the same head, converts it with ``ocrkernels.convert_sync_batchnorm`` (torch's
SyncBatchNorm refuses CPU modules), wraps it in DistributedDataParallel (gloo, CPU) and takes
one SGD step on its slice of a fixed global batch, once per mode of ``sync_setup.MODES``
(fused, fused with recompute, reference). Each rank saves what it saw to OUT_DIR/rank{r}.pt; tests/test_sync_batchnorm.py compares the ranks with each other and with
one process stepping on the whole batch with plain BatchNorm (which SyncBN + DDP must equal).

Teardown: the ranks meet at a barrier, drop every DDP wrapper, then destroy the process group,
and each rank checks that gloo's threads are gone before it exits. A gloo worker thread still
alive while the interpreter finalises can abort the process ("terminate called without an active
exception") when it drops a tensor that needs the GIL.
"""

from __future__ import annotations

import gc
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
# DistributedDataParallel imports torch._dynamo on first use, which imports torch.distributed.nn,
# whose functions default to `group=group.WORLD`, evaluated at import. Imported after
# init_process_group, those defaults would hold the default group until interpreter exit, so
# destroy_process_group could not free it and gloo's threads would outlive main().
import torch.distributed.nn  # noqa: F401
import torch.nn.functional as F

import ocrkernels
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sync_setup import MODES, PER_RANK, make_batch, make_head, snapshot  # noqa: E402

# Names torch and gloo give their threads: the process group's workers and the TCP event loop.
GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")
# Bounds a collective whose peer died; torchrun normally stops the survivors first.
COLLECTIVE_TIMEOUT = timedelta(seconds=120)


def step_all_modes(rank: int, world: int) -> dict:
    """One DDP step per mode. The DDP wrappers, optimizers and autograd graphs are locals, so
    nothing here holds the process group once this returns (and gc has run)."""
    feats, coarse, labels = make_batch(world)
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    results = {}
    for mode in MODES:
        head = make_head()
        head.fused = mode != "reference"
        head.object_context_block.recompute = mode == "recompute"
        model = DistributedDataParallel(ocrkernels.convert_sync_batchnorm(head).train())
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x = feats[rows].clone().requires_grad_()
        out = model(x, coarse[rows])
        F.cross_entropy(out, labels[rows], ignore_index=255).backward()
        grads = {n: p.grad.clone() for n, p in head.named_parameters()}
        opt.step()
        with torch.no_grad():
            second = model(feats[rows], coarse[rows])
        results[mode] = snapshot(head, out, x.grad, grads, second)
    return results


def gloo_threads() -> list[str]:
    """The live threads of this process that gloo runs (empty where /proc is missing)."""
    names = []
    for task in Path("/proc/self/task").glob("*/comm"):
        try:
            names.append(task.read_text().strip())
        except OSError:  # the thread exited meanwhile
            pass
    return [n for n in names if n in GLOO_THREADS]


def main(out_dir: str) -> None:
    dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        results = step_all_modes(rank, world)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
        # no rank tears down while another still has collectives in flight
        dist.barrier()
    finally:
        gc.collect()  # each DDP wrapper sits in a reference cycle and holds the group
        dist.destroy_process_group()
    # The group is freed with its last reference, joining gloo's threads; one still running
    # here would still be running when the interpreter finalises.
    left = gloo_threads()
    assert not left, f"rank {rank}: gloo threads still alive after teardown: {left}"


if __name__ == "__main__":
    main(sys.argv[1])
