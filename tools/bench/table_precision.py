#!/usr/bin/env python3
"""EConv's and EFC's lookup tables in fp32, int16 and int8 (`--table-precision`, issue 19) on the paper LeNet
pair: accuracy on the full test splits and speed against the originals, written into BENCHMARKS.md,
one section per CPU (`table_precision:<cpu>`).

The pair (tools/train_models.py --group bench: spoken digits + Fashion-MNIST at 32x32) is merged
with the codebook method at a preset and calibrated once (train splits, the paper's learning rate);
the calibrated portable model is then written in the native form three times, its EConv and EFC
tables in each precision (emit_native.to_native: every layer the operation count lets through, as
`--emit native`), and twice more as `--emit auto --table-precision int8` writes it for batch 1 and for
batch 32 (each layer int8, fp32-table native or dense, whichever ran fastest at that batch).
Each is evaluated by the kernels on the test splits, and timed against the two
originals (one after another in separate sessions) and against the fp32 native model, interleaved
in one process, one thread, at batch 1 and 32 (onnxmerge.model.timing.compare_latency).

    python tools/bench/table_precision.py                 # ~8 min, writes BENCHMARKS.md
    python tools/bench/table_precision.py --steps 300 --no-write
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks_md import cpu_header, cpu_label, cpu_section, publish, require  # noqa: E402  (tools/ is not a package)

TASKS = {"digits": ("paper_lenet_fsdd", "fsdd", None), "fashion": ("paper_lenet_fashion32", "fashion-mnist", 32)}
PRECISIONS = ("fp32", "int16", "int8")
BATCHES = (1, 32)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="light", choices=["light", "accu"])
    p.add_argument("--steps", type=int, default=1500, help="calibration steps (as tools/bench/codebook.py)")
    p.add_argument("--lr", type=float, default=2e-4, help="calibration learning rate (the paper's 2e-4)")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timing per batch size (at least)")
    p.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = p.parse_args(argv)

    from train_models import ensure_bench_models

    from onnxmerge import kernels
    from onnxmerge.api import merge
    from onnxmerge.calibration.calibrate import CalibrationConfig, calibrate
    from onnxmerge.data import load_named
    from onnxmerge.graph.ops import make_session
    from onnxmerge.measure.evaluate import evaluate
    from onnxmerge.measure.latency import candidate, compare_latency, machine_info
    from onnxmerge.passes.codebook.emit_native import TABLE_BITS, to_native
    from onnxmerge.pipeline.checks import native_difference

    if not require("table_precision", kernels=True, data=True):
        return 1
    paths = ensure_bench_models([m for m, _, _ in TASKS.values()])
    models = {t: str(paths[m]) for t, (m, _, _) in TASKS.items()}
    calib = {t: load_named(ds, "train", size=size) for t, (_, ds, size) in TASKS.items()}
    test = {t: load_named(ds, "test", size=size) for t, (_, ds, size) in TASKS.items()}

    merged = merge(list(models.values()), method="codebook", names=list(models), params={"preset": args.preset},
                   progress=False)
    tuned = calibrate(merged.model, merged.info, models, calib, CalibrationConfig(steps=args.steps, lr=args.lr,
                                                                                  batch_size=64), progress=False)
    natives = {prec: to_native(tuned.model, table_bits=TABLE_BITS[prec])[0] for prec in PRECISIONS}
    auto_forms = {}  # batch -> how many layers --emit auto kept in each form
    for batch in BATCHES:  # what `--emit auto --target-batch B --table-precision int8` writes: each layer's form timed
        natives[f"int8, --emit auto at b={batch}"], auto_forms[batch] = emitted_auto(tuned.model, batch)
    rows = {}
    for prec, model in natives.items():
        ev = evaluate(model, merged.info, test, models, progress=False)
        rows[prec] = {"eval": ev, "rounding": native_difference(model, tuned.model)}
        print(prec, {t: f"{100 * r['accuracy']:.2f}% (original {100 * r['original_accuracy']:.2f}%)"
                     for t, r in ev.items()}, flush=True)
    originals = [make_session(m, 1) for m in models.values()]
    for batch in BATCHES:
        cands = {"originals": candidate(originals, batch)}
        cands |= {prec: candidate([make_session(model, 1)], batch) for prec, model in natives.items()}
        res = compare_latency(cands, "originals", budget_s=args.budget, progress=False)
        for prec in natives:
            rows[prec][batch] = {"vs_originals": res[prec]["ratio"], "q": (res[prec]["ratio_q1"], res[prec]["ratio_q3"]),
                                 "vs_fp32": res["fp32"]["median_ms"] / res[prec]["median_ms"],
                                 "ms": res[prec]["median_ms"]}
            print(f"b={batch} {prec}: {res[prec]['median_ms']:.3f} ms, {res[prec]['ratio']:.2f}x vs originals", flush=True)

    machine = machine_info()
    lines = [f"## EConv and EFC lookup tables in fp32, int16 and int8: the paper LeNet pair, {cpu_label(machine)}", *cpu_header("table_precision", argv),
             f"- machine: {machine['cpu']}, {machine['usable_cores']} cores; kernels' instruction set "
             f"{kernels.isa()} (of {', '.join(kernels.isas())})",
             f"- model: paper_lenet_fsdd (digits) + paper_lenet_fashion32 (fashion), codebook `{args.preset}`, "
             f"calibrated {args.steps} steps at lr {args.lr} once; the same calibrated model written native with "
             "each table precision (EConv and EFC); accuracy on the full test splits, run by the kernels",
             "- rounding: the largest relative output difference of the native form from the portable (fp32) form "
             "on random inputs (numpy reference of the integer arithmetic)",
             "- speed: one thread, interleaved in one process; vs originals = the two originals' median (one after "
             "another, separate sessions) / this model's median, [quartiles of the per-round paired ratios]; "
             "vs fp32 = the fp32 native model's median / this one's",
             "- --emit auto at b=B: the int8 model as `--emit auto --target-batch B` writes it (each layer timed at "
             "batch B as int8 native, fp32-table native and dense, the fastest kept, then the whole model checked: "
             "passes/codebook/emit_auto.py); "
             + "; ".join(f"at b={b}: {forms}" for b, forms in auto_forms.items()), "",
             "| tables | " + " | ".join(f"{t} accuracy (change)" for t in TASKS) + " | rounding | "
             + " | ".join(f"b={b} vs originals | b={b} vs fp32" for b in BATCHES) + " |",
             "|---|" + "---|" * (len(TASKS) + 1 + 2 * len(BATCHES))]
    for prec, r in rows.items():
        acc = [f"{100 * e['accuracy']:.2f}% ({100 * (e['accuracy'] - e['original_accuracy']):+.2f})"
               for e in r["eval"].values()]
        speed = [f"{r[b]['vs_originals']:.2f}x [{r[b]['q'][0]:.2f}-{r[b]['q'][1]:.2f}] | {r[b]['vs_fp32']:.2f}x"
                 for b in BATCHES]
        lines.append(f"| {prec} | " + " | ".join(acc) + f" | {r['rounding']:.2g} | " + " | ".join(speed) + " |")
    lines += ["", "Originals: " + ", ".join(f"{t} {100 * e['original_accuracy']:.2f}%"
                                            for t, e in rows["fp32"]["eval"].items()) + "."]
    body = "\n".join(lines) + "\n"
    publish(cpu_section("table_precision", machine), body, write=not args.no_write)
    return 0


def emitted_auto(portable, batch: int):
    """The native model `--emit auto --target-batch batch --table-precision int8` writes from the
    calibrated portable model (EmitNativePass itself, on a state holding just what it reads), and how
    many layers it kept in each form."""
    from types import SimpleNamespace

    from onnxmerge.passes.codebook.emit_native import EmitNativePass

    state = SimpleNamespace(model=portable, info=SimpleNamespace(fidelity={}), params={"emit": "auto"},
                            portable_fallback=False, warnings=[])
    result = EmitNativePass(auto=True, batch=batch, table_precision="int8").call(state).state
    kept = [r.get("kept", r["faster"]) for r in state.info.fidelity.get("emit_auto", [])]
    return result.model, ", ".join(f"{kept.count(k)} {k}" for k in sorted(set(kept))) or "no layer timed"

if __name__ == "__main__":
    sys.exit(main())
