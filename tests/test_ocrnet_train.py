"""ocrnet.engine: poly lr, DDP = one process with SyncBN, bit-exact kill-and-resume, checkpoint
validation and atomic writes, non-finite steps (fail or skip), the evaluation metric, config
overrides.

Every run trains the tiny synthetic config (HRNet w8_tiny, 32x64 images, batch 4) on the CPU
with one thread, so that in-process runs, subprocesses and torchrun ranks do the same float
operations in the same order.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO

from ocrnet.configs.schema import ScheduleConfig
from ocrnet.evaluation import IoUMetric
import ocrnet.engine.trainer
from ocrnet.configs import SYNTHETIC_CONFIGS, apply_overrides
from ocrnet.data import GlobalBatchSampler
from ocrnet.engine import (CheckpointInvalid, Trainer, TrainOptions, find_resume_checkpoint,
                           load_training_checkpoint, poly_lr, save_training_checkpoint, train)

TINY = "ocrnet_hrtiny8_1xb4-20_synthetic-32x64"
ITERS = 8  # resume tests: checkpoints every 2 iterations
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def opts(work_dir, **kw) -> TrainOptions:
    base = dict(work_dir=str(work_dir), num_workers=0, threads=1, log_interval=1,
                checkpoint_interval=0, validate=False, progress=False, deterministic=True,
                synthetic_train_length=64)
    base.update(kw)
    return TrainOptions(**base)


def losses(work_dir) -> list[float]:
    rows = [json.loads(line) for line in Path(work_dir, "metrics.jsonl").read_text().split("\n")
            if line]
    return [r["loss"] for r in rows if r["mode"] == "train"]


def final_state(work_dir) -> dict:
    ckpts = sorted(Path(work_dir).glob("iter_*.pth"))
    return load_training_checkpoint(ckpts[-1])


def rows(work_dir) -> list[dict]:
    return [json.loads(line) for line in Path(work_dir, "metrics.jsonl").read_text().split("\n")
            if line and json.loads(line)["mode"] == "train"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def _restore_global_state():
    """The trainer sets process-wide state (threads, deterministic algorithms)."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


# -- learning rate ------------------------------------------------------------------------------

def test_poly_lr_values():
    s = ScheduleConfig(iterations=100, lr=0.01, power=0.9, min_lr=1e-4)
    assert poly_lr(0, s) == pytest.approx(0.01)
    assert poly_lr(50, s) == pytest.approx((0.01 - 1e-4) * 0.5 ** 0.9 + 1e-4)
    assert poly_lr(99, s) == pytest.approx((0.01 - 1e-4) * 0.01 ** 0.9 + 1e-4)
    assert poly_lr(100, s) == poly_lr(500, s) == pytest.approx(1e-4)
    # mmengine's PolyLR updates multiplicatively each step; the closed form must agree.
    lr = 0.01
    for t in range(1, 100):
        lr = (1 - 1 / (100 - t + 1)) ** 0.9 * (lr - 1e-4) + 1e-4
        assert poly_lr(t, s) == pytest.approx(lr, rel=1e-9)
    # The 8xb2-80k R101 config ends the decay at 40k and stays at the floor afterwards.
    s2 = ScheduleConfig(iterations=80000, lr=0.02, min_lr=2e-4, poly_end=40000)
    assert poly_lr(20000, s2) == pytest.approx((0.02 - 2e-4) * 0.5 ** 0.9 + 2e-4)
    assert poly_lr(40000, s2) == poly_lr(79999, s2) == pytest.approx(2e-4)
    with pytest.raises(ValueError, match="iteration"):
        poly_lr(-1, s)


# -- data order -----------------------------------------------------------------------------------

def test_global_batches_split_across_ranks_and_resume():
    one = iter(GlobalBatchSampler(10, 4, seed=3))
    r0 = iter(GlobalBatchSampler(10, 2, 0, 2, seed=3))
    r1 = iter(GlobalBatchSampler(10, 2, 1, 2, seed=3))
    stream = [next(one) for _ in range(7)]  # spans epochs 0-2
    assert [next(r0) + next(r1) for _ in range(7)] == stream
    later = iter(GlobalBatchSampler(10, 4, seed=3, start_iter=4))
    assert [next(later) for _ in range(3)] == stream[4:]
    epoch0 = [k for b in stream for k in b][:10]
    assert sorted(i for _, i in epoch0) == list(range(10)) and {e for e, _ in epoch0} == {0}


