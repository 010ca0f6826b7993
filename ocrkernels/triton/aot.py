"""Ahead-of-time compile check: every kernel, config and dtype, for sm_80 and sm_90, no GPU.

The interpreter (the CPU tests) accepts programs that the GPU compiler rejects: a ``tl.dot``
with a block dimension below 16, a shared-memory footprint beyond the device's, operands of
mixed dtypes, a constexpr used as a runtime value. This module runs ``triton.compile`` on each
kernel of :mod:`.kernels` for each entry of ``configs.CONFIGS`` (the autotune space) and each input
dtype, down to a cubin (ptxas included), for ``GPUTarget("cuda", 80, 32)`` (A100) and
``GPUTarget("cuda", 90, 32)`` (H100), and checks the shared memory each needs against the
target's per-block limit. For each compile it also reports what ptxas made of the kernel:
registers per thread, spill bytes (spill stores + spill loads, ``ptxas -v`` on the job's PTX
for its own arch, the options Triton's make_cubin uses), the shared memory, and the warps per
SM that the registers and the shared memory allow (:func:`occupancy`). ``--max-spill BYTES``
fails every job that spills more than that (default 0: any spill fails; negative: report
only).

Specialisations compiled: integer arguments as i32 (every size and stride below 2^31; the
kernels form their offsets in int64 anyway), pointers 16-byte aligned (what torch allocates),
and for the constexprs that follow the problem size (the padded class count of the gather's
backward and of the attention, the padded key channels of the attention) the published
configurations: D=256 and K=19 (Cityscapes; K=21 of VOC pads alike) and K=150 (ADE20K). The
training kernels are compiled once per constexpr mode that their launch code uses
(:data:`MODES`: prologue / epilogue variants of the pixel GEMM and the weight gradient).

Run ``python -m ocrkernels.triton.aot`` (``--jobs N`` processes, default all cores); the exit
status is 1 when anything fails. ``tests/test_triton_aot.py`` runs the same check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .ptxas import (MAX_REGISTERS, MAX_WARPS_PER_SM, _parse_ptxas,  # noqa: F401 (re-exported)
                    occupancy, ptxas_usage)

__all__ = ["TARGETS", "SHARED_LIMIT", "Job", "Result", "jobs", "compile_job", "run_check",
           "ptxas_usage", "occupancy", "limit_spill", "summary"]

# (backend, capability, warp size) of the targets and their opt-in shared memory per block
TARGETS = {"sm_80": ("cuda", 80, 32), "sm_90": ("cuda", 90, 32)}
SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}
# class counts whose padded sizes are compiled (see the module docstring)
K_VALUES = {"K19": 19, "K150": 150}
D_CHANNELS = 256
# The constexpr modes of the training kernels, each a different program: every mode the launch
# code of ocrkernels/triton/attention_train.py uses is compiled (at K=19, which they ignore).
MODES = {
    "train_gemm": {
        "x": dict(PRO=0, HAS_Y2=False, EPI=1),  # z1 = W1 x, moments
        "bn": dict(PRO=1, HAS_Y2=False, EPI=1),  # z2 = W2 bn_relu1(z1), moments
        "bn+x": dict(PRO=1, HAS_Y2=True, EPI=1),  # z4 = Wc bn_relu3(z3) + Wx x, moments
        "mask": dict(PRO=0, HAS_Y2=False, EPI=2),  # g3 (d c), g2 (d h2): mask + grad sums
        "bwd+mask": dict(PRO=2, HAS_Y2=False, EPI=2),  # g1 = mask(W2^T bn_bwd2(g2))
        "bwd+y2": dict(PRO=2, HAS_Y2=True, EPI=0),  # dx = W1^T bn_bwd1(g1) + Wx^T dz4
    },
    "train_wgrad": {
        "plain": dict(LT=0, RT=0),  # d Wx
        "relu": dict(LT=0, RT=1),  # d Wc, d keys
        "bwd": dict(LT=2, RT=0),  # d W1, d values
        "bwd+relu": dict(LT=2, RT=1),  # d W2
    },
    "train_bn": {"fwd": dict(MODE=0), "reduce": dict(MODE=1), "apply": dict(MODE=2)},
}


@dataclass(frozen=True)
class Job:
    """One compilation: kernel `kernel` with config `config` (index into
    CONFIGS[kernel][regime]) for inputs of `dtype`, class-count specialisation `spec`, on
    `target` (a key of TARGETS)."""
    kernel: str
    regime: str
    config: int
    dtype: str
    spec: str
    target: str
    # extra or replacing meta-parameters (used by tests to compile a deliberately bad config)
    override: tuple = ()

    def describe(self) -> str:
        extra = f" override={dict(self.override)}" if self.override else ""
        return (f"{self.kernel} {self.regime}#{self.config} {self.dtype} {self.spec} "
                f"{self.target}{extra}")


@dataclass
class Result:
    job: Job
    ok: bool
    seconds: float
    shared: int | None = None
    error: str = ""
    stages: list = field(default_factory=list)
    # ptxas -v: registers per thread, spill stores + loads in bytes, stack frame in bytes
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack: int | None = None
    num_warps: int | None = None
    # resident warps per SM that the registers and the shared memory allow (whole blocks)
    warps_per_sm: int | None = None

    @property
    def spill(self) -> int | None:
        """Spill bytes, stores + loads (None when not measured)."""
        if self.spill_stores is None or self.spill_loads is None:
            return None
        return self.spill_stores + self.spill_loads


_RESULT_FIELDS = ("ok", "seconds", "shared", "error", "stages", "registers", "spill_stores",
                  "spill_loads", "stack", "num_warps", "warps_per_sm")


def _sig(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
            torch.float64: "fp64"}[dtype]


def _spec_k(spec: str) -> int:
    """The class count of a specialisation (the training kernels' mode names imply K=19)."""
    return K_VALUES.get(spec, K_VALUES["K19"])


def _signature(kernel: str, dtype: torch.dtype, k_value: int, spec: str = "K19"):
    """(signature, runtime constexprs) of `kernel` for inputs of `dtype` (what the launch
    code passes as ACC / DOT_UP / PRECISION, the size-derived blocks and, for the training
    kernels, the mode `spec` of MODES), GPU semantics."""
    from . import kernels

    t = "*" + _sig(dtype)
    acc = "*" + ("fp64" if dtype == torch.float64 else "fp32")
    flags = dict(ACC=kernels.acc_dtype(dtype), DOT_UP=kernels.dot_upcast(dtype, interpreter=False),
                 PRECISION=kernels.dot_precision(dtype))
    if kernel == "gather_partials":
        sig = dict(P=t, F=t, m_part=acc, l_part=acc, acc_part=acc, K="i32", C="i32", N="i32",
                   chunk="i32", S="i32", stride_pb="i32", stride_pk="i32", stride_pn="i32",
                   stride_fb="i32", stride_fc="i32", stride_fn="i32", scale="fp32")
        return sig, flags
    if kernel == "gather_merge":
        sig = dict(m_part=acc, l_part=acc, acc_part=acc, out=t, lse=acc, K="i32", C="i32",
                   S="i32", stride_ob="i32", stride_oc="i32", stride_ok="i32")
        return sig, dict(ACC=flags["ACC"])
    if kernel == "gather_backward":
        sig = dict(G=t, P=t, F=t, lse=acc, T=acc, delta_part=acc, gF=t, K="i32", C="i32",
                   N="i32", stride_gb="i32", stride_gc="i32", stride_gk="i32",
                   stride_pb="i32", stride_pk="i32", stride_pn="i32", stride_fb="i32",
                   stride_fc="i32", stride_fn="i32", scale="fp32")
        return sig, dict(flags, STAGE=kernels.stage_held(dtype),
                         BLOCK_K=kernels.next_pow2(k_value))
    if kernel == "gather_softmax_backward":
        sig = dict(P=t, lse=acc, T=acc, delta=acc, gP=t, K="i32", N="i32", stride_pb="i32",
                   stride_pk="i32", stride_pn="i32", scale="fp32")
        return sig, dict(ACC=flags["ACC"])
    if kernel == "attention_eval":
        sig = dict(X=t, WQ1=t, BQ1=t, WQ2=t, BQ2=t, KEYS=t, VALUES=t, WCTX=t, WX=t, BOUT=t,
                   OUT=t, SCR=t, C="i32", D="i32", K="i32", N="i32", stride_xb="i32",
                   stride_xc="i32", stride_xn="i32")
        return sig, dict(flags, STAGE=kernels.stage_held(dtype),
                         D_PAD=kernels.next_pow2(D_CHANNELS), K_PAD=kernels.next_pow2(k_value))
    i32 = "i32"
    if kernel == "train_gemm":
        sig = dict(W=t, Y=t, ZP=t, PV=acc, W2=t, Y2=t, OUT=t, ZO=t, EV=acc, PART=acc, M=i32,
                   J=i32, J2=i32, N=i32, NB=i32, stride_wb=i32, stride_wm=i32, stride_wj=i32,
                   stride_w2m=i32, stride_w2j=i32, stride_yb=i32, stride_yj=i32,
                   stride_yn=i32, stride_y2b=i32, stride_y2j=i32, stride_y2n=i32)
        return sig, dict(flags, **MODES[kernel][spec])
    if kernel == "train_attention":
        sig = dict(Z2=t, PV=acc, KEYS=t, VALUES=t, ATT=t, Z3=t, PART=acc, C=i32, D=i32, K=i32,
                   N=i32, NB=i32)
        return sig, dict(flags, STAGE=kernels.stage_held(dtype),
                         K_PAD=kernels.next_pow2(k_value))
    if kernel == "train_attention_bwd":
        sig = dict(G3=t, Z3=t, EV=acc, VALUES=t, ATT=t, DSIM=t, C=i32, K=i32, N=i32, NB=i32)
        return sig, dict(flags, K_PAD=kernels.next_pow2(k_value))
    if kernel == "train_wgrad":
        sig = dict(L=t, LZ=t, LV=acc, R=t, RV=acc, PART=acc, M=i32, J=i32, N=i32, B=i32,
                   chunk=i32, S=i32, per_image=i32, stride_lb=i32, stride_lm=i32,
                   stride_ln=i32, stride_rb=i32, stride_rj=i32, stride_rn=i32)
        return sig, dict(flags, **MODES[kernel][spec])
    if kernel == "train_bn":
        sig = dict(Z=t, DH=t, OUT=t, EV=acc, PART=acc, M=i32, N=i32, NB=i32)
        return sig, dict(ACC=flags["ACC"], **MODES[kernel][spec])
    raise KeyError(kernel)


def _uses(kernel: str, regime: str, dtype: str, spec: str) -> bool:
    """Whether the launch code runs `kernel` with the configs of `regime` for inputs of
    `dtype` at class-count specialisation `spec`: the same choice as configs.regime()."""
    from . import configs, kernels

    return configs.regime(kernel, DTYPES[dtype], kernels.next_pow2(_spec_k(spec))) == regime


def _specs(kernel: str) -> list[str]:
    """The class-count specialisations that change a kernel's code or configs (the gather's
    forward tiles K in its grid: one specialisation covers every K), or the constexpr modes
    of the training kernels."""
    if kernel in MODES:
        return list(MODES[kernel])
    if kernel in ("gather_backward", "attention_eval", "train_attention",
                  "train_attention_bwd"):
        return list(K_VALUES)
    return ["K19"]


def jobs(kernels=None, dtypes=None, targets=None) -> list[Job]:
    """Every (kernel, regime, config, dtype, specialisation, target) that the launch code can
    reach: each config of each regime, for each dtype and class count that selects it."""
    from . import configs
    from . import kernels as kernel_sources

    out = []
    for kernel in kernels or list(kernel_sources.KERNELS):
        for regime, tiles in configs.CONFIGS[kernel].items():
            for config in range(len(tiles)):
                for dtype in dtypes or list(DTYPES):
                    for spec in _specs(kernel):
                        if not _uses(kernel, regime, dtype, spec):
                            continue
                        for target in targets or list(TARGETS):
                            out.append(Job(kernel, regime, config, dtype, spec, target))
    return out


def compile_job(job: Job) -> Result:
    """Compile one job to a cubin; never raises (the failure is in the Result)."""
    start = time.perf_counter()
    try:
        from . import interpreter_active

        if interpreter_active():
            raise RuntimeError("Triton was imported under TRITON_INTERPRET=1 in this process; "
                               "compile in a process without it (run_check's workers)")
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        from . import configs, kernels

        cfg = configs.CONFIGS[job.kernel][job.regime][job.config]
        meta = dict(cfg.kwargs)
        meta.update(dict(job.override))
        sig, constexprs = _signature(job.kernel, DTYPES[job.dtype], _spec_k(job.spec),
                                     job.spec)
        constexprs = dict(constexprs, **meta)
        fn = kernels.compiled(job.kernel)
        signature = dict(sig)
        for name in constexprs:
            signature[name] = "constexpr"
        missing = [a for a in fn.arg_names if a not in signature]
        if missing:
            raise TypeError(f"no signature for arguments {missing} of {job.kernel}")
        # pointers 16-byte aligned, as torch allocates them (the launcher's "D" attribute)
        attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]]
                 for a, s in sig.items() if s.startswith("*")}
        src = ASTSource(fn=fn, signature={a: signature[a] for a in fn.arg_names},
                        constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget(*TARGETS[job.target]),
                                  options=dict(num_warps=cfg.num_warps,
                                               num_stages=cfg.num_stages))
        shared = int(compiled.metadata.shared)
        stages = sorted(compiled.asm)
        if "cubin" not in compiled.asm:
            raise RuntimeError(f"no cubin produced (stages: {stages})")
        if shared > SHARED_LIMIT[job.target]:
            raise RuntimeError(f"needs {shared} bytes of shared memory, {job.target} allows "
                               f"{SHARED_LIMIT[job.target]} per block")
        usage = ptxas_usage(compiled.asm["ptx"])
        warps = occupancy(usage["registers"], cfg.num_warps, shared, job.target)
        return Result(job, True, time.perf_counter() - start, shared, stages=stages,
                      num_warps=cfg.num_warps, warps_per_sm=warps, **usage)
    except Exception as exc:  # noqa: BLE001 - the compiler raises many types
        lines = [line for line in str(exc).strip().splitlines() if line.strip()]
        message = f"{type(exc).__name__}: " + (" | ".join(lines[-6:]) if lines else "")
        if os.environ.get("OCRKERNELS_AOT_TRACEBACK"):
            message += "\n" + traceback.format_exc()
        return Result(job, False, time.perf_counter() - start, error=message)


