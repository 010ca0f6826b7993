"""ocrnet.utils: the one atomic writer, the one interleaved timer, the one saved-bytes counter."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import stat

import pytest
import torch

from ocrnet.utils.fileio import atomic_write, write_json_atomic, write_text_atomic
from ocrnet.utils.memory import peak_rss_bytes, reset_peak_rss, saved_tensor_bytes
from ocrnet.utils.timing import time_interleaved


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_mode_follows_the_umask_and_keeps_an_existing_files(tmp_path):
    old = os.umask(0o027)
    try:
        path = write_text_atomic(tmp_path / "a.txt", "one\n")
        assert path.read_text() == "one\n" and _mode(path) == 0o640
        os.chmod(path, 0o600)
        write_text_atomic(path, "two\n")
        assert path.read_text() == "two\n" and _mode(path) == 0o600
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"miou": 0.5})
    before = path.read_bytes()

    def half_then_fail(f):
        f.write(b'{"miou": ')
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == before == b'{\n  "miou": 0.5\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_missing_folder_is_named_unless_parents_are_made(tmp_path):
    target = tmp_path / "no" / "such" / "x.txt"
    with pytest.raises(FileNotFoundError, match="no/such"):
        write_text_atomic(target, "x")
    assert not (tmp_path / "no").exists()
    write_text_atomic(target, "x", make_parents=True)
    assert target.read_text() == "x"


def test_time_interleaved_rotates_and_counts():
    calls: list[tuple[str, int]] = []
    steps = {name: (lambda i, name=name: calls.append((name, i))) for name in "abc"}
    events: list[str] = []
    times = time_interleaved(steps, rounds=4, warmup=2, sync=lambda: events.append("sync"),
                             before=lambda n: events.append(f"before {n}"),
                             progress=lambda done, total: events.append(f"{done}/{total}"))
    # Two warm-up rounds in the given order, then every round shifted by one.
    assert calls[:6] == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1), ("c", 1)]
    assert [n for n, _ in calls[6:]] == list("abc" "bca" "cab" "abc")
    assert [i for _, i in calls[6:]] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert {n: len(t) for n, t in times.items()} == {"a": 4, "b": 4, "c": 4}
    assert all(t >= 0 for ts in times.values() for t in ts)
    # sync before and after every timed call; the hook outside the timed interval.
    assert events[:4] == ["sync", "before a", "sync", "sync"]
    assert events.count("sync") == 1 + 2 * 12 and events[-1] == "4/4"
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        time_interleaved(steps, rounds=0, warmup=0)


def test_saved_tensor_bytes_counts_what_autograd_keeps():
    x = torch.randn(100, 30, requires_grad=True)
    # exp keeps its output (new storage); mul keeps its inputs (excluded here).
    out, kept = saved_tensor_bytes(lambda: x.exp(), exclude=(x,))
    assert kept == 100 * 30 * 4 and out.shape == (100, 30)
    _, kept = saved_tensor_bytes(lambda: x * x, exclude=(x,))
    assert kept == 0
    _, kept = saved_tensor_bytes(lambda: x * x)
    assert kept == 100 * 30 * 4  # one storage, counted once
    with torch.no_grad():
        assert saved_tensor_bytes(lambda: x.exp())[1] == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self is Linux's")
def test_peak_rss_interval_starts_at_the_reset():
    assert reset_peak_rss()
    start = peak_rss_bytes()
    x = torch.ones(1 << 26)  # 256 MiB, written
    peak = peak_rss_bytes()
    assert peak >= start + (200 << 20)
    del x
    assert reset_peak_rss()
    assert peak_rss_bytes() <= peak - (200 << 20)  # the freed block no longer counts


_KEEP_SCRIPT = r"""
import ctypes, sys
import torch
from ocrnet.utils.memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()
t = torch.ones(64 << 18)  # 64 MiB, above glibc's default mmap threshold (32 MiB at most)
del t
print(libc.mallinfo2().fordblks >> 20, libc.mallinfo2().hblkhd >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(ctypes.CDLL(None),
                    "mallinfo2"), reason="glibc >= 2.33 only (mallinfo2)")
def test_keep_freed_memory_keeps_a_freed_feature_map_in_the_heap():
    """A freed 64 MiB block: unmapped by default; kept in the heap (free, reusable) after."""
    def run(mode):
        out = subprocess.run([sys.executable, "-c", _KEEP_SCRIPT, mode], capture_output=True,
                             text=True, timeout=120, check=True).stdout.split()
        return int(out[0]), int(out[1])  # free heap MiB, mapped MiB
    free_default, _ = run("default")
    free_kept, _ = run("keep")
    assert free_default < 64 <= free_kept
