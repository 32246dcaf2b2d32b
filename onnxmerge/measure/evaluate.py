"""Accuracy of a merged model per task, and its fidelity to the originals.

Per task: top-1 accuracy of the task's first output on labelled data, and, when the originals are
given, their accuracy on the same data, the top-1 agreement (fraction of samples where the merged
model and the original pick the same class) and the largest absolute difference of the outputs.

A model fixed at one batch (its originals' batch dim could not be made symbolic: onnxmerge.model.upgrade)
runs in batches of that size, read off its inputs.

A merged model with separate inputs needs every input fed at every run: the other tasks' inputs get
zeros of the same batch size (they do not influence this task's output, by construction of every
method: tasks only share computation, never mix inputs).

Data is any object with `.x` (float32 array, NCHW), `.y` (int64 labels or None) and `.source` (where
it came from, for messages), such as `onnxmerge.data.Dataset`.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from onnxmerge.data import Dataset, check_fits
from onnxmerge.errors import MergeError
from onnxmerge.graph.ops import make_session
from onnxmerge.model.contract import MergedInfo, TaskInfo, logits_output
from onnxmerge.model.runtime import fixed_batch_of, input_dtype


def _check_fits(arg, ds, task: str) -> None:
    """`ds`: a Dataset, or a bare array of samples."""
    if isinstance(ds, np.ndarray):
        ds = Dataset(ds, None, "data", {})
    check_fits(ds, arg.shape, arg.type, where=f"task {task!r}", input_name=arg.name)


def _batches(session: ort.InferenceSession, output: str, x: np.ndarray, make_feeds, batch_size: int,
             on_batch: Callable[[int], None] | None) -> np.ndarray:
    """`output` on `x` in batches of `batch_size`, or of the model's fixed batch where it has one (a
    graph whose batch dim could not be made symbolic runs at no other size): the last batch is then
    filled up with copies of its first sample, whose rows are dropped."""
    fixed = fixed_batch_of(session)
    size = fixed or batch_size
    outs = []
    for start in range(0, len(x), size):
        chunk = x[start:start + size]
        n = len(chunk)
        if fixed and n < fixed:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], fixed - n, axis=0)])
        outs.append(session.run([output], make_feeds(chunk))[0][:n])
        if on_batch is not None:
            on_batch(n)
    return np.concatenate(outs) if outs else np.zeros((0,), np.float32)


def _task_input(session: ort.InferenceSession, info: TaskInfo):
    names = set(info.inputs.values())
    if len(names) != 1:
        raise MergeError(f"task {info.name!r} has {len(names)} inputs; evaluation supports one")
    (name,) = names
    for arg in session.get_inputs():
        if arg.name == name:
            return arg
    raise MergeError(f"task {info.name!r}: input {name!r} is not an input of the merged model")


def run_task(session: ort.InferenceSession, info: TaskInfo, x: np.ndarray, batch_size: int = 256,
             on_batch: Callable[[int], None] | None = None) -> np.ndarray:
    """The task's class scores (`logits_output`) on `x`, run in batches, with zeros fed to the other
    tasks' inputs."""
    arg = _task_input(session, info)
    _check_fits(arg, x, info.name)
    output = logits_output(info, {o.name: len(o.shape) for o in session.get_outputs()})[1]
    others = [a for a in session.get_inputs() if a.name != arg.name]
    for a in others:
        if any(not isinstance(d, int) for d in a.shape[1:]):
            raise MergeError(f"input {a.name!r} has symbolic dims besides the batch: {a.shape}")
    dtype = input_dtype(arg)

    def feeds(chunk):
        f = {arg.name: np.ascontiguousarray(chunk, dtype=dtype)}
        for a in others:
            f[a.name] = np.zeros((len(chunk), *a.shape[1:]), input_dtype(a))
        return f

    return _batches(session, output, x, feeds, batch_size, on_batch)


def run_original(session: ort.InferenceSession, x: np.ndarray, batch_size: int = 256,
                 on_batch: Callable[[int], None] | None = None, output: str | None = None) -> np.ndarray:
    """Output `output` (default: the first of rank 2) of a single-task model on `x`, run in batches."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise MergeError(f"original model has {len(inputs)} inputs; evaluation supports one")
    arg = inputs[0]
    _check_fits(arg, x, "original")
    dtype = input_dtype(arg)
    if output is None:
        output = next((o.name for o in session.get_outputs() if len(o.shape) == 2), session.get_outputs()[0].name)
    return _batches(session, output, x, lambda c: {arg.name: np.ascontiguousarray(c, dtype=dtype)},
                    batch_size, on_batch)


def _top1(logits: np.ndarray) -> np.ndarray:
    return logits.reshape(len(logits), -1).argmax(axis=1)


def evaluate(merged_model: onnx.ModelProto | str | os.PathLike, info: MergedInfo, data: dict,
             originals: dict | None = None, *, progress: bool = True, batch_size: int = 256,
             threads: int | None = None) -> dict[str, dict]:
    """Per task in `data` (keyed by task name): n, accuracy (merged; None without labels) and, when
    `originals` (task -> ModelProto or path) are given, original_accuracy, agreement (top-1
    agreement merged vs original) and max_abs_diff (largest |merged - original| output element).

    Every data set is checked against its task's input (merged, and original when given) before
    anything runs.
    """
    merged = make_session(merged_model, threads)
    tasks = {name: info.task(name) for name in data}  # unknown task names fail here
    orig_sessions = {}
    for name, ds in data.items():
        if len(ds.x) == 0:
            raise MergeError(f"{ds.source}: no samples (task {name!r})")
        _check_fits(_task_input(merged, tasks[name]), ds, name)
        if ds.y is not None and len(ds.y) != len(ds.x):
            raise MergeError(f"{ds.source}: {len(ds.y)} labels for {len(ds.x)} samples (task {name!r})")
        if originals is not None:
            if name not in originals:
                raise MergeError(f"task {name!r}: no original model given to compare with")
            orig_sessions[name] = make_session(originals[name], threads)
            _check_fits(orig_sessions[name].get_inputs()[0], ds, name)
    total = sum(len(ds.x) for ds in data.values()) * (2 if originals is not None else 1)
    results = {}
    with tqdm(total=total, unit="sample", desc="evaluate", disable=not progress, leave=False, delay=1.0) as bar:
        for name, ds in data.items():
            out = run_task(merged, tasks[name], ds.x, batch_size, bar.update)
            pred = _top1(out)
            r = {"source": ds.source, "n": int(len(ds.x)),
                 "accuracy": None if ds.y is None else float(np.mean(pred == ds.y))}
            if originals is not None:
                orig_output = logits_output(tasks[name], {o.name: len(o.shape) for o in merged.get_outputs()})[0]
                ref = run_original(orig_sessions[name], ds.x, batch_size, bar.update, output=orig_output)
                if ref.shape != out.shape:
                    raise MergeError(f"task {name!r}: merged output shape {out.shape} differs from "
                                     f"the original's {ref.shape}")
                ref_pred = _top1(ref)
                r["original_accuracy"] = None if ds.y is None else float(np.mean(ref_pred == ds.y))
                r["agreement"] = float(np.mean(pred == ref_pred))
                r["max_abs_diff"] = float(np.max(np.abs(out - ref))) if out.size else 0.0
            results[name] = r
    return results
