"""RepairPass: give each shared (averaged) layer's output channels the statistics of the originals'.

Averaging two nets' weights (zipper eq. 1), even after matching their channels, shrinks and shifts
the layer outputs: the average of two filters that are not identical responds more weakly than
either, and the loss compounds layer after layer ("variance collapse", Jordan, Sedghi, Saukh,
Entezari, Neyshabur, "REPAIR: REnormalizing Permuted Activations for Interpolation Repair", ICLR
2023). REPAIR restores, for every output channel c of every shared layer l (the layer's output
before its activation, BatchNormalization folded in), the mean and standard deviation the tasks'
own layers have at that (matched) channel, averaged over the tasks:

    mu*_c    = (1 / T) * sum_t mu_{t,c},    sigma*_c = (1 / T) * sum_t sigma_{t,c}            (R1)

where mu_{t,c}, sigma_{t,c} are task t's original layer output statistics (over samples and
positions) at the channel matched to merged channel c. With mu_c, sigma_c the merged layer's own,

    z'_c = sigma*_c / sigma_c * (z_c - mu_c) + mu*_c = s_c z_c + (mu*_c - s_c mu_c),   s_c = sigma*_c / sigma_c  (R2)

which is folded into the merged weights and bias: W'_c = s_c W_c, b'_c = s_c b_c + mu*_c - s_c mu_c.
The statistics are taken on one batch: each task's calibration samples (a seeded draw of `samples`
per task), concatenated and fed to every original and to the merged backbone, because the backbone
serves every task. Layers are corrected in order, each measured after the earlier ones' correction.
A channel whose merged output is constant (sigma_c ~ 0) only gets its mean (s_c = 1).

Runs after ZipLayersPass, before calibration, which it gives a better start. Needs --calib for every
task (otherwise it does nothing, with a note) and the shared backbone (--depthwise shared; with
--depthwise task each task computes its own prefix, so a shared weight has no single output to
correct). With a warm start (--sweep) only the layers shared anew are corrected. A layer whose output
tensor is not in the original model, or whose producer is not a
Conv or Gemm with constant weight and bias, is left alone with a note. At --share 0, or when the
merged layers compute what the originals do (a model zipped with a channel-permuted copy of
itself), s_c = 1 and the shift is 0 up to float rounding.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmerge.graph.convert import to_model
from onnxmerge.graph.layers import weight_out_axis
from onnxmerge.model.contract import read_metadata
from onnxmerge.model.runtime import session
from onnxmerge.pipeline.manager import Pass, PassResult

EPS = 1e-8  # relative: a merged channel with sigma_c under EPS * max sigma is treated as constant


class RepairPass(Pass):
    """Rescale and shift the shared layers' output channels to the originals' average statistics (R1-R2)."""

    exact = False
    requires = ("combined",)

    def __init__(self, samples: int = 256):
        self.samples = samples
        self.report: list[dict] = []

    def call(self, state) -> PassResult:
        self.report = []
        k = int(state.params.get("share") or 0)
        calib = getattr(state, "calib", None) or {}
        if k == 0:
            return PassResult(state, False)
        if not all(t.name in calib for t in state.tasks) or len({calib[t.name].x.shape[1:] for t in state.tasks}) > 1:
            state.notes.append("zipper: REPAIR skipped: it needs --calib data of one input shape for every task")
            return PassResult(state, False)
        if state.params.get("depthwise", "shared") != "shared":
            state.notes.append("zipper: REPAIR skipped with --depthwise task (no single shared output to correct)")
            return PassResult(state, False)
        # one batch for every network: the backbone serves all tasks
        x = np.concatenate([np.asarray(calib[t.name].subset(self.samples, seed=0).x, np.float32)
                            for t in state.tasks])
        # a warm start (progressive zippering) brings its shared layers calibrated: only the newly
        # shared ones are corrected, so that calibration is not undone
        done = int(read_metadata(state.warm_start).params.get("share") or 0) if state.warm_start is not None else 0
        first = state.tasks[0]
        keys = [first.layers[i].output for i in range(done, k)]
        targets = _targets(state, keys, x)
        graph = state.graph
        tensors = graph.tensors()
        modified = False
        for i, key in enumerate(keys, start=done):
            merged_name = first.layer_map.get(key)
            target = targets.get(key)
            node = _producer(tensors.get(merged_name)) if merged_name else None
            why = ("the originals do not have its output" if target is None else
                   "its output is not in the merged graph" if node is None else _unsupported(node))
            if why:
                state.notes.append(f"zipper: REPAIR left layer {i} alone: {why}")
                continue
            z = _run(graph, state, [merged_name], x)[0]
            mu, sigma = channel_stats(z)
            mu_t, sigma_t = target
            scale = np.where(sigma > EPS * max(float(sigma.max()), 1e-30), sigma_t / np.maximum(sigma, 1e-30), 1.0)
            shift = mu_t - scale * mu
            _fold(graph, node, scale, shift)
            modified = True
            self.report.append({"layer": i, "scale_min": float(scale.min()), "scale_max": float(scale.max()),
                                "mean_abs_shift": float(np.mean(np.abs(shift)))})
            state.notes.append(f"zipper: REPAIR layer {i}: channel scales {scale.min():.3f}..{scale.max():.3f}, "
                               f"mean |shift| {np.mean(np.abs(shift)):.3g}")
        return PassResult(state, modified)


def channel_stats(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of a layer output (channels on axis 1; over the
    samples and every position)."""
    z = np.moveaxis(np.asarray(z, np.float64), 1, 0).reshape(z.shape[1], -1)
    return z.mean(axis=1), z.std(axis=1)


