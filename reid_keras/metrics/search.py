"""Person search evaluation: CUHK-SYSU and PRW protocols, mAP and top-k (docs/protocols.md (d)).

For each query, the detections (score >= `score_threshold`) of its gallery scenes are ranked by
similarity to the query embedding (dot product of L2-normalised embeddings). In each gallery
scene that shows the query person, the most similar detection whose IoU with the person's box is
at least min(0.5, w h / ((w + 10)(h + 10))) is that scene's one true positive. AP is the
non-interpolated, sklearn-style AP of that list (tied scores form one threshold) times
n_tp / n_gt, so a person the detector missed is never recalled; top-k asks whether a true
positive is among the k most similar detections, ties going to the earlier entry (gallery order,
then detection index). Queries whose gallery does not show their person (n_gt = 0) are invalid:
left out of the means and counted.

The gallery of each query comes from `dataset.search_protocol(gallery_size)` (CUHK-SYSU
`TestG<N>`, its full set -1, PRW), duplicates counted once; the full set lists the protocol's
scenes before the others, so a true match is never added a second time as a negative (the
size -1 bug of SeqNet and COAT, docs/protocols.md (d)).

Speed: every image's detections are concatenated once (`metrics/detection.py`); no Python loop
runs over gallery images. Similarities come from one matrix product per block of queries against
all detections (memory bounded by `memory_budget_mb`) when the galleries list a large share of
the scenes (the full set), otherwise from each query's product with its own gallery's detections
(TestG100 lists 1.4 % of CUHK-SYSU). The ranked lists of a chunk of queries are laid end to end
in flat arrays and labelled together; then only the ranks of each query's few true positives are
counted (comparisons, no sort). At CUHK-SYSU size this is 10x (gallery 100) and 40x (full set)
faster than the published per-query loop (experiments/benchmarks/search_evaluation_speed.py).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from reid_keras.metrics.detection import (UNIT_NORM_TOLERANCE, example_names, first_per_group, paired_iou,
                                          prepare_detections)

TOP_K = (1, 5, 10)
TILE = 256  # query rows per matrix product; chunks are whole tiles, so results never depend on the budget
# Galleries listing more than this share of the scenes (on average) use one matrix product for many
# queries; smaller ones gather their own detections' embeddings, which costs some 30x more per
# similarity. Measured at CUHK-SYSU size: TestG100 (1.4 %) 0.4 s own vs 1.6 s matrix; TestG500 (7 %)
# 3.4 s own vs 1.0 s matrix.
MATRIX_SHARE = 0.03
SCENES_PER_CHUNK = 2**17  # gallery entries scored together (their detections form flat arrays)
POSITION_CELLS = 2**22  # queries x scenes cells of the chunk's int32 place table (16 MB)


def iou_threshold(w, h):
    """The size-adaptive match threshold min(0.5, w h / ((w + 10)(h + 10))) of a ground-truth box
    w x h (OIM release; docs/protocols.md (d)): below 0.5 only for small boxes."""
    w, h = np.asarray(w, np.float64), np.asarray(h, np.float64)
    return np.minimum(0.5, w * h / ((w + 10.0) * (h + 10.0)))


def _check_number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _check_query_embeddings(query_embeddings, queries, dim) -> tuple:
    """(L2-normalised float32 [Q, D], number of rows that were not unit-norm)."""
    arr = np.asarray(query_embeddings)
    q = len(queries)
    expected = f"[{q}, {dim if dim is not None else 'D'}] (one row per query of dataset.queries, in its order"
    expected += f", D = {dim} as the detections' embeddings)" if dim is not None else ")"
    if (arr.ndim != 2 or arr.shape[0] != q or arr.shape[1] == 0
            or (dim is not None and arr.shape[1] != dim)):
        raise ValueError(f"query_embeddings has shape {arr.shape}, expected {expected}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"query_embeddings must hold real numbers, got dtype {arr.dtype}")
    arr = np.asarray(arr, np.float32)
    bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"query_embeddings row {i} (the query in {queries[i].scene!r}) contains NaN or inf; "
                         "check the model output")
    norms = np.sqrt(np.einsum("ij,ij->i", arr, arr, dtype=np.float64))
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        i = int(zero[0])
        raise ValueError(f"query_embeddings row {i} (the query in {queries[i].scene!r}) is all zeros: "
                         "it cannot be L2-normalised")
    changed = int(np.count_nonzero(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE))
    return np.ascontiguousarray(arr / norms[:, None].astype(np.float32)), changed


def _chunk_queries(num_rows: int, memory_budget_mb) -> int:
    """Queries per similarity block: the budget over 4 bytes per (query, detection), whole tiles."""
    budget = _check_number(memory_budget_mb, "memory_budget_mb")
    if budget <= 0:
        raise ValueError(f"memory_budget_mb must be positive, got {memory_budget_mb!r}")
    rows = int(budget * 2**20 // (4 * max(num_rows, 1)))
    return max(TILE, rows // TILE * TILE)


def _similarities(q_emb: np.ndarray, det_emb: np.ndarray, lo: int, hi: int) -> np.ndarray:
    out = np.empty((hi - lo, det_emb.shape[0]), np.float32)
    for a in range(lo, hi, TILE):
        b = min(a + TILE, hi)
        np.matmul(q_emb[a:b], det_emb.T, out=out[a - lo:b - lo])
    return out


def _ranges(start: np.ndarray, count: np.ndarray) -> tuple:
    """Row indices start[i] .. start[i] + count[i] - 1 concatenated, and each range's offset in them."""
    offsets = np.cumsum(count) - count
    return np.repeat(start - offsets, count) + np.arange(int(count.sum())), offsets


