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
runs over gallery images. Similarities come from one matrix product per chunk of queries against
all detections (memory bounded by `memory_budget_mb`) when the galleries list a large share of
the scenes (the full set), otherwise from each query's product with its own gallery's detections
(TestG100 lists 1.4 % of CUHK-SYSU). Each query is then labelled and scored with array operations
on its ranked list: only the ranks of its few true positives are counted, nothing is sorted.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from reid_keras.metrics.detection import (UNIT_NORM_TOLERANCE, example_names, first_per_group, paired_iou,
                                          prepare_detections)

TOP_K = (1, 5, 10)
TILE = 256  # query rows per matrix product; chunks are whole tiles, so results never depend on the budget
# Galleries listing more than this share of the scenes (on average) use the matrix product: gathering a
# gallery's embeddings costs about 6x a matrix product's time per similarity (measured at CUHK-SYSU size).
MATRIX_SHARE = 0.15
ENTRIES_PER_CHUNK = 2**20  # ranked-list entries scored together (flat arrays of this length)


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


def _first_occurrences(values: np.ndarray) -> np.ndarray:
    """Indices of the first occurrence of each value, in their original order."""
    return np.sort(np.unique(values, return_index=True)[1])


class _Query(NamedTuple):
    """One query's checked protocol entry: gallery scenes `g` (first occurrences, in order), positive
    scenes `ps` with boxes `pb` [P, 4] and their places in `g`, duplicates dropped, detections listed."""

    q: int
    g: np.ndarray
    ps: np.ndarray
    pb: np.ndarray
    place: np.ndarray
    duplicates: int
    num_entries: int


