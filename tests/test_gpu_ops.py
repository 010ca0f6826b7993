"""Every op on a CUDA device: op x backend (triton, cuda) x dtype (fp32, fp16, bf16) x mode,
against the plain-PyTorch reference (README: "How a kernel is judged"; DESIGN §3).

Run it on a GPU machine in a process of its own::

    pytest -m gpu tests/test_gpu_ops.py

Its own process because the CPU test modules set ``TRITON_INTERPRET=1`` when they are imported
(Triton's interpreter is chosen when a kernel is defined), and the Triton kernels here must
run compiled. Within ``pytest tests`` on a GPU machine the Triton cases skip with that reason;
``make gpu-check`` runs this module on its own, then ``pytest -m gpu`` over the rest.

Judged, for the output, every input gradient, every parameter gradient and every BatchNorm
running buffer, against a float64 run on the CPU from the same rounded parameters and inputs:

* fp32: off by at most 1e-4 of the value's scale, or (where the float32 reference itself is
  further off: a ReLU input within rounding of 0 flips its mask) by at most twice the
  reference's own error;
* fp16 / bf16: at most twice the error of the reference run in that dtype on the same device.

Two fused runs of the same input give the same bits (deterministic reductions).

``OCRKERNELS_GPU_TEST_DEVICE=cpu`` runs the same grid for the Triton backend on CPU tensors
through the interpreter at tiny sizes (``make gpu-check`` with ``--dry-run``), which proves
this module's logic on a machine without a GPU; without a GPU and without that variable
every case skips with the reason.
"""

from __future__ import annotations

import copy
import os

DEVICE = os.environ.get("OCRKERNELS_GPU_TEST_DEVICE", "cuda")
if DEVICE == "cpu":  # the dry run: Triton's interpreter, chosen before Triton's first import
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import ocrkernels  # noqa: E402
from conftest import forward_backward, make_inputs, rel_err  # noqa: E402
from test_modules import randomise_batchnorm  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.filterwarnings("ignore::RuntimeWarning")]  # numpy under the interpreter

if DEVICE not in ("cuda", "cpu"):
    raise ValueError(f"OCRKERNELS_GPU_TEST_DEVICE must be 'cuda' or 'cpu', got {DEVICE!r}")

