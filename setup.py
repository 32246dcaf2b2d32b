"""Only the native kernels' build step: everything else about the package is in pyproject.toml.

`pip install` (editable or not) compiles kernels/libonnxmerge_kernels.so from source when g++ and
onnxruntime's C/C++ headers are found (ONNXRUNTIME_INCLUDE_DIR, else /usr/include/onnxruntime;
kernels/build.py). When they are not, or the build fails, the install still succeeds:
`onnxmerge.kernels.available()` then says why not, and onnxmerge uses the portable form.
"""

import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _builder():
    spec = importlib.util.spec_from_file_location("onnxmerge_kernels_build", HERE / "kernels" / "build.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    return builder


class KernelsDistribution(Distribution):
    """A wheel that will hold the compiled kernels is tagged for this platform, not py3-none-any."""

    def has_ext_modules(self):
        try:
            return bool(shutil.which(os.environ.get("CXX") or "g++")) and _builder().find_include_dir() is not None
        except Exception:  # noqa: BLE001 - only the wheel's tag depends on it
            return False


class BuildPyWithKernels(build_py):
    def run(self):
        super().run()
        try:
            builder = _builder()
            # editable installs import the package from the source tree; wheels from build_lib
            out = None if getattr(self, "editable_mode", False) else Path(self.build_lib) / "onnxmerge" / "kernels"
            lib = builder.build(out=out)
            reason = builder.last_reason
        except Exception as e:  # noqa: BLE001 - the install must not fail for an optional part
            lib, reason = None, f"{type(e).__name__}: {e}"
        if lib is None:
            print(f"onnxmerge: native kernels not built ({reason.splitlines()[0] if reason else 'unknown'}); "
                  "the portable form is used", file=sys.stderr)
        else:
            print(f"onnxmerge: built native kernels {lib}", file=sys.stderr)


setup(cmdclass={"build_py": BuildPyWithKernels}, distclass=KernelsDistribution)
