"""Build onnxmerge's native kernels: kernels/libonnxmerge_kernels.so.

Needs g++ and onnxruntime's C/C++ headers (ONNXRUNTIME_INCLUDE_DIR, else /usr/include/onnxruntime;
../shared/vendor/README.md says where to get them). The library does not link libonnxruntime. The hot
loops (lookup_impl.cc) are compiled once per instruction set and the library picks one at run time
from the CPU's features, so one build runs on any CPU of its architecture: on x86-64, AVX-512, AVX2+FMA
and generic x86-64 (SSE2); elsewhere, generic only.

    python kernels/build.py        # prints what it did; exit status 1 when it could not build
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIBRARY_NAME = "libonnxmerge_kernels.so"
HEADER = "onnxruntime_cxx_api.h"
DEFAULT_INCLUDE = Path("/usr/include/onnxruntime")
COMMON = ["-O3", "-fPIC", "-std=c++17", "-fvisibility=hidden", "-Wall", "-Wextra"]
X86 = platform.machine().lower() in ("x86_64", "amd64")
BASE = ["-march=x86-64", "-mtune=generic"] if X86 else []  # what every CPU of the architecture runs
# instruction set -> (floats per vector, flags) for lookup_impl.cc. -fno-tree-vectorize: the vector
# loops are written with vector types; the scalar lookups must not become vector gathers.
ISAS = {"generic": (8, BASE)}
if X86:
    ISAS["avx2"] = (8, [*BASE, "-mavx2", "-mfma", "-mf16c", "-ffp-contract=fast"])
    ISAS["avx512"] = (16, [*BASE, "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma",
                           "-mf16c", "-mprefer-vector-width=512", "-ffp-contract=fast"])

last_reason = ""  # why the last build() returned None ("" after a success)


def find_include_dir(include_dir: str | Path | None = None) -> Path | None:
    """The first of include_dir, $ONNXRUNTIME_INCLUDE_DIR, /usr/include/onnxruntime that holds the C++ API header."""
    candidates = [include_dir, os.environ.get("ONNXRUNTIME_INCLUDE_DIR"), DEFAULT_INCLUDE]
    for c in candidates:
        if c and (Path(c) / HEADER).is_file():
            return Path(c)
    return None


def commands(include_dir: Path, out: Path, objects: Path, compiler: str = "g++") -> list[list[str]]:
    """The compile commands (one per object, independent of each other), then the link command."""
    compile_ = [[compiler, *COMMON, *BASE, f"-I{include_dir}", "-c", str(HERE / src), "-o", str(objects / f"{src}.o")]
                for src in ("pack.cc", "custom_op.cc")]
    for isa, (vec, flags) in ISAS.items():
        compile_.append([compiler, *COMMON, *flags, "-fno-tree-vectorize", "-Wno-psabi", f"-DONNXMERGE_ISA=isa_{isa}",
                         f"-DONNXMERGE_ISA_NAME=\"{isa}\"", f"-DONNXMERGE_VEC={vec}", "-c",
                         str(HERE / "lookup_impl.cc"), "-o", str(objects / f"lookup_{isa}.o")])
    link = [compiler, "-shared", *(c[-1] for c in compile_), "-o", str(out)]
    return [*compile_, link]


def build(include_dir: str | Path | None = None, out: str | Path | None = None, *, verbose: bool = False) -> Path | None:
    """Compile the library into `out` (a directory, default this one, or a path ending in .so).

    Returns the library's path, or None with the reason in `build.last_reason` (no compiler, no
    headers, or the compiler's error)."""
    global last_reason
    last_reason = ""
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        last_reason = f"no C++ compiler ({compiler}) on PATH"
        return None
    inc = find_include_dir(include_dir)
    if inc is None:
        tried = [str(p) for p in (include_dir, os.environ.get("ONNXRUNTIME_INCLUDE_DIR"), DEFAULT_INCLUDE) if p]
        last_reason = f"onnxruntime's C/C++ headers ({HEADER}) not found in: {', '.join(tried)}; set ONNXRUNTIME_INCLUDE_DIR"
        return None
    target = Path(out) if out is not None else HERE
    if target.suffix != ".so":
        target = target / LIBRARY_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    with tempfile.TemporaryDirectory(prefix="onnxmerge-kernels-") as objects:
        *compile_, link = commands(inc, tmp, Path(objects), compiler)
        for cmd in (*compile_, link):
            if verbose:
                print(" ".join(cmd))
        # the objects compile independently: in parallel, then one link
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cmd in compile_]
        results = []
        for proc in procs:
            _, err = proc.communicate()
            results.append((proc.returncode, err))
        if all(code == 0 for code, _ in results):
            proc = subprocess.run(link, capture_output=True, text=True)
            results.append((proc.returncode, proc.stderr))
    for code, err in results:
        if code != 0:
            tmp.unlink(missing_ok=True)
            last_reason = f"{compiler} failed (exit {code}):\n{err.strip()}"
            return None
        if verbose and err.strip():
            print(err.strip())
    os.replace(tmp, target)  # atomic: a loaded library is never overwritten in place
    return target


def main() -> int:
    """`python kernels/build.py`: build the library here; exit status 1 with the reason if it cannot."""
    path = build(verbose=True)
    if path is None:
        print(f"native kernels not built: {last_reason}", file=sys.stderr)
        return 1
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
