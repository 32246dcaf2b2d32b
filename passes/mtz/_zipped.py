"""The zipped network: tasks of one architecture whose layers share some neurons (Multi-Task Zipping).

He, Zhou, Thiele, "Multi-Task Zipping via Layer-wise Neuron Sharing" (NeurIPS 2018). A merged
tensor holds *columns* (channels, or features of a fully connected layer's input): each column
stands for one channel of one or more tasks (`{task index: that task's channel}`); a column of
several tasks is a shared neuron, computed once. The channels of tensors that are added together
(a residual block's output and its skip input) form one `Space` and always share the same columns,
so sharing inside a residual block respects the skip connection.

Each layer keeps one dense weight over all columns of its input (rows: the columns of its output
space). A row reads only the columns of its own tasks, so the dense weight has zero blocks; they are
never emitted: `build` writes one Conv / Gemm per run of output columns with the same tasks, reading
only the input columns of those tasks (a Slice when they are contiguous, else a Gather). Column
order [task A only | shared | task B only] makes every view of two tasks contiguous.

Sharing nothing, the built graph computes each task's original layers on its own columns: exact.

A depthwise convolution (one kernel per channel, depth multiplier 1) on a zipped tensor is zipped
too (`DLayer`): its output has the columns of its input, so it follows the pairing of the channel
space it reads; a shared column's kernel and bias are the mean of its tasks' (the paper has no
depthwise layers and no eq. for them; the retraining or calibration that follows corrects the
rest). A MobileNet-style network is then zipped through: each pointwise layer's neurons are paired
by eq. 12, and the depthwise layer after it computes a shared channel once.

A node that cannot be zipped (a grouped convolution, a depthwise one with a depth multiplier or on the
model input; an operator between layers other
than channel-wise glue, Flatten, residual Adds, x * f(x) or a scalar constant op: Concat, the Mul of a
squeeze-excitation block, a channel shuffle's Reshape, LRN, ...) is *declined* (`declined`, with a
reason): it and every node that reads its outputs, directly or through other nodes, run per task
(each task's own node and constants, as the glue after the heads); layers among them keep their own
dense weights. A per-task node reads its task's channels of a zipped tensor, in the task's channel
order (`_Builder.task_view`: a Slice, or a Gather where the task's columns are not in its order).
Zipped neurons that such a node reads may be shared like any other: it then reads the shared
neuron's output with its own weights, as a zipped consumer's unpaired row does.

A merged model records `layout()` in its metadata (onnxmerge.layout), so that a later merge can
rebuild the network from the file (`ZippedNet.resume`) and zip further tasks into it, as the
authors' `merge_new_task` zips each further task into the network of the tasks before it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from onnxmerge.errors import MergeError, UsageError
from onnxmerge.graph.layers import Layer
from onnxmerge.model.runtime import random_feeds, session

# ops that act on each channel alone, so they commute with any choice and order of columns
CHANNELWISE = {"Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "MaxPool", "AveragePool",
               "GlobalAveragePool", "GlobalMaxPool", "Dropout", "Identity",
               "HardSwish", "HardSigmoid", "Elu", "Selu", "Celu", "Softplus", "Softsign", "Mish", "Gelu",
               "ThresholdedRelu"}
# elementwise ops that act on each channel alone when their other inputs are scalar constants
SCALAR_OPS = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min"}


@dataclass
class Space:
    """The columns of a family of tensors (a layer's output and the residual sums it feeds)."""

    columns: list[dict[int, int]]  # merged channel -> {task index: that task's channel}
    head: bool = False  # a task head's outputs: one task per column, never shared
    merged: set[int] = field(default_factory=set)  # tasks whose sharing with the others is decided

    def owners(self, k: int) -> frozenset[int]:
        return frozenset(self.columns[k])

    def view(self, tasks: frozenset[int]) -> list[int]:
        """The columns that any of `tasks` reads, in order."""
        return [k for k, c in enumerate(self.columns) if tasks & c.keys()]


@dataclass
class ZLayer:
    """One weight-bearing layer of the zipped network."""

    index: int
    node: str  # the template node's name
    kind: str  # "conv" or "fc"
    attrs: dict  # Conv attributes (strides, pads, dilations, kernel_shape)
    in_space: int
    unit: int  # input features per input column (fc after Flatten: H*W; conv: 1)
    out_space: int
    weight: np.ndarray  # [rows, in columns * unit (fc) | in columns, kh, kw (conv)]
    bias: np.ndarray  # [rows]
    # rows of shared neurons whose output sharing was decided before their layer's turn (a
    # residual block's later producers): the tasks' own rows, kept until the layer is merged
    pending: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # row -> (both rows, both biases)
    mask: np.ndarray | None = None  # pruned models: the nonzero pattern retraining keeps
    zeros: float = 0.0  # the fraction of zeros in the tasks' own weights (pruned models)
    source: int = -1  # the layer's index in each task's layer list (ZLayer.index: among the zipped layers)

    def feature_index(self, cols: list[int]) -> np.ndarray:
        """The weight's input indices of input columns `cols` (fc: each column's `unit` features)."""
        cols = np.asarray(cols, dtype=np.int64)
        if self.kind == "conv" or self.unit == 1:
            return cols
        return (cols[:, None] * self.unit + np.arange(self.unit)[None, :]).reshape(-1)


@dataclass
class DLayer:
    """A depthwise convolution on a zipped space: one kernel per column (`weight` [columns, 1, kh, kw])."""

    node: str
    space: int
    attrs: dict  # Conv attributes but group (the space's width at build time)
    source: int  # the layer's index in each task's layer list
    weight: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    bias: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    names: tuple[str, str] = ("", "")  # its (weight, bias) initializers in the model `build` last wrote


@dataclass
class Run:
    """One emitted node: output columns `rows` of a layer, reading input indices `needed`."""

    layer: int
    rows: list[int]
    needed: np.ndarray
    weight: str
    bias: str


class ZippedNet:
    """The zipped network of same-architecture tasks; `build()` gives the ONNX model."""

    def __init__(self, task_names: list[str], graphs: list[gs.Graph], layers: list[list[Layer]],
                 input_name: str, output_names: list[dict[str, str]], opset: int, ir_version: int):
        self.task_names, self.graphs, self.opset, self.ir_version = task_names, graphs, opset, ir_version
        self.input_name, self.output_names = input_name, output_names
        self.template = graphs[0]
        _check_same_architecture(task_names, graphs, layers)
        self.architecture = _fingerprint(graphs[0], layers[0])
        self.spaces: list[Space] = []
        self.layers: list[ZLayer] = []
        self.depthwise: list[DLayer] = []  # depthwise convolutions that follow their space's pairing
        self.tensor_space: dict[str, tuple[int, int]] = {}  # template tensor -> (space, unit)
        self.runs: list[Run] = []
        self.layer_inputs: dict[int, str] = {}  # layer index -> merged tensor name of its input
        # nodes that cannot be zipped ({node, op, reason, after: the declined node they follow or None}),
        # each run per task with what follows it; `modes`: how `build` emits each template node
        self.declined: list[dict] = []
        self.modes: list[str] = []
        self.task_consts: dict[str, np.ndarray] = {}  # per-task constants as retraining left them
        self.task_const_names: list[str] = []  # their initializers in the model `build` last wrote
        self._analyse(layers)

    # ------------------------------------------------------------------------------------------
    # structure

    def _analyse(self, layers: list[list[Layer]]) -> None:
        """Spaces (union-find over residual Adds), units, heads, declined nodes and the initial
        block-diagonal weights. Each template node gets a mode (`self.modes`, in node order): "layer"
        (a zipped layer), "depthwise" (a depthwise layer on a zipped space), "absorbed" (a zipped MatMul's bias Add), "zipped" (glue computed once on
        zipped tensors) or "task" (run per task: a declined node, the nodes after it, the glue after
        the heads)."""
        tmpl = layers[0]
        by_node = {l.node: l for l in tmpl}
        position = {l.node: i for i, l in enumerate(tmpl)}
        heads = _heads(self.template, by_node)
        shapes = _shapes(self.template)
        n_tasks = len(self.graphs)
        (inp,) = [t for t in self.template.inputs]
        channels = int(shapes[inp.name][1])
        self.spaces.append(Space([{t: c for t in range(n_tasks)} for c in range(channels)], merged=set(range(n_tasks))))
        self.tensor_space[inp.name] = (0, 1)
        parent: dict[int, int] = {}
        # tensors computed per task -> the declined node they come after (None: a head's output, a constant)
        per_task: dict[str, str | None] = {}
        absorbed: set[str] = set()

        def find(s: int) -> int:
            while parent.get(s, s) != s:
                s = parent[s]
            return s

        def run_per_task(node: gs.Node, reason: str | None, after: str | None = None) -> None:
            if reason:
                self.declined.append({"node": node.name, "op": node.op, "reason": reason, "after": after})
            per_task.update({t.name: after or (node.name if reason else None) for t in node.outputs})
            self.modes.append("task")

        for index, node in enumerate(self.template.nodes):
            if node.name in by_node:
                layer = by_node[node.name]
                data = node.inputs[0].name
                after = per_task.get(data)
                if data in per_task:
                    reason = f"after declined node {after}" if after else f"reads {data}, computed per task"
                elif data not in self.tensor_space:
                    reason = f"reads {data}, which no shared or zipped tensor feeds"
                elif layer.groups != 1 and not layer.depthwise:
                    reason = (f"grouped convolution (groups={layer.groups}): Multi-Task Zipping shares whole "
                              "kernels of ungrouped layers, or follows a space's pairing with a depthwise one")
                elif layer.depthwise and layer.out_channels != layer.in_channels:
                    reason = (f"depthwise convolution with depth multiplier {layer.out_channels // layer.in_channels}: "
                              "only one kernel per channel can follow its space's pairing")
                elif layer.depthwise and (self.tensor_space[data][0] == 0 or node.name in heads):
                    reason = ("depthwise convolution of the model input (its channels are every task's)"
                              if self.tensor_space[data][0] == 0 else "depthwise convolution as a task head")
                elif node.op == "MatMul" and len(shapes.get(data, ())) != 2:
                    reason = "MatMul of an input of rank other than 2"
                else:
                    reason = None
                if reason:
                    run_per_task(node, reason, after)
                    continue
                space, unit = self.tensor_space[data]
                if layer.depthwise:  # channel by channel: its output keeps its input's columns
                    self.tensor_space[layer.output] = (space, unit)
                    self.depthwise.append(DLayer(node.name, space, _conv_attrs(node), position[node.name]))
                    self.modes.append("depthwise")
                    continue
                out = len(self.spaces)
                head = node.name in heads
                self.spaces.append(Space([{t: c} for t in range(n_tasks) for c in range(layer.out_channels)], head=head))
                if head:
                    per_task[layer.output] = None
                else:
                    self.tensor_space[layer.output] = (out, 1)
                if node.op == "MatMul" and layer.bias:
                    absorbed.add(layer.output)
                self.layers.append(ZLayer(len(self.layers), node.name, layer.kind, _conv_attrs(node), space, unit, out,
                                          np.zeros(0), np.zeros(0), source=position[node.name]))
                self.modes.append("layer")
                continue
            if node.outputs and node.outputs[0].name in absorbed:
                self.modes.append("absorbed")
                continue
            data_in = [t for t in node.inputs if not isinstance(t, gs.Constant) and t.name]
            zipped = [t for t in data_in if t.name in self.tensor_space]
            own = [t for t in data_in if t.name in per_task]
            if own or not zipped:  # after a declined node or a head, or a constant computation
                after = next((per_task[t.name] for t in own if per_task[t.name]), None)
                mixes = None if after or not zipped else f"mixes {own[0].name}, computed per task, with zipped tensors"
                run_per_task(node, mixes, after)
                continue
            space, unit = self.tensor_space[zipped[0].name]
            roots = [find(self.tensor_space[t.name][0]) for t in zipped]
            scalars = all(isinstance(t, gs.Constant) and np.size(t.values) == 1
                          for t in node.inputs if t.name not in self.tensor_space)
            reason = None
            if node.op in ("Flatten", "Reshape"):
                unit, reason = _flatten_unit(node, shapes, unit)
            elif node.op in ("Add", "Sum") and len(zipped) == len(node.inputs) >= 2:  # a residual sum: one space
                if 0 in roots:
                    reason = "adds the model input"
                else:
                    for b in roots[1:]:
                        parent[b] = roots[0]
                    space = roots[0]
            elif node.op in CHANNELWISE or node.op in SCALAR_OPS and len(zipped) == 1 and scalars:
                pass  # each column alone (a scalar constant is the same for every column)
            elif node.op == "Mul" and len(zipped) == len(node.inputs) == 2 and roots[0] == roots[1] and \
                    len({self.tensor_space[t.name][1] for t in zipped}) == 1:
                pass  # x * f(x) (SiLU): both factors have the same columns
            else:
                reason = (f"{node.op} between layers (Multi-Task Zipping zips Conv/Gemm layers joined by channel-wise "
                          "ops, Flatten and residual Adds)")
            if reason is None and node.op not in ("Flatten", "Reshape") and not _same_constants(self.graphs, index):
                reason = f"{node.op} with constants that differ between the tasks"
            if reason is None:
                self.tensor_space[node.outputs[0].name] = (space, unit)
            if reason:
                run_per_task(node, reason)
            else:
                self.modes.append("zipped")
        # collapse the union-find: every tensor and layer names its space's root
        roots = sorted({find(s) for s in range(len(self.spaces))})
        renumber = {r: k for k, r in enumerate(roots)}
        self.spaces = [self.spaces[r] for r in roots]
        self.tensor_space = {n: (renumber[find(s)], u) for n, (s, u) in self.tensor_space.items()}
        for zl in self.layers:
            zl.in_space, zl.out_space = renumber[find(zl.in_space)], renumber[find(zl.out_space)]
            self._init_weights(zl, [_layer_weights(g, ls[zl.source]) for g, ls in zip(self.graphs, layers)])
        for dl in self.depthwise:
            dl.space = renumber[find(dl.space)]
            weights = [_layer_weights(g, ls[dl.source]) for g, ls in zip(self.graphs, layers)]
            (t0, c0), = self.spaces[dl.space].columns[0].items()  # columns of one task each, as the analysis made them
            dl.weight = np.zeros((len(self.spaces[dl.space].columns), *weights[t0][0].shape[1:]), np.float32)
            dl.bias = np.zeros(len(self.spaces[dl.space].columns), np.float32)
            for k, col in enumerate(self.spaces[dl.space].columns):
                (t, c), = col.items()
                dl.weight[k], dl.bias[k] = weights[t][0][c], weights[t][1][c]

    def _init_weights(self, zl: ZLayer, weights: list[tuple[np.ndarray, np.ndarray]],
                      tasks: frozenset[int] | None = None) -> None:
        """The block-diagonal dense weight: each task's rows read that task's columns (`tasks`:
        only those tasks' rows, which have one task each; the other rows are left zero)."""
        ins, outs = self.spaces[zl.in_space], self.spaces[zl.out_space]
        shape = weights[0][0].shape
        n_in = len(ins.columns) * zl.unit if zl.kind == "fc" else len(ins.columns)
        zl.weight = np.zeros((len(outs.columns), n_in, *shape[2:]), np.float32)
        zl.bias = np.zeros(len(outs.columns), np.float32)
        zl.zeros = float(np.mean([(w == 0).mean() for w, _ in weights]))
        for r, col in enumerate(outs.columns):
            if tasks is not None and not col.keys() <= tasks:
                continue
            (t, o), = col.items()
            w, b = weights[t]
            view = ins.view(frozenset({t}))
            chans = [ins.columns[k][t] for k in view]
            zl.weight[r, zl.feature_index(view)] = w[o][zl.feature_index(chans)]
            zl.bias[r] = b[o]

    def producers(self, space: int) -> list[ZLayer]:
        return [zl for zl in self.layers if zl.out_space == space]

    def consumers(self, space: int) -> list[ZLayer]:
        return [zl for zl in self.layers if zl.in_space == space]

    # ------------------------------------------------------------------------------------------
    # sharing

    def relayout(self, space: int, side_p: frozenset[int], q: int, pairs: list[tuple[int, int]]) -> list[int]:
        """Decide the columns of `space` for merging task `q` into the tasks `side_p` (Algorithm 1's
        permutation): [P only | pairs | q only | others]. Consumers' weight columns follow; producers'
        rows of a pair start as pending (both tasks' rows kept, merged by the caller). Returns the
        new row index of each pair."""
        sp = self.spaces[space]
        tasks_of = [len(c) for c in sp.columns]  # before the new order: a depthwise kernel's weight in a mean
        paired_p, paired_q = {p for p, _ in pairs}, {j for _, j in pairs}
        p_only = [k for k, c in enumerate(sp.columns) if side_p & c.keys() and k not in paired_p]
        q_only = [k for k, c in enumerate(sp.columns) if q in c and k not in paired_q]
        rest = [k for k, c in enumerate(sp.columns) if not (side_p | {q}) & c.keys()]
        order: list[tuple[int, ...]] = ([(k,) for k in p_only] + [tuple(p) for p in sorted(pairs)] +
                                         [(k,) for k in q_only] + [(k,) for k in rest])
        sp.columns = [{t: c for k in group for t, c in sp.columns[k].items()} for group in order]
        sp.merged.add(q)
        for zl in self.consumers(space):
            zl.weight = _sum_columns(zl, order)
            zl.pending = {r: (_sum_columns(zl, order, rows), b) for r, (rows, b) in zl.pending.items()}
            if zl.mask is not None:
                zl.mask = _sum_columns(zl, order, zl.mask.astype(np.float32)) != 0
        for dl in self.depthwise:  # a shared channel's kernel: the mean of its tasks' kernels
            if dl.space == space:
                weights = [[tasks_of[k] for k in g] for g in order]
                dl.weight = np.stack([np.average(dl.weight[list(g)], axis=0, weights=w) for g, w in zip(order, weights)]
                                     ).astype(np.float32)
                dl.bias = np.array([np.average(dl.bias[list(g)], weights=w) for g, w in zip(order, weights)], np.float32)
        new_rows = list(range(len(p_only), len(p_only) + len(pairs)))
        for zl in self.producers(space):
            old_w, old_b = zl.weight, zl.bias
            zl.weight = np.stack([old_w[list(g)].sum(axis=0) for g in order])
            zl.bias = np.array([old_b[list(g)].mean() for g in order], np.float32)
            zl.pending = {r: (old_w[list(order[r])], old_b[list(order[r])]) for r in new_rows}
            if zl.mask is not None:
                zl.mask = np.stack([zl.mask[list(g)].any(axis=0) for g in order])
        return new_rows

    # ------------------------------------------------------------------------------------------
    # the ONNX model

    def build(self) -> onnx.ModelProto:
        """The zipped network as one ONNX model (inputs, outputs and names as the merged-model contract says)."""
        b = _Builder(self)
        for node in self.template.nodes:
            b.node(node)
        self.task_const_names = list(b.task_consts)
        return b.model()

    def read_back(self, model: onnx.ModelProto) -> None:
        """Take the weights of a model `build` wrote (after retraining) back into the dense weights."""
        inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        for run in self.runs:
            zl = self.layers[run.layer]
            w = inits[run.weight]
            rows = np.asarray(run.rows)
            zl.weight[rows[:, None], run.needed[None, :]] = w
            zl.bias[rows] = inits[run.bias]
        for dl in self.depthwise:
            dl.weight, dl.bias = inits[dl.names[0]].reshape(dl.weight.shape), inits[dl.names[1]]
        for zl in self.layers:
            if zl.mask is not None:  # retraining keeps a pruned layer's mask
                zl.weight *= zl.mask
        self.task_consts.update({n: inits[n] for n in self.task_const_names if n in inits})

    # ------------------------------------------------------------------------------------------
    # a merged model as the start of a further merge (the authors' merge_new_task, across runs)

    def layout(self) -> dict:
        """What a later merge needs to rebuild this network from the model `build` last wrote (the
        metadata entry onnxmerge.layout): the tasks; the architecture's fingerprint; per space and
        task, the column of each of the task's channels; per layer, the fraction of zeros of the
        tasks' own weights and the (weight, bias) initializers of its runs, in build order."""
        runs: dict[int, list[list[str]]] = {zl.index: [] for zl in self.layers}
        for run in self.runs:
            runs[run.layer].append([run.weight, run.bias])
        spaces = []
        for sp in self.spaces:
            where: list[dict[int, int]] = [{} for _ in self.task_names]
            for k, col in enumerate(sp.columns):
                for t, c in col.items():
                    where[t][c] = k
            spaces.append([[w[c] for c in range(len(w))] for w in where])
        out = {"tasks": list(self.task_names), "architecture": self.architecture, "spaces": spaces,
               "layers": [{"node": zl.node, "zeros": zl.zeros, "runs": runs[zl.index]} for zl in self.layers]}
        if self.declined:  # resume refuses such a model: its per-task nodes are not rebuilt from the file
            out["declined"] = [d["node"] for d in self.declined]
        if self.depthwise:  # nor its depthwise layers' kernels
            out["depthwise"] = [dl.node for dl in self.depthwise]
        return out

    @classmethod
    def resume(cls, layout: dict, model: onnx.ModelProto, where: str, added: str, task_names: list[str],
               graphs: list[gs.Graph], layers: list[list[Layer]], input_name: str,
               output_names: list[dict[str, str]], opset: int, ir_version: int) -> ZippedNet:
        """The zipped network of merged `model` (at `where`, which `build` wrote with `layout`) with
        the tasks of `graphs` added, unshared: the state of a one-run merge of all the tasks just
        before the first added task is zipped (Algorithm 1 for q = the number of merged tasks), so
        that `merge_task` continues as if the merge had never stopped.

        `task_names` and `output_names` cover every task, the merged ones first (their output maps
        in their outputs' order); `graphs` and `layers` are the added tasks' (`added`: the first one's
        file, for errors). The merged tasks' structure is the added models' architecture (checked
        against the layout's fingerprint), their columns the layout's, their weights `model`'s
        initializers; the rebuilt network must compute `model`'s outputs (checked)."""
        n_base = len(layout["tasks"])
        if len(task_names) != n_base + len(graphs):
            raise MergeError(f"{where}: its layout has {n_base} tasks, its metadata {len(task_names) - len(graphs)}")
        outputs = [o.name for o in graphs[0].outputs]
        for t in range(n_base):
            if len(output_names[t]) != len(outputs):
                raise UsageError(f"{added}: has {len(outputs)} output(s), task {task_names[t]} of {where} "
                                 f"{len(output_names[t])}; mtz zips models of one architecture")
        # the merged tasks stand on the first added graph: its nodes, with their outputs' merged names
        names = [dict(zip(outputs, output_names[t].values())) for t in range(n_base)] + output_names[n_base:]
        net = cls(task_names, [graphs[0]] * n_base + list(graphs), [layers[0]] * n_base + list(layers),
                  input_name, names, opset, ir_version)
        if layout.get("architecture") != net.architecture:
            raise UsageError(f"{added}: not of the architecture of the tasks of {where} (operators, attributes "
                             "or layer shapes differ); mtz zips models of one architecture")
        if layout.get("declined") or net.declined:
            raise UsageError(f"{where}: has declined nodes (run per task, not recorded in its layout); merge the "
                             "original models again")
        if layout.get("depthwise") or net.depthwise:
            raise UsageError(f"{where}: has zipped depthwise layers (not recorded in its layout); merge the "
                             "original models again")
        if len(layout["spaces"]) != len(net.spaces) or len(layout["layers"]) != len(net.layers):
            raise MergeError(f"{where}: its layout does not fit its architecture (onnxmerge.layout is corrupt)")
        base = frozenset(range(n_base))
        for s, (sp, per_task) in enumerate(zip(net.spaces, layout["spaces"])):
            if s == 0:  # the model input: every task reads every column, as _analyse made it
                continue
            columns: list[dict[int, int]] = [{} for _ in range(1 + max((k for w in per_task for k in w), default=-1))]
            for t, cols in enumerate(per_task):
                if len(cols) != sum(t in c for c in sp.columns):
                    raise MergeError(f"{where}: its layout gives task {task_names[t]} {len(cols)} channels where "
                                     f"its architecture has {sum(t in c for c in sp.columns)}")
                for c, k in enumerate(cols):
                    if t in columns[k]:
                        raise MergeError(f"{where}: its layout puts two channels of task {task_names[t]} in one column")
                    columns[k][t] = c
            if not all(columns):
                raise MergeError(f"{where}: its layout leaves a column without a task (onnxmerge.layout is corrupt)")
            # [the merged tasks' columns | each added task's own], as _analyse and relayout order them
            sp.columns = columns + [c for c in sp.columns if not c.keys() & base]
            sp.merged = set(base)
        added_tasks = frozenset(range(n_base, len(task_names)))
        for zl, entry in zip(net.layers, layout["layers"]):
            fresh = [_layer_weights(g, ls[zl.source]) for g, ls in zip(graphs, layers)]
            net._init_weights(zl, [fresh[0]] * n_base + fresh, tasks=added_tasks)
            zl.zeros = (float(entry["zeros"]) * n_base + sum(float((w == 0).mean()) for w, _ in fresh)) / len(task_names)
        net.build()  # the runs: in each layer, the merged tasks' come first, as in `model`
        inits = {i.name: i for i in model.graph.initializer}
        for zl, entry in zip(net.layers, layout["layers"]):
            owners = net.spaces[zl.out_space].owners
            runs = [r for r in net.runs if r.layer == zl.index and owners(r.rows[0]) <= base]
            if len(runs) != len(entry["runs"]):
                raise MergeError(f"{where}: its layout gives layer {zl.node} {len(entry['runs'])} weight runs, its "
                                 f"columns make {len(runs)} (onnxmerge.layout is corrupt)")
            for run, (wname, bname) in zip(runs, entry["runs"]):
                if wname not in inits or bname not in inits:
                    raise MergeError(f"{where}: no initializer {wname if wname not in inits else bname} that its "
                                     "layout names (was the file edited after onnxmerge wrote it?)")
                w, b = numpy_helper.to_array(inits[wname]), numpy_helper.to_array(inits[bname])
                want = (len(run.rows), len(run.needed), *zl.weight.shape[2:])
                if w.shape != want or b.shape != (len(run.rows),):
                    raise MergeError(f"{where}: initializer {wname} has shape {w.shape} where its layout makes {want}")
                rows = np.asarray(run.rows)
                zl.weight[rows[:, None], run.needed[None, :]] = w
                zl.bias[rows] = b
        net._check_rebuilt(model, where, [n for t in range(n_base) for n in names[t].values()])
        return net

    def _check_rebuilt(self, model: onnx.ModelProto, where: str, outputs: list[str], tol: float = 1e-5) -> None:
        """Refuse a rebuilt network that does not compute `model`'s `outputs` (those of the merged
        tasks): the same weights in the same graph, so only float rounding may differ."""
        ref = session(model)
        feeds = random_feeds(ref, 4, seed=0)
        expected = ref.run(outputs, feeds)
        del ref
        got = session(self.build()).run(outputs, {self.input_name: next(iter(feeds.values()))})
        for name, g, r in zip(outputs, got, expected):
            diff = float(np.abs(g - r).max()) / max(1.0, float(np.abs(r).max()))
            if not diff <= tol:
                raise MergeError(f"{where}: the network rebuilt from its layout (onnxmerge.layout) differs from the "
                                 f"file's in output {name} (relative difference {diff:.3g}); was the file edited "
                                 "after onnxmerge wrote it?")


class _Builder:
    """Walks the template graph and emits the zipped nodes (one per run of same-task columns)."""

    def __init__(self, net: ZippedNet):
        self.net = net
        net.runs, net.layer_inputs = [], {}
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.merged: dict[str, str] = {net.template.inputs[0].name: net.input_name}  # template -> merged tensor
        self.per_task: dict[str, list[str]] = {}  # template tensor -> one tensor per task
        self.views: dict[tuple, str] = {}
        self.layer_of = {zl.node: zl for zl in net.layers}
        self.depthwise_of = {dl.node: dl for dl in net.depthwise}
        self.index = {id(n): i for i, n in enumerate(net.template.nodes)}
        self.task_consts: list[str] = []  # initializers of per-task nodes' constants
        absorbed = {}
        for node in net.template.nodes:
            if node.op == "MatMul" and node.name in self.layer_of:
                out = node.outputs[0]
                if len(out.outputs) == 1 and net.modes[self.index[id(out.outputs[0])]] == "absorbed":  # its bias Add
                    absorbed[id(out.outputs[0])] = node
        self.absorbed = absorbed

    def node(self, node: gs.Node) -> None:
        net = self.net
        if id(node) in self.absorbed:
            return
        if node.name in self.layer_of:
            self.layer(self.layer_of[node.name], node)
            return
        if node.name in self.depthwise_of:
            self.depthwise(self.depthwise_of[node.name], node)
            return
        index = self.index[id(node)]
        if net.modes[index] == "zipped":
            name = f"mtz/{node.outputs[0].name}"
            inputs = [self.merged[t.name] if t.name in self.merged else self.const(t, f"mtz/{node.name}")
                      for t in node.inputs]
            op, attrs = node.op, dict(node.attrs)
            if op == "Reshape":  # a flatten (checked by the analysis): its target shape holds task widths
                op, attrs, inputs = "Flatten", {"axis": 1}, inputs[:1]
            self.nodes.append(helper.make_node(op, inputs, [name], name=f"mtz/{node.name}", **attrs))
            self.merged[node.outputs[0].name] = name
            return
        # per task (a declined node, the nodes after it, the glue after the heads): each task's own
        # node with its own constants, reading its own channels of zipped tensors (task_view)
        outs: list[list[str]] = []
        for t, task in enumerate(net.task_names):
            own = net.graphs[t].nodes[index]
            inputs = []
            for tt, ot in zip(node.inputs, own.inputs):
                if tt.name in self.per_task:
                    inputs.append(self.per_task[tt.name][t])
                elif tt.name in self.merged:
                    inputs.append(self.task_view(tt.name, t))
                elif isinstance(ot, gs.Constant):
                    inputs.append(self.const(ot, f"{task}/{node.name}"))
                    self.task_consts.append(inputs[-1])
                else:
                    inputs.append(ot.name)
            names = [f"{task}/{o.name}" if o.name else "" for o in node.outputs]
            self.nodes.append(helper.make_node(node.op, inputs, names, name=f"{task}/{node.name}", **node.attrs))
            outs.append(names)
        for k, o in enumerate(node.outputs):
            self.per_task[o.name] = [names[k] for names in outs]

    def const(self, tensor: gs.Constant, prefix: str) -> str:
        name = f"{prefix}/{tensor.name}"
        if name not in {i.name for i in self.inits}:
            value = self.net.task_consts.get(name)
            self.inits.append(numpy_helper.from_array(np.asarray(tensor.values) if value is None else value, name))
        return name

    def task_view(self, tensor: str, t: int) -> str:
        """Task `t`'s channels of zipped tensor `tensor`, in the task's channel order."""
        space, unit = self.net.tensor_space[tensor]
        columns = self.net.spaces[space].columns
        cols = np.array([k for _, k in sorted((c[t], k) for k, c in enumerate(columns) if t in c)], np.int64)
        needed = (cols[:, None] * unit + np.arange(unit)[None, :]).reshape(-1)
        return self.view(self.merged[tensor], needed, len(columns) * unit)

    def view(self, source: str, needed: np.ndarray, total: int) -> str:
        """`source` restricted to input indices `needed` along axis 1 (Slice if contiguous, else Gather)."""
        if len(needed) == total and np.array_equal(needed, np.arange(total)):
            return source
        lo, hi = int(needed[0]), int(needed[-1]) + 1
        key = (source, lo, hi) if hi - lo == len(needed) and np.all(np.diff(needed) == 1) else (source, tuple(needed.tolist()))
        if key in self.views:
            return self.views[key]
        name = f"{source}/view{len(self.views)}"
        if len(key) == 3:
            consts = [self.array(np.array([lo], np.int64), f"{name}/starts"), self.array(np.array([hi], np.int64), f"{name}/ends"),
                      self.array(np.array([1], np.int64), f"{name}/axes")]
            self.nodes.append(helper.make_node("Slice", [source, *consts], [name], name=name))
        else:
            idx = self.array(needed.astype(np.int64), f"{name}/indices")
            self.nodes.append(helper.make_node("Gather", [source, idx], [name], name=name, axis=1))
        self.views[key] = name
        return name

    def array(self, value: np.ndarray, name: str) -> str:
        self.inits.append(numpy_helper.from_array(value, name))
        return name

    def layer(self, zl: ZLayer, node: gs.Node) -> None:
        net = self.net
        source = self.merged[node.inputs[0].name]
        net.layer_inputs[zl.index] = source
        ins, outs = net.spaces[zl.in_space], net.spaces[zl.out_space]
        total = zl.weight.shape[1]
        runs: list[tuple[frozenset[int], list[int]]] = []
        for r in range(len(outs.columns)):
            owners = outs.owners(r)
            if runs and runs[-1][0] == owners:
                runs[-1][1].append(r)
            else:
                runs.append((owners, [r]))
        out_name = _output_of(node, zl, self.absorbed)
        names = []
        for owners, rows in runs:
            label = "+".join(net.task_names[t] for t in sorted(owners))
            prefix = f"{'shared' if len(owners) > 1 else label}/{zl.node}" + (f"/{label}" if len(owners) > 1 else "")
            needed = zl.feature_index(ins.view(owners))
            w = np.ascontiguousarray(zl.weight[np.asarray(rows)[:, None], needed[None, :]], np.float32)
            wname, bname = self.array(w, f"{prefix}/weight"), self.array(zl.bias[rows].astype(np.float32), f"{prefix}/bias")
            x = self.view(source, needed, total)
            y = f"{prefix}/out" if len(runs) > 1 or outs.head else f"mtz/{out_name}"
            if outs.head:
                y = f"{label}/{out_name}"
            if zl.kind == "conv":
                self.nodes.append(helper.make_node("Conv", [x, wname, bname], [y], name=prefix, **zl.attrs))
            else:
                self.nodes.append(helper.make_node("Gemm", [x, wname, bname], [y], name=prefix, transB=1))
            net.runs.append(Run(zl.index, rows, needed, wname, bname))
            names.append(y)
        if outs.head:
            self.per_task[out_name] = names
        elif len(names) > 1:
            self.nodes.append(helper.make_node("Concat", names, [f"mtz/{out_name}"], name=f"mtz/{zl.node}/concat", axis=1))
        if not outs.head:
            self.merged[out_name] = f"mtz/{out_name}"

    def depthwise(self, dl: DLayer, node: gs.Node) -> None:
        """One depthwise Conv over every column of its space (a column's kernel reads that column only)."""
        name = f"mtz/{node.name}"
        dl.names = (self.array(dl.weight.astype(np.float32), f"{name}/weight"),
                    self.array(dl.bias.astype(np.float32), f"{name}/bias"))
        out = f"mtz/{node.outputs[0].name}"
        self.nodes.append(helper.make_node("Conv", [self.merged[node.inputs[0].name], *dl.names], [out], name=name,
                                           group=len(dl.weight), **dl.attrs))
        self.merged[node.outputs[0].name] = out

    def model(self) -> onnx.ModelProto:
        net = self.net
        renames = {}
        outputs = []
        for k, tmpl_out in enumerate(net.template.outputs):
            if tmpl_out.name not in self.per_task:  # a zipped tensor: each task's view of it
                views = [self.task_view(tmpl_out.name, t) for t in range(len(net.task_names))]
                self.per_task[tmpl_out.name] = [f"{task}/{tmpl_out.name}" for task in net.task_names]
                self.nodes += [helper.make_node("Identity", [v], [o], name=o)
                               for v, o in zip(views, self.per_task[tmpl_out.name])]
            for t, task in enumerate(net.task_names):
                want = net.output_names[t][net.graphs[t].outputs[k].name]
                renames[self.per_task[tmpl_out.name][t]] = want
                out = net.graphs[t].outputs[k]
                outputs.append(_value_info(want, out))
        for n in self.nodes:
            n.output[:] = [renames.get(o, o) for o in n.output]
            n.input[:] = [renames.get(i, i) for i in n.input]
        graph = helper.make_graph(self.nodes, "onnxmerge", [_value_info(net.input_name, net.template.inputs[0])],
                                  outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", net.opset)])
        model.ir_version = net.ir_version
        return model


# ----------------------------------------------------------------------------------------------
# helpers


def _value_info(name: str, tensor: gs.Variable) -> onnx.ValueInfoProto:
    shape = [d if isinstance(d, int) else "N" for d in (tensor.shape or [])]
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype)), shape)


