#!/usr/bin/env python3
"""NeuralMerger (`--method codebook`) on real data, beside the paper's figures; writes BENCHMARKS.md.

Experiments (Chou et al., IJCAI 2018, section 4):

- `lenet` (4.1, with spoken digits in place of Sound20): the paper's LeNet (conv 32 5x5, pool,
  conv 64 5x5, pool, FC 1024, output) trained on FSDD log-spectrograms (32x32) and on Fashion-MNIST
  resized to 32x32, merged at `accu` and `light`, calibrated, evaluated on the full test splits;
  plus the paper's Table 3 comparison: each model compressed alone with the same settings and the
  same calibration budget.
- `vggzf` (4.2): a VGG-style net (Fashion-MNIST 32x32) and a ZF-style net (MNIST 32x32; fewer,
  larger-kernel layers) merged with the automatic alignment.

Models come from `tools/train_models.py` (group "bench", trained into build/bench_models on first
use). Compression is joint and counted from file bytes: the originals' files together / the merged
file (codebooks, indices, heads, biases, graph). Data: train splits calibrate, test splits evaluate.

    python tools/bench/codebook.py                          # both experiments, both presets
    python tools/bench/codebook.py --experiment lenet --steps 2000
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks_md import BENCHMARKS, require, write_section  # noqa: E402  (tools/ is not a package)

# task name -> (bench model, dataset, image size for load_named)
EXPERIMENTS = {
    "lenet": {"digits": ("paper_lenet_fsdd", "fsdd", None), "fashion": ("paper_lenet_fashion32", "fashion-mnist", 32)},
    "vggzf": {"fashion": ("vgg_fashion32", "fashion-mnist", 32), "mnist": ("zf_mnist32", "mnist", 32)},
}
# the paper's figures: joint compression, accuracy change per task in points (its task order)
PAPER = {
    "lenet": {"accu": "10.4x; sound -0.06, fashion -0.68 (Table 2)",
              "light": "15.3x; sound -0.76, fashion -1.40 (Table 2)"},
    "vggzf": {"accu": "12.1x (Table 5)", "light": "20.1x (Table 5)"},
}
TARGET = {"accu": (10.0, 0.7), "light": (15.0, 1.4)}  # the issue's acceptance on the LeNet pair


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def run(name: str, presets: list[str], steps: int, lr: float, individual: bool, work: Path, log) -> list[str]:
    from train_models import ensure_bench_models

    from onnxmerge.api import merge
    from onnxmerge.calibration.calibrate import CalibrationConfig, calibrate
    from onnxmerge.data import load_named
    from onnxmerge.measure.evaluate import evaluate
    from onnxmerge.model.contract import write_metadata
    from onnxmerge.model.saving import save_atomic

    tasks = EXPERIMENTS[name]
    paths = ensure_bench_models([m for m, _, _ in tasks.values()])
    models = {t: paths[m] for t, (m, _, _) in tasks.items()}
    calib = {t: load_named(ds, "train", size=size) for t, (_, ds, size) in tasks.items()}
    test = {t: load_named(ds, "test", size=size) for t, (_, ds, size) in tasks.items()}
    config = CalibrationConfig(steps=steps, lr=lr, batch_size=64)
    orig_bytes = sum(p.stat().st_size for p in models.values())

    def one(inputs: dict, preset: str, tag: str) -> dict:
        out = work / f"{name}_{tag}_{preset}.onnx"
        t0 = time.perf_counter()
        merged = merge([str(p) for p in inputs.values()], out, method="codebook", names=list(inputs),
                       params={"preset": preset})
        t_merge = time.perf_counter() - t0
        data = {t: test[t] for t in inputs}
        before = evaluate(merged.model, merged.info, data, {t: str(p) for t, p in inputs.items()}, progress=False)
        t0 = time.perf_counter()
        tuned = calibrate(merged.model, merged.info, {t: str(p) for t, p in inputs.items()},
                          {t: calib[t] for t in inputs}, config, progress=False)
        t_cal = time.perf_counter() - t0
        write_metadata(tuned.model, merged.info)
        save_atomic(tuned.model, out)
        after = evaluate(tuned.model, merged.info, data, {t: str(p) for t, p in inputs.items()}, progress=False)
        return {"bytes": out.stat().st_size, "orig_bytes": sum(p.stat().st_size for p in inputs.values()),
                "before": before, "after": after, "t_merge": t_merge, "t_cal": t_cal,
                "layers": merged.info.fidelity["codebook_layers"]}

    lines = [f"### {name}: " + " + ".join(f"{m} ({t})" for t, (m, _, _) in tasks.items()), ""]
    for preset in presets:
        res = one(models, preset, "merged")
        ratio = res["orig_bytes"] / res["bytes"]
        lines += [f"**{preset}** (merge {res['t_merge']:.0f} s, calibration {steps} steps {res['t_cal']:.0f} s): "
                  f"joint compression **{ratio:.1f}x** from file bytes ({orig_bytes:,} -> {res['bytes']:,}); "
                  f"paper: {PAPER[name][preset]}.", "",
                  "| task | original | merged, before calibration | merged, calibrated | change (points) |",
                  "|---|---|---|---|---|"]
        verdict = []
        for t in tasks:
            o, b, a = (res["before"][t]["original_accuracy"], res["before"][t]["accuracy"],
                       res["after"][t]["accuracy"])
            lines.append(f"| {t} | {_pct(o)} | {_pct(b)} | {_pct(a)} | {100 * (a - o):+.2f} |")
            verdict.append(100 * (o - a))
        if name == "lenet" and preset in TARGET:
            want_ratio, want_loss = TARGET[preset]
            ok = ratio >= want_ratio and max(verdict) <= want_loss
            lines += ["", f"Acceptance ({preset}: at least {want_ratio:.0f}x, at most {want_loss} points lost per "
                          f"task): **{'met' if ok else 'not met'}** ({ratio:.1f}x, worst loss {max(verdict):.2f} points)."]
        lines += ["", "| layer | r | C | segments | k-means rel. error | k-means s | dense params | codebook | indices |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {g['layer']} | {g['r']} | {g['codewords']} | {g['segments']} | {g['kmeans_rel_error']:.4f} | "
                  f"{g['kmeans_seconds']:.2f} | {g['dense_params']:,} | {g['codebook_params']:,} | "
                  f"{g['index_params']:,} |" for g in res["layers"]]
        lines.append("")
        if individual:
            lines += [f"Individual models, each compressed alone with `{preset}` and calibrated {steps} steps "
                      "(the paper's Table 3 comparison):", "",
                      "| task | original | alone, calibrated | compression alone | merged, calibrated |",
                      "|---|---|---|---|---|"]
            for t in tasks:
                alone = one({t: models[t]}, preset, f"alone_{t}")
                lines.append(f"| {t} | {_pct(alone['before'][t]['original_accuracy'])} | "
                             f"{_pct(alone['after'][t]['accuracy'])} | {alone['orig_bytes'] / alone['bytes']:.1f}x | "
                             f"{_pct(res['after'][t]['accuracy'])} |")
            lines.append("")
        log("\n".join(lines))
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", nargs="+", choices=list(EXPERIMENTS), default=list(EXPERIMENTS))
    p.add_argument("--presets", nargs="+", choices=["accu", "light"], default=["accu", "light"])
    p.add_argument("--steps", type=int, default=1500, help="calibration steps per merge")
    p.add_argument("--lr", type=float, default=2e-4, help="calibration learning rate (the paper's 2e-4)")
    p.add_argument("--no-individual", action="store_true", help="skip the individual-model comparison")
    p.add_argument("--keep", type=Path, help="keep the merged models in this folder")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)

    from onnxmerge.measure.latency import machine_info

    if not require("codebook", data=True):
        return 1
    header = ["Written by `tools/bench/codebook.py`; rerun it to update this section.", "",
              f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
              f"- command: `python {shlex.join(['tools/bench/codebook.py', *argv])}`",
              f"- machine: {machine_info()['cpu']}, CPU",
              "- presets: accu = conv r=4 C=128, fc r=4 C=64; light = r=8 C=64 (heads dense, per task)",
              f"- calibration: {args.steps} steps, lr {args.lr}, batch 64, CE + per-layer L1 + distillation "
              "(onnxmerge.calibration.calibrate defaults otherwise), on the train splits; accuracy on the full test splits",
              "- compression: the originals' ONNX files together / the merged ONNX file", ""]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.experiment:  # one section per experiment, so that each can be rerun alone
            lines = run(name, args.presets, args.steps, args.lr, name == "lenet" and not args.no_individual,
                        work, lambda text: print(text, flush=True))
            if not args.no_write:
                title = f"## Codebook (NeuralMerger), experiment {name}, beside the paper"
                write_section(BENCHMARKS, f"codebook_{name}", "\n".join([title, "", *header, *lines]))
                print(f"updated {BENCHMARKS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
