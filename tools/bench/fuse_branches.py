#!/usr/bin/env python3
"""The tasks' parallel layers fused into grouped layers (`--fuse-branches`), against the originals,
written into BENCHMARKS.md, one section per CPU (`fuse_branches:<cpu>`): each CPU's table is kept.

For each same-architecture pair of the budget suite (MNIST + Fashion-MNIST models of
tools/train_models.py --group budget, trained when missing), merged with pack (nothing shared) and
zipper sharing its first 1 and 2 layers (weight matching, no REPAIR, no calibration: timing only),
each written `--fuse-branches off` and `on`, with every convolution grouped (`any`: the form
`--fuse-branches auto` times after `on`'s, passes/common/fuse_branches.py), and as `--fuse-branches
auto` chose here (its grouping rule, then the layers it wrote block-diagonal, H6, or on their input
computed per task, H1''). Then, interleaved in one process on one thread
(onnxmerge.model.timing.compare_latency), at batch 1 and 32: the merged models and the two originals
one after another in separate sessions; speed-up = the originals' median / the model's, with the
quartiles of the per-round paired ratios. What `--fuse-branches auto` decides on a machine is the
comparison of its own model's forms at batch 1.

    python tools/bench/fuse_branches.py                 # ~3 min, writes BENCHMARKS.md
    python tools/bench/fuse_branches.py --pairs mobilenet --no-write
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import ROOT, cpu_header, cpu_label, cpu_section, publish, require  # noqa: E402  (tools/bench is not a package)

sys.path.insert(0, str(ROOT / "tools"))
ARCHS = ("lenet", "vgg", "resnet", "mobilenet")
SETTINGS = (("pack", {}), ("zipper", {"share": 1, "match": "weights", "repair": "off"}),
            ("zipper", {"share": 2, "match": "weights", "repair": "off"}))
BATCHES = (1, 32)
FORMS = ("off", "on", "any", "auto")


def run_time_nodes(model) -> int:
    """The nodes onnxruntime runs: not those whose every input is a weight or computed from weights
    alone (a fused weight's Concat, a codebook's Gather), which it folds when it creates the session."""
    constant, count = {i.name for i in model.graph.initializer}, 0
    for node in model.graph.node:  # in topological order
        if all(not name or name in constant for name in node.input):
            constant.update(node.output)
        else:
            count += 1
    return count


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default=",".join(ARCHS), help="architectures, of: " + ", ".join(ARCHS))
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timing per pair and batch (at least)")
    p.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    if not require("fuse_branches", data=True):
        return 1
    import train_models

    from onnxmerge.api import merge
    from onnxmerge.measure.latency import machine_info
    from onnxmerge.model.runtime import session
    from onnxmerge.model.timing import candidate, compare_latency
    from onnxmerge.passes.common.fuse_branches import apply

    archs = args.pairs.split(",")
    paths = train_models.ensure_budget_models([f"{a}_{d}" for a in archs for d in ("mnist", "fashion")])
    rows = []
    for arch in archs:
        files = [str(paths[f"{arch}_{d}"]) for d in ("mnist", "fashion")]
        originals = [session(f, threads=1, optimize=True) for f in files]
        for method, params in SETTINGS:
            models = {form: merge(files, method=method, names=["mnist", "fashion"], params=params,
                                  fuse_branches=form).model for form in ("off", "on")}
            models["any"] = apply(models["off"], "on", "any")[0]
            models["auto"], chose = apply(models["off"], "auto")  # as merge's last pass writes it
            chose = chose or {}
            nodes = {form: run_time_nodes(m) for form, m in models.items()}
            row = {"arch": arch, "setting": method + (f" share={params['share']}" if params else ""), "nodes": nodes,
                   "auto": (chose.get("kernels") or "off") + "".join(
                       f" + {n} {what}" for rewrite, what in (("H6", "block-diagonal (H6)"),
                                                              ("H1''", "input per task (H1'')"))
                       if (n := sum(t["kept"] and t.get("rewrite") == rewrite for t in chose.get("timed", ()))))}
            for batch in BATCHES:
                cands = {"originals": candidate(originals, batch)}
                cands |= {form: candidate([session(m, threads=1, optimize=True)], batch) for form, m in models.items()}
                res = compare_latency(cands, "originals", budget_s=args.budget, progress=False)
                row[batch] = {form: (res[form]["ratio"], res[form]["ratio_q1"], res[form]["ratio_q3"])
                              for form in models}
            rows.append(row)
            print(f"{arch:9s} {row['setting']:16s} " + "  ".join(
                f"b{b} " + " ".join(f"{form} {row[b][form][0]:.2f}x" for form in models) for b in BATCHES), flush=True)
    machine = machine_info()
    cell = lambda r: f"{r[0]:.2f}x [{r[1]:.2f}-{r[2]:.2f}]"  # noqa: E731
    lines = [f"## `--fuse-branches`: the tasks' parallel layers as grouped layers, against the originals: {cpu_label(machine)}",
             *cpu_header("fuse_branches", argv),
             f"- machine: {machine['cpu']}, {machine['usable_cores']} cores",
             "- models: the budget suite's MNIST and Fashion-MNIST models of one architecture (independently trained); "
             "pack, and zipper at share 1 and 2 (weight matching, no REPAIR, no calibration: timing only); "
             "off / on: `--fuse-branches off` / `on` (depthwise and 1x1 convolutions grouped); any: every "
             "convolution grouped (the form `auto` times after on's); auto: as `--fuse-branches auto` chose in "
             "this run (column auto chose: its grouping rule, 1x1 or any, and the layers it wrote block-diagonal, H6, "
             "or reading their input computed once per task, H1'')",
             "- speed-up: the two originals one after another in separate sessions over the merged model, one thread, "
             "interleaved in one process [quartiles of the per-round paired ratios]; nodes: the nodes onnxruntime "
             "runs (not those it folds when it creates the session, such as the Concat that builds a fused weight)",
             "", "| pair | merge | " + " | ".join(f"b={b} {f}" for b in BATCHES for f in FORMS)
             + f" | nodes {' / '.join(FORMS)} | auto chose |",
             "|---|---|" + "---|" * (len(BATCHES) * len(FORMS) + 2)]
    lines += [f"| {r['arch']} | {r['setting']} | " + " | ".join(cell(r[b][f]) for b in BATCHES for f in FORMS)
              + f" | {' / '.join(str(r['nodes'][f]) for f in FORMS)} | {r['auto']} |" for r in rows]
    publish(cpu_section("fuse_branches", machine), "\n".join(lines) + "\n", write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
