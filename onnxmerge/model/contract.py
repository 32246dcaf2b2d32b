"""The merged model's contract with its users (DESIGN.md, "The merged model").

A merged model carries, in `metadata_props`:

    onnxmerge.version   the onnxmerge version that wrote it
    onnxmerge.method    the method's registry name (pack, zipper, codebook, mtz)
    onnxmerge.params    JSON: the method's parameters
    onnxmerge.tasks     JSON: a list of {name, source, sha256, inputs, outputs, layers, channels}, where
                        inputs, outputs and layers (the weight-bearing layers' output tensors) map
                        each original tensor name to its name in the merged model, and channels
                        gives a layer's channel order where channel matching permuted it
    onnxmerge.fidelity  JSON: the measured fidelity (per task, the max abs difference to the original on
                        seeded random inputs, relative to the output magnitude) and the alignment
    onnxmerge.layout    mtz only, JSON: the zipped network's column layout (onnxmerge.passes.mtz._zipped.ZippedNet.layout:
                        per channel space and task, the merged column of each of the task's channels; per
                        layer, the initializers of its weights), from which a later mtz merge rebuilds the
                        network to zip further tasks into it (`onnxmerge merged.onnx c.onnx --method mtz`)

Timings (`seconds`, `*_seconds`) are left out of the file, so that the same inputs, settings and seed
give byte-identical models; the report printed after a merge still shows them.

Outputs are named `<task>/<original name>`; what a method shares between tasks is `shared/<name>`; inputs are shared (original name kept) when the tasks take
the same input, else `<task>/<original name>`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import onnx

from onnxmerge.errors import MergeError

PREFIX = "onnxmerge."
# what a method computes once for several tasks is named shared/<name> in the merged graph
SHARED = "shared/"


@dataclass
class TaskInfo:
    name: str
    source: str
    sha256: str
    inputs: dict[str, str]  # original input name -> merged input name
    outputs: dict[str, str]  # original output name -> merged output name
    # original layer output tensor -> the merged tensor that stands for it (per-layer calibration loss)
    layers: dict[str, str] = field(default_factory=dict)
    # original layer output tensor -> channel order in the merged model, where channels were permuted
    channels: dict[str, list[int]] = field(default_factory=dict)


@dataclass
class MergedInfo:
    version: str
    method: str
    params: dict[str, Any]
    tasks: list[TaskInfo]
    fidelity: dict[str, Any] = field(default_factory=dict)
    layout: dict[str, Any] | None = None  # mtz: the zipped network's layout (written only where given)

    def task(self, name: str) -> TaskInfo:
        for t in self.tasks:
            if t.name == name:
                return t
        known = ", ".join(t.name for t in self.tasks)
        raise MergeError(f"no task named {name!r} in the merged model (tasks: {known})")


def write_metadata(model: onnx.ModelProto, info: MergedInfo) -> None:
    """Replace the onnxmerge entries of `model.metadata_props` with `info`."""
    keep = [p for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    values = {
        "version": info.version,
        "method": info.method,
        "params": json.dumps(without_timings(info.params), sort_keys=True),
        "tasks": json.dumps([t.__dict__ for t in info.tasks]),
        "fidelity": json.dumps(without_timings(info.fidelity), sort_keys=True),
    }
    if info.layout is not None:  # other methods' files keep exactly the keys they always had
        values["layout"] = json.dumps(info.layout, separators=(",", ":"))
    for key, value in values.items():
        model.metadata_props.add(key=PREFIX + key, value=value)


def without_timings(value: Any) -> Any:
    """A copy of a JSON-able value without the timings in it (keys `seconds` or ending `_seconds`):
    the same inputs, settings and seed must give the same model bytes, and a wall-clock time never
    repeats. The timings stay in the in-memory MergedInfo, for the report printed after the merge."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items()
                if not (isinstance(k, str) and (k == "seconds" or k.endswith("_seconds")))}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def read_metadata(model: onnx.ModelProto, path: str = "model") -> MergedInfo:
    """The onnxmerge metadata of a merged model; a one-line error if it has none."""
    props = {p.key[len(PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(PREFIX)}
    if "tasks" not in props:
        raise MergeError(f"{path}: not a model written by onnxmerge (no onnxmerge.tasks metadata)")
    try:
        return MergedInfo(
            version=props.get("version", ""),
            method=props.get("method", ""),
            params=json.loads(props.get("params", "{}")),
            tasks=[TaskInfo(**t) for t in json.loads(props["tasks"])],
            fidelity=json.loads(props.get("fidelity", "{}")),
            layout=json.loads(props["layout"]) if "layout" in props else None,
        )
    except (ValueError, TypeError) as e:
        raise MergeError(f"{path}: unreadable onnxmerge metadata ({e})") from None


def logits_output(task: TaskInfo, ranks: dict[str, int]) -> tuple[str, str]:
    """(original, merged) name of the output that evaluation and calibration read as the task's
    class scores: its first output of rank 2 (batch, classes), given each merged output's rank."""
    for orig, merged in task.outputs.items():
        if ranks.get(merged) == 2:
            return orig, merged
    raise MergeError(f"task {task.name!r}: no output of shape (batch, classes) among {', '.join(task.outputs)}")


def task_model(model: onnx.ModelProto, task: TaskInfo, path: str = "model") -> onnx.ModelProto:
    """The part of merged `model` that computes `task`'s outputs, with the task's original input and
    output names: what stands for the task's original model where only the merged model is at hand
    (an mtz merge that adds tasks to a merged model). No onnxmerge metadata: it is not a merged model."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    wanted = {**task.inputs, **task.outputs}  # original name -> merged name
    missing = [m for m in wanted.values() if m not in tensors]
    if missing:
        raise MergeError(f"{path}: task {task.name!r}'s tensor(s) {', '.join(missing)} named in its metadata "
                         "are not in the graph")
    graph.inputs = [tensors[m] for m in task.inputs.values()]
    graph.outputs = [tensors[m] for m in task.outputs.values()]
    graph.cleanup(remove_unused_graph_inputs=True)
    kept = graph.tensors()
    clash = [o for o, m in wanted.items() if o != m and o in kept]
    if clash:
        raise MergeError(f"{path}: task {task.name!r}'s original tensor name(s) {', '.join(clash)} are taken "
                         "by other tensors of the merged graph")
    for original, merged in wanted.items():
        kept[merged].name = original
    sub = gs.export_onnx(graph)
    sub.ir_version = model.ir_version
    return sub
