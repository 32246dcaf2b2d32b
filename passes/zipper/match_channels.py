"""MatchChannelsPass: permute the hidden channels of every task but the first to match the first's.

The zipper method (Wu, Chan, Chen, EMC2 2019) initialises each shared layer with the average of both
nets' weights (eq. 1). Independently trained nets order their hidden channels arbitrarily, so the
average of unmatched channels belongs to neither net. This pass runs before the averaging and
reorders the hidden channels of task B (every task after the first) so that channel c of B's layer i
is the one most similar to channel c of A's (the first task's) layer i, without changing any task's
function.

Permutation invariance of hidden units: for a chain x_{i+1} = f(W_{i+1} g(W_i x_i + b_i) + b_{i+1})
with g acting per channel (activations, pooling, per-channel affine), and any permutation matrix P,

    W_i' = P W_i,   b_i' = P b_i,   W_{i+1}' = W_{i+1} P^T

leaves x_{i+1} unchanged, because g(P z) = P g(z) and P^T P = I. Per-channel parameters met between
the two layers (an unfolded BatchNormalization's scale/bias/mean/var, a PRelu slope, a per-channel
Mul/Add constant) are permuted with P too. In weight tensors: a Conv's output axis is 0 and its input
axis 1; a Gemm's output axis is 0 with transB=1 (weight [N, K]) and 1 with transB=0 (weight [K, N]),
its input axis the other one; a MatMul weight is [K, N]. A Flatten between a Conv and a Gemm/MatMul
turns channel c into the block c*H*W .. (c+1)*H*W-1 of input features (channel-major), so the Gemm's
input axis is permuted by blocks of H*W = in_features / channels. A depthwise Conv (group = channels,
channel multiplier m) has no choice: its output permutation is its input permutation, expanded to
blocks of m; its weight's axis 0 and its bias follow it. The permutation therefore propagates along
the chain to the first layer outside the matched set that is not depthwise, of which only the input
axis is permuted. The last layer's outputs are the task's outputs and are never permuted.

Matching. A permutation belongs to a group: a dense layer and the matched depthwise layers right
after it (they must follow it). The objective is the sum over the matched layers l of

    J_l = mean over l's output channels c of sim_l(A's channel c, B's channel P(c))

- similarity="weights": sim_l = cosine similarity of the output filters, each flattened with its bias
  appended, with B's input axis permuted by the previous group's permutation. Row norms do not change
  under permutation, so J is linear in each group's permutation given the others: maximising J over
  one group is one linear assignment problem (scipy.optimize.linear_sum_assignment) whose gain matrix
  sums the group's layers' rows and the next matched layer's input columns. The pass runs coordinate
  ascent over the groups (the weight matching of Ainsworth, Hayase, Srinivasa, "Git Re-Basin", ICLR
  2023) from two starts, the identity and a greedy forward pass (each group matched on its incoming
  filters only, the layer-by-layer matching of the zipper paper), and keeps the better (the identity
  start on ties); so J never ends below the identity's, and a second run keeps the identity.
- similarity="activations": sim_l = Pearson correlation of the layer outputs (before the activation),
  over the samples and positions of a batch fed to every task (the data of all tasks, concatenated; the
  tasks must take inputs of one shape). Layer outputs do not depend on other layers' permutations, so
  one assignment per group is the optimum.

Reported per task and layer (state.notes, and `self.report`): J_l for the channels paired as they
were (identity permutations, B's original weights) and as they are after matching.

Preconditions: AlignLayersPass has run (task.layers, state.alignments); the first `layers` layers are
aligned one to one (identity alignment, as in zipper's same-architecture nets) with equal signatures.
Declines for a task, with a note and its graph unchanged, when: the alignment is not the identity on
the matched layers; a matched layer or a layer consuming its channels is a grouped (not depthwise)
Conv; a matched layer's output reaches anything else than per-channel/elementwise glue (Relu, Clip,
LeakyRelu, Sigmoid, Tanh, ..., MaxPool, AveragePool, GlobalAveragePool, Pad off the channel axis,
BatchNormalization, PRelu, Mul/Add/Sub/Div with a constant, Flatten or a flatten-like Reshape into a
Gemm/MatMul) before the next layer: an Add/Sub/Mul of two computed tensors (residual networks are
declined for now), Concat, any other Reshape, Softmax over channels, a graph output, or a tensor
read by more than one node; or a weight it would edit is read by another node too (weights may be
shared on purpose). `layers` larger than the number of layers minus one is reduced to that, with a
note. Exact: every task computes what it did (to float rounding); `--verify` checks it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
from scipy.optimize import linear_sum_assignment

from onnxmerge.errors import UsageError
from onnxmerge.graph.convert import to_model
from onnxmerge.graph.layers import Layer, weight_out_axis
from onnxmerge.model.runtime import session
from onnxmerge.pipeline.manager import TaskPass

# glue ops that act on each channel separately (shape and channel order pass through)
ELEMENTWISE = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "HardSigmoid",
               "HardSwish", "Softplus", "Softsign", "Gelu", "Mish", "ThresholdedRelu", "Erf", "Abs",
               "Neg", "Exp", "Identity", "Dropout"}
POOLING = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
BINARY = {"Add", "Sub", "Mul", "Div"}


class _Decline(Exception):
    """Why the permutation cannot be applied to a task (becomes a note, never reaches the user)."""


@dataclass
class _Edit:
    """Permute `const` along `axis` with the channel permutation expanded to that axis's size."""

    const: gs.Constant
    axis: int  # non-negative axis of the constant's array


