"""Build onnxmerge's native kernels: kernels/libonnxmerge_kernels.so from lookup.cc and custom_op.cc.

Needs g++ and onnxruntime's C/C++ headers (ONNXRUNTIME_INCLUDE_DIR, else /usr/include/onnxruntime;
../shared/vendor/README.md says where to get them). The library does not link libonnxruntime, and is
compiled for generic x86-64 (no -march=native) so that one build runs on any x86-64 CPU.

    python kernels/build.py        # prints what it did; exit status 1 when it could not build
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
LIBRARY_NAME = "libonnxmerge_kernels.so"
SOURCES = ("lookup.cc", "custom_op.cc")
HEADER = "onnxruntime_cxx_api.h"
DEFAULT_INCLUDE = Path("/usr/include/onnxruntime")
FLAGS = ["-O3", "-march=x86-64", "-mtune=generic", "-fPIC", "-shared", "-std=c++17", "-fvisibility=hidden", "-Wall", "-Wextra"]

last_reason = ""  # why the last build() returned None ("" after a success)


def find_include_dir(include_dir: str | Path | None = None) -> Path | None:
    """The first of include_dir, $ONNXRUNTIME_INCLUDE_DIR, /usr/include/onnxruntime that holds the C++ API header."""
    candidates = [include_dir, os.environ.get("ONNXRUNTIME_INCLUDE_DIR"), DEFAULT_INCLUDE]
    for c in candidates:
        if c and (Path(c) / HEADER).is_file():
            return Path(c)
    return None


def command(include_dir: Path, out: Path, compiler: str = "g++") -> list[str]:
    return [compiler, *FLAGS, f"-I{include_dir}", *(str(HERE / s) for s in SOURCES), "-o", str(out)]


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
    cmd = command(inc, tmp, compiler)
    if verbose:
        print(" ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        last_reason = f"{compiler} failed (exit {proc.returncode}):\n{proc.stderr.strip()}"
        return None
    if verbose and proc.stderr.strip():
        print(proc.stderr.strip())
    os.replace(tmp, target)  # atomic: a loaded library is never overwritten in place
    return target


def main() -> int:
    path = build(verbose=True)
    if path is None:
        print(f"native kernels not built: {last_reason}", file=sys.stderr)
        return 1
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
