"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) and query expansion, in bounded memory.

Re-ranking as in the paper and its released code, with distances d(i, j) = squared Euclidean
distance of the L2-normalised features (the code squares Euclidean distances), divided by the
row maximum over all Q + G images. Neighbour lists come from a stable sort (ties: lower index
first; the released code's `argsort` leaves tie order unspecified).

The released code holds several (Q+G)^2 dense arrays (distances, ranks, V, its expansion). Here
only these are kept, for N = Q + G images of dimension D:

- the normalised features, N x D float32, and the row maxima;
- the top-(k1+1) neighbour lists, N x (k1+1) int32 (from chunks of B x N distances, B from
  `memory_budget_mb` as in distances.chunk_rows);
- V and its local expansion V_qe as sparse matrices: about N * |R*| and N * k2 * |R*| nonzeros,
  |R*| <= (k1+1) * (round(k1/2)+2), typically 20-60;
- the Jaccard distances, built for groups of queries whose sparse work fits the budget;
- the output, Q x G float32, which is the only quadratic array.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from reid_keras.metrics.distances import GalleryIndex, check_features, chunk_rows


def _stable_topk(block: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k smallest values per row, ascending, ties to the lower column."""
    k = min(k, block.shape[1])
    kth = np.partition(block, k - 1, axis=1)[:, k - 1]
    rows, cols = np.nonzero(block <= kth[:, None])
    order = np.lexsort((cols, block[rows, cols], rows))
    rows, cols = rows[order], cols[order]
    starts = np.searchsorted(rows, np.arange(block.shape[0]))
    take = starts[:, None] + np.arange(k)[None, :]
    return cols[take]


def _normalized(features, name: str, dim: int | None = None) -> np.ndarray:
    x = check_features(features, name, dim, "query_features")
    norms = np.linalg.norm(x, axis=1)
    if (norms == 0).any():
        raise ValueError(f"{name} row {int(np.flatnonzero(norms == 0)[0])} has zero norm")
    return (x / norms[:, None]).astype(np.float32)


def query_expansion(query_features, gallery_features, top_k: int = 5, alpha: float = 0.0,
                    memory_budget_mb: float = 1024) -> np.ndarray:
    """Average query expansion: each query becomes the mean of itself and its top_k gallery
    neighbours (cosine, stable order), all L2-normalised, then re-normalised (AQE, Chum et al.
    ICCV 2007). With alpha > 0 the neighbours are weighted by max(cos, 0)**alpha (alpha-QE,
    Radenovic et al. TPAMI 2018); the query keeps weight 1.

    Returns:
        (Q, D) float32 expanded query features, unit norm.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    q = _normalized(query_features, "query_features")
    g = _normalized(gallery_features, "gallery_features", q.shape[1])
    index = GalleryIndex(g, "cosine")
    queries, _ = index.prepare_queries(q)
    rows = chunk_rows(len(index), memory_budget_mb)
    out = np.empty_like(q)
    for start in range(0, q.shape[0], rows):
        stop = min(start + rows, q.shape[0])
        block = index.block(queries, None, start, stop)
        top = _stable_topk(block, top_k)
        if alpha > 0:
            cos = 1.0 - np.take_along_axis(block, top, axis=1).astype(np.float64)
            weights = np.maximum(cos, 0.0) ** alpha
        else:
            weights = np.ones(top.shape)
        new = q[start:stop].astype(np.float64)
        for t in range(top.shape[1]):
            new += weights[:, t, None] * g[top[:, t]]
        out[start:stop] = new / np.linalg.norm(new, axis=1, keepdims=True)
    return out


def _reciprocal(top: np.ndarray, k: int, chunk: int = 4096) -> np.ndarray:
    """Mask (N, k+1): top[i, t] is a k-reciprocal neighbour of i (i is in its top k+1)."""
    forward = top[:, :k + 1]
    mask = np.zeros(forward.shape, dtype=bool)
    for a in range(0, top.shape[0], chunk):
        f = forward[a:a + chunk]
        me = np.arange(a, a + f.shape[0])[:, None, None]
        mask[a:a + chunk] = (top[f, :k + 1] == me).any(axis=2)
    return mask


def _expanded_sets(top: np.ndarray, k1: int, chunk: int = 2048):
    """R*(i, k1) of the paper (Eq. 9 to 10) for every image, as sorted (row, column) pairs."""
    half = int(np.around(k1 / 2.0))
    r_full = np.where(_reciprocal(top, k1), top[:, :k1 + 1], -1)     # R(i, k1), -1 = empty
    r_half = np.where(_reciprocal(top, half), top[:, :half + 1], -2)  # R(c, k1/2), -2 = empty
    half_size = (r_half >= 0).sum(axis=1)
    rows_out, cols_out = [], []
    for a in range(0, top.shape[0], chunk):
        rf = r_full[a:a + chunk]                                      # (b, k1+1)
        cand = np.maximum(rf, 0)
        rh = r_half[cand]                                             # (b, k1+1, half+1)
        common = (rh[:, :, :, None] == rf[:, None, None, :]).any(axis=3).sum(axis=2)
        take = (rf >= 0) & (common > 2.0 / 3.0 * half_size[cand])
        b = rf.shape[0]
        row_ids = np.arange(a, a + b)
        r1 = np.repeat(row_ids, rf.shape[1])[rf.reshape(-1) >= 0]
        c1 = rf.reshape(-1)[rf.reshape(-1) >= 0]
        extra = np.where(take[:, :, None], rh, -2).reshape(b, -1)
        r2 = np.repeat(row_ids, extra.shape[1])[extra.reshape(-1) >= 0]
        c2 = extra.reshape(-1)[extra.reshape(-1) >= 0]
        key = np.unique(np.concatenate([r1, r2]).astype(np.int64) * top.shape[0]
                        + np.concatenate([c1, c2]))
        rows_out.append(key // top.shape[0])
        cols_out.append(key % top.shape[0])
    return np.concatenate(rows_out), np.concatenate(cols_out)


def _jaccard_rows(vq: sp.csr_matrix, vg_csc: sp.csc_matrix, max_terms: int,
                  max_rows: int) -> np.ndarray:
    """sum_k min(vq[i, k], vg[j, k]) for all rows i of vq and j of vg, in groups of at most
    `max_rows` queries with at most `max_terms` (i, j, k) terms (unless one query has more)."""
    num_q, num_g = vq.shape[0], vg_csc.shape[0]
    col_len = np.diff(vg_csc.indptr)
    out = np.empty((num_q, num_g), dtype=np.float64)
    terms = np.concatenate([[0], np.cumsum(col_len[vq.indices])])[vq.indptr]  # per query start
    a = 0
    while a < num_q:
        b = max(a + 1, int(np.searchsorted(terms, terms[a] + max_terms, side="right")) - 1)
        b = min(b, num_q, a + max_rows)
        e0, e1 = vq.indptr[a], vq.indptr[b]
        cols, vals = vq.indices[e0:e1], vq.data[e0:e1]
        qrow = np.repeat(np.arange(b - a), np.diff(vq.indptr[a:b + 1]))
        lens = col_len[cols]
        pos = np.repeat(vg_csc.indptr[cols] - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())
        mins = np.minimum(np.repeat(vals, lens), vg_csc.data[pos])
        flat = np.repeat(qrow, lens) * num_g + vg_csc.indices[pos]
        out[a:b] = np.bincount(flat, weights=mins, minlength=(b - a) * num_g).reshape(b - a, num_g)
        a = b
    return out


def rerank_k_reciprocal(query_features, gallery_features, k1: int = 20, k2: int = 6,
                        lambda_value: float = 0.3, memory_budget_mb: float = 1024) -> np.ndarray:
    """k-reciprocal re-ranked distances (Zhong et al. CVPR 2017, Eq. 12 to 14), (Q, G) float32.

    final = (1 - lambda) * Jaccard(V_qe) + lambda * d, with d the row-normalised squared
    Euclidean distance of the L2-normalised features (module docstring for the memory bound).
    """
    for name, value in (("k1", k1), ("k2", k2)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value!r}")
    q = _normalized(query_features, "query_features")
    g = _normalized(gallery_features, "gallery_features", q.shape[1])
    x = np.concatenate([q, g])
    n, num_q = x.shape[0], q.shape[0]
    if k1 + 1 > n or k2 > n:
        raise ValueError(f"k1 + 1 = {k1 + 1} and k2 = {k2} must not exceed the {n} query + gallery images")
    index = GalleryIndex(x, "euclidean")
    rows_x, aux = index.prepare_queries(x)
    row_max = np.empty(n)
    top = np.empty((n, max(k1 + 1, k2)), dtype=np.int32)
    final = np.empty((num_q, n - num_q), dtype=np.float32)
    step = chunk_rows(n, memory_budget_mb)
    for a in range(0, n, step):
        b = min(a + step, n)
        block = index.block(rows_x, aux, a, b)
        block[np.arange(b - a), np.arange(a, b)] = 0.0          # an image is at distance 0 from itself
        row_max[a:b] = block.max(axis=1)
        top[a:b] = _stable_topk(block, top.shape[1])
        if a < num_q:
            final[a:min(b, num_q)] = block[:min(b, num_q) - a, num_q:]
    row_max[row_max == 0] = 1.0                                 # all images identical: keep d = 0

    rows, cols = _expanded_sets(top, k1)
    dist = np.empty(rows.shape[0])
    step = max(1, 2**22 // x.shape[1])                         # pairs per gather: 32 MB float64 each
    for a in range(0, rows.shape[0], step):
        diff = x[rows[a:a + step]].astype(np.float64) - x[cols[a:a + step]]
        dist[a:a + step] = np.einsum("ij,ij->i", diff, diff)
    weight = np.exp(-dist / row_max[rows])
    weight /= np.bincount(rows, weights=weight, minlength=n)[rows]
    v = sp.csr_matrix((weight, (rows, cols)), shape=(n, n))
    if k2 != 1:
        qe = sp.csr_matrix((np.full(n * k2, 1.0 / k2), (np.repeat(np.arange(n), k2), top[:, :k2].ravel())),
                           shape=(n, n))
        v = (qe @ v).tocsr()
    v.sort_indices()
    budget = memory_budget_mb * 2**20
    max_terms = max(1, int(budget // 40))                      # int64 index + 4 float64 per term
    max_rows = max(1, int(budget // (16 * (n - num_q))))      # dense float64 sums + bincount copy
    overlap = _jaccard_rows(v[:num_q], v[num_q:].tocsc(), max_terms, max_rows)
    jaccard = 1.0 - overlap / (2.0 - overlap)
    d_qg = final.astype(np.float64) / row_max[:num_q, None]
    return ((1.0 - lambda_value) * jaccard + lambda_value * d_qg).astype(np.float32)
