#!/usr/bin/env python3
"""`--target-opset 13` on every merged pair of the benchmarks (issue 20), written into BENCHMARKS.md.

Every pair of tools/bench/budget_search.py (both halves and the paper's LeNet pair) and the shipped
example pair, merged by every method that applies (same-architecture methods on the same-architecture
pairs only), with a lossy setting and no calibration (the conversion does not depend on the weights'
values), then taken down to opset 13 (onnxruntime 1.6) by onnxmerge.model.downgrade; per merge: how
it went down (relabelled or converted) and the largest relative difference of the outputs against
the model as merged on seeded random inputs (the acceptance: at most 1e-5), or the one-line refusal.

    python tools/bench/target_opset.py            # trains what is missing (tools/train_models.py), writes
    python tools/bench/target_opset.py --no-write
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import budget_search  # noqa: E402  (tools/bench is not a package; it puts tools/ on the path for train_models)
from benchmarks_md import ROOT, publish  # noqa: E402

EXAMPLES = ROOT / "onnxmerge" / "examples"
TARGET = 13
SIZE = 0.1
# method -> (the lossy setting, same architecture only)
SETTINGS = {
    "pack": ({}, False),
    "codebook": ({"size": SIZE}, False),
    "codebook (native)": ({"preset": "light", "emit": "native"}, False),
    "zipper": ({"share": 1}, True),
    "zipper+codebook": ({"share": 1, "size": SIZE}, True),
    "mtz": ({"share_ratio": 0.5, "hessian_samples": 64}, True),
    "mtz+codebook": ({"share_ratio": 0.5, "hessian_samples": 64, "size": SIZE}, True),
}


SHIPPED = "fashion_lenet+digits_lenet (shipped)"


def pairs(work: Path, only: list[str] | None = None) -> dict[str, tuple[str, dict[str, Path], dict[str, Path]]]:
    """name -> (kind, {task: model}, {task: calibration file}): the benchmark pairs and the shipped one."""
    found = {SHIPPED: (
        "different", {"fashion": EXAMPLES / "fashion_lenet.onnx", "digits": EXAMPLES / "digits_lenet.onnx"},
        {"fashion": EXAMPLES / "fashion_calib.npz", "digits": EXAMPLES / "digits_calib.npz"})}
    for name, (kind, _) in budget_search.PAIRS.items():
        if only and name not in only:
            continue
        models, calib, _ = budget_search.pair_files(name, work)
        found[name] = (kind, models, calib)
    return {k: v for k, v in found.items() if not only or k in only}


def run(name: str, kind: str, models: dict[str, Path], calib_files: dict[str, Path]) -> list[dict]:
    import onnx

    from onnxmerge import kernels
    from onnxmerge.api import merge
    from onnxmerge.calibration.calibrate import CalibrationConfig
    from onnxmerge.data import load_dataset
    from onnxmerge.errors import OnnxMergeError, first_line
    from onnxmerge.model.downgrade import default_opset

    tasks = list(models)
    calib = {t: load_dataset(p) for t, p in calib_files.items()}
    rows = []
    for label, (params, same_only) in SETTINGS.items():
        method = label.split(" ")[0]
        row = {"pair": name, "method": label, "params": params}
        if same_only and kind != "same":
            continue  # the pair's models differ: the method does not apply (the search says so too)
        if params.get("emit") == "native" and not kernels.available():
            rows.append({**row, "outcome": f"not run: {kernels.unavailable_reason()}"})
            continue
        t0 = time.perf_counter()
        try:
            result = merge([str(models[t]) for t in tasks], names=tasks, method=method, params=params, calib=calib,
                           calibration=CalibrationConfig(steps=0), calibrate_last=False, target_opset=TARGET,
                           progress=False)
        except OnnxMergeError as e:
            rows.append({**row, "outcome": f"refused: {first_line(e)}", "seconds": time.perf_counter() - t0})
            continue
        record = result.info.fidelity["target_opset"]
        source = max(default_opset(onnx.load(str(models[t]), load_external_data=False)) for t in tasks)
        rows.append({**row, "outcome": record["how"], "from_opset": source, "opset": record["opset"],
                     "ir_version": record["ir_version"], "max_rel_diff": record.get("max_rel_diff", 0.0),
                     "seconds": time.perf_counter() - t0})
        print(f"{name:45s} {label:18s} {rows[-1]['outcome']:40s} diff {rows[-1]['max_rel_diff']:.1e}", flush=True)
    return rows


def section(rows: list[dict], argv: list[str], seconds: float) -> str:
    import onnx
    import onnxruntime as ort

    ok = [r for r in rows if "max_rel_diff" in r]
    within = [r for r in ok if r["max_rel_diff"] <= 1e-5]
    lines = [
        f"## `--target-opset {TARGET}` on every merged pair of the benchmarks",
        "",
        "Written by `tools/bench/target_opset.py`.",
        "",
        f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}; {seconds:.0f} s",
        f"- command: `{shlex.join(['python', 'tools/bench/target_opset.py', *argv])}`",
        f"- onnx {onnx.__version__}, onnxruntime {ort.__version__}",
        "- pairs: budget_search's (tuning and report halves, the paper LeNet pair) and the shipped example pair; "
        "methods that apply to each (zipper and mtz only on same-architecture pairs), lossy settings, no calibration",
        f"- each merged model taken down to opset {TARGET} and its IR version, outputs compared with the model as "
        "merged on seeded random inputs (acceptance: at most 1e-5 relative)",
        f"- **{len(within)} of {len(rows)}** merges went down within 1e-5; "
        f"{len(rows) - len(ok)} refused or not run",
        "",
        "| pair | method | setting | from opset | outcome | IR | max rel diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        setting = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        if "max_rel_diff" in r:
            lines.append(f"| {r['pair']} | {r['method']} | {setting} | {r['from_opset']} | {r['outcome']} | "
                         f"{r['ir_version']} | {r['max_rel_diff']:.1e} |")
        else:
            lines.append(f"| {r['pair']} | {r['method']} | {setting} | | {r['outcome']} | | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    ap.add_argument("--only", nargs="+", metavar="PAIR", help="only these pairs (a look, not the table)")
    ap.add_argument("--work", type=Path, default=ROOT / "build" / "target_opset", help="calibration files of the paper pair")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    rows = []
    for name, (kind, models, calib) in pairs(args.work, args.only).items():
        rows += run(name, kind, models, calib)
    body = section(rows, argv, time.perf_counter() - t0)
    publish("target_opset", body, write=not args.no_write and not args.only)
    bad = [r for r in rows if "max_rel_diff" in r and not r["max_rel_diff"] <= 1e-5]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