def _check_same_architecture(names: list[str], graphs: list[gs.Graph], layers: list[list[Layer]]) -> None:
    ops = [[(n.op, sorted(n.attrs.items())) for n in g.nodes] for g in graphs]
    for name, o, ls in zip(names[1:], ops[1:], layers[1:]):
        if o != ops[0] or [l.signature for l in ls] != [l.signature for l in layers[0]]:
            raise UsageError(f"mtz zips models of one architecture, but {names[0]} and {name} differ in their "
                             "operators, attributes or layer shapes")
    if len(graphs[0].inputs) != 1:
        raise UsageError(f"mtz: {names[0]} has {len(graphs[0].inputs)} inputs; models of one input are supported")


def _fingerprint(graph: gs.Graph, layers: list[Layer]) -> str:
    """What _check_same_architecture compares (each node's operator and attributes, the layers'
    signatures), hashed: an added model must have the architecture of a merged model's tasks."""
    def plain(value):  # attribute values that print the same for equal models (no object ids)
        if isinstance(value, (int, float, str, bool)) or value is None:
            return value
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        return type(value).__name__
    nodes = [(n.op, sorted((k, plain(v)) for k, v in n.attrs.items())) for n in graph.nodes]
    return hashlib.sha256(repr((nodes, [l.signature for l in layers])).encode()).hexdigest()[:16]


