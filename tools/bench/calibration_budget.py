#!/usr/bin/env python3
"""Calibration's step budget: zipper merges calibrated with 2000 steps (patience 5, the default before
2026-12-05 and a search's per-candidate budget), 6000 (patience 10, the default since) and, on the
MobileNet pair, 12000 (patience 10), points lost on held-out data; written into BENCHMARKS.md (README
"Calibration defaults").

Only pairs outside the budget search's report half, so that choosing the default tunes nothing that
the report half measures:
- the independently initialised MobileNet pair of tests/models (mobilenet_mnist + mobilenet_fashion_seed1):
  calibrated on 20,000 samples of each training split, scored on 5,000 others, which the models
  trained on but calibration does not see (never the test splits, on which tools/bench/zipper_defaults.py
  reports);
- the budget suite's LeNet and ResNet tuning pairs (build/budget_models, tools/train_models.py --group
  budget): calibrated on their *_calib files, scored on their *_valid files.

    python tools/bench/calibration_budget.py               # ~20 minutes on 2 cores
    python tools/bench/calibration_budget.py --no-write    # print only (as does a subset of --pairs)
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import ROOT, publish, require  # noqa: E402  (tools/bench is not a package)

sys.path.insert(0, str(ROOT))

SECTION = "calibration_budget"
BUDGET = ROOT / "build" / "budget_models"
TASKS = {"mnist": "mnist", "fashion": "fashion-mnist"}
BUDGETS = {"2000": (2000, 5), "6000": (6000, 10), "12000": (12000, 10)}  # name -> (steps, patience)
# pair -> (what it is, the zipper --share values, the budgets tried)
PAIRS = {
    "mobilenet": ("MobileNet independent (tests/models)", (4, 7), ("2000", "6000", "12000")),
    "lenet": ("LeNet (budget suite, tuning half)", (2, 3), ("2000", "6000")),
    "resnet": ("ResNet (budget suite, tuning half)", (4,), ("2000", "6000")),
}
VALID = 5000  # MobileNet pair: training samples held out to score on
CALIB = 20000  # MobileNet pair: training samples calibrated on (as the budget suite's *_calib files)


def _split(ds, seed: int = 0):
    """(calibration, validation) parts of a training split: disjoint, drawn with a fixed seed."""
    from onnxmerge.data import Dataset

    idx = np.random.default_rng(seed).permutation(len(ds))
    part = lambda i: Dataset(ds.x[i], ds.y[i], ds.source, dict(ds.preprocessing))  # noqa: E731
    return part(idx[VALID:VALID + CALIB]), part(idx[:VALID])


def _pair(name: str):
    """The pair's model files, calibration data and validation data."""
    from onnxmerge.data import load_dataset, load_named

    if name == "mobilenet":
        inputs = [ROOT / "tests" / "models" / f for f in ("mobilenet_mnist.onnx", "mobilenet_fashion_seed1.onnx")]
        parts = {t: _split(load_named(d, "train")) for t, d in TASKS.items()}
        return inputs, {t: c for t, (c, _) in parts.items()}, {t: v for t, (_, v) in parts.items()}
    inputs = [BUDGET / f"{name}_{t}.onnx" for t in TASKS]
    return (inputs, {t: load_dataset(BUDGET / f"{t}_calib.npz") for t in TASKS},
            {t: load_dataset(BUDGET / f"{t}_valid.npz") for t in TASKS})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    from onnxmerge.api import merge
    from onnxmerge.calibration.calibrate import CalibrationConfig
    from onnxmerge.measure.evaluate import evaluate
    from onnxmerge.measure.latency import machine_info

    if not require(SECTION, data=True):
        return 1
    if set(args.pairs) - {"mobilenet"} and not (BUDGET / "models.json").exists():
        print(f"{SECTION}: {BUDGET} not found: python tools/train_models.py --group budget", file=sys.stderr)
        return 1
    machine = machine_info()
    lines = ["## Calibration's step budget: zipper merges at 2000, 6000 and 12000 steps", "",
             f"Written by `tools/bench/{SECTION}.py`; rerun it to update this section.", "",
             f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- command: `python {shlex.join([f'tools/bench/{SECTION}.py', *argv])}`",
             f"- machine: {machine['cpu']}, {machine['usable_cores']} cores, CPU",
             "- pairs outside the budget search's report half (the script's docstring); zipper with its defaults "
             "(match auto, REPAIR), calibrated with the default settings but the steps and patience of the column "
             "(lr 3e-3, cosine to 0 at the budget, early stopping every 100 steps on a held-out part of the "
             "calibration data); points lost against the originals on the validation data, mnist / fashion; "
             "in brackets the step of the weights kept and the seconds of the merge",
             "", "| pair | --share | " + " | ".join(f"{s} steps, patience {q}" for s, q in BUDGETS.values()) + " |",
             "|---|---|" + "---|" * len(BUDGETS)]
    for name in args.pairs:
        what, shares, budgets = PAIRS[name]
        inputs, calib, valid = _pair(name)
        for share in shares:
            cells = []
            for key in BUDGETS:
                if key not in budgets:
                    cells.append("")
                    continue
                steps, patience = BUDGETS[key]
                t0 = time.perf_counter()
                result = merge([str(i) for i in inputs], method="zipper", names=list(TASKS), params={"share": share},
                               calib=calib, calibration=CalibrationConfig(steps=steps, patience=patience))
                seconds = time.perf_counter() - t0
                scores = evaluate(result.model, result.info, valid, {t.name: t.original for t in result.state.tasks},
                                  progress=False)
                best = result.info.params.get("calibration", {}).get("early_stopping", {}).get("best_step", "-")
                cells.append(" / ".join(f"{100 * (s['accuracy'] - s['original_accuracy']):+.2f}" for s in scores.values())
                             + f" ({best}, {seconds:.0f} s)")
                print(f"{name} share {share} {key}: {cells[-1]}", flush=True)
            lines.append(f"| {what} | {share} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    publish(SECTION, text, write=not args.no_write and set(args.pairs) == set(PAIRS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
