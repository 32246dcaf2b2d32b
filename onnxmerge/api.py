"""The Python API: `merge` runs a method's declared pipeline (DESIGN.md, "Flow of one merge").

    load + check + reconcile versions -> the method's passes (passes/<method>/__init__.py: normalise,
    align, its rewrites, combine, cleanup) -> compare with the originals -> calibrate (with data) ->
    the method's after-calibration passes -> validate -> save

The API names no method: what a method needs (a merged model as input, layers to rewrite, a warm
start) it declares in its `Method` entry; what its passes need from calibration and measurement
reaches them through `MergeState.services`.

>>> from onnxmerge.api import merge
>>> result = merge(["a.onnx", "b.onnx"], "merged.onnx", method="pack")
>>> result.info.tasks[0].outputs          # {'logits': 'a/logits'}
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_graphsurgeon as gs

import onnxmerge
from onnxmerge.calibration.calibrate import (
    CalibrationConfig,
    Checkpoint,
    calibrate,
    record_calibration,
)
from onnxmerge.data import check_fits, check_labels
from onnxmerge.errors import MergeError, UsageError, first_line
from onnxmerge.graph.alignment import parse_pairs
from onnxmerge.graph.convert import import_graph
from onnxmerge.measure.evaluate import run_task
from onnxmerge.model import downgrade
from onnxmerge.model.contract import MergedInfo, TaskInfo, logits_output, write_metadata
from onnxmerge.model.loading import (
    MergedInput,
    file_sha256,
    find_merged_input,
    load_model,
    reconcile_batch,
    reconcile_versions,
)
from onnxmerge.model.runtime import input_signature
from onnxmerge.model.saving import check_model, check_output_path, save_atomic
from onnxmerge.passes import BASELINE, get_method
from onnxmerge.passes.common.fuse_branches import FuseBranchesPass
from onnxmerge.pipeline import checks
from onnxmerge.pipeline.manager import FUSE_MODES, PassManager
from onnxmerge.pipeline.method import split_pipeline
from onnxmerge.pipeline.state import MergeState, Services, Task

# validate_output's run of the merged model (the figures in its metadata)
VALIDATE_BATCH, VALIDATE_SEED = 2, 0

TASK_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")


@dataclass
class MergeResult:
    model: onnx.ModelProto
    info: MergedInfo
    state: MergeState
    path: Path | None = None


def task_names(paths: list[Path], names: list[str] | None) -> list[str]:
    """Tasks are named after the input files (their stems, made unique) unless names are given."""
    if names is None:
        names = []
        for p in paths:
            stem = re.sub(r"[^A-Za-z0-9_.-]", "_", p.stem) or "task"
            stem = stem if re.match(r"[A-Za-z_]", stem) else f"t{stem}"
            name, k = stem, 2
            while name in names:
                name, k = f"{stem}_{k}", k + 1
            names.append(name)
    if len(names) != len(paths):
        raise UsageError(f"--names: {len(names)} name(s) for {len(paths)} model(s)")
    for n in names:
        if not TASK_NAME.match(n):
            raise UsageError(f"--names: {n!r} is not a valid task name (letters, digits, _ . -; not starting with a digit)")
    if len(set(names)) != len(names):
        raise UsageError(f"--names: task names must differ ({', '.join(names)})")
    return names


def load_tasks(inputs: list[str | Path], names: list[str] | None = None, opset: int | None = None,
               extends: str | None = None) -> MergeState:
    """Load, check and version-reconcile the input models into a fresh MergeState.

    With `extends` (the name of a method that adds tasks to a model it merged), such a merged model
    given first stands for its tasks (loading.find_merged_input): they come first under their own
    names, their originals are its sub-models, and their recorded sources and sha256 are carried over
    into the new model's metadata."""
    paths = [Path(p) for p in inputs]
    base = find_merged_input(paths, extends) if extends else None
    own = paths[1:] if base else paths
    names = task_names(own, names) if base is None else _added_names(base, own, names)
    notes: dict[str, list[str]] = {str(p): [] for p in own}
    models = {**(base.originals() if base else {}), **{str(p): load_model(p, notes[str(p)]) for p in own}}
    models, opset, ir_version = reconcile_versions(models, opset)
    # a model whose batch could not be made symbolic runs at its fixed batch, and so does the merge
    batch_notes = reconcile_batch(models)
    # (name, its model's key, path, sha256), a merged model's tasks first
    entries = [(t.name, f"{base.path} (task {t.name})", Path(t.source), t.sha256) for t in base.info.tasks] if base else []
    entries += [(n, str(p), p, file_sha256(p)) for n, p in zip(names, own)]
    # each task's graph has constants of its own (graphs.import_graph), never the original's tensors
    tasks = [Task(name=n, original=models[key], graph=_named(import_graph(models[key])), path=p, sha256=sha,
                  modernised=bool(notes.get(key))) for n, key, p, sha in entries]
    return MergeState(tasks=tasks, opset=opset, ir_version=ir_version, base=base,
                      notes=[n for key in notes for n in notes[key]] + batch_notes)