class _Chunk(NamedTuple):
    """The checked protocol entries of queries lo..hi-1, flat: gallery scenes `scenes` (first
    occurrences, each query's in order) with `scene_query` (0-based within the chunk); positive scenes
    `ps`, their boxes `pb` [P, 4] and `place` (index into `scenes`); per query `n_gt`, `duplicates`."""

    lo: int
    scenes: np.ndarray
    scene_query: np.ndarray
    ps: np.ndarray
    pb: np.ndarray
    place: np.ndarray
    n_gt: np.ndarray
    duplicates: np.ndarray


def _list_of(index: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Which list each flat `index` falls in, for lists of `lengths` laid end to end."""
    return np.searchsorted(np.cumsum(lengths), index, side="right")


def _read_chunk(protocol, lo: int, hi: int) -> _Chunk:
    """`protocol`'s entries for queries lo..hi-1, checked, duplicates dropped (docs/protocols.md (d)).

    Raises ValueError naming the protocol and the query: scene indices that are not integers or out
    of range, boxes and positive scenes that disagree, a positive box without area (its IoU threshold
    would be 0), a positive scene missing from the query's gallery.
    """
    name, num_scenes, n = protocol.name, len(protocol.scene_names), hi - lo
    galleries = [np.asarray(protocol.galleries[q]).reshape(-1) for q in range(lo, hi)]
    positives = [np.asarray(protocol.positive_scenes[q]).reshape(-1) for q in range(lo, hi)]
    boxes = [np.asarray(protocol.positive_boxes[q], np.float64) for q in range(lo, hi)]
    for i, (g, ps, pb) in enumerate(zip(galleries, positives, boxes)):
        if (g.size and g.dtype.kind not in "iu") or (ps.size and ps.dtype.kind not in "iu"):
            raise ValueError(f"{name}: the gallery and positive scenes of query {lo + i} must be integer scene "
                             f"indices, got dtypes {g.dtype} and {ps.dtype}")
        if pb.size != 4 * ps.size:
            raise ValueError(f"{name}: query {lo + i} has {ps.size} positive scene(s) but {pb.size / 4:g} positive "
                             "box(es)")
    g_len = np.array([g.size for g in galleries], np.int64)
    scenes = np.concatenate(galleries).astype(np.int64)
    for flat, lengths, what in ((scenes, g_len, "gallery"),
                                (np.concatenate(positives).astype(np.int64), [p.size for p in positives],
                                 "positive scenes")):
        bad = np.flatnonzero((flat < 0) | (flat >= num_scenes))
        if bad.size:
            raise ValueError(f"{name}: the {what} of query {lo + int(_list_of(bad[0], lengths))} refers to "
                             f"scene index {int(flat[bad[0]])}, outside 0..{num_scenes - 1}")
    scene_query = np.repeat(np.arange(n), g_len)
    # position[i, s] = place of scene s in query i's gallery; a scene listed twice shows as a mismatch
    # whichever of its writes won, and then only first occurrences are kept
    position = np.full((n, num_scenes), -1, np.int32)
    within = np.arange(scenes.size) - np.repeat(np.cumsum(g_len) - g_len, g_len)
    position[scene_query, scenes] = within
    duplicates = np.zeros(n, np.int64)
    if not (position[scene_query, scenes] == within).all():
        keep = np.zeros(scenes.size, bool)
        keep[np.unique(scene_query * num_scenes + scenes, return_index=True)[1]] = True
        duplicates = np.bincount(scene_query[~keep], minlength=n)
        scenes, scene_query = scenes[keep], scene_query[keep]
        g_len = np.bincount(scene_query, minlength=n)
        position[:] = -1
        position[scene_query, scenes] = np.arange(scenes.size) - np.repeat(np.cumsum(g_len) - g_len, g_len)
    ps = np.concatenate(positives).astype(np.int64)
    pb = np.concatenate(boxes).reshape(-1, 4)
    pq = np.repeat(np.arange(n), [p.size for p in positives])
    flat = np.flatnonzero((pb[:, 2:] <= pb[:, :2]).any(axis=1))
    if flat.size:  # its IoU threshold would be 0: any detection would match it
        i = flat[0]
        raise ValueError(f"{name}: the box {pb[i].tolist()} of query {lo + int(pq[i])}'s person in "
                         f"{protocol.scene_names[int(ps[i])]!r} has no area (need x2 > x1 and y2 > y1)")
    keep = np.zeros(ps.size, bool)
    keep[np.unique(pq * num_scenes + ps, return_index=True)[1]] = True
    if not keep.all():
        duplicates = np.maximum(duplicates, np.bincount(pq[~keep], minlength=n))
        ps, pb, pq = ps[keep], pb[keep], pq[keep]
    place = position[pq, ps]
    missing = np.flatnonzero(place < 0)
    if missing.size:
        i = missing[0]
        raise ValueError(f"{name}: positive scene {protocol.scene_names[int(ps[i])]!r} of query {lo + int(pq[i])} "
                         "is not in its gallery")
    first_scene = np.cumsum(g_len) - g_len
    return _Chunk(lo, scenes, scene_query, ps, pb, first_scene[pq] + place, np.bincount(pq, minlength=n),
                  duplicates)


class _Scorer:
    """Labels and scores queries against a `DetectionTable`, a chunk at a time (docs/protocols.md (d)).

    A query's ranked list is the detections of its gallery scenes in evaluation order (gallery order,
    then detection order); the lists of a chunk of queries are concatenated into flat arrays (`rows`:
    table rows, `vals`: similarities), labelled together, then counted query by query.
    """

    def __init__(self, protocol, table, q_emb: np.ndarray, keep_top: int):
        self.protocol, self.table, self.q_emb, self.keep_top = protocol, table, q_emb, keep_top

    def score(self, chunk: _Chunk, sims: np.ndarray | None, sims_lo: int, out: dict, top: list) -> None:
        """Score `chunk` into the per-query arrays of `out`. `sims`: similarities of queries sims_lo..
        to every table row, or None to multiply each query with its own gallery's detections."""
        table, n = self.table, chunk.n_gt.size
        qs = chunk.lo + np.arange(n)
        rows, scene_offset = _ranges(table.start[chunk.scenes], table.count[chunk.scenes])
        size = np.bincount(chunk.scene_query, weights=table.count[chunk.scenes], minlength=n).astype(np.int64)
        seg = np.cumsum(size) - size  # each query's slice of the flat arrays
        if sims is not None:
            vals = sims[np.repeat(qs - sims_lo, size), rows]
        else:
            vals = np.empty(rows.size, np.float32)
            for i in range(n):
                s, e = seg[i], seg[i] + size[i]
                vals[s:e] = np.take(table.embeddings, rows[s:e], axis=0) @ self.q_emb[qs[i]]
        # one true positive per positive scene: its most similar detection with IoU >= the size-adaptive threshold
        ps, pb, n_gt = chunk.ps, chunk.pb, chunk.n_gt
        cand, _ = _ranges(scene_offset[chunk.place], table.count[ps])
        owner = np.repeat(np.arange(ps.size), table.count[ps])
        wh = pb[:, 2:] - pb[:, :2]
        thr = iou_threshold(wh[:, 0], wh[:, 1])
        ok = paired_iou(table.boxes[rows[cand]], pb[owner]) >= thr[owner]
        cand, owner = cand[ok], owner[ok]
        tp = np.sort(cand[first_per_group(owner, -vals[cand], cand)])
        n_tp = np.bincount(_list_of(tp, size), minlength=n).astype(np.int64)
        first_tp = np.cumsum(n_tp) - n_tp
        ap, first_hit = np.zeros(n), np.full(n, -1, np.int64)
        for i in np.flatnonzero(n_tp):  # count the ranks of the query's few true positives
            t = tp[first_tp[i]:first_tp[i] + n_tp[i]]
            listed, v = vals[seg[i]:seg[i] + size[i]], vals[t]
            at_least = (listed >= v[:, None]).sum(axis=1)
            above = (listed > v[:, None]).sum(axis=1)
            ap[i] = np.sum((v >= v[:, None]).sum(axis=1) / at_least) / n_gt[i]
            rank = above + 1
            for j in np.flatnonzero(at_least - above > 1):  # a tie: the earlier entry in evaluation order first
                rank[j] += np.count_nonzero(listed[:t[j] - seg[i]] == v[j])
            first_hit[i] = rank.min()
        for key, value in (("ap", ap), ("n_gt", n_gt), ("n_tp", n_tp), ("first_hit_rank", first_hit),
                           ("n_scores", size), ("duplicates", chunk.duplicates)):
            out[key][qs] = value
        if self.keep_top:
            for i in range(n):
                s, e = seg[i], seg[i] + size[i]
                top.append(self._top(vals[s:e], rows[s:e], tp[first_tp[i]:first_tp[i] + n_tp[i]] - s))

    def _top(self, vals, rows, tp_pos) -> list:
        k = min(self.keep_top, vals.size)
        if k == 0:
            return []
        cand = np.arange(vals.size)
        if vals.size > k:
            cand = np.flatnonzero(vals >= np.partition(vals, vals.size - k)[vals.size - k])
        top = cand[np.lexsort((cand, -vals[cand]))][:k]
        names, table, hits = self.protocol.scene_names, self.table, set(tp_pos.tolist())
        return [(names[int(table.scene[r])], table.boxes[r].astype(np.float32), float(vals[t]), t in hits)
                for t, r in zip(top.tolist(), rows[top].tolist())]


