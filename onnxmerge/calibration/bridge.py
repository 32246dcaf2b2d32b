"""The bridge to PyTorch: an ONNX graph as a `torch.nn.Module` for calibration, and back.

Calibration (DESIGN.md, "Calibration") fine-tunes a merged model in PyTorch and writes the trained
weights back into the ONNX initializers, so the graph itself never changes. `OnnxModule` therefore
does not translate the graph into PyTorch layers: it interprets the ONNX node list with a table of
op implementations (`OPS`, tinygrad style) over the initializers held as parameters.

- One parameter per initializer name. A weight that several nodes read (shared between tasks on
  purpose) is one `nn.Parameter`, so autograd sums the gradients of all its readers and the
  optimizer applies one update, which is what sharing means.
- Float initializers and float `Constant` values become parameters (float32, whatever their ONNX
  float type; `write_back` restores the type). Everything else (int64 shapes and pads, the integer
  code assignments of codebook layers) becomes a buffer: it moves with `.to(device)` but is never
  trained. `Constant` nodes are therefore not run; their value is read like an initializer.
- `forward` runs only the nodes that the requested tensors depend on, so a per-layer loss can ask
  for intermediate tensors, and one task of a merged model runs without the other tasks' inputs.
- On a CPU, 2-D convolutions run channels-last and Clip's fixed bounds as numbers (hardtanh): the
  same values, and a MobileNet pair's training step in half the time (`_conv`, `_clip`).

Each op follows the ONNX operator spec for opsets 13-21 (where inputs replaced attributes, both forms:
Clip min/max, Pad pads, Reshape shape, Squeeze/Unsqueeze axes, Split split, the Reduce ops' axes), and
enough of the rest (Resize 18/19, Upsample 9, GroupNormalization 18 and 21, Swish 24) for the CNN graphs
onnxruntime runs; the module matches onnxruntime with graph optimisations off to float rounding
(tests/calibration/test_bridge.py). What an op cannot do (Resize cubic, ConvTranspose auto_pad, ...) and
what fails inside an op are one-line `MergeError`s naming the node. On CUDA, cuDNN convolutions use TF32 by
default (`torch.backends.cudnn.allow_tf32`); turn that off where ONNX-exact float32 is needed.

The bridge does not use onnx2torch (an ONNX->PyTorch converter): it imports torchvision, whose PyPI wheel
links CUDA and fails to import with the CPU build of torch; its converters were consulted for semantics only.

Extending: `@register_op("OpType")` (or `register_op("OpType", domain="ai.onnxmerge")`, keyed
"ai.onnxmerge.OpType") adds an op; its function gets the NodeProto, the input tensors (None for an
omitted optional input) and the attributes as a dict, and returns a tensor or a list of tensors (one
per node output). Ops are looked up when the module is built, so register before building.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from onnxmerge.errors import MergeError
from onnxmerge.graph.convert import FLOAT_TYPES

__all__ = ["OPS", "register_op", "OnnxModule", "to_module"]

OPS: dict[str, Callable] = {}

_MIN_OPSET = 13  # Softmax's axis semantics and Squeeze/Unsqueeze's axes input date from opset 13
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # torch.* since 2.5


def register_op(op_type: str, domain: str = ""):
    """Decorator: add an op implementation `fn(node, inputs, attrs) -> Tensor | list[Tensor]`."""
    def add(fn: Callable) -> Callable:
        OPS[_op_key(op_type, domain)] = fn
        return fn
    return add


def _op_key(op_type: str, domain: str) -> str:
    return op_type if domain in ("", "ai.onnx") else f"{domain}.{op_type}"


# ----------------------------------------------------------------------------------------------
# ops. pads in ONNX are [x1_begin, x2_begin, ..., x1_end, x2_end, ...] over the spatial axes.


def _torch_pad(begins: list[int], ends: list[int]) -> list[int]:
    """ONNX begin/end pads of the trailing axes -> F.pad's (last_begin, last_end, prev_begin, ...)."""
    return [p for b, e in zip(reversed(begins), reversed(ends)) for p in (b, e)]


def _window_pads(attrs: dict, x: torch.Tensor, kernel: list[int], *, pool: bool) -> tuple[list[int], list[int]]:
    """(begins, ends) pads of the spatial axes of a Conv or pool, auto_pad included.

    For pools, ends also grow by what ceil_mode adds, so that a floor-mode window over the padded
    input gives ONNX's output size: ceil((in + pads - dilated kernel) / stride) + 1, less one where
    the last window would start in the end padding (onnxruntime's and PyTorch's rule)."""
    spatial = x.shape[2:]
    n = len(spatial)
    strides = attrs.get("strides", [1] * n)
    dilations = attrs.get("dilations", [1] * n)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    pads = attrs.get("pads", [0] * 2 * n)
    begins, ends = list(pads[:n]), list(pads[n:])
    for i, (size, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations)):
        span = d * (k - 1) + 1
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            total = max(0, (math.ceil(size / s) - 1) * s + span - size)
            small, big = total // 2, total - total // 2
            begins[i], ends[i] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
        elif auto_pad == "VALID":
            begins[i] = ends[i] = 0
        elif auto_pad != "NOTSET":
            raise MergeError(f"auto_pad {auto_pad!r} is not an ONNX auto_pad value")
        if pool and attrs.get("ceil_mode", 0):
            out = math.ceil((size + begins[i] + ends[i] - span) / s) + 1
            if (out - 1) * s >= size + begins[i]:
                out -= 1
            ends[i] += max(0, (out - 1) * s + span - (size + begins[i] + ends[i]))
    return begins, ends


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


@register_op("Conv")
def _conv(node, inputs, attrs):
    x, w, b = (inputs + [None])[:3]
    n = w.dim() - 2
    begins, ends = _window_pads(attrs, x, list(w.shape[2:]), pool=False)
    if begins != ends:  # torch pads symmetrically only
        x, begins = F.pad(x, _torch_pad(begins, ends)), [0] * n
    if n == 2 and x.device.type == "cpu":
        # on a CPU (oneDNN) convolutions train faster channels-last (an Intel Xeon, the budget suite's
        # layers forward and backward: depthwise 1.4-4x, dense 1.1-2.8x, the most for few input
        # channels); the layout carries on through the layers after it, the values do not depend on it
        x = x.contiguous(memory_format=torch.channels_last)
    return _CONV[n](x, w, b, stride=attrs.get("strides", 1), padding=begins,
                    dilation=attrs.get("dilations", 1), groups=attrs.get("group", 1))