def _heads(graph: gs.Graph, layers: dict[str, Layer]) -> set[str]:
    """Layers whose output reaches no other layer (through glue): the task heads, never shared."""
    heads = set()
    for name, layer in layers.items():
        stack, seen, feeds_layer = [graph.tensors()[layer.output]], set(), False
        while stack and not feeds_layer:
            t = stack.pop()
            for consumer in t.outputs:
                if consumer.name in layers:
                    feeds_layer = True
                    break
                if id(consumer) not in seen:
                    seen.add(id(consumer))
                    stack.extend(consumer.outputs)
        if not feeds_layer:
            heads.add(name)
    return heads


def _shapes(graph: gs.Graph) -> dict[str, tuple]:
    model = onnx.shape_inference.infer_shapes(gs.export_onnx(graph.copy()))
    out = {}
    for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        out[v.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim)
    return out


def _same_constants(graphs: list[gs.Graph], index: int) -> bool:
    """Whether node `index` has the same constant inputs in every task (a node computed once on
    zipped tensors uses the first task's)."""
    first = graphs[0].nodes[index].inputs
    return all(not isinstance(a, gs.Constant) or np.array_equal(np.asarray(a.values), np.asarray(b.values))
               for g in graphs[1:] for a, b in zip(first, g.nodes[index].inputs))


