"""The benchmark harness runs and writes the documented JSON (no timing is asserted here)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import ocrkernels
from conftest import REPO

KEYS = {"op", "impl", "shape", "mode", "median_ms", "speedup_vs_eager", "speedup_vs_compiled",
        "saved_bytes", "gflops"}


@pytest.mark.skipif(not ocrkernels.ops.extension_loaded(), reason="ocrkernels._C is not built")
def test_quick_bench_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--no-compile", "--repeat", "2",
         "--warmup", "1", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "| op | impl |" in proc.stdout
    rows = json.loads(out.read_text())
    assert rows and all(KEYS <= set(r) for r in rows)
    impls = {(r["impl"], r["mode"]) for r in rows}
    assert {("cpu", "fwd"), ("cpu", "fwd+bwd"), ("reference", "fwd")} <= impls
    for r in rows:
        assert r["median_ms"] > 0
        if r["op"] == "spatial_gather" and r["impl"] == "cpu":
            # the fused op keeps only (B, K, 2) statistics: far below the reference's K x N map
            ref = next(x for x in rows if x["op"] == r["op"] and x["impl"] == "reference"
                       and x["shape"] == r["shape"])
            assert r["saved_bytes"] <= 0.01 * ref["saved_bytes"]


@pytest.mark.skipif(not ocrkernels.ops.extension_loaded(), reason="ocrkernels._C is not built")
def test_quick_bench_object_attention_eval_and_training(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--no-compile", "--repeat", "1",
         "--warmup", "0", "--ops", "object_attention", "--shapes", "cityscapes", "--json",
         str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "fp32 matmul rate:" in proc.stdout and "WARNING" not in proc.stderr
    rows = json.loads(out.read_text())
    assert {(r["op"], r["impl"], r["mode"]) for r in rows} == {
        ("object_attention", impl, mode) for impl in ("cpu", "reference")
        for mode in ("fwd", "fwd+bwd")} | {("object_attention", "cpu-recompute", "fwd+bwd")}
    for r in rows:
        assert KEYS <= set(r) and r["gflops"] > 0 and r["fraction_of_matmul"] > 0
    saved = {r["impl"]: r["saved_bytes"] for r in rows if r["mode"] == "fwd+bwd"}
    assert 0 < 8 * saved["cpu-recompute"] <= saved["reference"]
    assert saved["cpu-recompute"] < saved["cpu"] < saved["reference"]


def test_dtype_rates_reports_both_dtypes_for_every_case():
    """bench/dtype_rates.py: one row per case, with positive fp32 and bf16 rates and their
    ratio (the figures that tell whether a bf16 mode pays on this CPU)."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "dtype_rates.py"), "--repeat", "1",
         "--threads", "1"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| case")]
    sys.path.insert(0, str(REPO / "bench"))
    from dtype_rates import CONVS
    assert len(rows) == len(CONVS) + 1
    for case, fp32, bf16, ratio, _impl in rows:
        assert float(fp32) > 0 and float(bf16) > 0, case
        assert float(ratio) == pytest.approx(float(bf16) / float(fp32), rel=0.1, abs=0.02), case
    assert "bf16 flags:" in proc.stdout
