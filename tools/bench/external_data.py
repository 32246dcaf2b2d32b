#!/usr/bin/env python3
"""Big models with external data: peak memory of a `pack` merge against the size of its inputs.

Two VGG-style models with random weights (three conv3x3-ReLU-maxpool blocks, then FC 4096-H-H-10,
H chosen for the requested size) are written with their weights in external data files (cached in
`--out-dir`, rebuilt when the sizes change), then merged by the command line in a fresh subprocess,
so that its wall time and peak resident memory (getrusage of the child) are its own. The target of
issue 8 is a peak of at most three times the inputs' size on disk (model files + external data).

    python tools/bench/external_data.py [--mb 400,550] [--out-dir build/bench_models/external_data]
                                        [--label TEXT] [--no-write]

`--mb 1100,1100` gives a merged model over 2 GB, which is itself written with external data.
Prints the figures and writes them to the `external_data` section of BENCHMARKS.md (unless
`--no-write`): the run's details, and a row in the table of runs by code version, labelled
`--label` (default: the git commit, marked when the working tree has changes); the table's other
rows are kept from the file, as the figures of earlier code cannot be measured again. Exits with
status 1 when the merge fails or the output does not load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import BENCHMARKS, ROOT, read_section, write_section  # noqa: E402  (tools/bench is not a package)

SECTION = "external_data"
TARGET_RATIO = 3.0
CONV = [64, 128, 256]  # channels of the three conv blocks; 32x32 input -> 256 x 4 x 4 = 4096 features
FEATURES = CONV[-1] * 4 * 4


def hidden_width(megabytes: float) -> int:
    """H such that the two big FC layers (4096 x H and H x H float32) hold about `megabytes` MB."""
    n = megabytes * 1e6 / 4
    return int((-FEATURES + math.sqrt(FEATURES ** 2 + 4 * n)) / 2)


def vgg_like(hidden: int, seed: int):
    """The ONNX model: input (N, 3, 32, 32) -> logits (N, 10), He-initialised random weights."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def weight(name, shape, fan_in):
        w = rng.standard_normal(shape, dtype=np.float32)
        w *= np.float32(math.sqrt(2.0 / fan_in))
        return numpy_helper.from_array(w, name)

    nodes, inits, x, channels = [], [], "input", 3
    for k, c in enumerate(CONV):
        inits += [weight(f"conv{k}.w", (c, channels, 3, 3), channels * 9), numpy_helper.from_array(np.zeros(c, np.float32), f"conv{k}.b")]
        nodes += [helper.make_node("Conv", [x, f"conv{k}.w", f"conv{k}.b"], [f"c{k}"], name=f"conv{k}", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{k}"], [f"r{k}"], name=f"relu{k}"),
                  helper.make_node("MaxPool", [f"r{k}"], [f"p{k}"], name=f"pool{k}", kernel_shape=[2, 2], strides=[2, 2])]
        x, channels = f"p{k}", c
    nodes.append(helper.make_node("Flatten", [x], ["flat"], name="flatten"))
    x, width = "flat", FEATURES
    for k, out in enumerate([hidden, hidden, 10]):
        inits += [weight(f"fc{k}.w", (out, width), width), numpy_helper.from_array(np.zeros(out, np.float32), f"fc{k}.b")]
        y = "logits" if out == 10 else f"g{k}"
        nodes.append(helper.make_node("Gemm", [x, f"fc{k}.w", f"fc{k}.b"], [y], name=f"fc{k}", transB=1))
        if out != 10:
            nodes.append(helper.make_node("Relu", [y], [f"h{k}"], name=f"fc_relu{k}"))
            x = f"h{k}"
        width = out
    graph = helper.make_graph(nodes, f"vgg_like_{hidden}", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def ensure_models(out_dir: Path, sizes_mb: list[float]) -> list[Path]:
    """The models of the requested sizes in `out_dir`, each `<name>.onnx` + `<name>.onnx.data`;
    built only when missing (a stamp file records the size each was built for)."""
    import onnx

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, mb in enumerate(sizes_mb):
        hidden = hidden_width(mb)
        path = out_dir / f"vgg_like_{seed}_h{hidden}.onnx"
        paths.append(path)
        if path.exists() and (out_dir / f"{path.name}.data").exists():
            continue
        print(f"building {path} (H = {hidden}, about {mb:.0f} MB)", flush=True)
        model = vgg_like(hidden, seed)
        for stale in (path, out_dir / f"{path.name}.data"):  # onnx appends to an existing data file
            stale.unlink(missing_ok=True)
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
        del model
    return paths


def run_child(cmd: list[str]) -> dict:
    """Run `cmd` as a child: wall seconds, CPU seconds (user + system: less sensitive than the wall
    time to other jobs on a shared machine), peak RSS in bytes (getrusage of the children: KiB on
    Linux), return code."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if before.ru_maxrss and after.ru_maxrss <= before.ru_maxrss:
        print("warning: an earlier child peaked higher; the peak is an upper bound", flush=True)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"wall": wall, "cpu": cpu, "peak": after.ru_maxrss * 1024, "rc": proc.returncode}


def check_output(output: Path, inputs: list[Path]) -> float:
    """Load the merged model and its originals in onnxruntime (by path, with their external data)
    and return the largest output difference on one random batch; NaN if it cannot be run."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    merged = ort.InferenceSession(str(output), opts, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32), dtype=np.float32)
    got = dict(zip([o.name for o in merged.get_outputs()], merged.run(None, {merged.get_inputs()[0].name: x})))
    del merged
    worst = 0.0
    for path in inputs:
        ref = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        worst = max(worst, float(np.max(np.abs(got[f"{path.stem}/logits"] - ref))))
    return worst


def code_label() -> str:
    """The code measured: the git commit, marked when the working tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD") or "unknown commit"
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except OSError:
        return "unknown code"
    return f"{head} with uncommitted changes" if dirty else head


TABLE_HEADER = ["| code | wall | peak RSS | peak / inputs on disk |", "|---|---|---|---|"]


def earlier_rows(path: Path, label: str) -> list[str]:
    """The table rows of this section in `path` (earlier code's figures), but the one for `label`."""
    text = read_section(path, SECTION)
    body = text.splitlines() if text is not None else []
    if TABLE_HEADER[0] not in body:
        return []
    rows = []
    for line in body[body.index(TABLE_HEADER[0]) + 2:]:
        if not line.startswith("|"):
            break
        if line.split("|")[1].strip() != label:
            rows.append(line)
    return rows


def section(run: dict, cmd: list[str], in_bytes: int, label: str, rows: list[str], out_bytes: int | None,
            external: bool, diff: float | None) -> str:
    """The BENCHMARKS.md section: what was run, its figures, and the table of runs by code version."""
    from onnxmerge.measure.latency import machine_info

    ratio = run["peak"] / in_bytes
    shown = shlex.join(os.path.relpath(c, ROOT) if c.startswith(f"{ROOT}{os.sep}") else c for c in cmd)
    lines = ["## Big models with external data: `pack` of two VGG-style models, peak memory against the inputs", "",
             "Written by `tools/bench/external_data.py` (rerun it to update this section; the table keeps the rows of "
             "earlier code from this file). It builds two VGG-style models with random weights, saved with external "
             "data, and merges them with `pack` in a child process; peak memory is the child's maximum resident set "
             "size (getrusage), against the inputs' size on disk (model files and external data).", "",
             f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; code: {label}",
             f"- command: `{shlex.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}`, which runs `{shown}`",
             f"- machine: {machine_info()['cpu']}, {machine_info()['usable_cores']} usable cores, "
             f"load average {os.getloadavg()[0]:.1f} at the end (other jobs share it)"]
    if run["rc"] != 0 or out_bytes is None:
        lines.append(f"- **FAIL**: the merge exited with status {run['rc']} after {run['wall']:.1f} s "
                     f"(peak RSS {run['peak'] / 1e9:.2f} GB)")
    else:
        lines += [f"- inputs {in_bytes / 1e9:.2f} GB on disk; output {out_bytes / 1e9:.2f} GB "
                  f"({'with' if external else 'without'} external data); merged vs originals in onnxruntime, "
                  f"max abs difference {diff:.3g}",
                  f"- wall {run['wall']:.1f} s (CPU time of the merge, user + system: {run['cpu']:.1f} s), peak RSS **{run['peak'] / 1e9:.2f} GB = {ratio:.2f}x the inputs** "
                  f"(target of issue 8: at most {TARGET_RATIO:g}x: {'met' if ratio <= TARGET_RATIO else '**not met**'})"]
    row = f"| {label} | {run['wall']:.1f} s | {run['peak'] / 1e9:.2f} GB | {ratio:.1f}x |"
    lines += ["", "Runs by code version (earlier rows: earlier code, measured the same way):", "", *TABLE_HEADER, *rows, row]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", default="400,550", help="approximate size in MB of each model (default 400,550)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "build/bench_models/external_data")
    ap.add_argument("--method", default="pack", help="merging method (default pack)")
    ap.add_argument("--label", help="the code measured, for the table row (default: the git commit)")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of updating BENCHMARKS.md")
    args = ap.parse_args(argv)

    sizes = [float(s) for s in args.mb.split(",")]
    inputs = ensure_models(args.out_dir.resolve(), sizes)
    output = args.out_dir.resolve() / f"merged_{args.method}.onnx"
    report = output.with_suffix(".json")
    cmd = [sys.executable, "-m", "onnxmerge", *map(str, inputs), "-o", str(output), "--method", args.method,
           "--no-latency", "--quiet", "--report", str(report)]
    print("running:", shlex.join(cmd), flush=True)
    run = run_child(cmd)
    in_bytes = sum(p.stat().st_size + (p.parent / f"{p.name}.data").stat().st_size for p in inputs)
    print(f"merge: rc {run['rc']}, wall {run['wall']:.1f} s, peak RSS {run['peak'] / 1e9:.2f} GB, "
          f"inputs on disk {in_bytes / 1e9:.2f} GB, peak / inputs {run['peak'] / in_bytes:.2f}x "
          f"(target <= {TARGET_RATIO:.0f}x)", flush=True)
    ok, out_bytes, external, diff = False, None, False, None
    if run["rc"] == 0 and output.exists():
        data = output.parent / f"{output.name}.data"
        external = data.exists()
        out_bytes = output.stat().st_size + (data.stat().st_size if external else 0)
        memory = json.loads(report.read_text()).get("memory", {})
        print(f"output: {out_bytes / 1e9:.2f} GB ({'with' if external else 'without'} external data); "
              f"the report's own figures: {memory}")
        diff = check_output(output, inputs)
        print(f"merged vs originals in onnxruntime, max abs difference: {diff:.3g}")
        ok = bool(np.isfinite(diff) and diff < 1e-3)
    label = args.label or code_label()
    if args.mb != ap.get_default("mb"):  # a row of other sizes is not comparable with the others
        label += f" (--mb {args.mb})"
    cmd_shown = ["python", *cmd[1:]]
    text = section(run, cmd_shown, in_bytes, label, earlier_rows(BENCHMARKS, label), out_bytes, external, diff)
    if args.no_write:
        print(text)
    else:
        write_section(BENCHMARKS, SECTION, text)
        print(f"wrote section {SECTION} of {BENCHMARKS}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
