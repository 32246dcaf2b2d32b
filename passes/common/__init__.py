"""The passes every method's pipeline shares: normalisation, alignment, combining, cleanup.

`pipeline` declares a method's whole pipeline around its own passes (DESIGN.md, "Flow of one merge"):

    fold constants -> remove Identity/Dropout -> fold BatchNorm -> align layers -> the method's
    task-graph passes -> combine -> the method's combined-graph passes -> cleanup -> CALIBRATE ->
    the method's after-calibration passes
"""

from __future__ import annotations

from onnxmerge.passes.common.align_layers import AlignLayersPass
from onnxmerge.passes.common.cleanup import CleanupGraphPass
from onnxmerge.passes.common.combine_graphs import CombineGraphsPass
from onnxmerge.passes.common.fold_batchnorm import FoldBatchNormPass
from onnxmerge.passes.common.fold_constants import FoldConstantsPass
from onnxmerge.passes.common.remove_identity import RemoveIdentityPass
from onnxmerge.pipeline.manager import Pass
from onnxmerge.pipeline.method import CALIBRATE, Calibrate


def normalise_passes() -> list[Pass]:
    """Fold constants, drop Identity / Dropout, fold BatchNorm into the layer before it."""
    return [FoldConstantsPass(), RemoveIdentityPass(), FoldBatchNormPass()]


def pipeline(task: list[Pass] = (), combined: list[Pass] = (), after: list[Pass] = ()) -> list[Pass | Calibrate]:
    """A method's whole pipeline: `task` passes rewrite each task's graph before they are combined,
    `combined` passes the one multi-task graph, `after` passes the exported model after calibration."""
    return [*normalise_passes(), AlignLayersPass(), *task, CombineGraphsPass(), *combined, CleanupGraphPass(),
            CALIBRATE, *after]
