"""The Triton training-mode object attention, run by Triton's interpreter on the CPU
(TRITON_INTERPRET=1), against the reference block and the PyTorch training path
(README: "How a kernel is judged").

Shapes are small (the interpreter runs numpy per tile) but keep every masked edge: C, D and N
not multiples of the 16-wide tiles, K=1, K=19 above one 16-class tile, B > 1, N below one
block. bf16 runs with the dots upcast to float32 under the interpreter (its tl.dot treats bf16
as integers); tests/test_triton_aot.py compiles the native bf16 path for the GPU.

Low-precision criterion (README: "How a kernel is judged"): the error against a float64 run of the
same rounded parameters and inputs is at most 2x the error of the plain-PyTorch reference block run
in that dtype, for the output and for every gradient.
"""

from __future__ import annotations

import copy
import os

# Before Triton's first import in this process: Triton builds its library functions for the
# interpreter then (pytest imports no Triton before collecting these modules).
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")

import ocrkernels  # noqa: E402
from ocrkernels import attention_train as cpu_path  # noqa: E402
from ocrkernels.triton import attention_train as tat  # noqa: E402
from ocrkernels.triton import attention_train_ops as train_ops  # noqa: E402
from ocrkernels.triton import configs  # noqa: E402
from conftest import rel_err, saved_bytes  # noqa: E402
from test_attention_train import assert_same_training, chain_inputs, make_pair, step  # noqa: E402

EPS = (1e-5,) * 4


@pytest.fixture(autouse=True)
def _triton_backend(monkeypatch):
    """ObjectAttention picks its training path through backend "auto"; OCRKERNELS_BACKEND=triton
    makes that the Triton one, runnable on CPU tensors through the interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("OCRKERNELS_BACKEND", "triton")


def triton_chain(*args, recompute=False, groups=(None,) * 4):
    return tat.object_attention_train(*args, eps=EPS, groups=groups, recompute=recompute)


def cpu_chain(*args, recompute=False, groups=(None,) * 4):
    return cpu_path.object_attention_train(*args, eps=EPS, groups=groups, recompute=recompute)


def run_chain(fn, args, grad, **kw):
    """(out, running stats, gradients of every argument)."""
    args = [a.detach().requires_grad_() for a in args]
    out, running = fn(*args, **kw)
    return out.detach(), running, torch.autograd.grad(out, args, grad)


# ---- the module against the reference block ------------------------------------------------

# (B, C, D, K, H, W, recompute): B > 1 with N = 35 (two full blocks and a ragged one); K=1 and
# N = 18; K=19 over two class tiles with D above C; one image of 7 pixels (less than a block)
CASES = [
    (2, 24, 16, 5, 5, 7, False),
    (2, 24, 16, 5, 5, 7, True),
    (2, 20, 12, 1, 3, 6, True),
    (1, 18, 20, 19, 4, 5, False),
    (3, 17, 9, 3, 1, 7, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:6]))
                         + ("-recompute" if c[6] else "-keep"))
def test_training_step_matches_reference_fp32(case):
    """Output, feature and region gradients, every parameter gradient and every running
    buffer (README: "How a kernel is judged": 1e-4 relative to the scale)."""
    B, C, D, K, H, W, recompute = case
    fused, ref = make_pair(C, D, recompute=recompute)
    feats = torch.randn(B, C, H, W) * 2 + 0.5
    regions = torch.randn(B, C, K, 1)
    assert_same_training(fused, ref, feats, regions, tol=1e-4)


def test_the_module_runs_the_triton_chain_only_when_auto_resolves_to_triton(monkeypatch):
    """OCRKERNELS_BACKEND=triton: the Triton chain (CPU tensors, interpreter); without it the
    PyTorch/C++ chain, and the two agree."""
    calls = []
    real = tat.object_attention_train

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(tat, "object_attention_train", spy)
    fused, _ = make_pair(16, 8)
    other = copy.deepcopy(fused)
    feats, regions = torch.randn(1, 16, 3, 4), torch.randn(1, 16, 2, 1)
    got = fused(feats, regions)
    assert len(calls) == 1
    monkeypatch.delenv("OCRKERNELS_BACKEND")
    want = other(feats, regions)
    assert len(calls) == 1
    # CUDA tensors without Triton resolve to "cuda" or "reference": the PyTorch chain
    monkeypatch.setattr(ocrkernels.backends, "resolve_backend", lambda backend, device: "cuda")
    copy.deepcopy(other)(feats, regions)
    assert len(calls) == 1
    assert rel_err(got, want) < 1e-5
    assert rel_err(fused.bottleneck.bn.running_var, other.bottleneck.bn.running_var) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_error_at_most_twice_reference(dtype):
    """fp16 / bf16 maps and products (bf16 products upcast under the interpreter), float32
    statistics and accumulation: every error vs float64 at most 2x the reference's."""
    fused, ref = make_pair(32, 16)
    fused.to(dtype)
    ref.to(dtype)
    exact_block = copy.deepcopy(ref).double()
    feats = torch.randn(2, 32, 5, 6).to(dtype)
    regions = torch.randn(2, 32, 4, 1).to(dtype)
    grad = torch.randn(2, 32, 5, 6).to(dtype)
    exact = step(exact_block, feats.double(), regions.double(), grad.double())
    got = step(fused, feats, regions, grad)
    plain = step(ref, feats, regions, grad)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    tiny = torch.finfo(dtype).eps
    for i, name in enumerate(("out", "feats grad", "regions grad")):
        assert rel_err(got[i], exact[i]) <= 2 * rel_err(plain[i], exact[i]) + tiny, name
    for name in exact[3]:
        assert rel_err(got[3][name], exact[3][name]) <= (
            2 * rel_err(plain[3][name], exact[3][name]) + tiny), name


