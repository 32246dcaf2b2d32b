"""Codebook plans that fit the layer: per layer, the setting (r, C, segments per codebook G) or the
dense weight that meets a size target with the least expected error (the `size` parameter).

NeuralMerger (Chou et al., IJCAI 2018) fixes r and C per layer kind (Tables 1 and 4); eq. 8's C
codewords per segment then cost more than a narrow layer's pieces (a 64-wide fc has 64 pieces per
segment and model), and the layer compresses little or grows. The plan instead chooses, per group of
aligned layers (share_codebooks), among

- codebook settings (eqs. 4-8): r in R_CHOICES (clamped to the depth), C in C_CHOICES (clamped to
  the pieces), G = 1, 4, 16, ... and "all segments" (one codebook for the layer; _codebook,
  "Shared codebooks"), those whose codes fit in uint8 when G > 1 (at most 256 codewords in all);
- the dense weight (no error, its stored bytes);

where every option's bytes are exact (`_codebook.stored_bytes`: what the portable form stores,
codes of at most 16 values packed two to a byte unless the native form is asked for) and
its error is a cheap proxy computed without calibration data: the relative k-means error
||W - W_hat||^2 / ||W||^2 of eq. 8 on the layer's own weights (one random initialisation, few Lloyd
steps, on at most PROXY_BOOKS codebooks and PROXY_PER_CODEWORD pieces per codeword of each),
counted once per model that reads the layer. A relative weight error is about the relative error it adds to the
layer's output, and small errors of successive layers add up, so the plan minimises the sum.

Allocation (greedy on the lower convex hulls): each group's options are reduced to the lower convex
hull of (bytes, error); every group starts at its smallest option, then the steps along the hulls
are taken in order of error removed per byte added while they fit the budget, size x the dense
bytes of the planned layers (a step that does not fit freezes its group). The order does not
depend on the budget, so a smaller `size` never gives a larger plan: the plan's bytes are monotone
in `size`. A target below the smallest options cannot be met; the plan then takes the smallest
options and says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxmerge.errors import UsageError
from onnxmerge.passes.codebook._codebook import Member, Setting, effective, pieces, segments, stored_bytes

R_CHOICES = (1, 2, 4, 8, 16)
C_CHOICES = (4, 8, 16, 32, 64, 128, 256)
PROXY_BOOKS = 4  # codebooks of a setting whose k-means error is measured (spread over the layer)
PROXY_PER_CODEWORD = 8  # pieces per codeword kept for the proxy's k-means (a subsample beyond)
PROXY_ITER = 8


def parse_size(text) -> float:
    """The `size` parameter: a fraction 0 < size <= 1 of the planned layers' dense bytes."""
    try:
        value = float("nan") if isinstance(text, bool) else float(text)
    except (TypeError, ValueError):
        value = float("nan")
    if not 0 < value <= 1:  # NaN fails too
        raise UsageError(f"--size {text}: give the target fraction of the layers' dense bytes, 0 < size <= 1")
    return value


@dataclass(frozen=True)
class Choice:
    """One option for a group: a codebook setting (effective), or None for the dense weight."""

    setting: Setting | None
    bytes: int
    error: float  # proxy: relative k-means error x models reading the layer
    larger: str = ""  # dense because the setting asked for would not be smaller: its bytes vs the dense ones


@dataclass
class LayerPlan:
    label: str
    dense_bytes: int
    choice: Choice
    fixed: bool = False  # set by --layer-params, not chosen

    def summary(self) -> dict:
        s = self.choice.setting
        return {"layer": self.label, "form": "dense" if s is None else "codebook",
                "why_dense": self.choice.larger or ("plan" if s is None else None),
                "r": s and s.r, "codewords": s and s.codewords, "group": s and s.group,
                "bytes": self.choice.bytes, "dense_bytes": self.dense_bytes,
                "proxy_rel_error": None if np.isnan(self.choice.error) else round(self.choice.error, 6),
                "fixed": self.fixed}


def options(label: str, members: list[Member], seed: int = 0, pack: bool = True) -> list[Choice]:
    """Every option of a group that is smaller than its dense weight, and the dense weight (pack:
    codes of at most 16 values are stored two to a byte, _codebook.packs)."""
    dense = sum(m.dense_bytes for m in members)
    depth = min(m.depth for m in members)
    settings: dict[Setting, int] = {}
    for r in sorted({min(r, depth) for r in R_CHOICES}):
        v_max = max(segments(m.depth, r) for m in members)
        # G = 1, 4, 16, ... and all segments: each step a quarter of the codebooks
        for g in sorted({min(4 ** k, v_max) for k in range(v_max.bit_length())} | {v_max}):
            for c in C_CHOICES:
                if g > 1 and segments(v_max, g) * c > 256:
                    continue  # shared codes beyond uint8: double the index bytes, never the cheaper way
                s = effective(members, Setting(r, c, g), label)
                if s not in settings and (size := sum(stored_bytes(members, s, pack))) < dense:
                    settings[s] = size
    seen: dict[Setting, Choice] = {}
    exact_at = dense
    cut: dict[int, list[np.ndarray]] = {}  # the pieces at each r, cut once
    for s, size in sorted(settings.items(), key=lambda item: (item[1], str(item[0]))):
        if size >= exact_at:
            break  # an error-free option costs less already
        if s.r not in cut:
            cut[s.r] = [pieces(m.weight, m.kind, s.r) for m in members]
        err = proxy_error(members, s, seed, cut[s.r])
        seen[s] = Choice(s, size, err * len(members))
        if err == 0.0:
            exact_at = size
    return [*seen.values(), Choice(None, dense, 0.0)]