class _Scorer:
    """Labels and scores queries against a `DetectionTable`, a chunk at a time (docs/protocols.md (d)).

    A query's ranked list is the detections of its gallery scenes in evaluation order (gallery order,
    then detection order); the lists of a chunk of queries are concatenated into flat arrays (`rows`:
    table rows, `vals`: similarities), labelled together, then counted query by query.
    """

    def __init__(self, protocol, table, q_emb: np.ndarray, keep_top: int):
        self.protocol, self.table, self.q_emb, self.keep_top = protocol, table, q_emb, keep_top
        self.num_scenes = len(protocol.scene_names)
        self.position = np.full(self.num_scenes, -1, np.int64)  # scene -> place in the current gallery

    def query(self, q: int) -> _Query:
        """Query `q`'s protocol entry, checked: ValueError naming the protocol and the query."""
        name, g = self.protocol.name, np.asarray(self.protocol.galleries[q]).reshape(-1)
        ps = np.asarray(self.protocol.positive_scenes[q]).reshape(-1)
        if (g.size and g.dtype.kind not in "iu") or (ps.size and ps.dtype.kind not in "iu"):
            raise ValueError(f"{name}: the gallery and positive scenes of query {q} must be integer scene indices, "
                             f"got dtypes {g.dtype} and {ps.dtype}")
        if g.size and (g.min() < 0 or g.max() >= self.num_scenes):
            raise ValueError(f"{name}: the gallery of query {q} refers to scene index "
                             f"{int(g.min() if g.min() < 0 else g.max())}, outside 0..{self.num_scenes - 1}")
        pb = np.asarray(self.protocol.positive_boxes[q], np.float64)
        pb = pb.reshape(-1, 4) if pb.size else np.zeros((0, 4))
        if pb.shape[0] != ps.shape[0]:
            raise ValueError(f"{name}: query {q} has {ps.shape[0]} positive scene(s) but {pb.shape[0]} positive box(es)")
        flat = (pb[:, 2:] <= pb[:, :2]).any(axis=1)
        if flat.any():  # its IoU threshold would be 0: any detection would match it
            raise ValueError(f"{name}: the box {pb[flat][0].tolist()} of query {q}'s person in "
                             f"{self.protocol.scene_names[int(ps[flat][0])]!r} has no area (need x2 > x1 and y2 > y1)")
        duplicates = 0
        if len(set(ps.tolist())) != ps.size:
            keep = _first_occurrences(ps)
            ps, pb, duplicates = ps[keep], pb[keep], ps.size - keep.size
        places = np.arange(g.size)
        self.position[g] = places
        try:
            if not (self.position[g] == places).all():  # a scene listed twice, whichever write won
                self.position[g] = -1
                keep = _first_occurrences(g)
                g, duplicates = g[keep], max(duplicates, g.size - keep.size)
                self.position[g] = np.arange(g.size)
            place = self.position[ps]
        finally:
            self.position[g] = -1
        if (place < 0).any():
            raise ValueError(f"{name}: positive scene {self.protocol.scene_names[int(ps[place < 0][0])]!r} of "
                             f"query {q} is not in its gallery")
        return _Query(q, g, ps, pb, place, duplicates, int(self.table.count[g].sum()))

    def score(self, chunk: list, sims: np.ndarray | None, sims_lo: int, out: dict, top: list) -> None:
        """Score the `_Query`s of `chunk` into the per-query arrays of `out`. `sims`: similarities of
        queries sims_lo.. to every table row, or None to multiply each query with its own detections."""
        table, n = self.table, len(chunk)
        qs = np.array([c.q for c in chunk], np.int64)
        scenes = np.concatenate([c.g for c in chunk])
        rows, scene_offset = _ranges(table.start[scenes], table.count[scenes])
        size = np.array([c.num_entries for c in chunk], np.int64)
        seg = np.cumsum(size) - size  # each query's slice of the flat arrays
        if sims is not None:
            vals = sims[np.repeat(qs - sims_lo, size), rows]
        else:
            vals = np.empty(rows.size, np.float32)
            for i, c in enumerate(chunk):
                vals[seg[i]:seg[i] + size[i]] = np.take(table.embeddings, rows[seg[i]:seg[i] + size[i]], axis=0) \
                    @ self.q_emb[c.q]
        # one true positive per positive scene: its most similar detection with IoU >= the size-adaptive threshold
        n_gt = np.array([c.ps.size for c in chunk], np.int64)
        ps = np.concatenate([c.ps for c in chunk])
        pb = np.concatenate([c.pb for c in chunk])
        first_scene = np.cumsum([c.g.size for c in chunk]) - np.array([c.g.size for c in chunk])
        gallery_index = np.repeat(first_scene, n_gt) + np.concatenate([c.place for c in chunk]).astype(np.int64)
        cand, _ = _ranges(scene_offset[gallery_index], table.count[ps])
        owner = np.repeat(np.arange(ps.size), table.count[ps])
        wh = pb[:, 2:] - pb[:, :2]
        thr = iou_threshold(wh[:, 0], wh[:, 1])
        ok = paired_iou(table.boxes[rows[cand]], pb[owner]) >= thr[owner]
        cand, owner = cand[ok], owner[ok]
        tp = np.sort(cand[first_per_group(owner, -vals[cand], cand)])
        n_tp = np.bincount(np.searchsorted(seg + size, tp, side="right"), minlength=n).astype(np.int64)
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
                           ("n_scores", size)):
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
    num_q = len(queries)
    mean_gallery = sum(len(g) for g in protocol.galleries) / max(num_q, 1)
    use_matrix = mean_gallery > MATRIX_SHARE * len(protocol.scene_names)
    fields = {"ap": np.zeros(num_q), "n_gt": np.zeros(num_q, np.int64), "n_tp": np.zeros(num_q, np.int64),
              "first_hit_rank": np.full(num_q, -1, np.int64), "n_scores": np.zeros(num_q, np.int64)}
    duplicates, top = 0, []
    block = _chunk_queries(table.scores.shape[0], memory_budget_mb) if use_matrix else num_q
    for lo in range(0, num_q, block):
        hi = min(num_q, lo + block)
        sims = _similarities(q_emb, table.embeddings, lo, hi) if use_matrix else None
        chunk, entries = [], 0
        for q in range(lo, hi):
            chunk.append(scorer.query(q))
            duplicates += chunk[-1].duplicates
            entries += chunk[-1].num_entries
            if entries >= ENTRIES_PER_CHUNK or q == hi - 1:
                scorer.score(chunk, sims, lo, fields, top)
                chunk, entries = [], 0
        del sims

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
