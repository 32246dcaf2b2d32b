"""The report every merge prints and can write as JSON.

`build_report` gathers what a user needs to judge a merge: the method and its parameters, the tasks,
per-task accuracy and fidelity (when data is given), sizes of the originals together against the
merged model, and the latency table. Every ratio reads "originals / merged", so above 1 is better
for the merged model:

    compression (params)  = originals' parameters together / merged parameters
    compression (bytes)   = originals' parameter bytes together / merged parameter bytes
    MAC ratio             = originals' MACs together / merged MACs            (batch 1)
    speed-up              = originals' median time / merged median time       (same process, interleaved)

File bytes count a model's external data files too. The report ends with the peak resident memory
of the process (getrusage) against the inputs' size on disk, with a note above 3x.

`format_report` renders the dict as plain text; `write_report_json` writes it atomically.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx

from onnxmerge.measure.evaluate import evaluate
from onnxmerge.measure.latency import latency_table, machine_info
from onnxmerge.measure.metrics import model_stats
from onnxmerge.model.contract import MergedInfo
from onnxmerge.model.saving import disk_bytes, split_weights, write_text_atomic

_SIZE_KEYS = ("params", "float_params", "index_params", "param_bytes", "file_bytes", "macs")
# The peak memory a merge aims to stay under, in multiples of its inputs' size on disk (issue 8).
PEAK_AIM = 3.0


def _ratio(a, b) -> float | None:
    return None if a is None or b in (None, 0) else a / b


def _stats(model, path: str | os.PathLike | None = None) -> dict:
    """model_stats of a model or a path, from its structure: a path is read without its external
    data, no weight is copied, and the file bytes count the external data files too."""
    if not isinstance(model, onnx.ModelProto):
        model, path = onnx.load(str(model), load_external_data=False), model
    stats = model_stats(split_weights(model)[0], None)
    stats["file_bytes"] = disk_bytes(path) if path is not None and Path(path).is_file() else None
    return stats


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory so far (getrusage: KiB on Linux, bytes on macOS); None
    where the platform has no getrusage."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def memory_figures(originals: dict) -> dict:
    """Peak memory of this process against the inputs' size on disk (model files and their external
    data; None when an original is given as a ModelProto), and whether it is over PEAK_AIM times."""
    peak = peak_rss_bytes()
    paths = list(originals.values())
    inputs = None if any(isinstance(m, onnx.ModelProto) for m in paths) else sum(disk_bytes(p) for p in paths)
    ratio = _ratio(peak, inputs)
    return {"peak_rss_bytes": peak, "inputs_disk_bytes": inputs, "peak_over_inputs": ratio,
            "over_aim": None if ratio is None else ratio > PEAK_AIM}


def build_report(*, merged_model: onnx.ModelProto, merged_path: str | os.PathLike | None = None,
                 info: MergedInfo, originals: dict, pack_model: onnx.ModelProto | None = None,
                 data: dict | None = None, latency: bool = True, latency_budget_s: float = 1.0,
                 batch_sizes=(1, 32), threads=(1, None), progress: bool = True) -> dict:
    """The report of one merge as a JSON-ready dict.

    `originals` maps task name -> original model (path, or ModelProto: then no file size);
    `data` maps task name -> data set (`.x`, `.y`, `.source`) for the evaluation; `pack_model` adds
    the pack method (tasks side by side in one graph) as a second latency reference.
    `latency_budget_s` is the time budget of each cell of the latency table.
    """
    orig_stats = {name: _stats(m) for name, m in originals.items()}
    total = {k: sum(s[k] for s in orig_stats.values()) for k in _SIZE_KEYS if k != "file_bytes"}
    total["file_bytes"] = (None if any(s["file_bytes"] is None for s in orig_stats.values())
                           else sum(s["file_bytes"] for s in orig_stats.values()))
    merged_stats = _stats(merged_model, merged_path)
    report = {
        "onnxmerge_version": info.version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": info.method,
        "params": info.params,
        "merged_path": None if merged_path is None else str(merged_path),
        "tasks": [dict(t.__dict__) for t in info.tasks],
        "fidelity": info.fidelity,
        "sizes": {"originals": orig_stats, "originals_total": total, "merged": merged_stats},
        "ratios": {
            "compression_params": _ratio(total["params"], merged_stats["params"]),
            "compression_param_bytes": _ratio(total["param_bytes"], merged_stats["param_bytes"]),
            "compression_file_bytes": _ratio(total["file_bytes"], merged_stats["file_bytes"]),
            "macs": _ratio(total["macs"], merged_stats["macs"]),
        },
        "evaluation": None,
        "latency": None,
    }
    if data:
        report["evaluation"] = evaluate(merged_model, info, data, dict(originals), progress=progress)
    if latency:
        rows = latency_table(merged_model, list(originals.values()), pack_model,
                             batch_sizes=batch_sizes, threads=threads, budget_s=latency_budget_s,
                             progress=progress)
        report["latency"] = {"rows": rows, "budget_s_per_cell": latency_budget_s,
                             "machine": machine_info()}
    report["memory"] = memory_figures(originals)  # last: the peak of everything so far
    return report


# ---------------------------------------------------------------- text

def _table(headers: list[str], rows: list[list[str]], left: int = 1, indent: str = "  ") -> str:
    """Aligned columns: the first `left` columns left-aligned (text), the rest right-aligned (numbers)."""
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells):
        parts = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return (indent + "  ".join(parts)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def _int(v) -> str:
    return "-" if v is None else f"{v:,}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _gb(v) -> str:
    return f"{v / 1e9:.2f} GB" if v >= 1e8 else f"{v / 1e6:.1f} MB"


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}%"


def _us(median: float, quartiles: list[float]) -> str:
    return f"{1e6 * median:.1f} ({1e6 * quartiles[0]:.1f}-{1e6 * quartiles[1]:.1f})"


def _size_row(label: str, s: dict) -> list[str]:
    return [label] + [_int(s[k]) for k in _SIZE_KEYS]


def format_report(report: dict) -> str:
    """A readable plain-text rendering of `build_report`'s dict."""
    out = [f"onnxmerge {report['onnxmerge_version']}: method {report['method']} "
           f"{json.dumps(report['params'], sort_keys=True)}"]
    if report.get("merged_path"):
        out.append(f"merged model: {report['merged_path']}")
    out.append("")
    out.append("Tasks")
    out.append(_table(["task", "source", "inputs", "outputs"], [
        [t["name"], t["source"], ", ".join(t["inputs"].values()), ", ".join(t["outputs"].values())]
        for t in report["tasks"]], left=4))

    sizes, ratios = report["sizes"], report["ratios"]
    out += ["", "Sizes (index = integer index tables; MACs at batch 1)"]
    rows = [_size_row(f"{name} (original)", s) for name, s in sizes["originals"].items()]
    rows += [_size_row("originals together", sizes["originals_total"]),
             _size_row("merged", sizes["merged"])]
    out.append(_table(["model", "params", "float", "index", "param bytes", "file bytes", "MACs"], rows))
    out.append(f"  compression {_x(ratios['compression_params'])} params, "
               f"{_x(ratios['compression_param_bytes'])} param bytes, "
               f"{_x(ratios['compression_file_bytes'])} file bytes "
               f"(= originals together / merged; > 1: merged is smaller)")
    out.append(f"  MAC ratio {_x(ratios['macs'])} (= originals' MACs / merged MACs; "
               f"> 1: merged does less work)")

    layers = (report.get("fidelity") or {}).get("codebook_layers")
    if layers:
        out += ["", "Codebooks (rel. error = k-means ||W - W_hat||^2 / ||W||^2 over the layer's pieces; G: segments "
                    "per codebook; bytes: the dense weights replaced / codebook + indices as stored, indices of "
                    "C <= 16 two to a byte)"]
        out.append(_table(
            ["layer", "models", "r", "C", "G", "segments", "rel. error", "k-means s", "dense B", "stored B", "ratio"],
            [[g["layer"], str(len(g["members"])), str(g["r"]), str(g["codewords"]), str(g.get("group", 1)),
              str(g["segments"]), "0 (exact)" if g["exact"] else f"{g['kmeans_rel_error']:.4f}",
              _seconds(g.get("kmeans_seconds")), _int(g.get("dense_bytes")), _int(g.get("stored_bytes")),
              _x(g.get("compression_bytes"))] for g in layers]))
    timed = (report.get("fidelity") or {}).get("emit_auto")
    if timed:
        out += ["", f"--emit auto: each native node against its dense layer on this machine (median us per run, "
                    f"quartiles; batch {timed[0]['batch']}, {timed[0]['threads']} thread(s)); kept: the form written "
                    "(a layer faster alone returns to dense while the whole model runs slower than its portable form)"]
        floats = any("fp32_tables_s" in r for r in timed)  # integer tables, also timed as float ones
        out.append(_table(["layer", "op", "native us", *(["fp32 tables us"] if floats else []), "dense us",
                           "native/dense", "kept"], [
            [r["layer"], r["op"], _us(r["native_s"], r["native_quartiles_s"]),
             *([_us(r["fp32_tables_s"], r["fp32_tables_quartiles_s"]) if "fp32_tables_s" in r else "-"] if floats else []),
             _us(r["dense_s"], r["dense_quartiles_s"]), f"{r['native_s'] / r['dense_s']:.2f}", r.get("kept", r["faster"])]
            for r in timed]))
    for w in (report.get("fidelity") or {}).get("emit_auto_model", []):
        out.append(f"- --emit auto: the whole model with {w['native_layers']} native layer(s) ran {w['ratio']:.2f}x "
                   f"its portable form's speed [{w['ratio_q1']:.2f}-{w['ratio_q3']:.2f}] (batch {w['batch']})")
    fuse = (report.get("fidelity") or {}).get("mtz_fuse")
    if fuse and fuse["layers"]:
        timed_fuse = fuse["mode"] == "auto"
        out += ["", f"mtz --fuse {fuse['mode']}: each layer of several runs as one node of its dense weight or one node "
                    "per run" + ("; both timed on this machine (median us per run, batch 1, one thread), the faster "
                                 "kept" if timed_fuse else "")]
        out.append(_table(["layer", "runs", "per run us", "fused us", "kept"], [
            [r["layer"], str(r["runs"]), _us(r["runs_s"], r["runs_quartiles_s"]) if timed_fuse else "-",
             _us(r["fused_s"], r["fused_quartiles_s"]) if timed_fuse else "-", "fused" if r["fused"] else "per run"]
            for r in fuse["layers"]]))
    branches = (report.get("fidelity") or {}).get("fuse_branches")
    if branches:
        out += ["", _fuse_branches_line(branches)]
    notes = (report.get("fidelity") or {}).get("notes")
    if notes:
        out += ["", "Notes"] + [f"  - {n}" for n in notes]

    ev = report.get("evaluation")
    if ev:
        out += ["", "Evaluation (agreement: samples where merged and original give the same top-1 "
                    "class; max|diff|: largest output difference)"]
        out.append(_table(
            ["task", "data", "n", "accuracy", "original", "agreement", "max|diff|"],
            [[name, r["source"], _int(r["n"]), _pct(r["accuracy"]), _pct(r.get("original_accuracy")),
              _pct(r.get("agreement")),
              "-" if r.get("max_abs_diff") is None else f"{r['max_abs_diff']:.3g}"]
             for name, r in ev.items()], left=2))

    cal = report.get("calibration")
    if cal:
        cfg, summ = cal["config"], cal["summary"]
        out += ["", f"Calibration: {summ['steps']} steps in {_seconds(summ.get('seconds'), 1)} s on {summ['processes']} "
                    f"process(es); lr {cfg['lr']}, batch {cfg['batch_size']}, layer-loss weight "
                    f"{cfg['layer_loss_weight']}, distillation {cfg['distill_weight']} at T={cfg['temperature']}, "
                    f"labels {'used where given' if cfg['use_labels'] else 'not used'}, seed {cfg['seed']}"]
        before, after = cal.get("before") or {}, report.get("evaluation") or {}
        rows = [[name, _pct(before.get(name, {}).get("accuracy")), _pct(after.get(name, {}).get("accuracy")),
                 _pct(after.get(name, {}).get("original_accuracy")),
                 f"{summ[name]['loss_first']:.4f}", f"{summ[name]['loss_last']:.4f}"]
                for name in summ if isinstance(summ[name], dict)]
        out.append(_table(["task", "acc before", "acc after", "original", "loss first", "loss last"], rows))

    mem = report.get("memory")
    if mem and mem.get("peak_rss_bytes") is not None:
        out += ["", f"Memory: peak {_gb(mem['peak_rss_bytes'])} resident (this process, up to the report)"
                    + ("" if mem["inputs_disk_bytes"] is None else
                       f"; inputs {_gb(mem['inputs_disk_bytes'])} on disk (models and external data): "
                       f"{_x(mem['peak_over_inputs'])} the inputs")]
        if mem.get("over_aim"):
            out.append(f"  note: peak memory is over {PEAK_AIM:g}x the inputs' size")

    lat = report.get("latency")
    if lat:
        out += ["", "Latency (median ms per run of all tasks; speed-up 1.35x = originals' median "
                    "time / merged median time, > 1: merged is faster; [q1-q3] of per-round ratios)"]
        out.append(format_latency_rows(lat["rows"]))
        m = lat["machine"]
        out.append(f"  machine: {m['cpu']}, {m['usable_cores']} usable of {m['logical_cores']} "
                   f"logical cores, onnxruntime {m['onnxruntime']}; "
                   f"budget {lat['budget_s_per_cell']} s per row")
    return "\n".join(out) + "\n"


