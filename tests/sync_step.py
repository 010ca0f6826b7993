"""One distributed training step of an OCRHead with SyncBatchNorm, run under torchrun.

    torchrun --nproc_per_node=2 tests/sync_step.py OUT_DIR

Every rank builds the same head, converts it with ``ocrkernels.convert_sync_batchnorm`` (torch's
SyncBatchNorm refuses CPU modules), wraps it in DistributedDataParallel (gloo, CPU) and takes
one SGD step on its slice of a fixed global batch, once per mode of ``sync_setup.MODES``
(fused, fused with recompute, reference). Each rank saves what it saw to OUT_DIR/rank{r}.pt; tests/test_sync_batchnorm.py compares the ranks with each other and with
one process stepping on the whole batch with plain BatchNorm (which SyncBN + DDP must equal).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

import ocrkernels
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sync_setup import MODES, PER_RANK, make_batch, make_head, snapshot  # noqa: E402


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
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
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
