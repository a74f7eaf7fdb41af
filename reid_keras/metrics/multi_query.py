"""Multi-query pooling for Market-1501 (docs/datasets.md §1 "Multi-query"; idver paper Table III "MQ").

Each query is replaced by one feature pooled over the hand-drawn `gt_bbox` boxes of its identity
in its camera: the mean of their L2-normalised features (docs/datasets.md §1), or their element-wise
maximum (the Market devkit's other option), L2-normalised again. The ranking that follows is the
ordinary docs/protocols.md (a) one with the query's own id and camera (same junk rule).
"""
from __future__ import annotations

import numpy as np

from reid_keras.metrics.features import l2_normalize
from reid_keras.metrics.ranking import check_ids

POOLING_METHODS = ("mean", "max")


def _features(values, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (rows, dim) array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return arr


def _keys(pids: np.ndarray, cams: np.ndarray, cam_min: int, cam_span: int) -> np.ndarray:
    # One int64 per (pid, camera): cameras shifted to 0..cam_span-1 cannot carry into the pid.
    return pids * cam_span + (cams - cam_min)


def pool_multi_query(query_pids, query_cams, query_features, pool_pids, pool_cams, pool_features,
                     method: str = "mean") -> tuple:
    """Pool the features of each query's (pid, camera) group of `pool` images.

    Args:
        query_pids, query_cams: (Q,) integer ids and cameras of the queries.
        query_features: (Q, D) query features; a query without pool images keeps its own.
        pool_pids, pool_cams: (P,) ids and cameras of the pool (Market: `gt_bbox` boxes).
        pool_features: (P, D) pool features (normalised here again, so raw features work too).
        method: "mean" (docs/datasets.md §1) or "max" (element-wise), renormalised either way.

    Returns:
        (pooled (Q, D) float32 with unit rows (zero rows stay zero), (Q,) int64 number of pool
        images pooled for each query; 0 = the query's own normalised feature).

    Raises:
        ValueError naming the argument with a bad shape, length or value, or an unknown method.
    """
    if method not in POOLING_METHODS:
        raise ValueError(f"method must be one of {', '.join(POOLING_METHODS)}, got {method!r}")
    qf = _features(query_features, "query_features")
    pf = _features(pool_features, "pool_features")
    q_pids = check_ids(query_pids, "query_pids", qf.shape[0], "query_features")
    q_cams = check_ids(query_cams, "query_cams", qf.shape[0], "query_features")
    p_pids = check_ids(pool_pids, "pool_pids", pf.shape[0], "pool_features")
    p_cams = check_ids(pool_cams, "pool_cams", pf.shape[0], "pool_features")
    if pf.shape[0] and pf.shape[1] != qf.shape[1]:
        raise ValueError(f"pool_features have dimension {pf.shape[1]} but query_features have {qf.shape[1]}")

    pooled = l2_normalize(qf)
    counts = np.zeros(qf.shape[0], dtype=np.int64)
    if not pf.shape[0] or not qf.shape[0]:
        return pooled, counts
    cams = np.concatenate([q_cams, p_cams])
    cam_min, cam_span = int(cams.min()), int(cams.max() - cams.min()) + 1
    groups, inverse, sizes = np.unique(_keys(p_pids, p_cams, cam_min, cam_span), return_inverse=True,
                                       return_counts=True)
    # Rows sorted by group, so each group is one contiguous run for the reduceat calls.
    order = np.argsort(inverse, kind="stable")
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    rows = l2_normalize(pf)[order]
    if method == "mean":
        per_group = np.add.reduceat(rows.astype(np.float64), starts, axis=0) / sizes[:, None]
    else:
        per_group = np.maximum.reduceat(rows, starts, axis=0)
    per_group = l2_normalize(per_group)

    q_keys = _keys(q_pids, q_cams, cam_min, cam_span)
    slot = np.minimum(np.searchsorted(groups, q_keys), len(groups) - 1)
    found = groups[slot] == q_keys
    pooled[found] = per_group[slot[found]]
    counts[found] = sizes[slot[found]]
    return pooled, counts
