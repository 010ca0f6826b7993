#!/usr/bin/env bash
# Build and link ocrkernels._C_cuda the way `FORCE_CUDA=1 pip install -e .` does (setup.py,
# no GPU needed), into a temporary directory so the in-place build is left alone, then check the
# library it produced:
#   - it exists;
#   - its undefined symbols are all provided by a CPU torch, the toolkit's cudart and the system
#     libraries, except c10::cuda / at::cuda / torch::cuda ones, which only a CUDA torch has;
#   - it loads: those CUDA-torch symbols are stood in for by a stub library (never called), the
#     rest must resolve (dlopen with RTLD_NOW), and the load registers a CUDA kernel for every op
#     of the schema that ocrkernels._C (built alongside) defines;
#   - every CUDA translation unit embeds exactly the machine code and PTX of the arch list
#     (default "8.0;9.0+PTX": sm_80 and sm_90 cubins, compute_90 PTX), read from the
#     .nv_fatbin section and cross-checked with cuobjdump when one is found.
# Usage:
#   .ci/link_cuda.sh                 the full build and the checks
#   .ci/link_cuda.sh --check LIB [--schema SCHEMA_LIB] [--namespace NS] [--arch LIST]
#                                    the checks only, on a library built elsewhere
#                                    (tests/test_cuda_build.py runs them on tiny libraries)
#   .ci/link_cuda.sh --print-cuda-home  the toolkit root these use
# Environment: PY (python with torch), CUDA_HOME (else found from the nvcc on PATH), MAX_JOBS
# (default 2), OCRKERNELS_CUDA_ARCH_LIST (default: setup.py's).
set -euo pipefail
caller=$PWD
cd "$(dirname "$0")/.."
PY=${PY:-$PWD/.venv/bin/python}

cuda_home() {
  if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
    echo "$CUDA_HOME"
    return
  fi
  local nvcc here
  nvcc=$(command -v nvcc) || {
    echo "link_cuda.sh: nvcc not found and CUDA_HOME not set" >&2
    exit 1
  }
  # nvcc reports the directory it really runs from, also when the one on PATH is a wrapper.
  here=$("$nvcc" --dryrun -v -c x.cu 2>&1 | sed -n 's/^#\$ _HERE_=//p' | head -n 1)
  if [ -n "$here" ]; then
    dirname "$here"
  else
    dirname "$(dirname "$(readlink -f "$nvcc")")"
  fi
}

# The arch list setup.py builds for when OCRKERNELS_CUDA_ARCH_LIST is unset.
default_arch() {
  sed -n 's/.*os\.environ\.get("OCRKERNELS_CUDA_ARCH_LIST", "\([^"]*\)").*/\1/p' setup.py
}

if [ "${1:-}" = "--print-cuda-home" ]; then
  cuda_home
  exit 0
fi
lib="" schema="" namespace="ocrkernels" arch="${OCRKERNELS_CUDA_ARCH_LIST:-}"
if [ "${1:-}" = "--check" ]; then
  if [ $# -lt 2 ]; then
    echo "usage: $0 --check LIB [--schema LIB] [--namespace NS] [--arch LIST]" >&2
    exit 2
  fi
  lib=$(cd "$caller" && realpath -m "$2")
  shift 2
  while [ $# -gt 0 ]; do
    case "$1" in
      --schema) schema=$(cd "$caller" && realpath "$2"); shift 2 ;;
      --namespace) namespace=$2; shift 2 ;;
      --arch) arch=$2; shift 2 ;;
      *) echo "link_cuda.sh: unknown argument $1" >&2; exit 2 ;;
    esac
  done
fi
[ -n "$arch" ] || arch=$(default_arch)
[ -n "$arch" ] || { echo "link_cuda.sh: no arch list (OCRKERNELS_CUDA_ARCH_LIST)" >&2; exit 1; }
CUDA_HOME=$(cuda_home)
export CUDA_HOME

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ -z "$lib" ]; then
  start=$SECONDS
  echo "FORCE_CUDA=1 setup.py build_ext (arch $arch, MAX_JOBS=${MAX_JOBS:-2}) in a temporary dir"
  if ! FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} OCRKERNELS_CUDA_ARCH_LIST="$arch" \
      "$PY" setup.py build_ext --build-lib "$work/lib" --build-temp "$work/tmp" \
      >"$work/build.log" 2>&1; then
    cat "$work/build.log" >&2
    echo "CUDA link check FAILED: the FORCE_CUDA=1 build did not complete" >&2
    exit 1
  fi
  grep -A8 'ocrkernels build summary' "$work/build.log" || true
  lib=$(find "$work/lib" -name '_C_cuda*.so' | head -n 1)
  schema=$(find "$work/lib" -name '_C.*.so' -o -name '_C.so' | head -n 1)
  if [ -z "$lib" ]; then
    cat "$work/build.log" >&2
    echo "CUDA link check FAILED: the build produced no _C_cuda library" >&2
    exit 1
  fi
  echo "built $(basename "$lib") in $((SECONDS - start)) s"