@register_op("MaxPool")
def _max_pool(node, inputs, attrs):
    if len(node.output) > 1 and node.output[1]:
        raise MergeError(f"MaxPool node {node.name!r}: the Indices output is not supported")
    x, kernel = inputs[0], attrs["kernel_shape"]
    begins, ends = _window_pads(attrs, x, kernel, pool=True)
    if any(begins + ends):  # -inf padding never wins a max (and lifts torch's half-a-kernel limit)
        x = F.pad(x, _torch_pad(begins, ends), value=-math.inf)
    return _MAX_POOL[len(kernel)](x, kernel, attrs.get("strides", [1] * len(kernel)),
                                  dilation=attrs.get("dilations", 1))


@register_op("AveragePool")
def _avg_pool(node, inputs, attrs):
    """Window sums over the explicitly padded input, divided by the number of elements counted: the
    input's, plus the pads' when count_include_pad, never the extra end that ceil_mode adds."""
    x, kernel = inputs[0], attrs["kernel_shape"]
    if any(d != 1 for d in attrs.get("dilations", [])):
        raise MergeError(f"AveragePool node {node.name!r}: dilations are not supported")
    pool, strides, size = _AVG_POOL[len(kernel)], attrs.get("strides", [1] * len(kernel)), math.prod(kernel)
    begins, ends = _window_pads(attrs, x, kernel, pool=True)
    if not any(begins + ends):
        return pool(x, kernel, strides)
    sums = pool(F.pad(x, _torch_pad(begins, ends)), kernel, strides) * size
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    if attrs.get("count_include_pad", 0):
        _, pad_ends = _window_pads(dict(attrs, ceil_mode=0), x, kernel, pool=True)
        ones = F.pad(ones, _torch_pad(begins, pad_ends), value=1.0)
        begins, ends = [0] * len(kernel), [e - p for e, p in zip(ends, pad_ends)]
    counts = pool(F.pad(ones, _torch_pad(begins, ends)), kernel, strides) * size
    return sums / counts


@register_op("GlobalAveragePool")
def _global_avg_pool(node, inputs, attrs):
    x = inputs[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@register_op("Gemm")
def _gemm(node, inputs, attrs):
    a, b, c = (inputs + [None])[:3]
    a = a.t() if attrs.get("transA", 0) else a
    b = b.t() if attrs.get("transB", 0) else b
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    y = a @ b if alpha == 1.0 else alpha * (a @ b)
    if c is None:
        return y
    return y + (c if beta == 1.0 else beta * c)


@register_op("BatchNormalization")
def _batch_norm(node, inputs, attrs):
    """Inference form, written out rather than F.batch_norm: the running statistics are inputs of
    the graph (parameters here), and F.batch_norm has no gradient for them."""
    if attrs.get("training_mode", 0):
        raise MergeError(f"BatchNormalization node {node.name!r}: training_mode=1 is not supported")
    x, scale, bias, mean, var = inputs[:5]
    shape = (-1,) + (1,) * (x.dim() - 2)
    inv = torch.rsqrt(var + attrs.get("epsilon", 1e-5)).reshape(shape)
    return (x - mean.reshape(shape)) * inv * scale.reshape(shape) + bias.reshape(shape)


@register_op("Clip")
def _clip(node, inputs, attrs):
    x, lo, hi = (inputs + [None, None])[:3]
    if lo is None and hi is None:
        return x
    if x.device.type != "cpu" or any(b is not None and b.requires_grad for b in (lo, hi)):
        return torch.clamp(x, lo, hi)  # (on a GPU, reading the bounds as numbers would wait for it)
    # fixed bounds (ReLU6's 0 and 6: calibration never trains them) as numbers (a missing one
    # infinite) in hardtanh: its backward is one vectorised kernel, where clamp's builds masks with
    # comparisons and wheres (a third of a MobileNet's training step on a CPU); hardtanh refuses
    # lo > hi, where clamp gives hi everywhere
    lo = -math.inf if lo is None else lo.item()
    hi = math.inf if hi is None else hi.item()
    return F.hardtanh(x, lo, hi) if lo <= hi else torch.clamp(x, lo, hi)


@register_op("Reshape")
def _reshape(node, inputs, attrs):
    x, shape = inputs[0], inputs[1].tolist()
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


@register_op("Flatten")
def _flatten(node, inputs, attrs):
    x = inputs[0]
    axis = attrs.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis  # ONNX: axis in [-rank, rank]
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _pad_index(n: int, begin: int, end: int, mode: str, device) -> torch.Tensor:
    """Source positions of one padded axis (negative pads crop): reflect mirrors without repeating
    the edge, edge repeats it, wrap is periodic."""
    i = torch.arange(-begin, n + end, device=device)
    if mode == "edge":
        return i.clamp(0, n - 1)
    if mode == "wrap":
        return i % n
    i = i.abs()
    return torch.where(i > n - 1, 2 * (n - 1) - i, i)


@register_op("Pad")
def _pad(node, inputs, attrs):
    x, pads, value, axes = (inputs + [None, None, None])[:4]
    pads = pads.tolist()
    axes = [a % x.dim() for a in axes.tolist()] if axes is not None else list(range(x.dim()))
    begins, ends = [0] * x.dim(), [0] * x.dim()
    for k, a in enumerate(axes):
        begins[a], ends[a] = pads[k], pads[k + len(axes)]
    mode = attrs.get("mode", "constant")
    if mode == "constant":
        fill = 0.0 if value is None or value.numel() == 0 else value.item()
        return F.pad(x, _torch_pad(begins, ends), value=fill)
    if mode not in ("reflect", "edge", "wrap"):
        raise MergeError(f"Pad node {node.name!r}: mode {mode!r} is not an ONNX pad mode")
    for a in range(x.dim()):
        if begins[a] or ends[a]:
            x = x.index_select(a, _pad_index(x.shape[a], begins[a], ends[a], mode, x.device))
    return x


@register_op("Gather")
def _gather(node, inputs, attrs):
    """index_select over the flattened indices: its backward adds up the gradients of repeated
    indices, so a codeword used by many weights gets the sum of their gradients."""
    data, idx = inputs
    axis = attrs.get("axis", 0) % data.dim()
    idx = torch.where(idx < 0, idx + data.shape[axis], idx).long()
    out = data.index_select(axis, idx.reshape(-1))
    return out.reshape(data.shape[:axis] + idx.shape + data.shape[axis + 1:])


@register_op("GatherElements")
def _gather_elements(node, inputs, attrs):
    """torch.gather's backward also adds up repeated indices: a codeword's gradient is the sum over
    the kernel pieces that use it (NeuralMerger eq. 11)."""
    data, idx = inputs
    axis = attrs.get("axis", 0) % data.dim()
    idx = idx.long()
    return data.gather(axis, torch.where(idx < 0, idx + data.shape[axis], idx))


@register_op("Range")
def _range(node, inputs, attrs):
    start, limit, delta = (t.item() for t in inputs)
    return torch.arange(start, limit, delta, dtype=inputs[0].dtype, device=inputs[0].device)


@register_op("Expand")
def _expand(node, inputs, attrs):
    x, shape = inputs[0], inputs[1].tolist()
    # ONNX Expand broadcasts both ways (a 1 in `shape` keeps x's dim): broadcast_shapes does that
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(shape)))


