"""Checks between passes and of the final model.

`check_invariants`: unique node and tensor names, topological order, onnx.checker.
`check_exact`: each task's outputs still equal its original model's outputs to float rounding, on
seeded random inputs, in onnxruntime with graph optimisations off (onnxsim's check).
`compare`: the same comparison as figures, for the report and the model's metadata.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxmerge.errors import MergeError
from onnxmerge.graphs import random_feeds, session, to_model
from onnxmerge.state import MergeState, Task

# Exact rewrites (folding BatchNorm, packing, degenerate settings of the methods) reorder float
# arithmetic; they must agree to this, relative to the output's magnitude.
EXACT_TOL = 1e-5


def task_model(task: Task, state: MergeState) -> onnx.ModelProto:
    return to_model(task.graph, state.opset, state.ir_version)


def combined_model(state: MergeState) -> onnx.ModelProto:
    return to_model(state.graph, state.opset, state.ir_version)


def check_invariants(state: MergeState) -> None:
    graphs = [("merged graph", state.graph)] if state.combined else [(t.name, t.graph) for t in state.tasks]
    for where, graph in graphs:
        seen_nodes = set()
        for node in graph.nodes:
            if node.name and node.name in seen_nodes:
                raise MergeError(f"{where}: duplicate node name {node.name!r}")
            seen_nodes.add(node.name)
        try:
            tensors = graph.tensors(check_duplicates=True)
        except Exception as e:  # graphsurgeon raises its own exception type for duplicates
            raise MergeError(f"{where}: duplicate tensor names ({str(e).splitlines()[0]})") from None
        available = {t.name for t in graph.inputs} | {n for n, t in tensors.items() if isinstance(t, gs.Constant)}
        for node in graph.nodes:
            for t in node.inputs:
                if t.name and t.name not in available:
                    raise MergeError(f"{where}: node {node.name!r} reads {t.name!r} before it is produced (not in topological order)")
            available.update(t.name for t in node.outputs)
        model = to_model(graph.copy(), state.opset, state.ir_version)
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as e:
            raise MergeError(f"{where}: onnx.checker: {str(e).splitlines()[0]}") from None


def compare(state: MergeState, batch: int = 4, seed: int = 0) -> dict[str, float]:
    """Max abs difference, relative to the output magnitude, between each task now and its original.

    One session at a time (the merged model first, then each original), so that checking big
    models holds one of them in memory, not all."""
    out = {}
    if state.combined:
        merged = combined_model(state)
        merged_sess = session(merged)
        feeds_all = random_feeds(merged_sess, batch, seed)
        results = dict(zip([o.name for o in merged.graph.output], merged_sess.run(None, feeds_all)))
        del merged, merged_sess
    for task in state.tasks:
        ref_sess = session(task.original)
        if state.combined:
            feeds = {orig: feeds_all[merged_name] for orig, merged_name in task.input_map.items()}
            got = [results[task.output_map[o.name]] for o in task.original.graph.output]
        else:
            feeds = random_feeds(ref_sess, batch, seed)
            got = session(task_model(task, state)).run([o.name for o in task.original.graph.output], feeds)
        ref = ref_sess.run(None, feeds)
        del ref_sess
        out[task.name] = max(_rel_diff(g, r) for g, r in zip(got, ref))
    return out


def check_exact(state: MergeState, diffs: dict[str, float] | None = None) -> None:
    """Raise unless every task reproduces its original (`diffs`: an earlier `compare(state)`)."""
    for task, diff in (compare(state) if diffs is None else diffs).items():
        if not diff <= EXACT_TOL:
            raise MergeError(f"task {task} no longer reproduces its original model (relative difference {diff:.3g} > {EXACT_TOL:g})")


def dump(state: MergeState, folder: Path, stem: str) -> None:
    if state.combined:
        onnx.save(combined_model(state), str(folder / f"{stem}.onnx"))
    else:
        for task in state.tasks:
            onnx.save(task_model(task, state), str(folder / f"{stem}_{task.name}.onnx"))


def _rel_diff(got: np.ndarray, ref: np.ndarray) -> float:
    if got.shape != ref.shape:
        return float("inf")
    scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
    return float(np.max(np.abs(got.astype(np.float64) - ref)) / scale) if ref.size else 0.0


def check_native(native: onnx.ModelProto, portable: onnx.ModelProto, batch: int = 2, seed: int = 0) -> float:
    """The native form (EConv / EFC nodes, run by their numpy reference, onnxmerge.lookup_ops) against
    the portable form in onnxruntime on seeded random inputs: the relative difference, which must be
    float rounding."""
    from onnxmerge.lookup_ops import run_reference

    sess = session(portable)
    feeds = random_feeds(sess, batch, seed)
    want = dict(zip([o.name for o in portable.graph.output], sess.run(None, feeds)))
    got = run_reference(native, feeds)
    diff = max(_rel_diff(got[name], want[name]) for name in want)
    if not diff <= EXACT_TOL:
        raise MergeError(f"the native form differs from the portable form by {diff:.3g} (> {EXACT_TOL:g}): this is a bug")
    return diff
