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
`--layer-params conv2=8/128,...` overrides single layers (named by the first model's layers).
The task heads (each model's last layer) stay per task and dense unless heads="codebook".
Depthwise and grouped convolutions and non-2-D convolutions stay dense (a note says so).

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
from onnxmerge.passes.codebook._codebook import (
    PRESETS,
    Group,
    Member,
    Setting,
    build_group,
    logical_fc,
)
from onnxmerge.pipeline.manager import Pass, PassResult
from onnxmerge.pipeline.state import MergeState


class ShareCodebooksPass(Pass):
    exact = False
    requires = ("aligned", "combined")

    def __init__(self, preset: str = "accu", r: int | None = None, codewords: int | None = None,
                 layer_params: dict[str, Setting] | None = None, heads: str = "keep", n_init: int = 3,
                 max_iter: int = 30, seed: int = 0):
        if preset not in PRESETS:
            raise UsageError(f"--preset {preset}: choose from {', '.join(PRESETS)}")
        if heads not in ("keep", "codebook"):
            raise UsageError(f"--heads {heads}: use keep or codebook")
        self.preset, self.r, self.codewords = preset, r, codewords
        self.layer_params = dict(layer_params or {})
        self.heads, self.n_init, self.max_iter, self.seed = heads, n_init, max_iter, seed

    def call(self, state: MergeState) -> PassResult:
        plan = self._plan(state)
        graph = state.graph
        nodes = {n.name: n for n in graph.nodes}
        groups: list[Group] = []
        bar = tqdm(plan, desc="codebooks (k-means)", unit="layer", disable=not state.progress, leave=False)
        for label, setting, members in bar:
            bar.set_postfix_str(label, refresh=False)
            group = build_group(label, [_member(nodes[name], task, layer) for task, name, layer in members],
                                setting, n_init=self.n_init, max_iter=self.max_iter, seed=self.seed)
            groups.append(group)
            owner = SHARED if len(members) > 1 else f"{members[0][0]}/"
            codebook = gs.Constant(f"{owner}{label}/codebook", group.codebook)
            for (task, name, layer), member, codes in zip(members, group.members, group.codes):
                node = nodes[name]
                codes_t = gs.Constant(f"{name}/codes", codes)
                node.inputs[1] = gather_weight(graph, codebook, codes_t, layer.kind, member.depth,
                                               weight_out_axis(node) if layer.kind == "fc" else 0, f"{name}/gather")
        graph.cleanup().toposort()
        state.figures["codebook_layers"] = [g.summary() for g in groups]
        state.params.update({"preset": self.preset, "r": self.r, "codewords": self.codewords,
                             "layer_params": {k: str(v) for k, v in self.layer_params.items()}})
        return PassResult(state, bool(groups))

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
        return [(label, setting, [(t, f"{t}/{state.task(t).layers[j].node}", state.task(t).layers[j])
                                  for t, j in members]) for label, setting, members in plan]

    def _eligible(self, state: MergeState, task: str, layers: list[Layer], index: int) -> bool:
        why = dense_reason(layers, index, self.heads)
        if why and why != HEAD:
            note = f"codebook: {task}/{layers[index].node} stays dense ({why})"
            if note not in state.notes:
                state.notes.append(note)
        return why is None

    def _setting(self, label: str | None, layer: Layer) -> Setting:
        if label is not None:
            for key in (label, layer.node):
                if key in self.layer_params:
                    return self.layer_params[key]
        base = PRESETS[self.preset][layer.kind]
        return Setting(self.r or base.r, self.codewords or base.codewords)


HEAD = "the task head (--heads keep)"


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
    """What the method does with each layer at its defaults (`onnxmerge inspect`)."""
    return [f"dense: {why}" if (why := dense_reason(layers, i)) else "codebook" for i in range(len(layers))]


def _member(node: gs.Node, task: str, layer: Layer) -> Member:
    w = node.inputs[1]
    if not isinstance(w, gs.Constant):
        raise UsageError(f"codebook: layer {node.name} has no constant weight (already merged?)")
    values = np.asarray(w.values, np.float32)
    if layer.kind == "fc":
        values = logical_fc(values, weight_out_axis(node))
    return Member(task, node.name, layer.kind, values)
