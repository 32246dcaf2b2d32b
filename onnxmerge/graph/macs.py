"""Multiply-accumulates of a graph's weight-bearing operators (a static property of the graph, so
it lives beside it: measurement reports it, and the codebook's native emission weighs its lookups
against the dense layer with it).

MACs (`count_macs`) are the multiply-accumulates of the weight-bearing operators only, for one run
at a given batch size:

    Conv           prod(Y.shape) * prod(W.shape[1:])   = N*Cout*Hout*Wout * (Cin/groups)*kh*kw
    ConvTranspose  prod(X.shape) * prod(W.shape[1:])   = N*Cin*Hin*Win * (Cout/groups)*kh*kw
    Gemm           prod(Y.shape) * K                   = M*N*K
    MatMul         prod(Y.shape) * A.shape[-1]         = batch dims * M*N*K

    EConv / EFC    N*pixels_in*V*C*r + prod(Y.shape)*kh*kw*V  (lookup tables, then one add per entry)

Elementwise operators (Add, Relu, BatchNorm left unfolded, ...), pooling and Gather are not
counted: on the networks onnxmerge merges they are a small fraction of the work. Only the main graph's
nodes are counted (not If/Loop bodies, whose trip counts are unknown).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, shape_inference

from onnxmerge.errors import MergeError
from onnxmerge.kernels import DOMAIN
from onnxmerge.model.runtime import random_feeds, session
from onnxmerge.model.saving import split_weights


def _fix_batch(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A copy of `model` whose symbolic first input dims (and every dim of the same name) are `batch`,
    without the declared shapes of tensors that standard operators produce."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    stored = {t.name for t in m.graph.initializer}
    names: set[str] = set()
    for inp in m.graph.input:
        if inp.name in stored or not inp.type.tensor_type.HasField("shape"):
            continue
        dims = inp.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            if dims[0].dim_param:
                names.add(dims[0].dim_param)
            dims[0].dim_value = batch
    # the declared shapes of what standard operators produce are hints that shape inference recomputes
    # from the inputs, and a wrong one (a symbolic dim named like the batch dim) would contradict it;
    # only the outputs of custom operators (no schema to infer them from) keep theirs
    custom = {o for n in m.graph.node if n.domain not in ("", "ai.onnx") for o in n.output}
    keep = [vi for vi in m.graph.value_info if vi.name in custom]
    del m.graph.value_info[:]
    m.graph.value_info.extend(keep)
    for vi in list(m.graph.value_info) + list(m.graph.output):
        if vi.type.tensor_type.HasField("shape"):
            for d in vi.type.tensor_type.shape.dim:
                if d.HasField("dim_param") and d.dim_param in names:
                    d.dim_value = batch
    return m


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Tensor name -> shape (None for an unknown dim) after shape inference, for the main graph."""
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    except Exception as e:  # onnx raises several types; the message is what the user needs
        raise MergeError(f"shape inference failed while counting MACs: {e}".splitlines()[0]) from None
    g = inferred.graph
    shapes: dict[str, list[int | None]] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
    for t in g.initializer:
        shapes[t.name] = list(t.dims)
    for node in g.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = list(attr.t.dims)
    return shapes


def _macs_conv(node, shape):
    return math.prod(shape(node.output[0])) * math.prod(shape(node.input[1])[1:])


def _macs_conv_transpose(node, shape):
    return math.prod(shape(node.input[0])) * math.prod(shape(node.input[1])[1:])


def _macs_gemm(node, shape):
    trans_a = any(a.name == "transA" and a.i for a in node.attribute)
    a = shape(node.input[0])
    return math.prod(shape(node.output[0])) * (a[0] if trans_a else a[1])


def _macs_matmul(node, shape):
    return math.prod(shape(node.output[0])) * shape(node.input[0])[-1]


def _macs_lookup(node, shape):
    """EConv / EFC (NeuralMerger eq. 9): the table of codeword dot products, V*C*r per input pixel
    and sample, plus one addition of a table entry per (output, kernel offset, segment)."""
    x, (_, c, r), codes = shape(node.input[0]), shape(node.input[1]), shape(node.input[2])
    n_seg, per_output = codes[0], math.prod(codes[2:])  # kernel offsets (1 for EFC)
    pixels = math.prod(x[2:])  # 1 for EFC
    return x[0] * pixels * n_seg * c * r + math.prod(shape(node.output[0])) * per_output * n_seg


_MAC_RULES = {
    "Conv": _macs_conv,
    "ConvTranspose": _macs_conv_transpose,
    "Gemm": _macs_gemm,
    "MatMul": _macs_matmul,
    "ai.onnxmerge.EConv": _macs_lookup,
    "ai.onnxmerge.EFC": _macs_lookup,
}


def _rule(node: onnx.NodeProto):
    return _MAC_RULES.get(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}")


def _runtime_shapes(model: onnx.ModelProto, batch: int, names: list[str]) -> dict[str, list[int]]:
    """The shapes of tensors `names` from one run at `batch` on seeded random inputs, where static
    inference leaves dims unknown (a Reshape whose target is computed by Shape -> Div -> Concat, as
    exporters write a channel shuffle); {} where the model does not run."""
    m, _ = split_weights(model)  # a light copy; the data of big weights does not change any shape
    stubs = {t.name: np.zeros(t.dims, helper.tensor_dtype_to_np_dtype(t.data_type))
             for t in m.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    known = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in known)
    try:
        sess = session(m, native=any(n.domain == DOMAIN for n in m.graph.node), weights=stubs or None)
        values = sess.run(names, random_feeds(sess, batch))
    except Exception:  # onnxruntime's own error types; the static error names the node
        return {}
    return {n: list(v.shape) for n, v in zip(names, values)}


def count_macs(model: onnx.ModelProto, batch: int = 1) -> int:
    """Multiply-accumulates of one run of `model` at `batch` (Conv, ConvTranspose, Gemm, MatMul).

    The symbolic first dim of each graph input is fixed to `batch` on a copy before shape
    inference. Raises MergeError naming the node when a shape it needs is unknown.
    """
    return sum(macs for _, macs in _node_macs(model, batch))


def node_macs(model: onnx.ModelProto, batch: int = 1) -> dict[str, int | None]:
    """MACs of each counted node by name (count_macs's rules); None where a shape it needs is unknown."""
    out: dict[str, int | None] = {}
    for node, macs in _node_macs(model, batch, strict=False):
        out[node.name] = macs
    return out


def _node_macs(model: onnx.ModelProto, batch: int, strict: bool = True):
    shapes = _shapes(_fix_batch(model, batch))
    counted = [n for n in model.graph.node if _rule(n) is not None]
    unknown = sorted({t for n in counted for t in [*n.input, *n.output]
                      if t and (shapes.get(t) is None or None in shapes[t])})
    if unknown:
        shapes.update(_runtime_shapes(model, batch, unknown))
    for i, node in enumerate(model.graph.node):
        rule = _rule(node)
        if rule is None:
            continue

        def shape(name, node=node, i=i):
            s = shapes.get(name)
            if s is None or any(d is None for d in s):
                label = node.name or f"#{i} ({node.op_type})"
                raise MergeError(f"node {label}: shape of {name!r} unknown, cannot count MACs "
                                 f"(known: {s})")
            return s

        try:
            yield node, rule(node, shape)
        except MergeError:
            if strict:
                raise
            yield node, None