@register_op("Slice")
def _slice(node, inputs, attrs):
    """Positive steps slice; negative steps gather the indices begin, begin + step, ... (torch has no
    negative slice step), with ONNX's clamping: begin to [0, n - 1], end to [-1, n - 1]."""
    x, starts, ends = inputs[:3]
    axes = inputs[3].tolist() if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
    steps = inputs[4].tolist() if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    for a, b, e, st in zip(axes, starts.tolist(), ends.tolist(), steps):
        a = a % x.dim()
        n = x.shape[a]
        b, e = (b + n if b < 0 else b), (e + n if e < 0 else e)
        if st > 0:
            x = x[(slice(None),) * a + (slice(max(0, min(b, n)), max(0, min(e, n)), st),)]
        elif st < 0:
            b, e = max(0, min(b, n - 1)), max(-1, min(e, n - 1))
            x = x.index_select(a, torch.arange(b, e, st, device=x.device))
        else:
            raise MergeError(f"Slice node {node.name!r}: a step of 0 is not allowed")
    return x


_TP = onnx.TensorProto
_TORCH_TYPES = {_TP.FLOAT: torch.float32, _TP.DOUBLE: torch.float64, _TP.FLOAT16: torch.float16,
                _TP.BFLOAT16: torch.bfloat16, _TP.INT64: torch.int64, _TP.INT32: torch.int32, _TP.INT16: torch.int16,
                _TP.INT8: torch.int8, _TP.UINT8: torch.uint8, _TP.BOOL: torch.bool}


@register_op("Cast")
def _cast(node, inputs, attrs):
    to = attrs["to"]
    if to not in _TORCH_TYPES:
        raise MergeError(f"Cast node {node.name!r}: casting to {_TP.DataType.Name(to)} is not supported")
    return inputs[0].to(_TORCH_TYPES[to])


@register_op("CastLike")
def _cast_like(node, inputs, attrs):
    return inputs[0].to(inputs[1].dtype)


def _codebook_weight(codebook: torch.Tensor, codes: torch.Tensor, depth: int) -> torch.Tensor:
    """The dense weight of a codebook layer (onnxmerge.passes.codebook._codebook.reconstruct): conv [p, d, n, m] from
    codes [V, p, n, m], fc [out, d] from codes [V, out]; differentiable in the codebook."""
    v, r = codes.shape[0], codebook.shape[2]
    flat = codes.long().reshape(v, -1, 1).expand(-1, -1, r)
    vec = codebook[:v].gather(1, flat).reshape(*codes.shape, r)  # [V, ..., r]
    if codes.dim() == 4:
        return vec.permute(1, 0, 4, 2, 3).reshape(codes.shape[1], v * r, *codes.shape[2:])[:, :depth]
    return vec.permute(1, 0, 2).reshape(codes.shape[1], v * r)[:, :depth]


@register_op("EConv", domain="ai.onnxmerge")
def _econv(node, inputs, attrs):
    x, codebook, codes, b = (inputs + [None])[:4]
    w = _codebook_weight(codebook, codes, attrs["in_channels"])
    return _conv(node, [x, w, b], attrs)


@register_op("EFC", domain="ai.onnxmerge")
def _efc(node, inputs, attrs):
    x, codebook, codes, b = (inputs + [None])[:4]
    y = x @ _codebook_weight(codebook, codes, attrs["in_features"]).t()
    return y if b is None else y + b


@register_op("Dropout")
def _dropout(node, inputs, attrs):
    """Inference: identity. Calibration fine-tunes the deployed (inference) graph."""
    x = inputs[0]
    return [x, torch.ones_like(x, dtype=torch.bool)][:len(node.output)]


@register_op("Shape")
def _shape(node, inputs, attrs):
    dims = list(inputs[0].shape)[attrs.get("start", 0):attrs.get("end", None)]
    return torch.tensor(dims, dtype=torch.int64, device=inputs[0].device)


@register_op("Squeeze")
def _squeeze(node, inputs, attrs):
    x = inputs[0]
    axes = inputs[1].tolist() if len(inputs) > 1 and inputs[1] is not None else \
        [i for i, d in enumerate(x.shape) if d == 1]
    return x.squeeze(tuple(a % x.dim() for a in axes))


@register_op("Unsqueeze")
def _unsqueeze(node, inputs, attrs):
    x, axes = inputs[0], inputs[1].tolist()
    rank = x.dim() + len(axes)
    for a in sorted(a % rank for a in axes):
        x = x.unsqueeze(a)
    return x


def _div(a, b):
    # ONNX integer Div truncates; torch's `/` would promote to float
    return torch.div(a, b, rounding_mode="trunc") if not (a.is_floating_point() or b.is_floating_point()) else a / b


