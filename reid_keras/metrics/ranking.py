"""CMC, mAP and mINP for Market-1501-style re-ID ranking (docs/protocols.md (a) and (f)).

Only the ranks of the true matches matter, so nothing of size Q x G is kept beyond one chunk of
queries. For each query the "special" gallery items are its own identity's images: hits (other
camera) and junk (same camera). Items with pid -1 are junk for every query: their distances are
set to +inf in the chunk, which puts them after every finite distance, so they never precede a
hit and need no per-query bookkeeping (distances are checked to be finite first).

For a special item with distance v at gallery column c, its 0-based position in the stable
ascending order is ``#(d < v) + #(d == v before c)``; its rank after junk removal subtracts the
query's junk items placed before it. Two ways to get ``#(d < v)``:

- ``method="sort"``: per query, sort the distances no larger than its farthest special item (the
  only ones that can precede a special item; all of G in the worst case) and binary-search each
  special value. ``np.sort`` of values is a SIMD sort, faster than ``np.argsort``; equal values
  are then ordered by gallery index, which is exactly the order of a stable argsort.
- ``method="sort_free"``: count the smaller distances directly, O(G * n) per query with n the
  query's number of special items, with no O(G log G) sort (docs/protocols.md (f), last paragraph).
"""
from __future__ import annotations

import numpy as np

from reid_keras.metrics.distances import GalleryIndex, chunk_rows

AP_VARIANTS = {"non-interpolated": "mAP (non-interpolated)", "trapezoid": "mAP (devkit trapezoid)"}
METHODS = ("sort", "sort_free")


