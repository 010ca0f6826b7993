"""Non-finite numbers (README: "How a kernel is judged"): every fused kernel, on every backend, in
eval, in the training forward and in backward, puts NaN, +inf and -inf exactly where the
plain-PyTorch reference puts them, and the reference's finite values everywhere else. One bad
pixel, class, weight or BatchNorm statistic must surface in the outputs as it does in PyTorch,
never as plausible finite numbers (a ReLU that maps NaN to 0 would hide a diverging run or a
corrupt checkpoint).

The grid: op (spatial gather; the object attention block in eval, training with kept
activations, training with recompute; the whole OCR head in eval and training) x backend (the
C++ CPU kernels; Triton under its interpreter; CUDA where a GPU is present) x what goes wrong
(NaN, +inf, -inf at one pixel of the features, in the logits at one pixel or a whole class, in
a weight, in a BatchNorm statistic; huge finite features and logits). The C++ kernels' AVX2 and
baseline paths run the CPU part of the grid in subprocesses (test_every_instruction_set_...).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

# Before Triton's first import in this process (see tests/test_triton_spatial_gather.py).
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import ocrkernels  # noqa: E402
from conftest import REPO  # noqa: E402
from test_modules import randomise_batchnorm  # noqa: E402

# Triton's interpreter runs the kernels in numpy, which warns where inf - inf and the like make
# the NaN that these tests expect.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

needs_ext = pytest.mark.skipif(not ocrkernels.ops.extension_loaded(),
                               reason="ocrkernels._C is not built")


def _triton_missing() -> str | None:
    from ocrkernels.triton import triton_import_error

    return triton_import_error()


BACKENDS = [
    pytest.param("cpu", marks=needs_ext),
    pytest.param("triton", marks=pytest.mark.skipif(
        _triton_missing() is not None, reason=f"Triton is not importable: {_triton_missing()}")),
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest -m gpu on one)")]),
]


def device_of(backend: str) -> torch.device:
    """Triton runs on CPU tensors through its interpreter here; CUDA on the GPU."""
    return torch.device("cuda" if backend == "cuda" else "cpu")


@pytest.fixture
def use_backend(monkeypatch):
    """Make `auto` (what the modules ask for) resolve to the backend under test."""

    def select(backend: str) -> torch.device:
        monkeypatch.setenv("OCRKERNELS_BACKEND", backend)
        return device_of(backend)

    return select


def assert_same_nonfinite(got: torch.Tensor, want: torch.Tensor, what: str,
                          tol: float = 1e-4, exact: torch.Tensor | None = None) -> None:
    """NaN, +inf and -inf at the same places as the reference `want`, and the finite values
    within `tol` of the reference's, relative to the largest finite reference value (README,
    "How a kernel is judged"). Where a float64 run `exact` is given (inputs so large that
    float32 itself is ill-conditioned), the finite values may instead be off by up to twice the
    reference's own error against it (the README's low-precision criterion)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)}, want {tuple(want.shape)}"
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    for name, mask in (("NaN", torch.isnan), ("+inf", torch.isposinf),
                       ("-inf", torch.isneginf)):
        g, w = mask(got), mask(want)
        if not torch.equal(g, w):
            first = (g != w).nonzero()[0].tolist()
            raise AssertionError(
                f"{what}: {name} at {int(g.sum())} of {got.numel()} places, the reference at "
                f"{int(w.sum())}; first difference at {first}: got {got[tuple(first)].item()}, "
                f"reference {want[tuple(first)].item()}")
    finite = torch.isfinite(want)
    if not finite.any():
        return
    scale = want[finite].abs().max().clamp_min(1e-30)
    err = (got[finite] - want[finite]).abs().max()
    if exact is not None and err > tol * scale:
        exact = exact.detach().double().cpu()[finite]
        err, ref_err = ((got[finite] - exact).abs().max(),
                        (want[finite] - exact).abs().max())
        assert err <= 2 * ref_err, (f"{what}: off the float64 result by {err:.3g}, the float32 "
                                    f"reference by {ref_err:.3g}")
        return
    assert err <= tol * scale, f"{what}: finite values off by {err:.3g} (scale {scale:.3g})"


