#!/usr/bin/env python3
"""`--method zipper --share 4` with its defaults on an independently trained MobileNet-style pair (issue 18:
"loses at most 2 points per task after its default calibration"), beside the paper's setting (plain
average, no matching, no REPAIR) with the same calibration, written into BENCHMARKS.md.

The pair: tests/models/mobilenet_mnist.onnx (seed 0) + mobilenet_fashion_seed1.onnx (seed 1), as a user
would merge them: calibration data = the training splits (the calibration's own early stopping holds out
a part of them), accuracy on the full test splits, which neither training nor calibration saw.

    python tools/bench/zipper_defaults.py               # ~15 minutes on 2 cores
    python tools/bench/zipper_defaults.py --no-write    # print only
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import ROOT, publish, require  # noqa: E402  (tools/bench is not a package)

sys.path.insert(0, str(ROOT))

SECTION = "zipper_defaults"
FILES = {"mnist": "mobilenet_mnist.onnx", "fashion": "mobilenet_fashion_seed1.onnx"}
DATA = {"mnist": "mnist", "fashion": "fashion-mnist"}
SHARE = 4
# name -> (what it is, the zipper parameters besides --share)
SETTINGS = {
    "defaults": ("onnxmerge's defaults (match auto = activations on --calib, REPAIR on)", {}),
    "paper": ("the paper's plain average (match none, REPAIR off)", {"match": "none", "repair": "off"}),
}
LIMIT = 2.0  # points per task (the acceptance)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", default=",".join(SETTINGS), help="which of: " + ", ".join(SETTINGS))
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    from onnxmerge.api import merge
    from onnxmerge.calibration.calibrate import CalibrationConfig
    from onnxmerge.data import load_named
    from onnxmerge.measure.evaluate import evaluate
    from onnxmerge.measure.latency import machine_info

    if not require("zipper_defaults", data=True):
        return 1
    inputs = [str(ROOT / "tests" / "models" / f) for f in FILES.values()]
    calib = {t: load_named(d, "train") for t, d in DATA.items()}
    test = {t: load_named(d, "test") for t, d in DATA.items()}
    config = CalibrationConfig()
    machine = machine_info()
    lines = [f"## Zipper with its defaults: `--share {SHARE}` on an independently trained MobileNet-style pair", "",
             "Written by `tools/bench/zipper_defaults.py`; rerun it to update this section.", "",
             f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- command: `python {shlex.join(['tools/bench/zipper_defaults.py', *argv])}`",
             f"- machine: {machine['cpu']}, {machine['usable_cores']} cores, CPU",
             f"- models: {', '.join(f'`tests/models/{f}`' for f in FILES.values())} (seeds 0 and 1: independent "
             "initialisations); calibration data: the full training splits; the default calibration "
             f"(budget {config.steps} steps, lr {config.lr} cosine with {config.warmup:.0%} warm-up, early stopping "
             f"every {config.eval_every} steps, patience {config.patience}, on {config.holdout} held-out samples per "
             "task); accuracy on the full test splits (10,000 each).",
             f"- acceptance (issue 18): at most {LIMIT:g} points lost per task with the defaults.", "",
             "| setting | task | original | merged | change (points) | within 2 points | calibration steps | s |",
             "|---|---|---|---|---|---|---|---|"]
    for key in args.settings.split(","):
        what, params = SETTINGS[key]
        t0 = time.perf_counter()
        result = merge(inputs, method="zipper", names=list(FILES), params={"share": SHARE, **params},
                       calib=calib, calibration=config, progress=True)
        seconds = time.perf_counter() - t0
        originals = {t.name: t.original for t in result.state.tasks}
        scores = evaluate(result.model, result.info, test, originals, progress=False)
        stopped = result.info.params.get("calibration", {}).get("early_stopping", {}).get("best_step", "-")
        for task, s in scores.items():
            change = 100 * (s["accuracy"] - s["original_accuracy"])
            lines.append(f"| {what} | {task} | {s['original_accuracy']:.2%} | {s['accuracy']:.2%} | {change:+.2f} "
                         f"| {'yes' if change >= -LIMIT else 'no'} | best at {stopped} | {seconds:.0f} |")
        print("\n".join(lines[-len(scores):]), flush=True)
    text = "\n".join(lines)
    publish(SECTION, text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
