"""Small helpers around onnx-graphsurgeon: import, export, and running a graph in onnxruntime."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
import onnxruntime as ort
from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx as gs_dtype_to_onnx
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from onnxmerge.errors import MergeError
from onnxmerge.model.saving import NUMPY_TYPES, split_weights, tensor_array, weights_apart


# the floating-point element types onnxmerge trains and averages
FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                         onnx.TensorProto.BFLOAT16})


def to_model(graph: gs.Graph, opset: int, ir_version: int,
             release: list[gs.Graph] | None = None) -> onnx.ModelProto:
    """Export a gs graph to a ModelProto of the given opset and IR version.

    The big weights are filled in one tensor at a time (graphsurgeon's export builds every tensor
    and then copies them all into the graph: a transient second copy of the weights).

    `release` (graphs that may share arrays with `graph`, e.g. the task graphs it was combined
    from): as each big weight is copied into the model, the constants of `graph` and of these
    graphs that hold that very array read their values from the model's tensor instead
    (`ModelValues`), so that the array is freed: the weights are then held once, by the model,
    not twice. The graphs keep their values (loaded on access) and export as before."""
    model, weights = light_model(graph, opset, ir_version)
    owners: dict[int, list[gs.Constant]] = {}
    if release is not None:
        # graphsurgeon's Graph.copy (light_model's, and every earlier one's) leaves behind tensor
        # copies in reference cycles that still point at the arrays: collected now, or the arrays
        # released below would live on until Python's next collection, beside the model's copy
        gc.collect()
        arrays = {id(values) for values, _ in weights.values()}
        for g in [graph, *release]:
            for t in g.tensors().values():
                if isinstance(t, gs.Constant) and isinstance(t._values, np.ndarray) and id(t._values) in arrays:
                    owners.setdefault(id(t._values), []).append(t)
    for tensor in model.graph.initializer:
        if tensor.name in weights:
            values, location = weights.pop(tensor.name)
            for const in owners.pop(id(values), []):  # read from `tensor` once it is filled in
                const._values = ModelValues(tensor)
            # the bytes first, then the array released (where nothing else holds it), then the
            # bytes copied into the tensor: two copies of the tensor at a time, not three
            # (numpy_helper.from_array's layout: raw little-endian data; dims and type as stubbed)
            if values.dtype.kind in "OSU":  # strings: no raw data (numpy_helper's string_data)
                tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
            else:
                data = np.asarray(values, dtype=values.dtype.newbyteorder("<")).tobytes()
                del values
                del tensor.external_data[:]
                tensor.ClearField("data_location")
                tensor.raw_data = data
                del data
            if location is not None:  # as graphsurgeon exports it
                tensor.data_location = location
    return model


class ModelValues(LazyValues):
    """A constant's values read from a tensor of an exported model (`to_model`'s `release`).
    graphsurgeon's export renames a lazy constant's tensor in place: here it gets a copy, so the
    model's tensor is never changed."""

    def __init__(self, tensor: onnx.TensorProto):  # LazyValues's own reads `tensor` (a copy) twice
        from onnx_graphsurgeon.importers.onnx_importer import get_itemsize, get_onnx_tensor_dtype

        self._tensor = tensor
        self.shape = tuple(tensor.dims)
        self.dtype = get_onnx_tensor_dtype(tensor)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * get_itemsize(self.dtype)

    @property
    def tensor(self) -> onnx.TensorProto:
        own = onnx.TensorProto()
        own.CopyFrom(self._tensor)
        return own

    @tensor.setter
    def tensor(self, value: onnx.TensorProto) -> None:
        self._tensor = value

    def load(self) -> np.ndarray:
        return numpy_helper.to_array(self._tensor).copy()


def _export(graph: gs.Graph, opset: int, ir_version: int) -> onnx.ModelProto:
    """graphsurgeon's export, with the opset and IR version."""
    graph.opset = opset
    model = gs.export_onnx(graph, do_type_check=True)
    model.ir_version = ir_version
    del model.opset_import[:]
    model.opset_import.add(domain="", version=opset)
    return model


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """The gs graph of `model`, with constants of its own: graphsurgeon's lazily loaded constants
    keep pointing at the model's TensorProtos and rename them on export, so a graph must not share
    them with a model that is kept (a task's original). Their values are loaded now, as numpy
    arrays (one copy of the weights; copying the model first and loading later made two); a type
    numpy lacks (bfloat16, float8) keeps a lazy copy of its own tensor instead, which exports as it was.
    """
    graph = gs.import_onnx(model)
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and isinstance(tensor._values, LazyValues):
            proto = tensor._values.tensor
            if proto.data_type in NUMPY_TYPES and not isinstance(proto, onnx.SparseTensorProto):
                tensor.values  # noqa: B018  (loads and keeps the array)
            else:
                own = type(proto)()
                own.CopyFrom(proto)
                tensor._values = LazyValues(own)
    return graph


