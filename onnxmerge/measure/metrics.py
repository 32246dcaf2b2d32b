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

MACs are counted by onnxmerge.graph.macs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

from onnxmerge.graph.convert import FLOAT_TYPES
from onnxmerge.graph.macs import count_macs

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
