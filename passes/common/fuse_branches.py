"""FuseBranchesPass: the tasks' parallel layers of one shape run as one grouped layer (horizontal fusion).

What a merge leaves per task is, for models of one architecture, k chains of layers of the same
shapes side by side: each a node of its own in onnxruntime, whose fixed cost (dispatch, a kernel's
set-up, its own pass over memory) dominates on the narrow layers of small models. Those chains run
as one chain of layers k times as wide, without one multiplication more, as the horizontal fusion
of TASO and TVM does for parallel operators. With the branches' tensors concatenated along the
channel axis (part i of the fused tensor F is the task's tensor p_i, c_i channels):

- k convolutions reading one tensor x, each of group 1 (where the tasks' branches start):

      Conv(x, Concat_i W_i, Concat_i b_i) = Concat_i Conv(x, W_i, b_i)                         (H1)

  (a convolution's output channels are independent of each other); and k depthwise convolutions
  (group g = the channels of x, the same kernel and multiplier) reading one tensor x, as one of
  group k*g reading x's channels repeated once per task (one Concat node at run time):

      Conv(Concat_i x, Concat_i W_i, Concat_i b_i, group k*g) = Concat_i Conv(x, W_i, b_i, group g)  (H1')

  (the fused convolution's group j, of task i = j div g, reads channel j - i*g of x, as the task's
  own group j - i*g does);
  or (H1'') on x computed k times over by its producer, a convolution of group 1 and the per-channel
  operators after it, whose weights, biases and BatchNorm parameters are repeated k times along
  the output axis, where x is read by nothing else (zipper's shared layers end so):

      Conv(Concat_i x) -> Conv(z, Concat_i W_p) for x = Conv(z, W_p)                            (H1'')

  (per-channel operators after it the same). It does k times the producer's multiplications, and
  saves the Concat and, in onnxruntime's blocked (NCHWc) layout, which Concat leaves, the two
  reorders of x around it (the budget suite's MobileNet pair zipped at one layer, with two H6
  layers: 1.24x -> 1.52x the originals' speed at batch 1 on an Intel Xeon, BENCHMARKS.md
  `fuse_branches:<cpu>`, `on` against `auto`);
  like H6 below, only `auto` writes it, where the whole model ran faster so;
- k convolutions of group g_i reading the parts p_i of F, with the same input and output channels
  per group (c_i / g_i and C_i / g_i: the same layer shape in every task): one convolution of
  group sum_i g_i, weight Concat_i W_i along the output axis, reads F (ONNX Conv's group j reads
  input channels [j*c/g, (j+1)*c/g) and writes output channels [j*C/g, (j+1)*C/g), so the tasks'
  groups follow each other in order). By default (`kernels="1x1"`) only depthwise (one channel per
  group) and 1x1 convolutions are fused so: with 3x3 and 5x5 convolutions of group 2 as well, the
  budget suite's LeNet, VGG and ResNet pairs packed ran 0.6-0.9x as fast as unfused on an Intel
  Xeon (measured while this pass was written), while on an AMD EPYC (Zen 3) the VGG and ResNet
  pairs zipped at 2 layers ran faster so and the LeNet and ResNet pairs packed slower (BENCHMARKS.md,
  `fuse_branches:<cpu>`, column any); `kernels="any"` fuses them too, and `auto` times that form on
  the machine;                                                                                   (H2)
- per-channel operators (BatchNormalization with its parameters concatenated, Clip with equal
  bounds, activations, pooling) applied to F are the per-task operator on each part;             (H3)
- elementwise Add / Mul / Sub / Div of two fused tensors with the same parts is the per-task
  operator on each pair of parts (residual shortcuts, x * sigmoid(x));                           (H4)
- Flatten of F is the concatenation of the parts' Flatten (the channel axis is the outermost axis
  it flattens).                                                                                  (H5)
- k layers reading the parts p_i of F where each has one group (Gemm y_i = p_i B_i + c_i: the
  tasks' heads; Conv of group 1), as one layer of group 1 whose weight is block-diagonal: task i's
  weight in the rows of its outputs and the columns of its own part, zeros elsewhere:

      [p_1 ... p_k] diag(B_1, ..., B_k) + [c_1 ... c_k] = [p_1 B_1 + c_1 ... p_k B_k + c_k]         (H6)

  (a Conv's the same along its input-channel axis). It does k times the layer's multiplications
  (the zeros), for one node instead of k and a layout onnxruntime's blocked (NCHWc) convolutions
  take: they refuse a grouped convolution whose channels per group are not a multiple of their
  block (8, or 16 with AVX-512), and fall back to a plain one between two reorders of the tensor
  (the budget suite's narrow MobileNet, its 8-channel pointwise layers fused by H2: 1.39x -> 1.48x
  the originals' speed written so on an Intel Xeon with AVX-512, 1.25x with its wider pointwise
  layers written so as well; measured on two randomly initialised models while this was written).
  Whether it pays depends on the layer, the CPU and onnxruntime, so only `auto` writes it, layer
  by layer where the whole model ran faster so (below).

Where a fused tensor's parts are read by anything else (a layer of other shapes, a graph output), one
Split gives back the tasks' tensors under their own names. Every output keeps each product and sum
of its task's layer, in an order onnxruntime may change (float rounding: checked on every merge).
The fused weights are built by Concat nodes from the tasks' weights, which stay in the file under
their names (a warm start reads them so; mtz's layout names them): onnxruntime folds those nodes
once, when it creates the session. The file grows by those nodes, each Split's sizes, and zeros
for a task's layer without a bias beside one with; it loses the other tasks' copies of constants
that equal the first task's (Clip bounds). Fusing saves nodes and
each Split costs about one; onnxruntime fuses BatchNormalization and an activation into the
convolution before them, so fusing those saves nothing at run time: a region (the chains from one
H1 node, joined where H4 reads two) that saves no more run-time nodes than its Splits is left as
it was (the ResNet pair's zipper share 2, whose one fused convolution a shortcut Add reads per task,
ran 0.93x as fast fused: measured while this pass was written, as H2's figure).

Measured on the budget suite's pairs of one architecture (BENCHMARKS.md, `fuse_branches:<cpu>`), so
`--fuse-branches on` (depthwise and 1x1 convolutions grouped) is the default. The speed of a grouped
layer against k separate ones depends on the machine and onnxruntime's kernels, so `auto` times the
whole model here (batch 1, one thread, paired rounds: onnxmerge.model.timing.time_models), form by
form: the model fused as `on` fuses it against the unfused one, then, where grouping every kernel
size fuses more, that model against the one kept so far; a form is kept only where it was faster
than the one before in at least three of four rounds. Then, on the form kept, each layer H6 can write
block-diagonal, and each H1' convolution H1'' can rewrite (at most DENSE_TRIES, those that add the
fewest multiplications first), is timed so against the model kept so far and kept on the same rule. The report says which. Its choice follows
the machine's timings, so the same flags can then give other bytes (`on` and `off` are
deterministic; `on` writes H1'' and H6 only where it is given the layers' names, as a search
replays auto's choice on a calibrated model).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmerge.errors import MergeError, first_line
from onnxmerge.graph.ops import export_with_domain, shaped_graph
from onnxmerge.kernels import DOMAIN
from onnxmerge.model.loading import opset_of
from onnxmerge.model.runtime import run_batch
from onnxmerge.model.saving import weights_apart
from onnxmerge.model.timing import time_models
from onnxmerge.pipeline import checks
from onnxmerge.pipeline.manager import FusePass, PassResult

BUDGET_S = 0.3  # the whole model both ways, interleaved
MIN_ROUNDS = 20
# the fused layers add their products in another order (onnxruntime blocks a grouped convolution
# otherwise): float rounding; a wrong weight differs by the size of the outputs themselves
ROUNDING_TOL = 1e-4
DENSE_TRIES = 8  # H1'' and H6 layers timed at most, one whole-model timing each: bounds auto's time

CHANNEL_WISE = {  # (H3): operators that act on each channel alone, with no inputs beyond the tensor
    "Relu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "LeakyRelu", "Elu", "Selu", "Softplus", "Gelu",
    "Identity", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Neg", "Abs",
}
ELEMENTWISE = {"Add", "Mul", "Sub", "Div"}  # (H4)


class FuseBranchesPass(FusePass):
    """Rewrites `state.model` (the exported, calibrated model): the tasks' parallel layers fused where
    `mode` says so (auto: where the whole model ran faster fused, at batch 1 on one thread); records
    what it did in `info.fidelity["fuse_branches"]`."""

    exact = True  # the fused model computes the same outputs to float rounding (checked)
    requires = ("exported",)

    mode_option = "fuse-branches"

    def call(self, state) -> PassResult:
        model, record = apply(state.model, self.mode)
        if record is not None:
            state.info.fidelity["fuse_branches"] = record
        modified = model is not state.model
        state.model = model
        return PassResult(state, modified)


KERNELS = {"1x1": "depthwise and 1x1 convolutions", "any": "convolutions of every kernel size"}  # (H2)


def apply(model: onnx.ModelProto, mode: str, kernels: str = "1x1",
          dense: tuple[str, ...] = ()) -> tuple[onnx.ModelProto, dict | None]:
    """`model` fused as `mode` says (on: its convolutions grouped as `kernels` says, and the layers
    named in `dense` written block-diagonal, H6), and the record of it (None: nothing to fuse, or
    mode off): {mode, kernels (of the form kept; None: unfused), dense (the names of the H6 layers
    kept), fused_nodes, rel_diff, kept, and with auto the batch and `timed`, per form tried in order:
    kernels, dense (the H1'' or H6 layer it adds, or None), rewrite ("H1''", "H6" or None),
    added_macs (the multiplications H1'' or H6 adds, at batch 1),
    fused_nodes, against (the form it was timed against: "unfused", a `kernels`, or the H6 layer
    added before it), ratio (the median time of the form it was timed against / this one's),
    ratio_q1, ratio_q3, kept}."""
    if mode == "off" or weights_apart(model):
        # a big model's weights, held apart from its graph (onnxruntime would not fold a Concat of
        # them): big layers, whose nodes' fixed cost that fusing saves is negligible
        return model, None
    if kernels not in KERNELS:
        raise ValueError(f"kernels {kernels!r}: one of {', '.join(KERNELS)}")
    forms = {k: _checked(model, k, tuple(dense)) for k in (KERNELS if mode == "auto" else (kernels,))}
    forms = {k: f for k, f in forms.items() if f is not None}
    if mode == "auto" and len(forms) == 2 and forms["any"][1] <= forms["1x1"][1]:
        del forms["any"]  # no convolution of another kernel size fused: the same model
    if not forms:
        return model, None
    if mode != "auto":
        (k, (fused, removed, diff, _)), = forms.items()
        return fused, {"mode": mode, "kernels": k, "dense": list(dense), "fused_nodes": removed, "rel_diff": diff,
                       "kept": True}
    native = any(n.domain == DOMAIN for n in model.graph.node)
    batch = run_batch(model, 1)
    record = {"mode": mode, "kernels": None, "dense": [], "fused_nodes": max(f[1] for f in forms.values()),
              "rel_diff": max(f[2] for f in forms.values()), "kept": False, "batch": batch, "timed": []}
    chosen, name, candidates = model, "unfused", {}

    def timed(label: str, form: onnx.ModelProto, **entry) -> bool:
        """`form` (named `label`: a kernels rule, or the H6 layer it adds) against the model kept so far."""
        t = time_models({label: form, name: chosen}, name, batch, 1, BUDGET_S, MIN_ROUNDS, native=native)[label]
        faster = t["ratio_q1"] > 1  # faster in at least three of four paired rounds
        record["timed"].append({**entry, "against": name, "ratio": t["ratio"], "ratio_q1": t["ratio_q1"],
                                "ratio_q3": t["ratio_q3"], "kept": faster})
        return faster

    for k, (fused, removed, diff, eligible) in forms.items():
        if timed(k, fused, kernels=k, dense=None, rewrite=None, added_macs=0, fused_nodes=removed):
            chosen, name, candidates = fused, k, eligible
            record.update(kernels=k, fused_nodes=removed, rel_diff=diff, kept=True)
    # H6, layer by layer on the form kept: the cheapest first, each kept where the model ran faster so
    tried: set[str] = set()
    while record["kept"] and len(tried) < DENSE_TRIES:
        left = {n: macs for n, macs in candidates.items() if n not in tried}
        if not left:
            break
        layer = min(left, key=left.get)
        tried.add(layer)
        form = _checked(model, record["kernels"], (*record["dense"], layer))
        if form is None:
            continue
        fused, removed, diff, eligible = form
        if timed(layer, fused, kernels=record["kernels"], dense=layer, rewrite=_rewrite(model, layer),
                 added_macs=left[layer], fused_nodes=removed):
            chosen, name, candidates = fused, layer, eligible
            record.update(fused_nodes=removed, rel_diff=diff, dense=[*record["dense"], layer])
    return chosen, record


def _rewrite(model: onnx.ModelProto, layer: str) -> str:
    """Which rewrite `dense` names `layer` for: H1'' (a depthwise convolution, the first of those
    reading one tensor) or H6."""
    node = next(n for n in model.graph.node if n.name == layer)
    group = next((a.i for a in node.attribute if a.name == "group"), 1)
    return "H1''" if node.op_type == "Conv" and group > 1 else "H6"


def _checked(model: onnx.ModelProto, kernels: str, dense: tuple[str, ...] = ()) -> tuple | None:
    """`model` fused with its convolutions grouped as `kernels` says and the H6 layers named in `dense`
    block-diagonal, the nodes fused away, the outputs' relative difference to the unfused model's,
    and the H6 layers it could write so besides (name -> the multiplications it would add); None
    where nothing fuses or the model's own outputs are not finite (the check before writing names
    them)."""
    eligible: dict[str, int] = {}
    fused, removed = fuse_branches(model, kernels=kernels, dense=frozenset(dense), eligible=eligible)
    if not removed:
        return None
    try:
        diff = checks.output_difference(fused, model)
    except Exception as e:  # onnxruntime's own exception types: the fused model does not load or run
        raise MergeError(f"fusing the tasks' parallel layers gave a model onnxruntime cannot run ({first_line(e)}): "
                         "this is a bug (give --fuse-branches off to go on without it)") from None
    if np.isnan(diff):
        return None
    if not diff <= ROUNDING_TOL:
        raise MergeError(f"fusing the tasks' parallel layers changed the outputs by {diff:.2e} relative: "
                         "this is a bug (give --fuse-branches off to go on without it)")
    return fused, removed, diff, eligible


@dataclass
class _Bundle:
    """The fused tensor and the tasks' tensors it holds, in order (part i: `parts[i]`, `sizes[i]`
    entries along axis 1)."""

    fused: gs.Variable
    parts: list[gs.Variable]
    sizes: list[int]
    region: str = ""  # the name of the H1 node that the fused chain it belongs to starts from
    added: int = 0  # nodes the fused one needs at run time beyond itself (H1': the input's Concat)


# operators onnxruntime fuses into the convolution before them (Conv+BatchNorm, Conv+activation
# fusions): fusing them saves no node at run time, so they do not count towards a region's saving
FOLDED_AT_RUN = {"BatchNormalization", "Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "Identity"}


def fuse_branches(model: onnx.ModelProto, kernels: str = "1x1", dense: frozenset = frozenset(),
                  eligible: dict[str, int] | None = None, _skip: frozenset = frozenset()) -> tuple[onnx.ModelProto, int]:
    """The model with its tasks' parallel layers fused (H1-H5; `kernels`: which convolutions H2 groups,
    a key of KERNELS; `dense`: the names of the layers written block-diagonal, H6, each the first
    task's node of its group), and the number of nodes it fused away (0: nothing to fuse; the model
    is returned as it was). `eligible` (where given) is filled with the other layers H6 could write
    so: name -> the multiplications it would add at batch 1. A fused region (the chains that start at
    one H1 node, joined where H4 reads two of them) that saves no more run-time nodes than the Splits
    it needs (FOLDED_AT_RUN saves none) is left as it was (`_skip`: the H1 nodes of such regions, for
    the second pass that leaves them)."""
    graph = shaped_graph(model)
    graph.toposort()
    opset = opset_of(model)
    bundles: dict[str, tuple[_Bundle, int]] = {}  # task tensor name -> its bundle and part index
    done: set[int] = set()
    known = {id(n) for n in graph.nodes}
    joined: dict[str, str] = {}  # region -> the region it joined (H4)
    saved: dict[str, int] = {}  # region -> run-time nodes it saves, less its Splits
    seeds: dict[str, set[str]] = {}  # region -> the names of the H1 nodes it starts from
    removed = 0

    def root(region: str) -> str:
        while region in joined:
            region = joined[region]
        return region

    for node in list(graph.nodes):
        if id(node) in done:
            continue
        group = ((_seed(node, done, dense, eligible) if node.name not in _skip else None)
                 or _follow(node, bundles, done, kernels, dense, eligible, opset))
        if not group:
            continue
        nodes, fused_node, bundle = group
        read = [root(bundles[t.name][0].region) for t in nodes[0].inputs if t.name in bundles]
        bundle.region = read[0] if read else node.name
        if not read:  # an H1 group: the region is named for its first node, skipped by all of them
            seeds[node.name] = {n.name for n in nodes}
        for other in read[1:]:
            if other != bundle.region:
                joined[other] = bundle.region
        saved[bundle.region] = (saved.get(bundle.region, 0) - bundle.added
                                + (len(nodes) - 1) * (fused_node.op not in FOLDED_AT_RUN))
        graph.nodes.extend(_built(fused_node, known))
        for n in nodes:
            done.add(id(n))
            n.inputs.clear()
        for i, part in enumerate(bundle.parts):
            bundles[part.name] = (bundle, i)
        removed += len(nodes) - 1
    if not removed:
        return model, 0
    # the tasks' tensors that something unfused still reads (or that the graph outputs): one Split
    outputs = {t.name for t in graph.outputs}
    split_done: set[int] = set()
    for bundle, _ in bundles.values():
        if id(bundle) in split_done:
            continue
        split_done.add(id(bundle))
        for part in bundle.parts:
            part.inputs.clear()  # its producer was fused away
        if any(part.outputs or part.name in outputs for part in bundle.parts):
            sizes = np.array(bundle.sizes, dtype=np.int64)
            if opset >= 13:
                split = gs.Node("Split", f"{bundle.fused.name}_split",
                                inputs=[bundle.fused, gs.Constant(f"{bundle.fused.name}_sizes", sizes)],
                                outputs=list(bundle.parts), attrs={"axis": 1})
            else:
                split = gs.Node("Split", f"{bundle.fused.name}_split", inputs=[bundle.fused], outputs=list(bundle.parts),
                                attrs={"axis": 1, "split": sizes.tolist()})
            graph.nodes.append(split)
            removed -= 1
            saved[bundle.region] -= 1
    totals: dict[str, int] = {}
    for region, n in saved.items():
        totals[root(region)] = totals.get(root(region), 0) + n
    idle = frozenset(name for r in seeds if totals[root(r)] <= 0 for name in seeds[r])
    if idle:
        if eligible is not None:
            eligible.clear()  # what the pass without those regions finds
        return fuse_branches(model, kernels, dense, eligible, _skip | idle)
    fused = export_with_domain(graph, model, native=any(n.domain == DOMAIN for n in model.graph.node))
    del fused.graph.value_info[:]  # the shapes inferred here: what later passes infer is theirs
    return fused, removed


def _seed(node: gs.Node, done: set[int], dense: frozenset = frozenset(), eligible: dict | None = None) -> tuple | None:
    """(H1, H1'): the group-1 convolutions of one shape (but their output channels), or the depthwise
    convolutions of one shape, that read the same tensor as `node`, with `node` first; None if there
    is no other. (H1'') Where `node` is named in `dense`, the depthwise ones read the tensor's
    channels repeated as computed by its producer (a convolution of group 1 and the per-channel
    operators after it) with its weights repeated, instead of a Concat; `eligible` gets the
    multiplications that adds where it could."""
    w = _shape(node.inputs[1]) if node.op == "Conv" else None
    group = node.attrs.get("group", 1)
    depthwise = w is not None and group > 1 and w[1] == 1 and w[0] % group == 0
    if w is None or (group != 1 and not depthwise):
        return None
    x = node.inputs[0]
    siblings = [n for n in x.outputs if n.op == "Conv" and id(n) not in done and n.inputs[0] is x
                and n.attrs == node.attrs and _shape(n.inputs[1]) is not None
                and _shape(n.inputs[1])[0 if depthwise else 1:] == w[0 if depthwise else 1:] and len(n.outputs) == 1]
    if node not in siblings or len(siblings) < 2:
        return None
    siblings.sort(key=lambda n: n is not node)  # node first, the others in graph order
    if not depthwise:
        return _fused_conv(siblings, x, dict(node.attrs), [_shape(n.inputs[1])[0] for n in siblings])
    k = len(siblings)
    chain = _producer_chain(x, siblings)
    repeat = chain is not None and node.name in dense
    if repeat:
        copies = _repeated(chain, k, node.name)
    else:
        if chain is not None and eligible is not None:
            eligible[node.name] = chain[0][1] * (k - 1)
        copies = gs.Variable(f"{node.name}_input_per_task", dtype=x.dtype)
        gs.Node("Concat", name=f"{node.name}_input_per_task", inputs=[x] * k, outputs=[copies], attrs={"axis": 1})
    nodes, fused, bundle = _fused_conv(siblings, copies, {**node.attrs, "group": group * k}, [w[0]] * k)
    bundle.added = int(not repeat)  # the Concat; H1'' adds no node
    return nodes, fused, bundle


# (H1'') per-channel operators whose other inputs are per-channel parameters (repeated with the
# channels) or bounds (shared): the producer chain of a tensor that depthwise siblings read
REPEATABLE = (CHANNEL_WISE - {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool"}) | {
    "BatchNormalization", "Clip"}


def _producer_chain(x, readers: list[gs.Node]) -> list | None:
    """[(the convolution of group 1 that computes `x`, its multiplications at batch 1), then the
    per-channel operators after it, in order], where each tensor from it to `x` is read by the next
    alone and `x` by `readers` alone (so that the chain as it was is left unread, and goes); None
    otherwise."""
    ops, t, after = [], x, readers
    while len(t.inputs) == 1 and {id(n) for n in t.outputs} == {id(n) for n in after}:
        producer = t.inputs[0]
        if producer.op == "Conv":
            w, out = _shape(producer.inputs[1]), _shape(producer.outputs[0], batch=False)
            if producer.attrs.get("group", 1) != 1 or w is None or out is None:
                return None
            return [(producer, int(np.prod(w)) * int(np.prod(out[1:])))] + ops[::-1]
        if producer.op not in REPEATABLE or len(producer.outputs) != 1:
            return None
        ops.append(producer)
        t, after = producer.inputs[0], [producer]
    return None


def _repeated(chain: list, k: int, name: str) -> gs.Variable:
    """(H1'') The chain's output with its channels repeated k times: its convolution's weight and bias,
    and each BatchNormalization's parameters, repeated along the channel axis (Concat nodes, folded
    by onnxruntime); bounds and attributes as they were."""
    (conv, _), *ops = chain
    inputs = [conv.inputs[0], _concat([conv.inputs[1]] * k, f"{name}_producer_W")]
    if _has_bias(conv):
        inputs.append(_concat([conv.inputs[2]] * k, f"{name}_producer_B"))
    out = gs.Variable(f"{name}_producer", dtype=conv.outputs[0].dtype)
    gs.Node("Conv", name=f"{name}_producer", inputs=inputs, outputs=[out], attrs=dict(conv.attrs))
    for i, op in enumerate(ops):
        extra = op.inputs[1:]
        if op.op == "BatchNormalization":
            extra = [_concat([p] * k, f"{name}_producer_{i}_{j}") for j, p in enumerate(extra)]
        nxt = gs.Variable(f"{name}_producer_{i}", dtype=op.outputs[0].dtype)
        gs.Node(op.op, name=f"{name}_producer_{i}", inputs=[out, *extra], outputs=[nxt], attrs=dict(op.attrs))
        out = nxt
    return out


def _follow(node: gs.Node, bundles: dict, done: set[int], kernels: str, dense: frozenset,
            eligible: dict | None, opset: int) -> tuple | None:
    """(H2-H6): `node` and the nodes at the same place in the other tasks' branches, if every tensor
    they read is a part of one bundle (at their part index) or a constant they share in value, and
    they compute the same operator; None otherwise."""
    if not node.inputs or node.inputs[0].name not in bundles or len(node.outputs) != 1:
        return None
    bundle, index = bundles[node.inputs[0].name]
    if index != 0:
        return None
    position = [n for n in bundle.parts[0].outputs if n.op == node.op].index(node)
    nodes = []
    for part in bundle.parts:
        same = [n for n in part.outputs if n.op == node.op]
        if position >= len(same) or id(same[position]) in done:
            return None
        nodes.append(same[position])
    if len({id(n) for n in nodes}) != len(nodes) or any(len(n.outputs) != 1 for n in nodes):
        return None
    if any(n.attrs != node.attrs for n in nodes) and node.op != "Conv":
        return None
    if any(n.inputs[0] is not part for n, part in zip(nodes, bundle.parts)):
        return None  # each task's node must read its part where the first reads part 0 (input 0)
    sizes = bundle.sizes
    if node.op in CHANNEL_WISE:
        return _fused(nodes, node.op, [bundle.fused], dict(node.attrs), sizes)
    if node.op == "Clip":
        bounds = node.inputs[1:]
        if any(not _same_constants(n.inputs[1:], bounds) for n in nodes):
            return None
        return _fused(nodes, "Clip", [bundle.fused, *bounds], dict(node.attrs), sizes)
    if node.op == "BatchNormalization":
        params = [_concat([n.inputs[k] for n in nodes], f"{node.name}_fused_{k}") for k in range(1, 5)]
        return _fused(nodes, node.op, [bundle.fused, *params], dict(node.attrs), sizes)
    if node.op in ELEMENTWISE:
        ranks = {len(t.shape) if t.shape is not None else None for n in nodes for t in n.inputs}
        if len(ranks) != 1 or None in ranks:  # broadcasting aligns trailing axes: the ranks must agree
            return None
        operands = []
        for k in range(2):
            owners = [bundles.get(n.inputs[k].name) for n in nodes]
            if any(o is None for o in owners) or any(o[0] is not owners[0][0] or o[1] != i
                                                      for i, o in enumerate(owners)):
                return None
            operands.append(owners[0][0].fused)
        if any(o.sizes != sizes for o in (bundles[nodes[0].inputs[k].name][0] for k in range(2))):
            return None
        return _fused(nodes, node.op, operands, dict(node.attrs), sizes)
    if node.op == "Flatten":
        shapes = [_shape(n.inputs[0], batch=False) for n in nodes]
        if node.attrs.get("axis", 1) != 1 or any(s is None for s in shapes):
            return None
        return _fused(nodes, "Flatten", [bundle.fused], dict(node.attrs), [int(np.prod(s)) for s in shapes])
    if node.op == "Conv":
        return _grouped_conv(nodes, bundle, kernels, dense, eligible, opset)
    if node.op == "Gemm":
        return _block_gemm(nodes, bundle, dense, eligible, opset)
    return None


def _grouped_conv(nodes: list[gs.Node], bundle: _Bundle, kernels: str, dense: frozenset, eligible: dict | None,
                  opset: int) -> tuple | None:
    """(H2): one convolution of group sum g_i where every task's layer has the same channels per group
    (with `kernels` "1x1": only depthwise and 1x1 convolutions); (H6) one of group 1 where each
    task's layer has one group and the layer is named in `dense`."""
    first = nodes[0]
    other_attrs = {k: v for k, v in first.attrs.items() if k != "group"}
    shapes = [_shape(n.inputs[1]) for n in nodes]
    if any(s is None for s in shapes):
        return None
    groups = [n.attrs.get("group", 1) for n in nodes]
    per_group = {(s[0] // g, c // g, tuple(s[1:])) for s, g, c in zip(shapes, groups, bundle.sizes)}
    if len(per_group) != 1 or any({k: v for k, v in n.attrs.items() if k != "group"} != other_attrs
                                  for n in nodes):
        return None
    if kernels == "1x1" and not (shapes[0][0] == groups[0] and shapes[0][1] == 1) and any(d != 1 for d in shapes[0][2:]):
        return None  # neither depthwise nor 1x1: see the module docstring (H2)
    out = _shape(first.outputs[0], batch=False)
    if set(groups) == {1} and out is not None:  # (H6): each output reads the other tasks' channels as zeros
        if first.name in dense:
            return _fused_conv(nodes, bundle.fused, {**other_attrs, "group": 1}, [s[0] for s in shapes],
                               block=(bundle.sizes, opset))
        if eligible is not None:
            total = sum(bundle.sizes)
            eligible[first.name] = sum(s[0] * (total - c) for s, c in zip(shapes, bundle.sizes)) * int(
                np.prod(shapes[0][2:])) * int(np.prod(out[1:]))
    return _fused_conv(nodes, bundle.fused, {**other_attrs, "group": sum(groups)}, [s[0] for s in shapes])


def _block_gemm(nodes: list[gs.Node], bundle: _Bundle, dense: frozenset, eligible: dict | None,
                opset: int) -> tuple | None:
    """(H6): the tasks' Gemm layers (the same attributes, A not transposed, a 1-D bias or none) as one
    whose weight is block-diagonal, where the first is named in `dense`."""
    first = nodes[0]
    shapes = [_shape(n.inputs[1]) for n in nodes]
    if (first.attrs.get("transA", 0) or any(s is None or len(s) != 2 for s in shapes)
            or any(_has_bias(n) and (_shape(n.inputs[2]) is None or len(_shape(n.inputs[2])) != 1) for n in nodes)):
        return None
    trans = first.attrs.get("transB", 0)
    widths = [s[0] if trans else s[1] for s in shapes]
    if first.name not in dense:
        if eligible is not None:
            eligible[first.name] = sum(w * (sum(bundle.sizes) - k) for w, k in zip(widths, bundle.sizes))
        return None
    name = first.name
    inputs = [bundle.fused, _block_diagonal([n.inputs[1] for n in nodes], bundle.sizes, 1 if trans else 0,
                                            name + "_fused_W", opset)]
    if any(_has_bias(n) for n in nodes):
        inputs.append(_biases(nodes, widths, name))
    return _fused(nodes, "Gemm", inputs, dict(first.attrs), widths)


def _fused_conv(nodes: list[gs.Node], source, attrs: dict, out_channels: list[int],
                block: tuple[list[int], int] | None = None) -> tuple:
    """One Conv reading `source`, its weight (and bias, where a task's layer has one) the tasks'
    concatenated along the output axis; with `block` (the parts' input channels, the opset) each
    weight padded with zeros over the other tasks' input channels first (H6)."""
    name = nodes[0].name
    weights = [n.inputs[1] for n in nodes]
    if block:
        sizes, opset = block
        inputs = [source, _block_diagonal(weights, sizes, 1, name + "_fused_W", opset)]
    else:
        inputs = [source, _concat(weights, name + "_fused_W")]
    if any(_has_bias(n) for n in nodes):
        inputs.append(_biases(nodes, out_channels, name))
    return _fused(nodes, "Conv", inputs, attrs, out_channels)


def _biases(nodes: list[gs.Node], widths: list[int], name: str) -> gs.Variable:
    """The tasks' biases concatenated; a task's layer without one adds zeros (a small constant)."""
    return _concat([n.inputs[2] if _has_bias(n) else gs.Constant(
        n.name + "_zero_B", np.zeros(c, np.dtype(n.outputs[0].dtype or np.float32)))
        for n, c in zip(nodes, widths)], name + "_fused_B")


def _block_diagonal(weights: list, sizes: list[int], axis: int, name: str, opset: int) -> gs.Variable:
    """(H6) The tasks' weights, each padded with zeros along its input `axis` to the others' `sizes`
    (Pad nodes), concatenated along the other axis (0 or 1): one block-diagonal weight, which
    onnxruntime builds once, when it creates the session; the tasks' weights stay under their names."""
    padded = []
    for i, w in enumerate(weights):
        rank = len(_shape(w))
        before, after = [0] * rank, [0] * rank
        before[axis], after[axis] = sum(sizes[:i]), sum(sizes[i + 1:])
        out = gs.Variable(f"{name}_{i}", dtype=w.dtype)
        if opset >= 11:
            gs.Node("Pad", name=f"{name}_{i}_pad", inputs=[w, gs.Constant(f"{name}_{i}_pads", np.array(
                before + after, np.int64))], outputs=[out])
        else:
            gs.Node("Pad", name=f"{name}_{i}_pad", inputs=[w], outputs=[out], attrs={"pads": before + after})
        padded.append(out)
    out = gs.Variable(name, dtype=weights[0].dtype)
    gs.Node("Concat", name=name + "_concat", inputs=padded, outputs=[out], attrs={"axis": 1 - axis})
    return out


def _fused(nodes: list[gs.Node], op: str, inputs: list, attrs: dict, sizes: list[int]) -> tuple:
    out = gs.Variable(nodes[0].outputs[0].name + "_fused", dtype=nodes[0].outputs[0].dtype)
    node = gs.Node(op, name=nodes[0].name + "_fused", inputs=inputs, outputs=[out], attrs=attrs)
    return nodes, node, _Bundle(out, [n.outputs[0] for n in nodes], list(sizes))


def _concat(tensors: list, name: str) -> gs.Variable:
    """The tensors concatenated along axis 0 by a Concat node, which onnxruntime folds once, when it
    creates the session: the tasks' weights stay in the file as they are, under their names (a warm
    start and LoadWeightsPass read them so), and nothing is stored twice."""
    out = gs.Variable(name, dtype=tensors[0].dtype)
    gs.Node("Concat", name=name + "_concat", inputs=list(tensors), outputs=[out], attrs={"axis": 0})
    return out


def _has_bias(node: gs.Node) -> bool:
    return len(node.inputs) > 2 and bool(node.inputs[2].name)


def _built(node: gs.Node, known: set[int]) -> list[gs.Node]:
    """`node` and the nodes this pass built to compute its inputs (its weights' Concat nodes), inputs
    first; each id added to `known`."""
    order: list[gs.Node] = []
    for t in node.inputs:
        if isinstance(t, gs.Variable) and t.inputs and id(t.inputs[0]) not in known:
            order += _built(t.inputs[0], known)
    known.add(id(node))
    return [*order, node]


def _shape(tensor, batch: bool = True) -> tuple | None:
    """The tensor's shape if every dimension is known (`batch=False`: the dimensions after the first)."""
    shape = tensor.shape
    if shape is None or len(shape) < 1 + (not batch):
        return None
    shape = tuple(shape) if batch else tuple(shape[1:])
    return None if any(not isinstance(d, int) for d in shape) else shape


def _same_constants(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x is y or (not x.name and not y.name):
            continue
        if not (isinstance(x, gs.Constant) and isinstance(y, gs.Constant)) or not np.array_equal(x.values, y.values):
            return False
    return True
