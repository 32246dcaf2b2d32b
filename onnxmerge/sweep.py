"""Progressive sharing (`--sweep`): share layers 1, 2, ..., L-1 one at a time, calibrating after each.

The zipper paper (section 3, Table 1, Figures 3-4) merges layer 1 and calibrates, then merges layer 2
starting from the calibrated model, and so on, giving a sequence of merged models from which the user
picks one by accuracy and speed. `sweep` does that for a method that declares the layer-count
parameter it walks (`Method.sweep`; zipper's `share`) and starts from an earlier merged model
(`warm_start`), and returns one row per model, like the paper's Table 1: merged layers, compression, MAC ratio, measured speed-up over the originals in
separate sessions (batch 1, one thread, ratio of medians in one process), memory, and accuracy per
task. `write_sweep` writes the models chosen, the table as JSON and Markdown, and a PNG plot.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import onnx
from tqdm import tqdm

from onnxmerge.api import merge
from onnxmerge.calibration.calibrate import CalibrationConfig
from onnxmerge.errors import UsageError
from onnxmerge.measure.evaluate import evaluate
from onnxmerge.measure.latency import latency_table
from onnxmerge.measure.metrics import count_macs, count_parameters, parameter_bytes
from onnxmerge.model.saving import save_atomic, write_bytes_atomic, write_text_atomic
from onnxmerge.pipeline.method import Method


def sweep(method: Method, inputs: list, names: list[str] | None, calib: dict, data: dict, *,
          steps_per_layer: int = 200, calibration: CalibrationConfig | None = None, params: dict | None = None,
          latency_budget_s: float = 1.0, up_to: int | None = None, progress: bool = True,
          fuse_branches: str = "on") -> list[dict]:
    """Merge with `method.sweep` = 1, 2, ..., `up_to` (default: all layers but the heads), each step
    starting from the previous calibrated model, the method's other `params` fixed; one row per model.

    Row 0 is the merged model with nothing shared (the originals, BatchNorm folded). Each row holds
    the model itself under "model". Compression counts the originals' parameters as exported, so
    row 0 already shows what folding BatchNorm saves. `fuse_branches`: as api.merge's, for every row.
    """
    if not data:
        raise UsageError("--sweep needs --data TASK=PATH to measure accuracy along the sweep")
    config = replace(calibration or CalibrationConfig(), steps=steps_per_layer)
    knob, params = method.sweep, dict(params or {})
    base = merge(inputs, method=method.name, names=names, params=params | {knob: 0}, fuse_branches=fuse_branches)
    originals = {t.name: str(t.path) for t in base.state.tasks}
    n_layers = len(base.state.tasks[0].layers)
    orig_models = [onnx.load(p) for p in originals.values()]
    totals = {"params": sum(map(count_parameters, orig_models)), "macs": sum(map(count_macs, orig_models))}
    rows = [_row(base, 0, originals, totals, data, latency_budget_s, reference=None)]
    previous, done = None, 0
    last = n_layers - 1 if up_to is None else min(up_to, n_layers - 1)
    bar = tqdm(range(1, last + 1), desc=f"{method.name} sweep", unit="layer", disable=not progress)
    for k in bar:
        if k <= done:
            continue  # a residual block already shared whole by the previous step
        result = merge(inputs, method=method.name, names=names, params=params | {knob: k},
                       calib=calib or None, calibration=config, warm_start=previous, fuse_branches=fuse_branches)
        done = result.info.params[knob]
        previous = result.model
        rows.append(_row(result, done, originals, totals, data, latency_budget_s, reference=rows[0]["original_accuracy"]))
        bar.set_postfix_str(f"share {done}: " + ", ".join(f"{t} {a:.1%}" for t, a in rows[-1]["accuracy"].items()))
    return rows


def _row(result, shared: int, originals: dict, totals: dict, data: dict, latency_budget_s: float, reference: dict | None) -> dict:
    """One line of the table; `totals`: the originals' parameters and MACs together; `reference`: the
    originals' accuracy, measured once in the first row."""
    model = result.model
    ev = evaluate(model, result.info, data, None if reference else originals, progress=False)
    lat = latency_table(model, originals, batch_sizes=(1,), threads=(1,), budget_s=latency_budget_s,
                        progress=False)[0]
    return {
        "share": shared,
        "compression": totals["params"] / count_parameters(model),
        "mac_ratio": totals["macs"] / count_macs(model),
        "speedup": lat["speedup_vs_originals"],
        "weight_mb": parameter_bytes(model) / 2**20,
        "accuracy": {t: r["accuracy"] for t, r in ev.items()},
        "original_accuracy": reference or {t: r["original_accuracy"] for t, r in ev.items()},
        "model": model,
    }


def write_sweep(rows: list[dict], stem: str | Path, keep: list[int] | None = None) -> list[Path]:
    """Write `<stem>_share<K>.onnx` (all, or those in `keep`), `<stem>_sweep.{json,md,png}`."""
    stem = Path(stem)
    stem = stem.with_suffix("") if stem.suffix == ".onnx" else stem
    written = []
    for r in rows[1:]:
        if keep is None or r["share"] in keep:
            written.append(save_atomic(r["model"], f"{stem}_share{r['share']}.onnx"))
    table = [{k: v for k, v in r.items() if k != "model"} for r in rows]
    written.append(write_text_atomic(f"{stem}_sweep.json", json.dumps(table, indent=2) + "\n"))
    written.append(write_text_atomic(f"{stem}_sweep.md", sweep_markdown(table)))
    written.append(plot_sweep(table, f"{stem}_sweep.png"))
    return written


def sweep_markdown(table: list[dict]) -> str:
    """The sweep's rows as the Markdown table of the paper's Table 1."""
    tasks = list(table[0]["accuracy"])
    head = ["merged layers", "compression", "MAC ratio", "speed-up (b=1, 1 thread)", "weights MB"]
    head += [f"{t} accuracy (change)" for t in tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = [str(r["share"]), f"{r['compression']:.2f}x", f"{r['mac_ratio']:.2f}x", f"{r['speedup']:.2f}x",
                 f"{r['weight_mb']:.3f}"]
        cells += [f"{100 * r['accuracy'][t]:.2f}% ({100 * (r['accuracy'][t] - r['original_accuracy'][t]):+.2f})"
                  for t in tasks]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_sweep(table: list[dict], path: str | Path) -> Path:
    """Accuracy per task and measured speed-up against merged layers (Figures 3-4 of the paper)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = [r["share"] for r in table]
    fig, ax = plt.subplots(figsize=(6, 4))
    for task in table[0]["accuracy"]:
        ax.plot(k, [100 * r["accuracy"][task] for r in table], marker="o", label=f"{task} accuracy")
    ax.set_xlabel("merged layers")
    ax.set_xticks(k)
    ax.set_ylabel("accuracy (%)")
    right = ax.twinx()
    right.plot(k, [r["speedup"] for r in table], color="black", linestyle="--", marker="s", label="speed-up")
    right.set_ylabel("speed-up over the originals (x)")
    lines = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(lines, [l.get_label() for l in lines], loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()  # rendered in memory, then written atomically: no partial PNG on Ctrl-C
    fig.savefig(buffer, dpi=120, format="png")
    plt.close(fig)
    return write_bytes_atomic(path, buffer.getvalue())