fi
[ -f "$lib" ] || { echo "CUDA link check FAILED: $lib does not exist" >&2; exit 1; }

# cuobjdump is optional: the toolkit's, one on PATH, or the one Triton ships.
triton_cuobjdump() {
  "$PY" - <<'PYEOF' 2>/dev/null || true
import importlib.util, os
spec = importlib.util.find_spec("triton")
if spec and spec.origin:
    print(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
PYEOF
}
cuobjdump=""
for cand in "$CUDA_HOME/bin/cuobjdump" "$(command -v cuobjdump || true)" "$(triton_cuobjdump)"; do
  if [ -n "$cand" ] && [ -x "$cand" ]; then cuobjdump=$cand; break; fi
done

# Stand-ins for the symbols only a CUDA torch provides (see the Python below).
stub_src="$work/cuda_torch_stub.c" stub_lib="$work/libcuda_torch_stub.so"

if ! "$PY" - "$lib" "$schema" "$namespace" "$arch" "$CUDA_HOME" "$cuobjdump" "$stub_src" \
    "$stub_lib" <<'PYEOF'
import ctypes
import glob
import os
import re
import struct
import subprocess
import sys
from collections import Counter

lib, schema, namespace, arch_list, cuda_home, cuobjdump, stub_src, stub_lib = sys.argv[1:]
failures = []

def fail(msg):
    failures.append(msg)
    print(f"FAIL: {msg}", file=sys.stderr)

def demangle(names):
    if not names:
        return []
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout
    return out.splitlines()

def dynamic_symbols(path, defined):
    flag = "--defined-only" if defined else "--undefined-only"
    out = subprocess.run(["nm", "-D", flag, path], capture_output=True, text=True, check=True)
    syms = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            syms[parts[-1].split("@")[0]] = parts[-2]
    return syms

# 1. Undefined symbols. Strong ("U") references must come from the libraries a CPU torch, the
#    toolkit and the system provide, or be CUDA-torch symbols (libc10_cuda / libtorch_cuda).
import torch

torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
cudart = next((p for d in ("lib64", "lib") for p in
               sorted(glob.glob(os.path.join(cuda_home, d, "libcudart.so*")))), None)
if cudart is None:
    fail(f"no libcudart.so under {cuda_home}")
providers = sorted(glob.glob(os.path.join(torch_lib, "*.so*"))) + ([cudart] if cudart else [])
# ... and the system libraries it needs (libstdc++, libc, libgomp, ...), as the loader finds them.
env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(
    [torch_lib] + ([os.path.dirname(cudart)] if cudart else [])))
ldd = subprocess.run(["ldd", lib], capture_output=True, text=True, env=env).stdout
providers += re.findall(r"=>\s*(/\S+)", ldd)
provided = set()
for p in providers:
    provided |= set(dynamic_symbols(p, True))
undefined = {s for s, kind in dynamic_symbols(lib, False).items() if kind == "U"}
cuda_torch_ns = re.compile(r"^(c10::cuda::|at::cuda::|torch::cuda::)")
unknown, cuda_torch = [], []
for mangled, name in zip(sorted(undefined), demangle(sorted(undefined))):
    if mangled in provided:
        continue
    if cuda_torch_ns.match(name):
        cuda_torch.append(mangled)
    else:
        unknown.append((mangled, name))
for mangled, name in unknown:
    fail(f"undefined symbol that neither a CUDA torch nor the toolkit provides: {name}")
print(f"undefined symbols: {len(undefined)}; left for a CUDA torch: {len(cuda_torch)} "
      f"(c10::cuda / at::cuda / torch::cuda)")

# 2. Load it. The CUDA-torch symbols get stand-ins that trap if ever called (registration does
#    not call them); everything else must resolve now (ctypes loads with RTLD_NOW).
with open(stub_src, "w") as f:
    for s in cuda_torch:
        f.write(f"void {s}(void) {{ __builtin_trap(); }}\n")
subprocess.run(["cc", "-shared", "-fPIC", "-o", stub_lib, stub_src], check=True)
ctypes.CDLL(stub_lib, mode=ctypes.RTLD_GLOBAL)
if cudart:
    ctypes.CDLL(cudart, mode=ctypes.RTLD_GLOBAL)
if schema:
    ctypes.CDLL(schema)

# Ops of the schema with CPU kernels only: on CUDA tensors the training chain runs these GEMMs
# in cuBLAS (torch.matmul in ocrkernels/attention_train.py), so nothing calls them there.
CPU_ONLY = {"ocrkernels::pixel_matmul", "ocrkernels::pixel_matmul_into",
            "ocrkernels::pixel_matmul_nt"}

