"""Timing candidates side by side: the interleaved loop every speed figure of onnxmerge comes from.

A *candidate* is a list of `Step`s (a session and its feeds) run one after another; one timing of the
candidate is the wall time of the whole list. Every round runs each candidate once, in a rotating
order, so that a burst of load from elsewhere hits all candidates alike; results are medians and
ratios of medians against a baseline candidate (onnxmerge.measure.latency builds its tables on it,
and the codebook method's `--emit auto` times each layer with it).

Direction of the ratio: `ratio = median(baseline) / median(candidate)`, so a ratio above 1 means the
candidate is faster than the baseline.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from onnxmerge.errors import MergeError
from onnxmerge.model.runtime import random_feeds, session


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


def time_models(models: dict[str, onnx.ModelProto], baseline: str, batch: int = 1, threads: int = 1,
                budget_s: float = 0.3, min_rounds: int = 5, native: bool = False) -> dict[str, dict]:
    """Small models (one layer in two forms, say) each alone in a session, onnxruntime's optimisations
    on and onnxmerge's kernels registered where `native`, run at `batch` on `threads` threads, on the
    same random inputs (candidate's seed is the step's index), interleaved for `budget_s`
    (compare_latency)."""
    cands = {name: candidate([session(m, threads=threads, optimize=True, native=native)], batch)
             for name, m in models.items()}
    return compare_latency(cands, baseline, min_rounds=min_rounds, warmup=1, budget_s=budget_s, progress=False)
