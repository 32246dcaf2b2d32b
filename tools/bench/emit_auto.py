#!/usr/bin/env python3
"""`--emit auto` against the portable form and the originals (issue 19's first acceptance figure),
written into BENCHMARKS.md, one section per CPU (`emit_auto:<cpu>`): each CPU's table is kept.

For each pair and codebook preset, the merge (no calibration: timing only) is written twice per
target batch: `--emit gather` (portable) and `--emit auto --target-batch B --target-threads 1`.
Then, interleaved in one process at that batch and one thread (onnxmerge.measure.latency.
compare_latency, baseline the portable model): the auto model, the portable model and the two
originals run one after another in separate sessions. "auto / portable" is the portable model's
median over the auto model's (> 1: auto is faster) with the quartiles of the per-round paired
ratios; auto is "not slower" when that ratio is at least 1 or its upper quartile reaches 1.

    python tools/bench/emit_auto.py                  # ~5 min, writes BENCHMARKS.md
    python tools/bench/emit_auto.py --budget 0.3 --no-write

`--table-precision int16|int8`: the auto models' lookup tables in integers (section
`emit_auto_<precision>:<cpu>`); auto then chooses per layer between integer tables, float tables and
dense (passes/codebook/emit_auto.py), and the portable form it is timed against is the same.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import ROOT, cpu_header, cpu_label, cpu_section, publish, require  # noqa: E402  (tools/bench is not a package)

PAIRS = {  # name -> (model files, what it is)
    "example": ([ROOT / "onnxmerge/examples/fashion_lenet.onnx", ROOT / "onnxmerge/examples/digits_lenet.onnx"],
                "the shipped example pair (LeNets, Fashion-MNIST 28x28 + spoken digits 32x32)"),
    "narrow": ([ROOT / "tests/models/lenet_mnist.onnx", ROOT / "tests/models/vgg_fashion.onnx"],
               "a narrow pair: LeNet-style (8/16 channels) + VGG-style (16/32 channels), 64-wide fc"),
    "paper": ([ROOT / "build/bench_models/paper_lenet_fsdd.onnx", ROOT / "build/bench_models/paper_lenet_fashion32.onnx"],
              "the paper LeNet pair (32-64 channel convolutions, 1024-wide fc; tools/train_models.py --group bench)"),
}
PRESETS = ("light", "accu")
BATCHES = (1, 32)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default=",".join(PAIRS), help="which of: " + ", ".join(PAIRS))
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timing per cell (at least)")
    p.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    p.add_argument("--table-precision", default="fp32", choices=["fp32", "int16", "int8"],
                   help="the auto models' lookup tables (default fp32)")
    args = p.parse_args(argv)

    from onnxmerge import kernels
    from onnxmerge.api import merge
    from onnxmerge.graph.ops import make_session
    from onnxmerge.kernels import DOMAIN
    from onnxmerge.measure.latency import candidate, compare_latency, machine_info

    if not require("emit_auto", kernels=True):
        return 1
    rows, missing = [], []
    for pair in args.pairs.split(","):
        files, _ = PAIRS[pair]
        if not all(f.exists() for f in files):
            missing.append(pair)
            continue
        originals = [make_session(str(f), 1) for f in files]
        for preset in PRESETS:
            portable = merge(files, method="codebook", params={"preset": preset}, progress=False).model
            for batch in BATCHES:
                auto = merge(files, method="codebook", progress=False,
                             params={"preset": preset, "emit": "auto", "target_batch": batch, "target_threads": 1,
                                     "table_precision": args.table_precision})
                timed = auto.info.fidelity.get("emit_auto", [])
                cands = {"portable": candidate([make_session(portable, 1)], batch),
                         "auto": candidate([make_session(auto.model, 1)], batch),
                         "originals": candidate(originals, batch)}
                res = compare_latency(cands, "portable", budget_s=args.budget, progress=False)
                r = res["auto"]
                row = {"pair": pair, "preset": preset, "batch": batch, "timed": len(timed),
                       "native": sum(n.domain == DOMAIN for n in auto.model.graph.node),
                       "ratio": r["ratio"], "q1": r["ratio_q1"], "q3": r["ratio_q3"],
                       "auto_vs_originals": res["originals"]["median_ms"] / r["median_ms"],
                       "portable_vs_originals": res["originals"]["median_ms"] / res["portable"]["median_ms"]}
                # no layer kept native: auto wrote the portable form itself (the same graph), and the
                # ratio is two sessions of one graph: noise, however tight its quartiles
                row["same"] = auto.model.graph == portable.graph
                row["ok"] = row["same"] or row["ratio"] >= 1 or row["q3"] >= 1
                rows.append(row)
                print(f"{pair:8s} {preset:5s} b={batch:<3d} native {row['native']}/{row['timed']}  auto/portable "
                      f"{row['ratio']:.2f} [{row['q1']:.2f}-{row['q3']:.2f}]  auto {row['auto_vs_originals']:.2f}x, "
                      f"portable {row['portable_vs_originals']:.2f}x vs originals", flush=True)
    machine = machine_info()
    tables = "" if args.table_precision == "fp32" else f", tables in {args.table_precision}"
    lines = [f"## `--emit auto`: the native form only where it is faster, against the portable form{tables}: "
             f"{cpu_label(machine)}",
             *cpu_header("emit_auto", argv),
             f"- machine: {machine['cpu']}, {machine['usable_cores']} cores; kernels' instruction set "
             f"{kernels.isa()} (of {', '.join(kernels.isas())})",
             "- each row: codebook merge (no calibration), `--emit auto --target-batch B --target-threads 1` "
             "against the same merge `--emit gather`, and the originals one after another in separate sessions; "
             "one thread, interleaved in one process; native: layers auto kept native / layers it timed",
             "- auto / portable: portable median / auto median (> 1: auto faster), [quartiles of the per-round "
             "paired ratios]; target (issue 19): auto at least as fast as portable within the quartiles; "
             "\"same graph\": auto kept no layer native and wrote the portable form itself, so it is not slower by "
             "construction and its ratio is the noise between two sessions of one graph", ""]
    lines += [f"- {name}: {what}" for name, (_, what) in PAIRS.items()]
    lines += ["", "| pair | preset | batch | native / timed layers | auto / portable [q1-q3] | auto vs originals | "
                  "portable vs originals | not slower |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['pair']} | {r['preset']} | {r['batch']} | {r['native']} / {r['timed']} | {r['ratio']:.2f} "
              f"[{r['q1']:.2f}-{r['q3']:.2f}] | {r['auto_vs_originals']:.2f}x | {r['portable_vs_originals']:.2f}x | "
              f"{'yes (same graph)' if r['same'] else 'yes' if r['ok'] else '**no**'} |" for r in rows]
    if missing:
        lines += ["", f"Not run (models missing): {', '.join(missing)}."]
    body = "\n".join(lines) + "\n"
    name = "emit_auto" if args.table_precision == "fp32" else f"emit_auto_{args.table_precision}"
    publish(cpu_section(name, machine), body, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
