"""tools/gpu_check.py (`make gpu-check`): the --dry-run plumbing on the CPU, the refusal on a
machine without CUDA, argument errors, and the failure bookkeeping of one step."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ocrnet.configs import SYNTHETIC_CONFIGS, get_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_check.py"

_spec = importlib.util.spec_from_file_location("tools_gpu_check", SCRIPT)
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["tools_gpu_check"] = gpu_check  # dataclasses look their module up there
_spec.loader.exec_module(gpu_check)


def run_script(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)


def test_dry_run_passes_and_writes_the_reports(tmp_path):
    out = tmp_path / "report"
    # About 2.5 min on 2 cores (the op grid under the interpreter); the timeout only guards
    # against a hang (no timing assertion).
    proc = run_script("--dry-run", "--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    report = json.loads((out / "report.json").read_text())
    assert report["dry_run"] is True and report["complete"] is True and report["passed"] is True
    assert [s["name"] for s in report["steps"]] == list(gpu_check.STEP_NAMES)
    for step in report["steps"]:
        assert step["status"] == "passed", step
        assert step["problem"] is None and step["tail"] is None, step
        assert (out / "logs" / f"{step['name']}.log").is_file()
    steps = {s["name"]: s for s in report["steps"]}
    ops = steps["pytest-gpu-ops"]["figures"]  # Triton under the interpreter, tiny sizes
    assert ops["failed"] == 0 and ops["errors"] == 0 and ops["passed"] > 0, ops
    assert steps["pytest-gpu"]["figures"]["failed"] == 0
    assert steps["pytest-gpu"]["figures"]["skipped"] > 0  # the other gpu tests, collected
    assert steps["bench-kernels"]["figures"]["rows"] == len(steps["bench-kernels"]["data"]) > 0
    for model in gpu_check.BENCH_MODELS:
        fig = steps[f"bench-{model}"]["figures"]
        assert fig["fps"] > 0 and fig["shape"] == "32x64", fig
    train = steps["train-hr18s"]["figures"]
    assert train["iterations"] == gpu_check.DRY_TRAIN_ITERS and train["loss_finite"] is True
    assert train["it_per_s"] > 0
    assert report["environment"]["torch"] == torch.__version__

    md = (out / "report.md").read_text()
    assert md.startswith("# gpu-check: PASSED (dry run on the CPU)")
    assert "| step | status | seconds | key figures |" in md
    for name in gpu_check.STEP_NAMES:
        assert f"| {name} | passed | " in md
    assert f"torch {torch.__version__}" in md
    assert not list(out.glob(".report.*"))  # no temporary file left behind
    assert "PASSED" in proc.stderr.splitlines()[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_without_cuda_exits_2_at_once(tmp_path):
    out = tmp_path / "report"
    start = time.monotonic()
    proc = run_script("--out", str(out))
    assert proc.returncode == 2, proc.stderr
    assert time.monotonic() - start < 30
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU" in lines[0] and "--dry-run" in lines[0], lines
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("args, message", [
    (["--skip", "nonsense"], "invalid choice: 'nonsense'"),
    (["--timeout-scale", "0"], "must be a positive number, got '0'"),
    (["--timeout-scale", "fast"], "must be a positive number, got 'fast'"),
    (["--no-such-option"], "unrecognized arguments: --no-such-option"),
])
def test_bad_arguments_are_clear_errors(args, message):
    proc = run_script(*args)
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr
    assert "usage: gpu_check.py" in proc.stderr


def test_the_gpu_plan_names_existing_configs():
    for model, name in gpu_check.BENCH_MODELS.items():
        cfg = get_config(name)  # raises on an unknown name
        assert cfg.name == name and "cityscapes-512x1024" in name and model in name
    assert SYNTHETIC_CONFIGS[gpu_check.TRAIN_CONFIG].model.backbone.arch == "w18_small"
    assert gpu_check.DRY_CONFIG in SYNTHETIC_CONFIGS


def test_train_figures_flag_a_nonfinite_loss_and_a_short_run():
    rows = [{"mode": "train", "iter": i + 1, "loss": loss, "time": 0.5, "memory_mb": mem}
            for i, (loss, mem) in enumerate([(2.0, 100.0), (1.5, 300.0), (1.0, 200.0)])]
    ok = gpu_check.train_figures(rows, 3)
    assert ok.problem is None
    assert ok.figures["loss_finite"] is True and ok.figures["peak_mem_mib"] == 300
    assert ok.figures["it_per_s"] == 2.0 and ok.figures["loss_last"] == 1.0
    rows[1]["loss"] = math.nan
    bad = gpu_check.train_figures(rows, 3)
    assert bad.figures["loss_finite"] is False and "non-finite loss" in bad.problem
    short = gpu_check.train_figures(rows[:2], 3)
    assert "2 logged iterations, expected 3" in short.problem


def _script_step(name, code, timeout=30.0):
    return gpu_check.Step(name, (timeout, timeout),
                          lambda ctx: [sys.executable, "-c", code],
                          lambda ctx, rc: gpu_check.Outcome(figures={"ran": name}))


def test_a_failing_step_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    failing = ("import sys\nfor i in range(100): print('line', i)\n"
               "print('boom', file=sys.stderr); sys.exit(3)")
    sleeper = "import time; print('waiting', flush=True); time.sleep(60)"
    steps = [_script_step("build", failing), _script_step("pytest-gpu", sleeper, timeout=1.0),
             _script_step("bench-kernels", "print('fine')")]
    monkeypatch.setattr(gpu_check, "make_steps", lambda: steps)
    monkeypatch.delenv("OUT", raising=False)
    out = tmp_path / "report"
    start = time.monotonic()
    rc = gpu_check.main(["--dry-run", "--out", str(out)])
    assert rc == 1
    assert time.monotonic() - start < 30  # the sleeper was killed at its 1 s timeout

    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False and report["complete"] is True
    build, pytest_step, kernels = report["steps"]
    assert build["status"] == "failed" and build["exit_code"] == 3
    assert build["problem"] == "exit status 3"
    assert len(build["tail"]) == gpu_check.TAIL_LINES and build["tail"][-1] == "boom"
    assert build["tail"][0] == "line 61"  # the last 40 of 102 lines (command, 100, boom)
    assert pytest_step["status"] == "failed" and pytest_step["timed_out"] is True
    assert pytest_step["exit_code"] is None and "timed out after 1 s" in pytest_step["problem"]
    assert pytest_step["tail"] == [pytest_step["tail"][0], "waiting"]
    assert kernels["status"] == "passed" and kernels["figures"] == {"ran": "bench-kernels"}
    md = (out / "report.md").read_text()
    assert md.startswith("# gpu-check: FAILED")
    assert "## build failed: exit status 3" in md and "\nboom\n" in md
    assert "| bench-kernels | passed |" in md


def test_skipped_steps_are_recorded_and_do_not_fail(tmp_path, monkeypatch):
    steps = [_script_step("build", "import sys; sys.exit(1)"),
             _script_step("pytest-gpu", "print('fine')")]
    monkeypatch.setattr(gpu_check, "make_steps", lambda: steps)
    out = tmp_path / "report"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--skip", "build"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [s["status"] for s in report["steps"]] == ["skipped", "passed"]
    assert report["passed"] is True
