"""The arithmetic of Multi-Task Zipping (He, Zhou, Thiele, NeurIPS 2018), in numpy and scipy only.

MTZ merges two networks A and B layer by layer. In layer l, neuron i of A has the incoming weight
vector a_i and neuron j of B has b_j, both over the inputs the two tasks share plus the bias as a
constant last input 1. Merging them into one neuron with weights w changes the layer's outputs of
task A by (w - a_i).y and of task B by (w - b_j).y, for an input row y = [x; 1].

- Layer-wise Hessian (eqs. 7-8): H = (1/n) sum_k y_k y_k^T over the layer's input rows on
  calibration data; it is the same for every neuron of the layer. `layer_rows` gives the rows (the
  im2col rows for a convolution) and `HessianAccumulator` their mean outer product.
- Functional difference of a merge (eq. 6, with eq. 5's weight alpha on task B's error; exact,
  not only second order, for the layer-wise squared error):
      dE(w) = 1/2 (w - a_i)^T H_A (w - a_i) + alpha/2 (w - b_j)^T H_B (w - b_j).
- Its minimiser (eqs. 10-11): w~ = (H_A + alpha H_B)^-1 (H_A a_i + alpha H_B b_j).
- Its cost (eq. 12): d[i, j] = dE(w~) = 1/2 (a_i - b_j)^T (H_A^-1 + (alpha H_B)^-1)^-1 (a_i - b_j).

`PairCosts` evaluates eq. 12 for every pair and eq. 10 for chosen pairs (also for pruned models,
paper section 3.6); `pair_greedy`, `pair_optimal` and `pair_random` choose which neurons to share.

How PairCosts computes (details in its docstring). Write H' for a damped Hessian,
S = H_A' + alpha H_B', r = H_A' a + alpha H_B' b, c = 1/2 (a^T H_A' a + alpha b^T H_B' b). Then
dE(w) = 1/2 w^T S w - r^T w + c, so w~ = S^-1 r and dE(w~) = c - 1/2 r^T S^-1 r. With the Cholesky
factor S = L L^T and g_a = L^-1 H_A' a, h_b = L^-1 alpha H_B' b:

    2 d[i, j] = (a^T H_A' a - |g_a|^2) + (alpha b^T H_B' b - |h_b|^2) - 2 g_a.h_b
              =        q_a            +          q_b                 - 2 (A M B^T)[i, j],

with M = (H_A'^-1 + (alpha H_B')^-1)^-1 = H_A' S^-1 alpha H_B' (q_a = a^T M a, since
H_A' - H_A' S^-1 H_A' = H_A' S^-1 alpha H_B'). M itself is never formed: one Cholesky
factorisation and two triangular solves with nA and nB right-hand sides replace the solve with d
right-hand sides and the d x d product that forming M would take (at d = 25089: about 6e13 flops
more, three times the whole computation here, and two more 2.5 GB matrices), and
w~ = L^-T (g_a + h_b) is the second half of the same cho_solve.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg as sla
from scipy.linalg import blas
from scipy.optimize import linear_sum_assignment

# Above this many inputs (d, without the bias) Hessians and pair costs use float32: a float64
# d x d matrix at VGG-16 fc6 (d = 25089) is 5 GB, and PairCosts holds several of them.
_LARGE_D = 4096
# Rows (or row blocks) are processed in pieces of about this many bytes, so temporaries stay small.
_CHUNK_BYTES = 32 << 20


def _work_dtype(d: int) -> type:
    return np.float64 if d <= _LARGE_D else np.float32


# ----------------------------------------------------------------------------- layer input rows

def layer_rows(x, kernel=(), strides=(), pads=(), dilations=(), max_rows=None, rng=None) -> np.ndarray:
    """The input rows of a layer (eqs. 7-8's x_k, without the bias entry), as float32.

    Fully connected (kernel empty): x [n, ...] -> [n, d], trailing dims flattened.
    Convolution (kernel = (kh, kw), 2-D only, group 1): x [n, c, h, w] -> the im2col rows
    [n * oh * ow, c * kh * kw], columns in (c, kh, kw) order, so that
    weight.reshape(out_channels, -1) @ row is the output at that position. pads are in ONNX order
    [top, left, bottom, right]; strides and dilations default to 1, pads to 0.

    max_rows: if there are more rows, a uniform random subset of max_rows of them (without
    replacement, in their original order), drawn with rng (default np.random.default_rng(0)). The
    (sample, position) pairs are drawn first and only those windows are gathered from a strided
    view of the padded input, so the full im2col matrix (1.85 GB at VGG-16 conv1_2 on 16 images) is
    never built.
    """
    x = np.asarray(x, dtype=np.float32)
    rng = np.random.default_rng(0) if rng is None else rng
    if len(kernel) == 0:
        rows = x.reshape(x.shape[0], -1)
        pick = _subsample(rows.shape[0], max_rows, rng)
        return np.ascontiguousarray(rows if pick is None else rows[pick])
    n = x.shape[0]
    _, c, oh, ow, kh, kw = _conv_windows(x[:1], kernel, strides, pads, dilations).shape
    pick = _subsample(n * oh * ow, max_rows, rng)
    if pick is None:
        windows = _conv_windows(x, kernel, strides, pads, dilations)  # [n, c, oh, ow, kh, kw], a view
        return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * oh * ow, c * kh * kw)
    s, pos = np.divmod(pick, oh * ow)
    r, q = np.divmod(pos, ow)
    out = np.empty((len(pick), c * kh * kw), dtype=np.float32)
    # Padding copies the input: pad a block of samples at a time (a layer input can be gigabytes).
    step = max(1, 8 * _CHUNK_BYTES // max(1, x[0].nbytes))
    for s0 in range(0, n, step):
        lo, hi = np.searchsorted(s, [s0, s0 + step])
        if lo < hi:
            windows = _conv_windows(x[s0:s0 + step], kernel, strides, pads, dilations)
            # Advanced indices split by a slice go first: the result is [m, c, kh, kw].
            out[lo:hi] = windows[s[lo:hi] - s0, :, r[lo:hi], q[lo:hi]].reshape(hi - lo, -1)
    return out


def _conv_windows(x, kernel, strides, pads, dilations) -> np.ndarray:
    """[n, c, oh, ow, kh, kw] strided view of the receptive fields of a 2-D convolution."""
    if len(kernel) != 2 or x.ndim != 4:
        raise ValueError(f"layer_rows: only 2-D convolutions on [n, c, h, w] inputs, got kernel "
                         f"{tuple(kernel)} and input shape {x.shape}")
    kh, kw = (int(k) for k in kernel)
    sh, sw = (int(s) for s in strides) if len(strides) else (1, 1)
    dh, dw = (int(v) for v in dilations) if len(dilations) else (1, 1)
    top, left, bottom, right = (int(p) for p in pads) if len(pads) else (0, 0, 0, 0)
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    span = (dh * (kh - 1) + 1, dw * (kw - 1) + 1)
    if xp.shape[2] < span[0] or xp.shape[3] < span[1]:
        raise ValueError(f"layer_rows: kernel span {span} exceeds the padded input {xp.shape[2:]}")
    view = np.lib.stride_tricks.sliding_window_view(xp, span, axis=(2, 3))
    return view[:, :, ::sh, ::sw, ::dh, ::dw]


def _subsample(total: int, max_rows, rng) -> np.ndarray | None:
    if max_rows is None or total <= max_rows:
        return None
    return np.sort(rng.choice(total, size=int(max_rows), replace=False))


# ----------------------------------------------------------------------------- layer Hessian

class HessianAccumulator:
    """Running mean of y y^T over rows y = [x; 1]: the layer-wise Hessian of eqs. 7-8.

    add(rows) takes rows [m, d] without the bias entry; value() returns the [d + 1, d + 1] mean,
    bias last. Sums accumulate in float64 (float32 when d > 4096, so that the d x d sum of a layer
    such as VGG-16 fc6 takes 2.5 GB rather than 5 GB; the float32 sum then carries a relative
    rounding of about (number of add chunks) * 6e-8). Rows are converted and added in chunks of
    about 32 MB with a rank-k update (BLAS syrk) into the running sum, so no [m, d + 1] copy or
    second d x d temporary is made; value() allocates the one d x d result.
    """

    def __init__(self, d: int):
        self.d = int(d)
        self.dtype = _work_dtype(self.d)
        self.count = 0
        self._xx = np.zeros((self.d, self.d), dtype=self.dtype, order="F")  # upper triangle only
        self._x = np.zeros(self.d, dtype=np.float64)
        self._syrk = blas.dsyrk if self.dtype == np.float64 else blas.ssyrk

    def add(self, rows) -> None:
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.d:
            raise ValueError(f"HessianAccumulator.add: rows must be [m, {self.d}], got {rows.shape}")
        step = max(1, _CHUNK_BYTES // (self.d * np.dtype(self.dtype).itemsize))
        for k in range(0, rows.shape[0], step):
            chunk = np.ascontiguousarray(rows[k:k + step], dtype=self.dtype)
            # chunk.T is Fortran-ordered, so syrk reads it in place: _xx += chunk^T chunk.
            self._syrk(1.0, chunk.T, beta=1.0, c=self._xx, trans=0, lower=0, overwrite_c=1)
            self._x += chunk.sum(axis=0, dtype=np.float64)
        self.count += rows.shape[0]

    def value(self) -> np.ndarray:
        if self.count == 0:
            raise ValueError("HessianAccumulator.value: no rows were added")
        d = self.d
        h = np.empty((d + 1, d + 1), dtype=self.dtype)
        h[:d, :d] = self._xx
        _mirror_upper(h[:d, :d])
        h[:d, d] = self._x
        h[d, :d] = self._x
        h[d, d] = self.count
        h /= self.count
        return h


def _mirror_upper(h: np.ndarray) -> None:
    """Copy the upper triangle of square h onto its lower triangle, in blocks (no d x d temporary)."""
    d = h.shape[0]
    step = max(1, _CHUNK_BYTES // (d * h.itemsize))
    for r0 in range(0, d, step):
        r1 = min(d, r0 + step)
        h[r0:r1, :r0] = h[:r0, r0:r1].T
        block = h[r0:r1, r0:r1]
        low = np.tril_indices(r1 - r0, -1)
        block[low] = block.T[low]


# ----------------------------------------------------------------------------- pair costs

class _HalfInverse:
    """F with F^T F = S^-1 (F = L^-1 from S = L L^T) or, after a fallback, = S^+ (pseudo-inverse).

    Cholesky is tried first, in place on S. It counts as failed when LAPACK reports a non-positive
    pivot, or when some pivot L_kk^2 <= 16 eps S_kk: coordinate k is then a combination of the
    earlier ones to working precision (the test is per coordinate, so it does not depend on the
    inputs' scales), S is singular in practice, and L^-1 would turn rounding into arbitrarily large
    merged weights. With the default damping a pivot is at least lam, so this needs
    S_kk > 1e-2 / (16 eps) mean(diag) (5000x in float32) to trigger. The fallback rebuilds S
    (rebuild()) and uses its eigendecomposition S = V diag(e) V^T, keeping e > rcond * max(e)
    (rcond = 1e-10 in float64; D * eps in float32, where 1e-10 is below rounding):
    F = diag(e^-1/2) V^T. Eq. 6 is then minimised over the kept eigendirections, which hold the
    ranges of H_A' and H_B' and hence r, and w~ = S^+ r is the minimiser of least norm. (The
    eigendecomposition costs about 10x the factorisation: it is meant for undamped small layers.)
    """

    def __init__(self, s: np.ndarray, rebuild):
        dim = s.shape[0]
        eps = np.finfo(s.dtype).eps
        diag = np.diagonal(s).copy()
        try:
            # s.T of a C-ordered s is Fortran-ordered, and s is symmetric: potrf works in place.
            self._l, self._lower = sla.cho_factor(s.T, lower=True, overwrite_a=True, check_finite=False)
            self.pinv = bool(np.any(np.square(np.diagonal(self._l)) <= 16 * eps * diag))
        except np.linalg.LinAlgError:
            self.pinv = True
        if self.pinv:
            self._l = None
            e, v = np.linalg.eigh(rebuild())
            rcond = 1e-10 if s.dtype == np.float64 else dim * eps
            keep = e > rcond * max(float(e[-1]), 0.0)
            self._f = np.ascontiguousarray((v[:, keep] / np.sqrt(e[keep])).T)  # [k, dim]

    def apply(self, u: np.ndarray) -> np.ndarray:
        """F u for u [dim, m]; u may be overwritten (pass it Fortran-ordered to work in place)."""
        if self.pinv:
            return self._f @ u
        return sla.solve_triangular(self._l, u, lower=self._lower, overwrite_b=True, check_finite=False)

    def apply_t(self, g: np.ndarray) -> np.ndarray:
        """F^T g for g [k, m]; g may be overwritten."""
        if self.pinv:
            return self._f.T @ g
        return sla.solve_triangular(self._l, g, lower=self._lower, trans="T", overwrite_b=True,
                                    check_finite=False)


class PairCosts:
    """Eq. 12's merge cost of every neuron pair of a layer, and eq. 10's merged weights.

    HA, HB: [D, D] layer-wise Hessians (eqs. 7-8, symmetric, bias last; D = d + 1) of task A's and
    task B's calibration data; WA [nA, D], WB [nB, D]: the incoming weights of the layer's neurons
    in A and B, bias last; alpha: eq. 5's weight of task B's error.

    Numerics (how the inverses are taken and how ill-conditioning is handled):

    - Damping: H' = H + lam I with lam = damping * mean(diag(H)) (lam = damping when that mean is 0),
      separately for H_A and H_B (lam_A, lam_B). A Hessian of fewer calibration rows than inputs, or
      of a dead input (a ReLU channel that never fires), is singular; damping makes both positive
      definite, and scaling lam by the mean diagonal makes `damping` independent of the inputs'
      units. Eq. 6 is then dE with the damped Hessians, i.e. the squared output error plus
      lam |w - a|^2, and eqs. 10-12 are its exact minimiser and minimum.
    - No single Hessian is ever inverted. (H_A'^-1 + (alpha H_B')^-1)^-1 = H_A' S^-1 alpha H_B' with
      S = H_A' + alpha H_B', and S is what gets factorised, once, by Cholesky (scipy cho_factor,
      in place): S is at least as well conditioned as the better of H_A', alpha H_B' in every
      direction, and is positive definite as soon as either is. As derived in the module docstring,
      eq. 12 for all pairs is 1/2 (q_a[i] + q_b[j] - 2 (A M B^T)[i, j]) with the two triangular
      solves g = L^-1 H_A' A^T and h = L^-1 alpha H_B' B^T and matrix products only; M is never
      formed, so it needs no symmetrisation. Costs below 0 are rounding (dE >= 0) and clipped to 0.
      The expansion cancels when a cost is small: its absolute error is about
      eps * (a^T H_A' a + alpha b^T H_B' b).
    - If Cholesky fails (damping = 0 and S singular, or a pivot at rounding level, see
      _HalfInverse), S^-1 is replaced by the pseudo-inverse from np.linalg.eigh with relative cutoff
      1e-10 and self.fallback is set. Costs stay finite and are the minimum of eq. 6; merged()
      returns the least-norm minimiser.
    - Precision: float64 up to d = 4096 inputs; above, float32 with in-place operations (the input
      Hessians are used, not copied, when already float32 and C-ordered; S and its factor share one
      buffer; the g and h blocks are [D, nA] and [D, nB]), which fits d = 25089, nA = nB = 4096 in
      about 10 GB including the caller's two Hessians. Row dot products and the final cost sums are
      accumulated in float64 either way.

    Attributes: cost [nA, nB] float64, lam_A, lam_B, alpha, dtype, fallback.
    """

    def __init__(self, HA, HB, WA, WB, alpha: float = 1.0, damping: float = 1e-2,
                 lams: tuple[float, float] | None = None):
        D = np.shape(HA)[0]
        self.dtype = _work_dtype(D - 1)
        dt = self.dtype
        self._HA = np.ascontiguousarray(HA, dtype=dt)
        self._HB = np.ascontiguousarray(HB, dtype=dt)
        self._WA = np.ascontiguousarray(WA, dtype=dt)
        self._WB = np.ascontiguousarray(WB, dtype=dt)
        if self._HA.shape != (D, D) or self._HB.shape != (D, D):
            raise ValueError(f"PairCosts: HA and HB must both be [{D}, {D}], got {self._HA.shape}, "
                             f"{self._HB.shape}")
        if self._WA.ndim != 2 or self._WB.ndim != 2 or self._WA.shape[1] != D or self._WB.shape[1] != D:
            raise ValueError(f"PairCosts: WA and WB must be [n, {D}] (bias last), got {self._WA.shape}, "
                             f"{self._WB.shape}")
        if not alpha > 0 or not damping >= 0:
            raise ValueError(f"PairCosts: need alpha > 0 and damping >= 0, got {alpha}, {damping}")
        self.alpha = float(alpha)
        # lams: the damping of a larger problem this one is a projection of (ProjectedPairCosts)
        self.lam_A, self.lam_B = lams if lams is not None else (_damping(self._HA, damping), _damping(self._HB, damping))
        self._F = _HalfInverse(self._system(), self._system)
        self.fallback = self._F.pinv

        # rows of ra are (H_A' a_i)^T, of rb (alpha H_B' b_j)^T (H symmetric, so a^T H = (H a)^T).
        ra = self._WA @ self._HA
        _add_scaled(ra, self._WA, self.lam_A)
        q_a = _row_dots(self._WA, ra)
        rb = self._WB @ self._HB
        _add_scaled(rb, self._WB, self.lam_B)
        rb *= self.alpha
        q_b = _row_dots(self._WB, rb)
        # ra.T is Fortran-ordered, so the triangular solve overwrites ra's buffer.
        self._g = np.ascontiguousarray(self._F.apply(ra.T).T)  # [nA, k]: g_a = F H_A' a
        del ra
        self._h = np.ascontiguousarray(self._F.apply(rb.T).T)  # [nB, k]: h_b = F alpha H_B' b
        del rb
        q_a -= _row_dots(self._g, self._g)
        q_b -= _row_dots(self._h, self._h)
        cost = (self._g @ self._h.T).astype(np.float64)
        cost *= -2.0
        cost += q_a[:, None]
        cost += q_b[None, :]
        cost *= 0.5
        np.maximum(cost, 0.0, out=cost)
        self.cost = cost

    def _system(self) -> np.ndarray:
        """A new S = H_A' + alpha H_B', built in row blocks so alpha * H_B makes no d x d temporary."""
        s = self._HA.copy()
        _add_scaled(s, self._HB, self.alpha)
        s.flat[::s.shape[0] + 1] += self.lam_A + self.alpha * self.lam_B
        return s

    def cost_of(self, i, j):
        """Eq. 12's cost of the pairs (i, j), from the precomputed table."""
        return self.cost[i, j]

    def merged(self, i, j, mask=None) -> np.ndarray:
        """Eq. 10's merged weights w~ [N, D] for the pairs (i[k], j[k]), in self.dtype.

        Without a mask: w~ = S^-1 (H_A' a_i + alpha H_B' b_j) = F^T (g_a + h_b), the second half of
        cho_solve on all N pairs at once (a matrix right-hand side).

        mask [N, D] bool, for pruned models (paper section 3.6): the merged neuron keeps the denser
        mask, the union of the nonzeros of a_i and b_j, e.g. (WA[i] != 0) | (WB[j] != 0). Minimising
        eq. 6 over w with w = 0 outside mask m gives the reduced system
        S[m, m] w[m] = (H_A' a_i + alpha H_B' b_j)[m], solved per distinct mask (pairs with equal
        masks share one factorisation), with the same pseudo-inverse fallback as the full system.
        """
        i, j = np.atleast_1d(i).astype(np.intp), np.atleast_1d(j).astype(np.intp)
        if i.shape != j.shape or i.ndim != 1:
            raise ValueError(f"PairCosts.merged: i and j must be 1-D of equal length, got {i.shape}, "
                             f"{j.shape}")
        if mask is None:
            x = self._g[i] + self._h[j]
            return np.ascontiguousarray(self._F.apply_t(x.T).T)
        D = self._HA.shape[0]
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (len(i), D):
            raise ValueError(f"PairCosts.merged: mask must be [{len(i)}, {D}], got {mask.shape}")
        out = np.zeros((len(i), D), dtype=self.dtype)
        if len(i) == 0:
            return out
        masks, group = np.unique(mask, axis=0, return_inverse=True)
        for k, m in enumerate(masks):
            rows, idx = np.flatnonzero(group.ravel() == k), np.flatnonzero(m)
            if idx.size:
                out[np.ix_(rows, idx)] = self._solve_masked(i[rows], j[rows], idx).T
        return out

    def _solve_masked(self, i, j, idx) -> np.ndarray:
        """w[idx] [|idx|, N] of the reduced system on coordinates idx."""
        def sub_system():
            s = self._HA[np.ix_(idx, idx)]
            s += self.alpha * self._HB[np.ix_(idx, idx)]
            s.flat[::len(idx) + 1] += self.lam_A + self.alpha * self.lam_B
            return s

        a, b = self._WA[i], self._WB[j]
        r = self._HA[idx] @ a.T + self.lam_A * a[:, idx].T
        r += self.alpha * (self._HB[idx] @ b.T + self.lam_B * b[:, idx].T)
        # S[m, m] is a principal submatrix of S: positive definite when S is, with pivots no smaller
        # in the same order, so it falls back only when S did (and self.fallback is already set).
        f = _HalfInverse(sub_system(), sub_system)
        return f.apply_t(f.apply(np.asfortranarray(r)))


class HessianRows:
    """A layer-wise Hessian kept as its factor: H = R^T R with R = [x, 1] / sqrt(m) over m input rows.

    For a layer with more inputs than calibration rows (VGG-16 fc6: 25,089 inputs and 256 samples per
    task) H has rank <= m: forming it takes 2.5 GB and factorising it minutes, while R takes
    m x (d + 1). The Hessian of several tasks together (the side P of a merge step) is the sum of
    theirs, i.e. R stacked. `pair_costs` uses ProjectedPairCosts when both sides' ranks are small.
    """

    def __init__(self, r: np.ndarray):
        self.r = np.asarray(r, dtype=np.float64)

    @classmethod
    def of(cls, rows) -> HessianRows:
        """From input rows [m, d] without the bias entry (the same H as HessianAccumulator's)."""
        rows = np.asarray(rows, dtype=np.float64)
        r = np.concatenate([rows, np.ones((len(rows), 1))], axis=1)
        return cls(r / np.sqrt(len(rows)))

    def __add__(self, other):
        if isinstance(other, HessianRows):
            return HessianRows(np.concatenate([self.r, other.r]))
        return self.dense() + other

    def __radd__(self, other):
        return self if isinstance(other, int) and other == 0 else self.__add__(other)  # sum() starts at 0

    @property
    def shape(self) -> tuple[int, int]:
        return (self.r.shape[1], self.r.shape[1])

    def dense(self) -> np.ndarray:
        return self.r.T @ self.r

    def mean_diag(self) -> float:
        return float(np.einsum("ij,ij->", self.r, self.r)) / self.r.shape[1]


class ProjectedPairCosts:
    """PairCosts (eqs. 10-12, same damping, same attributes) for two low-rank Hessians given as
    HessianRows, without forming any D x D matrix.

    Let Q [D, r] be an orthonormal basis of the rows of R_A and R_B. Both damped Hessians are
    block-diagonal in (range Q, its complement): Q^T H Q + lam I on range Q, lam I on the
    complement, where lam_A, lam_B are the full problem's (damping x mean diagonal). So eq. 6 splits
    into two independent problems, and
      - eq. 12: d[i, j] = PairCosts of the projections Q^T a_i, Q^T b_j with Hessians Q^T H Q
        (and lam_A, lam_B), plus k/2 |a_perp - b_perp|^2 with k = (1/lam_A + 1/(alpha lam_B))^-1;
      - eq. 10: w~ = Q w~_Q + (lam_A a_perp + alpha lam_B b_perp) / (lam_A + alpha lam_B),
    with a_perp = a - Q Q^T a. |a_perp - b_perp|^2 = |a|^2 - |Q^T a|^2 + |b|^2 - |Q^T b|^2
    - 2 (a.b - Q^T a.Q^T b), in float64. This is exact (the same minimiser and minimum as PairCosts,
    to rounding) and costs O(D r (r + nA + nB) + D nA nB) instead of O(D^2 (D + nA + nB)): at fc6
    of VGG-16 with 256 samples per task, seconds instead of many minutes.
    A mask (pruned models, 3.6) couples the blocks: merged() with a mask solves the dense problem.
    """

    def __init__(self, HA: HessianRows, HB: HessianRows, WA, WB, alpha: float = 1.0, damping: float = 1e-2):
        D = HA.shape[0]
        if HB.shape[0] != D:
            raise ValueError(f"ProjectedPairCosts: HA and HB must have the same size, got {HA.shape}, {HB.shape}")
        if not alpha > 0 or not damping >= 0:
            raise ValueError(f"ProjectedPairCosts: need alpha > 0 and damping >= 0, got {alpha}, {damping}")
        self._HA, self._HB, self.alpha, self._damping = HA, HB, float(alpha), damping
        self._WA = np.asarray(WA, dtype=np.float64)
        self._WB = np.asarray(WB, dtype=np.float64)
        lam = [damping * m if m != 0 else float(damping) for m in (HA.mean_diag(), HB.mean_diag())]
        self.lam_A, self.lam_B = lam
        self.dtype = np.float64
        q, _ = np.linalg.qr(np.concatenate([HA.r, HB.r]).T)  # [D, r]
        self._q = q
        ra, rb = HA.r @ q, HB.r @ q  # the factors of Q^T H Q
        self._pa, self._pb = self._WA @ q, self._WB @ q  # [n, r]
        self._inner = PairCosts(ra.T @ ra, rb.T @ rb, self._pa, self._pb, alpha=alpha, lams=(self.lam_A, self.lam_B))
        self.fallback = self._inner.fallback
        k = 1.0 / (1.0 / self.lam_A + 1.0 / (self.alpha * self.lam_B))
        na = np.einsum("ij,ij->i", self._WA, self._WA) - np.einsum("ij,ij->i", self._pa, self._pa)
        nb = np.einsum("ij,ij->i", self._WB, self._WB) - np.einsum("ij,ij->i", self._pb, self._pb)
        cross = self._WA @ self._WB.T - self._pa @ self._pb.T
        perp = na[:, None] + nb[None, :] - 2.0 * cross
        np.maximum(perp, 0.0, out=perp)
        self.cost = self._inner.cost + 0.5 * k * perp

    def cost_of(self, i, j):
        return self.cost[i, j]

    def merged(self, i, j, mask=None) -> np.ndarray:
        """Eq. 10's merged weights [N, D] for the pairs (i[k], j[k]) (see PairCosts.merged)."""
        i, j = np.atleast_1d(i).astype(np.intp), np.atleast_1d(j).astype(np.intp)
        if mask is not None:
            dense = PairCosts(self._HA.dense(), self._HB.dense(), self._WA, self._WB, alpha=self.alpha,
                              lams=(self.lam_A, self.lam_B))
            return dense.merged(i, j, mask=mask)
        a, b = self._WA[i], self._WB[j]
        a_perp = a - self._pa[i] @ self._q.T
        b_perp = b - self._pb[j] @ self._q.T
        w = self._inner.merged(i, j) @ self._q.T
        w += (self.lam_A * a_perp + self.alpha * self.lam_B * b_perp) / (self.lam_A + self.alpha * self.lam_B)
        return w


def pair_costs(HA, HB, WA, WB, alpha: float = 1.0, damping: float = 1e-2):
    """PairCosts, or ProjectedPairCosts when both Hessians are HessianRows of rank below half their
    size (where the projection is the cheaper way to the same figures)."""
    if isinstance(HA, HessianRows) and isinstance(HB, HessianRows) and \
            len(HA.r) + len(HB.r) <= HA.shape[0] // 2:
        return ProjectedPairCosts(HA, HB, WA, WB, alpha=alpha, damping=damping)
    dense = [h.dense() if isinstance(h, HessianRows) else h for h in (HA, HB)]
    return PairCosts(*dense, WA, WB, alpha=alpha, damping=damping)


def _damping(h: np.ndarray, damping: float) -> float:
    mean_diag = float(np.mean(np.diagonal(h), dtype=np.float64))
    return damping * mean_diag if mean_diag != 0 else float(damping)


def _add_scaled(y: np.ndarray, x: np.ndarray, s: float) -> None:
    """y += s * x in row blocks, so that s * x is never a full-size temporary."""
    step = max(1, _CHUNK_BYTES // max(1, y.shape[1] * y.itemsize))
    for r0 in range(0, y.shape[0], step):
        y[r0:r0 + step] += s * x[r0:r0 + step]


def _row_dots(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """sum_k x[i, k] y[i, k] per row, accumulated in float64 block by block."""
    out = np.empty(x.shape[0], dtype=np.float64)
    step = max(1, _CHUNK_BYTES // max(1, x.shape[1] * 8))
    for r0 in range(0, x.shape[0], step):
        xb = x[r0:r0 + step].astype(np.float64, copy=False)
        yb = y[r0:r0 + step].astype(np.float64, copy=False)
        out[r0:r0 + step] = np.einsum("ij,ij->i", xb, yb)
    return out


# ----------------------------------------------------------------------------- pairing

def pair_greedy(cost, n=None, threshold=None) -> tuple[np.ndarray, np.ndarray]:
    """Greedy neuron sharing, as in the authors' code: repeatedly take the cheapest remaining pair
    whose i and j are both still unused, until n pairs are taken, or (threshold) until no unused
    pair costs less than threshold. Exactly one of n, threshold. Pairs sorted by i.

    One stable argsort of the (candidate) costs; the sorted list is then scanned in blocks, each
    block first filtered with the used flags in numpy, so the Python loop sees few entries.
    """
    cost = _check_cost(cost)
    nA, nB = cost.shape
    n = _check_stop(n, threshold, nA, nB)
    flat = cost.ravel()
    if threshold is None:
        order, want = np.argsort(flat, kind="stable"), n
    else:
        cand = np.flatnonzero(flat < threshold)
        order, want = cand[np.argsort(flat[cand], kind="stable")], min(nA, nB)
    used_a, used_b = np.zeros(nA, bool), np.zeros(nB, bool)
    pi, pj = [], []
    step = 1 << 16
    for start in range(0, len(order), step):
        if len(pi) == want:
            break
        a, b = np.divmod(order[start:start + step], nB)
        free = ~used_a[a] & ~used_b[b]
        for x, y in zip(a[free].tolist(), b[free].tolist()):
            if not used_a[x] and not used_b[y]:
                used_a[x] = used_b[y] = True
                pi.append(x)
                pj.append(y)
                if len(pi) == want:
                    break
    return _sorted_pairs(pi, pj)


def pair_optimal(cost, n=None, threshold=None) -> tuple[np.ndarray, np.ndarray]:
    """Optimal neuron sharing by linear assignment. Pairs sorted by i.

    n: exactly n pairs of least total cost. The square assignment over A's rows plus nB - n dummy
    rows and B's columns plus nA - n dummy columns (real-dummy cost 0, dummy-dummy forbidden by a
    value larger than any possible saving) leaves nA - n rows of A on dummy columns and nB - n
    columns of B to dummy rows; the other n rows are matched to real columns at least cost.

    threshold: the matching minimising sum(cost - threshold) over its pairs, all of which cost less
    than threshold: rows of A against B's columns (at min(cost - threshold, 0)) plus nA zero-cost
    "unmatched" columns; pairs at cost >= threshold gain nothing and are dropped.
    """
    cost = _check_cost(cost)
    nA, nB = cost.shape
    n = _check_stop(n, threshold, nA, nB)
    if threshold is not None:
        aug = np.zeros((nA, nB + nA))
        aug[:, :nB] = np.minimum(cost - threshold, 0.0)
        r, c = linear_sum_assignment(aug)
        keep = c < nB
        r, c = r[keep], c[keep]
        keep = cost[r, c] < threshold
        return _sorted_pairs(r[keep], c[keep])
    # Any feasible assignment costs within +- min(nA, nB) * max|cost|; one forbidden entry more.
    big = 2.0 * (min(nA, nB) + 1) * float(np.max(np.abs(cost), initial=0.0)) + 1.0
    aug = np.zeros((nA + nB - n, nB + nA - n))
    aug[:nA, :nB] = cost
    aug[nA:, nB:] = big
    r, c = linear_sum_assignment(aug)
    keep = (r < nA) & (c < nB)
    assert keep.sum() == n, "a dummy-dummy entry was assigned"
    return _sorted_pairs(r[keep], c[keep])


def pair_random(nA: int, nB: int, n: int, rng=None) -> tuple[np.ndarray, np.ndarray]:
    """The random-sharing baseline (paper Fig. 2): n neurons of A and n of B drawn uniformly without
    replacement and paired at random. rng: a np.random.Generator or a seed (default 0)."""
    _check_stop(n, None, nA, nB)
    rng = np.random.default_rng(0 if rng is None else rng)
    return _sorted_pairs(rng.choice(nA, n, replace=False), rng.choice(nB, n, replace=False))


def _check_cost(cost) -> np.ndarray:
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"pairing: cost must be [nA, nB], got shape {cost.shape}")
    if not np.isfinite(cost).all():
        raise ValueError("pairing: cost has non-finite entries")
    return cost


def _check_stop(n, threshold, nA: int, nB: int):
    if (n is None) == (threshold is None):
        raise ValueError("pairing: give exactly one of n and threshold")
    if n is not None and not 0 <= n <= min(nA, nB):
        raise ValueError(f"pairing: n must be in [0, min(nA, nB) = {min(nA, nB)}], got {n}")
    return None if n is None else int(n)


def _sorted_pairs(i, j) -> tuple[np.ndarray, np.ndarray]:
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    order = np.argsort(i, kind="stable")
    return i[order], j[order]
