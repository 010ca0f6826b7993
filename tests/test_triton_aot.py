"""Ahead-of-time compile check of the Triton kernels for sm_80 and sm_90, without a GPU.

``ocrkernels.triton.aot`` compiles every kernel x every autotune config x every dtype (and the
class-count specialisations that change the code) with ``triton.compile`` for
``GPUTarget("cuda", 80, 32)`` and ``GPUTarget("cuda", 90, 32)``, down to a cubin, and checks the
shared memory against each target's limit; each result carries ptxas's registers per thread and
spill bytes and the warps per SM they allow; no job may spill (``--max-spill``, default 0). The
compiles run in worker processes started without TRITON_INTERPRET (this process imports Triton
for the interpreter). It takes about
four minutes on 2 cores with an empty Triton cache (204 compiles, 136 of them the training
kernels' modes), about a minute with the Triton cache but not ptxas -v's (cached beside it,
ocrkernels-ptxas/), seconds once both hold them; ``python -m ocrkernels.triton.aot`` runs
the same check by hand.
"""

from __future__ import annotations

import os

# Before Triton's first import in this process (see test_triton_spatial_gather.py).
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")

import ocrkernels  # noqa: E402
from ocrkernels import reference  # noqa: E402
from ocrkernels.triton import aot  # noqa: E402
from ocrkernels.triton import configs, kernels  # noqa: E402
from conftest import rel_err  # noqa: E402


def test_every_kernel_config_and_dtype_compiles_for_sm80_and_sm90():
    jobs = aot.jobs()
    # the job list is the whole space: every config of every regime, every dtype, both targets
    assert {(j.kernel, j.regime, j.config) for j in jobs} == {
        (k, r, i) for k, regimes in configs.CONFIGS.items() for r, cfgs in regimes.items()
        for i in range(len(cfgs))}
    for kernel in kernels.KERNELS:
        assert {j.dtype for j in jobs if j.kernel == kernel} == set(aot.DTYPES)
    assert {j.target for j in jobs} == {"sm_80", "sm_90"}
    results = aot.run_check(jobs, processes=os.cpu_count())
    failed = [f"{r.job.describe()}: {r.error}" for r in results if not r.ok]
    assert not failed, "\n".join(failed)
    for r in results:
        assert "cubin" in r.stages and 0 <= r.shared <= aot.SHARED_LIMIT[r.job.target]
        # ptxas -v's registers and spills, and the occupancy they allow, for every job
        assert 0 < r.registers <= aot.MAX_REGISTERS
        assert 0 < r.warps_per_sm <= aot.MAX_WARPS_PER_SM and r.warps_per_sm % r.num_warps == 0
    # no job spills registers to local memory (docs/GPU.md, "Registers and spills")
    spilling = [f"{r.job.describe()}: {r.spill} B at {r.registers} registers"
                for r in results if r.spill]
    assert not spilling, "\n".join(spilling)


def test_register_and_spill_report_and_the_max_spill_limit():
    """ptxas -v parsing, the occupancy arithmetic, and --max-spill failing a spilling job (the
    elementwise BatchNorm kernel with a 256x256 block, 256 float64 elements per thread)."""
    log = ("ptxas info    : Function properties for k\n    24 bytes stack frame, 16 bytes spill "
           "stores, 8 bytes spill loads\nptxas info    : Used 255 registers, used 1 barriers")
    assert aot._parse_ptxas(log) == dict(registers=255, stack=24, spill_stores=16,
                                         spill_loads=8)
    assert aot.occupancy(255, 4, 0, "sm_90") == 8  # 8192 registers per warp
    assert aot.occupancy(32, 4, 0, "sm_80") == 64  # capped at 64 warps
    assert aot.occupancy(64, 8, 100 * 1024, "sm_90") == 16  # two blocks fit the shared memory
    job = aot.Job("train_bn", "default", 0, "fp64", "apply", "sm_90",
                  override=(("BLOCK_M", 256), ("BLOCK_N", 256)))
    (r,) = aot.run_check([job], processes=1)
    assert r.ok and r.spill > 0  # (ptxas gives up here: 32 registers, 57 KB of spills)
    (r,) = aot.limit_spill([r], 0)
    assert not r.ok and "--max-spill allows 0" in r.error
    assert aot.summary([r])["sm_90"]["spilling"] == 1


def test_a_dot_below_16_is_rejected_by_the_compiler_but_not_by_the_interpreter(monkeypatch):
    """A deliberately broken config: 8-pixel blocks make the forward's tl.dot reduce over 8,
    which fp16/bf16 tensor-core dots do not allow (float32 ones, 8-deep TF32, do). The
    interpreter runs it (and even gets the right answer); the compile check fails it."""
    broken = dict(BLOCK_K=16, BLOCK_C=16, BLOCK_N=8)
    monkeypatch.setitem(configs.INTERPRETER_CONFIG, "gather_partials", broken)
    probs, feats = torch.randn(1, 3, 5, 7) * 3, torch.randn(1, 6, 5, 7)
    out = ocrkernels.spatial_gather(probs, feats, backend="triton")
    assert rel_err(out, reference.spatial_gather(probs.double(), feats.double())) < 1e-5

    jobs = [aot.Job("gather_partials", "default", 0, dtype, "K19", target,
                    override=tuple(broken.items()))
            for dtype in ("fp16", "bf16") for target in ("sm_80", "sm_90")]
    results = aot.run_check(jobs, processes=2)
    for r in results:
        assert not r.ok, r.job.describe()
        assert "K >= 16" in r.error, r.error
    # the same jobs without the override compile: the failure is the config's
    fixed = [aot.Job(j.kernel, j.regime, j.config, j.dtype, j.spec, j.target) for j in jobs[:1]]
    assert aot.run_check(fixed, processes=1)[0].ok


def test_a_config_beyond_the_shared_memory_is_rejected():
    """128x128 tiles of the float32 backward need more shared memory than an H100 block has."""
    job = aot.Job("gather_backward", "small_k", 0, "fp32", "K19", "sm_90",
                  override=(("BLOCK_C", 128), ("BLOCK_N", 128)))
    (result,) = aot.run_check([job], processes=1)
    assert not result.ok
    assert "shared memory" in result.error and "sm_90 allows 232448" in result.error


def test_compile_in_an_interpreter_process_says_why():
    """This process imported Triton for the interpreter: compiling here must fail clearly (the
    check compiles in its own worker processes)."""
    result = aot.compile_job(aot.Job("gather_merge", "default", 0, "fp32", "K19", "sm_80"))
    assert not result.ok and "TRITON_INTERPRET=1" in result.error
