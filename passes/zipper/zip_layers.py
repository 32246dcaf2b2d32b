"""ZipLayersPass: share the first K aligned layers of same-architecture tasks (the `zipper` method).

Wu, Chan, Chen, "On Merging MobileNets for Efficient Multitask Inference" (EMC2 2019). Tasks of
one architecture that take the same input share their first K layers; each shared weight is the
average of the tasks' weights (eq. 1, the merge with the smallest quantisation error)

    W_shared = (1 / T) * sum_t W_t          (and the same for biases)

and the merged model is then calibrated with the tasks' losses plus the per-layer L1 output loss
(eq. 2; onnxmerge.calibration.calibrate). BatchNorm is folded before (FoldBatchNormPass), so averaged weights
carry averaged statistics.

depthwise="shared" (default): the whole prefix (the nodes that compute layer K's input) becomes one
backbone computed once; every other task's remaining layers read the first task's tensors. Saves
parameters and compute. The cut is moved forward until exactly one tensor crosses it, so a residual
block is always shared whole.
depthwise="task" (the paper's variant): the prefix's non-depthwise weights (pointwise, dense, fully
connected) are averaged and shared as one initializer, but each task keeps its own depthwise layers
and therefore computes its own prefix. Saves parameters, not compute.

Preconditions: identical aligned architectures (identity alignment), a shared input, and a combined
graph made by CombineGraphsPass from fresh task graphs. K = 0 changes nothing (exact).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxmerge.errors import MergeError, UsageError
from onnxmerge.model.contract import SHARED
from onnxmerge.pipeline.manager import Pass, PassResult
from onnxmerge.pipeline.state import MergeState, Task


class ZipLayersPass(Pass):
    exact = False
    requires = ("aligned", "combined")

    def __init__(self, share: int | str = "all", depthwise: str = "shared"):
        if depthwise not in ("shared", "task"):
            raise UsageError(f"--depthwise {depthwise}: use shared or task")
        if share != "all" and (not isinstance(share, int) or share < 0):
            raise UsageError(f"--share {share}: give a number of layers >= 0, or all")
        self.share, self.depthwise = share, depthwise

    def call(self, state: MergeState) -> PassResult:
        first, others = state.tasks[0], state.tasks[1:]
        _check_preconditions(state)
        n_layers = len(first.layers)
        k = n_layers - 1 if self.share == "all" else self.share
        if k > n_layers - 1:
            raise UsageError(f"--share {k}: the models have {n_layers} layers and the last (the task head) "
                             f"stays per task, so at most {n_layers - 1} can be shared")
        if k == 0:
            state.params["share"] = 0
            return PassResult(state, False)
        graph = state.graph
        if self.depthwise == "shared":
            k, cut = _valid_cut(graph, state.tasks, k)
            if k != (n_layers - 1 if self.share == "all" else self.share):
                state.notes.append(f"zipper: share rounded up to {k} layers so that residual blocks are shared whole")
        prefixes = [_prefix_nodes(graph, t, k) for t in state.tasks]
        twins = [_correspond(prefixes[0], p, first.name, t.name) for p, t in zip(prefixes[1:], others)]
        shared_weights = {f"{first.name}/{l.node}" for l in first.layers[:k] if not l.depthwise}
        for i, node_a in enumerate(prefixes[0]):
            if self.depthwise == "task" and node_a.name not in shared_weights:
                continue  # each task keeps its own depthwise weights (and its own glue)
            for slot, const_a in enumerate(node_a.inputs):
                if not isinstance(const_a, gs.Constant) or const_a.values.dtype.kind != "f":
                    continue
                copies = [prefix[i].inputs[slot] for prefix in prefixes[1:]]
                mean = np.mean([const_a.values, *[c.values for c in copies]], axis=0)
                const_a.values = np.asarray(mean, dtype=const_a.values.dtype)
                const_a.name = SHARED + const_a.name.split("/", 1)[1]
                if self.depthwise == "task":
                    for prefix in prefixes[1:]:
                        prefix[i].inputs[slot] = const_a
        if self.depthwise == "shared":
            _share_prefix(state, prefixes, twins, cut)
        graph.cleanup().toposort()
        state.params["share"] = k
        return PassResult(state, True)


def _share_prefix(state: MergeState, prefixes: list[list[gs.Node]], twins: list[dict[str, gs.Tensor]],
                  cut: dict[str, gs.Tensor]) -> None:
    """Make every other task read the first task's prefix, which becomes the shared backbone."""
    for task, prefix, twin in zip(state.tasks[1:], prefixes[1:], twins):
        inside = {id(n) for n in prefix}
        tensor = cut[task.name]
        for node in list(tensor.outputs):
            if id(node) not in inside:
                node.inputs[node.inputs.index(tensor)] = twin[tensor.name]
        # the per-layer loss of this task now compares its original layers with the shared ones
        task.layer_map = {o: (twin[m].name if m in twin else m) for o, m in task.layer_map.items()}
    renamed = {}
    for node in prefixes[0]:
        node.name = SHARED + node.name.split("/", 1)[1]
        for t in node.outputs:
            renamed[t.name] = t.name = SHARED + t.name.split("/", 1)[1]
    for task in state.tasks:  # layer maps hold the first task's old tensor names: follow the renaming
        task.layer_map = {o: renamed.get(m, m) for o, m in task.layer_map.items()}


