"""Small helpers around onnx-graphsurgeon: import a model as a graph, export a graph as a model."""

from __future__ import annotations

import gc

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper
from onnx_graphsurgeon.exporters.onnx_exporter import dtype_to_onnx as gs_dtype_to_onnx
from onnx_graphsurgeon.ir.tensor import LazyValues, SparseValues

from onnxmerge.model import saving
from onnxmerge.model.saving import NUMPY_TYPES, weightless

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
        from onnx_graphsurgeon.importers.onnx_importer import (
            get_itemsize,
            get_onnx_tensor_dtype,
        )

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
    copy = graph.copy()
    weights = {}
    for tensor in copy.tensors().values():
        if not isinstance(tensor, gs.Constant) or isinstance(tensor._values, SparseValues):
            continue
        if tensor._values.nbytes < saving.EXTERNAL_TENSOR_BYTES:  # read at call time (tests lower it)
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
