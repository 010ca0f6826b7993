"""Prove the project on a CUDA machine in one command, and write what happened to a report.

Usage (from anywhere; the steps run from the repository root)::

    make gpu-check                                  # = python3 tools/gpu_check.py
    python tools/gpu_check.py [--out DIR] [--skip STEP ...] [--timeout-scale X]
    python tools/gpu_check.py --dry-run --out /tmp/gc   # the same steps on the CPU, tiny sizes

Meant for a CUDA machine where torch, Triton and nvcc are already installed and there is no
network: nothing is downloaded or pip-installed, every step runs with this interpreter
(``sys.executable``). The steps, in order, each a subprocess with its own timeout:

  build          ``setup.py build_ext --inplace`` against the installed torch; skipped (with a
                 note) when ``ocrkernels._C`` (and, on CUDA, ``ocrkernels._C_cuda``) already
                 loads and is newer than every file of ``csrc/`` and ``setup.py``
  pytest-gpu-ops ``pytest -m gpu tests/test_gpu_ops.py`` in a process of its own (no Triton
                 interpreter): every op x backend x dtype x mode on the GPU
  pytest-gpu     ``pytest -m gpu tests --ignore tests/test_gpu_ops.py``: the other tests marked
                 ``gpu`` (the CUDA rows of the non-finite grid, ...)
  bench-kernels  ``bench/run.py --device cuda --dtype float16 --shapes cityscapes,ade20k``
                 (every available backend; ``--no-compile``: the torch.compile baseline alone
                 would take minutes of the 8-minute budget)
  bench-hr18s, bench-hr18, bench-hr48, bench-r101-d8
                 ``ocrnet bench CONFIG --device cuda --json``: fps at batch 1 and peak memory of
                 the Cityscapes 512x1024 configs
  train-hr18s    20 iterations of ``ocrnet train`` of hr18s on the synthetic set with bf16 AMP:
                 the loss must stay finite; it/s and peak memory

A step fails on a non-zero exit status, a timeout, or a check of its output (missing JSON, a
non-finite loss, no CUDA test run, ...); the failure is recorded (exit status and the last 40
lines of output) and the next step runs. Steps named by ``--skip`` are recorded as skipped.
The exit status is 0 when every step that ran passed, else 1; 2 at once on a machine where
``torch.cuda.is_available()`` is False (unless ``--dry-run``) or on a bad argument.

Written into ``--out`` (default ``$OUT`` when that environment variable is set, else
``gpu_check/``), rewritten atomically after every step: ``report.md`` (the device, the torch /
Triton / CUDA versions, ``nvidia-smi -L``, and a table of step, status, seconds and key
figures, then the output tail of each failed step), ``report.json`` (the same, plus each step's
command and parsed results: benchmark rows, the training losses), and ``logs/STEP.log``, each
step's whole output.

``--dry-run`` runs the same steps on the CPU (``CUDA_VISIBLE_DEVICES`` emptied for the
subprocesses) at tiny sizes, so that CI tests the plumbing in a few minutes: the op grid runs the
Triton backend on CPU tensors through the interpreter (``OCRKERNELS_GPU_TEST_DEVICE=cpu``),
``pytest -m gpu`` over the rest collects and skips, ``bench/run.py --quick --no-compile``, ``ocrnet bench`` of the tiny
synthetic config at 32x64 for one image, and a 2-iteration fp32 training run of it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.machinery
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]

# The Cityscapes configs timed by `ocrnet bench` (step name suffix -> config name).
BENCH_MODELS = {
    "hr18s": "ocrnet_hr18s_4xb2-40k_cityscapes-512x1024",
    "hr18": "ocrnet_hr18_4xb2-40k_cityscapes-512x1024",
    "hr48": "ocrnet_hr48_4xb2-40k_cityscapes-512x1024",
    "r101-d8": "ocrnet_r101-d8_4xb2-40k_cityscapes-512x1024",
}
TRAIN_CONFIG = "ocrnet_hr18s_1xb8-2k_synthetic-64x128"  # HRNetV2p-W18-Small on the synthetic set
TRAIN_ITERS = 20
DRY_CONFIG = "ocrnet_hrtiny8_1xb4-20_synthetic-32x64"  # the tests' seconds-per-run config
DRY_SHAPE = (32, 64)
DRY_TRAIN_ITERS = 2
TAIL_LINES = 40

STEP_NAMES = ("build", "pytest-gpu-ops", "pytest-gpu", "bench-kernels",
              *(f"bench-{m}" for m in BENCH_MODELS), "train-hr18s")


def log(msg: str) -> None:
    print(f"[gpu-check] {msg}", file=sys.stderr, flush=True)


# -- steps -----------------------------------------------------------------------------------

@dataclass
class Context:
    dry_run: bool
    work: Path  # scratch folder for the steps' JSON / work dirs (not kept)
    logs: Path  # OUT/logs
    env: dict[str, str]
    timeout_scale: float


@dataclass
class Outcome:
    """What a step's check found: key figures, parsed data for report.json, and a problem
    (a reason to fail the step although its command exited 0), or None."""
    figures: dict[str, Any] = field(default_factory=dict)
    data: Any = None
    problem: str | None = None
    note: str | None = None


@dataclass
class Step:
    name: str
    timeout: tuple[float, float]  # seconds (on CUDA, in the dry run), before --timeout-scale
    command: Callable[[Context], list[str]]
    check: Callable[[Context, int], Outcome]  # (context, exit status 0) -> outcome
    # optional: decides before the command whether it needs to run; an Outcome means "no"
    precheck: Callable[[Context], Outcome | None] | None = None
    # optional: variables added to the environment of this step's command
    env: Callable[[Context], dict[str, str]] | None = None


def _py() -> list[str]:
    return [sys.executable]


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"the step wrote no {path.name}")
    return json.loads(path.read_text(encoding="utf-8"))


# build ------------------------------------------------------------------------------------

_PROBE = ("import json, ocrkernels._extension as e; "
          "print(json.dumps({'ext_error': e.extension_error(), "
          "'cuda_error': e.cuda_kernels_error()}))")


def _probe_extension(ctx: Context) -> dict[str, Any]:
    """{"ext_error", "cuda_error"} from a fresh interpreter (what `import ocrkernels` loads)."""
    try:
        proc = subprocess.run(_py() + ["-c", _PROBE], cwd=REPO, env=ctx.env, text=True,
                              capture_output=True, timeout=120 * ctx.timeout_scale)
    except subprocess.TimeoutExpired:
        return {"ext_error": "importing ocrkernels timed out", "cuda_error": None}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"ext_error": f"importing ocrkernels failed: {last}", "cuda_error": None}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _library(name: str) -> Path | None:
    """ocrkernels/<name><extension suffix>, the newest where several exist."""
    found = [REPO / "ocrkernels" / f"{name}{s}" for s in importlib.machinery.EXTENSION_SUFFIXES]
    found = [p for p in found if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def newest_source_mtime() -> float:
    """The newest modification time among csrc/** and setup.py."""
    files = [p for p in (REPO / "csrc").rglob("*") if p.is_file()] + [REPO / "setup.py"]
    return max(p.stat().st_mtime for p in files if p.exists())


def _wanted_libraries(ctx: Context) -> list[str]:
    return ["_C"] if ctx.dry_run else ["_C", "_C_cuda"]


def _build_precheck(ctx: Context) -> Outcome | None:
    sources = newest_source_mtime()
    for name in _wanted_libraries(ctx):
        lib = _library(name)
        if lib is None or lib.stat().st_mtime < sources:
            return None
    state = _probe_extension(ctx)
    if state["ext_error"] or (not ctx.dry_run and state["cuda_error"]):
        return None
    libs = " and ".join(f"ocrkernels.{n}" for n in _wanted_libraries(ctx))
    return Outcome(figures={"extension": "up to date"},
                   note=f"build skipped: {libs} already load(s) and is/are newer than csrc/ "
                        f"and setup.py")


def _build_check(ctx: Context, rc: int) -> Outcome:
    state = _probe_extension(ctx)
    figures = {"extension": "built"}
    if state["ext_error"]:
        return Outcome(figures, problem=f"ocrkernels._C does not load after the build: "
                                        f"{state['ext_error']}")
    figures["cuda_kernels"] = "loaded" if state["cuda_error"] is None else "not loaded"
    if not ctx.dry_run and state["cuda_error"]:
        return Outcome(figures, problem=f"CUDA kernels not loaded after the build: "
                                        f"{state['cuda_error']}")
    return Outcome(figures)


# pytest -m gpu ----------------------------------------------------------------------------

GPU_OPS_TESTS = "tests/test_gpu_ops.py"


def _pytest_argv(ctx: Context, name: str, *selection: str) -> list[str]:
    return _py() + ["-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                    f"--junitxml={ctx.work / (name + '.xml')}", *selection]


def _junit_outcome(ctx: Context, name: str, must_pass: bool) -> Outcome:
    """Counts and failed test ids of the step's junit XML; a problem when nothing was
    collected, or when `must_pass` and no test passed."""
    root = ET.parse(ctx.work / f"{name}.xml").getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {k: sum(int(s.get(k, 0)) for s in suites)
             for k in ("tests", "failures", "errors", "skipped")}
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    figures = {"passed": passed, "failed": count["failures"], "errors": count["errors"],
               "skipped": count["skipped"]}
    failed_ids = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
                  if c.find("failure") is not None or c.find("error") is not None]
    if count["tests"] == 0:
        return Outcome(figures, failed_ids, problem="pytest collected no test marked gpu")
    if must_pass and passed == 0:
        return Outcome(figures, failed_ids, problem="no GPU test ran (all skipped)")
    return Outcome(figures, failed_ids)


def _ops_command(ctx: Context) -> list[str]:
    return _pytest_argv(ctx, "pytest-gpu-ops", GPU_OPS_TESTS)


def _ops_env(ctx: Context) -> dict[str, str]:
    # the dry run: the Triton backend on CPU tensors through the interpreter, tiny sizes
    return {"OCRKERNELS_GPU_TEST_DEVICE": "cpu" if ctx.dry_run else "cuda"}


def _ops_check(ctx: Context, rc: int) -> Outcome:
    return _junit_outcome(ctx, "pytest-gpu-ops", must_pass=True)


def _pytest_command(ctx: Context) -> list[str]:
    return _pytest_argv(ctx, "pytest-gpu", "tests", "--ignore", GPU_OPS_TESTS)


def _pytest_check(ctx: Context, rc: int) -> Outcome:
    return _junit_outcome(ctx, "pytest-gpu", must_pass=not ctx.dry_run)


# bench/run.py -----------------------------------------------------------------------------

def _kernels_command(ctx: Context) -> list[str]:
    out = ["--json", str(ctx.work / "bench_kernels.json")]
    if ctx.dry_run:
        return _py() + ["bench/run.py", "--quick", "--no-compile", *out]
    return _py() + ["bench/run.py", "--device", "cuda", "--dtype", "float16",
                    "--shapes", "cityscapes,ade20k", "--no-compile", *out]


def _kernels_check(ctx: Context, rc: int) -> Outcome:
    rows = _read_json(ctx.work / "bench_kernels.json")
    if not rows:
        return Outcome(problem="bench/run.py wrote no rows")
    impls = sorted({r["impl"] for r in rows})
    fused = [r for r in rows if r["impl"] not in ("reference", "compiled")]
    figures: dict[str, Any] = {"rows": len(rows), "impls": ",".join(impls)}
    best: dict[str, float] = {}
    for r in fused:
        s = r.get("speedup_vs_eager")
        if s is not None and math.isfinite(s):
            best[r["op"]] = max(best.get(r["op"], 0.0), s)
    for op, s in sorted(best.items()):
        figures[f"best vs eager {op}"] = f"{s:.2f}x"
    if not fused:
        return Outcome(figures, rows, problem="no fused backend was measured (only the "
                                              "reference / compiled rows)")
    want = "cpu" if ctx.dry_run else "cuda"
    devices = {str(r.get("device", "")).split(":")[0] for r in rows}
    if devices != {want}:
        return Outcome(figures, rows, problem=f"rows on device(s) {sorted(devices)}, "
                                              f"expected {want}")
    return Outcome(figures, rows)


# ocrnet bench -----------------------------------------------------------------------------

def _model_command(model: str) -> Callable[[Context], list[str]]:
    def command(ctx: Context) -> list[str]:
        out = ["--json", str(ctx.work / f"bench-{model}.json")]
        if ctx.dry_run:
            return _py() + ["-m", "ocrnet", "bench", DRY_CONFIG, "--device", "cpu",
                            "--images", "1", "--warmup", "0",
                            "--shape", *map(str, DRY_SHAPE), *out]
        return _py() + ["-m", "ocrnet", "bench", BENCH_MODELS[model], "--device", "cuda", *out]
    return command


def _model_check(model: str) -> Callable[[Context, int], Outcome]:
    def check(ctx: Context, rc: int) -> Outcome:
        res = _read_json(ctx.work / f"bench-{model}.json")
        peak = res.get("peak_mem_mib")
        figures = {"config": res.get("config"), "fps": round(res["fps"], 2),
                   "peak_mem_mib": None if peak is None else round(peak),
                   "peak_mem_kind": res.get("peak_mem_kind"),
                   "shape": "x".join(map(str, res.get("shape", [])[-2:])),
                   "gflop": float(f"{res['gflop']:.3g}") if res.get("gflop") is not None
                   else None}
        if not (isinstance(res["fps"], (int, float)) and math.isfinite(res["fps"])
                and res["fps"] > 0):
            return Outcome(figures, res, problem=f"fps is {res['fps']!r}")
        want = "cpu" if ctx.dry_run else "cuda"
        if str(res.get("device", "")).split(":")[0] != want:
            return Outcome(figures, res, problem=f"ran on {res.get('device')!r}, not {want}")
        return Outcome(figures, res)
    return check


# ocrnet train -----------------------------------------------------------------------------

def _train_iters(ctx: Context) -> int:
    return DRY_TRAIN_ITERS if ctx.dry_run else TRAIN_ITERS


def _train_command(ctx: Context) -> list[str]:
    sets = [f"schedule.iterations={_train_iters(ctx)}", "train.log_interval=1",
            "train.checkpoint_interval=0", "train.validate=False"]
    work = ["--work-dir", str(ctx.work / "train")]
    if ctx.dry_run:  # fp32 on the CPU, no DataLoader workers, a small in-memory set
        return _py() + ["-m", "ocrnet", "train", DRY_CONFIG, "--device", "cpu", *work,
                        "--set", *sets, "train.num_workers=0",
                        "train.synthetic_train_length=64"]
    return _py() + ["-m", "ocrnet", "train", TRAIN_CONFIG, "--device", "cuda", "--amp", "bf16",
                    *work, "--set", *sets]


def train_figures(rows: list[dict], iterations: int) -> Outcome:
    """Key figures of a run's metrics.jsonl train rows (one per iteration): losses, whether
    all are finite, it/s over all iterations and without the first (warm-up), peak memory."""
    rows = [r for r in rows if r.get("mode") == "train"]
    losses = [r["loss"] for r in rows]
    finite = bool(losses) and all(isinstance(x, (int, float)) and math.isfinite(x)
                                  for x in losses)
    times = [r["time"] for r in rows]
    steady = times[1:] if len(times) > 1 else times
    mem = [r["memory_mb"] for r in rows if r.get("memory_mb") is not None]
    figures = {"iterations": len(rows),
               "loss_first": round(losses[0], 4) if losses else None,
               "loss_last": round(losses[-1], 4) if losses else None,
               "loss_finite": finite,
               "it_per_s": round(len(times) / sum(times), 2) if sum(times) > 0 else None,
               "it_per_s_steady": round(len(steady) / sum(steady), 2) if sum(steady) > 0
               else None,
               "peak_mem_mib": round(max(mem)) if mem else None}
    if len(rows) != iterations:
        return Outcome(figures, rows, problem=f"{len(rows)} logged iterations, expected "
                                              f"{iterations}")
    if not finite:
        return Outcome(figures, rows, problem=f"non-finite loss: {losses}")
    return Outcome(figures, rows)


def _train_check(ctx: Context, rc: int) -> Outcome:
    path = ctx.work / "train" / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError("the run wrote no metrics.jsonl")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    return train_figures(rows, _train_iters(ctx))


def make_steps() -> list[Step]:
    steps = [
        Step("build", (420, 600), lambda ctx: _py() + ["setup.py", "build_ext", "--inplace"],
             _build_check, precheck=_build_precheck),
        Step("pytest-gpu-ops", (300, 300), _ops_command, _ops_check, env=_ops_env),
        Step("pytest-gpu", (120, 120), _pytest_command, _pytest_check),
        Step("bench-kernels", (300, 120), _kernels_command, _kernels_check),
        *(Step(f"bench-{m}", (180, 60), _model_command(m), _model_check(m))
          for m in BENCH_MODELS),
        Step("train-hr18s", (240, 120), _train_command, _train_check),
    ]
    assert tuple(s.name for s in steps) == STEP_NAMES
    return steps


# -- running ---------------------------------------------------------------------------------

def run_command(argv: list[str], timeout: float, log_path: Path,
                env: dict[str, str]) -> tuple[int | None, bool]:
    """Run argv from the repository root, its output (stdout and stderr) into log_path.
    Returns (exit status, timed out); on a timeout the whole process group is killed."""
    posix = os.name == "posix"
    with open(log_path, "w", encoding="utf-8", errors="replace") as out:
        out.write("$ " + " ".join(argv) + "\n")
        out.flush()
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=posix)
        try:
            return proc.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            _kill(proc, posix)
            return None, True
        except BaseException:  # KeyboardInterrupt: do not leave the step running
            _kill(proc, posix)
            raise


def _kill(proc: subprocess.Popen, posix: bool) -> None:
    try:
        if posix:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def tail(path: Path, n: int = TAIL_LINES) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()[-n:]
    except OSError:
        return []


def run_step(step: Step, ctx: Context) -> dict[str, Any]:
    """Run one step; its report entry."""
    entry: dict[str, Any] = {"name": step.name, "status": "failed", "seconds": 0.0,
                             "exit_code": None, "timed_out": False, "figures": {},
                             "command": None, "note": None, "problem": None, "tail": None,
                             "data": None}
    timeout = step.timeout[1 if ctx.dry_run else 0] * ctx.timeout_scale
    start = time.perf_counter()
    log_path = ctx.logs / f"{step.name}.log"
    try:
        if step.precheck is not None:
            pre = step.precheck(ctx)
            if pre is not None:
                log_path.write_text((pre.note or "") + "\n", encoding="utf-8")
                entry.update(status="passed", figures=pre.figures, note=pre.note)
                return entry
        argv = step.command(ctx)
        entry["command"] = argv
        env = ctx.env if step.env is None else {**ctx.env, **step.env(ctx)}
        rc, timed_out = run_command(argv, timeout, log_path, env)
        entry.update(exit_code=rc, timed_out=timed_out)
        if timed_out:
            entry["problem"] = f"timed out after {timeout:.0f} s"
        elif rc != 0:
            entry["problem"] = f"exit status {rc}"
        try:
            outcome = step.check(ctx, rc)
        except Exception as exc:  # noqa: BLE001 -- a check that cannot read its output fails
            outcome = Outcome(problem=f"{type(exc).__name__}: {exc}")
        entry.update(figures=outcome.figures, data=outcome.data, note=outcome.note)
        if entry["problem"] is None and outcome.problem is not None:
            entry["problem"] = outcome.problem
        if entry["problem"] is None:
            entry["status"] = "passed"
    except KeyboardInterrupt:
        entry["problem"] = "interrupted"
        raise
    finally:
        entry["seconds"] = round(time.perf_counter() - start, 1)
        if entry["status"] != "passed":
            entry["tail"] = tail(log_path)
    return entry


# -- environment and report ------------------------------------------------------------------

def _command_output(argv: list[str], timeout: float = 20) -> str | None:
    if shutil.which(argv[0]) is None:
        return None
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def environment(torch, dry_run: bool) -> dict[str, Any]:
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 -- not installed, or broken: reported as missing
        triton_version = None
    if dry_run:
        device = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores; " \
                 f"dry run)"
    else:
        device = torch.cuda.get_device_name(0)
    nvcc = _command_output(["nvcc", "--version"])
    return {"device": device, "python": platform.python_version(), "torch": torch.__version__,
            "triton": triton_version, "cuda": torch.version.cuda,
            "nvcc": nvcc.splitlines()[-1] if nvcc else None,
            "nvidia_smi_L": _command_output(["nvidia-smi", "-L"]),
            "git": _command_output(["git", "describe", "--always", "--dirty"]),
            "platform": platform.platform()}


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _figures_text(figures: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in figures.items() if v is not None)


def render_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    state = ("PASSED" if report["passed"] else "FAILED") if report["complete"] else "RUNNING"
    lines = [f"# gpu-check: {state}" + (" (dry run on the CPU)" if report["dry_run"] else ""),
             "",
             f"- started: {report['started']}, {report['seconds']:.0f} s so far"
             if not report["complete"] else
             f"- started: {report['started']}, {report['seconds']:.0f} s in all",
             f"- device: {env['device']}",
             f"- torch {env['torch']}, Triton {env['triton'] or 'not installed'}, "
             f"CUDA {env['cuda'] or 'none (CPU torch)'}"
             + (f", nvcc: {env['nvcc']}" if env["nvcc"] else ""),
             f"- python {env['python']}, {env['platform']}, commit {env['git'] or 'unknown'}",
             "- `nvidia-smi -L`: " + (f"\n\n```text\n{env['nvidia_smi_L']}\n```"
                                      if env["nvidia_smi_L"] else "not available"),
             "",
             "| step | status | seconds | key figures |",
             "|---|---|---:|---|"]
    for s in report["steps"]:
        figures = _figures_text(s["figures"])
        extra = [x for x in (s.get("problem"), s.get("note")) if x]
        text = "; ".join([figures] * bool(figures) + extra)
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {_cell(text)} |")
    for s in report["steps"]:
        if s["status"] == "failed":
            code = "killed at its timeout" if s["timed_out"] else f"exit status {s['exit_code']}"
            lines += ["", f"## {s['name']} failed: {s['problem']}", "",
                      f"`{' '.join(s['command'] or [])}`: {code}", "",
                      f"Last {TAIL_LINES} lines of output (all of it in logs/{s['name']}.log):",
                      "", "```text", *(s["tail"] or []), "```"]
    return "\n".join(lines) + "\n"


def _load_fileio():
    """The project's atomic writer, ``ocrnet/utils/fileio.py`` (standard library only), loaded
    from its file: importing the ``ocrnet`` package would load the ``ocrkernels`` extension
    that the build step then replaces in place."""
    spec = importlib.util.spec_from_file_location(
        "_gpu_check_fileio", REPO / "ocrnet" / "utils" / "fileio.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_fileio = _load_fileio()


def write_report(out: Path, report: dict[str, Any]) -> None:
    _fileio.write_text_atomic(out / "report.json",
                              json.dumps(report, indent=1, allow_nan=True) + "\n")
    _fileio.write_text_atomic(out / "report.md", render_markdown(report))


# -- command line ----------------------------------------------------------------------------

def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="gpu_check.py",
        description="Build, test and benchmark the project on a CUDA machine (no network); "
                    "writes report.md and report.json. --dry-run: the same steps on the CPU "
                    "at tiny sizes.")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="report folder (default: $OUT when set, else gpu_check/)")
    p.add_argument("--dry-run", action="store_true",
                   help="run the steps on the CPU at tiny sizes (tests the plumbing)")
    p.add_argument("--skip", action="append", default=[], choices=STEP_NAMES, metavar="STEP",
                   help=f"skip a step (repeatable); steps: {', '.join(STEP_NAMES)}")
    p.add_argument("--timeout-scale", type=_positive, default=1.0, metavar="X",
                   help="multiply every step's timeout by X (default 1)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = os.environ.get("OUT") or "gpu_check"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError as exc:
        print(f"gpu-check: torch does not import with {sys.executable} ({exc}); run it with "
              "the environment's python", file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU here (torch.cuda.is_available() is False): run it on a "
              "CUDA machine, or pass --dry-run to check the steps on the CPU", file=sys.stderr)
        return 2

    out = Path(args.out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU, also on a machine with a GPU
    steps = make_steps()
    skip = set(args.skip)
    report: dict[str, Any] = {
        "dry_run": args.dry_run, "complete": False, "passed": False,
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "seconds": 0.0, "environment": environment(torch, args.dry_run),
        "timeout_scale": args.timeout_scale,
        "steps": [{"name": s.name, "status": "skipped" if s.name in skip else "pending",
                   "seconds": 0.0, "exit_code": None, "timed_out": False, "figures": {},
                   "command": None, "note": "--skip" if s.name in skip else None,
                   "problem": None, "tail": None, "data": None} for s in steps]}
    log(f"{'dry run on the CPU' if args.dry_run else report['environment']['device']}; "
        f"report in {out}")
    start = time.perf_counter()
    write_report(out, report)
    interrupted = False
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx = Context(dry_run=args.dry_run, work=Path(tmp), logs=logs, env=env,
                      timeout_scale=args.timeout_scale)
        for i, step in enumerate(steps):
            if step.name in skip:
                log(f"{step.name}: skipped (--skip)")
                continue
            log(f"{step.name} ...")
            try:
                entry = run_step(step, ctx)
            except KeyboardInterrupt:
                report["steps"][i].update(status="failed", problem="interrupted",
                                          tail=tail(logs / f"{step.name}.log"))
                interrupted = True
                break
            report["steps"][i] = entry
            report["seconds"] = round(time.perf_counter() - start, 1)
            figures = _figures_text(entry["figures"])
            log(f"{step.name}: {entry['status']} in {entry['seconds']:.1f} s"
                + (f" ({entry['problem']})" if entry["problem"] else "")
                + (f": {figures}" if figures else ""))
            write_report(out, report)
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["complete"] = not interrupted
    report["passed"] = not interrupted and all(s["status"] in ("passed", "skipped")
                                               for s in report["steps"])
    write_report(out, report)
    failed = [s["name"] for s in report["steps"] if s["status"] != "passed"
              and s["status"] != "skipped"]
    log(f"{'PASSED' if report['passed'] else 'FAILED'} in {report['seconds']:.0f} s"
        + (f" (failed: {', '.join(failed)})" if failed else "")
        + f"; {out / 'report.md'}")
    if interrupted:
        return 130
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
