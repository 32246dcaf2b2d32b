"""Random EConv / EFC layers and the numpy oracle's outputs for them, shared by the kernel tests
(onnxruntime's custom op here, the standalone program of another architecture under qemu-user)."""

from __future__ import annotations

import numpy as np

from onnxmerge.graph.ops import econv_reference, efc_reference
from onnxmerge.kernels import build as kernel_build

TOL = 1e-5  # relative to the output's largest magnitude


def rel(got: np.ndarray, want: np.ndarray) -> float:
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / max(float(np.abs(want).max()), 1e-30))


def random_layer(rng, d: int, extra_dims: tuple[int, ...]):
    """codebook [V', C, r], codes [V, *extra_dims] (uint16 when C > 256), with V = ceil(d / r) (sometimes
    one more, an all-padding segment) and V' >= V."""
    r = int(rng.integers(1, 9))
    n_codes = int(rng.choice([int(rng.integers(1, 65)), int(rng.integers(200, 301))]))
    n_seg = -(-d // r) + int(rng.random() < 0.15)
    n_seg_book = n_seg + int(rng.integers(0, 3)) * int(rng.random() < 0.4)
    codebook = rng.standard_normal((n_seg_book, n_codes, r)).astype(np.float32)
    dtype = np.uint16 if n_codes > 256 else np.uint8
    codes = rng.integers(0, n_codes, (n_seg, *extra_dims)).astype(dtype)
    return codebook, codes


# instruction set -> whether its table sums fuse multiply and add (what integer tables round depends on)
FUSED = {isa: kernel_build.fused_multiply_add(isa, target) for target in kernel_build.TARGETS
         for isa in kernel_build.isas(target)}


def econv_config(seed: int, table_bits: int = 32):
    """A random EConv layer; `table_bits` 16 or 8 adds the integer-table attribute."""
    rng = np.random.default_rng(seed)
    d, p = int(rng.integers(1, 41)), int(rng.integers(1, 17))
    kh, kw = (int(k) for k in rng.integers(1, 6, 2))
    strides = [int(s) for s in rng.integers(1, 3, 2)]
    pads = [int(q) for q in rng.integers(0, 3, 4)]
    dilations = [int(q) for q in rng.integers(1, 3, 2)] if rng.random() < 0.3 else [1, 1]
    span_h, span_w = dilations[0] * (kh - 1) + 1, dilations[1] * (kw - 1) + 1  # the dilated kernel
    h = int(rng.integers(max(1, span_h - pads[0] - pads[2]), span_h + 12))
    w = int(rng.integers(max(1, span_w - pads[1] - pads[3]), span_w + 12))
    x = rng.standard_normal((int(rng.integers(1, 4)), d, h, w)).astype(np.float32)
    codebook, codes = random_layer(rng, d, (p, kh, kw))
    bias = rng.standard_normal(p).astype(np.float32) if rng.random() < 0.5 else None
    attrs = dict(in_channels=d, kernel_shape=[kh, kw], strides=strides, pads=pads, dilations=dilations)
    return x, codebook, codes, bias, attrs | ({"table_bits": table_bits} if table_bits != 32 else {})


def efc_config(seed: int, table_bits: int = 32):
    """A random EFC layer (at times over two vectors of outputs: the int8 tables' shuffles take 32
    at once); `table_bits` 16 or 8 adds the integer-table attribute."""
    rng = np.random.default_rng(1000 + seed)
    d, out = int(rng.integers(1, 200)), int(rng.integers(1, 70))
    x = rng.standard_normal((int(rng.integers(1, 4)), d)).astype(np.float32)
    codebook, codes = random_layer(rng, d, (out,))
    bias = rng.standard_normal(out).astype(np.float32) if rng.random() < 0.5 else None
    return x, codebook, codes, bias, dict(in_features=d) | ({"table_bits": table_bits} if table_bits != 32 else {})


def reference(op, x, codebook, codes, bias, attrs, isa: str = "generic"):
    """The numpy oracle's output; integer tables rounded as instruction set `isa` computes them."""
    if op == "EFC":
        return efc_reference(x, codebook, codes, bias, table_bits=attrs.get("table_bits", 32), fused=FUSED[isa])
    return econv_reference(x, codebook, codes, bias, strides=attrs["strides"], pads=attrs["pads"],
                           dilations=attrs.get("dilations", [1, 1]), table_bits=attrs.get("table_bits", 32),
                           fused=FUSED[isa])
