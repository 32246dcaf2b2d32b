"""Small helpers around onnx-graphsurgeon: import, export, and running a graph in onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnxmerge.errors import MergeError


def to_model(graph: gs.Graph, opset: int, ir_version: int) -> onnx.ModelProto:
    """Export a gs graph to a ModelProto of the given opset and IR version."""
    graph.opset = opset
    model = gs.export_onnx(graph, do_type_check=True)
    model.ir_version = ir_version
    del model.opset_import[:]
    model.opset_import.add(domain="", version=opset)
    return model


def session(model: onnx.ModelProto, *, optimize: bool = False, threads: int | None = 1) -> ort.InferenceSession:
    """An onnxruntime CPU session; graph optimisations off by default, so a check sees the graph itself."""
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


NP_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
}


def input_signature(value: onnx.ValueInfoProto) -> tuple[int, tuple]:
    """(element type, shape) of a graph input; symbolic or unknown dims are None."""
    t = value.type.tensor_type
    dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    return t.elem_type, dims


def random_feeds(model: onnx.ModelProto, batch: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs for every graph input; symbolic dims take `batch`."""
    rng = np.random.default_rng(seed)
    inits = {i.name for i in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in inits:
            continue
        elem, dims = input_signature(value)
        if elem not in NP_TYPES:
            raise MergeError(f"input {value.name}: element type {onnx.TensorProto.DataType.Name(elem)} is not supported")
        shape = [batch if (d is None or d == 0) else d for d in dims]
        feeds[value.name] = rng.standard_normal(shape).astype(NP_TYPES[elem])
    return feeds
