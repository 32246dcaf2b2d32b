#!/usr/bin/env python3
"""Scale of the NeuralMerger codebook method: two VGG-16-sized models, `--preset light`, no
calibration, written into BENCHMARKS.md (section `codebook_scale`).

Two VGG-16 (configuration D, no BatchNorm, ~138M parameters each) with random weights from two
seeds are exported to ONNX once (reused afterwards), then merged by the command line in a fresh
subprocess so that its wall time and peak resident memory are its own. Targets (issue 5): under
5 minutes and under 8 GB on this machine.

    python tools/bench/codebook_scale.py [--out-dir build/bench_models] [--no-write]

Exits with status 1 when the merge fails or misses a target.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import ROOT, publish  # noqa: E402  (tools/bench is not a package)

TARGET_S = 300.0
TARGET_BYTES = 8e9
VGG16_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16(seed: int):
    """VGG-16 configuration D (13 conv3x3 + ReLU, 5 maxpools, FC 25088-4096-4096-1000), default init."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers, channels = [], 3
    for v in VGG16_D:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=True)]
            channels = v
    return nn.Sequential(*layers, nn.Flatten(),
                         nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True),
                         nn.Linear(4096, 4096), nn.ReLU(inplace=True),
                         nn.Linear(4096, 1000)).eval()


def ensure_models(out_dir: Path) -> list[Path]:
    """The two exported VGG-16 files in `out_dir`, exported only when missing."""
    paths = [out_dir / f"vgg16_random_{seed}.onnx" for seed in (0, 1)]
    for seed, path in enumerate(paths):
        if path.exists():
            continue
        import torch

        out_dir.mkdir(parents=True, exist_ok=True)
        model = vgg16(seed)
        print(f"exporting {path} ({sum(p.numel() for p in model.parameters()):,} parameters)", flush=True)
        tmp = path.with_suffix(".onnx.tmp")
        with torch.no_grad():
            torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), str(tmp), dynamo=False, opset_version=17,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
        os.replace(tmp, path)
        del model
    return paths


