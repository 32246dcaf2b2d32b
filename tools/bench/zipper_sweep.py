#!/usr/bin/env python3
"""Progressive zippering on real data, written into BENCHMARKS.md beside the paper's figures.

Pairs (same architecture, trained by tools/train_models.py): LeNet on MNIST + LeNet on Fashion-MNIST,
and MobileNet-style (depthwise-separable) on MNIST + on Fashion-MNIST. For each pair and each channel
matching (`none`, `hungarian`) the sweep shares layers 1, 2, ... in turn, calibrating after each step
with the same budget, on the training splits; accuracy is measured on the full test splits; speed-up
is the originals' median time in two sessions over the merged model's, batch 1, one thread,
interleaved in this process.

    python tools/bench/zipper_sweep.py                       # ~10 minutes on 2 cores
    python tools/bench/zipper_sweep.py --pairs lenet --steps-per-layer 50 --no-write   # quick look
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
    "lenet": ("LeNet pair, one initialisation (seed 0 for both, like two fine-tunings of one pre-trained net)",
              ["lenet_mnist.onnx", "lenet_fashion.onnx"]),
    "mobilenet": ("MobileNet-style pair (depthwise-separable), one initialisation",
                  ["mobilenet_mnist.onnx", "mobilenet_fashion.onnx"]),
    "lenet-indep": ("LeNet pair, independent initialisations (seed 0 and seed 1)",
                    ["lenet_mnist.onnx", "lenet_fashion_seed1.onnx"]),
    "mobilenet-indep": ("MobileNet-style pair, independent initialisations (seed 0 and seed 1)",
                        ["mobilenet_mnist.onnx", "mobilenet_fashion_seed1.onnx"]),
}
DATA = {"mnist": "mnist", "fashion": "fashion-mnist"}
PAPER = ("Paper (MobileNet-224, ImageNet tasks, Table 1): merging blocks 1-4 of 13 costs under 2 points "
         "per task; merging all 13 gives a 1.53x speed-up at a loss of 6-13 points.")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default=",".join(PAIRS))
    p.add_argument("--matches", default="none,hungarian")
    p.add_argument("--steps-per-layer", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--latency-budget", type=float, default=3.0, help="seconds of timing per model")
    p.add_argument("--sweep-to", type=int, help="stop after sharing this many layers")
    p.add_argument("--section", default="zipper_sweep", help="the BENCHMARKS.md section to write")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    from onnxmerge.calibration.calibrate import CalibrationConfig
    from onnxmerge.data import load_named
    from onnxmerge.measure.latency import machine_info
    from onnxmerge.passes import METHODS
    from onnxmerge.sweep import sweep, sweep_markdown

    if not require("zipper_sweep", data=True):
        return 1
    calib = {t: load_named(d, "train") for t, d in DATA.items()}
    test = {t: load_named(d, "test") for t, d in DATA.items()}
    config = CalibrationConfig(lr=args.lr)
    title = "progressive sweeps (Table 1 of the paper, on our pairs)" if args.sweep_to is None else \
        f"progressive sweeps up to {args.sweep_to} shared layers"
    lines = [f"## Zipper: {title}, {args.steps_per_layer} calibration steps per layer", "",
             "Written by `tools/bench/zipper_sweep.py`; rerun it to update this section.", "",
             f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- command: `python {shlex.join(['tools/bench/zipper_sweep.py', *argv])}`",
             f"- machine: {machine_info()['cpu']}, {machine_info()['usable_cores']} cores, CPU",
             f"- calibration after each shared layer: {args.steps_per_layer} steps, lr {args.lr}, batch "
             f"{config.batch_size}, labels + per-layer L1 + distillation, on the full training splits; "
             "accuracy on the full test splits (10,000 each); speed-up = originals in two sessions / merged, "
             "batch 1, one thread, medians interleaved in one process; `depthwise shared`.",
             f"- {PAPER}", ""]
    for key in args.pairs.split(","):
        title, files = PAIRS[key]
        inputs = [str(ROOT / "tests" / "models" / f) for f in files]
        for match in args.matches.split(","):
            t0 = time.perf_counter()
            rows = sweep(METHODS["zipper"], inputs, list(DATA), calib, test, steps_per_layer=args.steps_per_layer,
                         calibration=config, params={"match": match}, latency_budget_s=args.latency_budget,
                         up_to=args.sweep_to)
            table = sweep_markdown([{k: v for k, v in r.items() if k != "model"} for r in rows])
            lines += [f"### {title}, match {match} ({time.perf_counter() - t0:.0f} s)", "", table.strip(), ""]
            print("\n".join(lines[-4:]), flush=True)
    if not args.no_write:
        write_section(BENCHMARKS, args.section, "\n".join(lines))
        print(f"updated {BENCHMARKS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
