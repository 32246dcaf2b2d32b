"""The layer view of a model: its weight-bearing layers in order, and the glue between them.

A layer is a Conv (dense, grouped or depthwise), a Gemm, or a MatMul with a constant weight (with
the Add of a constant bias that follows it, if any). Everything else is glue: activations, pooling,
flatten/reshape, residual Adds, Concat. The view is what alignment and the merging methods reason
about; calibration reads each layer's `output` tensor for the per-layer loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import onnx_graphsurgeon as gs

from onnxmerge.errors import MergeError

ACTIVATIONS = {"Relu": "ReLU", "LeakyRelu": "LeakyReLU", "Sigmoid": "Sigmoid", "Tanh": "Tanh", "Clip": "Clip"}


@dataclass
class Layer:
    index: int
    kind: str  # "conv" or "fc"
    op: str  # Conv, Gemm or MatMul
    node: str  # the node's name
    weight: str  # the weight initializer's name
    bias: str | None
    output: str  # the layer's output tensor (after its bias, before its activation)
    in_channels: int
    out_channels: int
    kernel: tuple[int, ...] = ()
    groups: int = 1
    strides: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    activation: str | None = None
    glue: list[str] = field(default_factory=list)  # op types between this layer and the next

    @property
    def depthwise(self) -> bool:
        return self.kind == "conv" and self.groups > 1 and self.groups == self.in_channels

    @property
    def signature(self) -> tuple:
        """What must agree for two layers to be interchangeable (equal architectures)."""
        return (self.kind, self.kernel, self.in_channels, self.out_channels, self.groups, self.strides)

    def to_dict(self) -> dict:
        return asdict(self) | {"depthwise": self.depthwise}


def layer_view(graph: gs.Graph, where: str = "model") -> list[Layer]:
    """The ordered layers of a (normalised, topologically sorted) graph."""
    layers: list[Layer] = []
    glue: list[str] = []
    absorbed: set[int] = set()  # Add nodes taken as a MatMul's bias
    for node in graph.nodes:
        if id(node) in absorbed:
            continue
        layer = _as_layer(node, len(layers), where)
        if layer is None:
            if layers:
                layers[-1].glue.append(node.op)
            else:
                glue.append(node.op)
            continue
        if layer.op == "MatMul":
            add = _bias_add(node)
            if add is not None:
                absorbed.add(id(add))
                layer.bias = next(t.name for t in add.inputs if isinstance(t, gs.Constant))
                layer.output = add.outputs[0].name
        layer.activation = _activation_after(graph, layer.output)
        layers.append(layer)
    return layers


def _as_layer(node: gs.Node, index: int, where: str) -> Layer | None:
    if node.op == "Conv" and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant):
        w = node.inputs[1].values
        groups = int(node.attrs.get("group", 1))
        k = tuple(int(d) for d in w.shape[2:])
        return Layer(
            index, "conv", "Conv", node.name, node.inputs[1].name, _name(node, 2), node.outputs[0].name,
            in_channels=int(w.shape[1]) * groups, out_channels=int(w.shape[0]), kernel=k, groups=groups,
            strides=tuple(node.attrs.get("strides", [1] * len(k))),
            pads=tuple(node.attrs.get("pads", [0] * 2 * len(k))),
            dilations=tuple(node.attrs.get("dilations", [1] * len(k))),
        )
    if node.op == "Gemm" and isinstance(node.inputs[1], gs.Constant):
        if node.attrs.get("transA", 0):
            raise MergeError(f"{where}: Gemm {node.name} with transA=1 is not supported as a layer")
        w = node.inputs[1].values
        n_out, n_in = w.shape if weight_out_axis(node) == 0 else w.shape[::-1]
        return Layer(index, "fc", "Gemm", node.name, node.inputs[1].name, _name(node, 2),
                     node.outputs[0].name, in_channels=int(n_in), out_channels=int(n_out))
    if node.op == "MatMul" and isinstance(node.inputs[1], gs.Constant) and node.inputs[1].values.ndim == 2:
        n_in, n_out = node.inputs[1].values.shape
        return Layer(index, "fc", "MatMul", node.name, node.inputs[1].name, None, node.outputs[0].name,
                     in_channels=int(n_in), out_channels=int(n_out))
    return None


def weight_out_axis(node: gs.Node) -> int:
    """The axis of a Conv / Gemm / MatMul weight that indexes the output channels or features:
    Conv [O, I, ...] -> 0; Gemm 0 with transB=1 ([N, K]), else 1 ([K, N]); MatMul [K, N] -> 1."""
    if node.op == "Gemm":
        return 0 if node.attrs.get("transB", 0) else 1
    return 1 if node.op == "MatMul" else 0


def _name(node: gs.Node, i: int) -> str | None:
    return node.inputs[i].name if len(node.inputs) > i and node.inputs[i].name else None


def _bias_add(matmul: gs.Node) -> gs.Node | None:
    out = matmul.outputs[0]
    if len(out.outputs) == 1 and out.outputs[0].op == "Add":
        add = out.outputs[0]
        other = [t for t in add.inputs if t is not out]
        if len(other) == 1 and isinstance(other[0], gs.Constant) and other[0].values.size == matmul.inputs[1].values.shape[1]:
            return add
    return None


def _activation_after(graph: gs.Graph, tensor_name: str) -> str | None:
    tensor = graph.tensors()[tensor_name]
    if len(tensor.outputs) != 1 or tensor.outputs[0].op not in ACTIVATIONS:
        return None
    node = tensor.outputs[0]
    if node.op == "Clip":
        bounds = [t.values.item() if isinstance(t, gs.Constant) else None for t in node.inputs[1:3]]
        bounds = [b for b in bounds if b is not None]
        return "ReLU6" if bounds == [0.0, 6.0] else f"Clip{tuple(bounds)}"
    return ACTIVATIONS[node.op]


def layer_label(layers: list[Layer], index: int) -> str:
    """convK / fcK: the layer's ordinal among the model's layers of its kind, from 1 (the names
    that per-layer options such as the codebook method's --layer-params take)."""
    kind = layers[index].kind
    return f"{kind}{sum(1 for l in layers[: index + 1] if l.kind == kind)}"


def format_layers(layers: list[Layer]) -> str:
    """The layer view as a plain-text table (what `onnxmerge inspect` prints)."""
    rows = [("#", "name", "kind", "op", "kernel", "in", "out", "groups", "stride", "pads", "act", "then", "node")]
    for l in layers:
        kind = "dwconv" if l.depthwise else l.kind
        rows.append((str(l.index), layer_label(layers, l.index), kind, l.op, "x".join(map(str, l.kernel)) or "-", str(l.in_channels),
                     str(l.out_channels), str(l.groups), ",".join(map(str, l.strides)) or "-",
                     ",".join(map(str, l.pads)) or "-", l.activation or "-",
                     " ".join(g for g in l.glue if g not in ACTIVATIONS) or "-", l.node))
    return table(rows)


def table(rows: list[tuple]) -> str:
    """Rows as a left-aligned text table, a rule under the first (the header)."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
