#!/usr/bin/env python3
"""Scale of Multi-Task Zipping: the pair analysis of two VGG-16-sized models on 256 calibration
samples, written into BENCHMARKS.md (section `mtz_scale`).

The two VGG-16 (configuration D, ~138M parameters each, random weights from two seeds) are the ones
tools/bench/codebook_scale.py exports (reused). Each task's 256 calibration samples are seeded
standard-normal 3x224x224 images (no ImageNet here; the cost does not depend on the pixels). The
merge runs by the command line in a fresh process, every neuron shared, no retraining: layer
inputs, Hessians (eqs. 7-8), pair costs (eq. 12), pairing and merged weights (eqs. 10-11) for all
15 hidden layers, then the merged model is checked and written. Targets (issue 7): under 15 minutes
and under 16 GB peak memory on this machine.

    python tools/bench/mtz_scale.py [--out-dir build/bench_models] [--no-write]

Exits with status 1 when the merge fails or misses a target.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import ROOT, publish  # noqa: E402  (tools/bench is not a package)
from codebook_scale import ensure_models, run_merge, total_ram  # noqa: E402

TARGET_S = 15 * 60.0
TARGET_BYTES = 16e9
SAMPLES = 256


def calibration_files(out_dir: Path, names: list[str]) -> list[Path]:
    """One .npz of SAMPLES seeded random images per task (written once)."""
    paths = []
    for seed, name in enumerate(names):
        path = out_dir / f"{name}_calib{SAMPLES}.npz"
        if not path.exists():
            x = np.random.default_rng(100 + seed).standard_normal((SAMPLES, 3, 224, 224), dtype=np.float32)
            np.savez(path, x=x)
        paths.append(path)
    return paths


def mtz_figures(report: Path) -> dict:
    """The pass's figures from the report JSON (timings are kept out of the model file, which must
    be byte-identical between runs)."""
    return json.loads(report.read_text())["fidelity"].get("mtz", {})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=ROOT / "build/bench_models")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of updating BENCHMARKS.md")
    args = ap.parse_args(argv)

    from onnxmerge.measure.latency import machine_info

    out_dir = args.out_dir.resolve()
    inputs = ensure_models(out_dir)
    names = [p.stem for p in inputs]
    calib = calibration_files(out_dir, names)
    output, report = out_dir / "vgg16_mtz.onnx", out_dir / "vgg16_mtz_report.json"
    flags = ["--method", "mtz", "--share-ratio", "1", "--hessian-samples", str(SAMPLES),
             *[a for n, c in zip(names, calib) for a in ("--calib", f"{n}={c}")], "--no-latency", "--quiet",
             "--report", str(report)]
    cmd = [sys.executable, "-m", "onnxmerge", *map(str, inputs), "-o", str(output), *flags]
    print("running:", shlex.join(cmd), flush=True)
    run = run_merge(cmd)
    wall, peak, rc, cpu = run["wall"], run["peak"], run["rc"], run["cpu"]
    print(f"merge: rc {rc}, {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {peak / 1e9:.2f} GB", flush=True)

    info = machine_info()
    shown = ["python", *(a.replace(f"{ROOT}{os.sep}", "") for a in cmd[1:])]
    lines = ["## Multi-Task Zipping at scale: two VGG-16 (random weights), every neuron shared, no retraining", "",
             "Written by `tools/bench/mtz_scale.py`; rerun it to update this section. The models are the two "
             "VGG-16 of `codebook_scale` (configuration D, no BatchNorm, seeds 0 and 1); each task's calibration "
             f"data is {SAMPLES} seeded standard-normal 3x224x224 images. The merge runs as a fresh process; its "
             "peak memory is the child's maximum resident set size (getrusage).", "",
             f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- command: `{shlex.join(shown)}`",
             f"- machine: {info['cpu']}, {info['usable_cores']} usable cores, {total_ram() / 2**30:.0f} GiB RAM",
             f"- 1-minute load average when the merge started / ended: {run['load'][0]:.1f} / {run['load'][1]:.1f}"]
    ok = rc == 0 and output.exists()
    if not ok:
        lines += ["", f"**FAIL**: the merge exited with status {rc} after {wall:.1f} s (peak RSS {peak / 1e9:.2f} GB)."]
    else:
        fig = mtz_figures(report)
        ok_t, ok_m = wall < TARGET_S, peak < TARGET_BYTES
        ok = ok_t and ok_m
        spent = fig.get("seconds", {})
        lines += [f"- wall time of the whole command: **{wall:.0f} s** (target < {TARGET_S:.0f} s: "
                  f"{'pass' if ok_t else 'FAIL'}); CPU time {cpu:.0f} s",
                  f"- peak memory (RSS): **{peak / 1e9:.2f} GB** (target < {TARGET_BYTES / 1e9:.0f} GB: "
                  f"{'pass' if ok_m else 'FAIL'})",
                  "- the pair analysis by stage (seconds): " + ", ".join(f"{k} {v:.0f}" for k, v in spent.items())
                  + f"; {sum(spent.values()):.0f} in all, the rest is loading, checking and writing the models",
                  "", "| layer | pairs | optimal cost | greedy cost | pseudo-inverse fallback |", "|---|---|---|---|---|"]
        for r in fig.get("layers", []):
            lines.append(f"| {r['layer']} | {r['shared']} of {min(r['candidates'])} | {r.get('cost_optimal', 0):.4g} | "
                         f"{r.get('cost_greedy', 0):.4g} | {'yes' if r.get('fallback_pinv') else 'no'} |")
        lines += ["", f"Result: **{'PASS' if ok else 'FAIL'}**: {wall:.0f} s against < {TARGET_S:.0f} s and "
                  f"{peak / 1e9:.2f} GB against < {TARGET_BYTES / 1e9:.0f} GB."]
    body = "\n".join(lines)
    publish("mtz_scale", body, write=not args.no_write)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