def _fuse_branches_line(record: dict) -> str:
    """What `--fuse-branches` did (passes/common/fuse_branches.py's record): the nodes saved, and under
    auto each form's timing against the form before it (the grouping rules, then the layers written
    block-diagonal, H6, or reading their input computed per task, H1'', one by one)."""
    from onnxmerge.passes.common.fuse_branches import KERNELS

    head = f"--fuse-branches {record['mode']}: the tasks' parallel layers as one grouped layer"
    dense = record.get("dense") or []
    if "timed" not in record:  # (an older record has no kernels: the depthwise and 1x1 rule)
        return (f"{head} would save {record['fused_nodes']} node(s), {KERNELS[record.get('kernels') or '1x1']} grouped"
                + (f", {len(dense)} layer(s) block-diagonal" if dense else "") + "; fused")

    def form(t: dict) -> str:
        if t.get("dense"):
            how = ("on its input computed once per task" if t.get("rewrite") == "H1''" else "block-diagonal")
            return f"{t['dense']} {how} ({t['added_macs']:,} multiplications more)"
        return f"{KERNELS[t['kernels']]} grouped ({t['fused_nodes']} node(s) saved)"

    def against(t: dict) -> str:
        if t["against"] == "unfused":
            return "the unfused model"
        return "the model before it" if t["against"] not in KERNELS else f"the model with {KERNELS[t['against']]} grouped"

    timed = "; ".join(f"{form(t)} ran {t['ratio']:.2f}x [{t['ratio_q1']:.2f}-{t['ratio_q3']:.2f}] the speed of "
                      + against(t) + (", kept" if t["kept"] else ", not kept (not faster in three of four rounds)")
                      for t in record["timed"])
    return f"{head}, timed here (batch {record['batch']}, one thread): {timed}"