# -- DDP -------------------------------------------------------------------------------------------

def test_two_processes_match_one_process(tmp_path):
    """torchrun 2 x 2 images with SyncBN gives the losses and weights of 1 x 4 images.

    Three iterations: the first loss checks the synchronised BN forward, the next ones the
    gradient all-reduce and SyncBN backward. Longer runs drift apart from float rounding (the
    reduction orders differ), which this tiny network, with BN over 1x2-pixel maps, amplifies
    about tenfold per step."""
    iters = 3
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(json.dumps(SYNTHETIC_CONFIGS[TINY].to_dict()))
    sets = ["train.num_workers=0", "train.log_interval=1", "train.checkpoint_interval=0",
            "train.validate=False", "train.synthetic_train_length=64",
            # A small lr keeps the run in a stable regime, where the float rounding that
            # differs between the two (SyncBN sums, gradient all-reduce) is not amplified.
            f"schedule.iterations={iters}", "schedule.lr=0.002"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "ocrnet", "train",
           str(cfg_path), "--work-dir", str(tmp_path / "ddp"), "--device", "cpu",
           "--set", "data.batch_per_gpu=2", *sets]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) x 2 images" in proc.stdout

    train(TINY, opts(tmp_path / "one", deterministic=False),
          [f"schedule.iterations={iters}", "schedule.lr=0.002"])
    ddp, one = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    assert len(ddp) == len(one) == iters
    np.testing.assert_allclose(ddp, one, rtol=1e-5, atol=0)
    a, b = final_state(tmp_path / "ddp"), final_state(tmp_path / "one")
    assert a["meta"]["world_size"] == 2 and b["meta"]["world_size"] == 1
    for k, v in b["state_dict"].items():
        if v.is_floating_point():
            # Relative to the tensor's largest value: running variances of the 1x2-pixel
            # branch come from 8 values per channel (E[x^2] - E[x]^2 loses digits), and BN
            # biases start at 0 and hold ~1e-4 after 3 small steps, their gradients (sums of
            # dy) cancelling to ~1e-7 rounding. An unsynchronised BN or gradient is off by
            # percents.
            err = (a["state_dict"][k] - v).abs().max().item()
            assert err <= 1e-3 * v.abs().max().item() + 2e-6, (k, err)
        else:  # num_batches_tracked
            assert torch.equal(a["state_dict"][k], v), k


# -- kill and resume -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted deterministic run of ITERS iterations, checkpoints every 2."""
    work = tmp_path_factory.mktemp("reference")
    train(TINY, opts(work, checkpoint_interval=2, keep_checkpoints=3),
          [f"schedule.iterations={ITERS}"])
    return work


def assert_same_run(work, reference):
    a, b = final_state(work), final_state(reference)
    assert a["meta"]["iteration"] == b["meta"]["iteration"] == ITERS
    for k, v in b["state_dict"].items():
        assert torch.equal(a["state_dict"][k], v), f"{k} differs after resume"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert losses(work) == losses(reference)


def test_keeps_last_checkpoints(reference):
    names = sorted(p.name for p in reference.iterdir())
    assert [n for n in names if n.endswith(".pth")] == [
        "iter_000004.pth", "iter_000006.pth", "iter_000008.pth"]
    assert all((reference / f"{n}.sha256").is_file() for n in names if n.endswith(".pth"))
    assert not [n for n in names if n.endswith(".tmp")]