def _targets(state, keys: list[str], x: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(R1): per layer output name, the tasks' average (mu*, sigma*) in the merged channel order."""
    sums: dict[str, list] = {}
    for task in state.tasks:
        model = onnx.ModelProto()
        model.CopyFrom(task.original)
        present = {o for n in model.graph.node for o in n.output}
        names = [key for key in keys if key in present]
        if not names:
            return {}
        have = {o.name for o in model.graph.output}
        model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names if n not in have)
        sess = session(model, threads=None)
        feed = {sess.get_inputs()[0].name: x}
        outs = dict(zip(names, sess.run(names, feed)))
        for key in keys:
            if key not in outs:
                sums[key] = None
                continue
            mu, sigma = channel_stats(outs[key])
            order = task.channel_order.get(key)  # merged channel c holds the task's channel order[c]
            if order is not None:
                mu, sigma = mu[order], sigma[order]
            if key in sums and sums[key] is None:
                continue
            prev = sums.get(key)
            sums[key] = [mu, sigma] if prev is None else [prev[0] + mu, prev[1] + sigma]
    n = len(state.tasks)
    return {key: (v[0] / n, v[1] / n) for key, v in sums.items() if v is not None}


def _producer(tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor is not None and len(tensor.inputs) == 1 else None


def _unsupported(node: gs.Node) -> str:
    if node.op not in ("Conv", "Gemm"):
        return f"its output comes from a {node.op}"
    if not isinstance(node.inputs[1], gs.Constant):
        return "its weight is not a constant"
    if len(node.inputs) > 2 and node.inputs[2].name and not isinstance(node.inputs[2], gs.Constant):
        return "its bias is not a constant"
    if node.op == "Gemm" and (node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0):
        return "a Gemm with alpha or beta other than 1"
    readers = [c for c in node.inputs[1:3] if isinstance(c, gs.Constant) and len(c.outputs) > 1]
    if readers:
        return f"{readers[0].name} is read by another node too"
    return ""


def _fold(graph: gs.Graph, node: gs.Node, scale: np.ndarray, shift: np.ndarray) -> None:
    """(R2) folded into the producer: W'_c = s_c W_c, b'_c = s_c b_c + shift_c."""
    w = node.inputs[1]
    axis = weight_out_axis(node)
    shape = [1] * w.values.ndim
    shape[axis] = -1
    dtype = w.values.dtype
    w.values = (w.values.astype(np.float64) * scale.reshape(shape)).astype(dtype)
    n = len(scale)
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    old = np.zeros(n) if bias is None else np.broadcast_to(np.asarray(bias.values, np.float64).reshape(-1), (n,))
    new = (scale * old + shift).astype(dtype)
    if bias is None:
        const = gs.Constant(f"{node.name}/repair_bias", new)
        if len(node.inputs) > 2:
            node.inputs[2] = const
        else:
            node.inputs.append(const)
    else:
        bias.values = new.reshape(bias.values.shape) if bias.values.size == n else new


def _run(graph: gs.Graph, state, names: list[str], x: np.ndarray) -> list[np.ndarray]:
    """The merged graph's tensors `names` on `x` (fed to its one shared input)."""
    g = graph.copy()
    tensors = g.tensors()
    g.outputs = [tensors[n] for n in names]
    for n in names:
        tensors[n].dtype = tensors[n].dtype or np.float32
    g.cleanup()
    sess = session(to_model(g, state.opset, state.ir_version), threads=None)
    return sess.run(None, {sess.get_inputs()[0].name: x})
