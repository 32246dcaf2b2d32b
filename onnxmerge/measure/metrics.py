"""Model size and cost: parameters, parameter bytes, multiply-accumulates.

What counts as a parameter (`count_parameters`, `parameter_counts`):

- every floating-point tensor stored in the model (initializers, `Constant` node values, sparse
  initializers, also inside If/Loop subgraphs), each counted once by name however many nodes use it,
  so weights shared on purpose by a merge count once;
- integer tensors that are index tables (the codebook method stores its code indices as
  int8/int16/int32 initializers) count too, reported apart as `index`;
- shape constants do not count: an int64 tensor of rank <= 1 with at most `SHAPE_CONSTANT_MAX`
  elements (Reshape targets, Slice bounds, Pad amounts, axes: at most 2 x rank values). Every other
  integer tensor is an index table. Bool and string tensors are not parameters.

Bytes are elements x element size (4-bit types: half a byte), i.e. the raw tensor data, whether it
is stored inside the file or as external data.

MACs (`count_macs`) are the multiply-accumulates of the weight-bearing operators only, for one run
at a given batch size:

    Conv           prod(Y.shape) * prod(W.shape[1:])   = N*Cout*Hout*Wout * (Cin/groups)*kh*kw
    ConvTranspose  prod(X.shape) * prod(W.shape[1:])   = N*Cin*Hin*Win * (Cout/groups)*kh*kw
    Gemm           prod(Y.shape) * K                   = M*N*K
    MatMul         prod(Y.shape) * A.shape[-1]         = batch dims * M*N*K

    EConv / EFC    N*pixels_in*V*C*r + prod(Y.shape)*kh*kw*V  (lookup tables, then one add per entry)

Elementwise operators (Add, Relu, BatchNorm left unfolded, ...), pooling and Gather are not
counted: on the networks onnxmerge merges they are a small fraction of the work. Only the main graph's
nodes are counted (not If/Loop bodies, whose trip counts are unknown).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, shape_inference

from onnxmerge.errors import MergeError
from onnxmerge.graph.convert import FLOAT_TYPES

SHAPE_CONSTANT_MAX = 16

_FLOAT_TYPES = set(FLOAT_TYPES) | {
    TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E4M3FNUZ, TensorProto.FLOAT8E5M2,
    TensorProto.FLOAT8E5M2FNUZ,
}
_INT_TYPES = {
    TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16,
    TensorProto.INT32, TensorProto.UINT32, TensorProto.INT64, TensorProto.UINT64,
}
_BITS = {
    TensorProto.FLOAT: 32, TensorProto.DOUBLE: 64, TensorProto.FLOAT16: 16, TensorProto.BFLOAT16: 16,
    TensorProto.FLOAT8E4M3FN: 8, TensorProto.FLOAT8E4M3FNUZ: 8, TensorProto.FLOAT8E5M2: 8,
    TensorProto.FLOAT8E5M2FNUZ: 8, TensorProto.INT8: 8, TensorProto.UINT8: 8, TensorProto.INT16: 16,
    TensorProto.UINT16: 16, TensorProto.INT32: 32, TensorProto.UINT32: 32, TensorProto.INT64: 64,
    TensorProto.UINT64: 64, TensorProto.BOOL: 8,
}
for _name, _bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("FLOAT8E8M0", 8)):
    if hasattr(TensorProto, _name):  # newer onnx releases only
        _BITS[getattr(TensorProto, _name)] = _bits
        (_INT_TYPES if _name.endswith("INT4") else _FLOAT_TYPES).add(getattr(TensorProto, _name))


@dataclass(frozen=True)
class ParamCounts:
    """Stored tensor elements and bytes, split into float weights and integer index tables."""

    float_params: int
    index_params: int
    float_bytes: int
    index_bytes: int

    @property
    def params(self) -> int:
        return self.float_params + self.index_params

    @property
    def bytes(self) -> int:
        return self.float_bytes + self.index_bytes


def _kind(dtype: int, dims: list[int]) -> str | None:
    """'float', 'index' or None (not a parameter) for a stored tensor."""
    if dtype in _FLOAT_TYPES:
        return "float"
    if dtype in _INT_TYPES:
        shape_constant = (dtype == TensorProto.INT64 and len(dims) <= 1
                          and math.prod(dims) <= SHAPE_CONSTANT_MAX)
        return None if shape_constant else "index"
    return None


def _stored_tensors(graph: onnx.GraphProto):
    """(name, dtype, dims) of every tensor stored in `graph` and its subgraphs."""
    for t in graph.initializer:
        yield t.name, t.data_type, list(t.dims)
    for s in graph.sparse_initializer:
        yield s.values.name, s.values.data_type, list(s.values.dims)  # nnz values only
        yield s.values.name + "#indices", s.indices.data_type, list(s.indices.dims)
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                name = node.output[0]
                if attr.name == "value":
                    yield name, attr.t.data_type, list(attr.t.dims)
                elif attr.name == "sparse_value":
                    v = attr.sparse_tensor
                    yield name, v.values.data_type, list(v.values.dims)
                    yield name + "#indices", v.indices.data_type, list(v.indices.dims)
                elif attr.name == "value_float":
                    yield name, TensorProto.FLOAT, []
                elif attr.name == "value_floats":
                    yield name, TensorProto.FLOAT, [len(attr.floats)]
                elif attr.name == "value_int":
                    yield name, TensorProto.INT64, []
                elif attr.name == "value_ints":
                    yield name, TensorProto.INT64, [len(attr.ints)]
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _stored_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _stored_tensors(g)


def parameter_counts(model: onnx.ModelProto) -> ParamCounts:
    """Parameter elements and bytes of `model`, float weights and index tables apart (see module doc)."""
    seen: set[str] = set()
    totals = {"float": [0, 0], "index": [0, 0]}
    for name, dtype, dims in _stored_tensors(model.graph):
        kind = _kind(dtype, dims)
        if kind is None or name in seen:
            continue
        seen.add(name)
        n = math.prod(dims)
        totals[kind][0] += n
        totals[kind][1] += (n * _BITS[dtype] + 7) // 8
    return ParamCounts(totals["float"][0], totals["index"][0], totals["float"][1], totals["index"][1])


def count_parameters(model: onnx.ModelProto) -> int:
    """Parameter elements of `model`: float weights plus index tables, each tensor once."""
    return parameter_counts(model).params


def parameter_bytes(model: onnx.ModelProto) -> int:
    """Raw bytes of the parameter tensors counted by `count_parameters`."""
    return parameter_counts(model).bytes


def _fix_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy of `model` whose symbolic first input dims (and every dim of the same name) are `batch`,
    without the declared shapes of tensors that standard operators produce."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    stored = {t.name for t in m.graph.initializer}
    names: set[str] = set()
    for inp in m.graph.input:
        if inp.name in stored or not inp.type.tensor_type.HasField("shape"):
            continue
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            if dims[0].dim_param:
                names.add(dims[0].dim_param)
            dims[0].dim_value = batch
    # the declared shapes of what standard operators produce are hints that shape inference recomputes
    # from the inputs, and a wrong one (a symbolic dim named like the batch dim) would contradict it;
    # only the outputs of custom operators (no schema to infer them from) keep theirs
    custom = {o for n in m.graph.node if n.domain not in ("", "ai.onnx") for o in n.output}
    keep = [vi for vi in m.graph.value_info if vi.name in custom]
    del m.graph.value_info[:]
    m.graph.value_info.extend(keep)
    for vi in list(m.graph.value_info) + list(m.graph.output):
        if vi.type.tensor_type.HasField("shape"):
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_param") and d.dim_param in names:
                    d.dim_value = batch
    return m


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Tensor name -> shape (None for an unknown dim) after shape inference, for the main graph."""
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as e:  # onnx raises several types; the message is what the user needs
        raise MergeError(f"shape inference failed while counting MACs: {e}".splitlines()[0]) from None
    g = inferred.graph
    shapes: dict[str, list[int | None]] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    for t in g.initializer:
        shapes[t.name] = list(t.dims)
    for node in g.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = list(attr.t.dims)
    return shapes


