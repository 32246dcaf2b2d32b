"""Batched k-means for NeuralMerger's shared codebooks (Chou et al., IJCAI 2018, eq. 8).

NeuralMerger cuts every kernel of a layer into 1 x 1 x r pieces along depth; the pieces of depth
segment v (of all merged models) are clustered into C codewords and each piece is replaced by its
nearest codeword (eq. 8). A layer therefore needs one independent k-means per segment: V problems
of M vectors of length r. As in the paper, every segment runs several initialisations and keeps
the one with the lowest error, chosen per segment.

The V problems are solved together, vectorised over segments with numpy, rather than with one
scikit-learn call per segment: a large layer has thousands of segments, and per segment the
products are too small for the per-call overhead to vanish.

Per segment:

- exact case: when a segment holds at most C distinct vectors, its codewords are those vectors
  (bitwise) and its error is 0; the slots left over repeat codewords. Distinct vectors are counted
  on the float32 bit patterns (a key per row, sorted per segment, then a row-by-row check), so the
  case is guaranteed rather than left to k-means finding it;
- otherwise Lloyd's algorithm from a greedy k-means++ seeding (as scikit-learn: each centre is the
  best of 2 + ln C candidates drawn with probability proportional to the squared distance). The
  seeding runs on a random subsample of max(_SEED_POINTS, _SEED_PER_CODEWORD * C) vectors when
  the segment has more: each centre costs a pass over the vectors, and the Lloyd steps that follow
  wash the difference out;
- each assignment compares every vector with every codeword: ||c||^2 - 2 x.c from one matrix
  product per block of vectors, then the minimum and where it is reached. (Bounds in the manner
  of Hamerly or Elkan were tried: on data like layer weights a third to a half of the vectors stay
  in doubt every step, and gathering those costs numpy more than computing all of them.)
- a codeword left without vectors is re-seeded with the vector farthest from its codeword;
- a run stops when its inertia improves by less than tol (relative), when no label changes, or
  after max_iter updates; it ends with an assignment, so every label is the nearest codeword of
  the returned codebook (up to float32 rounding of near ties).

Data are centred per segment (the mean is added back to the codewords), so that the expansion
||x||^2 - 2 x.c + ||c||^2 does not lose precision to a common offset.

Memory: segments are processed in chunks whose working arrays (a few copies of the chunk's
vectors, labels, temporaries) fit in max_bytes together; the distance array [segments, C, vectors]
is only ever materialised in blocks of _BLOCK entries (512 KiB), so its size is far below that.
Chunks run on one thread per available CPU (numpy releases the GIL in the heavy calls), with BLAS
held to one thread meanwhile: the products are small, and a threaded BLAS on a small machine
spends more time synchronising than computing.

Determinism: segment v's random stream for initialisation i is np.random.default_rng([seed, v, i])
(v the index in x), every stopping decision is per segment, and no sum or product mixes segments,
so a segment's result depends on its vectors, v and the settings only: not on max_bytes, on the
chunking or the threads. n_init = k runs the first k initialisations of any larger n_init, so
more initialisations never give a larger error.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

__all__ = ["KMeansResult", "batched_kmeans"]

# Entries of one block of the distance array [segments, C, vectors] (float32, 512 KiB): large
# enough that numpy's per-call overhead is small, small enough to stay in cache with its companions
# (a bool and a uint8 array of the same shape).
_BLOCK = 1 << 17
# Seeding subsample: at least this many vectors, and this many per codeword.
_SEED_POINTS = 1024
_SEED_PER_CODEWORD = 16


@dataclass
class KMeansResult:
    codebooks: np.ndarray  # [V, C, r] float32
    labels: np.ndarray  # [V, M] int64, index of each vector's codeword in its segment
    error: np.ndarray  # [V] float64, sum of squared distances of the vectors to their codewords (inertia)
    exact: np.ndarray  # [V] bool, True where the segment has <= C distinct vectors (then error = 0)
    seconds: float  # wall time


def batched_kmeans(x: np.ndarray, n_codewords: int, *, n_init: int = 3, max_iter: int = 30, tol: float = 1e-5,
                   seed: int = 0, max_bytes: int = 256 << 20) -> KMeansResult:
    """k-means with n_codewords codewords in each of the V segments of x [V, M, r] (eq. 8).

    x is cast to float32 first; distinctness, codewords and errors refer to the cast values.
    Returns the codebooks [V, C, r], the labels [V, M], the error (inertia) per segment and whether
    each segment was represented exactly (at most C distinct vectors). See the module docstring.
    """
    t0 = time.perf_counter()
    x32 = _validate(x, n_codewords, n_init, max_iter, tol, seed, max_bytes)
    n_seg, m, r = x32.shape
    c = int(n_codewords)
    codebooks = np.empty((n_seg, c, r), np.float32)
    labels = np.empty((n_seg, m), np.int64)
    error = np.zeros(n_seg, np.float64)
    exact = np.zeros(n_seg, bool)
    with _one_blas_thread():
        todo = _exact_segments(x32, c, codebooks, labels, exact, max_bytes)
        workers = _workers(len(todo))
        # Each worker holds one chunk at a time; together they stay within max_bytes.
        step = max(1, (max_bytes // workers - 8 * _BLOCK) // _bytes_per_segment(m, r, c))
        step = min(step, -(-len(todo) // workers)) if len(todo) else 1
        chunks = [todo[lo:lo + step] for lo in range(0, len(todo), step)]

        def solve(segs):
            _Chunk(x32, segs, c).solve(n_init, max_iter, float(tol), int(seed), codebooks, labels, error)

        if workers > 1 and len(chunks) > 1:
            # Chunks write disjoint segments and numpy releases the GIL in the heavy calls.
            with ThreadPoolExecutor(workers) as pool:
                for _ in pool.map(solve, chunks):
                    pass
        else:
            for segs in chunks:
                solve(segs)
    return KMeansResult(codebooks, labels, error, exact, time.perf_counter() - t0)


def max_magnitude(r: int) -> float:
    """The largest |value| of vectors of length r whose squared distances k-means computes without
    overflowing float32 (a distance sums about 4r products of two values; 8r leaves a margin)."""
    return math.sqrt(float(np.finfo(np.float32).max) / (8 * r))


def _workers(n_segments: int) -> int:
    """Threads for the chunks: one per CPU this process may use (at most 8), at most one per
    segment."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8, n_segments))