@dataclass
class _Step:
    """What permuting layer i's output channels touches."""

    own: list[_Edit]  # the layer's weight (output axis) and bias
    edits: list[_Edit]  # per-channel constants on the way, unmatched depthwise layers, the consumer's input axis
    consumer: int  # the layer whose input axis ends the chain


ALL = 2**31 - 1  # layers="all": every layer but the task head


class MatchChannelsPass(TaskPass):
    """Permute the output channels of the first `layers` layers of every task but the first so that
    they best match the first task's (see the module docstring); function-preserving.

    layers:     how many layers from the first to match (at most all but the last).
    similarity: "weights" (filters' cosine), "activations" (layer outputs' correlation on `data`), or
                "auto": activations on the merge's calibration data (state.calib, `samples` per task)
                when every task has some, of one shape, else weights. Activation matching (ZipIt!, Stoica et al.
                2024; Git Re-Basin's activation matching) pairs channels by what they compute, which
                the filters of independently trained nets show poorly.
    data:       for "activations": one input batch, or task name -> batch (all batches are fed to
                every task, concatenated); None with "activations" or "auto": state.calib.
    samples:    samples per task drawn from state.calib (seeded) for "activations"/"auto".

    After `call`, `self.report[task] = [{"layer", "node", "kind", "before", "after", "permuted"}, ...]`
    holds the mean matched similarity per matched layer (absent for declined tasks).
    """

    exact = True
    requires = ("separate", "aligned")

    def __init__(self, layers: int | str, similarity: str = "weights",
                 data: np.ndarray | dict[str, np.ndarray] | None = None, samples: int = 256):
        if layers == "all":  # every layer but the task head
            layers = ALL
        if not isinstance(layers, (int, np.integer)) or isinstance(layers, bool) or layers < 0:
            raise UsageError(f"MatchChannelsPass: layers must be a non-negative integer, got {layers!r}")
        if similarity not in ("weights", "activations", "auto"):
            raise UsageError(f"MatchChannelsPass: similarity {similarity!r}: choose weights, activations or auto")
        self.layers = int(layers)
        self.asked = similarity
        self.similarity = similarity
        self.data = data
        self.samples = samples
        self.report: dict[str, list[dict]] = {}

    def call(self, state):
        self.report = {}
        self.similarity, self._data = self.asked, self.data
        if self.asked != "weights" and self.data is None:
            calib = getattr(state, "calib", None) or {}
            shapes = {tuple(calib[t.name].x.shape[1:]) for t in state.tasks if t.name in calib}
            if all(t.name in calib for t in state.tasks) and len(shapes) == 1:
                # the same seeded draw as every other use of --calib here, so a merge is repeatable
                self._data = {t.name: calib[t.name].subset(self.samples, seed=0).x for t in state.tasks}
            elif self.asked == "activations":
                raise UsageError("channel matching by activations needs calibration data of one input shape "
                                 "for every task (--calib TASK=PATH)")
            else:
                self.similarity = "weights"  # auto without data: the filters are all there is
        if self.similarity == "auto":
            self.similarity = "activations"
        return super().call(state)

    def rewrite(self, graph: gs.Graph, task, state) -> bool:
        index = next(i for i, t in enumerate(state.tasks) if t is task)
        if index == 0 or self.layers == 0:
            return False  # the first task is the reference
        first = state.tasks[0]
        try:
            k = self._matched_count(first, task, state, index)
            la, lb = first.layers, task.layers
            steps = _plan(graph, lb, k)
            sims = self._similarities(first, task, state, k) if self.similarity == "activations" else None
            arrays, rows = _match(first.graph, graph, la, lb, k, steps, sims)
        except _Decline as e:
            state.notes.append(f"{task.name}: channel matching declined: {e}; graph unchanged")
            return False
        self.report[task.name] = rows
        for r in rows:
            state.notes.append(
                f"{task.name}: channel matching layer {r['layer']} ({r['kind']}, {self.similarity}): mean "
                f"similarity to {first.name} {r['before']:.3f} -> {r['after']:.3f}"
                f"{'' if r['permuted'] else ' (already matched)'}")
        if not any(r["permuted"] for r in rows):
            return False
        # calibration compares this task's layer outputs with its original's: record the new order,
        # composed with any earlier one (a warm start's): merged channel c holds old[perm[c]]
        for r in rows:
            if r["permuted"]:
                out = task.layers[r["layer"]].output
                old = task.channel_order.get(out)
                task.channel_order[out] = [int(old[c]) if old else int(c) for c in r["perm"]]
        consts = graph.tensors()
        for name, values in arrays.items():
            consts[name].values = values
        return True

    def _matched_count(self, first, task, state, index: int) -> int:
        la, lb = first.layers, task.layers
        k = self.layers
        if k > len(lb) - 1 and k != ALL:
            state.notes.append(f"{task.name}: channel matching: {k} layers asked, {len(lb) - 1} matched "
                               f"(layer {len(lb) - 1}'s outputs are the task's outputs and keep their order)")
        k = min(k, len(lb) - 1)
        al = state.alignments[index - 1]
        pairs = dict(al.pairs)
        for i in range(k):
            if pairs.get(i) != i or i >= len(la):
                raise _Decline(f"layer {i} is not aligned with layer {i} of {first.name} "
                               f"(alignment {al.how}); zipper needs equal architectures")
            if la[i].signature != lb[i].signature:
                raise _Decline(f"layer {i} differs from {first.name}'s ({lb[i].signature} vs {la[i].signature})")
        return k

    def _similarities(self, first, task, state, k: int) -> list[np.ndarray]:
        """Activation correlation matrices [A channel, B channel] of layers 0..k-1."""
        data = self._data
        if isinstance(data, dict):
            arrays = [np.asarray(data[t.name]) for t in state.tasks if t.name in data]
            if not arrays:
                raise _Decline("no activation data for any task")
            data = np.concatenate(arrays)
        acts_a = _layer_outputs(first, state, k, data)
        acts_b = _layer_outputs(task, state, k, data)
        return [_correlation(a, b) for a, b in zip(acts_a, acts_b)]


