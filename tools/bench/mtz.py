#!/usr/bin/env python3
"""Multi-Task Zipping on real data, beside the paper's figures: each part writes its own BENCHMARKS.md section.

He, Zhou, Thiele (NeurIPS 2018). Models from `tools/train_models.py --group mtz` (build/mtz_models,
the missing ones trained on first use). Calibration (Hessians, retraining) uses the training splits;
errors are on the full 10,000-image test splits.

- lenet300, lenet5 (sections mtz_lenet300, mtz_lenet5; the paper's Table 1 and Table 2's same-task
  row): two LeNet-300-100 / two LeNet-5 on MNIST from different seeds, hidden neurons permuted; every
  hidden neuron shared. Error before retraining, after at most 550 / 600 retraining steps in all
  (split evenly over the zipped layers), the random-sharing baseline (Fig. 2, no retraining) and
  greedy pairing.
- tasks (section mtz_tasks): LeNet-5 on MNIST + LeNet-5 on Fashion-MNIST (trained on the first 55,000
  training images), adaptive (`--tolerance 0.5`, measured on the other 5,000 with --validation): the
  weights shared and the speed-up over the two originals (batch 1, one thread, medians), with 300 and
  with 100 retraining steps per trial.
- resnet (section mtz_resnet): the ResNet-style pair (MNIST, Fashion-MNIST, trained on the first
  55,000), half of every channel space shared, retrained as tasks (the adaptive search takes over an
  hour here: 7 layers choose pairs, and a trial of 300 steps is minutes).

A retraining step is the paper's iteration: one batch of every task (calibrate() alternates the
tasks, so a step of two tasks is two optimizer updates). Every comparison with the paper or with a
target in a section is computed here from the measured figures.

    python tools/bench/mtz.py [--only lenet300 lenet5 tasks resnet] [--no-train] [--no-write]

Each part writes its section as soon as it is done, so `--only PART` regenerates exactly that
section. Parts whose models are missing are skipped with --no-train (else they are trained first).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import BENCHMARKS, ROOT, markers, read_section, write_section  # noqa: E402  (tools/bench is not a package)

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))
from train_models import VALIDATION_FROM  # noqa: E402  (where the *_55k models' validation split starts)

MODELS = ROOT / "build" / "mtz_models"
HESSIAN_SAMPLES = 2048
LR, BATCH = 3e-3, 256  # retraining: Adam, decayed by 0.3 at each third of a layer's steps (best of 3 tried on LeNet-300-100)
# the different-tasks pair: models trained on the first 55,000 training images, the rest validates
# (--validation); retraining at a third of Table 1's lr, which alone moved the Fashion model's accuracy
TASKS_STEPS, TASKS_LR = 300, 1e-3
TASKS_STEPS_ROWS = (TASKS_STEPS, 100)  # the tasks section's rows: retraining steps per trial
# the paper's figures (He, Zhou, Thiele 2018): Table 1 (LeNet-300-100) and Table 2 (LeNet-5, same task)
# test errors in %; "before" is the mean error increase with every neuron shared and no retraining
PAPER = {
    "lenet300": {"originals": (1.57, 1.60), "steps": 550, "after": 1.64, "before": 1.50, "random": 33.47},
    "lenet5": {"originals": (0.89, 0.95), "steps": 600, "after": 0.93},
}
PAPER_TASKS = ("VGG-16 on ImageNet + VGG-16 on CelebA", 39.61)  # the paper's different-tasks pair, % of parameters shared
RETRAINED_TARGET = 0.1  # Table 1 / 2 target: mean error change after retraining at most this many points
TASKS_TOLERANCE = 0.5  # the different-tasks target: each task's test error within this many points of its original
ARCH_NAME = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5"}
# each part's models, and its BENCHMARKS.md section
PART_MODELS = {
    "lenet300": ["lenet300_mnist_s0", "lenet300_mnist_s1"],
    "lenet5": ["lenet5_mnist_s0", "lenet5_mnist_s1"],
    "tasks": ["lenet5_mnist_55k", "lenet5_fashion_55k"],
    "resnet": ["resnet_mnist_55k", "resnet_fashion_55k"],
}
SECTIONS = {part: f"mtz_{part}" for part in PART_MODELS}


def ensure_models(parts: list[str]) -> None:
    """Train the models of `parts` that build/mtz_models lacks."""
    missing = [n for part in parts for n in PART_MODELS[part] if not (MODELS / f"{n}.onnx").exists()]
    if not missing:
        return
    import train_models

    train_models.main(["--group", "mtz", "--only", *missing])


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
    return [row], {"errors": err, "originals": orig,
                   "params": {"merged": merged, "originals": originals, "shared": shared, "each": each},
                   "latency": lat, "layers": layers, "fidelity": result.info.fidelity["mtz"], "seconds": seconds}


def points(x: float) -> str:
    return f"{x:+.2f}"


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def header(part: str, title: str, seconds: float, argv_rest: list[str]) -> list[str]:
    """The lines every section starts with: title, the command that rewrites exactly this section, date, machine."""
    from onnxmerge.measure.latency import machine_info

    info = machine_info()
    command = shlex.join(["python", "tools/bench/mtz.py", "--only", part, *argv_rest])
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"
    return [title, "",
            f"Written by `{command}`; rerun it to update this section.", "",
            f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
            f"- command: `{command}` ({seconds:.0f} s in all)",
            f"- machine: {info['cpu']}, {info['usable_cores']} usable of {info['logical_cores']} logical cores "
            f"(load average 1/5/15 min at the end: {load}); wall times follow the machine's load",
            "- models: `python tools/train_models.py --group mtz` (build/mtz_models): "
            + ", ".join(f"`{n}`" for n in PART_MODELS[part]),
            f"- Hessians from {HESSIAN_SAMPLES:,} training samples per task; errors on the full 10,000-image test "
            "splits; a retraining step (the paper's iteration) is one batch of each task (two Adam updates, the "
            "tasks alternating), the tasks' cross-entropy plus distillation from the originals", ""]


def table1_section(arch: str, budget: int, layers: int, argv_rest: list[str]) -> str:
    t0 = time.perf_counter()
    rows, fig = table1(arch, budget, layers)
    seconds = time.perf_counter() - t0
    paper = PAPER[arch]
    name = ARCH_NAME[arch]
    orig = fig["originals"]
    none, random_, greedy = (fig["all shared, no retraining"], fig["random sharing, no retraining (Fig. 2 baseline)"],
                             fig["all shared, greedy pairing, no retraining"])
    retrained = next(v for k, v in fig.items() if "retraining steps per layer" in k)
    paper_mean = float(np.mean(paper["originals"]))
    paper_after = paper["after"] - paper_mean
    lines = header(arch, f"## Multi-Task Zipping: two {name} on MNIST (same task, different seeds), every hidden "
                         "neuron shared", seconds, argv_rest)
    lines += [f"The two models differ in seed and data order, their hidden units randomly permuted after training. "
              f"Retraining: Adam lr {LR}, batch {BATCH} per task, at most {budget} steps in all split evenly over "
              f"the {layers} zipped layers. \"mean change\" is the mean of the two merged heads' errors minus the "
              "mean of the originals'.", "",
              "| pair | setting | originals' error (%) | merged error (%) | mean change (points) | seconds |",
              "|---|---|---|---|---|---|", *rows, "",
              f"Paper ({name}): originals {paper['originals'][0]:.2f}% / {paper['originals'][1]:.2f}%"
              + (f"; every neuron shared, before retraining {points(paper['before'])} points on average"
                 if "before" in paper else "")
              + f"; after {paper['steps']} iterations {paper['after']:.2f}% ({points(paper_after)} points against "
              "the originals' mean)"
              + (f"; random sharing {paper['random']:.2f}%" if "random" in paper else "") + ".", "",
              f"- Target after retraining, mean change at most {points(RETRAINED_TARGET)} points: "
              f"{verdict(retrained['mean_increase'] <= RETRAINED_TARGET)} ({points(retrained['mean_increase'])}; "
              f"merged {retrained['errors']['s0']:.2f}% / {retrained['errors']['s1']:.2f}% against the originals' "
              f"{orig['s0']:.2f}% / {orig['s1']:.2f}%; the paper: {points(paper_after)}).",
              f"- Before retraining, the optimal pairing: {points(none['mean_increase'])} points"
              + (f", {'below' if none['mean_increase'] < paper['before'] else 'not below'} the paper's "
                 f"{points(paper['before'])}" if "before" in paper else "")
              + f"; greedy pairing (the authors' code): {points(greedy['mean_increase'])}.",
              f"- Random sharing (Fig. 2 baseline): {random_['errors']['s0']:.2f}% / {random_['errors']['s1']:.2f}% "
              f"({points(random_['mean_increase'])} points)"
              + (f", the paper: {paper['random']:.2f}%" if "random" in paper else "") + "."]
    return "\n".join(lines)


TASKS_HEADER = ["| pair | shared neurons per layer | originals' error (%) | merged error (%) | weights shared "
                "(of one model's) | parameters saved | speed-up vs originals (batch 1, 1 thread) | seconds |",
                "|---|---|---|---|---|---|---|---|"]


def changes(fig: dict) -> dict[str, float]:
    return {k: fig["errors"][k] - fig["originals"][k] for k in fig["errors"]}


def tasks_section(argv_rest: list[str]) -> str:
    t0 = time.perf_counter()
    pair = {"mnist": (MODELS / "lenet5_mnist_55k.onnx", "mnist"),
            "fashion": (MODELS / "lenet5_fashion_55k.onnx", "fashion-mnist")}
    rows, figs = [], {}
    for steps in TASKS_STEPS_ROWS:
        r, figs[steps] = zip_tasks(pair, steps, split_at=VALIDATION_FROM, lr=TASKS_LR, share_ratio=1.0,
                                   tolerance=TASKS_TOLERANCE)
        rows += [f"| {steps} " + row for row in r]
    seconds = time.perf_counter() - t0
    main_fig = figs[TASKS_STEPS]
    lines = header("tasks", f"## Multi-Task Zipping: different tasks, LeNet-5 MNIST + LeNet-5 Fashion-MNIST, adaptive "
                            f"(`--tolerance {TASKS_TOLERANCE}`)", seconds, argv_rest)
    lines += [f"The two models were trained on the first {VALIDATION_FROM:,} training images only; the other "
              f"{60_000 - VALIDATION_FROM:,} of each training split are the `--validation` data on which "
              "`--tolerance` is measured, and the errors below are on the test splits, which no choice saw. "
              f"Retraining: Adam lr {TASKS_LR}, batch {BATCH} per task, the steps below per trial. \"Weights "
              "shared\" are the weights stored once for both tasks (the originals' total minus the merged model's), "
              f"against one original's {main_fig['params']['each'][0]:,}.", "",
              "| retraining steps per trial " + TASKS_HEADER[0], "|---" + TASKS_HEADER[1], *rows, ""]
    for steps, fig in figs.items():
        change = changes(fig)
        held = fig["fidelity"]
        ref, last = held.get("original_accuracy_held_out", {}), fig["layers"][-1].get("accuracy", {})
        kept = " / ".join(points(100 * (last[t] - ref[t])) for t in ref if t in last)
        share = 100 * fig["params"]["shared"] / fig["params"]["each"][0]
        speed = fig["latency"]["speedup_vs_originals"]
        lines += [f"- {steps} steps per trial: target, each task's test error within {TASKS_TOLERANCE} points of its "
                  f"original, {verdict(all(c <= TASKS_TOLERANCE for c in change.values()))} "
                  f"({' / '.join(points(c) for c in change.values())} points; on the validation data the search kept "
                  f"{kept} points of accuracy, in {held.get('trials', '?')} trials); {share:.1f}% of one model's "
                  f"weights shared, {100 * (1 - fig['params']['merged'] / fig['params']['originals']):.1f}% of the two "
                  f"models' parameters saved; {speed:.2f}x {'faster' if speed >= 1 else 'slower'} than the two "
                  "originals run one after the other (ratio of medians, one thread, batch 1, interleaved in one "
                  "process)."]
    lines += [f"- The paper ({PAPER_TASKS[0]}): {PAPER_TASKS[1]:.2f}% of the parameters shared."]
    return "\n".join(lines)


def resnet_section(argv_rest: list[str]) -> str:
    t0 = time.perf_counter()
    rows, fig = zip_tasks({"mnist": (MODELS / "resnet_mnist_55k.onnx", "mnist"),
                           "fashion": (MODELS / "resnet_fashion_55k.onnx", "fashion-mnist")}, TASKS_STEPS,
                          split_at=VALIDATION_FROM, lr=TASKS_LR, share_ratio=0.5)
    seconds = time.perf_counter() - t0
    change = changes(fig)
    speed = fig["latency"]["speedup_vs_originals"]
    choosing = ", ".join(r["layer"] for r in fig["layers"])
    lines = header("resnet", "## Multi-Task Zipping: ResNet-style pair (MNIST + Fashion-MNIST), `--share-ratio 0.5`",
                   seconds, argv_rest)
    lines += ["The tests' ResNet architecture (BatchNorm, folded on load), trained on the first "
              f"{VALIDATION_FROM:,} training images. Half the channels of every channel space shared ({choosing} "
              "choose the pairs; the other layers of a residual space follow them), not adaptive (a search would "
              f"run several trials of {TASKS_STEPS} steps, minutes each, for each of these {len(fig['layers'])} "
              f"layers). Retraining: Adam lr {TASKS_LR}, batch "
              f"{BATCH} per task, {TASKS_STEPS} steps per zipped layer.", "",
              *TASKS_HEADER, *rows, "",
              f"- Test error change at half sharing: {' / '.join(points(c) for c in change.values())} points "
              f"({', '.join(change)}); {100 * fig['params']['shared'] / fig['params']['each'][0]:.1f}% of one model's "
              "weights shared.",
              f"- The merged model is {speed:.2f}x {'faster' if speed >= 1 else 'slower'} than the two originals "
              "run one after the other (one thread, batch 1, medians interleaved in one process)"
              + ("; on these small tensors the Slice / Concat nodes around every zipped layer cost more than the "
                 "shared convolutions save." if speed < 1 else ".")]
    return "\n".join(lines)


def retire_assembled_section() -> None:
    """Earlier code wrote one section `mtz`, assembled by hand from the parts' outputs: its place goes to
    the parts' own sections (empty until their part runs). A no-op once it is gone."""
    from onnxmerge.model.saving import write_text_atomic

    old = read_section(BENCHMARKS, "mtz")
    if old is None:
        return
    blank = "\n\n".join("\n".join(markers(name)) for name in SECTIONS.values()
                         if read_section(BENCHMARKS, name) is None)
    write_text_atomic(BENCHMARKS, BENCHMARKS.read_text().replace(old + "\n\n", blank + "\n\n" if blank else "", 1))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts_all = list(PART_MODELS)
    ap.add_argument("--only", nargs="+", choices=parts_all, default=parts_all)
    ap.add_argument("--no-train", action="store_true", help="do not train missing models (their parts are skipped)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    if not args.no_train:
        ensure_models(args.only)
    runnable = [p for p in parts_all if p in args.only and all((MODELS / f"{n}.onnx").exists() for n in PART_MODELS[p])]
    for part in sorted(set(args.only) - set(runnable)):
        print(f"mtz bench: skipping {part}: its models are missing (train them with tools/train_models.py --group mtz)")
    if not args.no_write:
        retire_assembled_section()
    argv_rest: list[str] = []  # the command a section names rewrites exactly it (--no-train, --no-write change no figure)
    for part in runnable:
        if part == "lenet300":
            body = table1_section("lenet300", 550, 2, argv_rest)
        elif part == "lenet5":
            body = table1_section("lenet5", 600, 3, argv_rest)
        elif part == "tasks":
            body = tasks_section(argv_rest)
        else:
            body = resnet_section(argv_rest)
        print(body, flush=True)
        if not args.no_write:
            write_section(BENCHMARKS, SECTIONS[part], body)
            print(f"updated section {SECTIONS[part]} of {BENCHMARKS}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
