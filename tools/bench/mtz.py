#!/usr/bin/env python3
"""Multi-Task Zipping on real data, written into BENCHMARKS.md beside the paper's figures (section `mtz`).

He, Zhou, Thiele (NeurIPS 2018). Models from `tools/train_models.py --group mtz` (build/mtz_models,
trained on first use). Calibration (Hessians, retraining) uses the training splits; errors are on the
full 10,000-image test splits.

- table1: two LeNet-300-100 and two LeNet-5 on MNIST from different seeds, hidden neurons permuted;
  every hidden neuron shared. Error before retraining, after at most 550 / 600 retraining steps in
  all (split evenly over the zipped layers), and the random-sharing baseline (Fig. 2, no retraining).
- tasks: LeNet-5 on MNIST + LeNet-5 on Fashion-MNIST (trained on the first 55,000 training images),
  adaptive (`--tolerance 0.5`, measured on the other 5,000 with --validation): the weights shared
  and the speed-up over the two originals (batch 1, one thread, medians).
- resnet: the ResNet-style pair (MNIST, Fashion-MNIST, trained on the first 55,000), half of every
  channel space shared, retrained as tasks (the adaptive search takes over an hour here: 7 layers
  choose pairs, and a trial of 300 steps is minutes).

A retraining step is the paper's iteration: one batch of every task (calibrate() alternates the
tasks, so a step of two tasks is two optimizer updates).

    python tools/bench/mtz.py [--only lenet300 lenet5 tasks resnet] [--no-train] [--no-write]

Parts whose models are missing are skipped with --no-train (else the mtz group is trained first).
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
from benchmarks_md import BENCHMARKS, ROOT, write_section  # noqa: E402  (tools/bench is not a package)

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from train_models import VALIDATION_FROM  # noqa: E402  (where the *_55k models' validation split starts)

MODELS = ROOT / "build" / "mtz_models"
HESSIAN_SAMPLES = 2048
LR, BATCH = 3e-3, 256  # retraining: Adam, decayed by 0.3 at each third of a layer's steps (best of 3 tried on LeNet-300-100)
# the different-tasks pair: models trained on the first 55,000 training images, the rest validates
# (--validation); retraining at a third of Table 1's lr, which alone moved the Fashion model's accuracy
TASKS_STEPS, TASKS_LR = 300, 1e-3
PAPER = {
    "lenet300": "LeNet-300-100: 1.57% / 1.60%; all shared, before retraining +1.50 points on average; "
                "after 550 iterations 1.64%; random sharing 33.47%",
    "lenet5": "LeNet-5: 0.89% / 0.95%; all shared, after 600 iterations 0.93%",
    "tasks": "VGG-16, ImageNet + CelebA: 39.61% of the parameters shared",
}


def ensure_models() -> None:
    names = ["lenet300_mnist_s0", "lenet300_mnist_s1", "lenet5_mnist_s0", "lenet5_mnist_s1", "lenet5_fashion",
             "lenet5_mnist_55k", "lenet5_fashion_55k",
             "resnet_mnist_55k", "resnet_fashion_55k"]
    if all((MODELS / f"{n}.onnx").exists() for n in names):
        return
    import train_models

    train_models.main(["--group", "mtz"])


def data(name: str, split: str):
    from onnxmerge.data import load_named

    return load_named(name, split)


def errors(result, test: dict) -> dict[str, float]:
    from onnxmerge.measure.evaluate import evaluate

    got = evaluate(result.model, result.info, test, progress=False)
    return {k: 100 * (1 - v["accuracy"]) for k, v in got.items()}


def original_errors(paths: dict, test: dict) -> dict[str, float]:
    from onnxmerge.graph.ops import make_session
    from onnxmerge.measure.evaluate import run_original

    return {k: 100 * float(np.mean(run_original(make_session(str(paths[k])), test[k].x).argmax(1) != test[k].y))
            for k in paths}


def zip_pair(paths: dict, calib: dict, validation: dict | None = None, lr: float = LR, **params):
    from onnxmerge.api import merge
    from onnxmerge.calibration.calibrate import CalibrationConfig

    t0 = time.perf_counter()
    result = merge([str(p) for p in paths.values()], method="mtz", names=list(paths), calib=calib,
                   validation=validation, calibration=CalibrationConfig(lr=lr, batch_size=BATCH), progress=True,
                   params={"hessian_samples": HESSIAN_SAMPLES, **params})
    return result, time.perf_counter() - t0


def table1(arch: str, budget: int, layers: int) -> tuple[list[str], dict]:
    paths = {f"s{k}": MODELS / f"{arch}_mnist_s{k}.onnx" for k in (0, 1)}
    train, test = data("mnist", "train"), data("mnist", "test")
    calib, tests = {k: train for k in paths}, {k: test for k in paths}
    orig = original_errors(paths, tests)
    mean = float(np.mean(list(orig.values())))
    rows, fig = [], {"originals": orig}
    for label, params in [("all shared, no retraining", {}),
                          (f"all shared, {budget // layers} retraining steps per layer ({budget} in all)",
                           {"retrain_steps": budget // layers}),
                          ("random sharing, no retraining (Fig. 2 baseline)", {"pairing": "random"}),
                          ("all shared, greedy pairing, no retraining", {"pairing": "greedy"})]:
        result, seconds = zip_pair(paths, calib, share_ratio=1.0, **params)
        err = errors(result, tests)
        m = float(np.mean(list(err.values())))
        rows.append(f"| {arch} | {label} | {orig['s0']:.2f} / {orig['s1']:.2f} | {err['s0']:.2f} / {err['s1']:.2f} "
                    f"| {m - mean:+.2f} | {seconds:.0f} |")
        fig[label] = {"errors": err, "mean_increase": m - mean, "seconds": seconds,
                      "layers": result.info.fidelity["mtz"]["layers"]}
    return rows, fig


def held_out(name: str, split_at: int | None):
    """(calibration, validation) of dataset `name`: the train split up to `split_at` and the rest (the
    models were trained on the first part only), or the whole train split and None."""
    from onnxmerge.data import Dataset

    train = data(name, "train")
    if split_at is None:
        return train, None
    return train.take(split_at), Dataset(train.x[split_at:], train.y[split_at:], train.source, train.preprocessing)


def zip_tasks(pair: dict, steps: int, split_at: int | None = None, lr: float = LR, **params) -> tuple[list[str], dict]:
    """A pair of different tasks zipped with `params` (adaptive with `tolerance`, measured on the held-out
    split) and `steps` retraining steps per layer or trial: one table row and its figures."""
    from onnxmerge.measure.latency import latency_table
    from onnxmerge.measure.metrics import model_stats

    sets = {k: held_out(ds, split_at) for k, (_, ds) in pair.items()}
    calib = {k: c for k, (c, _) in sets.items()}
    validation = {k: v for k, (_, v) in sets.items() if v is not None and "tolerance" in params}
    tests = {k: data(ds, "test") for k, (_, ds) in pair.items()}
    paths = {k: p for k, (p, _) in pair.items()}
    orig = original_errors(paths, tests)
    result, seconds = zip_pair(paths, calib, retrain_steps=steps, validation=validation or None, lr=lr, **params)
    err = errors(result, tests)
    import onnx

    merged = model_stats(result.model)["params"]
    each = [model_stats(onnx.load(str(p)))["params"] for p in paths.values()]
    originals = sum(each)
    shared = originals - merged  # a weight the two tasks share is stored once instead of twice
    lat = latency_table(result.model, [str(p) for p in paths.values()], batch_sizes=(1,), threads=(1,), progress=False)[0]
    layers = result.info.fidelity["mtz"]["layers"]
    shares = ", ".join(f"{r['layer']} {r['shared']}/{min(r['candidates'])}" for r in layers)
    (a, b) = paths
    row = (f"| {a} + {b} | {shares} | {orig[a]:.2f} / {orig[b]:.2f} | {err[a]:.2f} / {err[b]:.2f} | "
           f"{shared:,} ({100 * shared / each[0]:.1f}%) | {100 * (1 - merged / originals):.1f}% | {lat['speedup_vs_originals']:.2f}x | {seconds:.0f} |")
    return [row], {"errors": err, "originals": orig, "params": {"merged": merged, "originals": originals, "shared": shared},
                   "latency": lat, "layers": layers, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts_all = ["lenet300", "lenet5", "tasks", "resnet"]
    ap.add_argument("--only", nargs="+", choices=parts_all, default=parts_all)
    ap.add_argument("--no-train", action="store_true", help="do not train missing models (their parts are skipped)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if not args.no_train:
        ensure_models()
    from onnxmerge.measure.latency import machine_info

    parts = []
    table = [(arch, budget, layers) for arch, budget, layers in [("lenet300", 550, 2), ("lenet5", 600, 3)]
             if arch in args.only and (MODELS / f"{arch}_mnist_s1.onnx").exists()]
    if table:
        rows = ["| pair | setting | originals' error (%) | merged error (%) | mean change (points) | seconds |",
                "|---|---|---|---|---|---|"]
        for arch, budget, layers in table:
            r, _ = table1(arch, budget, layers)
            rows += r
        parts.append("### Table 1: same task (MNIST), different seeds, all hidden neurons shared\n\n" + "\n".join(rows)
                     + f"\n\nPaper: {PAPER['lenet300']}. {PAPER['lenet5']}.")
    header = ("| pair | shared neurons per layer | originals' error (%) | merged error (%) | weights shared "
              "(of one model's) | parameters saved | speed-up vs originals (batch 1, 1 thread) | seconds |\n|---|---|---|---|---|---|---|---|")
    if "tasks" in args.only and (MODELS / "lenet5_fashion_55k.onnx").exists():
        r, _ = zip_tasks({"mnist": (MODELS / "lenet5_mnist_55k.onnx", "mnist"),
                          "fashion": (MODELS / "lenet5_fashion_55k.onnx", "fashion-mnist")}, TASKS_STEPS,
                         split_at=VALIDATION_FROM, lr=TASKS_LR, share_ratio=1.0, tolerance=0.5)
        parts.append(f"### Different tasks, adaptive (`--tolerance 0.5` on the 5,000 held-out training images, "
                     f"{TASKS_STEPS} retraining steps per trial at lr {TASKS_LR})\n\n"
                     + header + "\n" + "\n".join(r) + f"\n\nPaper: {PAPER['tasks']}.")
    if "resnet" in args.only and (MODELS / "resnet_fashion_55k.onnx").exists():
        r, _ = zip_tasks({"mnist": (MODELS / "resnet_mnist_55k.onnx", "mnist"),
                          "fashion": (MODELS / "resnet_fashion_55k.onnx", "fashion-mnist")}, TASKS_STEPS,
                         split_at=VALIDATION_FROM, lr=TASKS_LR, share_ratio=0.5)
        parts.append(f"### ResNet-style pair, `--share-ratio 0.5`, {TASKS_STEPS} retraining steps per layer at lr "
                     f"{TASKS_LR}\n\n"
                     + header + "\n" + "\n".join(r))
    info = machine_info()
    body = (f"## Multi-Task Zipping (`--method mtz`)\n\nWritten by `{shlex.join(['python', 'tools/bench/mtz.py', *(argv or sys.argv[1:])])}` "
            f"on {datetime.now(timezone.utc):%Y-%m-%d}, {info.get('cpu', 'this machine')}. Hessians from "
            f"{HESSIAN_SAMPLES} training samples per task; retraining: Adam lr {LR}, batch {BATCH}, the tasks' "
            "cross-entropy plus distillation from the originals; one step = one batch of each task (two Adam updates, the tasks alternating). "
            "Errors on the full 10,000-image test splits.\n\n" + "\n\n".join(parts))
    print(body)
    if not args.no_write:
        write_section(BENCHMARKS, "mtz", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
