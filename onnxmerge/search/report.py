"""The search's report: every trial, the Pareto fronts, the choice and why, as Markdown, JSON and a
PNG plot (accuracy loss against size and against latency)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from onnxmerge.model.saving import write_bytes_atomic, write_text_atomic
from onnxmerge.search import OBJECTIVES
from onnxmerge.search.run import SearchResult
from onnxmerge.search.trial import CONFIDENCE_Z, LONGER, NEAR_Z, Trial


def why(result: SearchResult) -> str:
    """One sentence: which model was chosen and why."""
    c, budget = result.chosen, f"{result.max_loss:g} point(s)"
    within = [t for t in result.trials if t.within(result.max_loss)]
    what = "the smallest" if result.objective == "size" else \
        "the smallest of the fastest (speed-ups whose quartiles overlap the best's count as equal)"
    if c.method == "pack" and len(within) == 1:
        return (f"chosen: {c.label}, which shares nothing: no setting searched kept every task within {budget} "
                "on the held-out data")
    worst = max(c.loss, key=c.loss.get)
    return (f"chosen: {c.label}, {what} of the {len(within)} model(s) within {budget} per task on the held-out data "
            f"(worst task {worst}: {-c.loss[worst]:+.2f} points)")


def to_json(result: SearchResult, test: dict | None = None) -> dict:
    """Everything the search measured; `test`: the chosen model's test-split figures (from --data)."""
    return {
        "max_loss_points": result.max_loss, "objective": result.objective, "seconds": round(result.seconds, 1),
        "validation": result.validation, "original_accuracy": result.original_accuracy,
        "original_bytes": result.original_bytes,
        "trials": [t.row() | {"compression": _ratio(result, t)} for t in result.trials],
        "front": {o: [result.trials.index(t) for t in result.front(o)] for o in OBJECTIVES},
        "chosen": result.trials.index(result.chosen), "why": why(result), "notes": result.notes,
        **({"test": test} if test else {}),
    }


def _ratio(result: SearchResult, t: Trial) -> float | None:
    return result.original_bytes / t.bytes if t.bytes else None


def markdown(result: SearchResult) -> str:
    """The trials as a table (the front marked), then the choice and the notes."""
    tasks = list(result.original_accuracy)
    fronts = {o: {id(t) for t in result.front(o)} for o in OBJECTIVES}
    head = ["#", "method", "setting", "smaller", "speed-up (b=1, 1 thread)", "MACs",
            *[f"{t} (change)" for t in tasks], "calibrated", "within", "front", "s"]
    lines = ["Originals on the held-out data: " + ", ".join(f"{t} {100 * a:.2f}%" for t, a in result.original_accuracy.items())
             + f"; budget {result.max_loss:g} point(s) per task; objective {result.objective}. A change is shown "
             f"with its standard error (paired, per sample); a model is within the budget when every task's "
             f"loss plus {CONFIDENCE_Z:g} standard error(s) is. Calibrated \"longer\": a near miss (over the budget "
             f"by less than {NEAR_Z:g} standard error(s)) calibrated again from its merge with {LONGER} times the steps.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for k, t in enumerate(result.trials, 1):
        setting = t.setting
        if not t.measured:
            lines.append("| " + " | ".join([str(k), t.method, setting, t.status, *[""] * (len(head) - 4)]) + " |")
            continue
        front = "/".join(o for o in OBJECTIVES if id(t) in fronts[o]) or ""
        cells = [str(k), t.method, setting, f"{_ratio(result, t):.2f}x",
                 f"{t.speedup:.2f}x" if t.speedup else "-", f"{t.macs:,}",
                 *[f"{100 * t.accuracy[task]:.2f}% ({-t.loss[task]:+.2f} ± {t.error.get(task, 0):.2f})" for task in tasks],
                 ("longer" if t.longer else "yes") if t.calibrated else "no", "yes" if t.within(result.max_loss) else "no", front,
                 f"{t.seconds:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", why(result) + "."]
    lines += [f"- {n}" for n in result.notes]
    return "\n".join(lines) + "\n"


def plot(result: SearchResult, path: str | Path) -> Path:
    """Worst task's loss against size (compression) and against speed-up; fronts joined, the budget
    as a line, the choice circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [t for t in result.trials if t.measured]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, objective, x_of, label in ((axes[0], "size", lambda t: _ratio(result, t), "times smaller than the originals"),
                                        (axes[1], "latency", lambda t: t.speedup, "speed-up over the originals (b=1, 1 thread)")):
        pts = [t for t in measured if x_of(t)]
        methods = sorted({t.method for t in pts})
        for m in methods:
            ax.scatter([x_of(t) for t in pts if t.method == m], [max(t.worst_loss, 0) for t in pts if t.method == m],
                       label=m)
        front = [t for t in result.front(objective) if x_of(t)]
        ax.plot([x_of(t) for t in front], [max(t.worst_loss, 0) for t in front], "k--", lw=1, label="Pareto front")
        ax.axhline(result.max_loss, color="r", lw=1, label="budget")
        if x_of(result.chosen):
            ax.scatter([x_of(result.chosen)], [max(result.chosen.worst_loss, 0)], s=200, facecolors="none",
                       edgecolors="k", label="chosen")
        ax.set_xlabel(label)
        ax.set_ylabel("worst task's accuracy loss (points, held-out)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return write_bytes_atomic(path, buf.getvalue())


def write(result: SearchResult, stem: str | Path, test: dict | None = None) -> list[Path]:
    """`<stem>_search.md`, `<stem>_search.json` and `<stem>_search.png` beside the chosen model."""
    stem = Path(stem)
    stem = stem.with_suffix("") if stem.suffix == ".onnx" else stem
    return [write_text_atomic(f"{stem}_search.md", markdown(result)),
            write_text_atomic(f"{stem}_search.json", json.dumps(to_json(result, test), indent=2) + "\n"),
            plot(result, f"{stem}_search.png")]
