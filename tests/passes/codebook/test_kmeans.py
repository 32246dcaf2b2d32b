"""batched_kmeans: the k-means per depth segment of NeuralMerger's codebooks (eq. 8)."""

import numpy as np
import pytest
from sklearn.cluster import KMeans

import onnxmerge.passes.codebook._kmeans as kmeans
from onnxmerge.passes.codebook._kmeans import KMeansResult, batched_kmeans


def mixture(rng, segments, vectors, r, clusters, spread=4.0, noise=0.5):
    """[segments, vectors, r] float32 drawn from a Gaussian mixture per segment."""
    centres = rng.normal(0, spread, (segments, clusters, r))
    which = rng.integers(0, clusters, (segments, vectors))
    x = centres[np.arange(segments)[:, None], which] + rng.normal(0, noise, (segments, vectors, r))
    return x.astype(np.float32)


def direct_error(x, res):
    """Sum over each segment of ||x - codebook[label]||^2, in float64."""
    picked = np.take_along_axis(res.codebooks, res.labels[:, :, None], axis=1)
    return np.square(x.astype(np.float64) - picked).sum(axis=(1, 2))


def check_shapes(x, c, res):
    v, m, r = x.shape
    assert isinstance(res, KMeansResult)
    assert res.codebooks.shape == (v, c, r) and res.codebooks.dtype == np.float32
    assert res.labels.shape == (v, m) and res.labels.dtype == np.int64
    assert res.error.shape == (v,) and res.error.dtype == np.float64
    assert res.exact.shape == (v,) and res.exact.dtype == bool
    assert np.isfinite(res.codebooks).all() and np.isfinite(res.error).all()
    assert res.labels.min() >= 0 and res.labels.max() < c
    assert res.seconds >= 0


def test_agrees_with_scikit_learn():
    x = mixture(np.random.default_rng(1), 3, 400, 4, 8)
    res = batched_kmeans(x, 8)
    check_shapes(x, 8, res)
    assert not res.exact.any()
    for v in range(3):
        reference = KMeans(n_clusters=8, n_init=3, random_state=0).fit(x[v]).inertia_
        assert res.error[v] <= 1.02 * reference, (v, res.error[v], reference)
    # error is the inertia of the returned codebooks and labels
    np.testing.assert_allclose(res.error, direct_error(x, res), rtol=1e-5)


def test_unclustered_data_close_to_scikit_learn():
    x = np.random.default_rng(2).standard_normal((2, 600, 3)).astype(np.float32)
    res = batched_kmeans(x, 12)
    for v in range(2):
        reference = KMeans(n_clusters=12, n_init=3, random_state=0).fit(x[v]).inertia_
        assert res.error[v] <= 1.03 * reference, (v, res.error[v], reference)


def test_segments_with_at_most_c_distinct_vectors_are_exact():
    rng = np.random.default_rng(3)
    c = 8
    distinct = rng.standard_normal((3, c, 4)).astype(np.float32)
    counts = [5, 6, c]  # distinct vectors used per exact segment (the last: exactly C)
    few = np.stack([distinct[k, rng.permutation(np.arange(300) % counts[k])] for k in range(3)])
    few[0, ::7] = distinct[0, 0]  # more duplicates
    signed = np.zeros((1, 300, 4), np.float32)
    signed[0, ::2, 1] = -0.0  # -0.0 and 0.0 are different bit patterns: 2 distinct vectors
    many = mixture(rng, 2, 300, 4, 8)
    x = np.concatenate([few[:2], many[:1], few[2:], signed, many[1:]])
    res = batched_kmeans(x, c)
    check_shapes(x, c, res)
    assert res.exact.tolist() == [True, True, False, True, True, False]
    for v in np.flatnonzero(res.exact):
        assert res.error[v] == 0
        # every vector's codeword is the vector itself, bit for bit
        np.testing.assert_array_equal(res.codebooks[v][res.labels[v]].view(np.uint32), x[v].view(np.uint32))
        # the codewords are the distinct vectors; spare slots repeat them
        words = {row.tobytes() for row in res.codebooks[v]}
        assert words == {row.tobytes() for row in x[v]}
    assert (res.error[~res.exact] > 0).all()


