"""One candidate of the budgeted search: merge with one method and setting, measure it, and (where its
accuracy is not already within the budget) calibrate it and measure again.

A trial measures, in this order, what each later step needs, so that it can stop early:
1. the merge without calibration: its bytes and MACs (a setting that cannot beat the best model
   found so far on the objective is skipped here: calibration does not change either);
2. its latency (one thread, batch 1, against the originals one after another in the same process);
3. its accuracy on the held-out validation data; a model already within the budget is kept as it is;
4. otherwise calibration (onnxmerge.calibration.calibrate) on the calibration part of the data, and
   its accuracy again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import onnx

from onnxmerge.api import merge
from onnxmerge.calibration.calibrate import CalibrationConfig, calibrate, record_calibration
from onnxmerge.measure.evaluate import evaluate
from onnxmerge.measure.latency import latency_table
from onnxmerge.measure.metrics import count_macs, parameter_bytes
from onnxmerge.model.contract import MergedInfo


@dataclass
class Trial:
    """One merged candidate and what was measured on it. `loss`: points of accuracy lost per task on
    the validation data (original minus merged, x100); `status`: ok, or why it was skipped or failed."""

    method: str
    params: dict[str, Any]
    status: str = "ok"
    bytes: int | None = None
    macs: int | None = None
    speedup: float | None = None  # originals' median latency / merged median (batch 1, one thread)
    accuracy: dict[str, float] = field(default_factory=dict)
    loss: dict[str, float] = field(default_factory=dict)
    calibrated: bool = False
    seconds: float = 0.0
    model: onnx.ModelProto | None = field(default=None, repr=False)
    info: MergedInfo | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return self.method + "".join(f" {k}={v}" for k, v in self.params.items())

    @property
    def measured(self) -> bool:
        return self.status == "ok"

    @property
    def worst_loss(self) -> float:
        return max(self.loss.values()) if self.loss else float("inf")

    def within(self, max_loss: float) -> bool:
        # a hair of slack: a budget of 0 accepts a model equal to the originals to float rounding
        return self.measured and self.worst_loss <= max_loss + 1e-9

    def row(self) -> dict[str, Any]:
        """The JSON-able figures (no model)."""
        return {"method": self.method, "params": self.params, "label": self.label, "status": self.status,
                "bytes": self.bytes, "macs": self.macs, "speedup": self.speedup, "accuracy": self.accuracy,
                "loss_points": self.loss, "calibrated": self.calibrated, "seconds": round(self.seconds, 1)}


@dataclass
class Setup:
    """What every trial of one search shares: the inputs, the data split, the originals' figures."""

    inputs: list
    names: list[str]
    calib: dict  # task -> Dataset the candidates are calibrated on
    validation: dict  # task -> labelled Dataset the candidates are chosen on (never calibrated on)
    originals: dict  # task -> path or ModelProto (as loaded: see onnxmerge.model.loading.as_loaded)
    original_accuracy: dict[str, float]
    original_bytes: int  # the originals' parameters together
    calibration: CalibrationConfig
    latency_budget_s: float
    measure_latency: bool


def run_trial(setup: Setup, method: str, params: dict, max_loss: float, beats=None,
              warm_start: onnx.ModelProto | None = None) -> Trial:
    """Merge, measure and if needed calibrate one candidate. `beats(trial)`: whether its size or
    latency, measured before calibration, could still improve on the best model found; a trial
    that could not is returned as skipped without calibrating it."""
    start = time.perf_counter()
    trial = Trial(method, dict(params))
    result = merge(setup.inputs, method=method, names=setup.names, params=params, warm_start=warm_start)
    trial.model, trial.info = result.model, result.info
    trial.bytes, trial.macs = parameter_bytes(result.model), count_macs(result.model)
    teachers = {t.name: t.original for t in result.state.tasks}
    del result
    if setup.measure_latency:
        trial.speedup = latency_table(trial.model, setup.originals, batch_sizes=(1,), threads=(1,),
                                      budget_s=setup.latency_budget_s, progress=False)[0]["speedup_vs_originals"]
    if beats is not None and not beats(trial):
        trial.status, trial.model = "skipped: cannot beat the best model found so far", None
        trial.seconds = time.perf_counter() - start
        return trial
    _measure(trial, setup)
    if not trial.within(max_loss) and setup.calibration.steps > 0:
        calibrated = calibrate(trial.model, trial.info, teachers, setup.calib, setup.calibration, progress=False)
        trial.model, trial.calibrated = calibrated.model, True
        record_calibration(trial.info, setup.calibration, calibrated)
        _measure(trial, setup)
    trial.seconds = time.perf_counter() - start
    return trial


def _measure(trial: Trial, setup: Setup) -> None:
    """Validation accuracy per task, and the points lost against the originals."""
    ev = evaluate(trial.model, trial.info, setup.validation, progress=False)
    trial.accuracy = {t: r["accuracy"] for t, r in ev.items()}
    trial.loss = {t: 100 * (setup.original_accuracy[t] - a) for t, a in trial.accuracy.items()}