def proxy_error(members: list[Member], setting: Setting, seed: int = 0,
                all_pieces: list[np.ndarray] | None = None) -> float:
    """Relative k-means error of eq. 8 under `setting` (effective), measured on at most PROXY_BOOKS
    codebooks (evenly spread) with at most PROXY_PER_CODEWORD pieces per codeword each, by a few
    Lloyd steps from distinct pieces drawn at random (_lloyd: cheaper than the k-means++ seeding
    of the codebooks themselves, and only the ranking of the options matters)."""
    r, c, g = setting.r, setting.codewords, setting.group
    if all_pieces is None:
        all_pieces = [pieces(m.weight, m.kind, r) for m in members]
    n_books = segments(max(p.shape[0] for p in all_pieces), g)
    books = np.unique(np.linspace(0, n_books - 1, min(n_books, PROXY_BOOKS)).round().astype(int))
    rng = np.random.default_rng(seed)
    error = energy = 0.0
    for b in books:
        x = np.concatenate([p[b * g:(b + 1) * g].reshape(-1, r) for p in all_pieces if p.shape[0] > b * g])
        if len(x) > PROXY_PER_CODEWORD * c:
            x = x[np.sort(rng.choice(len(x), PROXY_PER_CODEWORD * c, replace=False))]
        energy += float(np.square(x, dtype=np.float64).sum())
        error += _lloyd(x, c, rng)
    return error / energy if energy else 0.0


def _lloyd(x: np.ndarray, c: int, rng: np.random.Generator) -> float:
    """Sum of squared distances of x [M, r] to the nearest of c codewords after PROXY_ITER Lloyd
    steps; 0 where x has at most c distinct rows (they are the codewords)."""
    distinct = np.unique(x, axis=0)
    if len(distinct) <= c:
        return 0.0
    book = distinct[rng.choice(len(distinct), c, replace=False)]
    for _ in range(PROXY_ITER):
        label = (np.square(book).sum(1) - 2 * (x @ book.T)).argmin(1)  # ||x||^2 does not change the argmin
        count = np.bincount(label, minlength=c)
        sums = np.stack([np.bincount(label, weights=x[:, k], minlength=c) for k in range(x.shape[1])], 1)
        used = count > 0
        book[used] = sums[used] / count[used, None]  # an empty codeword keeps its place
    d = np.square(x).sum(1)[:, None] - 2 * (x @ book.T) + np.square(book).sum(1)
    return float(np.maximum(d.min(1), 0).sum(dtype=np.float64))


def hull(choices: list[Choice]) -> list[Choice]:
    """The lower convex hull of (bytes, error), from the smallest option to the error-free one."""
    pts = sorted(choices, key=lambda ch: (ch.bytes, ch.error))
    out: list[Choice] = []
    for p in pts:
        if out and p.error >= out[-1].error:
            continue  # more bytes for no less error
        while len(out) >= 2:
            a, b = out[-2], out[-1]
            # b lies on or above the segment a-p: drop it (cross product of a->b and a->p)
            if (b.bytes - a.bytes) * (p.error - a.error) - (b.error - a.error) * (p.bytes - a.bytes) <= 0:
                out.pop()
            else:
                break
        out.append(p)
    return out


def allocate(hulls: list[list[Choice]], budget: float) -> list[Choice]:
    """One choice per group: start at each hull's smallest option and take the steps in order of
    error removed per byte added (budget-independent), skipping those that do not fit (a group
    whose step does not fit stays where it is)."""
    at = [0] * len(hulls)
    total = sum(h[0].bytes for h in hulls)
    steps = []
    for i, h in enumerate(hulls):
        slope = -np.inf
        for j in range(1, len(h)):
            # non-decreasing along a hull (convex), also where float rounding says otherwise
            slope = max(slope, (h[j].error - h[j - 1].error) / (h[j].bytes - h[j - 1].bytes))
            steps.append((slope, i, j))
    steps.sort()
    frozen: set[int] = set()
    for _, i, j in steps:
        if i in frozen or at[i] != j - 1:
            continue
        extra = hulls[i][j].bytes - hulls[i][j - 1].bytes
        if total + extra > budget:
            frozen.add(i)
            continue
        total += extra
        at[i] = j
    return [h[k] for h, k in zip(hulls, at)]