def _validate(x, n_codewords, n_init, max_iter, tol, seed, max_bytes) -> np.ndarray:
    def count(name, value, least):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")

    count("n_codewords", n_codewords, 1)
    count("n_init", n_init, 1)
    count("max_iter", max_iter, 1)
    count("seed", seed, 0)
    count("max_bytes", max_bytes, 1)
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 <= tol < math.inf:
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"x must be 3-D [segments, vectors, r], got shape {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"x must hold real numbers, got dtype {x.dtype}")
    if x.shape[1] < 1 or x.shape[2] < 1:
        raise ValueError(f"x needs at least one vector of length >= 1 per segment, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("x holds NaN or infinite values")
    with np.errstate(over="ignore"):
        x32 = np.ascontiguousarray(x, dtype=np.float32)
    if x.dtype != np.float32 and not np.isfinite(x32).all():
        raise ValueError("x holds values too large for float32")
    biggest, limit = float(np.abs(x32).max(initial=0.0)), max_magnitude(x32.shape[2])
    if biggest > limit:  # the distances would overflow: NaN distances give labels out of range
        raise ValueError(f"x holds values up to {biggest:.3g}; k-means in float32 needs them below {limit:.3g}")
    return x32


@contextlib.contextmanager
def _one_blas_thread():
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # threadpoolctl comes with scikit-learn; without it, leave BLAS as it is
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def _bytes_per_segment(m: int, r: int, c: int) -> int:
    # Per vector: the centred columns (float32, and a copy while dropping finished rows), old and
    # new labels, the error's gathers in _finish and the seeding's temporaries; per codeword the
    # centres, sums and counts.
    per_vector = 8 * (r + 1) + 12 * r + 32
    per_codeword = 4 * r * 4 + 32
    return m * per_vector + c * per_codeword


# ---------------------------------------------------------------------------------------------
# Segments with at most C distinct vectors


def _row_keys(bits: np.ndarray) -> np.ndarray:
    """A uint64 key per row of bits [n, M, w] (uint32 or uint64 words): equal rows, equal keys."""
    if bits.shape[2] == 2 and bits.dtype == np.uint32:
        return np.ascontiguousarray(bits).view(np.uint64)[..., 0]  # the row itself: no collisions
    words = bits.astype(np.uint64, copy=False)
    key = words[..., 0].copy()
    for j in range(1, words.shape[2]):
        key *= np.uint64(0x9E3779B97F4A7C15)  # odd: multiplication mod 2^64 is a bijection
        key += words[..., j]
    return key


def _exact_segments(x32: np.ndarray, c: int, codebooks, labels, exact, max_bytes: int) -> np.ndarray:
    """Fill in the segments with at most c distinct vectors; return the indices of the others."""
    n_seg, m, r = x32.shape
    bits = x32.view(np.uint32)
    if r % 2 == 0 and r > 2:
        bits = bits.view(np.uint64)  # half as many words to hash
    todo = []
    step = max(1, max_bytes // (m * (8 * 3 + 8 * r) + 1))
    for lo in range(0, n_seg, step):
        hi = min(n_seg, lo + step)
        # Equal rows have equal keys, so distinct keys <= distinct rows: a segment with more than
        # c distinct keys, among its first 4c rows or all of them, is certainly not exact. The
        # others are checked row by row in _exact_fill.
        candidates = np.arange(hi - lo)
        for rows in ((4 * c,) if 4 * c < m else ()) + (m,):
            if rows <= c:
                break
            ordered = np.sort(_row_keys(bits[lo + candidates, :rows]), axis=1)
            distinct = 1 + np.count_nonzero(ordered[:, 1:] != ordered[:, :-1], axis=1)
            candidates = candidates[distinct <= c]
        keys = _row_keys(bits[lo + candidates])
        done = _exact_fill(x32, lo + candidates, keys, c, codebooks, labels, exact)
        rest = np.ones(hi - lo, bool)
        rest[candidates[done]] = False
        todo.append(lo + np.flatnonzero(rest))
    return np.concatenate(todo) if todo else np.zeros(0, np.intp)


def _exact_fill(x32, segs, keys, c, codebooks, labels, exact) -> np.ndarray:
    """For the segments segs (with row keys [n, M]), write the exact codebooks where there are at
    most c distinct vectors. Returns a bool per segment: exact."""
    n = len(segs)
    ok = np.zeros(n, bool)
    if n == 0:
        return ok
    m, r = x32.shape[1:]
    order = np.argsort(keys, axis=1, kind="stable")
    rows = np.take_along_axis(x32[segs].view(np.uint32), order[:, :, None], axis=1)  # [n, M, r]
    # Rows in key order: a new codeword wherever a row differs from the one before. Equal rows share
    # a key, so they are adjacent unless another row collided with them on the key, which can only
    # repeat a codeword (still exact); np.unique settles the rare segment this pushes over c.
    new = np.ones((n, m), bool)
    new[:, 1:] = (rows[:, 1:] != rows[:, :-1]).any(axis=2)
    k = new.sum(axis=1)
    code = np.cumsum(new, axis=1) - 1
    ok = k <= c
    lab = np.empty_like(code)
    np.put_along_axis(lab, order, code, axis=1)
    book = np.zeros((n, c, r), np.uint32)
    seg, pos = np.nonzero(new & ok[:, None])
    book[seg, code[seg, pos]] = rows[seg, pos]
    fill = np.arange(c)[None, :] % np.maximum(k, 1)[:, None]  # slots beyond k repeat codewords
    book = np.take_along_axis(book, fill[:, :, None], axis=1)
    good = segs[ok]
    codebooks[good] = book[ok].view(np.float32)
    labels[good] = lab[ok]
    exact[good] = True
    for i in np.flatnonzero(~ok):
        distinct, inverse = np.unique(x32[segs[i]].view(np.uint32), axis=0, return_inverse=True)
        if len(distinct) <= c:
            fill = np.arange(c) % len(distinct)
            codebooks[segs[i]] = distinct[fill].view(np.float32)
            labels[segs[i]] = inverse.reshape(-1)
            exact[segs[i]] = True
            ok[i] = True
    return ok


# ---------------------------------------------------------------------------------------------
# Nearest codeword


def _label_dtype(c: int):
    return np.uint8 if c <= 1 << 8 else np.uint16 if c <= 1 << 16 else np.uint32


def _nearest(ca: np.ndarray, xt: np.ndarray) -> np.ndarray:
    """Index of the nearest codeword of every vector (the last one on exact ties).

    ca [b, C, r+1]: rows (-2 c, ||c||^2); xt [b, r+1, K] (contiguous): columns (x, 1). Returns
    [b, K] in _label_dtype(C)."""
    b, c, _ = ca.shape
    k = xt.shape[2]
    wide = _label_dtype(c)
    lab = np.zeros((b, k), wide)
    if c == 1:
        return lab
    # argmin along axis 1 is slow in numpy (a transposed copy, then a call per vector), while min
    # along axis 1 streams over whole rows. The index is recovered from the hits of the minimum:
    # the max of c over them, in one byte per entry where C <= 256.
    index = np.arange(c, dtype=wide)[:, None]
    kb = min(k, max(1, _BLOCK // c))
    nb = min(b, max(1, _BLOCK // (c * kb)))
    # Buffers reused across blocks: fresh arrays would cost an allocation and page faults each.
    dist = np.empty((nb, c, kb), np.float32)
    low = np.empty((nb, 1, kb), np.float32)
    hit = np.empty((nb, c, kb), bool)
    code = np.empty((nb, c, kb), wide)
    for s0 in range(0, b, nb):
        s1 = min(b, s0 + nb)
        for k0 in range(0, k, kb):
            k1 = min(k, k0 + kb)
            i, j = s1 - s0, k1 - k0
            d = dist if (i, j) == (nb, kb) else dist[:i, :, :j]
            np.matmul(ca[s0:s1], xt[s0:s1, :, k0:k1], out=d)  # ||c||^2 - 2 x.c, [i, C, j]
            np.minimum.reduce(d, axis=1, out=low[:i, :, :j], keepdims=True)
            np.equal(d, low[:i, :, :j], out=hit[:i, :, :j])
            np.multiply(hit[:i, :, :j].view(np.uint8), index, out=code[:i, :, :j])
            np.maximum.reduce(code[:i, :, :j], axis=1, out=lab[s0:s1, k0:k1])
    return lab


def _augmented(centres: np.ndarray) -> np.ndarray:
    """[b, C, r] -> [b, C, r+1] rows (-2 c, ||c||^2), for _nearest."""
    out = np.empty(centres.shape[:2] + (centres.shape[2] + 1,), np.float32)
    out[..., :-1] = -2 * centres
    out[..., -1] = np.square(centres, dtype=np.float64).sum(axis=2)
    return out


# ---------------------------------------------------------------------------------------------
# k-means of a chunk of segments


class _Chunk:
    """The segments segs of x32 (none of them exact), centred, in the layout the steps need."""

    def __init__(self, x32: np.ndarray, segs: np.ndarray, c: int):
        self.x32, self.segs, self.c = x32, np.asarray(segs), c
        n, (m, r) = len(segs), x32.shape[1:]
        self.m, self.r = m, r
        # [n, r+1, M]: columns (x - mean, 1), so that one product gives ||c||^2 - 2 x.c and every
        # coordinate is a contiguous row (fast products, fast gathers).
        self.xt = np.empty((n, r + 1, m), np.float32)
        self.xt[:, :r] = x32[self.segs].transpose(0, 2, 1)
        # A float32 sum along the contiguous last axis is pairwise per row, the same in any chunk.
        self.mu = self.xt[:, :r].sum(axis=2).astype(np.float64) / m  # [n, r]
        np.subtract(self.xt[:, :r], self.mu[:, :, None], out=self.xt[:, :r], casting="unsafe")
        self.xt[:, r] = 1
        self.s2 = np.zeros(n)  # sum of squares (float64), for the inertia from the cluster sums
        for j in range(r):
            self.s2 += np.square(self.xt[:, j], dtype=np.float64).sum(axis=1)

    def solve(self, n_init, max_iter, tol, seed, codebooks, labels, error):
        best = np.full(len(self.segs), np.inf)
        for init in range(n_init):
            _Run(self, self._seed(init, seed)).iterate(max_iter, tol, best, codebooks, labels, error)

    def _seed(self, init: int, seed: int) -> np.ndarray:
        """k-means++ centres [n, C, r] (centred), each segment from its own random stream."""
        n, m, c = len(self.segs), self.m, self.c
        s = min(m, max(_SEED_POINTS, _SEED_PER_CODEWORD * c))
        trials = 2 + int(math.log(c))  # as scikit-learn's greedy k-means++
        u = np.empty((n, 1 + (c - 1) * trials))
        pick = np.empty((n, s), np.intp) if s < m else None
        for i, v in enumerate(self.segs):
            rng = np.random.default_rng([seed, int(v), init])
            u[i] = rng.random(u.shape[1])
            if pick is not None:
                pick[i] = np.sort(rng.integers(0, m, s))
        xt = self.xt if pick is None else np.take_along_axis(self.xt, pick[:, None, :], axis=2)
        return _kmeans_pp(xt, u[:, 0], u[:, 1:].reshape(n, c - 1, trials))


def _kmeans_pp(xt: np.ndarray, first: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Greedy k-means++ per segment: xt [n, r+1, S] columns (x, 1); first [n] and u [n, C-1, L]
    uniforms in [0, 1). Each step draws L candidates with probability proportional to the squared
    distance to the nearest centre so far and keeps the one that lowers the inertia most. Returns
    the centres [n, C, r]."""
    n, q, s = xt.shape
    r, c, trials = q - 1, u.shape[1] + 1, u.shape[2]
    at = np.arange(n)
    x2 = np.square(xt[:, :r]).sum(axis=1)  # [n, S]
    centres = np.empty((n, c, r), np.float32)
    rows_at = (at * s)[:, None]  # flat offsets of the segments in [n, S] arrays

    def dist2(idx):  # the columns idx [n, L] and their squared distances to all vectors [n, L, S]
        cand = np.take_along_axis(xt[:, :r], idx[:, None, :], axis=2).transpose(0, 2, 1)  # [n, L, r]
        rows = np.concatenate([-2 * cand, np.square(cand, dtype=np.float64).sum(axis=2, keepdims=True)],
                              axis=2).astype(np.float32)
        d = np.matmul(rows, xt)
        d += x2[:, None, :]
        return cand, np.maximum(d, 0, out=d)

    cand, closest = dist2(np.minimum((first * s).astype(np.intp), s - 1)[:, None])
    centres[:, 0], closest = cand[:, 0], closest[:, 0]
    steps = max(1, int(s).bit_length())
    for k in range(1, c):
        cum = np.cumsum(closest, axis=1)
        target = u[:, k - 1] * cum[:, -1:]  # [n, L]
        # First index whose cumulative weight exceeds the target: a binary search per draw. It
        # never lands on a zero weight (a vector already chosen) while any weight is left.
        lo, hi = np.zeros((n, trials), np.intp), np.full((n, trials), s, np.intp)
        for _ in range(steps):
            mid = (lo + hi) >> 1
            open_ = lo < hi
            right = np.take(cum, rows_at + np.minimum(mid, s - 1)) <= target
            lo, hi = np.where(right & open_, mid + 1, lo), np.where(~right & open_, mid, hi)
        cand, d = dist2(np.minimum(lo, s - 1))
        np.minimum(d, closest[:, None, :], out=d)
        best = d.sum(axis=2).argmin(axis=1)  # the first on ties
        centres[:, k] = cand[at, best]
        closest = d[at, best]
    return centres


class _Run:
    """One initialisation of Lloyd's algorithm on the rows (segments) of a chunk. Rows that finish
    are dropped, so the arrays always hold the rows still running."""

    _DATA = ("xt", "s2")
    _STATE = ("centres", "lab", "counts", "sums")

    def __init__(self, chunk: _Chunk, centres: np.ndarray):
        self.ch = chunk
        n, c, r = len(chunk.segs), chunk.c, chunk.r
        self.idx = np.arange(n)  # the chunk's rows still running
        self.xt, self.s2 = chunk.xt, chunk.s2
        self.centres = centres
        self.lab = _nearest(_augmented(centres), self.xt)
        self.counts = np.zeros((n, c), np.int64)
        self.sums = np.zeros((n, c, r))
        self._add(np.arange(self.lab.size), self.lab.reshape(-1), +1)

    def _add(self, points, lab, sign):
        """Add (sign +1) or remove (-1) the flat points (row * M + vector) with labels lab to the
        cluster sums."""
        n, c, r, m = len(self.idx), self.ch.c, self.ch.r, self.ch.m
        row = points // m
        flat = row * c + lab
        self.counts += sign * np.bincount(flat, minlength=n * c).reshape(n, c)
        # Coordinate j of flat point p is xt.flat[(row * (r+1) + j) * M + vector].
        at = points + row * (r * m)
        xt = self.xt.reshape(-1)
        for j in range(r):
            # bincount adds in the order of the points, per bin: the same sums in any chunk.
            self.sums[:, :, j] += sign * np.bincount(flat, weights=np.take(xt, at + j * m),
                                                     minlength=n * c).reshape(n, c)

    def iterate(self, max_iter, tol, best, codebooks, labels, error):
        previous = np.full(len(self.idx), np.inf)
        m = self.ch.m
        for it in range(max_iter):
            self._update()
            inertia = self.s2 - (np.square(self.sums).sum(axis=2) / np.maximum(self.counts, 1)).sum(axis=1)
            stop = (np.isfinite(previous) & (previous - inertia <= tol * previous)) | (it + 1 == max_iter)
            previous = inertia
            new = _nearest(_augmented(self.centres), self.xt)
            moved = np.flatnonzero(new != self.lab)
            if len(moved):
                old_lab, new_lab = self.lab.reshape(-1)[moved], new.reshape(-1)[moved]
                self._add(moved, old_lab, -1)
                self._add(moved, new_lab, +1)
            self.lab = new
            stop |= np.bincount(moved // m, minlength=len(self.idx)) == 0  # a fixed point
            if stop.any():
                self._finish(np.flatnonzero(stop), best, codebooks, labels, error)
                keep = np.flatnonzero(~stop)
                if len(keep) == 0:
                    return
                self.idx = self.idx[keep]
                for name in self._DATA + self._STATE:
                    setattr(self, name, np.ascontiguousarray(getattr(self, name)[keep]))
                previous = previous[keep]

    def _update(self):
        """Centres from the cluster sums; empty clusters re-seeded."""
        counts, sums = self.counts, self.sums
        full = counts > 0
        centres = np.where(full[:, :, None], sums / np.maximum(counts, 1)[:, :, None], self.centres)
        centres = centres.astype(np.float32)
        r = self.ch.r
        for i in np.flatnonzero(~full.all(axis=1)):
            # As scikit-learn: the vectors farthest from their codewords seed the empty clusters.
            rows, lab = self.xt[i, :r].T, self.lab[i]
            far = np.square(rows - centres[i][lab]).sum(axis=1)
            empty = np.flatnonzero(counts[i] == 0)
            for j, p in zip(empty, np.argsort(-far, kind="stable")[:len(empty)]):
                old, row = lab[p], rows[p].astype(np.float64)
                sums[i, old] -= row
                counts[i, old] -= 1
                sums[i, j] = row
                counts[i, j] = 1
                lab[p] = j
                centres[i, j] = rows[p]
                if counts[i, old] > 0:
                    centres[i, old] = sums[i, old] / counts[i, old]
        self.centres = centres

    def _finish(self, rows, best, codebooks, labels, error):
        """Record the rows' result where it beats the earlier initialisations."""
        ch = self.ch
        where = self.idx[rows]
        segs = ch.segs[where]
        book = (self.centres[rows].astype(np.float64) + ch.mu[where][:, None, :]).astype(np.float32)
        lab = self.lab[rows].astype(np.intp)
        diff = ch.x32[segs] - np.take_along_axis(book, lab[:, :, None], axis=1)  # [k, M, r]
        # Per vector in float32 (relative error ~1e-7), summed over the vectors in float64.
        err = np.einsum("kmr,kmr->km", diff, diff).sum(axis=1, dtype=np.float64)
        better = err < best[where]
        if better.any():
            best[where[better]] = err[better]
            codebooks[segs[better]] = book[better]
            labels[segs[better]] = lab[better]
            error[segs[better]] = err[better]