DRY = DEVICE == "cpu"
BACKENDS = ["triton"] if DRY else ["triton", "cuda"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _skip_reason(backend: str) -> str | None:
    if not DRY and not torch.cuda.is_available():
        return "needs a CUDA GPU (pytest -m gpu tests/test_gpu_ops.py on one)"
    if backend == "triton" and not DRY and os.environ.get("TRITON_INTERPRET") == "1":
        return ("Triton's interpreter is on in this process (a CPU test module set "
                "TRITON_INTERPRET=1 when it was imported): run `pytest -m gpu "
                "tests/test_gpu_ops.py` in a process of its own")
    return ocrkernels.backends.unavailable_reason(backend, torch.device(DEVICE))


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """The backend under test, also what ``auto`` (the modules' choice) resolves to."""
    reason = _skip_reason(request.param)
    if reason is not None:
        pytest.skip(reason)
    monkeypatch.setenv("OCRKERNELS_BACKEND", request.param)
    return request.param


@pytest.fixture(params=list(DTYPES))
def dtype(request):
    return DTYPES[request.param]


def judge(got, plain, exact, dtype, what: str) -> None:
    """The criterion of the module docstring for one tensor."""
    err, ref_err = rel_err(got, exact), rel_err(plain, exact)
    if dtype == torch.float32:
        bound = max(1e-4, 2 * ref_err)
    else:
        bound = 2 * ref_err + torch.finfo(dtype).eps
    assert err <= bound, (f"{what}: off float64 by {err:.3g}, the {dtype} reference by "
                          f"{ref_err:.3g} (bound {bound:.3g})")


def judge_all(got: dict, plain: dict, exact: dict, dtype) -> None:
    assert got.keys() == exact.keys()
    for name in exact:
        assert got[name].dtype == plain[name].dtype, name
        judge(got[name], plain[name], exact[name], dtype, name)


def assert_deterministic(first: dict, second: dict) -> None:
    for name, value in first.items():
        assert torch.equal(value, second[name]), f"{name}: two runs gave different bits"


def layout(x: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as x in another memory layout."""
    if how == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if how == "strided":  # every other column of a twice-as-wide map
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


def _inputs(*shape, scale: float = 1.0, offset: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64) * scale + offset


# ---- spatial gather ---------------------------------------------------------------------------

# (B, K, C, H, W): Cityscapes-like, K=1, ADE20K's 150 classes, pixels not a multiple of a block
GATHER_SHAPES = ([(2, 19, 24, 5, 7), (1, 150, 20, 4, 9)] if DRY else
                 [(2, 19, 512, 64, 128), (1, 1, 48, 13, 17), (3, 21, 80, 1, 1),
                  (2, 150, 512, 33, 65)])


def _gather_run(probs, feats, grad, dtype, device, how):
    out, gp, gf = forward_backward(ocrkernels.spatial_gather, layout(probs.to(device, dtype), how),
                                   layout(feats.to(device, dtype), how), grad.to(device, dtype))
    return {"out": out.detach(), "grad probs": gp, "grad feats": gf}


@pytest.mark.parametrize("shape", GATHER_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_spatial_gather(backend, dtype, shape):
    _check_gather(shape, dtype, "contiguous")


@pytest.mark.parametrize("how", ["channels_last", "strided"])
def test_spatial_gather_layouts(backend, dtype, how):
    _check_gather(GATHER_SHAPES[-1], dtype, how)


def _check_gather(shape, dtype, how):
    B, K, C, H, W = shape
    # the float64 truth and the dtype reference from the same rounded inputs
    probs, feats, grad = (t.double() for t in make_inputs(B, K, C, H, W, dtype))
    exact = _gather_run(probs, feats, grad, torch.float64, "cpu", "contiguous")
    got = _gather_run(probs, feats, grad, dtype, DEVICE, how)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OCRKERNELS_BACKEND", "reference")
        plain = _gather_run(probs, feats, grad, dtype, DEVICE, how)
    judge_all(got, plain, exact, dtype)
    assert_deterministic(got, _gather_run(probs, feats, grad, dtype, DEVICE, how))


# ---- object attention and the OCR head: eval and training ------------------------------------

# (B, C, D, K, H, W): the published C=512, D=256 at 1/4 of a 256x512 crop; K=1 (B=2: training
# BatchNorm needs more than one value per channel); odd sizes
BLOCK_SHAPES = ([(2, 20, 12, 5, 5, 7)] if DRY else
                [(2, 512, 256, 19, 64, 128), (2, 40, 24, 1, 13, 17), (2, 96, 48, 150, 9, 31)])
MODES = ["eval", "train-keep", "train-recompute"]


def skip_unjudgeable(shape, mode: str, dtype) -> None:
    """Skip the low-precision training cases where the criterion cannot tell a kernel from
    its reference. A ReLU input within the dtype's rounding of 0 may flip its mask in one run
    and not the other, and one flipped pixel moves its channel's weight and BatchNorm
    gradients by one term of their sum over the pixels. With thousands of pixels per channel
    both runs flip alike and the 2x rule holds; at the interpreter's few dozen it is a coin
    toss (0 flips against 1). K=1 is ill-conditioned in any low precision: the up-projection's
    BatchNorm sees one value per image."""
    if mode == "eval" or dtype == torch.float32:
        return
    if DRY:
        pytest.skip("low-precision training at the interpreter's tiny sizes (see "
                    "skip_unjudgeable; tests/test_triton_attention_train.py holds one case)")
    if shape[3] == 1:
        pytest.skip("K=1 in low-precision training is ill-conditioned (see skip_unjudgeable)")


def _make(kind: str, C: int, D: int, K: int, mode: str) -> torch.nn.Module:
    torch.manual_seed(0)
    recompute = mode == "train-recompute"
    if kind == "attention":
        module = ocrkernels.ObjectAttention(C, D, fused=True, recompute=recompute)
    else:
        module = ocrkernels.OCRHead(C + 3, K, channels=C, ocr_channels=D, recompute=recompute)
    randomise_batchnorm(module)
    return module.double()


def _step(module, inputs, grad, mode: str) -> dict:
    """One forward (and, in training, backward) of a fresh copy of `module`: the output and, in
    training, every input and parameter gradient and every BatchNorm buffer."""
    module = copy.deepcopy(module)
    if mode == "eval":
        with torch.no_grad():
            return {"out": module.eval()(*inputs)}
    inputs = [x.detach().requires_grad_() for x in inputs]
    out = module.train()(*inputs)
    out.backward(grad)
    result = {"out": out.detach()}
    result.update({f"grad input {i}": x.grad for i, x in enumerate(inputs)})
    result.update({f"grad {n}": p.grad for n, p in module.named_parameters()})
    result.update({n: b.detach().clone() for n, b in module.named_buffers()
                   if b.is_floating_point()})
    return result


def _run_block(kind, shape, mode, dtype, how):
    skip_unjudgeable(shape, mode, dtype)
    B, C, D, K, H, W = shape
    module = _make(kind, C, D, K, mode).to(dtype)  # rounded once, shared by all three runs
    if kind == "attention":
        inputs = [_inputs(B, C, H, W, scale=2.0, offset=0.5), _inputs(B, C, K, 1)]
    else:
        inputs = [_inputs(B, C + 3, H, W), _inputs(B, K, H, W, scale=3.0)]
    inputs = [x.to(dtype) for x in inputs]
    grad = _inputs(B, C if kind == "attention" else K, H, W).to(dtype)

    def on(device, dt, how_):
        m = copy.deepcopy(module).to(device, dt)
        xs = [layout(x.to(device, dt), how_) for x in inputs]
        return _step(m, xs, grad.to(device, dt), mode)

    exact = on("cpu", torch.float64, "contiguous")
    got = on(DEVICE, dtype, how)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OCRKERNELS_BACKEND", "reference")
        plain = on(DEVICE, dtype, how)
    judge_all(got, plain, exact, dtype)
    assert_deterministic(got, on(DEVICE, dtype, how))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", BLOCK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_object_attention(backend, dtype, shape, mode):
    _run_block("attention", shape, mode, dtype, "contiguous")


@pytest.mark.parametrize("how", ["channels_last", "strided"])
@pytest.mark.parametrize("mode", MODES)
def test_object_attention_layouts(backend, dtype, mode, how):
    _run_block("attention", BLOCK_SHAPES[-1], mode, dtype, how)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", BLOCK_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_ocr_head(backend, dtype, shape, mode):
    _run_block("head", shape, mode, dtype, "contiguous")


def test_ocr_head_eval_op_on_the_device(backend):
    """``ocrkernels.ocr_head_eval`` (the exported head) on the device against its reference."""
    from ocrkernels.head_eval import head_parameters, ocr_head_reference

    head = _make("head", 40, 24, 19, "eval").float().eval()
    params = [p.to(DEVICE) for p in head_parameters(head)]
    feats = torch.randn(2, 43, 9, 13, device=DEVICE)
    logits = torch.randn(2, 19, 9, 13, device=DEVICE) * 3
    got = ocrkernels.ocr_head_eval(feats, logits, *params)
    want = ocr_head_reference(feats.double(), logits.double(), *(p.double() for p in params))
    assert got.device.type == torch.device(DEVICE).type
    assert rel_err(got, want) <= 1e-4
