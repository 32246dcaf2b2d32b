"""Latency as ratios of medians, measured in one process and one run.

A shared, noisy machine makes absolute times meaningless from one run to the next, so speed is only
ever reported as a ratio of medians taken side by side: every round runs each candidate once, in a
rotating order, so that a burst of load from elsewhere hits all candidates alike.

A *candidate* is a list of `Step`s (a session and its feeds) run one after another; one timing of the
candidate is the wall time of the whole list. The originals in separate sessions are one candidate
with one step per model; the merged model is a candidate with one step.

Direction of the ratio: `ratio = median(baseline) / median(candidate)`, so a ratio above 1 means the
candidate is faster than the baseline (1.35 = the baseline takes 1.35x the candidate's time).
"""

from __future__ import annotations

import gc
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from onnxmerge.errors import MergeError
from onnxmerge.graph.ops import make_session
from onnxmerge.model.runtime import fixed_batch_of, random_feeds


@dataclass
class Step:
    """One `session.run(None, feeds)` inside a candidate."""

    session: ort.InferenceSession
    feeds: dict[str, np.ndarray]


def candidate(sessions: list[ort.InferenceSession], batch: int) -> list[Step]:
    """The candidate that runs `sessions` one after another on random feeds at `batch`."""
    return [Step(s, random_feeds(s, batch, seed=i)) for i, s in enumerate(sessions)]


def _run(steps: list[Step]) -> float:
    t0 = time.perf_counter()
    for step in steps:
        step.session.run(None, step.feeds)
    return time.perf_counter() - t0


def compare_latency(candidates: dict[str, list[Step]], baseline: str, *, min_rounds: int = 30,
                    max_rounds: int | None = None, warmup: int = 3, budget_s: float = 2.0,
                    progress: bool = True) -> dict[str, dict]:
    """Time the candidates interleaved, round by round, and compare them to `baseline`.

    Each round runs every candidate once (the order rotates from round to round). Rounds go on
    until at least `min_rounds` are done and `budget_s` seconds have passed, or `max_rounds` are
    done. Returns, per candidate: median_ms, p10_ms, p90_ms, q1_ms, q3_ms, runs, and
    ratio = median(baseline) / median(candidate) (> 1: faster than the baseline), with
    ratio_q1 / ratio_q3, the quartiles of the per-round paired ratios, as its spread.
    """
    if baseline not in candidates:
        raise MergeError(f"baseline {baseline!r} is not one of the candidates {list(candidates)}")
    names = list(candidates)
    for _ in range(warmup):
        for name in names:
            _run(candidates[name])
    times: dict[str, list[float]] = {name: [] for name in names}
    bar = tqdm(total=max_rounds, unit="round", desc="latency", disable=not progress, leave=False,
               mininterval=0.5)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection in the middle of one timing is noise
    try:
        start = time.perf_counter()
        rounds = 0
        while max_rounds is None or rounds < max_rounds:
            if rounds >= min_rounds and time.perf_counter() - start >= budget_s:
                break
            k = rounds % len(names)
            for name in names[k:] + names[:k]:
                times[name].append(_run(candidates[name]))
            rounds += 1
            bar.update(1)
    finally:
        if gc_was_enabled:
            gc.enable()
        bar.close()
    base = np.array(times[baseline])
    result = {}
    for name in names:
        t = np.array(times[name])
        p10, q1, med, q3, p90 = np.percentile(t, [10, 25, 50, 75, 90]) * 1e3
        paired = np.percentile(base / t, [25, 75])
        result[name] = {
            "median_ms": float(med), "p10_ms": float(p10), "p90_ms": float(p90),
            "q1_ms": float(q1), "q3_ms": float(q3), "runs": len(t),
            "ratio": float(np.median(base) / np.median(t)),
            "ratio_q1": float(paired[0]), "ratio_q3": float(paired[1]),
        }
    return result


def latency_table(merged: onnx.ModelProto | str | os.PathLike,
                  originals: list | dict, pack: onnx.ModelProto | str | os.PathLike | None = None, *,
                  batch_sizes=(1, 32), threads=(1, None), budget_s: float = 1.0,
                  min_rounds: int = 30, max_rounds: int | None = None, warmup: int = 3,
                  progress: bool = True) -> list[dict]:
    """One row per (batch size, thread setting): the merged model against the originals run one
    after another in separate sessions and, if given, against `pack` in one session.

    Row keys: batch, threads (an int or "default"), originals / merged / pack (compare_latency's
    numbers for each, pack only when given), speedup_vs_originals = originals' median / merged
    median, speedup_vs_pack = pack median / merged median (> 1: the merged model is faster).

    A merge at a fixed batch (its models' batch dim could not be made symbolic: onnxmerge.model.upgrade)
    runs at that batch only: its rows are that batch size instead of `batch_sizes`.
    """
    models = list(originals.values()) if isinstance(originals, dict) else list(originals)
    rows = []
    bar = tqdm(total=len(threads) * len(batch_sizes), unit="row", desc="latency table",
               disable=not progress, leave=False)
    for th in threads:
        sessions = {
            "originals": [make_session(m, th) for m in models],
            "merged": [make_session(merged, th)],
        }
        if pack is not None:
            sessions["pack"] = [make_session(pack, th)]
        batches = _batch_sizes(sessions, batch_sizes)
        if len(batches) != len(batch_sizes):
            bar.total = len(threads) * len(batches)
        for batch in batches:
            cands = {name: candidate(s, batch) for name, s in sessions.items()}
            res = compare_latency(cands, "originals", min_rounds=min_rounds,
                                  max_rounds=max_rounds, warmup=warmup, budget_s=budget_s,
                                  progress=False)
            row = {"batch": batch, "threads": "default" if th is None else th}
            row.update(res)
            row["speedup_vs_originals"] = res["merged"]["ratio"]  # originals' median / merged median
            if pack is not None:
                row["speedup_vs_pack"] = res["pack"]["median_ms"] / res["merged"]["median_ms"]
            rows.append(row)
            bar.update(1)
    bar.close()
    return rows


def _batch_sizes(sessions: dict[str, list[ort.InferenceSession]], wanted) -> tuple[int, ...]:
    """`wanted`, or the one batch the models are fixed at (read off their inputs) where any is."""
    fixed = {b for group in sessions.values() for s in group if (b := fixed_batch_of(s)) is not None}
    if len(fixed) > 1:
        raise MergeError(f"the models are fixed at different batch sizes ({', '.join(map(str, sorted(fixed)))}); "
                         "they cannot be timed at one batch")
    return tuple(fixed) or tuple(wanted)


def machine_info() -> dict:
    """The machine the timings come from: CPU model, core counts, onnxruntime and Python versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
    }