def _macs_conv(node, shape):
    return math.prod(shape(node.output[0])) * math.prod(shape(node.input[1])[1:])


def _macs_conv_transpose(node, shape):
    return math.prod(shape(node.input[0])) * math.prod(shape(node.input[1])[1:])


def _macs_gemm(node, shape):
    trans_a = any(a.name == "transA" and a.i for a in node.attribute)
    a = shape(node.input[0])
    return math.prod(shape(node.output[0])) * (a[0] if trans_a else a[1])


def _macs_matmul(node, shape):
    return math.prod(shape(node.output[0])) * shape(node.input[0])[-1]


def _macs_lookup(node, shape):
    """EConv / EFC (NeuralMerger eq. 9): the table of codeword dot products, V*C*r per input pixel
    and sample, plus one addition of a table entry per (output, kernel offset, segment)."""
    x, (_, c, r), codes = shape(node.input[0]), shape(node.input[1]), shape(node.input[2])
    n_seg, per_output = codes[0], math.prod(codes[2:])  # kernel offsets (1 for EFC)
    pixels = math.prod(x[2:])  # 1 for EFC
    return x[0] * pixels * n_seg * c * r + math.prod(shape(node.output[0])) * per_output * n_seg


_MAC_RULES = {
    "Conv": _macs_conv,
    "ConvTranspose": _macs_conv_transpose,
    "Gemm": _macs_gemm,
    "MatMul": _macs_matmul,
    "ai.onnxmerge.EConv": _macs_lookup,
    "ai.onnxmerge.EFC": _macs_lookup,
}