def _added_names(base: MergedInput, own: list[Path], names: list[str] | None) -> list[str]:
    """The task names of the models after a merged model: `names` gives theirs (or every task's, the
    merged model's under their own names), else their file stems; none may be a merged task's."""
    if names is not None and len(names) == len(base.names) + len(own):
        if names[:len(base.names)] != base.names:
            raise UsageError(f"--names: the tasks of {base.path} keep their names ({', '.join(base.names)})")
        names = names[len(base.names):]
    names = task_names(own, names)
    for n, p in zip(names, own):
        if n in base.names:
            raise UsageError(f"{p}: task name {n!r} is already a task of {base.path}; give the added model "
                             "another name with --names")
    return names


def check_task_data(state: MergeState, data: dict, flag: str = "--data") -> None:
    """Refuse data for unknown tasks, or whose samples do not fit the task's input."""
    for name, ds in data.items():
        if name not in [t.name for t in state.tasks]:
            raise UsageError(f"{flag} {name}=...: no task named {name!r} (tasks: {', '.join(t.name for t in state.tasks)})")
        inputs = state.task(name).original.graph.input
        if len(inputs) != 1:
            raise MergeError(f"task {name!r} has {len(inputs)} inputs; data for one input only is supported")
        elem, dims = input_signature(inputs[0])
        check_fits(ds, dims, elem, where=f"task {name!r}", input_name=inputs[0].name)
        output, classes = class_output(list(state.task(name).original.graph.output))
        check_labels(ds, classes, where=f"task {name!r}", output_name=output)


def check_merged_data(model: onnx.ModelProto, info: MergedInfo, data: dict, flag: str = "--data") -> None:
    """`check_task_data` for a merged model (the calibrate and eval commands): each task's data must
    fit the task's input in `model`, and its labels the task's class-score output."""
    inputs = {i.name: i for i in model.graph.input}
    outputs = {o.name: o for o in model.graph.output}
    for name, ds in data.items():
        if name not in [t.name for t in info.tasks]:
            raise UsageError(f"{flag} {name}=...: no task named {name!r} (tasks: {', '.join(t.name for t in info.tasks)})")
        task = info.task(name)
        if len(task.inputs) != 1:
            raise MergeError(f"task {name!r} has {len(task.inputs)} inputs; data for one input only is supported")
        merged_input = next(iter(task.inputs.values()))
        elem, dims = input_signature(inputs[merged_input])
        check_fits(ds, dims, elem, where=f"task {name!r}", input_name=merged_input)
        ranks = {n: len(o.type.tensor_type.shape.dim) for n, o in outputs.items()}
        if ds.y is not None and any(r == 2 for n, r in ranks.items() if n in task.outputs.values()):
            _, merged_output = logits_output(task, ranks)
            check_labels(ds, class_output([outputs[merged_output]])[1], where=f"task {name!r}",
                         output_name=merged_output)


def class_output(outputs: list[onnx.ValueInfoProto]) -> tuple[str, int | None]:
    """(name, number of classes) of the class-score output among `outputs`: the first of rank 2
    (batch, classes), as calibration and evaluation pick it; the count is None where the dim is not
    fixed, and the name "" where no output has rank 2 (labels cannot be checked then)."""
    for o in outputs:
        dims = o.type.tensor_type.shape.dim
        if len(dims) == 2:
            return o.name, dims[1].dim_value if dims[1].HasField("dim_value") else None
    return "", None


# the operators that carry the weights the sharing methods rewrite (onnxmerge.graph.layers)
LAYER_OPS = frozenset({"Conv", "Gemm", "MatMul"})


def check_has_layers(state: MergeState, method: str) -> None:
    """Refuse a model with no weight-bearing layer (Conv, Gemm, MatMul) for a method that rewrites
    layers (Method.rewrites_layers): such a model gives it nothing to work on and the merge would be
    meaningless (or fail deep inside a pass). The baseline, which only places the graphs side by
    side, merges such a model as it is."""
    for task in state.tasks:
        if not any(node.op in LAYER_OPS for node in task.graph.nodes):
            raise MergeError(f"{task.path}: no weight-bearing layer (Conv, Gemm or MatMul): nothing for method "
                             f"{method} to share; --method {BASELINE} merges it as it is")


