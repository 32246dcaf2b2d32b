"""Small helpers around onnx-graphsurgeon: import, export, and running a graph in onnxruntime."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnxmerge.errors import MergeError


# the floating-point element types onnxmerge trains and averages
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                         onnx.TensorProto.BFLOAT16})


def to_model(graph: gs.Graph, opset: int, ir_version: int) -> onnx.ModelProto:
    """Export a gs graph to a ModelProto of the given opset and IR version."""
    graph.opset = opset
    model = gs.export_onnx(graph, do_type_check=True)
    model.ir_version = ir_version
    del model.opset_import[:]
    model.opset_import.add(domain="", version=opset)
    return model


def session(model: onnx.ModelProto | str | os.PathLike, *, threads: int | None = 1,
            optimize: bool = False, native: bool = False) -> ort.InferenceSession:
    """An onnxruntime CPU session.

    threads=1: one intra-op and one inter-op thread, sequential execution; another int: that many
    intra-op threads; None: onnxruntime's defaults. Graph optimisations are off unless `optimize`, so
    that a check sees the graph itself (onnxsim's habit); timing and evaluation turn them on.
    `native`: register onnxmerge's ai.onnxmerge kernels (onnxmerge.kernels).
    """
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # a check runs a few batches once: without the arena its memory is returned when it ends
        # (a codebook model's dense weights would otherwise stay in the pool)
        so.enable_cpu_mem_arena = False
    if threads is not None:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if native:
        from onnxmerge.kernels import register

        register(so)
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(Path(model))
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def input_signature(value: onnx.ValueInfoProto) -> tuple[int, tuple]:
    """(element type, shape) of a graph input; symbolic or unknown dims are None."""
    t = value.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return t.elem_type, dims


_NP_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_,
}


def input_shape(arg, batch: int) -> tuple[int, ...]:
    """The concrete shape of session input `arg` at `batch`: a symbolic first dim becomes `batch`;
    any other symbolic dim, or a fixed first dim other than `batch`, is an error."""
    shape = list(arg.shape)
    if not shape:
        return ()
    if not isinstance(shape[0], int):
        shape[0] = batch
    elif shape[0] != batch:
        raise MergeError(f"input {arg.name!r} has a fixed batch dim {shape[0]}, cannot run it at "
                         f"batch {batch}")
    if any(not isinstance(d, int) for d in shape[1:]):
        raise MergeError(f"input {arg.name!r} has symbolic dims besides the batch: {arg.shape}")
    return tuple(shape)


def input_dtype(arg) -> type:
    if arg.type not in _NP_TYPES:
        raise MergeError(f"input {arg.name!r} has type {arg.type}, which onnxmerge cannot feed")
    return _NP_TYPES[arg.type]


def random_feeds(sess: ort.InferenceSession, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded feeds for every input of `sess` at `batch`: standard-normal floats, zeros otherwise."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for arg in sess.get_inputs():
        shape, dtype = input_shape(arg, batch), input_dtype(arg)
        if np.issubdtype(dtype, np.floating):
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[arg.name] = np.zeros(shape, dtype)
    return feeds
