"""The byte/FLOP model of the GPU kernels (bench/gpu_model.py): the numbers docs/GPU.md quotes,
checked by hand on small shapes and against the targets of issue 7. Needs no GPU, no Triton."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import gpu_model  # noqa: E402
import specs as bench_specs  # noqa: E402

from ocrkernels.triton import gather_chunk  # noqa: E402


def rows_for(op, shape_prefix, device):
    return {(r["impl"], r["mode"]): r for r in gpu_model.model_rows()
            if r["op"] == op and r["shape"].startswith(shape_prefix) and r["device"] == device}


@pytest.mark.parametrize("device", ["A100 80GB", "H100 SXM"])
def test_fused_attention_eval_moves_at_least_3x_fewer_bytes_at_cityscapes(device):
    rows = rows_for("object_attention", "cityscapes", device)
    fused, unfused = rows[("fused", "eval fwd")], rows[("unfused", "eval fwd")]
    assert unfused["bytes"] >= 3 * fused["bytes"]
    assert fused["bytes_saving"] == pytest.approx(unfused["bytes"] / fused["bytes"])
    # even against BN folded into the convs (the best unfused eval) it stays above 3x
    assert rows[("unfused-folded", "eval fwd")]["bytes"] >= 3 * fused["bytes"]


def test_attention_bytes_by_hand():
    """B=1, N=1 pixel, C=2, D=1, K=1, 2-byte elements: unfused 17C + 14D + 6K = 54 elements
    of maps plus the weights D*C + D*D + D*C + 2*C*C = 13; fused reads and writes 2C = 4 map
    elements plus weights D*C + D*D + 2*C*C = 11 and keys/values K*(D + C) = 3."""
    costs = gpu_model.attention_eval_costs(B=1, C=2, D=1, K=1, N=1, elt=2)
    assert costs[("unfused", "fwd")].bytes == 2 * (54 + 13)
    assert costs[("fused", "fwd")].bytes == 2 * (4 + 11 + 3)
    assert costs[("unfused-folded", "fwd")].bytes == 2 * (13 * 2 + 10 + 6 + 13)


def test_attention_flops_match_the_benchmark():
    s = gpu_model.SHAPES["cityscapes"]
    costs = gpu_model.attention_eval_costs(s["B"], s["C"], s["D"], s["K"], s["H"] * s["W"], 2)
    assert costs[("fused", "fwd")].flops == bench_specs._object_attention_flops(s)


@pytest.mark.parametrize("shape", ["cityscapes", "ade20k"])
def test_gather_saving_is_reported_for_k19_and_k150(shape):
    s = gpu_model.SHAPES[shape]
    assert s["K"] == {"cityscapes": 19, "ade20k": 150}[shape]
    for device in ("A100 80GB", "H100 SXM"):
        rows = rows_for("spatial_gather", shape, device)
        assert set(rows) == {(i, m) for i in ("fused", "unfused") for m in ("fwd", "bwd")}
        for mode in ("fwd", "bwd"):
            r = rows[("fused", mode)]
            assert r["bytes_saving"] == pytest.approx(rows[("unfused", mode)]["bytes"]
                                                      / r["bytes"])
            assert r["flops"] == rows[("unfused", mode)]["flops"]
    # the saving can only come from the K x N terms (F is read once either way): larger for
    # K=150 than for K=19
    a = rows_for("spatial_gather", "cityscapes", "A100 80GB")[("fused", "fwd")]["bytes_saving"]
    b = rows_for("spatial_gather", "ade20k", "A100 80GB")[("fused", "fwd")]["bytes_saving"]
    assert b > a


def test_gather_bytes_by_hand():
    """B=1, C=4, K=2, N=3, 2-byte elements, one split (chunk covers N)."""
    dev = gpu_model.Device("x", 1.0, 1.0, sms=1)
    assert gather_chunk(1, 2, 4, 3, 1, 2) >= 3
    c = gpu_model.gather_costs(B=1, C=4, K=2, N=3, elt=2, device=dev)
    assert c[("unfused", "fwd")].bytes == 2 * (5 * 6 + 12 + 3 * 8)
    assert c[("fused", "fwd")].bytes == 2 * (6 + 12 + 8) + 4 * (1 * 2 * 6 * 2 + 2 * 2)
    assert c[("unfused", "bwd")].bytes == 2 * (7 * 6 + 2 * 12 + 4 * 8)
    assert c[("fused", "bwd")].bytes == 2 * (5 * 6 + 2 * 12 + 8)
    assert c[("fused", "fwd")].flops == 2 * 2 * 4 * 3
    assert c[("fused", "bwd")].flops == 2 * c[("fused", "fwd")].flops


@pytest.mark.parametrize("B, K, C, N, sms", [(1, 19, 512, 32768, 108), (1, 150, 512, 16384, 132),
                                              (8, 21, 512, 131072, 108), (1, 1, 8, 5, 4)])
def test_gather_chunk_limits(B, K, C, N, sms):
    chunk = gather_chunk(B, K, C, N, sms, 2)
    splits = math.ceil(N / chunk)
    assert chunk % 128 == 0 and chunk >= 128
    # partials at most 1/4 of the feature bytes, unless a single split is already needed
    assert splits == 1 or splits * K * C * 8 <= C * N * 2 / 4 + 8 * K * C


def test_ideal_time_is_the_roofline():
    cost = gpu_model.Cost(bytes=8e9, flops=1e12)  # 4 ms of bytes, 3.2 ms of FLOPs
    a100 = gpu_model.DEVICES["A100"]
    assert cost.seconds(a100) == pytest.approx(8e9 / 2.0e12)
    assert cost.bound(a100) == "memory"
    assert gpu_model.Cost(bytes=4e9, flops=1e12).bound(a100) == "compute"


def test_bench_prints_the_model_on_any_machine(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--gpu-model"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "GPU byte/FLOP model" in proc.stdout
    for words in ("A100 80GB", "H100 SXM", "K=19", "K=150", "| fused |", "| unfused |"):
        assert words in proc.stdout


@pytest.mark.parametrize("shape", ["cityscapes", "ade20k"])
def test_attention_training_rows(shape):
    """Training forward and backward, fused (keeping z1..z4 and the attention) and
    fused-recompute (keeping z4), against the eager training step: fewer bytes in both
    directions, the FLOPs of the K-value reassociation, and for recompute the FLOPs of the
    stages before the z4 GEMM once more (under 40% of a forward at C=512)."""
    for device in ("A100 80GB", "H100 SXM"):
        rows = rows_for("object_attention", shape, device)
        for mode in ("train fwd", "train bwd"):
            unfused = rows[("unfused", mode)]
            for impl in ("fused", "fused-recompute"):
                r = rows[(impl, mode)]
                assert r["bytes"] < unfused["bytes"]
                assert r["bytes_saving"] == pytest.approx(unfused["bytes"] / r["bytes"])
            assert rows[("fused", mode)]["flops"] < unfused["flops"]
        fused_fwd = rows[("fused", "train fwd")]
        assert fused_fwd["flops"] == rows[("fused", "eval fwd")]["flops"]
        assert rows[("fused", "train bwd")]["flops"] == 2 * fused_fwd["flops"]
        s = gpu_model.SHAPES[shape]
        C, D, K, P = s["C"], s["D"], s["K"], s["B"] * s["H"] * s["W"]
        recompute_bwd = rows[("fused-recompute", "train bwd")]
        assert recompute_bwd["flops"] == 2 * fused_fwd["flops"] + 2 * P * (
            D * C + D * D + K * D + C * K)
        assert 2 * fused_fwd["flops"] < recompute_bwd["flops"] < 2.4 * fused_fwd["flops"]
        assert rows[("fused-recompute", "train bwd")]["bytes"] > rows[("fused", "train bwd")][
            "bytes"]
    # the forward writes every pre-activation once: a 2.5x to 3.5x byte saving at C=512
    fwd = rows_for("object_attention", shape, "A100 80GB")[("fused", "train fwd")]
    assert 2.5 <= fwd["bytes_saving"] <= 3.5


def test_attention_training_bytes_by_hand():
    """B=1, N=1 pixel, C=2, D=1, K=1, 2-byte elements, one weight-gradient split.
    unfused fwd: 19C + 16D + 6K = 60 map elements + weights D*C + D*D + 2*C*C + D*C = 13;
    fused fwd: 7C + 4D + K = 19 + weights 11 + keys/values K*(D + C) = 3, and float32
    statistics partials (sum, centred squares) of z1..z4 written and read back:
    4 bytes x 1 block x 2 x 2 x (2D + 2C) = 96 bytes. Backward: unfused 29C + 28D + 9K = 95
    + 2 x 13 (weights read, gradients written); fused 19C + 14D + 5K = 57 + 14, gradients 14,
    and the statistics again (96)."""
    dev = gpu_model.Device("x", 1.0, 1.0, sms=1)
    c = gpu_model.attention_train_costs(B=1, C=2, D=1, K=1, N=1, elt=2, device=dev)
    assert c[("unfused", "fwd")].bytes == 2 * (60 + 13)
    assert c[("fused", "fwd")].bytes == 2 * (19 + 11 + 3) + 96
    assert c[("unfused", "bwd")].bytes == 2 * (95 + 26)
    assert c[("fused", "bwd")].bytes == 2 * (57 + 14) + 2 * 14 + 96
    # recompute: z1, z2, A and z3 again (2C + 4D + K = 9 elements; W1, W2 and keys/values
    # read again: D*C + D*D + K*(D + C) = 6) and the statistics of z1..z3:
    # 4 bytes x 1 block x 2 x 2 x (2D + C) = 64 bytes; z4 is kept, not recomputed
    assert c[("fused-recompute", "bwd")].bytes == c[("fused", "bwd")].bytes + 2 * (9 + 6) + 64
    assert c[("fused-recompute", "fwd")].bytes == c[("fused", "fwd")].bytes
    assert c[("fused-recompute", "bwd")].flops == (
        c[("fused", "bwd")].flops + 2 * (1 * 2 + 1 * 1 + 1 * 1 + 2 * 1))