def evaluate_search(detections, query_embeddings, dataset, gallery_size=100, score_threshold: float = 0.5,
                    keep_top: int = 0, *, memory_budget_mb: float = 128, image_sizes=None) -> dict:
    """Person search mAP and top-1/5/10 of a detector + embedding (docs/protocols.md (d)).

    Args:
        detections: dict gallery image file name (e.g. "s15533.jpg") -> (boxes [N, 4] x1y1x2y2,
            scores [N], embeddings [N, D]); see `metrics.detection.prepare_detections` for the checks.
        query_embeddings: [Q, D], one embedding of each query's given box, in `dataset.queries` order.
        dataset: a `SearchDataset` (`load_dataset("cuhk_sysu" | "prw", root)`).
        gallery_size: one of `dataset.gallery_sizes` (CUHK-SYSU 50 ... 4000 or -1, the full set).
        score_threshold: detections scoring below it are not searched (0.5 in the papers).
        keep_top: > 0 adds "top_matches": per query up to `keep_top` tuples
            (scene name, box [4] float32, similarity, is_match) in rank order.
        memory_budget_mb: bound on the query x detection similarity block held at once.
        image_sizes: optional dict name -> (height, width) to count boxes past the right/bottom edge.

    Returns:
        dict with "mAP", "top1", "top5", "top10" (fractions over valid queries), "per_query_ap"
        (list in query order, NaN for invalid queries), "per_query" (numpy arrays ap, n_gt, n_tp,
        valid, first_hit_rank (-1: no hit), n_scores), "num_valid_queries", "num_invalid_queries",
        "protocol", "gallery_size", "score_threshold", "duplicates", "warnings".

    Raises:
        ValueError naming the argument or image that cannot be scored, or when no query is valid.
    """
    score_threshold = _check_number(score_threshold, "score_threshold")
    if isinstance(keep_top, bool) or not isinstance(keep_top, (int, np.integer)) or keep_top < 0:
        raise ValueError(f"keep_top must be an integer >= 0, got {keep_top!r}")
    protocol = dataset.search_protocol(gallery_size)
    queries = list(dataset.queries)
    if len(protocol) != len(queries):
        raise ValueError(f"{protocol.name}: the protocol has {len(protocol)} galleries but dataset.queries "
                         f"has {len(queries)} queries")
    table = prepare_detections(detections, protocol.scene_names, score_threshold,
                               known_names=[s.name for s in dataset.gallery], image_sizes=image_sizes,
                               dataset_name=dataset.name)
    q_emb, changed = _check_query_embeddings(query_embeddings, queries, table.dim)
    if table.dim is None:  # no detection at all: an empty table of the queries' width
        table.embeddings = np.zeros((0, q_emb.shape[1]), np.float32)
    warnings = list(table.warnings)
    if changed:
        warnings.append(f"normalised {changed} query embedding(s) that were not unit-norm "
                        f"(|norm - 1| > {UNIT_NORM_TOLERANCE:g})")
    absent = [n for n, h in zip(protocol.scene_names, table.has_entry) if not h]
    if absent:
        warnings.append(f"{len(absent)} of the protocol's {len(protocol.scene_names)} scene(s) have no entry in "
                        f"detections: they add no scores and their ground truth still counts in n_gt "
                        f"(e.g. {example_names(absent)})")

    scorer = _Scorer(protocol, table, q_emb, int(keep_top))
    num_q, num_scenes = len(queries), len(protocol.scene_names)
    lengths = np.array([np.size(g) for g in protocol.galleries], np.int64)
    use_matrix = lengths.mean() > MATRIX_SHARE * num_scenes
    fields = {"ap": np.zeros(num_q), "n_gt": np.zeros(num_q, np.int64), "n_tp": np.zeros(num_q, np.int64),
              "first_hit_rank": np.full(num_q, -1, np.int64), "n_scores": np.zeros(num_q, np.int64),
              "duplicates": np.zeros(num_q, np.int64)}
    top = []
    block = _chunk_queries(table.scores.shape[0], memory_budget_mb) if use_matrix else num_q
    for lo in range(0, num_q, block):
        hi = min(num_q, lo + block)
        sims = _similarities(q_emb, table.embeddings, lo, hi) if use_matrix else None
        start = lo
        while start < hi:  # chunks of at most SCENES_PER_CHUNK gallery entries and POSITION_CELLS cells
            stop = start + max(1, min(POSITION_CELLS // max(num_scenes, 1),
                                      int(np.searchsorted(np.cumsum(lengths[start:hi]), SCENES_PER_CHUNK))))
            stop = min(stop, hi)
            scorer.score(_read_chunk(protocol, start, stop), sims, lo, fields, top)
            start = stop
        del sims
    duplicates = int(fields.pop("duplicates").sum())

    valid = fields["n_gt"] > 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError(f"no valid query: none of the {num_q} queries of {protocol.name} has its person in its "
                         "gallery (n_gt = 0 for every query)")
    fields["ap"][~valid] = np.nan
    if num_valid < num_q:
        warnings.append(f"{num_q - num_valid} query(ies) have no ground truth in their gallery (n_gt = 0): "
                        "invalid, left out of the means")
    if duplicates:
        warnings.append(f"{duplicates} duplicate gallery entr(ies) were evaluated and counted once")
    if protocol.duplicates:
        warnings.append(f"the protocol removed {protocol.duplicates} duplicate gallery entr(ies)")
    first = fields["first_hit_rank"]
    result = {"mAP": float(np.mean(fields["ap"][valid]))}
    for k in TOP_K:
        result[f"top{k}"] = float(np.mean(((first >= 1) & (first <= k))[valid]))
    result.update({
        "per_query_ap": fields["ap"].tolist(),
        "per_query": {**fields, "valid": valid},
        "num_valid_queries": num_valid,
        "num_invalid_queries": num_q - num_valid,
        "protocol": protocol.name,
        "gallery_size": gallery_size,
        "score_threshold": score_threshold,
        "duplicates": int(duplicates + protocol.duplicates),
        "warnings": warnings,
    })
    if keep_top:
        result["top_matches"] = top
    return result


