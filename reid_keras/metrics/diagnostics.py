"""Evaluation diagnostics behind the plots: EER threshold, camera-pair matrix, ranked lists, gallery size.

All of them follow docs/protocols.md (a): cosine distance `1 - q.g` on L2-normalised features, junk =
same id and same camera or id -1, stable order. None of them builds a full query x gallery
matrix: per-query metrics go through `evaluate_ranking(query_features=..., gallery_features=...)`
(chunked), ranked lists need one row per shown query, histograms a sample of pairs.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from reid_keras.metrics.ranking import evaluate_ranking


def eer_threshold(positive: np.ndarray, negative: np.ndarray) -> dict:
    """Equal-error threshold on distances: accept "same person" when `distance <= threshold`.

    FAR(t) = share of negative pairs with d <= t, FRR(t) = share of positive pairs with d > t.
    The threshold is the observed distance where |FAR - FRR| is smallest (the smallest such
    distance on ties); EER = (FAR + FRR) / 2 there.
    """
    pos = np.sort(np.asarray(positive, dtype=np.float64).ravel())
    neg = np.sort(np.asarray(negative, dtype=np.float64).ravel())
    if not len(pos) or not len(neg):
        raise ValueError(f"EER needs positive and negative pairs; got {len(pos)} positive, {len(neg)} negative")
    candidates = np.unique(np.concatenate([pos, neg]))
    far = np.searchsorted(neg, candidates, side="right") / len(neg)
    frr = 1.0 - np.searchsorted(pos, candidates, side="right") / len(pos)
    best = int(np.argmin(np.abs(far - frr)))
    return {"threshold": float(candidates[best]), "eer": float((far[best] + frr[best]) / 2),
            "far": float(far[best]), "frr": float(frr[best]),
            "num_positive_pairs": int(len(pos)), "num_negative_pairs": int(len(neg))}


def sample_pair_distances(query_features, gallery_features, query_pids, gallery_pids, query_cams,
                          gallery_cams, max_pairs: int = 20000, seed: int = 0) -> tuple:
    """Cosine distances of positive (same id, other camera) and negative (other id) query-gallery pairs.

    Junk pairs (same id and camera, or gallery id -1) are in neither set. At most `max_pairs` of
    each kind, drawn with `seed`; positives are enumerated per identity, negatives drawn at random.
    """
    rng = np.random.default_rng(seed)
    qf, gf = np.asarray(query_features, np.float32), np.asarray(gallery_features, np.float32)
    qp, gp = np.asarray(query_pids), np.asarray(gallery_pids)
    qc, gc = np.asarray(query_cams), np.asarray(gallery_cams)
    by_pid = {}
    for j, pid in enumerate(gp):
        by_pid.setdefault(int(pid), []).append(j)
    pos_q, pos_g = [], []
    for i, pid in enumerate(qp):
        cand = np.asarray(by_pid.get(int(pid), []), dtype=np.int64)
        if pid == -1 or not len(cand):
            continue
        cand = cand[gc[cand] != qc[i]]
        pos_q.append(np.full(len(cand), i))
        pos_g.append(cand)
    pos_q = np.concatenate(pos_q) if pos_q else np.zeros(0, np.int64)
    pos_g = np.concatenate(pos_g) if pos_g else np.zeros(0, np.int64)
    if len(pos_q) > max_pairs:
        keep = np.sort(rng.choice(len(pos_q), max_pairs, replace=False))
        pos_q, pos_g = pos_q[keep], pos_g[keep]
    # Negatives: oversample, drop same-id / junk draws; different ids are the vast majority.
    neg_q, neg_g = np.zeros(0, np.int64), np.zeros(0, np.int64)
    for _ in range(20):
        if len(neg_q) >= max_pairs:
            break
        draw = 2 * max_pairs
        i, j = rng.integers(0, len(qp), draw), rng.integers(0, len(gp), draw)
        ok = (qp[i] != gp[j]) & (gp[j] != -1)
        neg_q, neg_g = np.concatenate([neg_q, i[ok]]), np.concatenate([neg_g, j[ok]])
    neg_q, neg_g = neg_q[:max_pairs], neg_g[:max_pairs]

    def dist(a, b):
        return 1.0 - np.einsum("nd,nd->n", qf[a], gf[b]) if len(a) else np.zeros(0, np.float32)
    return dist(pos_q, pos_g), dist(neg_q, neg_g)


def ranked_list(query_index: int, query_pids, gallery_pids, query_cams, gallery_cams, k: int = 10,
                query_features=None, gallery_features=None, distance_row=None) -> dict:
    """Top-`k` gallery items of one query after junk removal (docs/protocols.md (a) steps 1-2).

    Pass the query's distance row (e.g. from re-ranking) or the features (cosine distance).
    Returns dict(index, distance, match) of the kept top-k items in rank order.
    """
    if distance_row is None:
        distance_row = 1.0 - np.asarray(gallery_features) @ np.asarray(query_features)[query_index]
    d = np.asarray(distance_row, dtype=np.float64).copy()
    gp, gc = np.asarray(gallery_pids), np.asarray(gallery_cams)
    pid, cam = query_pids[query_index], query_cams[query_index]
    junk = ((gp == pid) & (gc == cam)) | (gp == -1)
    order = np.argsort(d, kind="stable")
    order = order[~junk[order]][:k]
    return {"index": order, "distance": d[order], "match": gp[order] == pid}


def cross_camera_matrix(query_pids, gallery_pids, query_cams, gallery_cams, query_features=None,
                        gallery_features=None, distmat=None, ap: str = "non-interpolated",
                        memory_budget_mb: int = 1024) -> dict:
    """mAP and rank-1 per (query camera, gallery camera), the gallery restricted to one camera.

    Identification-verification paper Fig. 6. The diagonal is NaN: under the protocol every
    same-camera match of the query's id is junk, so no query is valid there. A cell with no valid
    query is NaN too. Cross-camera averages are over the finite off-diagonal cells.
    """
    qp, gp = np.asarray(query_pids), np.asarray(gallery_pids)
    qc, gc = np.asarray(query_cams), np.asarray(gallery_cams)
    q_cams = sorted(int(c) for c in np.unique(qc) if c >= 0)
    g_cams = sorted(int(c) for c in np.unique(gc) if c >= 0)
    shape = (len(q_cams), len(g_cams))
    mean_ap, rank1 = np.full(shape, np.nan), np.full(shape, np.nan)
    valid = np.zeros(shape, dtype=np.int64)
    for a, q_cam in enumerate(q_cams):
        q_idx = np.flatnonzero(qc == q_cam)
        for b, g_cam in enumerate(g_cams):
            if q_cam == g_cam:
                continue
            g_idx = np.flatnonzero(gc == g_cam)
            # Skip cells without a valid query instead of provoking evaluate_ranking's error.
            if not np.isin(qp[q_idx], gp[g_idx]).any():
                continue
            kwargs = dict(query_pids=qp[q_idx], gallery_pids=gp[g_idx], query_cams=qc[q_idx],
                          gallery_cams=gc[g_idx], max_rank=1, ap=ap)
            if distmat is not None:
                result = evaluate_ranking(distmat=np.asarray(distmat)[np.ix_(q_idx, g_idx)], **kwargs)
            else:
                result = evaluate_ranking(query_features=np.asarray(query_features)[q_idx],
                                          gallery_features=np.asarray(gallery_features)[g_idx],
                                          metric="cosine", memory_budget_mb=memory_budget_mb, **kwargs)
            mean_ap[a, b] = result["mAP"]
            rank1[a, b] = result["cmc"][0]
            valid[a, b] = result["num_valid_queries"]
    off = ~np.eye(*shape, dtype=bool) if q_cams == g_cams else np.ones(shape, dtype=bool)
    finite = off & np.isfinite(mean_ap)
    return {"query_cameras": q_cams, "gallery_cameras": g_cams, "mAP": mean_ap, "rank1": rank1,
            "num_valid_queries": valid,
            "cross_camera_mAP": float(np.mean(mean_ap[finite])) if finite.any() else float("nan"),
            "cross_camera_rank1": float(np.mean(rank1[finite])) if finite.any() else float("nan")}


def distractor_tiers(available: int, tiers: Sequence[int] = (0, 100_000, 200_000, 500_000)) -> list:
    """Gallery additions for the size curve: the paper's tiers that fit, else fractions of `available`.

    With 500k available: 0, 100k, 200k, 500k (Table VI). With fewer than the first non-zero tier,
    the same proportions of what the folder holds (0, 1/5, 2/5, 1); the full folder always ends
    the curve.
    """
    if available <= 0:
        return [0]
    fitting = [t for t in tiers if t <= available]
    if len(fitting) <= 1:
        top = max(tiers)
        fitting = sorted({int(round(available * t / top)) for t in tiers})
    if fitting[-1] != available:
        fitting.append(available)
    return sorted(set(fitting))


def gallery_size_curve(query, gallery, distractor_features: np.ndarray, sizes: Sequence[int], seed: int = 0,
                       ap: str = "non-interpolated", memory_budget_mb: int = 1024) -> list:
    """mAP / rank-1 as seeded distractors (pid 0, camera -1) join the gallery (paper Table VI).

    `query` / `gallery` are FeatureSets. Tiers are nested: a seeded permutation of the distractors,
    and tier n takes its first n. Evaluation is chunked over queries (docs/protocols.md (f)).
    """
    order = np.random.default_rng(seed).permutation(len(distractor_features))
    too_big = [n for n in sizes if not 0 <= n <= len(order)]
    if too_big:
        raise ValueError(f"gallery-size tier(s) {too_big} outside 0..{len(order)} (the distractor images available)")
    # One copy of gallery + the largest tier in permuted order; tier n is a prefix view of it.
    top = max(sizes) if len(sizes) else 0
    g = len(gallery)
    feats = np.concatenate([gallery.features, np.asarray(distractor_features, np.float32)[order[:top]]])
    pids = np.concatenate([gallery.pids, np.zeros(top, np.int64)])
    cams = np.concatenate([gallery.camids, np.full(top, -1, np.int64)])
    rows = []
    for n in sizes:
        result = evaluate_ranking(query_features=query.features, gallery_features=feats[:g + n],
                                  query_pids=query.pids, gallery_pids=pids[:g + n], query_cams=query.camids,
                                  gallery_cams=cams[:g + n], max_rank=1, ap=ap, metric="cosine",
                                  memory_budget_mb=memory_budget_mb)
        rows.append({"distractors": int(n), "gallery_size": int(g + n),
                     "mAP": float(result["mAP"]), "rank1": float(result["cmc"][0])})
    return rows


def pick_queries(query_pids, gallery_pids, query_cams, gallery_cams, count: int = 8, seed: int = 0,
                 candidates: Optional[np.ndarray] = None) -> np.ndarray:
    """Seeded choice of `count` valid queries (with a non-junk true match) for the ranked-list grid."""
    qp, gp = np.asarray(query_pids), np.asarray(gallery_pids)
    qc, gc = np.asarray(query_cams), np.asarray(gallery_cams)
    pairs = set(zip(gp.tolist(), gc.tolist()))
    cams_of = {}
    for pid, cam in pairs:
        cams_of.setdefault(pid, set()).add(cam)
    valid = np.asarray([bool(cams_of.get(p, set()) - {c}) and p != -1 for p, c in zip(qp.tolist(), qc.tolist())])
    pool = np.flatnonzero(valid) if candidates is None else np.intersect1d(np.flatnonzero(valid), candidates)
    if len(pool) <= count:
        return pool
    return np.sort(np.random.default_rng(seed).choice(pool, count, replace=False))
