#!/usr/bin/env python3
"""How much of the theoretical ratio EConv's lookups can reach on this CPU (issue 19), written into
BENCHMARKS.md, one section per CPU (`lookup_ceiling:<cpu>`).

The grid (kernel_grid.py) counts a table lookup as one operation, as a dense multiply-add is one:
`reached` = measured ratio / (dense MACs / lookup operations). A lookup is a vector add whose operand
is loaded from the table at its own offset; a dense multiply-add reuses operands held in registers.
So where the lookups are most of a layer's work, `reached` cannot pass (table entries the lookups add
per second) / (multiply-adds per second of onnxruntime's dense convolution), even with tables that
cost nothing to build. This measures both, one thread:
- the lookups' inner loop alone (tools/bench/lookup_ceiling.cc, econv_lookup_channels' loop) on
  tables that stay in L1, with its rows aligned to the vector, one float past it, and at a 3x3
  kernel's columns (what EConv's lookups at stride 1 read);
- onnxruntime's dense convolution on grid layers (dense MACs / median time).

    python tools/bench/lookup_ceiling.py             # ~1 min, writes BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from benchmarks_md import cpu_header, cpu_label, cpu_section, publish, require  # noqa: E402  (tools/bench is not a package)

LAYERS = ((64, 3), (128, 3), (256, 3), (512, 5))  # grid convolutions (channels, kernel) whose dense rate is measured


def loop_rates(isa: str) -> dict:
    """Build lookup_ceiling.cc with `isa`'s flags (kernels/build.py) and run it: its JSON line."""
    from onnxmerge.kernels import build as kernel_build

    vec, flags = kernel_build.isas()[isa]
    compiler = shutil.which("g++")
    if compiler is None:
        raise SystemExit("lookup_ceiling: g++ not found")
    with tempfile.TemporaryDirectory() as tmp:
        program = Path(tmp) / "lookup_ceiling"
        subprocess.run([compiler, "-O3", "-std=c++17", *flags, "-fno-tree-vectorize", f"-DONNXMERGE_VEC={vec}",
                        str(HERE / "lookup_ceiling.cc"), "-o", str(program)], check=True)
        done = subprocess.run([str(program)], check=True, capture_output=True, text=True)
    return json.loads(done.stdout)


def dense_rate(width: int, k: int, budget_s: float) -> tuple[list[int], float]:
    """(input shape, multiply-adds per second) of onnxruntime's dense convolution of the grid's cell."""
    from kernel_grid import PRESETS, cell_model

    from kernels import layer_models
    from onnxmerge.graph.ops import make_session
    from onnxmerge.measure.latency import candidate, compare_latency

    r, c = PRESETS["light"]["conv"]
    model, shapes = cell_model("conv", width, k, r, c, np.random.default_rng(0))
    info, _, dense = layer_models(model, model.graph.node[0], shapes)
    res = compare_latency({"dense": candidate([make_session(dense, 1)], 1)}, "dense", min_rounds=20, warmup=3,
                          budget_s=budget_s, progress=False)
    return info["x"], info["dense_macs"] / (res["dense"]["median_ms"] / 1e3)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timing per dense layer (at least)")
    p.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = p.parse_args(argv)

    from onnxmerge import kernels
    from onnxmerge.measure.latency import machine_info

    if not require("lookup_ceiling", kernels=True):  # the instruction set the kernels run here
        return 1
    isa = kernels.isas()[0]
    rates = loop_rates(isa)
    lookups = {"aligned": rates["lookup_aligned_per_s"], "one float past": rates["lookup_past_one_per_s"],
               "3x3 columns": rates["lookup_3x3_columns_per_s"]}
    machine = machine_info()
    lines = [f"## Ceiling of the lookups: {cpu_label(machine)}", *cpu_header("lookup_ceiling", argv),
             f"- machine: {machine['cpu']}, onnxruntime {machine['onnxruntime']}; loop built for {isa} "
             f"({rates['vec']} floats a vector, {rates['channels']} output channels a call); one thread",
             "- lookups: table entries added per second by the lookups' inner loop on tables in L1 "
             "(econv_lookup_channels' loop, 9 kernel offsets); ceiling = lookups/s / dense MACs/s: the most "
             "of the theoretical ratio a layer made of lookups alone can reach, its tables free",
             "- EConv's lookups at stride 1 read table rows at the kernel's columns (3x3 columns here): where that "
             "ceiling is under issue 19's 60%, no layer mostly made of lookups reaches 60% with this table layout", "",
             "| lookups' table rows | lookups G/s |", "|---|---|"]
    lines += [f"| {name} | {rate / 1e9:.1f} |" for name, rate in lookups.items()]
    lines += ["", "| dense layer (grid cell) | input (per sample) | onnxruntime G MACs/s | "
              + " | ".join(f"ceiling ({name})" for name in lookups) + " |",
              "|---|---|---|" + "---|" * len(lookups)]
    for width, k in LAYERS:
        shape, rate = dense_rate(width, k, args.budget)
        lines.append(f"| conv {width} k{k} | {shape} | {rate / 1e9:.1f} | "
                     + " | ".join(f"{100 * lk / rate:.0f}%" for lk in lookups.values()) + " |")
    publish(cpu_section("lookup_ceiling", machine), "\n".join(lines) + "\n", write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