def _flatten_unit(node: gs.Node, shapes: dict[str, tuple], unit: int) -> tuple[int, str | None]:
    """(features per channel after flattening NCHW to (N, C*H*W), None), or (unit, why not a flatten)."""
    shape = shapes.get(node.inputs[0].name)
    out = shapes.get(node.outputs[0].name)
    if node.op == "Flatten" and int(node.attrs.get("axis", 1)) != 1 or shape is None or out is None or len(out) != 2:
        return unit, f"{node.op} other than a flatten of (N, C, ...) to (N, C*...)"
    spatial = shape[2:]
    if any(d is None for d in spatial):
        return unit, f"{node.op} of a tensor of unknown spatial size"
    return (unit * int(np.prod(spatial, dtype=np.int64)) if len(shape) > 2 else unit), None


def _conv_attrs(node: gs.Node) -> dict:
    if node.op != "Conv":
        return {}
    return {k: v for k, v in node.attrs.items() if k in ("strides", "pads", "dilations", "kernel_shape", "auto_pad")}


def _layer_weights(graph: gs.Graph, layer: Layer) -> tuple[np.ndarray, np.ndarray]:
    """A layer's weight as [out, in, ...] and its bias (zeros when it has none), Gemm's alpha / beta folded."""
    node = next(n for n in graph.nodes if n.name == layer.node)
    w = np.asarray(node.inputs[1].values, np.float32)
    tensors = graph.tensors()
    bias = np.asarray(tensors[layer.bias].values, np.float32).reshape(-1) if layer.bias else np.zeros(layer.out_channels, np.float32)
    if node.op == "Gemm":
        if not node.attrs.get("transB", 0):
            w = w.T
        w = w * float(node.attrs.get("alpha", 1.0))
        bias = bias * float(node.attrs.get("beta", 1.0))
        if bias.size == 1 and layer.out_channels != 1:
            bias = np.full(layer.out_channels, bias.item(), np.float32)
    elif node.op == "MatMul":
        w = w.T
    return np.ascontiguousarray(w), np.ascontiguousarray(bias)


def _output_of(node: gs.Node, zl: ZLayer, absorbed: dict) -> str:
    out = node.outputs[0]
    if node.op == "MatMul" and len(out.outputs) == 1 and id(out.outputs[0]) in absorbed:
        return out.outputs[0].outputs[0].name
    return out.name


def _sum_columns(zl: ZLayer, order: list[tuple[int, ...]], weight: np.ndarray | None = None) -> np.ndarray:
    """The weight over the new columns: a merged column (p, q) reads both old columns (a row of one
    side has zeros on the other side's column, so the sum keeps each row's own weight)."""
    w = zl.weight if weight is None else weight
    if zl.kind == "fc" and zl.unit > 1:
        blocks = w.reshape(w.shape[0], -1, zl.unit, *w.shape[2:])
        return np.stack([blocks[:, list(g)].sum(axis=1) for g in order], axis=1).reshape(w.shape[0], -1, *w.shape[2:])
    return np.stack([w[:, list(g)].sum(axis=1) for g in order], axis=1)
