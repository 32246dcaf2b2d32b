"""Build onnxmerge's native kernels: kernels/libonnxmerge_kernels.so, for this machine or another CPU architecture.

Needs g++ and onnxruntime's C/C++ headers (ONNXRUNTIME_INCLUDE_DIR, else /usr/include/onnxruntime;
../shared/vendor/README.md says where to get them). The library does not link libonnxruntime. The hot
loops (lookup_impl.cc) are compiled once per instruction set and the library picks one at run time
from the CPU's features, so one build runs on any CPU of its architecture: on x86-64, AVX-512, AVX2+FMA
and generic x86-64 (SSE2); on aarch64, NEON (128-bit vectors) and generic (the same vector code at
twice the width, which the compiler splits into NEON pairs); elsewhere, generic only.

    python kernels/build.py                    # this machine; exit status 1 with the reason when it cannot
    python kernels/build.py --target aarch64   # cross-compiled (Debian: g++-aarch64-linux-gnu) into
                                               # kernels/build-aarch64/libonnxmerge_kernels.so, for a board

`build_standalone` builds the kernels' arithmetic without onnxruntime (kernels/standalone.cc) as a
static program, which qemu-user runs where the target is another architecture (the tests do).
"""

from __future__ import annotations

import argparse
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
HOST = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())
TARGETS = ("x86_64", "aarch64")  # what --target names; the host's own architecture is built for any host
ARCHES = tuple(sorted({HOST, *TARGETS}))  # what can be built here: this machine's and the cross targets
CROSS_COMPILERS = {"x86_64": "x86_64-linux-gnu-g++", "aarch64": "aarch64-linux-gnu-g++"}


def base_flags(target: str) -> list[str]:
    """What every CPU of the architecture runs."""
    return {"x86_64": ["-march=x86-64", "-mtune=generic"], "aarch64": ["-march=armv8-a"]}.get(target, [])


def isas(target: str = HOST) -> dict[str, tuple[int, list[str]]]:
    """instruction set -> (floats per vector, flags) for lookup_impl.cc on `target`. -fno-tree-vectorize
    (added by `commands`): the vector loops are written with vector types; the scalar lookups must not
    become vector gathers."""
    base = base_flags(target)
    # whether multiply-adds are fused is stated per set: the integer tables' numpy reference computes
    # the same roundings (fused_multiply_add); without it GCC fuses for C++ wherever the CPU can
    found = {"generic": (8, [*base, "-ffp-contract=off"])}
    if target == "x86_64":
        found["avx2"] = (8, [*base, "-mavx2", "-mfma", "-mf16c", "-ffp-contract=fast"])
        found["avx512"] = (16, [*base, "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx2", "-mfma",
                                "-mf16c", "-mprefer-vector-width=512", "-ffp-contract=fast"])
    elif target == "aarch64":
        # 128-bit vectors; 8 output rows accumulated together, as with AVX-512: NEON has 32 vector
        # registers too (chosen by register count; no aarch64 CPU has timed it yet)
        found["neon"] = (4, [*base, "-ffp-contract=fast", "-DONNXMERGE_ROWS=8"])
    return found


def fused_multiply_add(isa: str, target: str = HOST) -> bool:
    """Whether `isa`'s kernels fuse a multiply and an add into one rounding (the table sums)."""
    return "-ffp-contract=fast" in isas(target)[isa][1]


last_reason = ""  # why the last build() returned None ("" after a success)


def find_include_dir(include_dir: str | Path | None = None) -> Path | None:
    """The first of include_dir, $ONNXRUNTIME_INCLUDE_DIR, /usr/include/onnxruntime that holds the C++ API header."""
    candidates = [include_dir, os.environ.get("ONNXRUNTIME_INCLUDE_DIR"), DEFAULT_INCLUDE]
    for c in candidates:
        if c and (Path(c) / HEADER).is_file():
            return Path(c)
    return None