# ---------------------------------------------------------------------------------------------------
# planning: which constants permuting each layer's output touches; declines before anything changes


def _plan(graph: gs.Graph, layers: list[Layer], k: int) -> list[_Step]:
    names = [n.name for n in graph.nodes]
    if len(set(names)) != len(names) or not all(names):
        raise _Decline("node names are not unique")
    nodes = {n.name: n for n in graph.nodes}
    by_node = {l.node: l.index for l in layers}
    outputs = {id(t) for t in graph.outputs}
    steps = []
    for i in range(k):
        layer = layers[i]
        if layer.kind == "conv" and layer.groups > 1 and not layer.depthwise:
            raise _Decline(f"layer {i} ({layer.node}) is a grouped Conv (groups={layer.groups})")
        own = _own_params(graph, layer, nodes[layer.node])
        edits: list[_Edit] = []
        start = layer
        while True:
            walk_edits, j = _walk(graph, start, nodes, by_node, outputs)
            edits += walk_edits
            consumer = layers[j]
            if j != start.index + 1:
                raise _Decline(f"layer {start.index}'s output reaches layer {j}, not the next layer")
            if consumer.kind == "conv" and consumer.groups > 1 and not consumer.depthwise:
                raise _Decline(f"layer {j} ({consumer.node}) is a grouped Conv (groups={consumer.groups})")
            if j < k or not consumer.depthwise:
                break
            # an unmatched depthwise layer carries the permutation through to its own output
            if j == len(layers) - 1:
                raise _Decline(f"the last layer {j} is depthwise: its outputs are the task's outputs")
            edits += _own_params(graph, consumer, nodes[consumer.node])
            start = consumer
        if not consumer.depthwise:  # a matched depthwise consumer gets its permutation as its output's
            edits.append(_input_edit(consumer, nodes[consumer.node]))
        steps.append(_Step(own, edits, j))
    return steps