def _worker_env() -> dict:
    """The environment of a compile worker: Triton in compile mode (a parent that runs the
    interpreter, as the CPU tests do, has TRITON_INTERPRET=1, which would make the worker's
    Triton library functions interpreted), this package importable."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_check(job_list: list[Job], processes: int | None = None) -> list[Result]:
    """Compile every job, in `processes` worker processes (default: the number of cores).

    The workers are fresh interpreters (``python -m ocrkernels.triton.aot --worker``, jobs and
    results as JSON on stdin / stdout) started without ``TRITON_INTERPRET``: this process may
    have imported Triton for its interpreter, whose library functions cannot be compiled.
    Results come back in the order of `job_list`."""
    if not job_list:
        return []
    processes = max(1, min(processes or os.cpu_count() or 1, len(job_list)))
    groups = [list(range(i, len(job_list), processes)) for i in range(processes)]
    workers = []
    for group in groups:
        proc = subprocess.Popen([sys.executable, "-m", "ocrkernels.triton.aot", "--worker"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=_worker_env())
        payload = json.dumps([asdict(job_list[i]) for i in group])
        workers.append((group, proc, payload))
    results: list[Result | None] = [None] * len(job_list)
    for group, proc, payload in workers:
        out, err = proc.communicate(payload)
        try:
            if proc.returncode != 0:
                raise RuntimeError(f"exit status {proc.returncode}")
            for i, raw in zip(group, json.loads(out)):
                results[i] = Result(job_list[i], **{k: raw[k] for k in _RESULT_FIELDS})
        except Exception as exc:  # noqa: BLE001 - a worker that died is a failed check
            tail = " | ".join(err.strip().splitlines()[-5:])
            for i in group:
                if results[i] is None:
                    results[i] = Result(job_list[i], False, 0.0,
                                        error=f"compile worker failed ({exc}): {tail}")
    return results  # type: ignore[return-value]


def _worker() -> int:
    jobs_in = [Job(**{**raw, "override": tuple(tuple(kv) for kv in raw["override"])})
               for raw in json.load(sys.stdin)]
    out = []
    for job in jobs_in:
        r = compile_job(job)
        out.append({k: getattr(r, k) for k in _RESULT_FIELDS})
    json.dump(out, sys.stdout)
    return 0


def limit_spill(results: list[Result], max_spill: int | None) -> list[Result]:
    """Fail (in place) every compiled result that spills more than `max_spill` bytes (stores +
    loads); None: report only. Returns `results`."""
    if max_spill is None:
        return results
    for r in results:
        if r.ok and r.spill is not None and r.spill > max_spill:
            r.ok = False
            r.error = (f"spills {r.spill_stores} + {r.spill_loads} bytes (stores + loads) at "
                       f"{r.registers} registers, --max-spill allows {max_spill}")
    return results


def summary(results: list[Result]) -> dict:
    """Per target: compiled jobs, how many spill, total spill bytes, how many sit at the
    255-register cap, the worst spill (job and bytes)."""
    out = {}
    for target in sorted({r.job.target for r in results}):
        mine = [r for r in results if r.job.target == target and r.spill is not None]
        spilling = [r for r in mine if r.spill > 0]
        worst = max(mine, key=lambda r: r.spill, default=None)
        out[target] = dict(compiled=len(mine), spilling=len(spilling),
                           spill_bytes=sum(r.spill for r in mine),
                           at_register_cap=sum(r.registers >= MAX_REGISTERS for r in mine),
                           worst=(f"{worst.job.describe()}: {worst.spill} B"
                                  if worst is not None and worst.spill else ""))
    return out


def _row(r: Result) -> dict:
    cfg = None
    try:
        from . import configs

        tiles = configs.CONFIGS[r.job.kernel][r.job.regime][r.job.config]
        cfg = dict(tiles.kwargs, num_warps=tiles.num_warps, num_stages=tiles.num_stages)
        cfg.update(dict(r.job.override))
    except (KeyError, IndexError):
        pass
    return dict(asdict(r.job), config_values=cfg, **{k: getattr(r, k) for k in _RESULT_FIELDS},
                spill=r.spill)


def main(argv: list[str] | None = None) -> int:
    from . import kernels

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: cores)")
    p.add_argument("--kernels", default=",".join(kernels.KERNELS),
                   help="comma list (default: all)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma list (default: all)")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma list (default: all)")
    p.add_argument("--max-spill", type=int, default=0, metavar="BYTES",
                   help="fail every job spilling more than BYTES (stores + loads; default 0: "
                        "any spill fails; a negative value only reports)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write every result and the summary as JSON to PATH")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:  # jobs on stdin, results on stdout (run_check's workers)
        return _worker()
    todo = jobs(args.kernels.split(","), args.dtypes.split(","), args.targets.split(","))
    start = time.perf_counter()
    results = limit_spill(run_check(todo, args.jobs),
                          args.max_spill if args.max_spill >= 0 else None)
    wall = time.perf_counter() - start
    failed = [r for r in results if not r.ok]
    print(f"{'':4s} {'job':48s} {'smem B':>7s} {'regs':>4s} {'spill B':>7s} {'warps/SM':>8s} "
          f"{'time':>7s}")
    for r in results:
        status = "ok  " if r.ok else "FAIL"
        shared = f"{r.shared:7d}" if r.shared is not None else " " * 7
        regs = f"{r.registers:4d}" if r.registers is not None else " " * 4
        spill = f"{r.spill:7d}" if r.spill is not None else " " * 7
        occ = f"{r.warps_per_sm:8d}" if r.warps_per_sm is not None else " " * 8
        print(f"{status} {r.job.describe():48s} {shared} {regs} {spill} {occ} "
              f"{r.seconds:6.2f}s" + ("" if r.ok else f"\n     {r.error}"))
    totals = summary(results)
    for target, t in totals.items():
        print(f"{target}: {t['spilling']}/{t['compiled']} spill, {t['spill_bytes']} bytes in all, "
              f"{t['at_register_cap']} at {MAX_REGISTERS} registers"
              + (f"; worst {t['worst']}" if t["worst"] else ""))
    print(f"{len(results) - len(failed)}/{len(results)} compiled for "
          f"{', '.join(sorted({r.job.target for r in results}))} in {wall:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            results=[_row(r) for r in results], summary=totals, seconds=wall,
            max_spill=args.max_spill), indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
