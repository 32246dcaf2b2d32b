"""ShareCodebooksPass: NeuralMerger's shared k-means codebooks for aligned layers (the `codebook` method).

Chou et al., "Unifying and Merging Well-trained Deep Neural Networks for Inference Stage" (IJCAI
2018), section 3. Aligned layers of the merged models (the layer alignment of AlignLayersPass; the
tasks' first model is the reference, so a group holds one layer of every model that has one aligned
with it) form a group; every group gets one codebook per depth segment, built by k-means over all the
group's 1x1xr kernel pieces (eqs. 4-8, onnxmerge.passes.codebook._codebook). A layer no other model aligns with gets
a codebook of its own. Each layer then reads its dense weight from the codebook-gather subgraph
(onnxmerge.graph.ops, the portable form); `--emit native` turns those into EConv / EFC nodes after
calibration.

Settings: the preset gives (r, C) per layer kind; `--r` / `--codewords` override it for every layer;
`--layer-params conv2=8/128,fc1=8/64/54,...` overrides single layers (named by the first model's
layers; a third number G gives one codebook to every G segments). `--size F` instead plans every
layer (plan.py): r, C and G, or the dense weight, chosen to store at most F times the layers' dense
bytes with the least k-means error. A group whose codebook and codes would not be smaller than its
dense weights (exact stored bytes, _codebook.stored_bytes) stays dense unless if_larger="codebook";
the plan, per layer, goes into the report (`codebook_plan`) and its notes.
The task heads (each model's last layer) stay per task and dense unless heads="codebook".
Depthwise and grouped convolutions and non-2-D convolutions stay dense (a note says so). In a
composition (passes/compose.py), a layer an earlier pass shared (one shared node) gets a codebook
of its own.

Exactness: when C is at least the number of distinct pieces in every segment, k-means returns the
pieces themselves and the merged model reproduces the originals (tests/passes/codebook/).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from tqdm import tqdm

from onnxmerge.errors import UsageError
from onnxmerge.graph.layers import Layer, layer_label, weight_out_axis
from onnxmerge.graph.ops import gather_weight
from onnxmerge.model.contract import SHARED
from onnxmerge.passes.codebook import plan as planner
from onnxmerge.passes.codebook._codebook import (
    PRESETS,
    Group,
    Member,
    Setting,
    build_group,
    effective,
    logical_fc,
    pack_codes,
    packs,
    stored_bytes,
)
from onnxmerge.pipeline.manager import Pass, PassResult
from onnxmerge.pipeline.state import MergeState


class ShareCodebooksPass(Pass):
    exact = False
    requires = ("aligned", "combined")

    def __init__(self, preset: str = "accu", r: int | None = None, codewords: int | None = None,
                 layer_params: dict[str, Setting] | None = None, heads: str = "keep", n_init: int = 3,
                 max_iter: int = 30, seed: int = 0, size: float | None = None, if_larger: str = "dense",
                 pack: bool = True):
        if preset not in PRESETS:
            raise UsageError(f"--preset {preset}: choose from {', '.join(PRESETS)}")
        if heads not in ("keep", "codebook"):
            raise UsageError(f"--heads {heads}: use keep or codebook")
        if if_larger not in ("dense", "codebook"):
            raise UsageError(f"--if-larger {if_larger}: use dense or codebook")
        self.preset, self.r, self.codewords = preset, r, codewords
        self.layer_params = dict(layer_params or {})
        self.heads, self.n_init, self.max_iter, self.seed = heads, n_init, max_iter, seed
        self.size = None if size is None else planner.parse_size(size)
        self.if_larger = if_larger
        self.pack = pack  # codes of at most 16 values two to a byte (the portable form only)

    def call(self, state: MergeState) -> PassResult:
        graph = state.graph
        nodes = {n.name: n for n in graph.nodes}
        work = self._plan(state)
        chosen = self._choose(state, work, nodes)
        groups: list[Group] = []
        todo = [(w, s) for w, s in zip(work, chosen) if s is not None]
        bar = tqdm(todo, desc="codebooks (k-means)", unit="layer", disable=not state.progress, leave=False)
        for (label, _, members), setting in bar:
            bar.set_postfix_str(label, refresh=False)
            group = build_group(label, _cut(nodes, members), setting, n_init=self.n_init, max_iter=self.max_iter,
                                seed=self.seed)
            groups.append(group)
            owner = SHARED if len(members) > 1 or members[0][1].startswith(SHARED) else f"{members[0][0]}/"
            codebook = gs.Constant(f"{owner}{label}/codebook", group.codebook)
            group.packed = packs(group.setting, group.segments, self.pack)
            for (task, name, layer), member, codes in zip(members, group.members, group.codes):
                node = nodes[name]
                codes_t = gs.Constant(f"{name}/codes", pack_codes(codes) if group.packed else codes)
                node.inputs[1] = gather_weight(graph, codebook, codes_t, layer.kind, member.depth,
                                               weight_out_axis(node) if layer.kind == "fc" else 0, f"{name}/gather",
                                               shared=group.setting.group > 1,
                                               code_shape=codes.shape if group.packed else None)
        graph.cleanup().toposort()
        state.figures["codebook_layers"] = [g.summary() for g in groups]
        state.params.update({"preset": self.preset, "r": self.r, "codewords": self.codewords,
                             "layer_params": {k: str(v) for k, v in self.layer_params.items()},
                             "size": self.size, "if_larger": self.if_larger})
        return PassResult(state, bool(groups))

    def _choose(self, state: MergeState, work, nodes: dict[str, gs.Node]) -> list[Setting | None]:
        """Per group, the effective setting to build or None (dense): the setting asked for where it
        is smaller than the dense weights, or the size plan (plan.py). Records the plan. Each
        group's weights are read while it is looked at only (a big model is not held twice)."""
        fixed = [self.size is None or self._given(label, members) for label, _, members in work]
        dense, choices, hulls = [], [], []
        bar = tqdm(work, desc="codebook plan", unit="layer", disable=not state.progress or self.size is None,
                   leave=False)
        for (label, setting, members), f in zip(bar, fixed):
            cut = _cut(nodes, members)
            dense.append(d := sum(m.dense_bytes for m in cut))
            if f:
                choices.append(self._given_choice(label, setting, cut, d))
                hulls.append([choices[-1]])
            elif self.size >= 1:  # the error-free plan fits: every layer dense, no proxy needed
                hulls.append([planner.Choice(None, d, 0.0)])
            else:
                hulls.append(planner.hull(planner.options(label, cut, self.seed, self.pack)))
        if self.size is not None:
            choices = planner.allocate(hulls, self.size * sum(dense))
        layers = [planner.LayerPlan(label, d, ch, f and self.size is not None)
                  for (label, *_), d, ch, f in zip(work, dense, choices, fixed)]
        for lp, (label, *_) in zip(layers, work):
            if lp.choice.setting is None:
                how = f"codebook and indices would not be smaller: {lp.choice.larger}" if lp.choice.larger else \
                    "the plan keeps it dense"
                _note(state, f"codebook: {label} stays dense ({how})")
        total, dense_total = sum(lp.choice.bytes for lp in layers), sum(dense)
        record = {"size": self.size, "bytes": total, "dense_bytes": dense_total,
                  "layers": [lp.summary() for lp in layers]}
        if self.size is not None and dense_total:
            record["target_bytes"] = int(self.size * dense_total)
            record["target_met"] = total <= self.size * dense_total
            _note(state, f"codebook plan: {total:,} of {dense_total:,} dense bytes in the planned layers "
                         f"({total / dense_total:.3f}, target {self.size:g}"
                         f"{'' if record['target_met'] else ': not reachable, the smallest settings taken'}); "
                  + "; ".join(_plan_text(lp) for lp in layers))
        state.figures["codebook_plan"] = record
        return [lp.choice.setting for lp in layers]

    def _given_choice(self, label: str, setting: Setting, cut: list[Member], dense: int) -> planner.Choice:
        """The setting asked for (preset, --r / --codewords, --layer-params), or the dense weight where
        its codebook and codes would not be smaller (exact stored bytes) and if_larger is dense."""
        s = effective(cut, setting, label)
        b = sum(stored_bytes(cut, s, self.pack))
        if b >= dense and self.if_larger == "dense":
            return planner.Choice(None, dense, 0.0, f"{b:,} vs {dense:,} bytes")
        return planner.Choice(s, b, float("nan"))

    def _given(self, label: str, members) -> bool:
        return label in self.layer_params or members[0][2].node in self.layer_params

    def _plan(self, state: MergeState) -> list[tuple[str, Setting, list[tuple[str, str, Layer]]]]:
        """The groups: (label, setting, [(task, merged node name, layer)]), in the first model's layer order."""
        first = state.tasks[0]
        unknown = set(self.layer_params) - {layer_label(first.layers, i) for i in range(len(first.layers))} \
            - {l.node for l in first.layers}
        if unknown:
            raise UsageError(f"--layer-params: no layer {', '.join(sorted(unknown))} in {first.name} "
                             f"(name layers convK / fcK or by node; `onnxmerge inspect` lists them)")
        plan = []
        taken: dict[str, set[int]] = {t.name: set() for t in state.tasks}
        for i, layer in enumerate(first.layers):
            if not self._eligible(state, first.name, first.layers, i):
                continue
            members = [(first.name, i)]
            for task, al in zip(state.tasks[1:], state.alignments):
                j = dict(al.pairs).get(i)
                if j is not None and self._eligible(state, task.name, task.layers, j):
                    members.append((task.name, j))
            for t, j in members:
                taken[t].add(j)
            label = layer_label(first.layers, i)
            plan.append((label, self._setting(label, layer), members))
        for task in state.tasks[1:]:  # layers aligned with none of the first model's: codebooks of their own
            for j, layer in enumerate(task.layers):
                if j not in taken[task.name] and self._eligible(state, task.name, task.layers, j):
                    label = f"{task.name}.{layer_label(task.layers, j)}"
                    plan.append((label, self._setting(None, layer), [(task.name, j)]))
        # a layer an earlier pass of a composition shared (its per-task nodes replaced by one shared
        # node, passes/compose.py) gets one codebook of its own for that node
        present = {n.name for n in state.graph.nodes}
        out = []
        for label, setting, members in plan:
            named = [(t, f"{t}/{state.task(t).layers[j].node}", state.task(t).layers[j]) for t, j in members]
            kept = [m for m in named if m[1] in present]
            if not kept and SHARED + named[0][2].node in present:
                kept = [(named[0][0], SHARED + named[0][2].node, named[0][2])]
                _note(state, f"codebook: {label} is shared by an earlier pass: one codebook for its shared node")
            if kept:
                out.append((label, setting, kept))
            # mtz zips a layer into a node for its shared neurons (`shared/<node>/<tasks>`) beside the
            # per-task nodes of the neurons it did not share: that node gets a codebook of its own
            zipped = [n for n in present if n.startswith(f"{SHARED}{named[0][2].node}/")]
            for name in sorted(zipped):
                out.append((f"{label}.shared", setting, [(named[0][0], name, named[0][2])]))
                _note(state, f"codebook: {label}'s neurons shared by an earlier pass: one codebook for {name}")
        return out

    def _eligible(self, state: MergeState, task: str, layers: list[Layer], index: int) -> bool:
        why = dense_reason(layers, index, self.heads)
        if why and why != HEAD:
            _note(state, f"codebook: {task}/{layers[index].node} stays dense ({why})")
        return why is None

    def _setting(self, label: str | None, layer: Layer) -> Setting:
        if label is not None:
            for key in (label, layer.node):
                if key in self.layer_params:
                    return self.layer_params[key]
        base = PRESETS[self.preset][layer.kind]
        return Setting(self.r or base.r, self.codewords or base.codewords)


