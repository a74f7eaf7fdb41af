"""k-reciprocal re-ranking against the classic dense algorithm, and query expansion."""
import numpy as np
import pytest

from reid_keras.metrics import pairwise_distance
from reid_keras.metrics.rerank import query_expansion, rerank_k_reciprocal


def classic_rerank(dist, num_q, k1, k2, lam):
    """The dense algorithm of Zhong et al. (CVPR 2017) as in its released code, written out with
    (N x N) arrays. `dist` is already the squared distance the code builds; ties stable."""
    orig = dist / dist.max(axis=1, keepdims=True)
    n = orig.shape[0]
    rank = np.argsort(orig, axis=1, kind="stable")

    def reciprocal(i, k):
        forward = rank[i, :k + 1]
        backward = rank[forward, :k + 1]
        return forward[np.any(backward == i, axis=1)]

    half = int(np.around(k1 / 2.0))
    V = np.zeros((n, n))
    for i in range(n):
        r = reciprocal(i, k1)
        expansion = list(r)
        for c in r:
            rc = reciprocal(c, half)
            if len(np.intersect1d(rc, r)) > 2.0 / 3.0 * len(rc):
                expansion.extend(rc)
        expansion = np.unique(expansion)
        w = np.exp(-orig[i, expansion])
        V[i, expansion] = w / w.sum()
    if k2 != 1:
        V = np.stack([V[rank[i, :k2]].mean(axis=0) for i in range(n)])
    inv_index = [np.flatnonzero(V[:, c]) for c in range(n)]
    jaccard = np.zeros((num_q, n))
    for i in range(num_q):
        tmp = np.zeros(n)
        for c in np.flatnonzero(V[i]):
            rows = inv_index[c]
            tmp[rows] += np.minimum(V[i, c], V[rows, c])
        jaccard[i] = 1 - tmp / (2 - tmp)
    return ((1 - lam) * jaccard + lam * orig[:num_q])[:, num_q:]


def clustered(rng, n, dim, centers):
    return (centers[rng.integers(0, len(centers), n)] + 0.6 * rng.standard_normal((n, dim))).astype(np.float32)


@pytest.mark.parametrize("num_q,num_g,dim,k1,k2,lam", [
    (30, 90, 8, 20, 6, 0.3),
    (20, 60, 4, 7, 3, 0.5),
    (25, 50, 6, 5, 1, 0.3),
    (40, 280, 8, 20, 6, 0.3),    # N = 320 > one 256-row distance chunk
])
def test_matches_classic_dense_algorithm(num_q, num_g, dim, k1, k2, lam):
    rng = np.random.default_rng(num_q + num_g)
    centers = rng.standard_normal((8, dim))
    qf, gf = clustered(rng, num_q, dim, centers), clustered(rng, num_g, dim, centers)
    x = np.concatenate([qf, gf])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dist = pairwise_distance(x, x, "euclidean").astype(np.float64)
    np.fill_diagonal(dist, 0.0)
    expected = classic_rerank(dist, num_q, k1, k2, lam)
    got = rerank_k_reciprocal(qf, gf, k1=k1, k2=k2, lambda_value=lam, memory_budget_mb=0.001)
    assert got.shape == (num_q, num_g) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # the memory budget only changes the grouping, never the numbers
    np.testing.assert_array_equal(rerank_k_reciprocal(qf, gf, k1=k1, k2=k2, lambda_value=lam), got)


def test_lambda_one_leaves_the_row_normalised_distance():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((6, 8)) * 0.8
    qf, gf = clustered(rng, 20, 8, centers), clustered(rng, 120, 8, centers)
    x = np.concatenate([qf, gf])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    d = pairwise_distance(x, x, "euclidean").astype(np.float64)
    np.fill_diagonal(d, 0.0)
    only_d = rerank_k_reciprocal(qf, gf, lambda_value=1.0)
    np.testing.assert_allclose(only_d, (d / d.max(axis=1, keepdims=True))[:20, 20:], atol=1e-6)


def test_query_expansion_average_and_alpha():
    rng = np.random.default_rng(1)
    qf, gf = rng.standard_normal((7, 5)), rng.standard_normal((40, 5))
    qn = qf / np.linalg.norm(qf, axis=1, keepdims=True)
    gn = gf / np.linalg.norm(gf, axis=1, keepdims=True)
    sims = qn @ gn.T
    top = np.argsort(1 - sims, axis=1, kind="stable")[:, :3]
    plain = qn + gn[top].sum(axis=1)
    plain /= np.linalg.norm(plain, axis=1, keepdims=True)
    np.testing.assert_allclose(query_expansion(qf, gf, top_k=3), plain, atol=1e-5)
    w = np.maximum(np.take_along_axis(sims, top, axis=1), 0) ** 3
    alpha = qn + (w[:, :, None] * gn[top]).sum(axis=1)
    alpha /= np.linalg.norm(alpha, axis=1, keepdims=True)
    out = query_expansion(qf, gf, top_k=3, alpha=3.0)
    np.testing.assert_allclose(out, alpha, atol=1e-5)
    assert out.dtype == np.float32 and out.shape == (7, 5)


@pytest.mark.parametrize("kwargs,match", [
    (dict(k1=200), "must not exceed"),
    (dict(k2=0), "k2 must be a positive integer"),
    (dict(lambda_value=1.5), "lambda_value must be in"),
])
def test_rerank_bad_arguments(kwargs, match):
    rng = np.random.default_rng(2)
    with pytest.raises(ValueError, match=match):
        rerank_k_reciprocal(rng.standard_normal((5, 3)), rng.standard_normal((20, 3)), **kwargs)


def test_bad_features():
    good = np.ones((4, 3))
    with pytest.raises(ValueError, match="query_features contains NaN"):
        rerank_k_reciprocal(np.full((4, 3), np.nan), np.ones((30, 3)), k1=3)
    with pytest.raises(ValueError, match="gallery_features has feature dimension 2"):
        query_expansion(good, np.ones((5, 2)))
    with pytest.raises(ValueError, match="gallery_features is empty"):
        query_expansion(good, np.ones((0, 3)))
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        query_expansion(good, good, top_k=0)


def test_neighbour_lists_are_stable_and_chunk_independent():
    from reid_keras.metrics.rerank import _expanded_sets, _reciprocal, _stable_topk

    rng = np.random.default_rng(5)
    d = np.round(rng.random((90, 90)), 1)                  # many ties
    top = _stable_topk(d, 21)
    np.testing.assert_array_equal(top, np.argsort(d, axis=1, kind="stable")[:, :21])
    top = top.astype(np.int32)
    np.testing.assert_array_equal(_reciprocal(top, 20), _reciprocal(top, 20, chunk=7))
    for whole, chunked in zip(_expanded_sets(top, 20), _expanded_sets(top, 20, chunk=7)):
        np.testing.assert_array_equal(whole, chunked)