def test_fewer_vectors_than_codewords():
    x = np.random.default_rng(4).standard_normal((5, 3, 2))  # float64: cast to float32
    res = batched_kmeans(x, 8)
    check_shapes(x, 8, res)
    assert res.exact.all() and (res.error == 0).all()
    x32 = x.astype(np.float32)
    np.testing.assert_array_equal(np.take_along_axis(res.codebooks, res.labels[:, :, None], axis=1), x32)


def test_key_collisions_fall_back_to_an_exact_count(monkeypatch):
    # With every row hashed to the same key, equal rows are no longer adjacent after sorting; the
    # check row by row must still decide exactly.
    monkeypatch.setattr(kmeans, "_row_keys", lambda bits: np.zeros(bits.shape[:2], np.uint64))
    a, b, c = np.eye(3, dtype=np.float32)
    alternating = np.stack([a, b] * 20)  # 2 distinct, 40 changes of row
    blocks = np.stack([a] * 10 + [b] * 10 + [a] * 10 + [c] * 10)  # 3 distinct, 4 runs
    spread = np.random.default_rng(5).standard_normal((40, 3)).astype(np.float32)  # 40 distinct
    x = np.stack([alternating, blocks, spread])
    res = batched_kmeans(x, 4)
    assert res.exact.tolist() == [True, True, False]
    for v in (0, 1):
        assert res.error[v] == 0
        np.testing.assert_array_equal(res.codebooks[v][res.labels[v]], x[v])


def test_deterministic_and_independent_of_chunking(monkeypatch):
    rng = np.random.default_rng(6)
    x = np.concatenate([mixture(rng, 4, 300, 4, 8), rng.standard_normal((3, 300, 4)).astype(np.float32)])
    x[5] = x[5, :1]  # one exact segment among the others
    runs = [batched_kmeans(x, 8, seed=5), batched_kmeans(x, 8, seed=5),
            batched_kmeans(x, 8, seed=5, max_bytes=1)]  # one segment per chunk, on the threads
    monkeypatch.setattr(kmeans, "_workers", lambda n: 1)
    runs.append(batched_kmeans(x, 8, seed=5))  # all segments in one chunk
    for other in runs[1:]:
        for name in ("codebooks", "labels", "error", "exact"):
            np.testing.assert_array_equal(getattr(other, name), getattr(runs[0], name))
    assert not np.array_equal(batched_kmeans(x, 8, seed=6).codebooks, runs[0].codebooks)


def test_chunking_with_several_column_blocks():
    # More vectors than one distance block holds: the blocks split the vectors of a segment.
    x = np.random.default_rng(7).standard_normal((3, 2500, 3)).astype(np.float32)
    whole = batched_kmeans(x, 64, n_init=1, max_iter=5)
    single = batched_kmeans(x, 64, n_init=1, max_iter=5, max_bytes=1)
    np.testing.assert_array_equal(whole.labels, single.labels)
    np.testing.assert_array_equal(whole.codebooks, single.codebooks)


def test_best_of_n_init_per_segment():
    x = np.random.default_rng(8).standard_normal((8, 500, 4)).astype(np.float32)
    one = batched_kmeans(x, 16, n_init=1, seed=3)
    three = batched_kmeans(x, 16, n_init=3, seed=3)
    assert (three.error <= one.error).all()
    assert (three.error < one.error).any()


def test_no_empty_or_invalid_codewords():
    rng = np.random.default_rng(9)
    c = 8
    x = rng.standard_normal((4, c + 1, 3)).astype(np.float32)  # one vector more than codewords
    res = batched_kmeans(x, c)
    check_shapes(x, c, res)
    assert not res.exact.any()
    # the best merges the closest pair: its error is half that pair's squared distance
    gaps = np.square(x[:, :, None] - x[:, None, :]).sum(-1) + np.diag(np.full(c + 1, np.inf))
    assert (res.error >= gaps.min(axis=(1, 2)) / 2 * (1 - 1e-5)).all()
    assert len(np.unique(res.labels[0])) == c  # every codeword in use