def ground_truth_detections(dataset, embeddings) -> dict:
    """The annotated boxes of every gallery scene as detections with score 1: the "GT" column of
    OIM paper Table 2 (search with a perfect detector).

    Args:
        embeddings: dict scene file name -> [n, D], one embedding per annotated box in the scene's
            box order (scenes without boxes may be left out).
    Returns:
        a detections dict for `evaluate_search` / `evaluate_detection`.
    Raises:
        ValueError naming the scene whose embeddings are missing or have the wrong shape.
    """
    if not isinstance(embeddings, Mapping):
        raise ValueError(f"embeddings must be a dict scene file name -> [n, D], got {type(embeddings).__name__}")
    dim = next((np.shape(e)[1] for e in embeddings.values() if np.ndim(e) == 2 and np.shape(e)[0]), 0)
    out, missing = {}, []
    for scene in dataset.gallery:
        n = len(scene.boxes)
        if scene.name not in embeddings:
            if n:
                missing.append(scene.name)
            else:
                out[scene.name] = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32),
                                   np.zeros((0, dim), np.float32))
            continue
        emb = np.asarray(embeddings[scene.name])
        if emb.ndim != 2 or emb.shape[0] != n or (n and emb.shape[1] != dim):
            raise ValueError(f"embeddings[{scene.name!r}] has shape {emb.shape}, expected [{n}, {dim}]: one row "
                             "per annotated box of the scene, in its box order")
        out[scene.name] = (np.asarray(scene.boxes, np.float32), np.ones(n, np.float32), emb)
    if missing:
        raise ValueError(f"embeddings has no entry for {len(missing)} gallery scene(s) with annotated boxes "
                         f"(e.g. {example_names(missing)})")
    return out