HEAD = "the task head (--heads keep)"


def _note(state: MergeState, note: str) -> None:
    if note not in state.notes:
        state.notes.append(note)


def _plan_text(lp: planner.LayerPlan) -> str:
    s = lp.choice.setting
    if s is None:
        return f"{lp.label} dense {lp.dense_bytes:,} B"
    shared = "" if s.group == 1 else f" G={s.group}"
    return f"{lp.label} r={s.r} C={s.codewords}{shared} {lp.choice.bytes:,}/{lp.dense_bytes:,} B"


def dense_reason(layers: list[Layer], index: int, heads: str = "keep") -> str | None:
    """Why layer `index` keeps its dense weight, or None where it gets codebooks: the task head under
    --heads keep, and convolutions that the lookup form does not cover (grouped, depthwise, not 2-D)."""
    layer = layers[index]
    if index == len(layers) - 1 and heads == "keep":
        return HEAD
    if layer.kind == "conv" and layer.groups != 1:
        return "depthwise" if layer.depthwise else "grouped"
    if layer.kind == "conv" and len(layer.kernel) != 2:
        return "not 2-D"
    return None


def explain(graph: gs.Graph, layers: list[Layer]) -> list[str]:
    """What the method does with each layer at its defaults (`onnxmerge inspect`): the default
    preset's r and C with the bytes stored for this model alone (codebook + indices, portable form)
    vs its dense weight, and why a layer stays dense: the reasons of dense_reason, or a codebook
    and indices that would not be smaller (exact stored bytes)."""
    out = []
    tensors = graph.tensors()
    for i, layer in enumerate(layers):
        why = dense_reason(layers, i)
        w = tensors.get(layer.weight)
        if why is None and isinstance(w, gs.Constant):
            values = np.asarray(w.values)
            if layer.kind == "fc" and values.ndim == 2:
                values = logical_fc(values, 0 if values.shape[0] == layer.out_channels else 1)
            cut = [Member("", layer.node, layer.kind, values, values.dtype.itemsize)]
            s = effective(cut, PRESETS["accu"][layer.kind])
            stored, dense = sum(stored_bytes(cut, s, pack=True)), cut[0].dense_bytes
            if stored >= dense:
                why = f"codebook + indices not smaller ({stored:,} vs {dense:,} bytes)"
            else:
                out.append(f"codebook r={s.r} C={s.codewords}: {stored:,} of {dense:,} bytes")
                continue
        out.append(f"dense: {why}" if why else "codebook")
    return out


def _cut(nodes: dict[str, gs.Node], members: list[tuple[str, str, Layer]]) -> list[Member]:
    return [_member(nodes[name], task, layer) for task, name, layer in members]


def _member(node: gs.Node, task: str, layer: Layer) -> Member:
    w = node.inputs[1]
    if not isinstance(w, gs.Constant):
        raise UsageError(f"codebook: layer {node.name} has no constant weight (already merged?)")
    itemsize = np.asarray(w.values).dtype.itemsize
    values = np.asarray(w.values, np.float32)
    if layer.kind == "fc":
        values = logical_fc(values, weight_out_axis(node))
    return Member(task, node.name, layer.kind, values, itemsize)