# ---- the function against the PyTorch chain ------------------------------------------------

@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
def test_float64_matches_the_pytorch_chain(recompute):
    """Same signature, same result: out, running statistics and all 15 gradients."""
    args = chain_inputs(B=2, C=20, D=12, K=5, N=37)
    grad = torch.randn(2, 20, 37, dtype=torch.float64)
    got = run_chain(triton_chain, args, grad, recompute=recompute)
    want = run_chain(cpu_chain, args, grad, recompute=recompute)
    assert got[0].dtype == torch.float64 and len(got[1]) == 8
    assert rel_err(got[0], want[0]) < 1e-12
    for a, b in zip(got[1], want[1]):
        assert a.dtype == torch.float64 and rel_err(a, b) < 1e-12
    for i, (a, b) in enumerate(zip(got[2], want[2])):
        assert a.shape == b.shape and rel_err(a, b) < 1e-12, i


@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
def test_gradcheck_float64(recompute):
    # fast_mode: a random projection of the Jacobian, a few interpreted runs per input
    args = chain_inputs(B=2, C=5, D=3, K=2, N=3)
    assert torch.autograd.gradcheck(lambda *a: triton_chain(*a, recompute=recompute)[0], args,
                                    eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_non_contiguous_x_and_weights_and_determinism():
    """x as a transposed view (strided pixel axis), weights as transposed views; two runs
    give the same bits (no atomics; fixed-order merges)."""
    args = list(chain_inputs(B=2, C=16, D=8, K=3, N=21, dtype=torch.float32))
    contiguous = [a.detach().clone() for a in args]
    args[0] = args[0].detach().transpose(1, 2).contiguous().transpose(1, 2)  # (B, C, N), stride C
    args[11] = args[11].detach().t().contiguous().t()  # wc
    assert not args[0].is_contiguous() and not args[11].is_contiguous()
    grad = torch.randn(2, 16, 21)
    first = run_chain(triton_chain, args, grad)
    second = run_chain(triton_chain, args, grad)
    want = run_chain(cpu_chain, contiguous, grad)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[2], second[2]))
    assert rel_err(first[0], want[0]) < 1e-5
    for a, b in zip(first[2], want[2]):
        assert rel_err(a, b) < 1e-4


