"""SyncBatchNorm semantics of the fused head on CPU: a real 2-process torchrun step (gloo).

``torch.nn.SyncBatchNorm`` refuses CPU tensors; ocrkernels synchronises them itself
(:mod:`ocrkernels.batchnorm`). The ground truth is the definition of SyncBN + DDP: one process
stepping on the union of the ranks' batches with plain BatchNorm and the mean of the ranks'
losses gives the same outputs, gradients, parameters and running statistics.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, rel_err
from sync_setup import MODES, PER_RANK, make_batch, make_head, snapshot

WORLD = 2
TIMEOUT_S = 300  # the whole torchrun launch; one run takes seconds
TAIL = 4000  # characters of each log kept in a failure message


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_exit_codes(torchrun_stderr: str) -> dict[int, int]:
    """{rank: exit code} of the ranks that torchrun's failure summary lists."""
    found = re.findall(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*exitcode\s*:\s*(-?\d+)",
                       torchrun_stderr)
    return {int(rank): int(code) for rank, code in found}


def rank_output(log_dir, rank: int) -> str:
    """The stdout and stderr that torchrun's --redirects wrote for `rank`."""
    parts = []
    for stream in ("stdout", "stderr"):
        text = "".join(f.read_text(errors="replace")
                       for f in sorted(log_dir.glob(f"*/attempt_*/{rank}/{stream}.log")))
        parts.append(f"--- rank {rank} {stream} ---\n{text[-TAIL:] or '(empty)'}")
    return "\n".join(parts)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("sync")
    logs = out / "logs"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}",
           # each rank's output in its own files, so that a failure shows which rank said what
           f"--log-dir={logs}", "--redirects=3",
           str(REPO / "tests" / "sync_step.py"), str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
        status = f"torchrun exited with {proc.returncode}"
    except subprocess.TimeoutExpired:
        # SIGTERM lets torchrun stop the ranks (each in its own session) before it exits
        proc.terminate()
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        status = f"torchrun timed out after {TIMEOUT_S} s and was stopped ({proc.returncode})"
    missing = [r for r in range(WORLD) if not (out / f"rank{r}.pt").exists()]
    if proc.returncode != 0 or missing:
        codes = rank_exit_codes(stderr)
        exits = ", ".join(f"rank {r}: {codes.get(r, 'not listed as failed by torchrun')}"
                          for r in range(WORLD))
        pytest.fail(f"{status}; exit codes: {exits}; no result from ranks {missing}\n"
                    f"--- torchrun stdout ---\n{stdout[-TAIL:]}\n"
                    f"--- torchrun stderr ---\n{stderr[-TAIL:]}\n"
                    + "\n".join(rank_output(logs, r) for r in range(WORLD)), pytrace=False)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single_process():
    """One process, whole batch, plain BatchNorm, loss = mean over ranks of each rank's loss."""
    feats, coarse, labels = make_batch(WORLD)
    head = make_head()
    head.fused = False
    head.train()
    opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    x = feats.clone().requires_grad_()
    out = head(x, coarse)
    loss = sum(F.cross_entropy(out[r * PER_RANK:(r + 1) * PER_RANK],
                               labels[r * PER_RANK:(r + 1) * PER_RANK], ignore_index=255)
               for r in range(WORLD)) / WORLD
    loss.backward()
    grads = {n: p.grad.clone() for n, p in head.named_parameters()}
    opt.step()
    with torch.no_grad():
        second = head(feats, coarse)
    # x.grad of the mean loss is 1/WORLD of each rank's own gradient
    return snapshot(head, out, x.grad * WORLD, grads, second)


@pytest.mark.parametrize("mode", MODES)
def test_two_process_syncbn_step_equals_single_process_step(ranks, single_process, mode):
    want = single_process
    for r, result in enumerate(ranks):
        got = result[mode]
        rows = slice(r * PER_RANK, (r + 1) * PER_RANK)
        assert rel_err(got["out"], want["out"][rows]) < 1e-4
        assert rel_err(got["second"], want["second"][rows]) < 1e-4
        assert rel_err(got["feats_grad"], want["feats_grad"][rows]) < 1e-4
        for name, g in want["grads"].items():
            assert rel_err(got["grads"][name], g) < 1e-4, name
        for name, p in want["params"].items():
            assert rel_err(got["params"][name], p) < 1e-4, name
        for name, b in want["buffers"].items():
            if b.dtype == torch.long:
                assert torch.equal(got["buffers"][name], b), name
            else:
                assert rel_err(got["buffers"][name], b) < 1e-4, name


@pytest.mark.parametrize("mode", ["fused", "recompute"])
def test_fused_and_reference_sync_steps_agree(ranks, mode):
    for result in ranks:
        assert rel_err(result[mode]["out"], result["reference"]["out"]) < 1e-4
        for name, g in result["reference"]["grads"].items():
            assert rel_err(result[mode]["grads"][name], g) < 1e-4, name


def test_convert_keeps_names_and_single_process_numbers():
    import ocrkernels

    head = make_head()
    plain = make_head()
    converted = ocrkernels.convert_sync_batchnorm(head)
    assert isinstance(converted.bottleneck.bn, ocrkernels.SyncBatchNorm)
    assert converted.state_dict().keys() == plain.state_dict().keys()
    feats, coarse, _ = make_batch(1)
    converted.train()
    plain.train()
    assert torch.equal(converted(feats, coarse), plain(feats, coarse))
    for (name, a), b in zip(converted.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name
