#!/usr/bin/env python3
"""Trained modern architectures merged by every method: what each costs in accuracy (BENCHMARKS.md, zoo_trained).

tools/zoo.py's compact torchvision-style MobileNetV3-Small (Hardswish, squeeze-excitation with Hardsigmoid,
depthwise convs, residual Adds) and EfficientNet-B0 (SiLU, squeeze-excitation with Sigmoid, depthwise convs,
residual Adds), each trained on MNIST and, from another seed, on Fashion-MNIST (`python
tools/train_models.py --group zoo`, build/zoo_models, trained here on first use). For each architecture
its two models are merged by the command line, as a user would run it, with every method:

- pack (nothing shared, exact);
- zipper `--share all` and `--share K` (half of the layers below the task head), calibrated;
- codebook `--preset accu` and `--preset light`, calibrated;
- mtz `--share-ratio 0.5`, its Hessians and retraining on the calibration data.

Calibration data: the first `--calib-samples` images of each training split (the models were trained on
the whole training split); evaluation: the full 10,000-image test splits, which nothing here calibrates
on. Accuracies, parameters and calibration time come from each merge's `--report` JSON; a merge that
fails is a row with its error line.

    python tools/bench/zoo_trained.py [--only mobilenet_v3 efficientnet] [--steps 300] [--calib-samples 5000]
                                      [--no-train] [--no-write] [--work-dir build/zoo_bench]

Writes the `zoo_trained` section of BENCHMARKS.md (unless --no-write), always for both architectures:
with `--only`, the other architecture's table is kept from the section as it was.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchmarks_md import BENCHMARKS, ROOT, read_section, require, write_section  # noqa: E402  (tools/bench is not a package)

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

SECTION = "zoo_trained"
MODELS = ROOT / "build" / "zoo_models"
WORK = ROOT / "build" / "zoo_bench"
# architecture -> (title, {task: model name}); the task names are the merged model's
ARCHS = {
    "mobilenet_v3": ("MobileNetV3-Small", {"mnist": "mobilenet_v3_mnist", "fashion": "mobilenet_v3_fashion"}),
    "efficientnet": ("EfficientNet-B0", {"mnist": "efficientnet_mnist", "fashion": "efficientnet_fashion"}),
}
DATASETS = {"mnist": "mnist", "fashion": "fashion-mnist"}  # task -> load_named name
EVAL_FILES = {"mnist": "mnist_test.npz", "fashion": "fashion_test.npz"}  # train_models' zoo eval sets: full test splits
STEPS = 300  # calibration steps per merge (zipper, codebook); mtz: MTZ_RETRAIN steps per zipped layer
CALIB_SAMPLES = 5000
# calibration learning rates, as the methods' own benches use them: zipper_sweep.py (averaged weights move far)
# and codebook.py (the paper's 2e-4); mtz retrains after each zipped layer with the zipper's
LR = {"zipper": 1e-3, "codebook": 2e-4, "mtz": 1e-3}
MTZ_RETRAIN = 20  # mtz --retrain-steps per zipped layer (the layers it zips are only known once it runs)
MERGE_TIMEOUT = 30 * 60


def settings(half: int, layers: int) -> list[tuple[str, str, list[str]]]:
    """(label, method, method flags) of every merge; calibration flags are added per method."""
    return [
        ("pack", "pack", []),
        ("zipper `--share all`", "zipper", ["--share", "all"]),
        (f"zipper `--share {half}` ({half} of {layers} layers)", "zipper", ["--share", str(half)]),
        ("codebook `--preset accu`", "codebook", ["--preset", "accu"]),
        ("codebook `--preset light`", "codebook", ["--preset", "light"]),
        (f"mtz `--share-ratio 0.5`, {MTZ_RETRAIN} retraining steps per zipped layer", "mtz",
         ["--share-ratio", "0.5", "--retrain-steps", str(MTZ_RETRAIN)]),
    ]


def rel(p: Path) -> str:
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def calib_files(work: Path, n: int) -> dict[str, Path]:
    """The first `n` images of each task's training split as .npz (written once, reused)."""
    from onnxmerge.data import load_named, save_npz

    out = {}
    for task, ds in DATASETS.items():
        path = work / f"calib_{task}_train{n}.npz"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            save_npz(path, load_named(ds, "train", limit=n))
        out[task] = path
    return out


