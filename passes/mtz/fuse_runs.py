"""FuseRunsPass: a zipped layer as one Conv / Gemm where that runs faster here (mtz, after calibration).

ZippedNet.build writes each layer as one Conv / Gemm per run of output columns with the same tasks,
each reading only its tasks' input columns (a Slice, or a Gather), and a Concat of the runs: the
zero blocks of the layer's dense weight are never multiplied. On small layers those extra nodes cost
more than the zeros would: the LeNet-style tuning pair zipped at share 0.5 ran 0.76x the speed of
its two originals, the same model with every layer one node 1.26x (VGG-style: 0.57x and 1.09x).

The fused layer's weight is the layer's dense weight (ZippedNet's ZLayer.weight): with runs
k = 1..K in the Concat's order, rows R_k and the input columns N_k that run k reads,

    W[R_k, N_k] = W_k,  W = 0 elsewhere,  b[R_k] = b_k,                                        (F1)

so that W x = Concat_k(W_k x[N_k]) for finite x: each output adds the same products, and products
with exact zeros, which add nothing (the summation order inside onnxruntime may differ: float
rounding, checked). The dense weight does more multiplications (the zero blocks: up to twice the
runs' at share 0), so `--fuse auto` measures which is faster: the runs and the fused node are each
cut out of the model and timed interleaved at batch 1 on one thread
(onnxmerge.model.timing.time_models), and the faster is kept; the report lists both timings per
layer (figure mtz_fuse). Its choice follows the machine's timings, so the same flags can give
other bytes; the default, `--fuse on`, fuses every layer (the faster form on every pair of the
budget suite: BENCHMARKS.md, mtz_fuse), and `--fuse off` none.

The file keeps the runs' weights as they are and builds W from them with constant nodes (each run's
weight padded with zeros along the input axis, or gathered into place, the runs concatenated), which
onnxruntime folds once, when it creates the session: the zero blocks are never stored, the file is
as small as before, and its layout (ZippedNet.layout: the runs' weights by name) still lets
ZippedNet.resume zip further tasks into it. A run's weight may itself be computed from constants
(mtz+codebook: the portable codebook form gathers it from a codebook by codes): W is then built from
those tensors, and onnxruntime folds the whole chain.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper
from onnx.utils import Extractor

from onnxmerge.errors import MergeError
from onnxmerge.model.timing import time_models
from onnxmerge.pipeline import checks
from onnxmerge.pipeline.manager import FusePass, PassResult

BUDGET_S = 0.2  # per layer, both forms together
# a fused layer adds its products in another order than its runs (onnxruntime blocks the longer sums
# otherwise): float rounding, which compounds over depth (1.1e-5 relative on EfficientNet-B0's 52
# layers); a wrong weight differs by the size of the outputs themselves
ROUNDING_TOL = 1e-4


class FuseRunsPass(FusePass):
    """Rewrites `state.model` (the exported mtz model): each zipped layer of several runs becomes one
    Conv / Gemm where `mode` says so (auto: where it ran faster here); records the timings and
    choices (figure mtz_fuse)."""

    exact = True  # the fused model computes the same outputs to float rounding (checked)
    requires = ("exported",)

    def call(self, state) -> PassResult:
        layout = state.info.layout
        if self.mode == "off" or not layout:
            return PassResult(state, False)
        model = state.model
        inferred = onnx.shape_inference.infer_shapes(model)
        shapes = {v.name: tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
                  for v in [*inferred.graph.input, *inferred.graph.value_info]}
        shapes.update({i.name: tuple(i.dims) for i in model.graph.initializer})
        index = _Index(model)
        layers = [_Layer.find(index, entry, shapes) for entry in layout["layers"] if len(entry["runs"]) > 1]
        layers = [layer for layer in layers if layer is not None]
        if not layers:
            return PassResult(state, False)
        extractor = Extractor(inferred) if self.mode == "auto" else None  # indexes the model once
        rows, fused = [], []
        for layer in layers:
            row = {"layer": layer.entry["node"], "runs": len(layer.runs)}
            if self.mode == "auto":
                times = time_models(layer.forms(extractor), "runs", budget_s=BUDGET_S)
                for form, t in times.items():
                    row[f"{form}_s"], row[f"{form}_quartiles_s"] = 1e-3 * t["median_ms"], [1e-3 * t["q1_ms"], 1e-3 * t["q3_ms"]]
                row["fused"] = row["fused_s"] < row["runs_s"]
            else:
                row["fused"] = True
            rows.append(row)
            if row["fused"]:
                fused.append(layer)
        state.info.fidelity["mtz_fuse"] = {"mode": self.mode, "batch": 1, "threads": 1, "layers": rows}
        if not fused:
            return PassResult(state, False)
        out = _rewrite(model, fused)
        diff = checks.output_difference(out, model)
        if not diff <= ROUNDING_TOL:
            raise MergeError(f"mtz: the fused layers differ from their runs by {diff:.3g} (> {ROUNDING_TOL:g}): "
                             "this is a bug")
        state.info.fidelity["mtz_fuse"]["rel_diff"] = diff
        state.model = out
        return PassResult(state, True)


class _Index:
    """A model's nodes by the tensors they make and read, its initializers by name, and the tensors
    computed from initializers alone (constants: a codebook's gathered weight): built once for all
    the layers a pass looks up. Conv / Gemm nodes with a bias are found by their bias, which stays an
    initializer of the name the layout gives it (a weight may be computed under another name)."""

    def __init__(self, model: onnx.ModelProto):
        graph = model.graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.readers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.readers.setdefault(i, []).append(n)
        self.inits = {i.name: i for i in graph.initializer}
        self.constant = set(self.inits)
        for n in graph.node:  # topologically sorted: a node's inputs are made before it
            if n.input and all(i in self.constant for i in n.input if i):
                self.constant.update(n.output)
        self.by_bias = {n.input[2]: n for n in graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) == 3}


class _Layer:
    """One zipped layer of several runs in the exported model: its run nodes (Conv / Gemm), the views
    they read (Slice / Gather of one tensor, or that tensor), the Concat of their outputs, and the
    fused weight and bias of eq. F1."""

    def __init__(self, entry: dict, source: str, runs: list, views: list, concat, columns: list[np.ndarray],
                 shapes: list[tuple[int, ...]], width: int):
        self.entry, self.source, self.runs, self.views, self.concat = entry, source, runs, views, concat
        self.prefix = f"mtz/{entry['node']}/fused"
        self.columns, self.shapes, self.width = columns, shapes, width

    @classmethod
    def find(cls, index: _Index, entry: dict, shapes: dict[str, tuple[int, ...]]) -> _Layer | None:
        """The layer whose runs' biases `entry` names, or None where the graph is not of that form
        (a run's output read elsewhere, runs that are not one Concat's inputs in order, views along
        another axis, a weight that is not constant, a shape not known). `shapes`: tensor -> its shape
        (0 where a dimension is not known)."""
        producer, readers, inits = index.producer, index.readers, index.inits
        runs = [index.by_bias.get(b) for _, b in entry["runs"]]
        if any(r is None or len(readers.get(r.output[0], [])) != 1 for r in runs):
            return None
        concat = readers[runs[0].output[0]][0]
        if concat.op_type != "Concat" or list(concat.input) != [r.output[0] for r in runs]:
            return None
        attrs = {(r.op_type, str(sorted((a.name, helper.get_attribute_value(a)) for a in r.attribute))) for r in runs}
        if len(attrs) != 1:  # one op with one set of attributes (ZippedNet.build writes them so)
            return None
        if runs[0].op_type == "Gemm" and [a.i for a in runs[0].attribute if a.name == "transB"] != [1]:
            return None  # the weight's axis 1 must be its inputs' (ZippedNet.build writes transB=1)
        sources, views, columns = set(), [], []
        for r in runs:
            view = producer.get(r.input[0])
            if (view is not None and view.op_type == "Slice" and len(view.input) == 4
                    and all(i in inits for i in view.input[1:])):
                lo, hi, axis = (int(numpy_helper.to_array(inits[i])[0]) for i in view.input[1:4])
                if axis != 1:
                    return None
                sources.add(view.input[0])
                views.append(view)
                columns.append(np.arange(lo, hi))
            elif view is not None and view.op_type == "Gather" and view.input[1] in inits:
                if [a.i for a in view.attribute if a.name == "axis"] != [1]:  # Gather's default axis is 0
                    return None
                sources.add(view.input[0])
                views.append(view)
                columns.append(numpy_helper.to_array(inits[view.input[1]]).astype(np.int64))
            else:
                sources.add(r.input[0])
                columns.append(None)
        weights = [shapes.get(r.input[1], ()) for r in runs]
        if any(r.input[1] not in index.constant or r.input[2] not in inits or len(w) < 2 or 0 in w
               for r, w in zip(runs, weights)):
            return None
        columns = [np.arange(w[1]) if c is None else c for c, w in zip(columns, weights)]
        source = sources.pop() if len(sources) == 1 else None
        shape = shapes.get(source, ())
        width = shape[1] if len(shape) > 1 else 0
        if not width:
            return None
        return cls(entry, source, runs, views, concat, columns, weights, width)

    def forms(self, extractor: Extractor) -> dict[str, onnx.ModelProto]:
        """The layer alone in both forms, on the same input: "runs" (the runs, their views and the
        Concat, as built) and "fused" (the fused node, its weight's subgraph folded by onnxruntime)."""
        runs = extractor.extract_model([self.source], [self.concat.output[0]])
        return {"runs": runs, "fused": _rewrite(runs, [self])}

    def nodes(self) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
        """The fused node and the subgraph that builds its weight (eq. F1) and bias from the runs'
        weights and biases, which stay in the file as they are: per run, its weight padded with
        zeros along the input axis where it reads a contiguous range of columns, else with one zero
        column appended and gathered into place (each input column: its column in the run, or the
        zero column); the runs' results and biases concatenated in row order. Constants only: onnxruntime folds them into the dense weight once,
        when it creates the session, so that the file stores no zero block."""
        p, nodes, tensors, parts = self.prefix, [], [], []
        for k, (run, cols, shape) in enumerate(zip(self.runs, self.columns, self.shapes)):
            lo, hi, part = int(cols[0]), int(cols[-1]) + 1, f"{p}/run{k}/weight"
            if hi - lo == len(cols) and np.all(np.diff(cols) == 1):  # contiguous: zeros padded around
                if (lo, hi) == (0, self.width):
                    parts.append(run.input[1])
                    continue
                pads = np.zeros(2 * len(shape), np.int64)
                pads[1], pads[len(shape) + 1] = lo, self.width - hi
                tensors.append(numpy_helper.from_array(pads, f"{p}/run{k}/pads"))
                nodes.append(helper.make_node("Pad", [run.input[1], f"{p}/run{k}/pads"], [part], name=part))
            else:  # a zero column appended, gathered into place
                index = np.full(self.width, len(cols), np.int32)
                index[cols] = np.arange(len(cols))
                zero, idx, ext = f"{p}/run{k}/zero", f"{p}/run{k}/index", f"{p}/run{k}/extended"
                tensors += [numpy_helper.from_array(np.zeros((shape[0], 1, *shape[2:]), np.float32), zero),
                            numpy_helper.from_array(index, idx)]
                nodes += [helper.make_node("Concat", [run.input[1], zero], [ext], name=ext, axis=1),
                          helper.make_node("Gather", [ext, idx], [part], name=part, axis=1)]
            parts.append(part)
        weight, bias = f"{p}/weight", f"{p}/bias"
        nodes += [helper.make_node("Concat", parts, [weight], name=weight, axis=0),
                  helper.make_node("Concat", [r.input[2] for r in self.runs], [bias], name=bias, axis=0)]
        run = self.runs[0]
        nodes.append(helper.make_node(run.op_type, [self.source, weight, bias], [self.concat.output[0]], name=p,
                                      **{a.name: helper.get_attribute_value(a) for a in run.attribute}))
        return nodes, tensors


def _rewrite(model: onnx.ModelProto, layers: list[_Layer]) -> onnx.ModelProto:
    """`model` with each of `layers` one node and the constant nodes of its weight (in its Concat's
    place); the run nodes, and the views and constants no other node reads, removed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    replaced = {layer.concat.name: layer for layer in layers}  # node names are unique (CleanupGraphPass)
    gone = {n.name for layer in layers for n in layer.runs}
    nodes, tensors = [], []
    for n in out.graph.node:
        if n.name in replaced:
            made, consts = replaced[n.name].nodes()
            nodes += made
            tensors += consts
        elif n.name not in gone:
            nodes.append(n)
    read = {i for n in nodes for i in n.input} | {o.name for o in out.graph.output}
    views = {n.name for layer in layers for n in layer.views}
    nodes = [n for n in nodes if n.name not in views or n.output[0] in read]
    read = {i for n in nodes for i in n.input}
    inits = [i for i in out.graph.initializer if i.name in read]
    made = {o for n in nodes for o in n.output}
    infos = [v for v in out.graph.value_info if v.name in made]
    del out.graph.node[:], out.graph.initializer[:], out.graph.value_info[:]
    out.graph.node.extend(nodes)
    out.graph.value_info.extend(infos)
    out.graph.initializer.extend(inits + tensors)
    return out