def test_recompute_keeps_z4_only_and_gives_the_bits_of_keep(monkeypatch):
    """recompute=True keeps z4 (C values per pixel) besides the inputs and the per-channel
    vectors, and recomputes z1, z2, A and z3 in backward with the forward's launches, never
    the z4 GEMM: out and all 15 gradients equal the keep mode's bit for bit."""
    B, C, D, K, N = 2, 12, 8, 3, 21
    args = [a.detach().requires_grad_() for a in
            chain_inputs(B=B, C=C, D=D, K=K, N=N, dtype=torch.float32)]
    grad = torch.randn(B, C, N)
    vectors = 4 * 6 * (2 * D + 2 * C)  # (6, channels) float32 per BatchNorm
    per_pixel = {True: C, False: 2 * D + K + 2 * C}
    for recompute, elements in per_pixel.items():
        kept = saved_bytes(lambda: triton_chain(*args, recompute=recompute), exclude=args)
        assert kept == 4 * B * N * elements + vectors, (recompute, kept)

    launches = []
    real = train_ops.launch

    def spy(name, grid, args_, device, regime, config=None, **constexprs):
        launches.append((name, constexprs.get("PRO"), constexprs.get("HAS_Y2")))
        return real(name, grid, args_, device, regime, config, **constexprs)

    monkeypatch.setattr(train_ops, "launch", spy)
    keep = run_chain(triton_chain, args, grad)
    launches.clear()
    out, _ = triton_chain(*args, recompute=True)
    forward = list(launches)
    launches.clear()
    grads = torch.autograd.grad(out, args, grad)
    z4_gemm = ("train_gemm", 1, True)  # z4 = Wc bn_relu3(z3) + Wx x
    assert z4_gemm in forward and z4_gemm not in launches
    assert launches[:3] == forward[:3]  # z1, z2, then A and z3
    assert [name for name, *_ in forward[:3]] == ["train_gemm", "train_gemm",
                                                  "train_attention"]
    assert torch.equal(out, keep[0])
    for i, (a, b) in enumerate(zip(grads, keep[2])):
        assert torch.equal(a, b), i


def test_sync_batchnorm_reduces_statistics_and_gradient_sums(monkeypatch):
    """With a process group, the per-channel moments and gradient sums go through
    dist.all_reduce exactly as on the PyTorch path. A stand-in all-reduce adds a second rank's
    contribution (7 elements per channel with made-up moments and gradient sums): both paths
    must agree on the output, the running statistics (global count in the Bessel factor) and
    every gradient, and differ from the local run."""
    import torch.distributed as dist

    calls = []

    def all_reduce(t, group=None):
        calls.append(group)
        g = torch.Generator().manual_seed(len(t) * 100 + t.shape[1])
        if len(t) == 3:  # (n, n mean, n (var + mean^2)) of batch_stats
            mean, var = torch.randn(t.shape[1], generator=g), torch.rand(t.shape[1], generator=g)
            t.add_(7 * torch.stack([torch.ones_like(mean), mean, var + mean * mean]).to(t))
        else:  # (sum g, sum g xhat) of the backward
            t.add_(torch.randn(t.shape, generator=g).to(t))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    args = chain_inputs(B=1, C=12, D=8, K=3, N=9)
    grad = torch.randn(1, 12, 9, dtype=torch.float64)
    groups = ("g1", "g2", "g3", "g4")
    got = run_chain(triton_chain, args, grad, groups=groups)
    assert calls == list(groups) + list(groups[::-1])
    want = run_chain(cpu_chain, args, grad, groups=groups)
    local = run_chain(triton_chain, args, grad)
    assert rel_err(got[0], want[0]) < 1e-12
    for a, b in zip(got[1], want[1]):
        assert rel_err(a, b) < 1e-12
    for a, b in zip(got[2], want[2]):
        assert rel_err(a, b) < 1e-12
    assert rel_err(got[0], local[0]) > 1e-3 and rel_err(got[2][0], local[2][0]) > 1e-3


def test_frozen_weights_get_no_gradient():
    args = [a.detach() for a in chain_inputs(B=1, C=8, D=4, K=2, N=10)]
    for i in (0, 1, 7):  # x, w1 and the keys need gradients, nothing else
        args[i].requires_grad_()
    out, _ = triton_chain(*args)
    out.sum().backward()
    assert all(a.grad is not None for i, a in enumerate(args) if i in (0, 1, 7))
    assert all(a.grad is None for i, a in enumerate(args) if i not in (0, 1, 7))


