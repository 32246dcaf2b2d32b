"""Checks between passes and of the final model.

`check_invariants`: unique node and tensor names, topological order, onnx.checker.
`check_exact`: each task's outputs still equal its original model's outputs to float rounding, on
seeded random inputs, in onnxruntime with graph optimisations off (onnxsim's check).
`compare`: the same comparison as figures, for the report and the model's metadata.
`validate_output`: the final model, as it is about to be written, runs and gives every task outputs
of its original's shapes, all finite.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnxmerge.errors import MergeError
from onnxmerge.graph.convert import light_model, to_model
from onnxmerge.graph.ops import float_tables, make_session, run_reference
from onnxmerge.model.runtime import random_feeds, run_batch, session
from onnxmerge.model.saving import save_atomic
from onnxmerge.pipeline.state import MergeState, Task

# Exact rewrites (folding BatchNorm, packing, degenerate settings of the methods) reorder float
# arithmetic; they must agree to this, relative to the output's magnitude.
EXACT_TOL = 1e-5


def task_model(task: Task, state: MergeState) -> onnx.ModelProto:
    """A task's own graph (as normalised so far) as a model."""
    return to_model(task.graph, state.opset, state.ir_version)


def combined_model(state: MergeState, release: bool = False) -> onnx.ModelProto:
    """The merged graph as a ModelProto; `release`: the graph's big constants (and the task
    graphs' constants that share their arrays) then read their values from the model's tensors,
    so that the weights are held once, not twice (graphs.to_model)."""
    if not release:
        return to_model(state.graph, state.opset, state.ir_version)
    return to_model(state.graph, state.opset, state.ir_version,
                    release=[t.graph for t in state.tasks])


def merged_session(state: MergeState):
    """A session of the merged graph as `combined_model` exports it, computing on the graph's own
    arrays in place (graphs.session): no exported ModelProto, and no copy of the weights."""
    light, weights = light_model(state.graph, state.opset, state.ir_version)
    return session(light, weights={name: values for name, (values, _) in weights.items()})


def check_invariants(state: MergeState) -> None:
    """Unique node and tensor names, topological order and onnx.checker on the graph(s) of `state`."""
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


def compare(state: MergeState, batch: int = 4, seed: int = 0,
            merged: onnx.ModelProto | None = None, also: dict | None = None) -> dict[str, float]:
    """Max abs difference, relative to the output magnitude, between each task now and its original.

    `merged`: the combined model to compare, if already exported (the very model that is saved),
    else the merged graph is run as it would export (`merged_session`: on its own arrays).
    One session at a time (the merged model first, then each original), so that checking big
    models holds one of them in memory, not all.

    `also`: {"batch": b, "seed": s} runs the merged model a second time, on `random_feeds` at that
    batch and seed, and stores its outputs by name under "outputs" (validate_output's run, without
    a second session of the same model).

    A merge whose models keep a fixed batch (their batch dim could not be made symbolic) runs at
    that batch instead of `batch` and `also`'s (runtime.run_batch: read off the model's inputs)."""
    out = {}
    if state.combined:
        merged_sess = session(merged) if merged is not None else merged_session(state)
        names = [o.name for o in merged_sess.get_outputs()]
        feeds_all = random_feeds(merged_sess, run_batch(merged_sess, batch), seed)
        results = dict(zip(names, merged_sess.run(None, feeds_all)))
        if also is not None:
            also["batch"] = run_batch(merged_sess, also["batch"])  # validate_output reads the same off the model
            extra = random_feeds(merged_sess, also["batch"], also["seed"])
            also["outputs"] = dict(zip(names, merged_sess.run(None, extra)))
        del merged, merged_sess
    for task in state.tasks:
        ref_sess = session(task.original)
        if state.combined:
            feeds = {orig: feeds_all[merged_name] for orig, merged_name in task.input_map.items()}
            got = [results[task.output_map[o.name]] for o in task.original.graph.output]
        else:
            feeds = random_feeds(ref_sess, run_batch(ref_sess, batch), seed)
            got = session(task_model(task, state)).run([o.name for o in task.original.graph.output], feeds)
        ref = ref_sess.run(None, feeds)
        del ref_sess
        _check_original_finite(task, ref)
        out[task.name] = max(_rel_diff(g, r) for g, r in zip(got, ref))
    return out


def _check_original_finite(task: Task, outputs: list[np.ndarray]) -> None:
    """An input model whose own outputs overflow on the seeded inputs (finite but huge weights: a
    corrupt file) leaves nothing to compare the merged model with: its file is what is wrong."""
    for o, value in zip(task.original.graph.output, outputs):
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            raise MergeError(f"{task.path}: the model's own output {o.name} is NaN or infinite on seeded random "
                             "inputs (weights too large for float32?); it cannot be merged and checked")


def check_exact(state: MergeState, diffs: dict[str, float] | None = None) -> None:
    """Raise unless every task reproduces its original (`diffs`: an earlier `compare(state)`)."""
    for task, diff in (compare(state) if diffs is None else diffs).items():
        if not diff <= EXACT_TOL:
            raise MergeError(f"task {task} no longer reproduces its original model (relative difference {diff:.3g} > {EXACT_TOL:g})")


