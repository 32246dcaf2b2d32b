"""Latency as ratios of medians, measured in one process and one run.

A shared, noisy machine makes absolute times meaningless from one run to the next, so speed is only
ever reported as a ratio of medians taken side by side: every round runs each candidate once, in a
rotating order, so that a burst of load from elsewhere hits all candidates alike.

A *candidate* (onnxmerge.model.timing, where the interleaved loop lives) is a list of `Step`s (a
session and its feeds) run one after another; the originals in separate sessions are one candidate
with one step per model; the merged model is a candidate with one step.

Direction of the ratio: `ratio = median(baseline) / median(candidate)`, so a ratio above 1 means the
candidate is faster than the baseline (1.35 = the baseline takes 1.35x the candidate's time).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from onnxmerge.errors import MergeError
from onnxmerge.graph.ops import make_session
from onnxmerge.model.runtime import fixed_batch_of
from onnxmerge.model.timing import candidate, compare_latency


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
    """The machine the timings come from: CPU model, its widest vector instruction set (which tells
    apart CPUs of one name: AMD EPYC has come as Zen 3, AVX2 only, and as Zen 4, AVX-512), core
    counts, onnxruntime and Python versions."""
    cpu, flags = platform.processor() or platform.machine(), []
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), flags)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "vector": "AVX512" if "avx512f" in flags else "AVX2" if "avx2" in flags else platform.machine(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
    }