def _check_preconditions(state: MergeState) -> None:
    if len(state.tasks) < 2:
        raise UsageError("zipper needs at least two models")
    if not state.shared_input:
        raise UsageError("zipper shares computation on one input: the models must take inputs of the same "
                         "shape and type (and --separate-inputs must not be given)")
    for al in state.alignments:
        if al.how != "identity":
            raise UsageError(f"zipper merges same-architecture models, but {al.a} and {al.b} differ "
                             f"(their layers do not align one to one); use another method")


def _layer_input(graph: gs.Graph, task: Task, index: int) -> gs.Tensor:
    name = f"{task.name}/{task.layers[index].node}"
    node = next((n for n in graph.nodes if n.name == name), None)
    if node is None:
        raise MergeError(f"zipper: layer {index} ({name}) is not in the merged graph; zip fresh task graphs")
    return node.inputs[0]


def _prefix_nodes(graph: gs.Graph, task: Task, k: int) -> list[gs.Node]:
    """The nodes that compute layer k's data input, in topological order."""
    needed, stack = set(), [_layer_input(graph, task, k)]
    while stack:
        t = stack.pop()
        for node in t.inputs:
            if id(node) not in needed:
                needed.add(id(node))
                stack.extend(node.inputs)
    return [n for n in graph.nodes if id(n) in needed]


def _crossing(graph: gs.Graph, prefix: list[gs.Node]) -> list[gs.Tensor]:
    """Tensors made inside the prefix and read outside it."""
    inside = set(id(n) for n in prefix)
    out = []
    for node in prefix:
        for t in node.outputs:
            if any(id(c) not in inside for c in t.outputs) or t in graph.outputs:
                out.append(t)
    return out


def _valid_cut(graph: gs.Graph, tasks: list[Task], k: int) -> tuple[int, dict[str, gs.Tensor]]:
    """The smallest k' >= k whose prefix holds exactly the layers 0 .. k'-1 and is left through
    exactly one tensor in every task. (The prefix of a block's shortcut, listed after the block's
    convolutions, is the block's input alone: cut there, the count would name layers it does not share.)"""
    last = len(tasks[0].layers) - 1
    for kk in range(k, last + 1):
        cuts = {}
        for task in tasks:
            prefix = _prefix_nodes(graph, task, kk)
            names = {n.name for n in prefix}
            crossing = _crossing(graph, prefix)
            if len(crossing) != 1 or any((f"{task.name}/{layer.node}" in names) != (i < kk)
                                         for i, layer in enumerate(task.layers)):
                break
            cuts[task.name] = crossing[0]
        else:
            return kk, cuts
    raise MergeError(f"zipper: no point at or after layer {k} where the network is cut by one tensor")


def _correspond(prefix_a: list[gs.Node], prefix_b: list[gs.Node], a: str, b: str) -> dict[str, gs.Tensor]:
    """Pair two prefixes of one architecture node by node (topological order): B's tensor name -> A's tensor."""
    if [n.op for n in prefix_a] != [n.op for n in prefix_b]:
        raise MergeError(f"zipper: the shared part of {a} and {b} differs in its operators")
    twin = {}
    for na, nb in zip(prefix_a, prefix_b):
        if na.attrs != nb.attrs or len(na.inputs) != len(nb.inputs):
            raise MergeError(f"zipper: {na.name} and {nb.name} differ in attributes or inputs")
        for ta, tb in zip(na.inputs, nb.inputs):
            if isinstance(ta, gs.Constant) and ta.values.shape != tb.values.shape:
                raise MergeError(f"zipper: {ta.name} and {tb.name} differ in shape")
        for ta, tb in zip(na.outputs, nb.outputs):
            twin[tb.name] = ta
    return twin