def layer_count(model: Path) -> int:
    """The number of layers `onnxmerge inspect` sees in `model`."""
    out = subprocess.run([sys.executable, "-m", "onnxmerge", "inspect", str(model), "--json"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    doc = json.loads(out)
    return len(next(iter(doc["models"].values()))["layers"])


def error_line(stderr: str) -> str:
    """The line a failed command ends with that says why (onnxmerge's error line where there is one)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("onnxmerge: error") or "Error" in ln.split(":")[0]:
            return ln
    return lines[-1] if lines else "no output"


def run_merge(cmd: list[str], log: Path) -> dict:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=MERGE_TIMEOUT,
                              env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = -1, exc.stdout or "", (exc.stderr or "") + f"\ntimed out after {MERGE_TIMEOUT} s"
        out, err = (out.decode() if isinstance(out, bytes) else out), (err.decode() if isinstance(err, bytes) else err)
    seconds = time.perf_counter() - t0
    log.write_text(f"$ {shlex.join(cmd)}\n\n{out}\n--- stderr ---\n{err}")
    return {"rc": rc, "seconds": seconds, "stderr": err}


def bench_arch(arch: str, models: dict[str, Path], calib: dict[str, Path], steps: int, work: Path) -> dict:
    """Every merge of `arch`'s pair: {"layers", "half", "rows": [...]} (each row's figures or error)."""
    title, names = ARCHS[arch]
    tasks = list(names)
    evals = {t: MODELS / EVAL_FILES[t] for t in tasks}
    layers = layer_count(models[tasks[0]])
    half = (layers - 1) // 2  # of the layers below the task head
    out_dir = work / arch
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (label, method, flags) in enumerate(settings(half, layers - 1)):
        stem = f"{i}_{method}"
        merged, report = out_dir / f"{stem}.onnx", out_dir / f"{stem}.json"
        report.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "onnxmerge", *[rel(models[t]) for t in tasks], "-o", rel(merged),
               "--method", method, *flags, "--names", ",".join(tasks)]
        if method != "pack":
            cmd += [a for t in tasks for a in ("--calib", f"{t}={rel(calib[t])}")]
            cmd += ["--lr", str(LR[method])] + (["--steps", str(steps)] if method != "mtz" else [])
        cmd += [a for t in tasks for a in ("--data", f"{t}={rel(evals[t])}")]
        cmd += ["--report", rel(report), "--no-latency", "--quiet"]
        shown = shlex.join(["onnxmerge", *cmd[3:]])
        print(f"[{arch}] {label}: {shown}", flush=True)
        res = run_merge(cmd, out_dir / f"{stem}.log")
        row = {"label": label, "method": method, "command": shown, "seconds": res["seconds"]}
        if res["rc"] != 0 or not report.is_file():
            row["error"] = error_line(res["stderr"])
            print(f"    failed ({res['rc']}) in {res['seconds']:.0f} s: {row['error']}", flush=True)
        else:
            rep = json.loads(report.read_text())
            ev = rep["evaluation"]
            cal = (rep.get("params") or {}).get("calibration") or {}
            row.update({
                "acc": {t: ev[t]["accuracy"] for t in tasks},
                "orig": {t: ev[t]["original_accuracy"] for t in tasks},
                "agreement": {t: ev[t]["agreement"] for t in tasks},
                "params": rep["sizes"]["merged"]["params"], "params_orig": rep["sizes"]["originals_total"]["params"],
                "bytes": rep["sizes"]["merged"]["param_bytes"],
                "bytes_orig": rep["sizes"]["originals_total"]["param_bytes"],
                "macs": rep["sizes"]["merged"]["macs"], "macs_orig": rep["sizes"]["originals_total"]["macs"],
                "calib_seconds": cal.get("seconds"), "calib_steps": cal.get("steps"),
                "notes": (rep.get("fidelity") or {}).get("notes") or [],
                "mtz_layers": ((rep.get("fidelity") or {}).get("mtz") or {}).get("layers"),
                "codebook_layers": [{k: g.get(k) for k in ("layer", "exact", "dense_params")}
                                    for g in (rep.get("fidelity") or {}).get("codebook_layers") or []],
            })
            if method == "mtz":  # its retraining runs inside the merge, layer by layer
                row["calib_seconds"] = ((rep.get("fidelity") or {}).get("mtz") or {}).get("retrain_seconds")
            print("    " + ", ".join(f"{t} {100 * row['acc'][t]:.2f}% (original {100 * row['orig'][t]:.2f}%)"
                                    for t in tasks) + f"; params {row['params']:,} / {row['params_orig']:,}; "
                  f"{res['seconds']:.0f} s", flush=True)
        rows.append(row)
    return {"arch": arch, "title": title, "layers": layers, "half": half, "rows": rows}


def pct(v: float) -> str:
    return f"{100 * v:.2f}%"


def arch_table(fig: dict) -> list[str]:
    tasks = list(ARCHS[fig["arch"]][1])
    ok = [r for r in fig["rows"] if "error" not in r]
    orig = ok[0]["orig"] if ok else None
    lines = [f"### {fig['title']} (`{'`, `'.join(ARCHS[fig['arch']][1].values())}`; {fig['layers']} layers, "
             "the last the task head)", ""]
    if orig:
        lines += [f"Originals on the test splits: MNIST {pct(orig['mnist'])}, Fashion-MNIST {pct(orig['fashion'])}; "
                  f"together {ok[0]['params_orig']:,} parameters, {ok[0]['macs_orig']:,} MACs per image pair.", ""]
    lines += ["| method / setting | MNIST acc | Fashion acc | change vs originals (points, MNIST / Fashion) "
              "| params vs originals together | MACs vs originals | merge seconds (calibration) |",
              "|---|---|---|---|---|---|---|"]
    for r in fig["rows"]:
        if "error" in r:
            msg = r["error"].replace("|", "\\|")
            lines.append(f"| {r['label']} | failed: `{msg}` | | | | | {r['seconds']:.0f} |")
            continue
        change = " / ".join(f"{100 * (r['acc'][t] - r['orig'][t]):+.2f}" for t in tasks)
        params = f"{r['params']:,} ({100 * r['params'] / r['params_orig']:.0f}%)"
        if r["bytes"] != 4 * r["params"]:  # integer index tables: bytes say more than counts
            params += f"; bytes {100 * r['bytes'] / r['bytes_orig']:.0f}%"
        macs = f"{100 * r['macs'] / r['macs_orig']:.0f}%"
        cal = "" if r["calib_seconds"] is None else f" ({r['calib_seconds']:.0f})"
        lines.append(f"| {r['label']} | {pct(r['acc']['mnist'])} | {pct(r['acc']['fashion'])} | {change} | {params} "
                     f"| {macs} | {r['seconds']:.0f}{cal} |")
    lines.append("")
    pack = next((r for r in ok if r["method"] == "pack"), None)
    if pack:
        lines.append(f"- pack shares nothing: its {pack['params']:,} parameters are the originals' with BatchNorm folded "
                     "into the convolutions (the originals' files keep BatchNorm's parameters), the "
                     "reference for what the other rows share.")
    for r in fig["rows"]:
        notes = r.get("notes", [])
        dense = [n for n in notes if n.startswith("codebook:") and "stays dense" in n]
        if dense:
            lines.append(f"- {r['label']}: {len(dense)} layers (of both models) stay dense and per model, as the report's notes say "
                         f"(for example `{dense[0][len('codebook: '):]}`).")
        books = r.get("codebook_layers") or []
        if books:
            exact = [g for g in books if g["exact"]]
            share = sum(g["dense_params"] or 0 for g in exact) / max(1, sum(g["dense_params"] or 0 for g in books))
            lines.append(f"- {r['label']}: {len(exact)} of its {len(books)} codebook layers are exact (a codeword per "
                         f"distinct piece: C is clamped to the number of pieces, these layers are too small to "
                         f"quantise), {100 * share:.0f}% of the codebook layers' dense weights; only the others are "
                         "approximated.")
        for note in notes:
            if note not in dense:
                lines.append(f"- {r['label']}, report note: {note}")
        if r.get("mtz_layers") is not None:
            zipped = [f"{x['layer']} {x['shared']}/{min(x['candidates'])}" for x in r["mtz_layers"]]
            lines.append(f"- {r['label']}: {len(zipped)} layer(s) zipped (shared / candidate neurons): "
                         f"{', '.join(zipped) or 'none'}.")
    lines += ["", "Commands (run from the repository root; `onnxmerge` is `python -m onnxmerge`):", ""]
    lines += [f"- `{r['command']}`" for r in fig["rows"]]
    return lines


def section(figs: dict[str, dict | list[str]], argv: list[str], seconds: float, steps: int, n_calib: int) -> str:
    from onnxmerge.measure.latency import machine_info

    info = machine_info()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"
    command = shlex.join(["python", "tools/bench/zoo_trained.py", *argv])
    lines = [
        "## Trained MobileNetV3-Small and EfficientNet-B0 pairs (MNIST + Fashion-MNIST) merged by every method",
        "",
        f"Written by `{command}`; rerun it to update this section.",
        "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; {seconds:.0f} s in all (with any training) for the "
        f"architectures run ({', '.join(a for a, f in figs.items() if isinstance(f, dict))})",
        f"- machine: {info['cpu']}, {info['usable_cores']} usable of {info['logical_cores']} logical cores, "
        f"onnxruntime {info['onnxruntime']} (load average 1/5/15 min at the end: {load}; other jobs share it, "
        "so the seconds follow the load)",
        "- models: `python tools/train_models.py --group zoo` (build/zoo_models): tools/zoo.py's architectures with "
        "a 1-channel stem conv, input 28x28, each model trained from its own seed (independently initialised: their "
        "channels are not aligned), Adam with cosine decay, no augmentation",
        f"- calibration: the first {n_calib:,} images of each training split (the models trained on the whole "
        f"split); zipper and codebook {steps} steps after the merge (lr {LR['zipper']} / {LR['codebook']}, batch "
        f"64, labels + per-layer L1 + distillation from the originals); mtz its layer-wise Hessians "
        f"({256} samples per task, the default) and {MTZ_RETRAIN} retraining steps after each zipped layer (lr "
        f"{LR['mtz']}); pack no calibration",
        "- accuracy: top-1 on the full test splits (10,000 images each), which no merge or calibration saw, "
        "from each merge's `--report`; change = merged minus the original (computed in the same run), in points",
        "- params: the merged model's parameters (floats, plus integer index entries for codebook) against the "
        "two original files' together (which keep BatchNorm: every merged model has it folded, so even pack is "
        "below 100%); codebook also the parameter bytes (uint8 indices); MACs per image pair (one image per task)",
        "- merge seconds: wall time of the whole command (loading, merging, calibration, saving, evaluating "
        "merged and originals on 20,000 images), calibration alone in brackets (mtz: its retraining)",
        "- not measured: latency (`--no-latency`: see the zipper and kernels sections for speed), accuracy "
        "before calibration, the spread over seeds or calibration subsets (one run each), channel matching "
        "(`--match hungarian`), zipper on models fine-tuned from one initialisation (its paper's setting), larger "
        "budgets",
        "",
    ]
    for arch in ARCHS:
        fig = figs.get(arch)
        if isinstance(fig, dict):
            lines += arch_table(fig) + [""]
        elif fig:  # kept from the section as it was
            lines += fig + [""]
    return "\n".join(lines)


def kept_tables() -> dict[str, list[str]]:
    """Each architecture's table as the section holds it now (for --only)."""
    text = read_section(BENCHMARKS, SECTION)
    if text is None:
        return {}
    out, cur = {}, None
    for line in text.splitlines()[1:-1]:
        if line.startswith("### "):
            cur = next((a for a, (title, _) in ARCHS.items() if line.startswith(f"### {title} ")), None)
            if cur:
                out[cur] = []
        if cur:
            out[cur].append(line)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=list(ARCHS), default=list(ARCHS), metavar="ARCH",
                    help=f"architectures to run ({', '.join(ARCHS)}; default both)")
    ap.add_argument("--steps", type=int, default=STEPS, help=f"calibration steps per merge (default {STEPS})")
    ap.add_argument("--calib-samples", type=int, default=CALIB_SAMPLES,
                    help=f"calibration images per task, the first of each training split (default {CALIB_SAMPLES})")
    ap.add_argument("--work-dir", type=Path, default=WORK, help=f"merged models, reports, logs (default {rel(WORK)})")
    ap.add_argument("--no-train", action="store_true", help="do not train missing models (fail instead)")
    ap.add_argument("--no-write", action="store_true", help="print the section, do not write BENCHMARKS.md")
    args = ap.parse_args(argv)

    import train_models

    if not require("zoo_trained", data=True):
        return 1
    t0 = time.perf_counter()
    names = [n for a in args.only for n in ARCHS[a][1].values()]
    missing = [n for n in names if not (MODELS / f"{n}.onnx").is_file()]
    if missing and args.no_train:
        print(f"zoo_trained: missing {', '.join(missing)} (python tools/train_models.py --group zoo)", file=sys.stderr)
        return 1
    paths = train_models.ensure_zoo_models(names)
    work = args.work_dir.resolve()
    calib = calib_files(work, args.calib_samples)
    figs: dict[str, dict | list[str]] = {} if args.no_write else dict(kept_tables())
    for arch in args.only:
        figs[arch] = bench_arch(arch, {t: paths[n] for t, n in ARCHS[arch][1].items()}, calib, args.steps, work)
        (work / f"{arch}.json").write_text(json.dumps(figs[arch], indent=2) + "\n")
    body = section(figs, argv, time.perf_counter() - t0, args.steps, args.calib_samples)
    print(body, flush=True)
    if not args.no_write:
        write_section(BENCHMARKS, SECTION, body)
        print(f"updated section {SECTION} of {BENCHMARKS}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
