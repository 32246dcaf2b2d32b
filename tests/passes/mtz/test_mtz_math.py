"""mtz_math: MTZ's layer rows, layer-wise Hessian (eqs. 7-8), merge costs and weights (eqs. 6, 10-12)
and neuron pairing, each against a brute-force reference."""

import itertools

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F

import onnxmerge.passes.mtz._hessian as mtz
from onnxmerge.passes.mtz._hessian import (
    HessianAccumulator,
    PairCosts,
    layer_rows,
    pair_greedy,
    pair_optimal,
    pair_random,
)

# ----------------------------------------------------------------------------- helpers


def with_bias(x):
    return np.c_[x, np.ones(len(x))]


def hessian(x):
    """Eqs. 7-8 directly: the mean of y y^T over y = [x; 1], float64."""
    y = with_bias(np.asarray(x, dtype=np.float64))
    return y.T @ y / len(y)


def layer(seed, d=6, nA=5, nB=4, rows=(40, 50), rank=None):
    """Two tasks' input rows from different distributions, their Hessians and random weights.
    rank: inputs confined to a rank-dimensional subspace shared by both tasks."""
    rng = np.random.default_rng(seed)
    k = d if rank is None else rank
    proj = rng.normal(size=(k, d)) if rank is not None else np.eye(d)
    xa = rng.normal(0.0, 1.0, (rows[0], k)) @ proj
    xb = (rng.normal(0.5, 2.0, (rows[1], k)) * rng.uniform(0.2, 3.0, k)) @ proj
    wa, wb = rng.normal(size=(nA, d + 1)), rng.normal(size=(nB, d + 1))
    return xa, xb, wa, wb


def errors(w, x, target, lam):
    """E(w) = mean_k ((w - target).y_k)^2 + lam |w - target|^2, from the data (eq. 6's terms, damped)."""
    diff = w - target
    return np.mean((with_bias(x) @ diff) ** 2) + lam * diff @ diff


def objective(w, xa, xb, a, b, alpha, lam_a, lam_b):
    """Eq. 6: dE(w) = 1/2 [E_A(w) + alpha E_B(w)]."""
    return 0.5 * (errors(w, xa, a, lam_a) + alpha * errors(w, xb, b, lam_b))


def lstsq_merge(xa, xb, a, b, alpha, lam_a, lam_b, mask=None):
    """Minimiser (least norm) and minimum of eq. 6 as one stacked least-squares problem, optionally
    with w = 0 outside mask."""
    ya, yb = with_bias(xa), with_bias(xb)
    eye = np.eye(ya.shape[1])
    rows = np.vstack([ya / np.sqrt(len(ya)), np.sqrt(lam_a) * eye,
                      np.sqrt(alpha) * yb / np.sqrt(len(yb)), np.sqrt(alpha * lam_b) * eye])
    target = np.concatenate([ya @ a / np.sqrt(len(ya)), np.sqrt(lam_a) * a,
                             np.sqrt(alpha) * yb @ b / np.sqrt(len(yb)), np.sqrt(alpha * lam_b) * b])
    cols = np.ones(ya.shape[1], bool) if mask is None else mask
    w = np.zeros(ya.shape[1])
    w[cols] = np.linalg.lstsq(rows[:, cols], target, rcond=None)[0]
    return w, 0.5 * np.sum((rows @ w - target) ** 2)


def close(x, y, rtol, scale=None):
    """|x - y| <= rtol * scale, scale defaulting to max|y| (a norm-wise relative check)."""
    scale = np.max(np.abs(y)) if scale is None else scale
    return np.max(np.abs(np.asarray(x) - np.asarray(y))) <= rtol * scale


# ----------------------------------------------------------------------------- layer_rows


