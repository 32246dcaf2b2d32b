#!/usr/bin/env python3
"""Calibration benchmarks on real data, written into BENCHMARKS.md (issue: calibration acceptance).

1. Calibrating a `pack` model (nothing shared) must not move accuracy: per task, accuracy on the
   full test split before and after calibration with the default settings.
2. Recovery: Gaussian noise on every weight (sigma times each tensor's standard deviation) costs at
   least 10 points per task; calibration against the clean originals for at most 500 steps, with
   labels and label-free, must bring each task back within 1 and 2 points.

Data: the train splits calibrate, the full test splits evaluate (../shared/data, or $ONNXMERGE_DATA).

    python tools/bench/calibration.py            # about a minute on 2 cores; writes BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import BENCHMARKS, ROOT, require, write_section  # noqa: E402  (tools/bench is not a package)

PAIRS = {
    "LeNet pair (MNIST + Fashion-MNIST)": {
        "mnist": (ROOT / "tests/models/lenet_mnist.onnx", "mnist"),
        "fashion": (ROOT / "tests/models/lenet_fashion.onnx", "fashion-mnist")},
    "example pair (Fashion-MNIST + spoken digits)": {
        "fashion": (ROOT / "onnxmerge/examples/fashion_lenet.onnx", "fashion-mnist"),
        "digits": (ROOT / "onnxmerge/examples/digits_lenet.onnx", "fsdd")},
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sigma", type=float, default=0.5, help="noise, in units of each tensor's std")
    p.add_argument("--steps", type=int, default=500, help="recovery steps (at most 500 for the acceptance)")
    p.add_argument("--lr", type=float, default=3e-3, help="recovery learning rate")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    from onnxmerge.api import merge
    from onnxmerge.calibration.calibrate import CalibrationConfig, calibrate, perturb_weights
    from onnxmerge.data import load_named
    from onnxmerge.measure.evaluate import evaluate
    from onnxmerge.measure.latency import machine_info

    if not require("calibration", data=True):
        return 1
    lines = ["## Calibration: pack stays put, and recovery from weight noise", "",
             "Written by `tools/bench/calibration.py`; rerun it to update this section.", "",
             f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- command: `python {shlex.join(['tools/bench/calibration.py', *argv])}`",
             f"- machine: {machine_info()['cpu']}, CPU, 1 process",
             "- data: train splits calibrate, full test splits evaluate (MNIST and Fashion-MNIST 10,000 each, "
             "spoken digits 300)", ""]

    for title, tasks in PAIRS.items():
        names = list(tasks)
        packed = merge([str(path) for path, _ in tasks.values()], method="pack", names=names)
        teachers = {n: path for n, (path, _) in tasks.items()}
        calib = {n: load_named(ds, "train") for n, (_, ds) in tasks.items()}
        test = {n: load_named(ds, "test") for n, (_, ds) in tasks.items()}
        acc = lambda model: {n: r["accuracy"] for n, r in evaluate(model, packed.info, test, progress=False).items()}  # noqa: E731

        original = acc(packed.model)
        default = CalibrationConfig()
        t0 = time.perf_counter()
        stayed = acc(calibrate(packed.model, packed.info, teachers, calib, default, progress=False).model)
        t_pack = time.perf_counter() - t0
        noisy_model = perturb_weights(packed.model, args.sigma, seed=0)
        noisy = acc(noisy_model)
        recovered = {}
        for label, use_labels in (("labels", True), ("label-free", False)):
            config = CalibrationConfig(steps=args.steps, lr=args.lr, use_labels=use_labels)
            t0 = time.perf_counter()
            out = calibrate(noisy_model, packed.info, teachers, calib, config, progress=False)
            recovered[label] = (acc(out.model), time.perf_counter() - t0)

        lines += [f"### {title}", "",
                  f"Pack calibration: default settings ({default.steps} steps, lr {default.lr}, batch "
                  f"{default.batch_size}, labels), {t_pack:.0f} s. Recovery: noise sigma {args.sigma}, "
                  f"{args.steps} steps at lr {args.lr}, batch {default.batch_size}.", "",
                  "| task | original | pack calibrated (change, points) | with noise | recovered, labels "
                  "(gap) | recovered, label-free (gap) |", "|---|---|---|---|---|---|"]
        for n in names:
            lab, free = recovered["labels"][0][n], recovered["label-free"][0][n]
            lines.append(f"| {n} | {100 * original[n]:.2f}% | {100 * stayed[n]:.2f}% "
                         f"({100 * (stayed[n] - original[n]):+.2f}) | {100 * noisy[n]:.2f}% | "
                         f"{100 * lab:.2f}% ({100 * (lab - original[n]):+.2f}) | "
                         f"{100 * free:.2f}% ({100 * (free - original[n]):+.2f}) |")
        lines += ["", f"Recovery time: labels {recovered['labels'][1]:.0f} s, label-free "
                      f"{recovered['label-free'][1]:.0f} s.", ""]
        print("\n".join(lines[-len(names) - 6:]))
    if not args.no_write:
        write_section(BENCHMARKS, "calibration", "\n".join(lines))
        print(f"updated {BENCHMARKS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
