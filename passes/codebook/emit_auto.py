"""`--emit auto`: each layer's native node timed against the dense layer it replaces, on this machine.

Counting operations (emit_native.to_native) says when a lookup cannot win; whether it does win
depends on the CPU (cache sizes, vector width, the dense kernels onnxruntime has for it), the batch
and the thread count. So every EConv / EFC node the operation count lets through is timed both ways
at the deployment's batch size and thread count (`--target-batch`, `--target-threads`): the node
alone in a session with onnxmerge's kernels, and the same node in the portable form, whose
codebook-gather subgraph onnxruntime folds into the dense weight at session creation, so that it
times the dense Conv / Gemm. The two are run alternately (each round in the other order) for a
fixed budget per layer, and the native node is kept only where its median time is below the dense
one's. The report lists both medians, their quartiles and the choice per layer.
"""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmerge.graph.ops import export_with_domain, shaped_graph, to_portable
from onnxmerge.kernels import DOMAIN
from onnxmerge.model.runtime import session

BUDGET_S = 0.3  # per layer, both forms together
MIN_ROUNDS = 5


def time_layers(native: onnx.ModelProto, batch: int = 1, threads: int = 1, budget_s: float = BUDGET_S,
                seed: int = 0) -> list[dict]:
    """Per native node of `native` whose input size is known: {layer, op, batch, threads, rounds,
    native_s, dense_s (medians), their quartiles, faster: "native" or "dense"}."""
    graph = shaped_graph(native)
    rng = np.random.default_rng(seed)
    rows = []
    for node in graph.nodes:
        if node.domain != DOMAIN:
            continue
        shape = node.inputs[0].shape
        if not shape or not all(isinstance(d, int) for d in shape[1:]):
            continue  # an input of unknown size: nothing to time it on (the operation count decided)
        alone = _alone(node, native, batch)
        x = rng.standard_normal([batch, *shape[1:]]).astype(np.float32)
        sessions = {"native": session(alone, threads=threads, optimize=True, native=True),
                    "dense": session(to_portable(alone), threads=threads, optimize=True)}
        times = _alternate(sessions, {alone.graph.input[0].name: x}, budget_s)
        row = {"layer": node.name, "op": node.op, "batch": batch, "threads": threads, "rounds": len(times["native"])}
        for form, t in times.items():
            q1, med, q3 = np.percentile(t, [25, 50, 75])
            row[f"{form}_s"], row[f"{form}_quartiles_s"] = float(med), [float(q1), float(q3)]
        row["faster"] = "native" if row["native_s"] < row["dense_s"] else "dense"
        rows.append(row)
    return rows


def _alone(node: gs.Node, model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """A model of `node` alone, its input of batch `batch` (the node's constants copied)."""
    inp = gs.Variable("x", np.float32, [batch, *node.inputs[0].shape[1:]])
    out = gs.Variable("y", np.float32, None)
    copy = gs.Node(node.op, node.name, dict(node.attrs), [inp, *node.inputs[1:]], [out], domain=node.domain)
    return export_with_domain(gs.Graph(nodes=[copy], inputs=[inp], outputs=[out]), model, native=True)


def _alternate(sessions: dict, feeds: dict, budget_s: float) -> dict[str, list[float]]:
    """Seconds per run of each session, run alternately (the order swapped every round) after one
    warm-up run each, until `budget_s` is spent and at least MIN_ROUNDS rounds were run."""
    for s in sessions.values():
        s.run(None, feeds)
    times = {k: [] for k in sessions}
    order, start = list(sessions), time.perf_counter()
    while len(times[order[0]]) < MIN_ROUNDS or time.perf_counter() - start < budget_s:
        for k in order:
            t0 = time.perf_counter()
            sessions[k].run(None, feeds)
            times[k].append(time.perf_counter() - t0)
        order.reverse()
    return times