# ---- spatial gather ---------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


def _set(name: str, index: tuple, value: float):
    def apply(t: dict) -> None:
        t[name][index] = value
    return apply


def _class_row(value: float):
    def apply(t: dict) -> None:  # one class of image 1, every pixel
        t["probs"][1, 0] = value
    return apply


def _half_class(t: dict) -> None:
    """-inf over the first half of one class's pixels (masked logits): the pixel chunks of
    that half see only -inf, the row's softmax comes from the other half."""
    row = t["probs"][0, 1].view(-1)
    row[: row.numel() // 2] = -INF


def _huge_logits(t: dict) -> None:
    t["probs"].copy_(torch.sign(t["probs"]) * 1e4)


def _huge_feature(t: dict) -> None:
    t["feats"][0, 2, 1, 3] = 1e30
    t["feats"][1, 0, 2, 2] = -1e30


GATHER_CASES = {
    "feats-nan": _set("feats", (0, 1, 2, 3), NAN),
    "feats-posinf": _set("feats", (0, 1, 2, 3), INF),
    "feats-neginf": _set("feats", (1, 2, 0, 1), -INF),
    "feats-inf-both-signs": lambda t: (_set("feats", (0, 1, 2, 3), INF)(t),
                                       _set("feats", (0, 1, 4, 4), -INF)(t)),
    "logit-nan": _set("probs", (1, 2, 3, 4), NAN),
    "logit-posinf": _set("probs", (1, 2, 3, 4), INF),
    "logit-neginf": _set("probs", (0, 2, 3, 4), -INF),
    "class-nan": _class_row(NAN),
    "class-neginf": _class_row(-INF),  # softmax of an all -inf row: NaN in PyTorch
    "class-half-neginf": _half_class,
    "grad-nan": _set("grad", (0, 1, 2, 0), NAN),
    "grad-inf": _set("grad", (1, 0, 1, 0), INF),
    "huge-logits": _huge_logits,
    "huge-feature": _huge_feature,
}

# (B, K, C, H, W): 576 pixels are three of the C++ kernel's pixel chunks and many Triton
# blocks; K = 19 spans two 16-class tiles
GATHER_SHAPES = [(2, 5, 7, 24, 24), (2, 19, 16, 5, 7)]


def gather_inputs(B, K, C, H, W, dtype, device):
    g = torch.Generator().manual_seed(0)
    return {"probs": (torch.randn(B, K, H, W, generator=g) * 3).to(dtype).to(device),
            "feats": torch.randn(B, C, H, W, generator=g).to(dtype).to(device),
            "grad": torch.randn(B, C, K, 1, generator=g).to(dtype).to(device)}


def gather_step(inputs: dict, backend: str):
    p = inputs["probs"].clone().requires_grad_()
    f = inputs["feats"].clone().requires_grad_()
    out = ocrkernels.spatial_gather(p, f, backend=backend)
    gp, gf = torch.autograd.grad(out, (p, f), inputs["grad"])
    return out, gp, gf


@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", list(GATHER_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_spatial_gather(backend, case, shape):
    device = device_of(backend)
    inputs = gather_inputs(*shape, torch.float32, device)
    GATHER_CASES[case](inputs)
    got = gather_step(inputs, backend)
    want = gather_step(inputs, "reference")
    for name, g, w in zip(("output", "grad probs", "grad feats"), got, want):
        assert_same_nonfinite(g, w, f"{backend} {case} {name}")


@needs_ext
@pytest.mark.parametrize("case", ["feats-nan", "feats-posinf", "class-neginf",
                                  "class-half-neginf", "logit-posinf"])
def test_spatial_gather_float64(case):
    inputs = gather_inputs(2, 5, 7, 24, 24, torch.float64, "cpu")
    GATHER_CASES[case](inputs)
    for name, g, w in zip(("output", "grad probs", "grad feats"), gather_step(inputs, "cpu"),
                          gather_step(inputs, "reference")):
        assert_same_nonfinite(g, w, f"float64 {case} {name}", tol=1e-10)


# ---- object attention and the OCR head -----------------------------------------------------

def _module_set(path: str, index: tuple, value: float):
    """Write `value` into the parameter or buffer at `path` of the module under test."""
    def apply(block: torch.nn.Module, t: dict) -> None:
        module_path, name = path.rsplit(".", 1)
        with torch.no_grad():
            getattr(block.get_submodule(module_path), name)[index] = value
    return apply


def _input_set(name: str, index: tuple, value: float):
    def apply(block: torch.nn.Module, t: dict) -> None:
        t[name][index] = value
    return apply


# What goes wrong inside the block, run in every mode: weights of the pixel path (fused) and of
# the K-column path (PyTorch in both), BatchNorm affine parameters, and running statistics
# (read in eval, updated in training).
ATTENTION_CASES = {
    "feats-nan": _input_set("feats", (0, 3, 2, 5), NAN),
    "feats-posinf": _input_set("feats", (0, 3, 2, 5), INF),
    "feats-neginf": _input_set("feats", (1, 0, 4, 1), -INF),
    "regions-nan": _input_set("regions", (1, 2, 3, 0), NAN),
    "regions-posinf": _input_set("regions", (0, 5, 1, 0), INF),
    "query-weight-nan": _module_set("query_project.0.conv.weight", (2, 3), NAN),
    "query-weight-posinf": _module_set("query_project.1.conv.weight", (1, 4), INF),
    "key-weight-neginf": _module_set("key_project.0.conv.weight", (0, 1), -INF),
    "out-weight-posinf": _module_set("out_project.conv.weight", (3, 2), INF),
    "bottleneck-weight-nan": _module_set("bottleneck.conv.weight", (4, 20), NAN),
    "bn-weight-nan": _module_set("query_project.1.bn.weight", (2,), NAN),
    "bn-bias-neginf": _module_set("bottleneck.bn.bias", (5,), -INF),
    "running-var-nan": _module_set("query_project.0.bn.running_var", (1,), NAN),
    "running-mean-posinf": _module_set("out_project.bn.running_mean", (2,), INF),
    "running-var-posinf": _module_set("bottleneck.bn.running_var", (3,), INF),
    "huge-feature": _input_set("feats", (0, 3, 2, 5), 1e30),
}

C, D, K, H, W = 16, 8, 5, 5, 7


def attention_pair(dtype, device, recompute):
    torch.manual_seed(0)
    fused = ocrkernels.ObjectAttention(C, D, fused=True, recompute=recompute)
    randomise_batchnorm(fused)
    fused = fused.to(dtype).to(device)
    ref = copy.deepcopy(fused)
    ref.fused = False
    return fused, ref


def module_step(module, inputs: dict, mode: str, grad_out=None):
    """eval: the output without autograd. train: output, input gradients, parameter gradients,
    and every buffer after the step, as {name: tensor}."""
    if mode == "eval":
        module.eval()
        with torch.no_grad():
            return {"output": module(*inputs.values())}
    module.train()
    args = [t.clone().requires_grad_() for t in inputs.values()]
    out = module(*args)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad(out, args + params, grad_out, allow_unused=True)
    res = {"output": out}
    res.update({f"grad {n}": g for n, g in zip(inputs, grads)})
    res.update({f"grad {n}": g for (n, _), g in zip(module.named_parameters(),
                                                        grads[len(args):])})
    res.update({f"buffer {n}": b for n, b in module.named_buffers()
                if b.dtype.is_floating_point})
    return res


def assert_steps_agree(got: dict, want: dict, what: str, exact: dict | None = None) -> None:
    assert got.keys() == want.keys()
    for name in want:
        if want[name] is None:
            assert got[name] is None, f"{what} {name}"
            continue
        assert_same_nonfinite(got[name], want[name], f"{what} {name}",
                              exact=None if exact is None else exact[name])


def float64_step(ref: torch.nn.Module, inputs: dict, mode: str, grad_out) -> dict:
    """The reference step in float64, for the cases whose float32 runs are ill-conditioned."""
    return module_step(copy.deepcopy(ref).double(), {n: t.double() for n, t in inputs.items()},
                       mode, grad_out.double())


MODES = ["eval", "train-keep", "train-recompute"]


def check_attention_case(case: str, mode: str, dtype: torch.dtype, device, what: str) -> None:
    fused, ref = attention_pair(dtype, device, mode == "train-recompute")
    g = torch.Generator().manual_seed(3)
    inputs = {"feats": torch.randn(2, C, H, W, generator=g).to(dtype).to(device),
              "regions": torch.randn(2, C, K, 1, generator=g).to(dtype).to(device)}
    grad_out = torch.randn(2, C, H, W, generator=g).to(dtype).to(device)
    ATTENTION_CASES[case](fused, inputs)
    ATTENTION_CASES[case](ref, inputs)
    mode_name = "eval" if mode == "eval" else "train"
    assert_steps_agree(module_step(fused, inputs, mode_name, grad_out),
                       module_step(ref, inputs, mode_name, grad_out), what)


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_object_attention(backend, mode, case, use_backend):
    device = use_backend(backend)
    check_attention_case(case, mode, torch.float32, device, f"{backend} {mode} {case}")


@needs_ext
@pytest.mark.parametrize("case", ["feats-nan", "feats-posinf", "query-weight-nan",
                                  "running-var-nan", "bn-weight-nan"])
@pytest.mark.parametrize("mode", MODES)
def test_object_attention_float64(mode, case, use_backend):
    """The C++ kernels' float64 build (the portable loops, no AVX tiles)."""
    check_attention_case(case, mode, torch.float64, use_backend("cpu"), f"float64 {mode} {case}")


@needs_ext
@pytest.mark.parametrize("case", ["out-weight-posinf", "bottleneck-weight-nan", "regions-posinf",
                                  "huge-feature"])
@pytest.mark.parametrize("mode", MODES)
def test_up_projection_without_the_finite_shortcut(mode, case, use_backend, monkeypatch):
    """On CPU tensors in eager mode a finite out_project weight takes the plain product; the
    split product (what compiled graphs, fake tensors and CUDA run, reading no value back) must
    be exact too, for infinite weights and finite ones."""
    from ocrkernels import ops

    monkeypatch.setattr(ops, "_reads_values_cheaply", lambda t: False)
    check_attention_case(case, mode, torch.float32, use_backend("cpu"), f"split {mode} {case}")


# ---- the eval op itself: the softmax over K of rows that are all -inf or hold +inf --------

def eval_op_reference(x, qw1, qb1, qw2, qb2, keys, values, wctx, wx, bout):
    """The semantics of ocrkernels::object_attention_eval (csrc/ocrkernels/ops.cpp) in plain
    PyTorch, per image: x (C, N)."""
    q1 = torch.relu(qw1 @ x + qb1[:, None])
    q2 = torch.relu(qw2 @ q1 + qb2[:, None])
    attn = torch.softmax(keys @ q2, dim=0)  # K, N
    return torch.relu(wctx @ torch.relu(values @ attn) + wx @ x + bout[:, None])


def eval_op(backend: str):
    if backend == "triton":
        from ocrkernels.triton.object_attention import object_attention_eval
        return object_attention_eval
    return torch.ops.ocrkernels.object_attention_eval


def _keys_column(value: float):
    def apply(args: list) -> None:  # one key channel of every class of image 0
        args[5][0, :, 1] = value
    return apply


EVAL_OP_CASES = {
    # q2[1] > 0 at a pixel: every similarity -inf, softmax NaN; q2[1] = 0: -inf * 0 = NaN
    "keys-column-neginf": _keys_column(-INF),
    "keys-column-posinf": _keys_column(INF),
    "key-posinf": lambda args: args[5].__setitem__((1, 2, 3), INF),
    "values-nan": lambda args: args[6].__setitem__((0, 4, 1), NAN),
    "bias-neginf": lambda args: args[2].__setitem__((3,), -INF),
}


@pytest.mark.parametrize("case", list(EVAL_OP_CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_object_attention_eval_op(backend, case):
    device = device_of(backend)
    g = torch.Generator().manual_seed(5)
    B, N = 2, 37

    def rand(*shape, scale=0.5):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    args = [rand(B, C, N, 1, scale=1.0), rand(D, C), rand(D), rand(D, D), rand(D),
            rand(B, K, D), rand(B, C, K), rand(C, C), rand(C, C), rand(C)]
    EVAL_OP_CASES[case](args)
    got = eval_op(backend)(*args)
    want = torch.stack([eval_op_reference(args[0][b, :, :, 0], *args[1:5], args[5][b],
                                          args[6][b], *args[7:]) for b in range(B)])
    assert_same_nonfinite(got[..., 0], want, f"{backend} {case}")


HEAD_CASES = {
    "feats-nan": _input_set("feats", (0, 3, 2, 5), NAN),
    "feats-posinf": _input_set("feats", (0, 3, 2, 5), INF),
    "feats-neginf": _input_set("feats", (1, 7, 6, 0), -INF),
    "logit-nan": _input_set("logits", (1, 4, 3, 3), NAN),
    "logit-posinf": _input_set("logits", (0, 2, 7, 7), INF),
    "class-neginf": lambda m, t: t["logits"][1, 6].fill_(-INF),
    "huge-feature": _input_set("feats", (0, 3, 2, 5), 1e30),
    "huge-logits": lambda m, t: t["logits"].copy_(torch.sign(t["logits"]) * 1e4),
}


@pytest.mark.parametrize("case", list(HEAD_CASES))
@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_ocr_head(backend, mode, case, use_backend):
    """The head of the issue's example: OCRHead(32, 19, channels=16, ocr_channels=8) at 8x8,
    whose plain-PyTorch version turns one NaN pixel into NaN everywhere."""
    device = use_backend(backend)
    torch.manual_seed(0)
    fused = randomise_batchnorm(ocrkernels.OCRHead(32, 19, channels=16, ocr_channels=8))
    fused = fused.to(device)
    ref = copy.deepcopy(fused)
    ref.fused = False
    g = torch.Generator().manual_seed(4)
    inputs = {"feats": torch.randn(2, 32, 8, 8, generator=g).to(device),
              "logits": (torch.randn(2, 19, 8, 8, generator=g) * 3).to(device)}
    grad_out = torch.randn(2, 19, 8, 8, generator=g).to(device)
    HEAD_CASES[case](fused, inputs)
    # A 1e30 feature overflows the float32 variance of the head's first BatchNorm (in both
    # paths), which then outputs its bias at every pixel: the attention's batch statistics see
    # channels of zero variance, where rounding decides; float64 is the yardstick there.
    exact = float64_step(ref, inputs, mode, grad_out) if case == "huge-feature" else None
    assert_steps_agree(module_step(fused, inputs, mode, grad_out),
                       module_step(ref, inputs, mode, grad_out), f"{backend} {mode} {case}",
                       exact)


def test_one_nan_pixel_reaches_every_output_of_the_head(use_backend):
    """The hand-checked count: the gather mixes all pixels, so one NaN feature of image 0 makes
    all 19 x 64 outputs of image 0 NaN in eval, and (through the batch statistics) all 2 x 1216
    in training; image 1 stays finite in eval."""
    device = use_backend("cpu" if ocrkernels.ops.extension_loaded() else "reference")
    head = randomise_batchnorm(ocrkernels.OCRHead(32, 19, channels=16, ocr_channels=8))
    head = head.to(device)
    feats, logits = torch.randn(2, 32, 8, 8, device=device), torch.randn(2, 19, 8, 8,
                                                                         device=device)
    feats[0, 3, 2, 5] = NAN
    with torch.no_grad():
        out = head.eval()(feats, logits)
    assert out[0].isnan().sum() == 19 * 64 and out[1].isfinite().all()
    assert head.train()(feats, logits).isnan().sum() == 2 * 19 * 64


# ---- the C++ kernels' other instruction sets -----------------------------------------------

@needs_ext
@pytest.mark.parametrize("cap", ["avx2", "baseline"])
def test_every_instruction_set_gives_the_reference_nonfinite(cap):
    """The CPU part of this grid again with the kernels capped to AVX2+FMA and to the baseline
    x86-64 set (the choice is read once per process, hence a subprocess)."""
    env = {**os.environ, "OCRKERNELS_CPU_ISA": cap}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "cpu and not float64 and not instruction_set", "-x"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], \
        proc.stdout[-2000:]
