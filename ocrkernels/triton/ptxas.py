"""Registers, spills and occupancy of a compiled Triton kernel, from ``ptxas -v`` on its PTX
(for :mod:`.aot`, which needs no GPU): the figures the driver would report on a device.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
from pathlib import Path

__all__ = ["MAX_REGISTERS", "MAX_WARPS_PER_SM", "occupancy", "ptxas_usage"]

# per SM: shared memory (the per-block limit + 1 KiB the runtime reserves per block), 32-bit
# registers, resident warps and blocks (the same on both targets)
SHARED_PER_SM = {"sm_80": 164 * 1024, "sm_90": 228 * 1024}
SHARED_RESERVED = 1024
REGISTERS_PER_SM = 65536
REGISTER_GRANULE = 256  # registers are allocated per warp in units of 256
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32
MAX_REGISTERS = 255


def occupancy(registers: int, num_warps: int, shared: int, target: str) -> int:
    """Resident warps per SM for blocks of `num_warps` warps using `registers` per thread and
    `shared` bytes of shared memory: whole blocks, limited by 65536 registers per SM (allocated
    per warp in units of 256), the shared memory per SM, 64 warps and 32 blocks."""
    per_warp = -(-max(registers, 1) * 32 // REGISTER_GRANULE) * REGISTER_GRANULE
    blocks = min(REGISTERS_PER_SM // per_warp // num_warps, MAX_WARPS_PER_SM // num_warps,
                 MAX_BLOCKS_PER_SM)
    if shared:
        blocks = min(blocks, SHARED_PER_SM[target] // (shared + SHARED_RESERVED))
    return blocks * num_warps


def _ptxas_command(ptx: str) -> list[str]:
    """ptxas -v for `ptx`'s own target (``.target sm_90a`` for capability 90), with the options
    of Triton's make_cubin (line info, register allocation level 2)."""
    from triton import knobs

    target = re.search(r"^\s*\.target\s+(sm_\w+)", ptx, re.MULTILINE)
    if target is None:
        raise RuntimeError("no .target in the PTX")
    return [knobs.nvidia.ptxas.path, "-lineinfo", "-v", "--regAllocOptLevel=2",
            f"--gpu-name={target.group(1)}"]


def _parse_ptxas(log: str) -> dict:
    """Registers, spill stores / loads and stack frame from a ``ptxas -v`` log (one kernel)."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes "
                      r"spill loads", log)
    if regs is None or spill is None:
        raise RuntimeError(f"cannot parse the ptxas -v output: {log.strip()[-300:]}")
    return dict(registers=int(regs.group(1)), stack=int(spill.group(1)),
                spill_stores=int(spill.group(2)), spill_loads=int(spill.group(3)))


def ptxas_usage(ptx: str) -> dict:
    """Registers per thread, spill stores / loads and stack frame (bytes) of the kernel in
    `ptx`, from ``ptxas -v`` for the PTX's own target. Results are cached next to Triton's
    cache, keyed by the PTX and the ptxas command (a cached compile has no ptxas log)."""
    with_cmd = _ptxas_command(ptx)
    key = hashlib.sha256((" ".join(with_cmd) + "\n" + ptx).encode()).hexdigest()
    try:
        from triton import knobs

        base = Path(knobs.cache.dir)
    except Exception:  # noqa: BLE001 - no cache directory: measure every time
        base = Path.home() / ".triton" / "cache"
    cache = base / "ocrkernels-ptxas" / f"{key}.json"
    if cache.exists():
        try:
            return json.loads(cache.read_text())
        except (OSError, ValueError):
            pass
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        run = subprocess.run([*with_cmd, str(src), "-o", str(Path(tmp) / "kernel.cubin")],
                             capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"ptxas -v failed ({run.returncode}): {run.stderr.strip()[-300:]}")
    usage = _parse_ptxas(run.stdout + run.stderr)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp_file = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp_file.write_text(json.dumps(usage))
        tmp_file.replace(cache)
    except OSError:
        pass
    return usage
