"""Classic CUHK03 (docs/protocols.md (b)) and CUHK01 EfficientNet-paper (docs/protocols.md (c)) protocols.

Both rank a gallery holding exactly one true match per query, so the rank r of that match gives
CMC, and AP = 1/r. Ties are broken as a stable sort would: the lower gallery index comes first.
"""
from __future__ import annotations

import numpy as np

from reid_keras.metrics.distances import check_features, pairwise_distance
from reid_keras.metrics.ranking import check_ids, rank_queries, summarize

CUHK03_MODES = ("single_shot", "multi_shot")
DIRECTIONS = ("A->B", "B->A")


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _match_ranks(scores: np.ndarray, match_col: np.ndarray, present: np.ndarray,
                 gallery_index: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """1-based rank of column `match_col[i]` in row i, over the `present` columns only.

    `gallery_index` (same shape as scores) breaks ties: lower index first (stable sort order).
    """
    rows = np.arange(scores.shape[0])
    m_score = scores[rows, match_col][:, None]
    m_index = gallery_index[rows, match_col][:, None]
    better = scores > m_score if higher_is_better else scores < m_score
    before = better | ((scores == m_score) & (gallery_index < m_index))
    return 1 + np.count_nonzero(before & present, axis=1)


def _cmc(ranks: np.ndarray, max_rank: int) -> np.ndarray:
    hist = np.bincount(np.minimum(ranks, max_rank + 1), minlength=max_rank + 2)
    return np.cumsum(hist[1:max_rank + 1]) / ranks.shape[0]


def _distances(distmat, query_features, gallery_features, metric):
    if (distmat is None) == (query_features is None or gallery_features is None):
        raise ValueError("give either distmat or both query_features and gallery_features")
    if distmat is None:
        return pairwise_distance(query_features, gallery_features, metric)
    distmat = np.asarray(distmat)
    if distmat.ndim != 2 or 0 in distmat.shape:
        raise ValueError(f"distmat must be a non-empty 2-D (num_query, num_gallery) array, "
                         f"got shape {distmat.shape}")
    if not np.issubdtype(distmat.dtype, np.number) or not np.isfinite(distmat).all():
        raise ValueError("distmat must be numeric and finite (found NaN/inf or a non-number)")
    return distmat


def draw_single_shot_gallery(query_cams, gallery_pids, gallery_cams, seed: int = 0,
                             split_index: int = 0, repeat: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Single-shot CUHK03 galleries of one repeat (docs/protocols.md (b)).

    For every query, one gallery image per test id (the sorted distinct gallery pids), drawn
    uniformly from that id's images in the query's *other* view, with a generator seeded by
    (seed, split_index, repeat).

    Returns:
        (ids, chosen): `chosen[i, k]` is the gallery index drawn for query i and id `ids[k]`, or
        -1 when that id has no image in the other view.
    """
    q_cams = check_ids(query_cams, "query_cams")
    g_pids = check_ids(gallery_pids, "gallery_pids")
    g_cams = check_ids(gallery_cams, "gallery_cams", g_pids.shape[0], "gallery_pids")
    for name, cams in (("query_cams", q_cams), ("gallery_cams", g_cams)):
        if not np.isin(cams, (0, 1)).all():
            raise ValueError(f"{name} must be the CUHK03 view, 0 or 1; "
                             f"found {sorted(set(cams.tolist()) - {0, 1})[:5]}")
    ids = np.unique(g_pids)
    # gallery indices sorted by (view, pid, index): each (view, id) is one contiguous slice
    order = np.lexsort((np.arange(g_pids.shape[0]), g_pids, g_cams))
    key = g_cams[order] * (ids.shape[0] + 1) + np.searchsorted(ids, g_pids[order])
    wanted = np.arange(ids.shape[0])
    lo = np.stack([np.searchsorted(key, v * (ids.shape[0] + 1) + wanted, side="left") for v in (0, 1)])
    hi = np.stack([np.searchsorted(key, v * (ids.shape[0] + 1) + wanted, side="right") for v in (0, 1)])
    other = 1 - q_cams
    starts, counts = lo[other], (hi - lo)[other]          # (Q, num_ids), in the query's other view
    rng = np.random.default_rng([seed, split_index, repeat])
    pick = rng.integers(0, np.maximum(counts, 1))
    chosen = order[np.minimum(starts + pick, order.shape[0] - 1)]
    return ids, np.where(counts > 0, chosen, -1)


def _cuhk03_single_shot(dist, q_pids, q_cams, g_pids, g_cams, repeats, seed, split_index, max_rank):
    cmcs, maps = [], []
    for t in range(repeats):
        ids, chosen = draw_single_shot_gallery(q_cams, g_pids, g_cams, seed, split_index, t)
        q_col = np.minimum(np.searchsorted(ids, q_pids), ids.shape[0] - 1)
        valid = (ids[q_col] == q_pids) & (chosen[np.arange(q_pids.shape[0]), q_col] >= 0)
        if not valid.any():
            raise ValueError("no valid query: no query id has an image in the other view of the "
                             "gallery (check query_cams/gallery_cams are views 0/1 and the pids)")
        chosen = chosen[valid]
        scores = np.take_along_axis(dist[valid], np.maximum(chosen, 0), axis=1)
        ranks = _match_ranks(scores, q_col[valid], chosen >= 0, chosen, higher_is_better=False)
        cmcs.append(_cmc(ranks, max_rank))
        maps.append(float(np.mean(1.0 / ranks)))
    cmcs = np.array(cmcs)
    return {
        "cmc": cmcs.mean(axis=0), "mAP": float(np.mean(maps)), "mINP": float(np.mean(maps)),
        "cmc_per_repeat": cmcs, "mAP_per_repeat": np.array(maps),
        "num_valid_queries": int(valid.sum()), "num_invalid_queries": int((~valid).sum()),
        "ap_variant": "AP = 1/r (single-shot, one true match)",
    }


def evaluate_cuhk03(distmat=None, query_pids=None, gallery_pids=None, query_cams=None,
                    gallery_cams=None, mode: str = "single_shot", repeats: int = 10, seed: int = 0,
                    split_index: int = 0, max_rank: int = 50, query_features=None,
                    gallery_features=None, metric: str = "cosine") -> dict:
    """Classic CUHK03 evaluation of one of the 20 splits (docs/protocols.md (b)).

    Args:
        distmat / query_features + gallery_features: distances (smaller = closer) or features.
            Usually query = gallery = every test image of the split.
        query_pids, gallery_pids: 1-D integer ids. query_cams, gallery_cams: the view, 0 or 1.
        mode: "single_shot": for repeat t (generator seeded with (seed, split_index, t)) each query
            gets its own gallery of one random image per test id from the other view; AP = 1/r.
            "multi_shot": gallery = every gallery image of the other view, metrics as in (a).
        repeats: single-shot repeats averaged (ignored for multi_shot).

    Returns:
        dict with `cmc` (length max_rank), `mAP`, `mINP`, `num_valid_queries`,
        `num_invalid_queries`, `ap_variant`, `mode`, `repeats`, `seed`, `split_index`; single-shot
        adds `cmc_per_repeat` and `mAP_per_repeat`, multi-shot the per-query arrays of (a).
        Average splits with `aggregate_splits`.
    """
    if mode not in CUHK03_MODES:
        raise ValueError(f"mode must be one of {CUHK03_MODES}, got {mode!r}")
    repeats = _positive_int(repeats, "repeats")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(split_index, bool) or not isinstance(split_index, (int, np.integer)) or split_index < 0:
        raise ValueError(f"split_index must be a non-negative integer, got {split_index!r}")
    max_rank = _positive_int(max_rank, "max_rank")
    dist = _distances(distmat, query_features, gallery_features, metric)
    num_q, num_g = dist.shape
    q_pids = check_ids(query_pids, "query_pids", num_q, "the query axis")
    g_pids = check_ids(gallery_pids, "gallery_pids", num_g, "the gallery axis")
    q_cams = check_ids(query_cams, "query_cams", num_q, "the query axis")
    g_cams = check_ids(gallery_cams, "gallery_cams", num_g, "the gallery axis")
    for name, cams in (("query_cams", q_cams), ("gallery_cams", g_cams)):
        if not np.isin(cams, (0, 1)).all():
            raise ValueError(f"{name} must be the CUHK03 view, 0 or 1; "
                             f"found {sorted(set(cams.tolist()) - {0, 1})[:5]}")
    info = {"mode": mode, "repeats": repeats if mode == "single_shot" else 1, "seed": seed,
            "split_index": split_index}
    if mode == "single_shot":
        result = _cuhk03_single_shot(dist, q_pids, q_cams, g_pids, g_cams, repeats, seed,
                                     split_index, max_rank)
        return {**result, **info}
    per_query = {"ap": np.full(num_q, np.nan), "inp": np.full(num_q, np.nan),
                 "first_hit_rank": np.full(num_q, -1, dtype=np.int64),
                 "num_hits": np.zeros(num_q, dtype=np.int64), "valid": np.zeros(num_q, dtype=bool)}
    for view in (0, 1):
        rows, cols = np.flatnonzero(q_cams == view), np.flatnonzero(g_cams != view)
        if rows.size == 0 or cols.size == 0:
            continue
        part = rank_queries(dist[np.ix_(rows, cols)], q_pids[rows], g_pids[cols], q_cams[rows],
                            g_cams[cols])
        for key in per_query:
            per_query[key][rows] = part[key]
    return {**summarize(per_query, max_rank, "non-interpolated"), **info}


def aggregate_splits(results: list[dict], ranks=(1, 5, 10, 20)) -> dict:
    """Mean and std (ddof=1) over splits of rank-k CMC (fractions) and mAP, with the count."""
    if not results:
        raise ValueError("results is empty: pass one evaluate_cuhk03 result per split")
    cmc = np.array([r["cmc"] for r in results])
    maps = np.array([r["mAP"] for r in results])
    def mean_std(x):  # std is NaN for a single split: ddof=1 is undefined there
        return float(x.mean()), float(x.std(ddof=1)) if x.shape[0] > 1 else float("nan")

    out = {"num_splits": len(results), "mAP": mean_std(maps)}
    for k in ranks:
        out[f"rank-{k}"] = mean_std(cmc[:, k - 1])
    return out


def _cosine_similarity(features_a, features_b) -> np.ndarray:
    a = check_features(features_a, "features_a")
    b = check_features(features_b, "features_b", a.shape[1], "features_a")
    return 1.0 - pairwise_distance(a, b, "cosine").astype(np.float64)


def _score_pairs(score_fn, need: np.ndarray, batch_size: int) -> np.ndarray:
    """Call score_fn(idx_a, idx_b) on the needed (A image, B image) pairs, batch by batch."""
    scores = np.zeros(need.shape, dtype=np.float64)
    pa, pb = np.nonzero(need)
    for s in range(0, pa.shape[0], batch_size):
        ia, ib = pa[s:s + batch_size], pb[s:s + batch_size]
        out = np.asarray(score_fn(ia, ib), dtype=np.float64).reshape(-1)
        if out.shape[0] != ia.shape[0]:
            raise ValueError(f"score_fn returned {out.shape[0]} scores for {ia.shape[0]} pairs; "
                             "it must return one 'same' score per (idx_a[i], idx_b[i]) pair")
        if not np.isfinite(out).all():
            raise ValueError("score_fn returned NaN or inf scores")
        scores[ia, ib] = out
    return scores


def evaluate_cuhk01(similarity=None, pids_a=None, pids_b=None, *, features_a=None,
                    features_b=None, score_fn=None, trials: int = 10, seed: int = 0,
                    ranks=(1, 5, 10, 15, 20), direction: str = "A->B",
                    batch_size: int = 4096) -> dict:
    """CUHK01 as in the EfficientNet siamese paper (docs/protocols.md (c)).

    Camera-A images (ids `pids_a`) and camera-B images (`pids_b`) of the test ids, usually 2 + 2
    per id. Trial t uses `np.random.default_rng(seed + t)`: one `integers(0, n_a)` draw over the
    ids in ascending order picks each id's A image (its images in index order), a second such draw
    its B image. That gives an N x N problem; each query ranks the gallery (ids in ascending order)
    by score, descending, ties to the lower gallery position.

    Scores (higher = more alike), exactly one of:
        similarity: (len(pids_a), len(pids_b)) matrix for every A image vs every B image.
        features_a, features_b: embeddings; cosine similarity.
        score_fn: callable(idx_a, idx_b) -> 1-D array of "same" probabilities for the pairs
            (A image idx_a[i], B image idx_b[i]); called only for pairs some trial needs, in
            batches of `batch_size`. It must be deterministic.

    Returns:
        dict: `ranks`, `mean` and `std` (ddof=1, NaN for one trial) of rank-k accuracy in percent,
        `per_trial` (trials x len(ranks)), `trials`, `seed`, `direction`, `num_ids`, and `table`
        {"rank-k": (mean, std)}.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    trials = _positive_int(trials, "trials")
    batch_size = _positive_int(batch_size, "batch_size")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    ranks = tuple(_positive_int(k, "each entry of ranks") for k in ranks)
    if not ranks:
        raise ValueError("ranks is empty: give the CMC ranks to report, e.g. (1, 5, 10, 15, 20)")
    given = [x is not None for x in (similarity, score_fn)] + [features_a is not None or features_b is not None]
    if sum(given) != 1:
        raise ValueError("give exactly one of similarity, score_fn, or features_a + features_b")
    if given[2] and (features_a is None or features_b is None):
        raise ValueError("features_a and features_b must be given together")
    if score_fn is not None and not callable(score_fn):
        raise ValueError(f"score_fn must be callable(idx_a, idx_b), got {type(score_fn).__name__}")
    pa = check_ids(pids_a, "pids_a")
    pb = check_ids(pids_b, "pids_b")
    if pa.size == 0 or pb.size == 0:
        raise ValueError("pids_a and pids_b must not be empty")
    ids = np.unique(pa)
    if not np.array_equal(ids, np.unique(pb)):
        missing = np.setxor1d(ids, np.unique(pb))[:5].tolist()
        raise ValueError(f"pids_a and pids_b must hold the same test ids; ids only on one side: {missing}")
    if similarity is not None:
        sim = np.asarray(similarity)
        if sim.shape != (pa.size, pb.size):
            raise ValueError(f"similarity has shape {sim.shape}, expected (len(pids_a), len(pids_b)) "
                             f"= {(pa.size, pb.size)}")
        if not np.issubdtype(sim.dtype, np.number) or not np.isfinite(sim).all():
            raise ValueError("similarity must be numeric and finite (found NaN/inf or a non-number)")
    elif features_a is not None:
        sim = _cosine_similarity(features_a, features_b)
        if sim.shape != (pa.size, pb.size):
            raise ValueError(f"features_a / features_b have {sim.shape} rows, expected "
                             f"{(pa.size, pb.size)} (len(pids_a), len(pids_b))")
    # images of each id, in index order, for both cameras
    order_a, order_b = np.argsort(pa, kind="stable"), np.argsort(pb, kind="stable")
    start_a, count_a = np.searchsorted(pa[order_a], ids), np.bincount(np.searchsorted(ids, pa))
    start_b, count_b = np.searchsorted(pb[order_b], ids), np.bincount(np.searchsorted(ids, pb))
    picks = []
    for t in range(trials):
        rng = np.random.default_rng(seed + t)
        sel_a = order_a[start_a + rng.integers(0, count_a)]
        sel_b = order_b[start_b + rng.integers(0, count_b)]
        picks.append((sel_a, sel_b))
    if score_fn is not None:
        need = np.zeros((pa.size, pb.size), dtype=bool)
        for sel_a, sel_b in picks:
            need[np.ix_(sel_a, sel_b)] = True
        sim = _score_pairs(score_fn, need, batch_size)
    per_trial = np.zeros((trials, len(ranks)))
    diag = np.arange(ids.size)
    for t, (sel_a, sel_b) in enumerate(picks):
        scores = sim[np.ix_(sel_a, sel_b)]              # rows: A queries, columns: B gallery
        if direction == "B->A":
            scores = scores.T
        position = np.broadcast_to(diag, scores.shape)
        match_rank = _match_ranks(scores, diag, np.ones(scores.shape, dtype=bool), position,
                                  higher_is_better=True)
        per_trial[t] = [100.0 * np.mean(match_rank <= k) for k in ranks]
    mean = per_trial.mean(axis=0)
    std = per_trial.std(axis=0, ddof=1) if trials > 1 else np.full(len(ranks), np.nan)
    return {"ranks": ranks, "mean": mean, "std": std, "per_trial": per_trial, "trials": trials,
            "seed": seed, "direction": direction, "num_ids": int(ids.size),
            "table": {f"rank-{k}": (float(m), float(s)) for k, m, s in zip(ranks, mean, std)}}