def _own_params(graph, layer: Layer, node: gs.Node) -> list[_Edit]:
    """The edits that permute a layer's output channels (weight's output axis, bias)."""
    weight = node.inputs[1]
    _check_private(weight, layer.node)
    edits = [_Edit(weight, weight_out_axis(node))]
    if layer.bias is not None:
        bias = graph.tensors()[layer.bias]
        if not isinstance(bias, gs.Constant):
            raise _Decline(f"layer {layer.index}'s bias {bias.name} is not a constant")
        _check_private(bias, layer.node)
        if bias.values.size not in (1, layer.out_channels):
            raise _Decline(f"layer {layer.index}'s bias {bias.name} is not per output channel")
        if bias.values.size > 1:
            edits.append(_Edit(bias, bias.values.ndim - 1))
    return edits


def _input_edit(layer: Layer, node: gs.Node) -> _Edit:
    weight = node.inputs[1]
    _check_private(weight, layer.node)
    return _Edit(weight, 1 - weight_out_axis(node) if layer.kind == "fc" else 1)


def _check_private(const, where: str) -> None:
    if not isinstance(const, gs.Constant):
        raise _Decline(f"{where}: {const.name} is not a constant")
    if len(const.outputs) != 1:
        raise _Decline(f"{const.name} ({where}) is also read by another node")