def count_macs(model: onnx.ModelProto, batch: int = 1) -> int:
    """Multiply-accumulates of one run of `model` at `batch` (Conv, ConvTranspose, Gemm, MatMul).

    The symbolic first dim of each graph input is fixed to `batch` on a copy before shape
    inference. Raises MergeError naming the node when a shape it needs is unknown.
    """
    return sum(macs for _, macs in _node_macs(model, batch))


def node_macs(model: onnx.ModelProto, batch: int = 1) -> dict[str, int | None]:
    """MACs of each counted node by name (count_macs's rules); None where a shape it needs is unknown."""
    out: dict[str, int | None] = {}
    for node, macs in _node_macs(model, batch, strict=False):
        out[node.name] = macs
    return out


def _node_macs(model: onnx.ModelProto, batch: int, strict: bool = True):
    shapes = _shapes(_fix_batch(model, batch))
    for i, node in enumerate(model.graph.node):
        rule = _MAC_RULES.get(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}")
        if rule is None:
            continue

        def shape(name, node=node, i=i):
            s = shapes.get(name)
            if s is None or any(d is None for d in s):
                label = node.name or f"#{i} ({node.op_type})"
                raise MergeError(f"node {label}: shape of {name!r} unknown, cannot count MACs "
                                 f"(known: {s})")
            return s

        try:
            yield node, rule(node, shape)
        except MergeError:
            if strict:
                raise
            yield node, None


def model_stats(model: onnx.ModelProto, path: str | os.PathLike | None = None) -> dict:
    """Size and cost of `model`: params (float + index), param bytes, file bytes, MACs at batch 1.

    `file_bytes` is the size of the file at `path` (None without a path); external data files are
    not added.
    """
    pc = parameter_counts(model)
    return {
        "params": pc.params,
        "float_params": pc.float_params,
        "index_params": pc.index_params,
        "param_bytes": pc.bytes,
        "file_bytes": Path(path).stat().st_size if path is not None else None,
        "macs": count_macs(model, batch=1),
    }
