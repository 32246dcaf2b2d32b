#!/usr/bin/env python3
"""Latency of the `pack` method on the example pair, written into BENCHMARKS.md.

Merges onnxmerge/examples/fashion_lenet.onnx and digits_lenet.onnx with `pack` (the two networks side
by side in one graph), then times, for batch 1 and 32 with one thread and with onnxruntime's default
threads, the packed model in one session against the originals in two sessions run one after
another. Both candidates run interleaved round by round in this one process (onnxmerge.measure.latency), so
the speed-up (originals' median / pack median) is the figure to read; absolute times follow the
machine's load.

The script prints the table and rewrites its own section of BENCHMARKS.md, between
`<!-- bench:latency_pack -->` and `<!-- /bench:latency_pack -->`; do not edit that section by hand.

    python tools/bench/latency_pack.py                  # full run, writes BENCHMARKS.md
    python tools/bench/latency_pack.py --budget-s 1 --no-write   # quick look
"""

from __future__ import annotations

import argparse
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import BENCHMARKS, ROOT, write_section  # noqa: E402  (tools/bench is not a package)

EXAMPLES = ROOT / "onnxmerge" / "examples"
MODELS = {"fashion": EXAMPLES / "fashion_lenet.onnx", "digits": EXAMPLES / "digits_lenet.onnx"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget-s", type=float, default=10.0, help="time budget of each table row (s)")
    p.add_argument("--min-rounds", type=int, default=200, help="rounds per row at least")
    p.add_argument("--warmup", type=int, default=20, help="untimed runs of each candidate per row")
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--threads", default="1,default", help="comma-separated: thread counts or 'default'")
    p.add_argument("--benchmarks", type=Path, default=BENCHMARKS, help="file to update")
    p.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def markdown_table(rows: list[dict]) -> str:
    head = ["batch", "threads", "originals ms (median)", "pack ms (median)", "speed-up",
            "per-round ratio q1-q3", "runs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m = r["merged"]
        cells = [r["batch"], r["threads"], f"{r['originals']['median_ms']:.3f}", f"{m['median_ms']:.3f}",
                 f"{r['speedup_vs_originals']:.2f}x", f"{m['ratio_q1']:.2f}-{m['ratio_q3']:.2f}", m["runs"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)


def section(rows, machine, command, stats) -> str:
    orig_params = sum(s["params"] for s in stats["originals"].values())
    orig_macs = sum(s["macs"] for s in stats["originals"].values())
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        "## Latency: `pack` against the originals run one after another",
        "",
        "Written by `tools/bench/latency_pack.py`; rerun it to update this section.",
        "",
        f"- date: {when}",
        f"- command: `{command}`",
        f"- machine: {machine['cpu']}, {machine['usable_cores']} usable of {machine['logical_cores']} "
        f"logical cores, {machine['platform']}; Python {machine['python']}, onnxruntime "
        f"{machine['onnxruntime']}, onnx {machine['onnx']}, numpy {machine['numpy']}",
        f"- models: `onnxmerge/examples/fashion_lenet.onnx` + `digits_lenet.onnx` merged with `pack`; "
        f"params {orig_params:,} together vs {stats['pack']['params']:,} packed, "
        f"MACs at batch 1 {orig_macs:,} vs {stats['pack']['macs']:,}",
        "- how: the originals (two sessions, run one after another) and the packed model (one session) "
        "are timed interleaved, round by round, in one process, on random inputs; "
        "speed-up = originals' median time / pack median time (> 1: pack is faster); "
        "q1-q3 are the quartiles of the per-round paired ratios. Absolute times follow the "
        "machine's load; compare ratios.",
        "",
        markdown_table(rows),
    ])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    missing = [str(p) for p in MODELS.values() if not p.exists()]
    if missing:
        print(f"latency_pack: example model(s) missing: {', '.join(missing)} "
              f"(train them with tools/train_models.py)", file=sys.stderr)
        return 1

    import onnx

    from onnxmerge.api import merge
    from onnxmerge.measure.latency import latency_table, machine_info
    from onnxmerge.measure.metrics import model_stats
    from onnxmerge.measure.report import format_latency_rows

    result = merge([str(p) for p in MODELS.values()], None, method="pack", names=list(MODELS))
    threads = tuple(None if t.strip() == "default" else int(t) for t in args.threads.split(","))
    batches = tuple(int(b) for b in args.batch_sizes.split(","))
    rows = latency_table(result.model, {n: str(p) for n, p in MODELS.items()}, batch_sizes=batches,
                         threads=threads, budget_s=args.budget_s, min_rounds=args.min_rounds,
                         warmup=args.warmup, progress=not args.no_progress)
    machine = machine_info()
    stats = {"originals": {n: model_stats(onnx.load(str(p))) for n, p in MODELS.items()},
             "pack": model_stats(result.model)}
    command = "python " + shlex.join(["tools/bench/latency_pack.py", *argv])

    print("pack vs the originals run one after another "
          "(speed-up = originals' median time / pack median time; > 1: pack is faster)")
    print(format_latency_rows(rows, merged_label="pack"))
    print(f"machine: {machine['cpu']}, {machine['usable_cores']} usable cores, "
          f"onnxruntime {machine['onnxruntime']}")
    if not args.no_write:
        write_section(args.benchmarks, "latency_pack", section(rows, machine, command, stats))
        print(f"updated {args.benchmarks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