# ---- the ops: opcheck, torch.compile, bad arguments ----------------------------------------

def _vec(ch, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(6, ch, generator=g, dtype=dtype) * 0.2
    v[1] += 1.0  # scale
    v[3] = v[3].abs() + 0.5  # invstd
    return v


def _op_cases():
    B, M, J, N, K = 2, 9, 7, 19, 3
    y, z = torch.randn(B, J, N), torch.randn(B, J, N)
    w, w2, y2 = torch.randn(M, J), torch.randn(M, 5), torch.randn(B, 5, N)
    zo = torch.randn(B, M, N)
    ops = torch.ops.ocrkernels_triton
    return [
        (ops.train_gemm.default, (w, y, 0, None, None, None, None, 1, None, None)),
        (ops.train_gemm.default, (w, y, 1, None, _vec(J), w2, y2, 1, None, None)),
        (ops.train_gemm.default, (w.t().contiguous().t(), y, 2, z, _vec(J), None, None, 2, zo,
                                  _vec(M, 1))),
        (ops.train_attention.default, (z, _vec(J), torch.randn(B, K, J), torch.randn(B, M, K))),
        (ops.train_attention_backward.default, (zo, torch.randn(B, M, N), _vec(M),
                                                torch.randn(B, M, K),
                                                torch.softmax(torch.randn(B, K, N), 1))),
        (ops.train_wgrad.default, (zo, torch.randn(B, M, N), _vec(M), y, _vec(J), False)),
        (ops.train_wgrad.default, (zo, None, None, y, None, True)),
        (ops.train_bn_relu.default, (zo, _vec(M))),
        (ops.train_bn_relu_backward_reduce.default, (y, z, _vec(J))),
        (ops.train_bn_relu_backward_apply.default, (y, z, _vec(J))),
    ]


def test_opcheck_every_op():
    for op, args in _op_cases():
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor",
                                                    "test_aot_dispatch_dynamic"))


def test_ops_match_torch():
    """Each op against its definition in plain PyTorch (float64)."""
    col = lambda v: v[:, None]  # noqa: E731
    ops = torch.ops.ocrkernels_triton
    B, M, J, N = 2, 9, 7, 19
    y, z = torch.randn(B, J, N, dtype=torch.float64), torch.randn(B, J, N, dtype=torch.float64)
    w = torch.randn(M, J, dtype=torch.float64)
    v, vo = _vec(J, dtype=torch.float64), _vec(M, 1, dtype=torch.float64)
    zo = torch.randn(B, M, N, dtype=torch.float64)
    h = ((y - col(v[0])) * col(v[1]) + col(v[2])).clamp_min(0)
    out, stats = ops.train_gemm(w, y, 1, None, v, None, None, 1, None, None)
    assert rel_err(out, w @ h) < 1e-13
    var, mean = torch.var_mean(w @ h, dim=(0, 2), unbiased=False)
    assert rel_err(stats[0], mean) < 1e-13 and rel_err(stats[1], var) < 1e-13
    dz = col(v[1]) * (y - col(v[4]) - (z - col(v[0])) * col(v[3]) * col(v[5]))
    g, sums = ops.train_gemm(w, y, 2, z, v, None, None, 2, zo, vo)
    hz = (zo - col(vo[0])) * col(vo[1]) + col(vo[2])
    want_g = (w @ dz) * (hz > 0)
    xhat = (zo - col(vo[0])) * col(vo[3])
    assert rel_err(g, want_g) < 1e-13
    assert rel_err(sums, torch.stack([want_g.sum((0, 2)), (want_g * xhat).sum((0, 2))])) < 1e-13
    dw = ops.train_wgrad(zo, None, None, y, v, False)
    assert rel_err(dw, torch.einsum("bmn,bjn->mj", zo, h)) < 1e-13
    per_image = ops.train_wgrad(y, z, v, zo, None, True)
    assert rel_err(per_image, torch.einsum("bjn,bmn->bjm", dz, zo)) < 1e-13