def validate_output(model: onnx.ModelProto, info, originals: dict, where: str = "merged model",
                    batch: int = 2, seed: int = 0, results: dict | None = None) -> dict:
    """Run the final merged model once, as deployed, on seeded random inputs at `batch`, and check
    each task's outputs: present, of the original output's shape (its symbolic batch dim = `batch`)
    and finite. A MergeError naming `where`, the task and the output otherwise, so that a broken
    model (NaN weights from calibration, a pass that dropped an output) is never written.

    `info`: the model's MergedInfo (task -> output name map); `originals`: task name -> original
    ModelProto or path (only its output declarations are read). `results`: the model's outputs by
    name on `random_feeds` at `batch` and `seed`, where they were already computed (`compare`'s
    `also`, on this very model): checked without running the model again. A model fixed at one
    batch (its originals' batch dim could not be made symbolic) is run and checked at that batch
    instead of `batch`. Returns the figure for the model's metadata."""
    batch = run_batch(model, batch)
    if results is None:
        try:
            sess = make_session(model, threads=1)  # native models with the kernels, else their portable form
            feeds = random_feeds(sess, batch, seed)
            results = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
        except MergeError:
            raise
        except Exception as e:  # onnxruntime's own exception types: the model does not load or run
            text = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise MergeError(f"{where}: not written: the merged model does not run in onnxruntime ({text})") from None
        del sess
    for task in info.tasks:
        declared = _declared_outputs(originals[task.name])
        for orig, merged in task.outputs.items():
            problem = _output_problem(results.get(merged), declared.get(orig), batch)
            if problem:
                raise MergeError(f"{where}: not written: task {task.name}: output {merged} {problem}")
    return {"batch": batch, "seed": seed, "passed": True,
            "checked": "every task output runs, has its original's shape and is finite on seeded random inputs"}


def _declared_outputs(original) -> dict[str, tuple]:
    """Output name -> declared dims (int, or None where symbolic or unknown) of an original model."""
    if not isinstance(original, onnx.ModelProto):  # a path: the declarations, not the weights
        original = onnx.load(str(original), load_external_data=False)
    out = {}
    for o in original.graph.output:
        shape = o.type.tensor_type.shape
        out[o.name] = (tuple(d.dim_value if d.HasField("dim_value") else None for d in shape.dim)
                       if o.type.tensor_type.HasField("shape") else None)
    return out


def _output_problem(value, dims: tuple | None, batch: int) -> str | None:
    """What is wrong with one output value against its original's declared dims, or None."""
    if value is None:
        return "is missing"
    if dims is not None:
        want = tuple(batch if k == 0 and d is None else d for k, d in enumerate(dims))
        fits = len(want) == value.ndim and all(d is None or d == v for d, v in zip(want, value.shape))
        if not fits:
            shown = "(" + ",".join("?" if d is None else str(d) for d in want) + ")"
            return f"has shape {tuple(value.shape)}, but the original's is {shown} at batch {batch}"
    if np.issubdtype(value.dtype, np.floating):
        bad = int(value.size - np.count_nonzero(np.isfinite(value)))
        if bad:
            return f"has {bad} NaN or infinite value(s) of {value.size} on seeded random inputs"
    return None


def dump(state: MergeState, folder: Path, stem: str) -> None:
    """--dump-dir: the model(s) after a pass, each written atomically (no partial file on Ctrl-C)."""
    if state.combined:
        save_atomic(combined_model(state), folder / f"{stem}.onnx")
    else:
        for task in state.tasks:
            save_atomic(task_model(task, state), folder / f"{stem}_{task.name}.onnx")


def _rel_diff(got: np.ndarray, ref: np.ndarray) -> float:
    if got.shape != ref.shape:
        return float("inf")
    if not ref.size:
        return 0.0
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf: the NaN is the answer, not a warning
        scale = max(1.0, float(np.max(np.abs(ref))))
        return float(np.max(np.abs(got.astype(np.float64) - ref)) / scale)


def output_difference(a: onnx.ModelProto | ort.InferenceSession, b: onnx.ModelProto, batch: int = 2,
                      seed: int = 0) -> float:
    """The largest relative difference between two models' outputs (b's as the reference) on the same
    seeded random inputs, at a fixed batch where the models have one; native nodes run by the
    kernels, or in their portable form (make_session). `a` may be a session already made (of a file
    onnx cannot read, an ORT-format model)."""
    sa = a if isinstance(a, ort.InferenceSession) else make_session(a)
    sb = make_session(b)
    feeds = random_feeds(sb, run_batch(sb, batch), seed)
    return max(_rel_diff(got, ref) for got, ref in zip(sa.run(None, feeds), sb.run(None, feeds)))


def check_native(native: onnx.ModelProto, portable: onnx.ModelProto, batch: int = 2, seed: int = 0) -> float:
    """The native form (EConv / EFC nodes, run by their numpy reference, onnxmerge.graph.ops), its
    tables in float, against the portable form in onnxruntime on seeded random inputs: the relative
    difference, which must be float rounding."""
    diff = native_difference(float_tables(native), portable, batch, seed)
    if not diff <= EXACT_TOL:
        raise MergeError(f"the native form differs from the portable form by {diff:.3g} (> {EXACT_TOL:g}): this is a bug")
    return diff


def native_difference(native: onnx.ModelProto, portable: onnx.ModelProto, batch: int = 2, seed: int = 0) -> float:
    """The largest relative difference of the native form as written (integer tables rounded; the
    numpy reference) from the portable form in onnxruntime, on seeded random inputs."""
    sess = session(portable)
    feeds = random_feeds(sess, run_batch(sess, batch), seed)
    want = dict(zip([o.name for o in portable.graph.output], sess.run(None, feeds)))
    got = run_reference(native, feeds)
    return max(_rel_diff(got[name], want[name]) for name in want)
