#!/usr/bin/env python3
"""Zipper's two depthwise variants on the MobileNet-style pair, written into BENCHMARKS.md.

`--depthwise shared` shares the whole prefix (parameters and compute); `--depthwise task` (the
paper's variant) shares only the non-depthwise weights, so each task still computes its own prefix
(parameters saved, compute not). No calibration: this compares size, work and measured latency;
accuracy after calibration is in the sweep section.

    python tools/bench/zipper_depthwise.py [--no-write]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import BENCHMARKS, ROOT, write_section  # noqa: E402  (tools/bench is not a package)

MODELS = [ROOT / "tests/models/mobilenet_mnist.onnx", ROOT / "tests/models/mobilenet_fashion.onnx"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-write", action="store_true", help="print the table, leave BENCHMARKS.md as it is")
    args = ap.parse_args(argv)
    import onnx

    from onnxmerge.api import merge
    from onnxmerge.measure.latency import latency_table, machine_info
    from onnxmerge.measure.metrics import count_macs, count_parameters

    originals = {"mnist": str(MODELS[0]), "fashion": str(MODELS[1])}
    orig = [onnx.load(str(p)) for p in MODELS]
    params0, macs0 = sum(map(count_parameters, orig)), sum(map(count_macs, orig))
    lines = ["## Zipper: depthwise layers shared or per task (MobileNet-style pair, all layers but the heads)", "",
             "Written by `tools/bench/zipper_depthwise.py`; rerun it to update this section.", "",
             f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
             f"- command: `python {shlex.join(['tools/bench/zipper_depthwise.py', *(a for a in argv if a != '--no-write')])}`",
             f"- machine: {machine_info()['cpu']}, {machine_info()['usable_cores']} cores; speed-up = originals "
             "in two sessions / merged, batch 1, one thread, medians interleaved in one process", "",
             "| variant | params (originals together / merged) | MACs (originals / merged) | measured speed-up |",
             "|---|---|---|---|"]
    for variant in ("shared", "task"):
        model = merge([str(p) for p in MODELS], method="zipper", names=list(originals),
                      params={"depthwise": variant}).model
        row = latency_table(model, originals, batch_sizes=(1,), threads=(1,), budget_s=5.0, progress=False)[0]
        lines.append(f"| `--depthwise {variant}` | {params0:,} / {count_parameters(model):,} "
                     f"({params0 / count_parameters(model):.2f}x) | {macs0:,} / {count_macs(model):,} "
                     f"({macs0 / count_macs(model):.2f}x) | {row['speedup_vs_originals']:.2f}x |")
    print("\n".join(lines[-4:]))
    if not args.no_write:
        write_section(BENCHMARKS, "zipper_depthwise", "\n".join(lines))
        print(f"updated {BENCHMARKS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
