"""The state a merge pipeline carries from pass to pass.

A pass works on `MergeState`: before the tasks are combined, each `Task` holds its own normalised
graph; after combining, `MergeState.graph` is the one multi-task graph and the task graphs stay as
they were (they are the reference the merged graph is checked against).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import onnx
import onnx_graphsurgeon as gs

if TYPE_CHECKING:
    from onnxmerge.graph.alignment import Alignment
    from onnxmerge.graph.layers import Layer


@dataclass
class Task:
    """One input model: its task name, where it came from and its (normalised) graph.

    `original` is the model as loaded and checked (after opset reconciliation), before any rewrite;
    it is the numerical reference for every exact pass.
    """

    name: str
    original: onnx.ModelProto
    graph: gs.Graph
    path: Path | None = None
    sha256: str = ""
    layers: list[Layer] = field(default_factory=list)
    # merged-graph tensor names of this task's inputs and outputs, keyed by the original names;
    # filled in by the combining pass
    input_map: dict[str, str] = field(default_factory=dict)
    output_map: dict[str, str] = field(default_factory=dict)
    # original layer output tensor -> merged tensor (methods that share a layer point it at the shared one)
    layer_map: dict[str, str] = field(default_factory=dict)
    # original layer output tensor -> its channel order in the merged graph (channel matching):
    # merged channel c holds original channel order[c]
    channel_order: dict[str, list[int]] = field(default_factory=dict)
    # loading brought the file to the current form (model.upgrade): `original`, not the file at `path`,
    # is what the merged task is compared with
    modernised: bool = False


@dataclass
class Services:
    """What a pass may need from calibration and measurement, handed in by the API: passes never
    import them (DESIGN.md, layout). Each is None where the caller gave none."""

    # onnxmerge.calibration.calibrate.calibrate(model, info, originals, data, config, progress=...)
    calibrate: Callable[..., Any] | None = None
    # onnxmerge.calibration.calibrate.CalibrationConfig: the settings type (its defaults, dataclasses.replace)
    calibration_config: type | None = None
    # onnxmerge.measure.evaluate.run_task(session, task_info, x): a task's outputs in a merged model
    run_task: Callable[..., Any] | None = None


@dataclass
class MergeState:
    """Everything a pipeline carries from pass to pass: the tasks, the combined graph, what the
    caller asked for, and the report's notes; a method's private state stays in its passes."""

    tasks: list[Task]
    opset: int
    ir_version: int
    graph: gs.Graph | None = None  # the combined graph, once the tasks are combined
    alignments: list[Alignment] = field(default_factory=list)  # each task against the first
    shared_input: bool = False  # whether the combined graph feeds one input to every task
    method: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    # what the caller asked for: --align pairs (first two tasks), --separate-inputs, a warm start
    align: list[tuple[int, int]] | None = None
    separate_inputs: bool = False
    warm_start: onnx.ModelProto | None = None  # an earlier merged model of the same tasks (a sweep's last step)
    notes: list[str] = field(default_factory=list)  # what the report should tell the user
    warnings: list[str] = field(default_factory=list)  # what the command line prints as warnings
    figures: dict[str, Any] = field(default_factory=dict)  # a method's measurements, reported as fidelity
    progress: bool = False  # whether long passes show progress bars
    portable_fallback: bool = False  # --emit native without built kernels writes the portable form
    calib: dict[str, Any] = field(default_factory=dict)  # task -> calibration Dataset (methods that need data)
    # task -> labelled held-out Dataset for choices made during the merge (a method's trials)
    validation: dict[str, Any] = field(default_factory=dict)
    calibration: Any = None  # the CalibrationConfig for methods that retrain as they go
    services: Services = field(default_factory=Services)
    calibrated: bool = False  # a method already calibrated the model (merge skips its last calibration)
    # a merged model given as the first input, whose tasks come first (loading.MergedInput;
    # methods with extends_merged)
    base: Any = None
    # a method's description of the merged network, written as metadata onnxmerge.layout, from
    # which it can extend the file later (extends_merged)
    layout: dict[str, Any] | None = None
    # after calibration: the exported model and its metadata, which after-calibration passes rewrite
    model: onnx.ModelProto | None = None
    info: Any = None  # onnxmerge.model.contract.MergedInfo

    @property
    def combined(self) -> bool:
        return self.graph is not None

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)