_SIMPLE: dict[str, Callable] = {
    "Add": lambda i, a: i[0] + i[1],
    "Sub": lambda i, a: i[0] - i[1],
    "Mul": lambda i, a: i[0] * i[1],
    "Div": lambda i, a: _div(i[0], i[1]),
    "MatMul": lambda i, a: torch.matmul(i[0], i[1]),
    "Relu": lambda i, a: torch.relu(i[0]),
    "LeakyRelu": lambda i, a: F.leaky_relu(i[0], a.get("alpha", 0.01)),
    "Sigmoid": lambda i, a: torch.sigmoid(i[0]),
    "Tanh": lambda i, a: torch.tanh(i[0]),
    "Softmax": lambda i, a: torch.softmax(i[0], a.get("axis", -1)),
    "Concat": lambda i, a: torch.cat(i, a["axis"]),
    "Transpose": lambda i, a: i[0].permute(a.get("perm", list(range(i[0].dim()))[::-1])),
    "Identity": lambda i, a: i[0],
}
for _name, _fn in _SIMPLE.items():
    OPS[_name] = (lambda fn: lambda node, inputs, attrs: fn(inputs, attrs))(_fn)


# ----------------------------------------------------------------------------------------------
# activations and elementwise ops beyond the models the project trained itself


def _pow(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ONNX Pow keeps the base's type. The exponent is not trained: it is structure (2 in a decomposed
    LayerNorm, 3 in a tanh Gelu), and its gradient a^b ln a is NaN wherever the base is negative."""
    y = torch.pow(a, b.detach())
    return y if y.dtype == a.dtype else y.to(a.dtype)


def _fold(fn: Callable, tensors: list[torch.Tensor]) -> torch.Tensor:
    out = tensors[0]
    for t in tensors[1:]:
        out = fn(out, t)
    return out


_SELU_ALPHA, _SELU_GAMMA = 1.67326319217681884765625, 1.05070102214813232421875  # the spec's defaults
_SIMPLE_MORE: dict[str, Callable] = {
    "HardSigmoid": lambda i, a: torch.clamp(a.get("alpha", 0.2) * i[0] + a.get("beta", 0.5), 0.0, 1.0),
    "HardSwish": lambda i, a: i[0] * torch.clamp(i[0] / 6 + 0.5, 0.0, 1.0),
    "Elu": lambda i, a: F.elu(i[0], a.get("alpha", 1.0)),
    "Selu": lambda i, a: a.get("gamma", _SELU_GAMMA) * F.elu(i[0], a.get("alpha", _SELU_ALPHA)),
    "Celu": lambda i, a: F.celu(i[0], a.get("alpha", 1.0)),
    "Softplus": lambda i, a: F.softplus(i[0]),
    "Softsign": lambda i, a: i[0] / (1 + i[0].abs()),
    "PRelu": lambda i, a: torch.where(i[0] < 0, i[0] * i[1], i[0]),  # slope broadcasts to x
    "ThresholdedRelu": lambda i, a: torch.where(i[0] > a.get("alpha", 1.0), i[0], torch.zeros_like(i[0])),
    "Gelu": lambda i, a: F.gelu(i[0], approximate=a.get("approximate", "none")),
    "Erf": lambda i, a: torch.erf(i[0]),
    "Mish": lambda i, a: F.mish(i[0]),
    "Swish": lambda i, a: i[0] * torch.sigmoid(a.get("alpha", 1.0) * i[0]),
    "LogSoftmax": lambda i, a: torch.log_softmax(i[0], a.get("axis", -1)),
    "Hardmax": lambda i, a: torch.zeros_like(i[0]).scatter_(a.get("axis", -1), i[0].argmax(a.get("axis", -1), True), 1),
    "Sum": lambda i, a: _fold(torch.add, i),
    "Mean": lambda i, a: _fold(torch.add, i) / len(i),
    "Max": lambda i, a: _fold(torch.maximum, i),
    "Min": lambda i, a: _fold(torch.minimum, i),
    "Pow": lambda i, a: _pow(i[0], i[1]),
    "Sqrt": lambda i, a: torch.sqrt(i[0]),
    "Exp": lambda i, a: torch.exp(i[0]),
    "Log": lambda i, a: torch.log(i[0]),
    "Neg": lambda i, a: torch.neg(i[0]),
    "Abs": lambda i, a: torch.abs(i[0]),
    "Reciprocal": lambda i, a: torch.reciprocal(i[0]),
    "Floor": lambda i, a: torch.floor(i[0]),
    "Ceil": lambda i, a: torch.ceil(i[0]),
    "Round": lambda i, a: torch.round(i[0]),  # half to even, as ONNX
    "Sign": lambda i, a: torch.sign(i[0]),
    "Sin": lambda i, a: torch.sin(i[0]),
    "Cos": lambda i, a: torch.cos(i[0]),
    "Where": lambda i, a: torch.where(i[0], i[1], i[2]),
    "Equal": lambda i, a: torch.eq(i[0], i[1]),
    "Greater": lambda i, a: torch.gt(i[0], i[1]),
    "GreaterOrEqual": lambda i, a: torch.ge(i[0], i[1]),
    "Less": lambda i, a: torch.lt(i[0], i[1]),
    "LessOrEqual": lambda i, a: torch.le(i[0], i[1]),
    "Not": lambda i, a: torch.logical_not(i[0]),
    "And": lambda i, a: torch.logical_and(i[0], i[1]),
    "Or": lambda i, a: torch.logical_or(i[0], i[1]),
    "Xor": lambda i, a: torch.logical_xor(i[0], i[1]),
    # fmod=0 (integers only): the remainder takes the divisor's sign, as Python's %
    "Mod": lambda i, a: torch.fmod(i[0], i[1]) if a.get("fmod", 0) else torch.remainder(i[0], i[1]),
    "Einsum": lambda i, a: torch.einsum(a["equation"].replace(" ", ""), *i),
    "Size": lambda i, a: torch.tensor(i[0].numel(), dtype=torch.int64, device=i[0].device),
    "Tile": lambda i, a: i[0].repeat(i[1].tolist()),
    "NonZero": lambda i, a: torch.nonzero(i[0]).t().contiguous(),  # row-major order, as ONNX
    "GlobalMaxPool": lambda i, a: i[0].amax(dim=tuple(range(2, i[0].dim())), keepdim=True),
}
for _name, _fn in _SIMPLE_MORE.items():
    OPS[_name] = (lambda fn: lambda node, inputs, attrs: fn(inputs, attrs))(_fn)


@register_op("Trilu")
def _trilu(node, inputs, attrs):
    k = int(inputs[1].item()) if len(inputs) > 1 and inputs[1] is not None else 0
    return torch.triu(inputs[0], k) if attrs.get("upper", 1) else torch.tril(inputs[0], k)


@register_op("CumSum")
def _cumsum(node, inputs, attrs):
    x, axis = inputs[0], int(inputs[1].item()) % inputs[0].dim()
    if attrs.get("reverse", 0):
        x = x.flip(axis)
    y = x.cumsum(axis).to(x.dtype)  # torch sums small integers as int64
    if attrs.get("exclusive", 0):
        y = torch.cat([torch.zeros_like(y.narrow(axis, 0, 1)), y.narrow(axis, 0, y.shape[axis] - 1)], axis)
    return y.flip(axis) if attrs.get("reverse", 0) else y


@register_op("ConstantOfShape")
def _constant_of_shape(node, inputs, attrs):
    value = attrs.get("value")
    fill = torch.from_numpy(numpy_helper.to_array(value).reshape(-1)[:1].copy()) if value is not None \
        else torch.zeros(1, dtype=torch.float32)
    return fill.to(inputs[0].device).reshape(()).expand(inputs[0].tolist()).clone()


# ----------------------------------------------------------------------------------------------
# normalisation, pooling, reductions


@register_op("LRN")
def _lrn(node, inputs, attrs):
    """x / (bias + alpha / size * sum of x^2 over channels c - floor((size-1)/2) .. c + ceil((size-1)/2))^beta.
    Written out: F.local_response_norm centres an even window the other way."""
    x, size = inputs[0], attrs["size"]
    before = (size - 1) // 2
    sq = F.pad(x * x, [0, 0] * (x.dim() - 2) + [before, size - 1 - before])
    window = _fold(torch.add, [sq.narrow(1, i, x.shape[1]) for i in range(size)])
    return x / (attrs.get("bias", 1.0) + attrs.get("alpha", 1e-4) / size * window) ** attrs.get("beta", 0.75)


@register_op("LpNormalization")
def _lp_normalization(node, inputs, attrs):
    p = attrs.get("p", 2)
    if p not in (1, 2):
        raise MergeError(f"LpNormalization node {node.name!r}: p={p} is not supported (1 or 2)")
    x = inputs[0]
    return x / torch.linalg.vector_norm(x, p, dim=attrs.get("axis", -1), keepdim=True)


def _normalise(x: torch.Tensor, dims: tuple[int, ...], eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(normalised x, mean, 1 / sqrt(biased variance + eps)) over `dims`, kept as size-1 dims."""
    mean = x.mean(dims, keepdim=True)
    d = x - mean
    inv = torch.rsqrt((d * d).mean(dims, keepdim=True) + eps)
    return d * inv, mean, inv