def _walk(graph, layer: Layer, nodes, by_node, outputs) -> tuple[list[_Edit], int]:
    """Follow `layer`'s output through per-channel glue to the next layer; the constants to permute
    on the way, and the consuming layer's index. Raises _Decline on anything else."""
    tensor = graph.tensors()[layer.output]
    rank = _rank(layer, tensor)  # None: a MatMul output of unknown rank
    back = 1 + len(layer.kernel) if layer.kind == "conv" else 1  # the channel axis, counted from the end
    flat = False  # channels became blocks of the feature axis
    edits: list[_Edit] = []
    while True:
        if id(tensor) in outputs:
            raise _Decline(f"{tensor.name} (after layer {layer.index}) is a graph output")
        if len(tensor.outputs) != 1:
            raise _Decline(f"{tensor.name} (after layer {layer.index}) is read by {len(tensor.outputs)} nodes")
        node = tensor.outputs[0]
        where = f"{node.op} {node.name} after layer {layer.index}"
        axis1 = rank is not None and rank - back == 1  # channels on axis 1 (N, C, ...)
        if node.name in by_node:
            if node.inputs[0] is not tensor:
                raise _Decline(f"{where} reads the channels as its weight")
            if node.op == "Conv" and (flat or not axis1):
                raise _Decline(f"{where}: the channels are not on the Conv's axis 1")
            if node.op != "Conv" and back != 1:
                raise _Decline(f"{where}: the channels are not on the last axis, which {node.op} contracts")
            return edits, by_node[node.name]
        if node.op in ELEMENTWISE:
            for extra in node.inputs[1:]:
                if extra.name and not isinstance(extra, gs.Constant):
                    raise _Decline(f"{where} has a computed input {extra.name}")
                if isinstance(extra, gs.Constant) and extra.values.size > 1:
                    raise _Decline(f"{where} has a non-scalar parameter {extra.name}")
        elif node.op in POOLING:
            if flat or not axis1 or rank < 3:
                raise _Decline(f"{where} pools a tensor whose channels are not on axis 1 of (N, C, ...)")
        elif node.op in BINARY or node.op == "PRelu":
            others = [t for t in node.inputs if t is not tensor]
            if len(others) != 1 or not isinstance(others[0], gs.Constant):
                raise _Decline(f"{where} combines the channels with a computed tensor "
                               f"(a residual or multi-branch network: not supported yet)")
            edits += _broadcast_edit(others[0], back, where)
            rank = None if rank is None else max(rank, others[0].values.ndim)
        elif node.op == "BatchNormalization":
            if not axis1:
                raise _Decline(f"{where}: the channels are not on axis 1")
            if len(node.outputs) > 1 and any(t.outputs for t in node.outputs[1:]):
                raise _Decline(f"{where}: its running statistics are used")
            for p in node.inputs[1:5]:
                _check_private(p, node.name)
                edits.append(_Edit(p, 0))
        elif node.op == "Pad":
            if rank is None:
                raise _Decline(f"{where}: the rank of {tensor.name} is unknown")
            _check_pad(node, rank, rank - back, where)
        elif node.op in ("Flatten", "Reshape"):
            if not axis1:
                raise _Decline(f"{where}: the channels are not on axis 1")
            if node.op == "Flatten" and node.attrs.get("axis", 1) != 1:
                raise _Decline(f"{where} has axis {node.attrs.get('axis')}, not 1")
            if node.op == "Reshape" and not _flatten_like(node, tensor):
                raise _Decline(f"{where} is not a flatten (N, C, ...) -> (N, C*...)")
            flat = flat or rank > 2
            rank, back = 2, 1
        elif node.op in ("Softmax", "LogSoftmax"):
            if rank is None or node.attrs.get("axis", -1) % rank == rank - back:
                raise _Decline(f"{where} normalises over the channels")
        else:
            raise _Decline(f"{where}: the channel permutation cannot pass a {node.op}")
        tensor = node.outputs[0]


def _rank(layer: Layer, tensor) -> int | None:
    if layer.kind == "conv":
        return 2 + len(layer.kernel)
    if layer.op == "Gemm":
        return 2
    return len(tensor.shape) if tensor.shape is not None else None


def _broadcast_edit(const: gs.Constant, back: int, where: str) -> list[_Edit]:
    """A constant broadcast against the tensor: permute it where it varies along the channels."""
    _check_private(const, where)
    v = const.values
    cax = v.ndim - back  # numpy broadcasting aligns the trailing axes
    if cax < 0 or v.shape[cax] == 1:
        return []
    return [_Edit(const, cax)]