def run_merge(cmd: list[str]) -> dict:
    """Run the merge as a child: wall seconds, its CPU seconds (user + system), its peak RSS in
    bytes, its return code and the load average before and after (the machine may be shared)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if after.ru_maxrss <= before.ru_maxrss and before.ru_maxrss:  # an earlier child peaked higher
        print("warning: an earlier child process had a higher peak RSS; the figure is an upper bound")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall": wall, "cpu": cpu, "peak": after.ru_maxrss * 1024,  # ru_maxrss: KiB on Linux
            "rc": proc.returncode, "load": (load0, os.getloadavg()[0])}


def total_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def merged_figures(report: Path) -> tuple[list[dict], dict]:
    """The per-layer codebook table and the check on random inputs, from the merge's --report (the
    model's metadata holds no timings: they would make its bytes differ from run to run)."""
    fidelity = json.loads(report.read_text())["fidelity"]
    return fidelity.get("codebook_layers", []), fidelity.get("max_rel_diff_random_inputs", {})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=ROOT / "build/bench_models",
                    help="where the two VGG-16 files are cached and the merged model is written")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of updating BENCHMARKS.md")
    args = ap.parse_args(argv)

    from onnxmerge.measure.latency import machine_info

    inputs = ensure_models(args.out_dir.resolve())
    output = args.out_dir.resolve() / "vgg16_codebook_light.onnx"
    report = output.with_name("vgg16_codebook_light_report.json")
    cmd = [sys.executable, "-m", "onnxmerge", *map(str, inputs), "-o", str(output),
           "--method", "codebook", "--preset", "light", "--no-latency", "--quiet", "--report", str(report)]
    print("running:", shlex.join(cmd), flush=True)
    run = run_merge(cmd)
    wall, peak, rc, cpu = run["wall"], run["peak"], run["rc"], run["cpu"]
    print(f"merge: rc {rc}, {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {peak / 1e9:.2f} GB, "
          f"load average {run['load'][0]:.1f} -> {run['load'][1]:.1f}", flush=True)

    info = machine_info()
    shown = ["python", "-m", "onnxmerge", *(os.path.relpath(p, ROOT) for p in inputs), "-o",
             os.path.relpath(output, ROOT), *cmd[cmd.index("--method"):-1], os.path.relpath(report, ROOT)]
    in_bytes = [p.stat().st_size for p in inputs]
    lines = ["## NeuralMerger codebook at scale: two VGG-16 (random weights), `--preset light`, no calibration", "",
             "Written by `tools/bench/codebook_scale.py`; rerun it to update this section. The two models are "
             "VGG-16 configuration D (13 conv3x3, FC 25088-4096-4096-1000, no BatchNorm) with torch's default "
             "initialisation from seeds 0 and 1, exported to ONNX opset 17. The merge runs as a fresh process; "
             "its peak memory is the child's maximum resident set size (getrusage).", "",
             f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- command: `{shlex.join(shown)}`",
             f"- machine: {info['cpu']}, {info['usable_cores']} usable cores, {total_ram() / 2**30:.0f} GiB RAM, "
             f"Python {info['python']}, numpy {info['numpy']}, onnx {info['onnx']}",
             f"- 1-minute load average when the merge started / ended: {run['load'][0]:.1f} / {run['load'][1]:.1f} "
             f"(other work on the machine lengthens the wall time; the CPU time below does not depend on it as much)"]
    if rc != 0 or not output.exists():
        lines += ["", f"**FAIL**: the merge exited with status {rc} after {wall:.1f} s "
                  f"(peak RSS {peak / 1e9:.2f} GB); no figures."]
        ok = False
    else:
        out_bytes = output.stat().st_size
        rows, diffs = merged_figures(report)
        km = sum(r.get("kmeans_seconds", 0.0) for r in rows)
        dense = sum(r.get("dense_params", 0) for r in rows)
        stored = sum(r.get("codebook_params", 0) + r.get("index_params", 0) for r in rows)
        ok_t, ok_m = wall < TARGET_S, peak < TARGET_BYTES
        ok = ok_t and ok_m
        lines += [f"- wall time: **{wall:.1f} s** (target < {TARGET_S:.0f} s: {'pass' if ok_t else 'FAIL'}); "
                  f"CPU time of the merge process (user + system): {cpu:.1f} s",
                  f"- peak memory (RSS): **{peak / 1e9:.2f} GB** (target < {TARGET_BYTES / 1e9:.0f} GB: "
                  f"{'pass' if ok_m else 'FAIL'})",
                  f"- files: {in_bytes[0] / 1e6:.1f} MB + {in_bytes[1] / 1e6:.1f} MB -> {out_bytes / 1e6:.1f} MB "
                  f"(**{sum(in_bytes) / out_bytes:.1f}x** smaller than the two inputs together)",
                  f"- k-means: {km:.1f} s summed over the layers, {km / wall:.0%} of the wall time"]
        if stored:
            lines.append(f"- merged layers: {dense:,} dense parameters -> {stored:,} codebook + index entries "
                         f"({dense / stored:.1f}x fewer entries; indices are uint8 for C <= 256)")
        if diffs:
            lines.append("- merged vs originals on random inputs (max abs difference / output magnitude): "
                         + ", ".join(f"{task} {d:.2g}" for task, d in diffs.items()))
        lines += ["", "| layer | r | C | segments | k-means rel. error | k-means s | dense params "
                  "| codebook params | index params |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r.get('layer', '?')} | {r.get('r', '')} | {r.get('codewords', '')} | "
                         f"{r.get('segments', '')} | {r.get('kmeans_rel_error', float('nan')):.4f} | "
                         f"{r.get('kmeans_seconds', 0.0):.2f} | {r.get('dense_params', 0):,} | "
                         f"{r.get('codebook_params', 0):,} | {r.get('index_params', 0):,} |")
        if not rows:
            lines.append("| (no `codebook_layers` in the merged model's metadata) | | | | | | | | |")
        lines += ["", f"Result: **{'PASS' if ok else 'FAIL'}** — {wall:.1f} s against < {TARGET_S:.0f} s and "
                  f"{peak / 1e9:.2f} GB against < {TARGET_BYTES / 1e9:.0f} GB."]
    body = "\n".join(lines)
    publish("codebook_scale", body, write=not args.no_write)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