def test_sigkill_then_resume_is_bit_exact(tmp_path, reference):
    """A run killed with SIGKILL mid-way and resumed from its newest checkpoint ends with the
    weights, momentum and losses of the uninterrupted run."""
    work = tmp_path / "killed"
    cfg_path = tmp_path / "tiny.json"
    cfg_path.write_text(json.dumps(SYNTHETIC_CONFIGS[TINY].to_dict()))
    # Slower than the reference per iteration (validation after every iteration) so that the
    # kill lands mid-run; validation does not touch the training state.
    cmd = [sys.executable, "-m", "ocrnet", "train", str(cfg_path), "--work-dir", str(work),
           "--device", "cpu", "--deterministic", "--set", f"schedule.iterations={ITERS}",
           "train.num_workers=0", "train.threads=1", "train.log_interval=1",
           "train.checkpoint_interval=2", "train.val_interval=1", "train.val_limit=8",
           "train.synthetic_train_length=64", "train.synthetic_val_length=8"]
    proc = subprocess.Popen(cmd, env=ENV, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (work / "iter_000002.pth.sha256").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    newest = max(int(p.stem[5:]) for p in work.glob("iter_*.pth"))
    assert newest < ITERS, "the run finished before the kill"

    result = train(str(work / "config.json"),
                   opts(work, resume=True, checkpoint_interval=2, keep_checkpoints=3))
    assert result["iterations"] == ITERS
    assert_same_run(work, reference)


def test_truncated_checkpoint_skipped_with_warning(tmp_path, reference):
    work = tmp_path / "run"
    work.mkdir()
    for name in ("iter_000004.pth", "iter_000006.pth"):
        for suffix in ("", ".sha256"):
            shutil.copy(reference / f"{name}{suffix}", work / f"{name}{suffix}")
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(reference / name, work / name)
    newest = work / "iter_000006.pth"
    size = newest.stat().st_size
    with open(newest, "r+b") as f:
        f.truncate(size // 2)

    with pytest.warns(RuntimeWarning, match="iter_000006.pth.*truncated"):
        path, ckpt = find_resume_checkpoint(work)
    assert path.name == "iter_000004.pth" and ckpt["meta"]["iteration"] == 4
    # Without the side file the truncation is still caught, by torch.load.
    (work / "iter_000006.pth.sha256").unlink()
    with pytest.raises(CheckpointInvalid, match="cannot be loaded"):
        load_training_checkpoint(newest)
    # Same length, one byte changed: the digest catches it.
    shutil.copy(reference / "iter_000006.pth", newest)
    shutil.copy(reference / "iter_000006.pth.sha256", work / "iter_000006.pth.sha256")
    with open(newest, "r+b") as f:
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.warns(RuntimeWarning, match="SHA-256"):
        path, _ = find_resume_checkpoint(work)
    assert path.name == "iter_000004.pth"

    with pytest.warns(RuntimeWarning, match="skipping checkpoint"):
        train(str(work / "config.json"),
              opts(work, resume=True, checkpoint_interval=2, keep_checkpoints=3))
    assert_same_run(work, reference)


def test_explicit_resume_of_bad_file_is_an_error(tmp_path, reference):
    bad = tmp_path / "iter_000006.pth"
    data = (reference / "iter_000006.pth").read_bytes()
    bad.write_bytes(data[:len(data) // 3])
    with pytest.raises(CheckpointInvalid, match="--resume"):
        train(TINY, opts(tmp_path / "w", resume=str(bad)))
    with pytest.raises(FileExistsError, match="--resume"):
        train(TINY, opts(reference))  # a fresh start over existing checkpoints


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "iter_000002.pth"
    save_training_checkpoint(path, {"state_dict": {"w": torch.ones(3)}, "meta": {
        "iteration": 2}, "optimizer": {}, "scheduler": {}, "rng": []})
    before = path.read_bytes()

    def dying_save(obj, f):  # writes half a file, then the process "dies"
        f.write(before[:len(before) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_training_checkpoint(path, {"state_dict": {}, "meta": {}})
    assert path.read_bytes() == before  # the old checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, f"{path.name}.sha256"]
    assert load_training_checkpoint(path)["meta"]["iteration"] == 2


# -- non-finite loss or gradient -------------------------------------------------------------------

def add_nan_hooks(trainer, feats_at=(), grad_at=(), logits_at=(), rank=None):
    """NaN into one element of the fused OCR head's input at the 1-based iterations
    ``feats_at``, of its output at ``logits_at`` (past its BatchNorms, which SyncBN would
    spread a NaN from), and of the classifier's weight gradient at ``grad_at``; on ``rank``
    only, if given. Validation is off in these runs: the head runs once per iteration."""
    head = trainer.model.ocr_head
    assert head.fused
    calls = {"forward": 0, "backward": 0}
    here = rank is None or trainer.dist.rank == rank

    def pre_hook(module, args):
        calls["forward"] += 1
        if here and calls["forward"] in feats_at:
            feats = args[0].clone()  # not in place: the aux head saved the same tensor
            feats[0, 0, 0, 0] = float("nan")
            return (feats, *args[1:])

    def hook(module, args, out):
        if here and calls["forward"] in logits_at:
            out = out.clone()
            out[0, 0, 0, 0] = float("nan")
            return out

    def grad_hook(grad):
        calls["backward"] += 1
        if here and calls["backward"] in grad_at:
            grad = grad.clone()
            grad[0, 0] = float("nan")
            return grad

    head.register_forward_pre_hook(pre_hook)
    head.register_forward_hook(hook)
    head.conv_seg.weight.register_hook(grad_hook)


def nan_trainer(work, iters, feats_at=(), grad_at=(), **kw) -> Trainer:
    """A Trainer of TINY for ``iters`` iterations with :func:`add_nan_hooks`."""
    cfg, o = apply_overrides(SYNTHETIC_CONFIGS[TINY], opts(work, **kw),
                             [f"schedule.iterations={iters}"])

    class NaNTrainer(Trainer):
        def _setup(self):
            super()._setup()
            add_nan_hooks(self, feats_at, grad_at)

    return NaNTrainer(cfg, o)


def all_finite(state_dict) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in state_dict.values()
               if v.is_floating_point())


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    work = tmp_path / "run"
    written = {}
    save = ocrnet.engine.trainer.save_training_checkpoint

    def recording_save(path, payload):  # what each checkpoint held when it was written
        written[Path(path).name] = {k: v.clone() for k, v in payload["state_dict"].items()}
        return save(path, payload)

    monkeypatch.setattr(ocrnet.engine.trainer, "save_training_checkpoint", recording_save)
    trainer = nan_trainer(work, 6, feats_at=(5,), checkpoint_interval=2)
    with pytest.raises(FloatingPointError) as info:
        trainer.run()
    msg = str(info.value)
    assert "non-finite loss at iteration 5/6 (1-based) on rank 0 (loss nan)" in msg, msg
    assert f"the last good checkpoint is {work / 'iter_000004.pth'} (kept" in msg, msg
    assert "train.skip_nonfinite=N" in msg
    # Nothing written after the bad step, nothing lost before it.
    assert sorted(written) == ["iter_000002.pth", "iter_000004.pth"]
    assert sorted(p.name for p in work.glob("iter_*")) == [
        "iter_000002.pth", "iter_000002.pth.sha256", "iter_000004.pth",
        "iter_000004.pth.sha256"]
    path, ckpt = find_resume_checkpoint(work)
    assert path.name == "iter_000004.pth" and ckpt["meta"]["iteration"] == 4
    assert all_finite(ckpt["state_dict"])
    assert ckpt["state_dict"].keys() == written["iter_000004.pth"].keys()
    for k, v in written["iter_000004.pth"].items():
        assert torch.equal(ckpt["state_dict"][k], v), k
    assert [r["iter"] for r in rows(work)] == [1, 2, 3, 4]
    assert "ERROR: train: non-finite loss at iteration 5/6" in (work / "train.log").read_text()
    # The run continues from that checkpoint.
    result = train(str(work / "config.json"), opts(work, resume=True, checkpoint_interval=2))
    assert result["iterations"] == 6 and all_finite(final_state(work)["state_dict"])


def test_skip_nonfinite_skips_bad_steps_up_to_the_limit(tmp_path):
    work = tmp_path / "skip"
    nan_trainer(work, 5, feats_at=(3,), skip_nonfinite=1, checkpoint_interval=1,
                keep_checkpoints=0).run()
    before, after = (load_training_checkpoint(work / f"iter_00000{i}.pth") for i in (2, 3))
    # The skipped step changed nothing: weights, BatchNorm buffers (num_batches_tracked
    # included), momentum.
    for k, v in before["state_dict"].items():
        assert torch.equal(after["state_dict"][k], v), k
    for sa, sb in zip(after["optimizer"]["state"].values(),
                      before["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert after["meta"]["skipped_nonfinite"] == 1
    last = final_state(work)
    assert last["meta"]["iteration"] == 5 and all_finite(last["state_dict"])
    assert not torch.equal(last["state_dict"]["decode_head.1.conv_seg.weight"],
                           after["state_dict"]["decode_head.1.conv_seg.weight"])
    r = rows(work)
    assert [x["skipped"] for x in r] == [0, 0, 1, 0, 0]
    assert math.isnan(r[2]["loss"]) and all(math.isfinite(x["loss"]) for x in r if x["iter"] != 3)
    # The skipped iteration still counts: the poly schedule goes on.
    s = dataclasses.replace(SYNTHETIC_CONFIGS[TINY].schedule, iterations=5)
    assert [x["lr"] for x in r] == [pytest.approx(poly_lr(t, s)) for t in range(5)]
    log = (work / "train.log").read_text()
    assert "WARNING: non-finite loss at iteration 3/5 (1-based) on rank 0" in log
    assert "step skipped, model unchanged (1 of at most 1 skips)" in log

    # A second bad step is one too many.
    work = tmp_path / "limit"
    with pytest.raises(FloatingPointError) as info:
        nan_trainer(work, 5, feats_at=(2, 4), skip_nonfinite=1, checkpoint_interval=1).run()
    msg = str(info.value)
    assert "non-finite loss at iteration 4/5 (1-based) on rank 0" in msg, msg
    assert "1 non-finite step was skipped already, the limit train.skip_nonfinite=1" in msg
    assert str(work / "iter_000003.pth") in msg
    assert max(p.name for p in work.glob("iter_*.pth")) == "iter_000003.pth"
    assert all_finite(final_state(work)["state_dict"])


@pytest.mark.parametrize("skip", [0, 1])
def test_nonfinite_gradient_is_caught(tmp_path, skip):
    """A NaN that reaches a gradient only (the loss is finite)."""
    work = tmp_path / "grad"
    trainer = nan_trainer(work, 3, grad_at=(2,), skip_nonfinite=skip)
    if not skip:
        with pytest.raises(FloatingPointError) as info:
            trainer.run()
        msg = str(info.value)
        assert ("non-finite gradient at iteration 2/3 (1-based) on rank 0 (1 parameter "
                "gradient, first decode_head.1.conv_seg.weight)") in msg, msg
        assert "no checkpoint has been saved yet" in msg
        assert not list(work.glob("iter_*"))
        return
    trainer.run()
    r = rows(work)
    assert [x["skipped"] for x in r] == [0, 1, 0]
    # A row's loss averages the steps that were applied: none in the second one.
    assert math.isfinite(r[0]["loss"]) and math.isnan(r[1]["loss"]) and math.isfinite(r[2]["loss"])
    assert all_finite(final_state(work)["state_dict"])
    assert "WARNING: non-finite gradient at iteration 2/3" in (work / "train.log").read_text()


def test_two_processes_agree_on_a_nonfinite_loss_of_one_rank(tmp_path):
    """Under DDP a NaN loss on rank 1 only is skipped on both ranks, and the next one, past
    the limit, stops both (neither waits in a collective for the other). Each rank writes its
    error to a file and exits normally: torchrun stops the other ranks when one fails."""
    script = tmp_path / "nan_ddp.py"
    script.write_text(f'''
import sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from ocrnet.configs import SYNTHETIC_CONFIGS, apply_overrides
from ocrnet.engine import Trainer, TrainOptions
from test_ocrnet_train import add_nan_hooks

class NaNTrainer(Trainer):
    def _setup(self):
        super()._setup()
        add_nan_hooks(self, logits_at=(2, 4), rank=1)

cfg, o = apply_overrides(SYNTHETIC_CONFIGS[{TINY!r}], TrainOptions(
    work_dir=sys.argv[1], device="cpu", num_workers=0, threads=1, log_interval=1,
    checkpoint_interval=1, validate=False, progress=False, synthetic_train_length=64,
    skip_nonfinite=1), ["schedule.iterations=5", "data.batch_per_gpu=2"])
trainer = NaNTrainer(cfg, o)
try:
    trainer.run()
except FloatingPointError as exc:
    with open(f"{{sys.argv[1]}}.rank{{trainer.dist.rank}}.err", "w") as f:
        f.write(str(exc))
''')
    work = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), str(work)]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        msg = Path(f"{work}.rank{rank}.err").read_text()
        assert "non-finite loss at iteration 4/5 (1-based) on rank 1" in msg, msg
        assert f"raised on rank {rank}; 1 non-finite step was skipped already" in msg, msg
    log = (work / "train.log").read_text()
    assert "WARNING: non-finite loss at iteration 2/5 (1-based) on rank 1" in log
    assert max(p.name for p in work.glob("iter_*.pth")) == "iter_000003.pth"
    last = final_state(work)
    assert last["meta"]["skipped_nonfinite"] == 1 and all_finite(last["state_dict"])
    first = load_training_checkpoint(work / "iter_000001.pth")
    second = load_training_checkpoint(work / "iter_000002.pth")
    for k, v in first["state_dict"].items():  # the skipped step changed nothing
        assert torch.equal(second["state_dict"][k], v), k


# -- options, evaluation -----------------------------------------------------------------------

def test_overrides_and_errors():
    cfg, o = apply_overrides(SYNTHETIC_CONFIGS[TINY], TrainOptions(),
                             ["schedule.lr=1", "data.crop_size=[16, 32]",
                              "model.aux_head.loss_weight=0.5", "train.grad_clip=2",
                              "keep_checkpoints=1", "train.skip_nonfinite=2"])
    assert cfg.schedule.lr == 1.0 and isinstance(cfg.schedule.lr, float)
    assert cfg.data.crop_size == (16, 32) and cfg.model.aux_head.loss_weight == 0.5
    assert o.grad_clip == 2 and o.keep_checkpoints == 1 and o.skip_nonfinite == 2
    with pytest.raises(ValueError, match="schedule.lrr"):
        apply_overrides(cfg, o, ["schedule.lrr=1"])
    with pytest.raises(ValueError, match="schedule.iterations: expected int"):
        apply_overrides(cfg, o, ["schedule.iterations=many"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(cfg, o, ["schedule.lr"])
    with pytest.raises(ValueError, match="amp"):
        TrainOptions(amp="fp8")
    with pytest.raises(ValueError, match="skip_nonfinite must be >= 0"):
        TrainOptions(skip_nonfinite=-1)
    with pytest.raises(ValueError, match="fp16 needs a CUDA"):
        train(TINY, TrainOptions(amp="fp16", device="cpu"))


def test_iou_metric_matches_mmseg_definition():
    rng = np.random.default_rng(0)
    m = IoUMetric(4, class_names=["a", "b", "c", "d"])
    labels, preds = [], []
    for _ in range(3):
        lab = rng.integers(0, 3, (8, 9))  # class 3 never labelled ...
        lab[rng.random((8, 9)) < 0.2] = 255
        pred = rng.integers(0, 3, (8, 9))
        labels.append(lab)
        preds.append(pred)
        m.update(pred, lab)
    lab, pred = np.concatenate(labels), np.concatenate(preds)  # ... nor predicted
    ok = lab != 255
    res = m.compute()
    ious = []
    for k in range(3):
        inter = np.sum((lab == k) & (pred == k) & ok)
        union = np.sum(((lab == k) | (pred == k)) & ok)
        ious.append(inter / union)
        assert res["per_class_iou"]["abc"[k]] == pytest.approx(inter / union)
    assert math.isnan(res["per_class_iou"]["d"])
    assert res["miou"] == pytest.approx(np.mean(ious))
    assert res["aacc"] == pytest.approx(np.mean(lab[ok] == pred[ok]))
    assert res["pixels"] == ok.sum()


def test_bf16_autocast_on_cpu(tmp_path):
    result = train(TINY, opts(tmp_path, amp="bf16", deterministic=False),
                   ["schedule.iterations=2"])
    assert all(math.isfinite(v) for v in losses(tmp_path))
    assert result["iterations"] == 2


def test_time_budget_follows_the_recent_speed():
    # Trainer._calibrate on a stand-in trainer: budget 240 s, 10% kept spare (216 s usable).
    from types import SimpleNamespace

    from ocrnet.engine import Trainer

    lines = []
    stub = SimpleNamespace(options=SimpleNamespace(time_budget=240.0),
                           dist=SimpleNamespace(device=torch.device("cpu"), world=1),
                           max_iters=600, _budget_logged=False,
                           log=SimpleNamespace(line=lines.append))
    # A slow start: 10 iterations in 50 s -> (216 - 50) / 5 = 33 more.
    Trainer._calibrate(stub, 10, 50.0, 10, 50.0, 600)
    assert stub.max_iters == 43 and len(lines) == 1
    # Then 10 iterations in 5 s: the schedule grows back, (216 - 55) / 0.5 = 322 more.
    Trainer._calibrate(stub, 20, 55.0, 10, 5.0, 600)
    assert stub.max_iters == 342 and len(lines) == 2
    # Never past the config's length, never before the next iteration.
    Trainer._calibrate(stub, 30, 56.0, 10, 0.01, 600)
    assert stub.max_iters == 600
    Trainer._calibrate(stub, 40, 300.0, 10, 10.0, 600)
    assert stub.max_iters == 41
    # A change under 5% is applied without a console line.
    stub.max_iters, n = 400, len(lines)
    Trainer._calibrate(stub, 100, 64.0, 10, 5.0, 600)  # 100 + 152 / 0.5
    assert stub.max_iters == 404 and len(lines) == n
