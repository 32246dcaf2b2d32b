"""FoldBatchNormPass: fold an inference-mode BatchNormalization into the Conv or Gemm before it.

BatchNormalization computes  y = gamma * (x - mean) / sqrt(var + eps) + beta,  per channel c.
With s = gamma / sqrt(var + eps), a preceding layer x = W * u + b folds into

    W'[c, ...] = s[c] * W[c, ...]          b'[c] = s[c] * (b[c] - mean[c]) + beta[c]

(for Gemm, c runs over the output features: rows of B when transB=1, columns otherwise, and the
bias absorbs Gemm's beta). Folding before merging means that averaged or shared weights carry the
statistics of their own layer (zipper paper, section 3).

Declines, leaving the BatchNormalization in place, when: the producer is not a Conv/Gemm, its output
is used elsewhere too, its weight or bias is not a constant or is read by another node (weights can
be shared on purpose), the BatchNormalization runs in training mode, or the folded weights would not
be finite (a variance below -epsilon, or an overflow of the weight's type).
"""

import numpy as np
import onnx_graphsurgeon as gs

from onnxmerge.graph.layers import weight_out_axis
from onnxmerge.pipeline.manager import TaskPass


class FoldBatchNormPass(TaskPass):
    def rewrite(self, graph: gs.Graph, task, state) -> bool:
        modified = False
        graph_outputs = set(id(t) for t in graph.outputs)
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            reason = _decline_reason(bn, graph_outputs)
            if reason:
                state.notes.append(f"{task.name}: BatchNormalization {bn.name} kept: {reason}")
                continue
            layer = bn.inputs[0].inputs[0]
            gamma, beta, mean, var = (t.values.astype(np.float64) for t in bn.inputs[1:5])
            weight = layer.inputs[1]
            w = weight.values.astype(np.float64)
            out_axis = weight_out_axis(layer)
            shape = [1] * w.ndim
            shape[out_axis] = -1
            n_out = w.shape[out_axis]
            bias = _bias_values(layer, n_out)
            with np.errstate(all="ignore"):  # checked below: a negative variance, or an overflow
                scale = gamma / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
                new_weight = (w * scale.reshape(shape)).astype(weight.values.dtype)
                new_bias = (scale * (bias - mean) + beta).astype(weight.values.dtype)
            if not (np.isfinite(new_weight).all() and np.isfinite(new_bias).all()):
                state.notes.append(f"{task.name}: BatchNormalization {bn.name} kept: folded into {layer.name} "
                                   "its weights would not be finite in their type")
                continue
            weight.values = new_weight
            bias_const = gs.Constant(f"{bn.outputs[0].name}_folded_bias", new_bias)  # tensor names are unique
            if len(layer.inputs) > 2:
                layer.inputs[2] = bias_const
            else:
                layer.inputs.append(bias_const)
            if layer.op == "Gemm":
                layer.attrs["beta"] = 1.0
            # the layer now writes the BatchNormalization's output tensor directly
            layer.outputs = [bn.outputs[0]]
            bn.inputs.clear()
            bn.outputs.clear()
            modified = True
        if modified:
            graph.cleanup()
        return modified


def _decline_reason(bn: gs.Node, graph_outputs: set) -> str:
    if bn.attrs.get("training_mode", 0):
        return "training mode"
    if len(bn.outputs) > 1 and any(t.outputs for t in bn.outputs[1:]):
        return "its running statistics outputs are used"
    if not all(isinstance(t, gs.Constant) for t in bn.inputs[1:5]):
        return "its parameters are not constants"
    x = bn.inputs[0]
    if len(x.inputs) != 1 or x.inputs[0].op not in ("Conv", "Gemm"):
        return "not preceded by a Conv or Gemm"
    layer = x.inputs[0]
    if len(x.outputs) != 1 or id(x) in graph_outputs:
        return f"the output of {layer.name} is also used elsewhere"
    for t in layer.inputs[1:]:
        if not isinstance(t, gs.Constant):
            return f"{layer.name} has a weight or bias that is not a constant"
        if len(t.outputs) != 1:
            return f"{layer.name}'s parameter {t.name} is also used by another node"
    if layer.op == "Gemm":
        n_out = layer.inputs[1].shape[weight_out_axis(layer)]
        if layer.attrs.get("transA", 0):
            return f"{layer.name} has transA=1"
        if len(layer.inputs) > 2 and layer.inputs[2].values.size not in (1, n_out):
            return f"{layer.name}'s bias is not per output feature"
    return ""


def _bias_values(layer: gs.Node, n_out: int) -> np.ndarray:
    if len(layer.inputs) < 3 or layer.inputs[2] is None or not layer.inputs[2].name:
        return np.zeros(n_out)
    b = layer.inputs[2].values.astype(np.float64)
    if layer.op == "Gemm":
        b = layer.attrs.get("beta", 1.0) * np.broadcast_to(b.reshape(-1), (n_out,))
    return b
