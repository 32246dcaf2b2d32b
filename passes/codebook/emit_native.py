"""EmitNativePass: the codebook method's native form, after calibration (`--emit native`).

Each codebook layer of the portable form (Gather of the codebook by the indices, then Conv / Gemm /
MatMul; onnxmerge.graph.ops) becomes one `ai.onnxmerge::EConv` / `EFC` node whose kernel computes
NeuralMerger's eq. 9 with lookup tables, where the kernels support the layer and the lookup takes
fewer operations than the dense layer. The native model is checked against the portable one with the
ops' numpy reference (onnxmerge.pipeline.checks.check_native). Where the kernels are not built, the
command line writes the portable form instead (`MergeState.portable_fallback`) and warns; the Python
API writes the native form, which onnxmerge then runs in its portable form.

`--table-precision int16|int8` writes the EConv nodes, and with int8 the EFC nodes (EFC_TABLE_BITS),
with integer tables (attribute table_bits; onnxmerge.graph.ops): the rewrite is still checked exact
with float tables, and the rounding the integer tables add is recorded beside it (fidelity
table_rounding_rel_diff) for the report.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmerge import kernels
from onnxmerge.graph.macs import node_macs
from onnxmerge.graph.ops import export_with_domain, find_chain, shaped_graph
from onnxmerge.kernels import DOMAIN
from onnxmerge.passes.codebook import emit_auto
from onnxmerge.pipeline import checks
from onnxmerge.pipeline.manager import Pass, PassResult


class EmitNativePass(Pass):
    """Rewrites `state.model` (the exported, calibrated model) into the native form. Precondition:
    the model is in the portable form; records the native-vs-portable difference and the layers kept
    portable in `state.info.fidelity`."""

    exact = True  # the native form computes the portable form's numbers (checked by check_native)
    requires = ("exported",)

    def __init__(self, auto: bool = False, batch: int = 1, threads: int = 1, table_precision: str = "fp32"):
        self.auto, self.batch, self.threads = auto, batch, threads  # auto: emit_auto times each layer
        self.table_precision = table_precision

    @property
    def table_bits(self) -> int:
        return TABLE_BITS[self.table_precision]

    def call(self, state) -> PassResult:
        if not kernels.available() and (state.portable_fallback or self.auto):
            if self.auto:  # the portable form is what auto chooses without kernels to time
                state.info.fidelity.setdefault("notes", []).append(
                    f"--emit auto: {kernels.unavailable_reason()}; the portable form is written")
            else:
                state.warnings.append(f"--emit native: {kernels.unavailable_reason()}; writing --emit gather")
            state.params["emit"] = "gather"
            return PassResult(state, False)
        portable = state.model
        native, kept = to_native(portable, table_bits=self.table_bits)
        if self.auto:
            native, kept = self._timed(state, portable, native, kept)
            if not any(n.domain == DOMAIN for n in native.graph.node):  # every layer faster dense
                state.info.fidelity.setdefault("notes", []).append(
                    f"--emit auto: no native node ran faster than its dense layer here, alone or in the model "
                    f"(batch {self.batch}, {self.threads} thread(s)): the portable form is written")
                state.params["emit"] = "gather"
                return PassResult(state, False)
        fidelity = state.info.fidelity
        fidelity["native_vs_portable_rel_diff"] = checks.check_native(native, portable)
        notes = fidelity.setdefault("notes", [])
        if any(a.name == "table_bits" for n in native.graph.node for a in n.attribute):
            rounded = checks.native_difference(native, portable)
            fidelity["table_rounding_rel_diff"] = rounded
            notes.append(f"lookup tables in {self.table_precision} (a power-of-two scale per sample and "
                         f"segment): the native form differs from the portable one by {rounded:.3g} (largest "
                         "relative output difference on random inputs); the evaluation measures what it costs")
        notes.extend(f"portable form kept for {k}" for k in kept)
        if not kernels.available():
            same = ("which computes the same numbers" if "table_rounding_rel_diff" not in fidelity else
                    "which computes fp32 tables: the integer tables' rounding is not in its figures")
            notes.append(f"{kernels.unavailable_reason()}; onnxmerge evaluates and times this model in its portable "
                         f"form, {same}")
        state.model = native
        return PassResult(state, True)

    def _timed(self, state, portable: onnx.ModelProto, native: onnx.ModelProto,
               kept: list[str]) -> tuple[onnx.ModelProto, list[str]]:
        """`--emit auto`: the native model with only the nodes that ran faster than their dense layer
        here (emit_auto.time_layers), as long as the whole model runs faster than its portable form
        in at least three of four paired rounds
        (emit_auto.time_model: else the native layer that saved least time alone returns to dense, and
        the model is timed again; with no timed layer left native, every native node does); the
        timings go to the report (figures emit_auto, emit_auto_model)."""
        rows = emit_auto.time_layers(native, self.batch, self.threads)
        state.info.fidelity["emit_auto"] = rows  # after calibration: straight into the metadata
        for r in rows:
            r["kept"] = r["faster"]  # the form kept: the whole-model check below may return a layer to dense
        to_dense = {r["layer"]: (f"timed slower than dense here ({1e6 * r['native_s']:.0f} vs "
                                 f"{1e6 * r['dense_s']:.0f} us at batch {self.batch}, {self.threads} thread(s))")
                    for r in rows if r["faster"] == "dense"}
        floats = {r["layer"] for r in rows if r["faster"] == emit_auto.FLOAT_TABLES}
        if to_dense or floats:
            native, kept = to_native(portable, skip=to_dense, table_bits=self.table_bits, float_tables=floats)
        wholes = state.info.fidelity["emit_auto_model"] = []
        while native_nodes := [n.name for n in native.graph.node if n.domain == DOMAIN]:
            whole = emit_auto.time_model(native, portable, self.batch, self.threads)
            wholes.append(whole)
            if whole["ratio_q1"] > 1:  # faster in at least three of four paired rounds: beyond noise
                break
            why = (f"the model with its {len(native_nodes)} native layer(s), this one among them, ran "
                   f"{whole['ratio']:.2f}x the portable form's speed (batch {whole['batch']}, {self.threads} thread(s))")
            still = [r for r in rows if r["kept"] in ("native", emit_auto.FLOAT_TABLES)]
            if still:  # the layout conversions cost about the same per node: the least saving goes first
                least = min(still, key=lambda r: r["dense_s"] - emit_auto.kept_s(r))
                least["kept"] = "dense (model slower)"
                to_dense[least["layer"]] = f"faster alone, but {why}"
            else:  # only nodes of unknown input size (untimed) are left
                to_dense.update((name, f"not timed alone, and {why}") for name in native_nodes)
            native, kept = to_native(portable, skip=to_dense, table_bits=self.table_bits, float_tables=floats)
        return native, kept


# --table-precision -> EConv's table_bits (onnxmerge.graph.ops)
TABLE_BITS = {"fp32": 32, "int16": 16, "int8": 8}
# the precisions EFC nodes take too: int8 tables are looked up by byte shuffles, 32 outputs at once
# (kernels/lookup_impl.cc); int16 ones by the same scalar loads as float tables plus a conversion each,
# slower than float (fc 1024 light, batch 1, AMD EPYC: 79 us against 47), so EFC keeps float tables
EFC_TABLE_BITS = (8,)


def to_native(model: onnx.ModelProto, skip: dict[str, str] | None = None, table_bits: int = 32,
              float_tables: set[str] = frozenset()) -> tuple[onnx.ModelProto, list[str]]:
    """Replace the codebook layers of the portable form by EConv / EFC nodes where that pays.

    Returns the model and the layers left in the portable form, with the reason: what the kernels
    do not support (2-D convolutions with groups 1, Gemm with alpha = beta = 1 and transA = 0,
    MatMul of a 2-D input, one codebook per segment: not a codebook shared by segments), or a
    lookup that takes at least as many operations as the dense layer
    (eq. 9's tables cost V*C*r per input pixel, e.g. a first convolution with one input channel and
    r = 1): such a layer keeps its dense Conv / Gemm, which onnxruntime runs faster, and the same
    compressed file. `skip`: further layers to keep portable (name -> reason). `table_bits` 16 / 8:
    EConv nodes store their tables as integers, and EFC nodes where EFC_TABLE_BITS has it, but for
    the layers named in `float_tables` (--emit auto timed them faster with float tables)."""
    skip = dict(skip or {})
    candidate, kept = _to_native(model, skip, table_bits, float_tables)
    dense, lookup = node_macs(model), node_macs(candidate)
    slower = {}
    for node in candidate.graph.node:
        ops, macs = lookup.get(node.name), dense.get(node.name)
        if node.domain == DOMAIN and ops is not None and macs is not None and ops >= macs:
            slower[node.name] = f"the lookup takes at least the dense layer's operations ({ops:,} vs {macs:,} per sample)"
    return _to_native(model, {**skip, **slower}, table_bits, float_tables) if slower else (candidate, kept)


def _to_native(model: onnx.ModelProto, skip: dict[str, str], table_bits: int,
               float_tables: set[str]) -> tuple[onnx.ModelProto, list[str]]:
    """to_native without the cost rule: every supported layer but those in `skip` (name -> reason)."""
    graph = shaped_graph(model)
    kept = []
    for node in list(graph.nodes):
        if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        found = find_chain(node.inputs[1])
        if found is None:
            continue
        codebook, codes = found
        why = skip.get(node.name) or _native_unsupported(node) or _shared_codebook(node.inputs[1])
        if why:
            kept.append(f"{node.name}: {why}")
            continue
        x, y = node.inputs[0], node.outputs[0]
        bias = node.inputs[2:3]
        if node.op == "Conv":
            depth = int(node.inputs[1].shape[1])
            kernel = list(codes.values.shape[2:])
            attrs = {"in_channels": depth, "kernel_shape": kernel,
                     "strides": list(node.attrs.get("strides", [1, 1])),
                     "pads": list(node.attrs.get("pads", [0, 0, 0, 0])),
                     "dilations": list(node.attrs.get("dilations", [1, 1]))}
            if node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", ""):
                kept.append(f"{node.name}: auto_pad")
                continue
            op = "EConv"
        else:
            depth = int(x.shape[1]) if x.shape and isinstance(x.shape[1], int) else None
            if depth is None:
                kept.append(f"{node.name}: input features unknown")
                continue
            attrs, op = {"in_features": depth}, "EFC"
        if table_bits != 32 and (op == "EConv" or table_bits in EFC_TABLE_BITS) and node.name not in float_tables:
            attrs["table_bits"] = table_bits
        node.inputs.clear()
        node.outputs.clear()
        y.dtype = np.float32
        graph.nodes.append(gs.Node(op, node.name, attrs, [x, codebook, codes, *bias], [y], domain=DOMAIN))
    return export_with_domain(graph, model, native=True), kept


def _shared_codebook(weight: gs.Tensor) -> str | None:
    """A reason where the layer's codebook is shared by segments (its chain adds no segment offsets:
    no Range; onnxmerge.graph.ops.gather_weight): the kernels read codebook v for segment v."""
    stack, seen = [weight], set()
    while stack:
        t = stack.pop()
        if isinstance(t, gs.Constant) or not t.inputs or id(t.inputs[0]) in seen:
            continue
        seen.add(id(t.inputs[0]))
        if t.inputs[0].op == "Range":
            return None
        stack.extend(t.inputs[0].inputs)
    return "a codebook shared by segments (the kernels take one codebook per segment)"


def _native_unsupported(node: gs.Node) -> str | None:
    if node.op == "Conv":
        w = node.inputs[1]
        if not w.shape or len(w.shape) != 4:
            return "not a 2-D convolution"
        if node.attrs.get("group", 1) != 1:
            return "grouped convolution"
        return None
    if node.op == "Gemm":
        if node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0 or node.attrs.get("beta", 1.0) != 1.0:
            return "Gemm with transA, alpha or beta"
        if len(node.inputs) > 2 and len(node.inputs[2].shape or ()) != 1:
            return "Gemm bias not 1-D"
        return None
    x = node.inputs[0]
    if not x.shape or len(x.shape) != 2:
        return "MatMul input not 2-D"
    return None
