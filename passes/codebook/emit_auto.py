"""`--emit auto`: each layer's native node timed against the dense layer it replaces, on this machine.

Counting operations (emit_native.to_native) says when a lookup cannot win; whether it does win
depends on the CPU (cache sizes, vector width, the dense kernels onnxruntime has for it), the batch
and the thread count. So every EConv / EFC node the operation count lets through is timed both ways
at the deployment's batch size and thread count (`--target-batch`, `--target-threads`): the node
alone in a session with onnxmerge's kernels, and the same node in the portable form, whose
codebook-gather subgraph onnxruntime folds into the dense weight at session creation, so that it
times the dense Conv / Gemm. The two are run interleaved (onnxmerge.model.timing, the loop every
speed figure comes from) for a fixed budget per layer, and the native node is kept only where its
median time is below the dense one's. A node with integer tables (`--table-precision int16|int8`) is
timed a third way, with float tables: where that is the fastest form, the node keeps float tables
(exact, so no accuracy is lost by the choice; int8 EFC at batch > 1 runs sample by sample, slower than
float tables' tiles of samples). The report lists the medians, their quartiles and the choice per layer.

A layer alone does not pay all that its native node costs inside the model: there onnxruntime runs the
dense layers around it in its blocked layout (NCHWc) and converts to and from that layout at the
native node, and the node's tables compete for the caches with the other layers. So the whole model is
then timed against the portable form (time_model), and while it is not faster beyond noise (in at least
three of four paired rounds: the lower quartile of the per-round ratios above 1) the native layer that
saved least time alone returns to its dense form (EmitNativePass); the report lists each whole-model
check.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmerge.graph.ops import export_with_domain, shaped_graph, to_portable
from onnxmerge.kernels import DOMAIN
from onnxmerge.model.runtime import run_batch
from onnxmerge.model.timing import time_models

BUDGET_S = 0.3  # per layer, all its forms together
FLOAT_TABLES = "native (fp32 tables)"  # the choice of a node with integer tables kept native with float ones
MIN_ROUNDS = 5


# the forms a node is timed in, and the choice each stands for
FORMS = {"native": "native", "fp32_tables": FLOAT_TABLES, "dense": "dense"}


def time_layers(native: onnx.ModelProto, batch: int = 1, threads: int = 1, budget_s: float = BUDGET_S) -> list[dict]:
    """Per native node of `native` whose input size is known: {layer, op, batch, threads, rounds,
    native_s, dense_s (medians), their quartiles, faster: "native", FLOAT_TABLES or "dense"}; a node
    with integer tables also has fp32_tables_s and its quartiles (the node with float tables)."""
    graph = shaped_graph(native)
    rows = []
    for node in graph.nodes:
        if node.domain != DOMAIN:
            continue
        shape = node.inputs[0].shape
        if not shape or not all(isinstance(d, int) for d in shape[1:]):
            continue  # an input of unknown size: nothing to time it on (the operation count decided)
        alone = _alone(node, native, batch)
        forms = {"native": alone, "dense": to_portable(alone)}
        if "table_bits" in node.attrs:
            forms["fp32_tables"] = _alone(node, native, batch, float_tables=True)
        times = time_models(forms, "dense", batch, threads, budget_s, MIN_ROUNDS, native=True)
        row = {"layer": node.name, "op": node.op, "batch": batch, "threads": threads, "rounds": times["native"]["runs"]}
        for form, t in times.items():
            row[f"{form}_s"], row[f"{form}_quartiles_s"] = 1e-3 * t["median_ms"], [1e-3 * t["q1_ms"], 1e-3 * t["q3_ms"]]
        row["faster"] = FORMS[min(times, key=lambda form: row[f"{form}_s"])]
        rows.append(row)
    return rows


def time_model(model: onnx.ModelProto, portable: onnx.ModelProto, batch: int = 1, threads: int = 1,
               budget_s: float = BUDGET_S) -> dict:
    """The whole model with its native nodes against its portable form: {native_layers, batch (the
    model's fixed batch where it has one), threads, ratio (portable median / model median, > 1: the
    native nodes pay), ratio_q1, ratio_q3 (of the per-round paired ratios)}."""
    batch = run_batch(model, batch)
    t = time_models({"model": model, "portable": portable}, "portable", batch, threads, budget_s, MIN_ROUNDS,
                    native=True)["model"]
    return {"native_layers": sum(n.domain == DOMAIN for n in model.graph.node), "batch": batch, "threads": threads,
            "ratio": t["ratio"], "ratio_q1": t["ratio_q1"], "ratio_q3": t["ratio_q3"]}


def kept_s(row: dict) -> float:
    """The median time of the native form a row chose (its integer or its float tables)."""
    return row["fp32_tables_s"] if row["faster"] == FLOAT_TABLES else row["native_s"]


def _alone(node: gs.Node, model: onnx.ModelProto, batch: int, float_tables: bool = False) -> onnx.ModelProto:
    """A model of `node` alone, its input of batch `batch` (the node's constants copied); with
    `float_tables`, without its table_bits (float tables)."""
    inp = gs.Variable("x", np.float32, [batch, *node.inputs[0].shape[1:]])
    out = gs.Variable("y", np.float32, None)
    attrs = {k: v for k, v in node.attrs.items() if not (float_tables and k == "table_bits")}
    copy = gs.Node(node.op, node.name, attrs, [inp, *node.inputs[1:]], [out], domain=node.domain)
    return export_with_domain(gs.Graph(nodes=[copy], inputs=[inp], outputs=[out]), model, native=True)