def format_latency_rows(rows: list[dict], merged_label: str = "merged") -> str:
    """The latency table of `latency_table`'s rows as aligned text."""
    has_pack = any("pack" in r for r in rows)
    headers = ["batch", "threads", "originals ms", f"{merged_label} ms", "speed-up", "[q1-q3]"]
    if has_pack:
        headers[3:3] = ["pack ms"]
        headers.append("vs pack")
    headers.append("runs")
    table = []
    for r in rows:
        m = r["merged"]
        row = [str(r["batch"]), str(r["threads"]), f"{r['originals']['median_ms']:.3f}",
               f"{m['median_ms']:.3f}", _x(r["speedup_vs_originals"]),
               f"[{m['ratio_q1']:.2f}-{m['ratio_q3']:.2f}]"]
        if has_pack:
            row[3:3] = [f"{r['pack']['median_ms']:.3f}" if "pack" in r else "-"]
            row.append(_x(r.get("speedup_vs_pack")))
        row.append(str(m["runs"]))
        table.append(row)
    return _table(headers, table)


# ---------------------------------------------------------------- JSON

def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def write_report_json(report: dict, path: str | os.PathLike) -> None:
    """Write `report` as JSON to `path` atomically: a temporary file in the same folder, renamed."""
    path = Path(path)
    write_text_atomic(path, json.dumps(report, indent=2, default=_json_default) + "\n")


def _seconds(value, digits: int = 2) -> str:
    """A timing, or "-" for a model read from a file (timings are kept out of model files)."""
    return "-" if value is None else f"{value:.{digits}f}"