@register_op("InstanceNormalization")
def _instance_norm(node, inputs, attrs):
    x, scale, bias = inputs
    y = _normalise(x, tuple(range(2, x.dim())), attrs.get("epsilon", 1e-5))[0]
    shape = (-1,) + (1,) * (x.dim() - 2)
    return y * scale.reshape(shape) + bias.reshape(shape)


@register_op("LayerNormalization")
def _layer_norm(node, inputs, attrs):
    """Outputs Y and, when asked for, Mean and InvStdDev (X's shape with 1 from `axis` on)."""
    x, scale, bias = (inputs + [None])[:3]
    axis = attrs.get("axis", -1) % x.dim()
    y, mean, inv = _normalise(x, tuple(range(axis, x.dim())), attrs.get("epsilon", 1e-5))
    y = y * scale
    return [y if bias is None else y + bias, mean, inv][:len(node.output)]


@register_op("GroupNormalization")
def _group_norm(node, inputs, attrs):
    """Opset 21: scale and bias per channel; opset 18: per group (told apart by their size; the same
    when there are as many groups as channels)."""
    x, scale, bias = inputs
    n, c, groups = x.shape[0], x.shape[1], attrs["num_groups"]
    y = _normalise(x.reshape(n, groups, -1), (2,), attrs.get("epsilon", 1e-5))[0]
    if scale.numel() == c:
        shape = (-1,) + (1,) * (x.dim() - 2)
        return y.reshape(x.shape) * scale.reshape(shape) + bias.reshape(shape)
    if scale.numel() == groups:
        return (y * scale.reshape(-1, 1) + bias.reshape(-1, 1)).reshape(x.shape)
    raise MergeError(f"GroupNormalization node {node.name!r}: scale has {scale.numel()} values, for "
                     f"{c} channels in {groups} groups")


