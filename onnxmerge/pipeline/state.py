"""The state a merge pipeline carries from pass to pass.

A pass works on `MergeState`: before the tasks are combined, each `Task` holds its own normalised
graph; after combining, `MergeState.graph` is the one multi-task graph and the task graphs stay as
they were (they are the reference the merged graph is checked against).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


@dataclass
class MergeState:
    tasks: list[Task]
    opset: int
    ir_version: int
    graph: gs.Graph | None = None  # the combined graph, once the tasks are combined
    alignments: list[Alignment] = field(default_factory=list)  # each task against the first
    shared_input: bool = False  # whether the combined graph feeds one input to every task
    method: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what the report should tell the user
    figures: dict[str, Any] = field(default_factory=dict)  # a method's measurements, reported as fidelity
    progress: bool = False  # whether long passes show progress bars
    calib: dict[str, Any] = field(default_factory=dict)  # task -> calibration Dataset (methods that need data)
    # task -> labelled held-out Dataset for choices made during the merge (mtz --tolerance)
    validation: dict[str, Any] = field(default_factory=dict)
    calibration: Any = None  # the CalibrationConfig for methods that retrain as they go
    calibrated: bool = False  # a method already calibrated the model (merge skips its last calibration)
    # mtz: the merged mtz model given as the first input, whose tasks come first (loading.MergedInput)
    base: Any = None
    layout: dict[str, Any] | None = None  # mtz: the zipped network's layout, for the metadata (onnxmerge.layout)

    @property
    def combined(self) -> bool:
        return self.graph is not None

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(name)