def check_writable(output: str | Path) -> None:
    """Refuse an output whose folder the process cannot write into, before any work (a read-only
    folder would otherwise fail only at the very end, when the merged model is saved)."""
    folder = Path(output).parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{output}: cannot write into the output folder {folder} (permission denied)")


def _save(model: onnx.ModelProto, output: str | Path) -> Path:
    """save_atomic, with a full disk or a folder that became unwritable as one line (the temporary
    file is gone by then: save_atomic removes it)."""
    try:
        return save_atomic(model, output)
    except OSError as e:
        raise MergeError(f"{output}: cannot write the merged model ({e.strerror or first_line(e)})") from None


def _merged_info(state: MergeState, fidelity: dict[str, float]) -> MergedInfo:
    """The metadata of the merged model of `state` (onnxmerge.model.contract), with its measured
    fidelity and what the method reported."""
    return MergedInfo(
        version=onnxmerge.__version__,
        method=state.method,
        params=state.params,
        tasks=[TaskInfo(t.name, str(t.path.resolve()), t.sha256, t.input_map, t.output_map, t.layer_map,
                        t.channel_order) for t in state.tasks],
        fidelity={"max_rel_diff_random_inputs": fidelity, "alignment": [a.to_dict() for a in state.alignments],
                  **state.figures, **({"notes": state.notes} if state.notes else {})},
        layout=state.layout,
    )


def _named(graph: gs.Graph) -> gs.Graph:
    """Give unnamed nodes deterministic, unique names: layers, errors and passes refer to nodes by name."""
    taken = {n.name for n in graph.nodes if n.name}
    for k, node in enumerate(graph.nodes):
        if not node.name:
            name, j = f"{node.op}_{k}", 1
            while name in taken:
                name, j = f"{node.op}_{k}_{j}", j + 1
            node.name = name
            taken.add(name)
    return graph


