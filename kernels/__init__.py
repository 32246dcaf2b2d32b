"""The loader of onnxmerge's native `ai.onnxmerge` custom-op kernels (EConv, EFC).

The kernels are C++ built against onnxruntime's headers (DESIGN.md, "Kernels"); until a build has
put the shared library next to this file, they are unavailable and onnxmerge uses the portable form
of every method, which runs in stock onnxruntime. `register` adds the library to a session's options.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from pathlib import Path

import onnxruntime as ort

from onnxmerge.errors import MergeError

DOMAIN = "ai.onnxmerge"
ISA_VARIABLE = "ONNXMERGE_KERNEL_ISA"  # forces an instruction set when a session creates its kernels
# forces the order of EConv's lookups of float tables, "channels" or "rows" (kernels/lookup.h,
# EConvPlan::channels), for tests and timings; chosen by the cache sizes where it is not set
ORDER_VARIABLE = "ONNXMERGE_ECONV_ORDER"
LIBRARY = Path(__file__).with_name("libonnxmerge_kernels.so")


def library_path() -> Path | None:
    """The built kernel library, or None where it is not built."""
    return LIBRARY if LIBRARY.is_file() else None


def available() -> bool:
    """Whether the native kernels are built (and can be registered in a session)."""
    return library_path() is not None


def unavailable_reason() -> str:
    """Why the native kernels are unavailable, in one line ("" where they are built)."""
    if available():
        return ""
    return (f"native kernels unavailable: {LIBRARY.name} is not built (it needs onnxruntime's C/C++ headers, "
            "see ONNXRUNTIME_INCLUDE_DIR); the portable form of each method is used instead")


def register(options: ort.SessionOptions) -> ort.SessionOptions:
    """Register the ai.onnxmerge kernels in `options`; a one-line error if they are not built."""
    path = library_path()
    if path is None:
        raise MergeError(unavailable_reason())
    options.register_custom_ops_library(str(path))
    return options


@cache
def isas() -> tuple[str, ...]:
    """The instruction sets of the built kernels that this CPU runs, best first ('avx512', 'avx2',
    'generic'); the kernels pick the first. A one-line error if they are not built."""
    path = library_path()
    if path is None:
        raise MergeError(unavailable_reason())
    query = ctypes.CDLL(str(path)).onnxmerge_kernels_isas
    query.restype = ctypes.c_char_p
    return tuple(query().decode().split(","))


@cache
def cache_sizes() -> dict:
    """The per-core cache sizes the kernels size their table blocks by, read at run time: {l1d_bytes,
    l2_bytes, source} (source: sysfs, sysconf, environment (ONNXMERGE_L1D_BYTES / ONNXMERGE_L2_BYTES,
    read when the library is loaded) or defaults). A one-line error if the kernels are not built."""
    path = library_path()
    if path is None:
        raise MergeError(unavailable_reason())
    query = ctypes.CDLL(str(path)).onnxmerge_kernels_caches
    query.restype = ctypes.c_char_p
    l1d, l2, source = query().decode().split(",")
    return {"l1d_bytes": int(l1d), "l2_bytes": int(l2), "source": source}


def isa() -> str:
    """The instruction set that sessions created now use: $ONNXMERGE_KERNEL_ISA if set, else the best."""
    return os.environ.get(ISA_VARIABLE) or isas()[0]