def test_layer_rows_fc_flattens_and_subsamples():
    x = np.random.default_rng(0).normal(size=(10, 2, 3))
    rows = layer_rows(x)
    assert rows.dtype == np.float32 and rows.shape == (10, 6)
    np.testing.assert_array_equal(rows, x.reshape(10, 6).astype(np.float32))
    sub = layer_rows(x, max_rows=4, rng=np.random.default_rng(1))
    picked = [np.flatnonzero((rows == r).all(1)) for r in sub]
    idx = np.concatenate(picked)
    assert sub.shape == (4, 6) and len(idx) == 4 and np.all(np.diff(idx) > 0)


@pytest.mark.parametrize("kernel, strides, pads, dilations", [
    ((3, 3), (), (), ()),
    ((3, 2), (2, 1), (1, 0, 2, 1), ()),
    ((2, 3), (1, 2), (0, 2, 1, 0), (2, 1)),
    ((3, 3), (2, 2), (2, 2, 2, 2), (2, 2)),
])
def test_layer_rows_conv_matches_unfold(kernel, strides, pads, dilations):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 3, 9, 8)).astype(np.float32)
    rows = layer_rows(x, kernel, strides, pads, dilations)
    top, left, bottom, right = pads or (0, 0, 0, 0)
    xt = F.pad(torch.from_numpy(x), (left, right, top, bottom))
    ref = F.unfold(xt, kernel, dilation=dilations or 1, stride=strides or 1)  # [n, c*kh*kw, L]
    ref = ref.transpose(1, 2).reshape(-1, ref.shape[1]).numpy()
    assert rows.shape == ref.shape
    np.testing.assert_array_equal(rows, ref)
    # weight.reshape(out, -1) @ row is the convolution's output at that position.
    w = rng.normal(size=(4, 3, *kernel)).astype(np.float32)
    out = F.conv2d(xt, torch.from_numpy(w), stride=strides or 1, dilation=dilations or 1).numpy()
    np.testing.assert_allclose(rows @ w.reshape(4, -1).T, out.transpose(0, 2, 3, 1).reshape(-1, 4),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("padded_block", ["all samples", "one sample"])
def test_layer_rows_conv_subsample_is_a_subset(padded_block, monkeypatch):
    if padded_block == "one sample":  # the input is padded a block of samples at a time
        monkeypatch.setattr(mtz, "_CHUNK_BYTES", 1)
    x = np.random.default_rng(0).normal(size=(3, 2, 7, 7))
    args = ((3, 3), (2, 1), (1, 1, 1, 1), (1, 2))
    full = layer_rows(x, *args)
    sub = layer_rows(x, *args, max_rows=20, rng=np.random.default_rng(5))
    assert sub.shape == (20, full.shape[1])
    match = (sub[:, None, :] == full[None, :, :]).all(-1)
    assert (match.sum(1) == 1).all()  # every sampled row is exactly one of the full rows
    idx = match.argmax(1)
    assert np.all(np.diff(idx) > 0)  # distinct, in their original order
    np.testing.assert_array_equal(sub, layer_rows(x, *args, max_rows=20, rng=np.random.default_rng(5)))
    np.testing.assert_array_equal(layer_rows(x, *args, max_rows=full.shape[0]), full)


def test_layer_rows_rejects_non_2d_kernels():
    with pytest.raises(ValueError, match="2-D"):
        layer_rows(np.zeros((1, 2, 5)), kernel=(3,))


# ----------------------------------------------------------------------------- HessianAccumulator


@pytest.mark.parametrize("large", [False, True])
def test_hessian_accumulator_is_the_mean_over_chunks(monkeypatch, large):
    monkeypatch.setattr(mtz, "_CHUNK_BYTES", 64)  # several internal chunks per add()
    if large:
        monkeypatch.setattr(mtz, "_LARGE_D", 4)  # the float32 path of d > 4096
    x = np.random.default_rng(0).normal(1.0, 2.0, (37, 5))
    acc = HessianAccumulator(5)
    for part in np.split(x, [3, 4, 20]):
        acc.add(part.astype(np.float32))
    h = acc.value()
    assert acc.count == 37 and h.shape == (6, 6)
    assert h.dtype == (np.float32 if large else np.float64)
    np.testing.assert_allclose(h, hessian(x.astype(np.float32)), rtol=1e-5 if large else 1e-12)
    np.testing.assert_array_equal(h, h.T)


def test_hessian_accumulator_rejects_wrong_rows():
    acc = HessianAccumulator(3)
    with pytest.raises(ValueError):
        acc.value()
    with pytest.raises(ValueError):
        acc.add(np.zeros((2, 4)))


# ----------------------------------------------------------------------------- PairCosts


@pytest.mark.parametrize("alpha, damping", [(1.0, 1e-2), (0.3, 1e-2), (2.5, 0.1), (1.0, 0.0)])
def test_pair_costs_equal_brute_force_of_eq6(alpha, damping):
    xa, xb, wa, wb = layer(1)
    pc = PairCosts(hessian(xa), hessian(xb), wa, wb, alpha=alpha, damping=damping)
    assert not pc.fallback and pc.cost.shape == (5, 4) and pc.cost.dtype == np.float64
    assert pc.lam_A == pytest.approx(damping * np.mean(np.diag(hessian(xa))))
    ii, jj = (g.ravel() for g in np.meshgrid(np.arange(5), np.arange(4), indexing="ij"))
    merged = pc.merged(ii, jj)
    for k, (i, j) in enumerate(zip(ii, jj)):
        w, best = lstsq_merge(xa, xb, wa[i], wb[j], alpha, pc.lam_A, pc.lam_B)
        assert close(merged[k], w, 1e-8)  # eq. 10
        direct = objective(merged[k], xa, xb, wa[i], wb[j], alpha, pc.lam_A, pc.lam_B)
        assert pc.cost[i, j] == pytest.approx(direct, rel=1e-8)  # eq. 12 = dE(w~)
        assert pc.cost[i, j] == pytest.approx(best, rel=1e-8)
        assert pc.cost_of(i, j) == pc.cost[i, j]


def test_pair_cost_is_zero_for_identical_neurons():
    # B is a copy of A: the diagonal pairs cost 0 (eq. 12 with a_i = b_j), up to rounding that the
    # expansion q_a + q_b - 2 a.M.b leaves on either side of 0; the clip keeps costs >= 0.
    xa, xb, wa, _ = layer(1, nA=8)
    pc = PairCosts(hessian(xa), hessian(xb), wa, wa.copy(), alpha=0.7)
    scale = np.einsum("ij,jk,ik->i", wa, hessian(xa), wa)
    assert (pc.cost >= 0).all()
    assert (np.diag(pc.cost) <= 1e-12 * scale).all()
    assert close(pc.merged(np.arange(8), np.arange(8)), wa, 1e-10)
    off = pc.cost[~np.eye(8, dtype=bool)]
    assert (off > 1e-3 * scale.min()).all()


def test_fallback_on_singular_hessians_still_minimises_eq6():
    # Both tasks' inputs lie in one 3-D subspace of the 6 inputs, and no damping: S has rank 4 of 7.
    xa, xb, wa, wb = layer(3, rank=3)
    alpha = 0.8
    pc = PairCosts(hessian(xa), hessian(xb), wa, wb, alpha=alpha, damping=0.0)
    assert pc.fallback and pc.lam_A == 0 and pc.lam_B == 0
    assert np.isfinite(pc.cost).all()
    ii, jj = np.repeat(np.arange(5), 4), np.tile(np.arange(4), 5)
    merged = pc.merged(ii, jj)
    assert np.isfinite(merged).all()
    for k, (i, j) in enumerate(zip(ii, jj)):
        w, best = lstsq_merge(xa, xb, wa[i], wb[j], alpha, 0.0, 0.0)
        scale = objective(np.zeros(7), xa, xb, wa[i], wb[j], alpha, 0.0, 0.0)
        value = objective(merged[k], xa, xb, wa[i], wb[j], alpha, 0.0, 0.0)
        assert abs(value - best) <= 1e-9 * scale
        assert abs(pc.cost[i, j] - best) <= 1e-9 * scale
        assert close(merged[k], w, 1e-7)  # the least-norm minimiser, as lstsq's
    mask = np.random.default_rng(3).random((20, 7)) < 0.6
    masked = pc.merged(ii, jj, mask=mask)
    for k, (i, j) in enumerate(zip(ii, jj)):
        w, _ = lstsq_merge(xa, xb, wa[i], wb[j], alpha, 0.0, 0.0, mask=mask[k])
        assert close(masked[k], w, 1e-7)


@pytest.mark.parametrize("seed", [1, 4, 9])
def test_fallback_on_a_rounding_level_cholesky_pivot(seed):
    # Input 5 is 3 x input 4 in both tasks: S is singular, yet for these seeds Cholesky "succeeds"
    # with a pivot at rounding level; L^-1 would blow the merged weights up along that direction.
    xa, xb, wa, wb = layer(seed)
    xa[:, 5], xb[:, 5] = 3 * xa[:, 4], 3 * xb[:, 4]
    alpha = 0.8
    scipy.linalg.cho_factor(hessian(xa) + alpha * hessian(xb))  # does not raise
    pc = PairCosts(hessian(xa), hessian(xb), wa, wb, alpha=alpha, damping=0.0)
    assert pc.fallback
    ii, jj = np.repeat(np.arange(5), 4), np.tile(np.arange(4), 5)
    merged = pc.merged(ii, jj)
    for k, (i, j) in enumerate(zip(ii, jj)):
        w, best = lstsq_merge(xa, xb, wa[i], wb[j], alpha, 0.0, 0.0)
        scale = objective(np.zeros(7), xa, xb, wa[i], wb[j], alpha, 0.0, 0.0)
        assert abs(pc.cost[i, j] - best) <= 1e-9 * scale
        assert close(merged[k], w, 1e-7)


def test_masked_merge_keeps_the_union_mask_and_beats_projection():
    xa, xb, wa, wb = layer(4)
    rng = np.random.default_rng(4)
    wa[rng.random(wa.shape) < 0.5] = 0.0
    wb[rng.random(wb.shape) < 0.5] = 0.0
    alpha = 1.3
    pc = PairCosts(hessian(xa), hessian(xb), wa, wb, alpha=alpha)
    ii, jj = np.repeat(np.arange(5), 4), np.tile(np.arange(4), 5)
    mask = (wa[ii] != 0) | (wb[jj] != 0)
    mask[:2] = True  # two pairs with the dense mask: one group, equal to the unmasked merge
    masked, full = pc.merged(ii, jj, mask=mask), pc.merged(ii, jj)
    assert (masked[~mask] == 0).all()
    assert close(masked[:2], full[:2], 1e-10)
    for k, (i, j) in enumerate(zip(ii, jj)):
        args = (xa, xb, wa[i], wb[j], alpha, pc.lam_A, pc.lam_B)
        w, best = lstsq_merge(*args, mask=mask[k])
        assert close(masked[k], w, 1e-8)
        projected = objective(full[k] * mask[k], *args)
        assert objective(masked[k], *args) <= projected * (1 + 1e-12)
    assert (mask.sum(1) < 7).any()  # some masks really are sparse


def test_float32_path_for_large_layers_agrees(monkeypatch):
    xa, xb, wa, wb = layer(5)
    ref = PairCosts(hessian(xa), hessian(xb), wa, wb, alpha=0.6)
    monkeypatch.setattr(mtz, "_LARGE_D", 5)  # d = 6 now counts as large
    pc = PairCosts(hessian(xa), hessian(xb), wa, wb, alpha=0.6)
    assert pc.dtype == np.float32 and pc.cost.dtype == np.float64
    assert close(pc.cost, ref.cost, 1e-5)
    assert close(pc.merged([0, 4], [3, 1]), ref.merged([0, 4], [3, 1]), 1e-4)


@pytest.mark.parametrize("alpha,damping", [(1.0, 1e-2), (0.4, 1e-1), (2.5, 1e-3)])
def test_projected_pair_costs_equal_pair_costs_on_low_rank_hessians(alpha, damping):
    """Fewer rows than inputs (VGG fc6 with 256 samples): the projection onto the rows' span is the
    same eq. 12 and eq. 10 as PairCosts on the dense Hessians, to rounding."""
    xa, xb, wa, wb = layer(7, d=60, nA=9, nB=7, rows=(10, 8))
    ha, hb = mtz.HessianRows.of(xa), mtz.HessianRows.of(xb)
    np.testing.assert_allclose(ha.dense(), hessian(xa), atol=1e-12)
    np.testing.assert_allclose((ha + hb).dense(), hessian(xa) + hessian(xb), atol=1e-12)
    proj = mtz.pair_costs(ha, hb, wa, wb, alpha=alpha, damping=damping)
    assert isinstance(proj, mtz.ProjectedPairCosts)
    full = PairCosts(hessian(xa), hessian(xb), wa, wb, alpha=alpha, damping=damping)
    assert (proj.lam_A, proj.lam_B) == pytest.approx((full.lam_A, full.lam_B), rel=1e-12)
    np.testing.assert_allclose(proj.cost, full.cost, rtol=1e-8, atol=1e-10 * full.cost.max())
    i, j = np.array([0, 3, 8]), np.array([6, 0, 2])
    np.testing.assert_allclose(proj.merged(i, j), full.merged(i, j), rtol=1e-7, atol=1e-9)
    mask = np.random.default_rng(0).random((3, 61)) < 0.7
    np.testing.assert_allclose(proj.merged(i, j, mask=mask), full.merged(i, j, mask=mask), rtol=1e-7, atol=1e-9)


def test_pair_costs_densifies_hessian_rows_of_high_rank():
    xa, xb, wa, wb = layer(8, d=6, rows=(40, 50))
    got = mtz.pair_costs(mtz.HessianRows.of(xa), mtz.HessianRows.of(xb), wa, wb)
    assert isinstance(got, PairCosts)
    np.testing.assert_allclose(got.cost, PairCosts(hessian(xa), hessian(xb), wa, wb).cost, rtol=1e-10)


def test_pair_costs_reject_mismatched_shapes():
    h = np.eye(4)
    with pytest.raises(ValueError):
        PairCosts(h, np.eye(5), np.ones((2, 4)), np.ones((2, 4)))
    with pytest.raises(ValueError):
        PairCosts(h, h, np.ones((2, 3)), np.ones((2, 4)))


# ----------------------------------------------------------------------------- pairing


def valid(i, j, nA, nB):
    return (len(set(i)) == len(i) and len(set(j)) == len(j) and np.all(np.diff(i) > 0)
            and (len(i) == 0 or (i.min() >= 0 and i.max() < nA and j.min() >= 0 and j.max() < nB)))


def best_matching(cost, n):
    nA, nB = cost.shape
    return min((sum(cost[r, c] for r, c in zip(rows, cols))
                for rows in itertools.combinations(range(nA), n)
                for cols in itertools.permutations(range(nB), n)), default=0.0)


def best_threshold_matching(cost, t):
    nA, nB = cost.shape
    return min(best_matching(np.minimum(cost - t, 0.0), n) for n in range(min(nA, nB) + 1))


@pytest.mark.parametrize("shape", [(5, 4), (3, 5)])
def test_pair_optimal_is_the_best_matching(shape):
    cost = np.random.default_rng(sum(shape)).random(shape)
    for n in range(min(shape) + 1):
        i, j = pair_optimal(cost, n=n)
        assert len(i) == n and valid(i, j, *shape)
        assert cost[i, j].sum() == pytest.approx(best_matching(cost, n), abs=1e-12)
        gi, gj = pair_greedy(cost, n=n)
        assert len(gi) == n and valid(gi, gj, *shape)
        assert cost[gi, gj].sum() >= cost[i, j].sum() - 1e-12


@pytest.mark.parametrize("shape", [(5, 4), (3, 5)])
def test_threshold_pairing(shape):
    cost = np.random.default_rng(7 + sum(shape)).random(shape)
    for t in (0.0, 0.2, 0.5, 0.9, 2.0):
        i, j = pair_optimal(cost, threshold=t)
        assert valid(i, j, *shape) and (cost[i, j] < t).all()
        assert (cost[i, j] - t).sum() == pytest.approx(best_threshold_matching(cost, t), abs=1e-12)
        gi, gj = pair_greedy(cost, threshold=t)
        assert valid(gi, gj, *shape) and (cost[gi, gj] < t).all()
        # greedy stops only when no unused pair is left under the threshold
        free = np.ones(shape, bool)
        free[gi, :] = False
        free[:, gj] = False
        assert not (cost[free] < t).any()


def test_greedy_takes_cheapest_first_and_can_be_suboptimal():
    cost = np.array([[1.0, 2.0], [2.0, 100.0]])
    assert [p.tolist() for p in pair_greedy(cost, n=2)] == [[0, 1], [0, 1]]
    assert [p.tolist() for p in pair_optimal(cost, n=2)] == [[0, 1], [1, 0]]
    assert [p.tolist() for p in pair_greedy(cost, threshold=3.5)] == [[0], [0]]
    assert [p.tolist() for p in pair_optimal(cost, threshold=3.5)] == [[0, 1], [1, 0]]


def test_pair_optimal_with_negative_costs_still_takes_exactly_n():
    # Costs of eq. 12 are >= 0, but the assignment must not depend on it: with negative costs a
    # free dummy-dummy entry would buy extra real pairs.
    cost = np.random.default_rng(9).random((5, 4)) - 0.7
    for n in range(5):
        i, j = pair_optimal(cost, n=n)
        assert len(i) == n and valid(i, j, 5, 4)
        assert cost[i, j].sum() == pytest.approx(best_matching(cost, n), abs=1e-12)


def test_pairs_at_the_threshold_are_not_taken():
    cost = np.full((2, 3), 2.0)
    for pair in (pair_greedy, pair_optimal):
        i, j = pair(cost, threshold=2.0)
        assert len(i) == len(j) == 0
        assert len(pair(cost, threshold=2.0 + 1e-9)[0]) == 2


def test_greedy_equals_naive_greedy_across_blocks():
    # 300 x 300 = 90000 entries: more than one block of the sorted scan.
    cost = np.random.default_rng(8).random((300, 280))
    i, j = pair_greedy(cost, n=250)
    c, ref = cost.copy(), []
    for _ in range(250):
        a, b = np.unravel_index(np.argmin(c), c.shape)
        ref.append((a, b))
        c[a, :] = np.inf
        c[:, b] = np.inf
    ref.sort()
    assert list(zip(i.tolist(), j.tolist())) == [(int(a), int(b)) for a, b in ref]


def test_pair_random_is_a_valid_matching():
    i, j = pair_random(6, 9, 5, np.random.default_rng(3))
    assert len(i) == 5 and valid(i, j, 6, 9)
    i2, j2 = pair_random(6, 9, 5, np.random.default_rng(4))
    assert (i.tolist(), j.tolist()) != (i2.tolist(), j2.tolist())


@pytest.mark.parametrize("kwargs", [{}, {"n": 2, "threshold": 1.0}, {"n": 5}, {"n": -1}])
def test_pairing_rejects_bad_stops(kwargs):
    for pair in (pair_greedy, pair_optimal):
        with pytest.raises(ValueError):
            pair(np.zeros((3, 4)), **kwargs)