def test_torch_compile_training_step_matches_eager():
    fused, _ = make_pair(16, 8, recompute=True)
    eager = copy.deepcopy(fused)
    feats, regions = torch.randn(2, 16, 3, 5), torch.randn(2, 16, 3, 1)
    grad = torch.randn(2, 16, 3, 5)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    got = step(compiled, feats, regions, grad)
    want = step(eager, feats, regions, grad)
    for a, b in zip(got[:3], want[:3]):
        assert torch.equal(a, b)
    for name in want[3]:
        assert torch.equal(got[3][name], want[3][name]), name
    assert torch.equal(fused.bottleneck.bn.running_var, eager.bottleneck.bn.running_var)


@pytest.mark.parametrize("bad", ["x_rank", "w1", "keys", "values", "wx", "g3", "dtype",
                                 "int_dtype", "eps"])
def test_bad_arguments_raise_clear_errors(bad):
    args = list(chain_inputs(B=1, C=6, D=4, K=2, N=5, dtype=torch.float32))
    kw = {}
    names = ["x", "w1", "g1", "b1", "w2", "g2", "b2", "keys", "values", "g3", "b3", "wc",
             "wx", "g4", "b4"]
    i = {n: k for k, n in enumerate(names)}
    match = f"{bad} must have shape"
    if bad == "x_rank":
        args[0], match = args[0][0], "x must be a non-empty"
    elif bad in ("w1", "keys", "values", "wx", "g3"):
        args[i[bad]] = args[i[bad]][..., :-1]
    elif bad == "dtype":
        args[i["b2"]], match = args[i["b2"]].double(), "dtype of x"
    elif bad == "int_dtype":
        args = [a.detach().to(torch.int32) for a in args]
        match = "float32, float64, float16 or bfloat16"
    else:
        kw["eps"], match = (1e-5,) * 3, "one entry per BatchNorm"
    with pytest.raises(RuntimeError, match=match):
        tat.object_attention_train(*args, eps=kw.get("eps", EPS))


def test_raw_op_rejects_a_bad_vector():
    y, w = torch.randn(1, 4, 6), torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="y_vec must have shape"):
        train_ops.train_gemm(w, y, 1, None, torch.zeros(6, 5), None, None, 1, None, None)
    with pytest.raises(RuntimeError, match=r"y_vec must have dtype torch.float32"):
        train_ops.train_gemm(w, y, 1, None, torch.zeros(6, 4, dtype=torch.float64), None, None,
                             1, None, None)


def test_statistics_blocks_are_shared_by_every_config_of_a_regime():
    """The pixel block shapes the per-block partials: never tuned."""
    for kernel in ("train_gemm", "train_attention", "train_attention_bwd", "train_bn"):
        for cfgs in configs.CONFIGS[kernel].values():
            assert len({c.kwargs["BLOCK_N"] for c in cfgs}) == 1


def test_every_launched_mode_is_compiled_ahead_of_time(monkeypatch):
    """The constexpr modes the launch code uses (both recompute settings, all gradients) are
    exactly the ones tests/test_triton_aot.py compiles (aot.MODES)."""
    from ocrkernels.triton import aot
    from ocrkernels.triton import spatial_gather as tsg

    seen = {name: set() for name in aot.MODES}
    real = tsg.launch

    def spy(name, grid, args, device, regime, config=None, **constexprs):
        if name in aot.MODES:
            mode = {k: constexprs[k] for k in next(iter(aot.MODES[name].values()))}
            seen[name].add(next(m for m, v in aot.MODES[name].items() if v == mode))
        return real(name, grid, args, device, regime, config, **constexprs)

    monkeypatch.setattr(train_ops, "launch", spy)
    for recompute in (False, True):
        args = chain_inputs(B=1, C=6, D=4, K=2, N=5, dtype=torch.float32)
        out, _ = triton_chain(*args, recompute=recompute)
        out.sum().backward()
    assert seen == {name: set(modes) for name, modes in aot.MODES.items()}