def ops_of(ns):
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith(ns + "::"))

def cuda_kernels(names):
    return {n for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")}

before = cuda_kernels(ops_of(namespace))
try:
    ctypes.CDLL(lib)  # RTLD_NOW: every symbol resolves now or the load fails
except OSError as e:
    msg = str(e)
    m = re.search(r"undefined symbol: (\S+)", msg)
    if m:
        msg += f"  [{demangle([m.group(1)])[0]}]"
    fail(f"the library does not load: {msg}")
else:
    ops = ops_of(namespace)
    has_cuda = cuda_kernels(ops)
    missing = [n for n in ops if n not in has_cuda and n not in CPU_ONLY]
    unexpected = sorted(has_cuda & CPU_ONLY)
    if not ops:
        fail(f"no {namespace}:: ops are defined")
    elif missing:
        fail(f"no CUDA kernel registered for: {', '.join(missing)}")
    elif unexpected:
        fail(f"CUDA kernels registered for the CPU-only ops {unexpected}: update CPU_ONLY")
    elif before:
        fail(f"CUDA kernels were registered before loading the library: {sorted(before)}")
    else:
        cuda_ops = [n for n in ops if n not in CPU_ONLY]
        cpu_only = sorted(n.split("::")[1] for n in CPU_ONLY & set(ops))
        print(f"loads and registers a CUDA kernel for all {len(cuda_ops)} {namespace} ops: "
              + ", ".join(n.split("::")[1] for n in cuda_ops)
              + (f"; none, by design, for the CPU-only {', '.join(cpu_only)}" if cpu_only else ""))

# 3. Architectures, per translation unit, from the fat binaries of the .nv_fatbin section.
def fatbin_entries(path):
    data = open(path, "rb").read()
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_at = secs[shstrndx][4]
    units = []
    for sec in secs:
        name = data[names_at + sec[0]:data.index(b"\0", names_at + sec[0])]
        if name != b".nv_fatbin":
            continue
        blob, off = data[sec[4]:sec[4] + sec[5]], 0
        while off + 16 <= len(blob):
            magic, _, hsize, size = struct.unpack_from("<IHHQ", blob, off)
            if magic != 0xBA55ED50:  # padding between the units' fat binaries
                off += 8
                continue
            entries, e, end = [], off + hsize, off + hsize + size
            while e < end:
                kind, _, ehsize, esize = struct.unpack_from("<HHIQ", blob, e)
                sm, = struct.unpack_from("<I", blob, e + 28)
                entries.append(("ptx" if kind == 1 else "elf" if kind == 2 else f"kind{kind}", sm))
                e += ehsize + esize
            units.append(sorted(entries))
            off = end
    return units

want = []
for a in filter(None, (x.strip() for x in arch_list.replace(" ", ";").split(";"))):
    m = re.fullmatch(r"(\d+)\.(\d)[a-z]?(\+PTX)?", a)
    if not m:
        fail(f"cannot read arch {a!r} of the list {arch_list!r}")
        continue
    sm = int(m.group(1)) * 10 + int(m.group(2))
    want.append(("elf", sm))
    if m.group(3):
        want.append(("ptx", sm))
want = sorted(want)
units = fatbin_entries(lib)
fmt = lambda entries: ", ".join(f"{'sm' if k == 'elf' else 'compute'}_{sm} {k.upper()}"
                                for k, sm in entries)
if not units:
    fail("no CUDA device code (.nv_fatbin) in the library")
for i, entries in enumerate(units):
    if entries != want:
        fail(f"translation unit {i + 1} embeds [{fmt(entries)}], expected [{fmt(want)}]")
if units and all(u == want for u in units):
    print(f"device code: {len(units)} translation unit(s), each with {fmt(want)} "
          f"(arch list {arch_list})")
if cuobjdump:
    listed = Counter()
    for flag, kind in (("--list-elf", "elf"), ("--list-ptx", "ptx")):
        out = subprocess.run([cuobjdump, flag, lib], capture_output=True, text=True)
        for sm in re.findall(r"\.sm_(\d+)\.(?:cubin|ptx)\s*$", out.stdout, re.MULTILINE):
            listed[(kind, int(sm))] += 1
    parsed = Counter(e for u in units for e in u)
    if listed != parsed:
        fail(f"cuobjdump lists {dict(listed)}, the fatbin reader {dict(parsed)}")
    else:
        print(f"cuobjdump ({cuobjdump}) agrees")
else:
    print("cuobjdump not found: architectures read from .nv_fatbin only")

if failures:
    sys.exit(1)
PYEOF
then
  echo "CUDA link check FAILED: $lib (see above)" >&2
  exit 1
fi
echo "CUDA link check: $(basename "$lib") links, loads its CUDA registrations and embeds arch $arch"