def light_model(graph: gs.Graph, opset: int, ir_version: int
                ) -> tuple[onnx.ModelProto, dict[str, tuple[np.ndarray, int | None]]]:
    """`graph` as a ModelProto whose constants of EXTERNAL_TENSOR_BYTES or more carry no data
    (onnxmerge.model.saving.weightless), and by name those constants' values (the graph's own arrays, not
    copies) and data locations. Small whatever the weights' size: for shape inference and
    `to_model`. `graph` is not changed."""
    from onnxmerge.model.saving import EXTERNAL_TENSOR_BYTES, weightless

    copy = graph.copy()
    weights = {}
    for tensor in copy.tensors().values():
        if not isinstance(tensor, gs.Constant) or isinstance(tensor._values, SparseValues):
            continue
        if tensor._values.nbytes < EXTERNAL_TENSOR_BYTES:
            continue
        if isinstance(tensor._values, LazyValues) and tensor._values.tensor.data_type not in NUMPY_TYPES:
            continue  # loading would cast it (bfloat16, float8): exported with its data, as it is
        values = tensor.values
        data_type = gs_dtype_to_onnx(tensor.export_dtype)
        if onnx.helper.tensor_dtype_to_np_dtype(data_type) != values.dtype:
            continue  # stored in another type than its array's: exported with its data
        weights[tensor.name] = values, tensor.data_location
        tensor._values = LazyValues(weightless(tensor.name, data_type, values.shape))
    return _export(copy, opset, ir_version), weights


def session(model: onnx.ModelProto | str | os.PathLike, *, threads: int | None = 1,
            optimize: bool = False, native: bool = False,
            weights: dict[str, np.ndarray] | None = None) -> ort.InferenceSession:
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
    # fatal only: a failing run raises an exception that onnxmerge words as its one-line error; the
    # error onnxruntime also logs would be a second line on stderr
    so.log_severity_level = 4
    if native:
        from onnxmerge.kernels import register

        register(so)
    if isinstance(model, onnx.ModelProto) and weights is None and weights_apart(model):
        # a big model: no serialised copy of its weights (nor a 2 GB limit); one copy as arrays
        model, moved = split_weights(model)
        weights = {stub.name: tensor_array(tensor) for stub, tensor in moved}
    if not weights:
        src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(Path(model))
        return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])
    return _session_on_arrays(model, so, weights, prepack=optimize)


def _session_on_arrays(light: onnx.ModelProto, so: ort.SessionOptions, weights: dict[str, np.ndarray],
                       prepack: bool) -> ort.InferenceSession:
    """A session of `light` (its big weights: stubs at saving.IN_MEMORY) that computes on the arrays
    `weights` themselves. `add_initializer` is onnxruntime's one way to use a caller's buffer in
    place (`add_external_initializers` copies every weight, and pre-packing copies a Gemm's or
    MatMul's weights again, transiently 3x the weights); it overrides initializers of the model,
    so the stubs stay, and they are checked against a file at their location: the light model is
    loaded by path, from a temporary folder holding it and an empty stand-in for that file, which
    onnxruntime never reads. A check session (`prepack` False) also leaves pre-packing off (its
    packed copy would sit beside the arrays); a timing one keeps it, as a deployment runs."""
    import tempfile

    from onnxmerge.model.saving import IN_MEMORY

    values = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a)) for name, a in weights.items()}
    for name, value in values.items():
        so.add_initializer(name, value)
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    with tempfile.TemporaryDirectory(prefix="onnxmerge-session-") as folder:
        (Path(folder) / IN_MEMORY).touch()
        onnx.save_model(light, str(Path(folder) / "model.onnx"))
        sess = ort.InferenceSession(str(Path(folder) / "model.onnx"), so, providers=["CPUExecutionProvider"])
    sess.onnxmerge_weights = values  # onnxruntime reads them in place: they live as long as the session
    return sess


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
