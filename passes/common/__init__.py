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


def normalise_passes(fold_batchnorm: bool = True) -> list[Pass]:
    """Fold constants, drop Identity / Dropout, fold BatchNorm into the layer before it."""
    return [FoldConstantsPass(), RemoveIdentityPass(), *([FoldBatchNormPass()] if fold_batchnorm else [])]


def pipeline(task: list[Pass] = (), combined: list[Pass] = (), after: list[Pass] = (),
             fold_batchnorm: bool = True) -> list[Pass | Calibrate]:
    """A method's whole pipeline: `task` passes rewrite each task's graph before they are combined,
    `combined` passes the one multi-task graph, `after` passes the exported model after calibration.
    `fold_batchnorm=False` leaves BatchNormalization to onnxruntime's own Conv+BN fusion, which the
    originals get too, for a method that shares no weights (pack): folding here rounds differently
    from that fusion, by up to about 1e-5 relative over a deep net."""
    return [*normalise_passes(fold_batchnorm), AlignLayersPass(), *task, CombineGraphsPass(), *combined,
            CleanupGraphPass(), CALIBRATE, *after]