def _prod(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    for d in sorted(dims, reverse=True):
        x = x.prod(d, keepdim=keepdim)
    return x


_REDUCE: dict[str, Callable] = {  # (x, dims, keepdim); on empty axes with noop_with_empty_axes, x itself
    "ReduceMean": lambda x, d, k: x.mean(d, keepdim=k),
    "ReduceSum": lambda x, d, k: x.sum(d, keepdim=k).to(x.dtype),
    "ReduceMax": lambda x, d, k: x.amax(d, keepdim=k),
    "ReduceMin": lambda x, d, k: x.amin(d, keepdim=k),
    "ReduceProd": lambda x, d, k: _prod(x, d, k).to(x.dtype),
    "ReduceL1": lambda x, d, k: x.abs().sum(d, keepdim=k).to(x.dtype),
    "ReduceL2": lambda x, d, k: (x * x).sum(d, keepdim=k).sqrt(),
    "ReduceSumSquare": lambda x, d, k: (x * x).sum(d, keepdim=k).to(x.dtype),
    "ReduceLogSum": lambda x, d, k: x.sum(d, keepdim=k).log(),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
}


def _reduce_op(fn: Callable) -> Callable:
    def reduce(node, inputs, attrs):
        """axes: an attribute before opset 18 (ReduceSum: 13), an optional input since."""
        x = inputs[0]
        axes = inputs[1] if len(inputs) > 1 and inputs[1] is not None else None
        axes = axes.tolist() if axes is not None else attrs.get("axes", [])
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = range(x.dim())
        return fn(x, sorted({a % x.dim() for a in axes}), bool(attrs.get("keepdims", 1)))
    return reduce


for _name, _fn in _REDUCE.items():
    OPS[_name] = _reduce_op(_fn)


def _arg_op(fn: Callable) -> Callable:
    def arg(node, inputs, attrs):
        """The first extreme index along `axis`, the last with select_last_index; int64."""
        x, keep = inputs[0], bool(attrs.get("keepdims", 1))
        axis = attrs.get("axis", 0) % x.dim()
        if attrs.get("select_last_index", 0):
            return x.shape[axis] - 1 - fn(x.flip(axis), axis, keepdim=keep)
        return fn(x, axis, keepdim=keep)
    return arg


OPS["ArgMax"], OPS["ArgMin"] = _arg_op(torch.argmax), _arg_op(torch.argmin)


# ----------------------------------------------------------------------------------------------
# shape and layout


@register_op("Split")
def _split(node, inputs, attrs):
    """Sizes from the split input (13+; an attribute before), else num_outputs pieces of
    ceil(n / num_outputs), the last smaller (18+), else equal pieces, one per output."""
    x = inputs[0]
    axis = attrs.get("axis", 0) % x.dim()
    n = x.shape[axis]
    split = inputs[1].tolist() if len(inputs) > 1 and inputs[1] is not None else attrs.get("split")
    if not split:
        k = attrs.get("num_outputs", len(node.output))
        size = -(-n // k) if "num_outputs" in attrs else n // k
        split = [size] * (k - 1) + [n - size * (k - 1)]
        if split[-1] < 0 or ("num_outputs" not in attrs and n % k):
            raise MergeError(f"Split node {node.name!r}: an axis of {n} cannot be split into {k} outputs")
    return list(torch.split(x, split, axis))


def _check_blocks(node, x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise MergeError(f"{node.op_type} node {node.name!r}: only 4-D inputs are supported, not {x.dim()}-D")


@register_op("DepthToSpace")
def _depth_to_space(node, inputs, attrs):
    x, bs = inputs[0], attrs["blocksize"]
    _check_blocks(node, x)
    n, c, h, w = x.shape
    if attrs.get("mode", "DCR") == "CRD":
        y = x.reshape(n, c // bs ** 2, bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
    else:
        y = x.reshape(n, bs, bs, c // bs ** 2, h, w).permute(0, 3, 4, 1, 5, 2)
    return y.reshape(n, c // bs ** 2, h * bs, w * bs)


@register_op("SpaceToDepth")
def _space_to_depth(node, inputs, attrs):
    x, bs = inputs[0], attrs["blocksize"]
    _check_blocks(node, x)
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
    return y.reshape(n, c * bs * bs, h // bs, w // bs)


def _source_coords(mode: str, out_len: int, in_len: int, scale: float, device) -> torch.Tensor:
    """ONNX Resize's coordinate_transformation_mode: the input coordinate of each output index, in
    float32 as onnxruntime computes it."""
    x = torch.arange(out_len, dtype=torch.float32, device=device)
    if mode == "asymmetric":
        return x / scale
    if mode == "align_corners":
        return x * (in_len - 1) / (out_len - 1) if out_len > 1 else torch.zeros_like(x)
    if mode == "pytorch_half_pixel" and out_len == 1:
        return torch.zeros_like(x)
    if mode == "half_pixel_symmetric":
        offset = in_len / 2 * (1 - out_len / (scale * in_len))
        return offset + (x + 0.5) / scale - 0.5
    return (x + 0.5) / scale - 0.5  # half_pixel, pytorch_half_pixel


def _nearest_index(c: torch.Tensor, mode: str, scale: float) -> torch.Tensor:
    if mode == "floor":
        return c.floor()
    if mode == "ceil":
        return c.ceil()
    if mode == "simple":  # Upsample's: truncate up-sampling, ceil down-sampling (onnxruntime)
        return c.ceil() if scale < 1 else c.trunc()
    tie = c - c.floor() == 0.5
    return torch.where(tie, c.floor() if mode == "round_prefer_floor" else c.ceil(), c.round())


_COORD_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners", "asymmetric")
_NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil", "simple")


def _interpolate(node, x: torch.Tensor, axes: list[int], out_sizes: list[int], scales: list[float], mode: str,
                 coords: str, nearest: str) -> torch.Tensor:
    """Resize one axis after another: nearest gathers, linear blends the two neighbours of the
    clamped coordinate (differentiable in x)."""
    if mode not in ("nearest", "linear"):
        raise MergeError(f"{node.op_type} node {node.name!r}: mode {mode!r} is not supported (nearest, linear)")
    if coords not in _COORD_MODES:
        raise MergeError(f"{node.op_type} node {node.name!r}: coordinate_transformation_mode {coords!r} "
                         "is not supported")
    if nearest not in _NEAREST_MODES:
        raise MergeError(f"{node.op_type} node {node.name!r}: nearest_mode {nearest!r} is not supported")
    for a, out, scale in zip(axes, out_sizes, scales):
        n = x.shape[a]
        if out == n and scale == 1:
            continue
        c = _source_coords(coords, out, n, scale, x.device)
        if mode == "nearest":
            x = x.index_select(a, _nearest_index(c, nearest, scale).clamp(0, n - 1).long())
            continue
        c = c.clamp(0, n - 1)
        lo = c.floor().long().clamp(max=n - 1)
        hi = (lo + 1).clamp(max=n - 1)
        w = (c - lo).to(x.dtype).reshape((-1,) + (1,) * (x.dim() - a - 1))
        x = x.index_select(a, lo) * (1 - w) + x.index_select(a, hi) * w
    return x


@register_op("Resize")
def _resize(node, inputs, attrs):
    """Opsets 13-19: scales or sizes input (the other empty or omitted), axes and
    keep_aspect_ratio_policy (18); nearest and linear, every coordinate mode but tf_crop_and_resize."""
    x, _, scales, sizes = (inputs + [None] * 3)[:4]
    if attrs.get("antialias", 0):
        raise MergeError(f"Resize node {node.name!r}: antialias is not supported")
    axes = [a % x.dim() for a in attrs.get("axes", range(x.dim()))]
    lengths = [x.shape[a] for a in axes]
    if sizes is not None and sizes.numel():
        out = sizes.tolist()
        policy = attrs.get("keep_aspect_ratio_policy", "stretch")
        if policy == "stretch":
            factors = [float(np.float32(o) / np.float32(n)) for o, n in zip(out, lengths)]
        else:
            pick = min if policy == "not_larger" else max
            factors = [pick(float(np.float32(o) / np.float32(n)) for o, n in zip(out, lengths))] * len(axes)
            out = [int(f * n + 0.5) for f, n in zip(factors, lengths)]
    elif scales is not None and scales.numel():
        factors = [float(np.float32(s)) for s in scales.tolist()]
        out = [int(np.float32(n) * np.float32(f)) for n, f in zip(lengths, factors)]
    else:
        raise MergeError(f"Resize node {node.name!r}: neither scales nor sizes is given")
    return _interpolate(node, x, axes, out, factors, attrs.get("mode", "nearest"),
                        attrs.get("coordinate_transformation_mode", "half_pixel"),
                        attrs.get("nearest_mode", "round_prefer_floor"))


@register_op("Upsample")
def _upsample(node, inputs, attrs):
    """Opset 9 (scales input; 7: attribute): asymmetric coordinates, onnxruntime's nearest rounding."""
    x = inputs[0]
    factors = inputs[1].tolist() if len(inputs) > 1 and inputs[1] is not None else attrs["scales"]
    factors = [float(np.float32(f)) for f in factors]
    out = [int(np.float32(n) * np.float32(f)) for n, f in zip(x.shape, factors)]
    return _interpolate(node, x, list(range(x.dim())), out, factors, attrs.get("mode", "nearest"),
                        "asymmetric", "simple")


_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@register_op("ConvTranspose")
def _conv_transpose(node, inputs, attrs):
    """The full transposed convolution, then the pads cropped off and output_padding added at the
    ends (zeros before the bias), which also covers asymmetric pads."""
    x, w, b = (inputs + [None])[:3]
    n = w.dim() - 2
    if attrs.get("auto_pad", "NOTSET") != "NOTSET":
        raise MergeError(f"ConvTranspose node {node.name!r}: auto_pad {attrs['auto_pad']!r} is not supported "
                         "(NOTSET with explicit pads is)")
    if "output_shape" in attrs:
        raise MergeError(f"ConvTranspose node {node.name!r}: the output_shape attribute is not supported")
    pads, extra = attrs.get("pads", [0] * 2 * n), attrs.get("output_padding", [0] * n)
    y = _CONV_T[n](x, w, None, stride=attrs.get("strides", 1), groups=attrs.get("group", 1),
                   dilation=attrs.get("dilations", 1))
    y = F.pad(y, _torch_pad([-p for p in pads[:n]], [e - p for e, p in zip(extra, pads[n:])]))
    return y if b is None else y + b.reshape((-1,) + (1,) * n)


# ----------------------------------------------------------------------------------------------
# the module


def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        out[a.name] = v.decode() if isinstance(v, bytes) else v
    return out


def _constant_value(node: onnx.NodeProto) -> tuple[np.ndarray, int]:
    """The value of a Constant node and its ONNX element type."""
    a = node.attribute[0] if len(node.attribute) == 1 else None
    if a is None or a.name not in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        raise MergeError(f"Constant node {node.name!r}: only tensor, float(s) and int(s) values are supported")
    if a.name == "value":
        return numpy_helper.to_array(a.t), a.t.data_type
    value = helper.get_attribute_value(a)
    is_float = a.name.startswith("value_float")
    arr = np.asarray(value, np.float32 if is_float else np.int64)
    return arr, onnx.TensorProto.FLOAT if is_float else onnx.TensorProto.INT64


class OnnxModule(torch.nn.Module):
    """An ONNX model as a module: float initializers are parameters, the graph runs op by op.

    `frozen` names (and names for which `trainable(name)` is False) keep requires_grad=False.
    `attribute_of[initializer]` is the module attribute holding it (torch names cannot hold '.' or
    '/'), `initializer_of` the reverse.
    """

    def __init__(self, model: onnx.ModelProto, *, frozen: Iterable[str] = (),
                 trainable: Callable[[str], bool] | None = None):
        super().__init__()
        graph = model.graph
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if opset < _MIN_OPSET:
            raise MergeError(f"model has opset {opset}; the torch bridge needs opset {_MIN_OPSET} or newer "
                             "(convert it with --opset)")
        self.attribute_of: dict[str, str] = {}
        self.initializer_of: dict[str, str] = {}
        self._float_names: list[str] = []
        values = [(t.name, numpy_helper.to_array(t), t.data_type) for t in graph.initializer]
        values += [(n.output[0], *_constant_value(n)) for n in graph.node if n.op_type == "Constant"]
        for name, array, dtype in values:
            self._add_value(name, array, dtype in FLOAT_TYPES)

        frozen = set(frozen)
        unknown = sorted(frozen - set(self.attribute_of))
        if unknown:
            raise MergeError(f"frozen: no initializer named {', '.join(map(repr, unknown))}")
        for name in self._float_names:
            if name in frozen or (trainable is not None and not trainable(name)):
                self.parameter(name).requires_grad_(False)

        initializers = set(self.attribute_of)
        self.input_names = [i.name for i in graph.input if i.name not in initializers]
        self.output_names = [o.name for o in graph.output]
        self._nodes: list[tuple[onnx.NodeProto, Callable, dict]] = []
        self._producer: dict[str, int] = {}
        available = set(self.input_names) | initializers
        unsupported = []
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                continue
            fn = OPS.get(_op_key(node.op_type, node.domain))
            if fn is None:
                unsupported.append(f"{_op_key(node.op_type, node.domain)} (node {node.name!r})")
                continue
            missing = [t for t in node.input if t and t not in available]
            if missing:
                raise MergeError(f"node {node.name!r} reads {missing[0]!r}, which no earlier node, input or "
                                 "initializer provides (graph not in topological order?)")
            for out in node.output:
                if out:
                    self._producer[out] = len(self._nodes)
            available.update(node.output)
            self._nodes.append((node, fn, _attrs(node)))
        if unsupported:
            raise MergeError(f"the torch bridge does not support {', '.join(unsupported)}")
        self._known = available
        self._plans: dict[frozenset, tuple[list[int], list[str], list[str]]] = {}

    def _add_value(self, name: str, array: np.ndarray, is_float: bool) -> None:
        attr = "t_" + re.sub(r"\W", "_", name)
        while attr in self.initializer_of or hasattr(self, attr):
            attr += "_"
        self.attribute_of[name], self.initializer_of[attr] = attr, name
        if is_float:
            self.register_parameter(attr, torch.nn.Parameter(torch.from_numpy(array.astype(np.float32))))
            self._float_names.append(name)
        else:
            self.register_buffer(attr, torch.from_numpy(np.array(array)))

    def parameter(self, initializer_name: str) -> torch.nn.Parameter:
        """The parameter that holds float initializer (or Constant output) `initializer_name`."""
        if initializer_name not in self._float_names:
            what = "is not a float initializer" if initializer_name in self.attribute_of else "is no initializer"
            raise MergeError(f"{initializer_name!r} {what} of this model")
        return getattr(self, self.attribute_of[initializer_name])

    def trainable_initializers(self) -> list[str]:
        return [n for n in self._float_names if self.parameter(n).requires_grad]

    def _plan(self, outputs: tuple[str, ...]) -> tuple[list[int], list[str], list[str]]:
        """(node indices to run in order, feeds needed, initializers read), cached per output set."""
        key = frozenset(outputs)
        if key not in self._plans:
            unknown = [o for o in outputs if o not in self._known]
            if unknown:
                raise MergeError(f"no tensor named {', '.join(map(repr, unknown))} in this model")
            needed, stack = set(), list(outputs)
            feeds, consts = set(), set()
            while stack:
                name = stack.pop()
                if name in self._producer:
                    k = self._producer[name]
                    if k not in needed:
                        needed.add(k)
                        stack.extend(t for t in self._nodes[k][0].input if t)
                elif name in self.attribute_of:
                    consts.add(name)
                else:
                    feeds.add(name)
            self._plans[key] = (sorted(needed), sorted(feeds), sorted(consts))
        return self._plans[key]

    def forward(self, feeds: dict[str, torch.Tensor], outputs: list[str] | None = None) -> dict[str, torch.Tensor]:
        """{name: tensor} for `outputs` (graph outputs by default; any tensor name is allowed),
        running only the nodes they depend on; only the feeds they depend on are required."""
        outputs = tuple(self.output_names if outputs is None else outputs)
        order, need_feeds, consts = self._plan(outputs)
        extra = [k for k in feeds if k not in self.input_names]
        if extra:
            raise MergeError(f"feeds {', '.join(map(repr, extra))}: not inputs of this model "
                             f"(inputs: {', '.join(self.input_names)})")
        missing = [f for f in need_feeds if f not in feeds]
        if missing:
            raise MergeError(f"missing feed {', '.join(map(repr, missing))}, needed for {', '.join(outputs)}")
        env = {n: getattr(self, self.attribute_of[n]) for n in consts}
        env.update({n: torch.as_tensor(feeds[n]) for n in need_feeds})
        for k in order:
            node, fn, attrs = self._nodes[k]
            try:
                result = fn(node, [env[t] if t else None for t in node.input], attrs)
            except (MergeError, _OUT_OF_MEMORY):  # out of memory stays itself: a caller may retry smaller
                raise
            except Exception as e:  # a shape or type the op cannot take: one line naming the node
                text = (str(e).strip() or type(e).__name__).splitlines()[0][:300]
                raise MergeError(f"{node.op_type} node {node.name!r} failed in the torch bridge: {text}") from e
            if isinstance(result, torch.Tensor):
                result = [result]
            env.update((name, r) for name, r in zip(node.output, result) if name)
        return {name: env[name] for name in outputs}

    def write_back(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of `model` whose float initializers and float Constant values hold the current
        parameters, in their original ONNX element types; the graph is otherwise untouched."""
        out = onnx.ModelProto()
        out.CopyFrom(model)
        done = set()

        def value(name: str, dtype: int, dims) -> np.ndarray:
            array = self.parameter(name).detach().cpu().numpy()
            if tuple(array.shape) != tuple(dims):
                raise MergeError(f"write_back: {name!r} has shape {tuple(dims)} in the model but "
                                 f"{tuple(array.shape)} in the module")
            done.add(name)
            return array.astype(helper.tensor_dtype_to_np_dtype(dtype))

        for i, t in enumerate(out.graph.initializer):
            if t.data_type in FLOAT_TYPES and t.name in self.attribute_of:
                out.graph.initializer[i].CopyFrom(numpy_helper.from_array(value(t.name, t.data_type, t.dims), t.name))
        for node in out.graph.node:
            if node.op_type != "Constant" or node.output[0] not in self._float_names:
                continue
            a = node.attribute[0]
            if a.name == "value":
                a.t.CopyFrom(numpy_helper.from_array(value(node.output[0], a.t.data_type, a.t.dims), a.t.name))
            elif a.name == "value_float":
                a.f = float(value(node.output[0], onnx.TensorProto.FLOAT, ()))
            else:
                a.floats[:] = value(node.output[0], onnx.TensorProto.FLOAT, (len(a.floats),)).tolist()
        missing = sorted(set(self._float_names) - done)
        if missing:
            raise MergeError(f"write_back: the model has no float initializer {', '.join(map(repr, missing[:5]))}"
                             " (is it the model this module was built from?)")
        return out


def to_module(model_or_path: onnx.ModelProto | str | Path, **kw) -> OnnxModule:
    """`OnnxModule` of a ModelProto or of the model at a path."""
    model = model_or_path if isinstance(model_or_path, onnx.ModelProto) else onnx.load(str(model_or_path))
    return OnnxModule(model, **kw)
