#!/usr/bin/env python3
"""mtz's zipped layers as one node per run or fused into one (`--fuse`), against the originals,
written into BENCHMARKS.md, one section per CPU (`mtz_fuse:<cpu>`): each CPU's table is kept.

For each same-architecture pair of the budget suite (MNIST + Fashion-MNIST models of
tools/train_models.py --group budget, trained when missing) and share ratio, the mtz merge (its
Hessians on 128 calibration samples per task, no retraining, no calibration: timing only) is written
three times: `--fuse off` (one Conv / Gemm per run of same-task neurons, a Slice or Gather per view, a
Concat per layer), `--fuse on` (every layer one node, zero blocks included) and `--fuse auto` (each
layer timed both ways, the faster kept). Then, interleaved in one process at batch 1 and one thread
(onnxmerge.model.timing.compare_latency): the three and the two originals one after another in
separate sessions; speed-up = the originals' median / the model's, with the quartiles of the
per-round paired ratios.

    python tools/bench/mtz_fuse.py                 # ~3 min, writes BENCHMARKS.md
    python tools/bench/mtz_fuse.py --pairs lenet --no-write
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import ROOT, cpu_header, cpu_label, cpu_section, publish, require  # noqa: E402  (tools/bench is not a package)

sys.path.insert(0, str(ROOT / "tools"))
ARCHS = ("lenet", "vgg", "resnet", "mobilenet", "mlp")
RATIOS = (0.5, 1.0)
FORMS = ("off", "on", "auto")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", default=",".join(ARCHS), help="architectures, of: " + ", ".join(ARCHS))
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timing per pair and ratio (at least)")
    p.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = p.parse_args(argv)
    if not require("mtz_fuse", data=True):
        return 1
    import train_models

    from onnxmerge.api import merge
    from onnxmerge.data import load_dataset
    from onnxmerge.measure.latency import machine_info
    from onnxmerge.model.runtime import session
    from onnxmerge.model.timing import candidate, compare_latency

    archs = args.pairs.split(",")
    paths = train_models.ensure_budget_models([f"{a}_{d}" for a in archs for d in ("mnist", "fashion")])
    folder = next(iter(paths.values())).parent
    calib = {t: load_dataset(folder / f"{t}_calib.npz") for t in ("mnist", "fashion")}
    rows = []
    for arch in archs:
        files = [str(paths[f"{arch}_{d}"]) for d in ("mnist", "fashion")]
        originals = [session(f, threads=1, optimize=True) for f in files]
        for ratio in RATIOS:
            models = {form: merge(files, method="mtz", names=list(calib), calib=calib, progress=False,
                                  params={"share_ratio": ratio, "hessian_samples": 128, "fuse": form})
                      for form in FORMS}
            cands = {"originals": candidate(originals, 1)}
            cands |= {form: candidate([session(r.model, threads=1, optimize=True)], 1) for form, r in models.items()}
            res = compare_latency(cands, "originals", budget_s=args.budget, progress=False)
            fuse = models["auto"].info.fidelity.get("mtz_fuse", {}).get("layers", [])
            row = {"arch": arch, "ratio": ratio, "fused": sum(r["fused"] for r in fuse), "layers": len(fuse),
                   "nodes": {form: len(r.model.graph.node) for form, r in models.items()}}
            row |= {form: (res[form]["ratio"], res[form]["ratio_q1"], res[form]["ratio_q3"]) for form in FORMS}
            rows.append(row)
            print(f"{arch:9s} share {ratio:<4g} " + "  ".join(f"{f} {row[f][0]:.2f}x" for f in FORMS)
                  + f"  auto fused {row['fused']}/{row['layers']}", flush=True)
    machine = machine_info()
    cell = lambda r: f"{r[0]:.2f}x [{r[1]:.2f}-{r[2]:.2f}]"  # noqa: E731
    lines = [f"## mtz: zipped layers per run or fused (`--fuse`), against the originals: {cpu_label(machine)}", *cpu_header("mtz_fuse", argv),
             f"- machine: {machine['cpu']}, {machine['usable_cores']} cores",
             "- models: the budget suite's MNIST and Fashion-MNIST models of one architecture (independently "
             "trained); mtz at the share ratio, Hessians on 128 calibration samples per task, no retraining",
             "- speed-up: the two originals one after another in separate sessions over the merged model, batch 1, "
             "one thread, interleaved in one process [quartiles of the per-round paired ratios]; nodes: the "
             "merged graph's; auto fused: the layers `--fuse auto` wrote as one node / the layers of several runs",
             "", "| pair | share ratio | --fuse off (nodes) | --fuse on (nodes) | --fuse auto (nodes) | auto fused |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['arch']} | {r['ratio']:g} | " + " | ".join(f"{cell(r[f])} ({r['nodes'][f]})" for f in FORMS)
              + f" | {r['fused']} / {r['layers']} |" for r in rows]
    body = "\n".join(lines) + "\n"
    publish(cpu_section("mtz_fuse", machine), body, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