def _check_pad(node: gs.Node, rank: int, axis: int, where: str) -> None:
    pads = node.inputs[1] if len(node.inputs) > 1 else None
    if pads is None or not pads.name:
        values = node.attrs.get("pads")
        if values is None:
            raise _Decline(f"{where} has no pads")
    elif isinstance(pads, gs.Constant):
        values = pads.values
    else:
        raise _Decline(f"{where} has computed pads")
    if len(node.inputs) > 3 and node.inputs[3].name:
        raise _Decline(f"{where} has an axes input")
    values = np.asarray(values).reshape(-1)
    if len(values) != 2 * rank or values[axis] or values[axis + rank]:
        raise _Decline(f"{where} pads the channel axis")


def _flatten_like(node: gs.Node, tensor) -> bool:
    shape = node.inputs[1]
    if not isinstance(shape, gs.Constant) or shape.values.size != 2 or node.attrs.get("allowzero", 0):
        return False
    s0, s1 = (int(x) for x in shape.values.reshape(-1))
    if s1 == -1 and s0 != -1:
        return True
    dims = tensor.shape
    if s0 in (0, -1) and dims and all(isinstance(d, int) for d in dims[1:]):
        return s1 == int(np.prod(dims[1:]))
    return False


# ---------------------------------------------------------------------------------------------------
# matching: one permutation per group (a dense layer and the matched depthwise layers after it)


@dataclass
class _Group:
    members: list[int]  # matched layer indices sharing one permutation; the first is the leader
    channels: int  # the leader's output channels: the size of the permutation
    fixed: bool  # depthwise layers reading the model's input: their order is the input's
    perm: np.ndarray | None = None


def _groups(lb: list[Layer], k: int) -> list[_Group]:
    groups: list[_Group] = []
    for i in range(k):
        if lb[i].depthwise:
            if not groups:
                groups.append(_Group([i], lb[i].in_channels, fixed=True))
            else:
                groups[-1].members.append(i)
        else:
            groups.append(_Group([i], lb[i].out_channels, fixed=False))
    for g in groups:
        g.perm = np.arange(g.channels)
    return groups