def test_empty_clusters_are_reseeded(monkeypatch):
    # A seeding with every centre on the same vector leaves all clusters but the first empty.
    monkeypatch.setattr(kmeans, "_kmeans_pp", lambda xt, first, u: np.repeat(
        xt[:, None, :-1, 0], u.shape[1] + 1, axis=1))
    x = mixture(np.random.default_rng(10), 2, 200, 3, 4)
    res = batched_kmeans(x, 4, n_init=1)
    check_shapes(x, 4, res)
    for v in range(2):
        assert len(np.unique(res.labels[v])) == 4
        assert res.error[v] < 0.5 * np.square(x[v] - x[v].mean(axis=0)).sum()


@pytest.mark.parametrize("x, c, kwargs, message", [
    (np.zeros((4, 3)), 2, {}, "3-D"),
    (np.zeros((1, 4, 2, 1)), 2, {}, "3-D"),
    (np.full((1, 4, 2), np.nan), 2, {}, "NaN"),
    (np.array([[[1.0, np.inf]]]), 2, {}, "infinite"),
    (np.full((1, 2, 2), 1e300), 2, {}, "float32"),
    (np.zeros((1, 4, 2), complex), 2, {}, "real"),
    (np.zeros((1, 0, 2)), 2, {}, "at least one vector"),
    (np.zeros((1, 4, 0)), 2, {}, "at least one vector"),
    (np.zeros((1, 4, 2)), 0, {}, "n_codewords"),
    (np.zeros((1, 4, 2)), 2.5, {}, "n_codewords"),
    (np.zeros((1, 4, 2)), 2, {"n_init": 0}, "n_init"),
    (np.zeros((1, 4, 2)), 2, {"max_iter": 0}, "max_iter"),
    (np.zeros((1, 4, 2)), 2, {"tol": -1.0}, "tol"),
    (np.zeros((1, 4, 2)), 2, {"seed": -1}, "seed"),
    (np.zeros((1, 4, 2)), 2, {"max_bytes": 0}, "max_bytes"),
])
def test_invalid_arguments(x, c, kwargs, message):
    with pytest.raises(ValueError, match=message):
        batched_kmeans(x, c, **kwargs)


def test_no_segments():
    res = batched_kmeans(np.zeros((0, 5, 3), np.float32), 4)
    assert res.codebooks.shape == (0, 4, 3) and res.labels.shape == (0, 5) and res.error.shape == (0,)


def test_big_layer_labels_are_the_nearest_codewords():
    rng = np.random.default_rng(11)
    v, m, r, c = 256, 4096, 8, 64
    x = rng.standard_normal((v, m, r), dtype=np.float32) * rng.uniform(0.5, 2, (v, 1, r)).astype(np.float32)
    x += rng.normal(0, 3, (v, 1, r)).astype(np.float32)  # an offset per segment
    res = batched_kmeans(x, c, n_init=1, max_iter=8)
    check_shapes(x, c, res)
    assert not res.exact.any()
    for lo in range(0, v, 32):
        xs, books = x[lo:lo + 32].astype(np.float64), res.codebooks[lo:lo + 32].astype(np.float64)
        dist = (np.square(xs).sum(-1)[:, :, None] - 2 * xs @ books.transpose(0, 2, 1)
                + np.square(books).sum(-1)[:, None, :])
        own = np.take_along_axis(dist, res.labels[lo:lo + 32, :, None], axis=2)[:, :, 0]
        # the label is the nearest codeword, up to float32 rounding of the distances
        assert (own - dist.min(axis=2) <= 1e-5 * np.square(xs - xs.mean(1, keepdims=True)).sum(-1).max()).all()
        assert (dist.argmin(axis=2) == res.labels[lo:lo + 32]).mean() > 0.999
    np.testing.assert_allclose(res.error, direct_error(x, res), rtol=1e-5)
