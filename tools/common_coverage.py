"""Line coverage of csrc/ocrkernels/common/*.h from a gcov-instrumented build.

Usage: python tools/common_coverage.py BUILD_DIR [--min PERCENT]

Runs gcov on every object of BUILD_DIR that has run-time data (.gcda), keeps the per-line
records of the common/ headers, and merges them over the objects: a line is executable when
some object compiled code for it, covered when some object executed it. Prints a table per
header and the uncovered lines; exits 1 when the total is below --min (default 0).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

COMMON = Path(__file__).resolve().parents[1] / "csrc" / "ocrkernels" / "common"


def gcov_lines(build: Path) -> dict[str, dict[int, int]]:
    """{header name: {line: max count over objects}} for the executable lines of common/*.h."""
    lines: dict[str, dict[int, int]] = defaultdict(dict)
    gcdas = sorted(build.rglob("*.gcda"))
    if not gcdas:
        sys.exit(f"no .gcda files under {build}: build with -DOCRKERNELS_COVERAGE=ON and run "
                 "the tests first")
    for gcda in gcdas:
        with tempfile.TemporaryDirectory() as tmp:
            # -p keeps the header's path in the output name, -l one file per (object, header)
            subprocess.run(["gcov", "-p", "-l", "-o", str(gcda.parent), str(gcda)], cwd=tmp,
                           capture_output=True, check=True)
            for out in Path(tmp).glob("*.gcov"):
                source = None
                for raw in out.read_text(errors="replace").splitlines():
                    count, _, rest = raw.partition(":")
                    lineno, _, text = rest.partition(":")
                    lineno = lineno.strip()
                    if lineno == "0":
                        if text.startswith("Source:"):
                            source = Path(text[len("Source:"):])
                        continue
                    if source is None or source.parent.name != "common" or \
                            source.parent.parent.name != "ocrkernels":
                        break
                    count = count.strip().rstrip("*")
                    if count == "-" or not lineno.isdigit():
                        continue
                    n = 0 if count in ("#####", "=====") else int(count)
                    prev = lines[source.name].get(int(lineno), 0)
                    lines[source.name][int(lineno)] = max(prev, n)
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("build", type=Path)
    ap.add_argument("--min", type=float, default=0.0, help="fail below this total percentage")
    args = ap.parse_args()
    lines = gcov_lines(args.build)
    headers = sorted(p.name for p in COMMON.glob("*.h"))
    total_exec = total_cov = 0
    print(f"{'header':<22} {'lines':>6} {'covered':>8} {'percent':>8}")
    for name in headers:
        recs = lines.get(name, {})
        ex, cov = len(recs), sum(1 for n in recs.values() if n > 0)
        total_exec += ex
        total_cov += cov
        pct = f"{100.0 * cov / ex:.1f}" if ex else "n/a"
        print(f"{name:<22} {ex:>6} {cov:>8} {pct:>8}")
    pct = 100.0 * total_cov / max(total_exec, 1)
    print(f"{'total':<22} {total_exec:>6} {total_cov:>8} {pct:>8.1f}")
    for name in headers:
        missed = sorted(ln for ln, n in lines.get(name, {}).items() if n == 0)
        if missed:
            src = (COMMON / name).read_text().splitlines()
            print(f"\nnot covered in {name}:")
            for ln in missed:
                print(f"  {ln:4d}: {src[ln - 1].strip()}")
    return 0 if pct >= args.min else 1


if __name__ == "__main__":
    sys.exit(main())