def merge(
    inputs: list[str | Path],
    output: str | Path | None = None,
    *,
    method: str = "auto",
    names: list[str] | None = None,
    separate_inputs: bool = False,
    align: str | list[tuple[int, int]] | None = None,
    opset: int | None = None,
    verify_passes: bool = False,
    dump_dir: str | Path | None = None,
    progress: bool = False,
    params: dict[str, Any] | None = None,
    data: dict | None = None,
    calib: dict | None = None,
    calibration: CalibrationConfig | None = None,
    validation: dict | None = None,
    warm_start: onnx.ModelProto | None = None,
    checkpoint: Checkpoint | None = None,
    portable_fallback: bool = False,
    calibrate_last: bool = True,
    target_opset: int | None = None,
    fuse_branches: str = "on",
) -> MergeResult:
    """Merge the models at `inputs` with `method` and (if `output` is given) save the result atomically.

    `data` (task name -> onnxmerge.data.Dataset) is checked against the tasks' inputs before any pass
    runs, so that a report or calibration does not fail after the work is done. With `calib` (task
    name -> Dataset) the merged model is calibrated against the originals as the last step
    (onnxmerge.calibration.calibrate), with `calibration`'s settings. `validation` (task name -> labelled
    Dataset) is held-out data for choices made during the merge (mtz's --tolerance; without it,
    samples of `calib` are held out). `warm_start`, an earlier merged model of the
    same tasks, gives the starting weights (progressive zippering: onnxmerge.sweep; a composition
    started from its first method's calibrated model: onnxmerge.search). `checkpoint`
    (onnxmerge.calibration.calibrate.Checkpoint) makes the calibration save its state and resume from it; the
    file is removed once the merged model is saved. `portable_fallback`: a native form that this
    machine cannot run (kernels not built) is written in its portable form, with a warning in
    `result.state.warnings` (the command line's choice). `calibrate_last=False`: `calib` serves only
    the passes that read data (mtz's Hessians, zipper's activation matching) and the caller
    calibrates, if at all (the budgeted search measures a candidate before calibrating it).
    `target_opset`: the merged model taken down to that opset for an older runtime and checked
    against itself as merged (onnxmerge.model.downgrade; `fidelity.target_opset`).
    `fuse_branches` (auto, on, off): the last rewrite, the tasks' parallel layers of one shape run as
    one grouped layer (passes/common/fuse_branches.py; auto: where the whole model runs faster so);
    not with `calibrate_last=False` and `calib`, whose caller calibrates the model and fuses it after.
    """
    if fuse_branches not in FUSE_MODES:
        raise UsageError(f"--fuse-branches {fuse_branches}: choose from {', '.join(FUSE_MODES)}")
    chosen = get_method(method)
    if len(inputs) < (1 if chosen.single else 2):
        raise UsageError(f"give at least {'one model' if chosen.single else 'two models'} to merge")
    if output is not None:
        check_output_path(output, inputs)
        check_writable(output)
    if dump_dir is not None and Path(dump_dir).exists() and not Path(dump_dir).is_dir():
        raise UsageError(f"--dump-dir {dump_dir}: is a file, not a folder")
    if warm_start is not None and not chosen.warm:
        raise UsageError(f"method {chosen.name} cannot start from an earlier merged model (warm_start)")
    method_params = chosen.parameters(params or {})
    before, after = split_pipeline(chosen.pipeline(method_params))

    # load -> the method's passes -> compare -> calibrate -> its after-calibration passes -> validate -> save
    state = load_tasks(inputs, names, opset, chosen.name if chosen.extends_merged else None)
    check_task_data(state, data or {})
    check_task_data(state, calib or {}, flag="--calib")
    check_task_data(state, validation or {}, flag="--validation")
    if chosen.rewrites_layers:
        check_has_layers(state, chosen.name)
    state.method, state.params, state.progress = chosen.name, dict(method_params), progress
    state.align = parse_pairs(align) if isinstance(align, str) else align
    state.separate_inputs, state.warm_start, state.portable_fallback = separate_inputs, warm_start, portable_fallback
    state.calib, state.calibration, state.validation = dict(calib or {}), calibration, dict(validation or {})
    state.services = Services(calibrate=calibrate, calibration_config=CalibrationConfig, run_task=run_task)
    state = PassManager(before, verify=verify_passes, dump_dir=dump_dir, progress=progress).run(state)

    # the model compared with the originals is the one written below (unless calibration or the
    # native form replace it: they are checked by validate_output, and check_native, instead): the
    # merged graph, run on its own arrays, then exported with the arrays handed over to the model
    # (the weights held once); the same session's run at validate_output's batch and seed serves
    # its check of that model
    checked_run = {"batch": VALIDATE_BATCH, "seed": VALIDATE_SEED}
    fidelity = checks.compare(state, also=checked_run)
    model = compared = checks.combined_model(state, release=True)
    if chosen.exact:
        try:
            checks.check_exact(state, fidelity)
        except MergeError as e:
            raise MergeError(f"method {chosen.name} is exact, but {e}: this is a bug") from None
    info = _merged_info(state, fidelity)
    if calib and calibrate_last and not state.calibrated:
        calibrated = calibrate(model, info, {t.name: t.original for t in state.tasks}, calib, calibration,
                               progress=progress, checkpoint=checkpoint)
        model = calibrated.model
        record_calibration(info, calibration or CalibrationConfig(), calibrated)
    # the method's after-calibration passes rewrite the exported model (each checks its own result:
    # the native form against the portable one)
    state.model, state.info = model, info
    # the per-task tensors that calibration's per-layer loss reads are gone once fused: fused last
    fuse = [FuseBranchesPass(fuse_branches)] if calibrate_last or not calib else []
    state = PassManager([*after, *fuse], progress=progress).run(state)
    model = state.model
    if target_opset is not None:
        model = for_runtime(model, info, target_opset, str(output or "merged model"))
    # the last check before writing: the model as saved (metadata aside) runs and every task's
    # outputs have their original's shape and are finite
    info.fidelity["output_check"] = checks.validate_output(
        model, info, {t.name: t.original for t in state.tasks}, where=str(output or "merged model"),
        batch=VALIDATE_BATCH, seed=VALIDATE_SEED, results=checked_run["outputs"] if model is compared else None)
    write_metadata(model, info)
    model.producer_name, model.producer_version = "onnxmerge", onnxmerge.__version__
    check_model(model)  # onnx.checker; a big model without serialising its weights
    path = _save(model, output) if output is not None else None
    if checkpoint is not None:
        checkpoint.remove()  # only now: a kill before the model is saved leaves it to resume from
    return MergeResult(model, info, state, path)


def for_runtime(model: onnx.ModelProto, info: MergedInfo, target_opset: int, where: str) -> onnx.ModelProto:
    """`model` at `target_opset` (onnxmerge.model.downgrade), its outputs checked against the model's
    own on seeded random inputs (native nodes run by the kernels, or in their portable form); the
    record goes to `info.fidelity["target_opset"]`."""
    model, info.fidelity["target_opset"] = downgrade.to_opset(
        model, target_opset, where, compare=lambda a, b: checks.output_difference(b, a, seed=VALIDATE_SEED))
    return model


def baseline_model(inputs: list[str | Path], names: list[str]) -> onnx.ModelProto:
    """The tasks side by side in one graph, sharing nothing (the baseline method): the report's
    second latency reference, beside the originals in separate sessions."""
    return merge(inputs, method=BASELINE, names=names).model