def commands(include_dir: Path | None, out: Path, objects: Path, compiler: str = "g++", target: str = HOST,
             standalone: bool = False) -> list[list[str]]:
    """The compile commands (one per object, independent of each other), then the link command: the
    custom-op library, or with `standalone` the static program of kernels/standalone.cc (no headers)."""
    base = base_flags(target)
    sources = ("pack.cc", "standalone.cc") if standalone else ("pack.cc", "custom_op.cc")
    include = [] if include_dir is None else [f"-I{include_dir}"]
    compile_ = [[compiler, *COMMON, *base, *include, "-c", str(HERE / src), "-o", str(objects / f"{src}.o")]
                for src in sources]
    for isa, (vec, flags) in isas(target).items():
        compile_.append([compiler, *COMMON, *flags, "-fno-tree-vectorize", "-Wno-psabi", f"-DONNXMERGE_ISA=isa_{isa}",
                         f"-DONNXMERGE_ISA_NAME=\"{isa}\"", f"-DONNXMERGE_VEC={vec}", "-c",
                         str(HERE / "lookup_impl.cc"), "-o", str(objects / f"lookup_{isa}.o")])
    link = [compiler, "-static" if standalone else "-shared", *(c[-1] for c in compile_), "-o", str(out)]
    return [*compile_, link]


def compiler_for(target: str) -> str:
    """$CXX, else g++ for this machine's architecture, else the Debian cross compiler for `target`."""
    if os.environ.get("CXX"):
        return os.environ["CXX"]
    return "g++" if target == HOST else CROSS_COMPILERS.get(target, f"{target}-linux-gnu-g++")


def _compile(out: Path, include_dir: Path | None, compiler: str, target: str, standalone: bool,
             verbose: bool) -> Path | None:
    """Run the independent compiles in parallel, then the link into a temporary file beside `out`,
    then move it to `out`; None with the compiler's error in `last_reason`."""
    global last_reason
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tempfile.TemporaryDirectory(prefix="onnxmerge-kernels-") as objects:
        *compile_, link = cmds = commands(include_dir, tmp, Path(objects), compiler, target, standalone)
        for cmd in cmds:
            if verbose:
                print(" ".join(cmd))
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
    os.replace(tmp, out)  # atomic: a loaded library is never overwritten in place
    return out


def default_out(target: str = HOST) -> Path:
    """Where the library of `target` goes: next to this file for this machine (the package loads it
    from there), kernels/build-TARGET/ for another architecture."""
    return HERE if target == HOST else HERE / f"build-{target}"


def build(include_dir: str | Path | None = None, out: str | Path | None = None, *, target: str = HOST,
          verbose: bool = False) -> Path | None:
    """Compile the library for `target` into `out` (a directory, default `default_out(target)`, or a
    path ending in .so).

    Returns the library's path, or None with the reason in `build.last_reason` (no compiler, no
    headers, or the compiler's error)."""
    global last_reason
    compiler = _find_compiler(target)
    if compiler is None:
        return None
    inc = find_include_dir(include_dir)
    if inc is None:
        tried = [str(p) for p in (include_dir, os.environ.get("ONNXRUNTIME_INCLUDE_DIR"), DEFAULT_INCLUDE) if p]
        last_reason = f"onnxruntime's C/C++ headers ({HEADER}) not found in: {', '.join(tried)}; set ONNXRUNTIME_INCLUDE_DIR"
        return None
    target_path = Path(out) if out is not None else default_out(target)
    if target_path.suffix != ".so":
        target_path = target_path / LIBRARY_NAME
    return _compile(target_path, inc, compiler, target, standalone=False, verbose=verbose)


def build_standalone(out: str | Path, *, target: str = HOST, verbose: bool = False) -> Path | None:
    """Compile kernels/standalone.cc for `target` into the static program `out`; None with the reason
    in `last_reason` where it cannot (no compiler for the target)."""
    compiler = _find_compiler(target)
    return None if compiler is None else _compile(Path(out), None, compiler, target, standalone=True, verbose=verbose)


def _find_compiler(target: str) -> str | None:
    """The compiler for `target` (compiler_for), or None with the reason in `last_reason`."""
    global last_reason
    compiler = compiler_for(target)
    last_reason = "" if shutil.which(compiler) else f"no C++ compiler for {target} ({compiler}) on PATH"
    return None if last_reason else compiler


def main(argv: list[str] | None = None) -> int:
    """`python kernels/build.py [--target ARCH] [-o OUT]`: build the library; exit status 1 with the
    reason if it cannot."""
    parser = argparse.ArgumentParser(description="Build onnxmerge's native kernels.")
    parser.add_argument("--target", default=HOST, choices=ARCHES,
                        help=f"CPU architecture (default this machine's, {HOST}); another one is cross-compiled")
    parser.add_argument("-o", "--out", help="directory or .so path (default: next to this file for this machine, "
                                            "kernels/build-ARCH/ for another)")
    args = parser.parse_args(argv)
    path = build(out=args.out, target=args.target, verbose=True)
    if path is None:
        print(f"native kernels not built: {last_reason}", file=sys.stderr)
        return 1
    print(f"built {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