class _Problem:
    """The objective J(P) = sum over matched layers l of the mean over l's output channels of
    sim_l(A's channel, B's channel as permuted), and its restriction to one group's permutation.

    weights: sim_l = cosine of the filters (bias appended) with B's output rows and input columns
    permuted. J is linear in each group's permutation given the others (row norms do not change under
    permutation), so each coordinate step is one linear assignment problem. activations: sim_l = the
    correlation of the layer outputs, which depends on layer l's own permutation only.
    """

    def __init__(self, wa, wb, groups: list[_Group], k: int, corr: list[np.ndarray] | None):
        self.groups, self.k, self.corr = groups, k, corr
        self.group_of = {i: gi for gi, g in enumerate(groups) for i in g.members}
        self.a = [_normalised(*x) for x in wa]  # per layer: (weight [out, in, rest], bias [out])
        self.b = [_normalised(*x) for x in wb]

    def out_perm(self, i: int) -> np.ndarray:
        g = self.groups[self.group_of[i]]
        return _expand(g.perm, self.a[i][0].shape[0])

    def in_perm(self, i: int) -> np.ndarray | None:
        """The permutation of layer i's input axis (None: depthwise, or the model's input)."""
        if i == 0 or self.groups[self.group_of[i]].members[0] != i:
            return None
        return _expand(self.groups[self.group_of[i - 1]].perm, self.a[i][0].shape[1])

    def layer_sim(self, i: int, identity: bool = False) -> float:
        n = self.a[i][0].shape[0]
        rows = np.arange(n) if identity else self.out_perm(i)
        if self.corr is not None:
            return float(np.mean(self.corr[i][np.arange(n), rows]))
        cols = None if identity else self.in_perm(i)
        (wa, ba), (wb, bb) = self.a[i], self.b[i]
        wb = wb[rows] if cols is None else wb[rows][:, cols]
        return float((np.sum(wa * wb) + np.sum(ba * bb[rows])) / n)

    def total(self) -> float:
        return sum(self.layer_sim(i) for i in range(self.k))

    def gain(self, gi: int, incoming_only: bool = False) -> np.ndarray:
        """M[c, c'] such that the part of J that depends on group gi's permutation P is sum_c M[c, P[c]]."""
        g = self.groups[gi]
        m = np.zeros((g.channels, g.channels))
        for i in g.members:
            n = self.a[i][0].shape[0]
            if self.corr is not None:
                c = self.corr[i].reshape(g.channels, n // g.channels, g.channels, n // g.channels)
                m += np.einsum("cjdj->cd", c) / n
                continue
            (wa, ba), (wb, bb) = self.a[i], self.b[i]
            cols = self.in_perm(i)
            if cols is not None:
                wb = wb[:, cols]
            fa = np.concatenate([wa.reshape(n, -1), ba[:, None]], axis=1).reshape(g.channels, -1)
            fb = np.concatenate([wb.reshape(n, -1), bb[:, None]], axis=1).reshape(g.channels, -1)
            m += fa @ fb.T / n
        nxt = g.members[-1] + 1
        if self.corr is None and not incoming_only and nxt < self.k:
            # the next dense layer's input columns, with its rows as its own group permutes them
            (wa, _), (wb, _) = self.a[nxt], self.b[nxt]
            n = wa.shape[0]
            wb = wb[self.out_perm(nxt)]
            m += np.einsum("rcx,rdx->cd", wa.reshape(n, g.channels, -1), wb.reshape(n, g.channels, -1)) / n
        return m

    def step(self, gi: int, incoming_only: bool = False) -> bool:
        """Set group gi's permutation to the best one given the others; whether it changed."""
        g = self.groups[gi]
        m = self.gain(gi, incoming_only)
        rows, cols = linear_sum_assignment(m, maximize=True)
        new = cols[np.argsort(rows)]
        idx = np.arange(g.channels)
        if m[idx, new].sum() > m[idx, g.perm].sum() + 1e-9 * max(1.0, abs(m[idx, g.perm].sum())):
            g.perm = new
            return True
        return False

    def descend(self, max_sweeps: int = 100) -> None:
        free = [gi for gi, g in enumerate(self.groups) if not g.fixed]
        for _ in range(max_sweeps):
            if not any([self.step(gi) for gi in free]):
                return


def _solve(problem: _Problem) -> None:
    """Maximise J over the group permutations.

    activations: the groups do not interact, one assignment each is the optimum. weights: coordinate
    ascent (as in weight matching, Ainsworth et al., Git Re-Basin, 2023), once from the identity and once
    from a greedy forward pass (each group matched on its incoming weights only, as the zipper paper's
    channel matching); the better result is kept, so J never ends below the identity's.
    """
    free = [gi for gi, g in enumerate(problem.groups) if not g.fixed]
    if problem.corr is not None:
        for gi in free:
            problem.step(gi)
        return
    problem.descend()
    best, best_j = [g.perm.copy() for g in problem.groups], problem.total()
    for g in problem.groups:
        g.perm = np.arange(g.channels)
    for gi in free:
        problem.step(gi, incoming_only=True)
    problem.descend()
    if not problem.total() > best_j + 1e-9:  # ties keep the identity start, so a second run finds nothing
        for g, p in zip(problem.groups, best):
            g.perm = p


def _match(graph_a, graph_b, la: list[Layer], lb: list[Layer], k: int, steps: list[_Step],
           corr: list[np.ndarray] | None) -> tuple[dict[str, np.ndarray], list[dict]]:
    """B's edited constants (name -> new array) and the per-layer report."""
    consts_a, consts_b = graph_a.tensors(), graph_b.tensors()
    nodes_a, nodes_b = {n.name: n for n in graph_a.nodes}, {n.name: n for n in graph_b.nodes}

    def filters(layer, consts, nodes):
        w = consts[layer.weight].values
        bias = consts[layer.bias].values if layer.bias else None
        return _in_out(w, weight_out_axis(nodes[layer.node])), bias

    groups = _groups(lb, k)
    problem = _Problem([filters(l, consts_a, nodes_a) for l in la[:k]],
                       [filters(l, consts_b, nodes_b) for l in lb[:k]], groups, k, corr)
    before = [problem.layer_sim(i, identity=True) for i in range(k)]
    _solve(problem)
    rows = []
    arrays: dict[str, np.ndarray] = {}
    for i in range(k):
        p = problem.out_perm(i)
        permuted = not np.array_equal(p, np.arange(len(p)))
        rows.append({"layer": i, "node": lb[i].node, "kind": "dwconv" if lb[i].depthwise else lb[i].kind,
                     "before": before[i], "after": problem.layer_sim(i), "permuted": permuted,
                     "perm": _expand(p, lb[i].out_channels)})
        for e in steps[i].own + steps[i].edits:
            a = arrays.get(e.const.name, e.const.values)
            arrays[e.const.name] = np.take(a, _expand(p, a.shape[e.axis]), axis=e.axis)
    return arrays, rows


def _in_out(w: np.ndarray, out_axis: int) -> np.ndarray:
    """A weight as [out, in, rest] (Conv [O, I, kh, kw] -> [O, I, kh*kw]; Gemm/MatMul -> [O, I, 1])."""
    w = np.moveaxis(np.asarray(w, np.float64), out_axis, 0)
    return w.reshape(w.shape[0], w.shape[1], -1)


def _normalised(w: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Filters and biases scaled so that each output channel's (filter, bias) has unit norm."""
    n = w.shape[0]
    b = np.zeros(n) if bias is None else np.broadcast_to(np.asarray(bias, np.float64).reshape(-1), (n,))
    norm = np.sqrt(np.sum(w.reshape(n, -1) ** 2, axis=1) + b ** 2)
    norm = np.maximum(norm, 1e-12)
    return w / norm[:, None, None], b / norm


def _expand(p: np.ndarray, size: int) -> np.ndarray:
    """The permutation of `size` features made of len(p) channel-major blocks."""
    n = len(p)
    if size % n:
        raise _Decline(f"{size} features are not blocks of {n} channels")
    block = size // n
    return (p[:, None] * block + np.arange(block)).reshape(-1)


# ---------------------------------------------------------------------------------------------------
# activation similarity


def _layer_outputs(task, state, k: int, data: np.ndarray) -> list[np.ndarray]:
    """Layer outputs 0..k-1 of the task's current graph on `data`, each as [channels, values]."""
    graph = task.graph.copy()
    tensors = graph.tensors()
    if len(graph.inputs) != 1:
        raise _Decline(f"activation matching needs one input, the task has {len(graph.inputs)}")
    names = [task.layers[i].output for i in range(k)]
    graph.outputs = [tensors[n] for n in names]
    for n in names:
        tensors[n].dtype = tensors[n].dtype or np.float32
    model = to_model(graph, state.opset, state.ir_version)
    sess = session(model, threads=None)
    x = np.asarray(data, dtype=np.float32)
    outs = sess.run(None, {sess.get_inputs()[0].name: x})
    result = []
    for i, o in zip(range(k), outs):
        layer = task.layers[i]
        axis = 1 if layer.kind == "conv" or o.ndim == 2 else o.ndim - 1
        result.append(np.moveaxis(o, axis, 0).reshape(o.shape[axis], -1).astype(np.float64))
    return result


def _correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of `a` with each row of `b` (0 for constant channels)."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    na, nb = np.linalg.norm(a, axis=1, keepdims=True), np.linalg.norm(b, axis=1, keepdims=True)
    a = np.where(na > 1e-12, a / np.maximum(na, 1e-12), 0.0)
    b = np.where(nb > 1e-12, b / np.maximum(nb, 1e-12), 0.0)
    return a @ b.T