def check_ids(values, name: str, length: int | None = None, length_name: str = "") -> np.ndarray:
    """1-D integer array of ids or cameras; ValueError naming `name` on a bad shape or length."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not (np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr))):
            raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    if length is not None and arr.shape[0] != length:
        raise ValueError(f"{name} has {arr.shape[0]} entries but {length_name} has {length} rows")
    return arr.astype(np.int64)


def _special_pairs(q_pids, q_cams, g_pids, g_cams):
    """All (query, gallery column) pairs with the same pid, grouped by query, columns ascending.

    Returns (ptr, cols, is_hit): the pairs of query i are ``ptr[i]:ptr[i+1]``.
    """
    order = np.argsort(g_pids, kind="stable")
    sorted_pids = g_pids[order]
    lo = np.searchsorted(sorted_pids, q_pids, side="left")
    hi = np.searchsorted(sorted_pids, q_pids, side="right")
    hi[q_pids == -1] = lo[q_pids == -1]  # a pid -1 query only has junk: leave it invalid
    counts = hi - lo
    ptr = np.zeros(q_pids.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=ptr[1:])
    within = np.arange(ptr[-1], dtype=np.int64) - np.repeat(ptr[:-1], counts)
    cols = order[np.repeat(lo, counts) + within]
    qidx = np.repeat(np.arange(q_pids.shape[0]), counts)
    is_hit = g_cams[cols] != q_cams[qidx]
    return ptr, cols, is_hit


def _tie_fix(row: np.ndarray, cols: np.ndarray, vals: np.ndarray, lt: np.ndarray,
             le: np.ndarray) -> np.ndarray:
    """Positions lt + (#equal values at lower columns); only tied values need the extra count."""
    pos = lt.copy()
    for j in np.flatnonzero(le - lt > 1):
        pos[j] += np.count_nonzero(row[:cols[j]] == vals[j])
    return pos


def _positions_sort(block, ptr, cols, vals):
    # Only items no farther than the query's farthest special item can precede one, so each row
    # sorts just those (all of them when the last match is last); the rest cannot move a rank.
    pos = np.empty(cols.shape[0], dtype=np.int64)
    for r in range(block.shape[0]):
        s = slice(ptr[r], ptr[r + 1])
        if s.start == s.stop:
            continue
        row, v = block[r], vals[s]
        head = np.sort(row[row <= v.max()])
        lt = np.searchsorted(head, v, side="left")
        le = np.searchsorted(head, v, side="right")
        pos[s] = _tie_fix(row, cols[s], v, lt, le)
    return pos


def _positions_sort_free(block, ptr, cols, vals):
    # One pass over the row per special item: items before column c count when <= v (ties go to
    # the lower index), items from c on only when < v. Faster than a broadcast (k, G) compare.
    pos = np.empty(cols.shape[0], dtype=np.int64)
    for r in range(block.shape[0]):
        row = block[r]
        for j in range(ptr[r], ptr[r + 1]):
            c, v = cols[j], vals[j]
            pos[j] = np.count_nonzero(row[:c] <= v) + np.count_nonzero(row[c:] < v)
    return pos


def _metrics_from_positions(ptr, pos, is_hit, ap: str) -> dict:
    """Per-query AP / INP / first-hit rank and the averages, from 0-based stable positions."""
    num_q = ptr.shape[0] - 1
    counts = np.diff(ptr)
    qidx = np.repeat(np.arange(num_q), counts)
    order = np.lexsort((pos, qidx))
    hit = is_hit[order]
    junk = (~hit).astype(np.int64)
    junk_before_all = np.concatenate([[0], np.cumsum(junk)])
    # junk of the same query placed before each item = exclusive cumsum minus the query's offset
    junk_before = junk_before_all[:-1] - np.repeat(junk_before_all[ptr[:-1]], counts)
    ranks = (pos[order] - junk_before + 1)[hit].astype(np.float64)
    hit_q = qidx[order][hit]
    n = np.bincount(hit_q, minlength=num_q)
    hit_ptr = np.concatenate([[0], np.cumsum(n)])
    i = (np.arange(ranks.shape[0]) - np.repeat(hit_ptr[:-1], n) + 1).astype(np.float64)
    precision = i / ranks
    if ap == "trapezoid":
        prev = np.ones_like(precision)
        later = ranks > 1
        prev[later] = (i[later] - 1) / (ranks[later] - 1)
        precision = (precision + prev) / 2
    valid = n > 0
    num_valid = int(valid.sum())
    ap_q = np.full(num_q, np.nan)
    inp_q = np.full(num_q, np.nan)
    first = np.full(num_q, -1, dtype=np.int64)
    if num_valid:
        ap_q[valid] = np.bincount(hit_q, weights=precision, minlength=num_q)[valid] / n[valid]
        inp_q[valid] = n[valid] / ranks[hit_ptr[1:][valid] - 1]
        first[valid] = ranks[hit_ptr[:-1][valid]].astype(np.int64)
    return {"ap": ap_q, "inp": inp_q, "first_hit_rank": first, "num_hits": n, "valid": valid}


def summarize(per_query: dict, max_rank: int, ap: str) -> dict:
    """CMC / mAP / mINP over valid queries; ValueError if there is none (docs/protocols.md (a) step 4)."""
    valid = per_query["valid"]
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(f"no valid query: none of the {valid.shape[0]} queries has a true match "
                         "in the gallery after junk removal (same id and camera, or id -1); "
                         "check query_pids/gallery_pids and the cameras")
    first = per_query["first_hit_rank"][valid]
    hist = np.bincount(np.minimum(first, max_rank + 1), minlength=max_rank + 2)
    cmc = np.cumsum(hist[1:max_rank + 1]) / num_valid
    return {
        "cmc": cmc,
        "mAP": float(per_query["ap"][valid].mean()),
        "mINP": float(per_query["inp"][valid].mean()),
        "num_valid_queries": num_valid,
        "num_invalid_queries": int(valid.shape[0] - num_valid),
        "ap_variant": AP_VARIANTS[ap],
        **per_query,
    }


def _check_options(max_rank, ap, method) -> None:
    if ap not in AP_VARIANTS:
        raise ValueError(f"ap must be one of {tuple(AP_VARIANTS)}, got {ap!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(max_rank, bool) or not isinstance(max_rank, (int, np.integer)) or max_rank < 1:
        raise ValueError(f"max_rank must be a positive integer, got {max_rank!r}")


def rank_queries(distmat=None, query_pids=None, gallery_pids=None, query_cams=None,
                 gallery_cams=None, ap: str = "non-interpolated", query_features=None,
                 gallery_features=None, metric: str = "cosine", memory_budget_mb: float = 1024,
                 method: str = "sort") -> dict:
    """Per-query results of `evaluate_ranking` (same arguments), without averaging or raising
    when no query is valid; protocols that merge several galleries build on it."""
    _check_options(1, ap, method)
    use_features = query_features is not None or gallery_features is not None
    if use_features == (distmat is not None):
        raise ValueError("give either distmat or both query_features and gallery_features")
    if use_features:
        if query_features is None or gallery_features is None:
            raise ValueError("query_features and gallery_features must be given together")
        index = GalleryIndex(gallery_features, metric)
        queries, q_aux = index.prepare_queries(query_features)
        num_q, num_g = queries.shape[0], len(index)
        q_name, g_name = "query_features", "gallery_features"
    else:
        distmat = np.asarray(distmat)
        if distmat.ndim != 2:
            raise ValueError("distmat must be a 2-D (num_query, num_gallery) array, "
                             f"got shape {distmat.shape}")
        if not np.issubdtype(distmat.dtype, np.number) or np.issubdtype(distmat.dtype, np.complexfloating):
            raise ValueError(f"distmat must hold real numbers, got dtype {distmat.dtype}")
        num_q, num_g = distmat.shape
        q_name, g_name = "distmat (axis 0)", "distmat (axis 1)"
    if num_q == 0:
        raise ValueError(f"no queries: {q_name} has 0 rows")
    if num_g == 0:
        raise ValueError(f"empty gallery: {g_name} has 0 rows")
    q_pids = check_ids(query_pids, "query_pids", num_q, q_name)
    q_cams = check_ids(query_cams, "query_cams", num_q, q_name)
    g_pids = check_ids(gallery_pids, "gallery_pids", num_g, g_name)
    g_cams = check_ids(gallery_cams, "gallery_cams", num_g, g_name)

    junk_cols = np.flatnonzero(g_pids == -1)
    ptr, cols, is_hit = _special_pairs(q_pids, q_cams, g_pids, g_cams)
    rows = chunk_rows(num_g, memory_budget_mb)  # a distmat is also sorted chunk by chunk
    positions = _positions_sort if method == "sort" else _positions_sort_free
    pos = np.empty(cols.shape[0], dtype=np.int64)
    for start in range(0, num_q, rows):
        stop = min(start + rows, num_q)
        if use_features:
            block = index.block(queries, q_aux, start, stop)
        else:
            block = distmat[start:stop]
            finite = np.isfinite(block)
            if not finite.all():
                bad = np.argwhere(~finite)[0]
                raise ValueError(f"distmat contains NaN or inf (first at row {start + bad[0]}, "
                                 f"column {bad[1]})")
            del finite
            if junk_cols.size:
                block = block.astype(np.result_type(block.dtype, np.float32))  # a copy to edit
        if junk_cols.size:
            block[:, junk_cols] = np.inf
        p0, p1 = ptr[start], ptr[stop]
        local_ptr = ptr[start:stop + 1] - p0
        local_q = np.repeat(np.arange(stop - start), np.diff(local_ptr))
        vals = block[local_q, cols[p0:p1]]
        pos[p0:p1] = positions(block, local_ptr, cols[p0:p1], vals)
        del block
    return _metrics_from_positions(ptr, pos, is_hit, ap)


def evaluate_ranking(distmat=None, query_pids=None, gallery_pids=None, query_cams=None,
                     gallery_cams=None, max_rank: int = 50, ap: str = "non-interpolated",
                     query_features=None, gallery_features=None, metric: str = "cosine",
                     memory_budget_mb: float = 1024, method: str = "sort") -> dict:
    """Market-1501 / Duke / MSMT17 / CUHK03-NP protocol (docs/protocols.md (a)).

    Args:
        distmat: (Q, G) distances, smaller = closer. Give it, or both feature matrices.
        query_pids, gallery_pids, query_cams, gallery_cams: 1-D integer arrays. Junk = same pid and
            camera as the query, or pid -1; distractors (pid 0) are ordinary negatives.
        max_rank: length of the CMC curve; short lists saturate (pad with 1).
        ap: "non-interpolated" (default) or "trapezoid" (the Market-1501 devkit value).
        query_features, gallery_features: used instead of `distmat`; distances (`metric`:
            "cosine" or "euclidean", see distances.py) are computed for chunks of
            B = memory_budget_mb / (22 G) queries (docs/protocols.md (f)) and give exactly the result of
            `evaluate_ranking(pairwise_distance(qf, gf, metric), ...)`.
        memory_budget_mb: MiB per chunk of queries (also bounds the work copy of a distmat).
        method: "sort" or "sort_free" (identical results; sort_free avoids O(G log G) per query).

    Returns:
        dict with `cmc` (float array, length max_rank, fractions), `mAP`, `mINP` (fractions),
        `num_valid_queries`, `num_invalid_queries`, `ap_variant`, and per-query arrays (length Q):
        `ap`, `inp` (NaN for invalid queries), `first_hit_rank` (1-based, -1 if invalid),
        `num_hits`, `valid`.

    Example:
        >>> r = evaluate_ranking([[0.1, 0.2, 0.3]], [1], [2, 1, 1], [0], [1, 0, 1])
        >>> r["cmc"][:3].tolist(), round(r["mAP"], 4)   # same-camera match at rank 2 is junk
        ([0.0, 1.0, 1.0], 0.5)
    """
    _check_options(max_rank, ap, method)
    per_query = rank_queries(distmat, query_pids, gallery_pids, query_cams, gallery_cams, ap=ap,
                             query_features=query_features, gallery_features=gallery_features,
                             metric=metric, memory_budget_mb=memory_budget_mb, method=method)
    return summarize(per_query, max_rank, ap)
