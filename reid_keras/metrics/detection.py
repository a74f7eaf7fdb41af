"""Detections of gallery scenes: their checks, and the detector's quality (docs/protocols.md (e)).

A detections dict maps each gallery image's file name (e.g. ``s15533.jpg``) to
``(boxes [N, 4] x1y1x2y2, scores [N], embeddings [N, D])`` in image pixels.
`prepare_detections` checks it once and concatenates every image's detections into one
`DetectionTable`, so the search evaluation (`metrics/search.py`) and the detection evaluation
work on flat arrays instead of looping over images. What it cannot score is an error naming the
image (shapes that disagree, NaN boxes, scores or embeddings); what it can score but looks
wrong is counted in `warnings` (images without an entry or with an empty list, names that are
not test scenes, boxes without area or left/above of the image, non-unit embeddings, fewer than
10 detections in total).

`evaluate_detection` scores the detector against every annotated box of `dataset.gallery`:
recall at the search's `score_threshold` (all boxes, and labeled boxes only) and AP with
detections from `ap_score_threshold` up, with mutual-best matching (the OIM release, NAE,
SeqNet, COAT) or VOC greedy matching (`matching="voc"`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from reid_keras.data.datasets.scenes import UNLABELED

MATCHINGS = ("mutual_best", "voc")
MATCH_IOU = 0.5  # docs/protocols.md (e): a detection matches a box at IoU >= 0.5
UNIT_NORM_TOLERANCE = 1e-3  # |norm - 1| above this counts as "not unit-norm" (they are normalised anyway)
FEW_DETECTIONS = 10  # the published code crashes below this many detections (its top-10 listing)


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of broadcastable [..., 4] float64 corner arrays (continuous corners, no +1). A box with
    x2 <= x1 or y2 <= y1 has no area: IoU 0 with everything."""
    inter_wh = np.maximum(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0.0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    wh_a = np.maximum(a[..., 2:] - a[..., :2], 0.0)
    wh_b = np.maximum(b[..., 2:] - b[..., :2], 0.0)
    union = wh_a[..., 0] * wh_a[..., 1] + wh_b[..., 0] * wh_b[..., 1] - inter
    return inter / np.where(union > 0, union, np.inf)  # no union means no intersection: 0


def _as_boxes(boxes, name: str) -> np.ndarray:
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return np.zeros((0, 4))
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name} must have shape [N, 4] (x1, y1, x2, y2), got {arr.shape}")
    return arr


def box_iou(a, b) -> np.ndarray:
    """[N, M] intersection over union of boxes `a` [N, 4] and `b` [M, 4] (x1, y1, x2, y2).

    Continuous corners, no +1 (docs/protocols.md (d)); a box without area has IoU 0.
    """
    a, b = _as_boxes(a, "box_iou argument a"), _as_boxes(b, "box_iou argument b")
    return _iou(a[:, None, :], b[None, :, :])


def paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N] IoU of `a[i]` with `b[i]` (both [N, 4] float64); the same arithmetic as `box_iou`."""
    return _iou(a, b)


@dataclasses.dataclass
class DetectionTable:
    """Every kept detection of the scenes `names`, concatenated in scene order, then in the
    image's own detection order (so a lower index within an image stays lower).

    `start[s]`, `count[s]`: the rows of scene `s`; `scene`: the scene of each row; `embeddings`
    are L2-normalised float32 (None when not asked for); `dim` their width (None if unknown);
    `has_entry[s]`: whether `detections` had an entry for scene `s` (the caller reports those without).
    """

    names: tuple
    boxes: np.ndarray
    scores: np.ndarray
    embeddings: np.ndarray | None
    scene: np.ndarray
    start: np.ndarray
    count: np.ndarray
    dim: int | None
    has_entry: np.ndarray
    warnings: list


def _entry_arrays(name: str, value, need_embeddings: bool):
    """(boxes [N, 4], scores [N], embeddings [N, D] or None, D or None) of one image as numeric arrays
    with checked shapes; their values are checked (and converted) on the concatenation."""
    where = f"detections[{name!r}]"
    if not isinstance(value, (tuple, list)) or len(value) not in ((3,) if need_embeddings else (2, 3)):
        expected = "(boxes [N, 4], scores [N], embeddings [N, D])"
        got = f"a {len(value)}-tuple" if isinstance(value, (tuple, list)) else type(value).__name__
        raise ValueError(f"{where} must be {expected}, got {got}")
    boxes, scores = np.asarray(value[0]), np.asarray(value[1])
    emb = np.asarray(value[2]) if need_embeddings else None
    for array in (boxes, scores) + ((emb,) if need_embeddings else ()):
        if array.size and (array.dtype.kind not in "iuf"):
            raise ValueError(f"{where} must hold real numbers, got dtype {array.dtype}")
    n = scores.shape[0] if scores.ndim == 1 else -1
    if boxes.size == 0 and scores.size == 0 and (emb is None or emb.size == 0):
        dim = emb.shape[1] if emb is not None and emb.ndim == 2 and emb.shape[1] else None
        return np.zeros((0, 4)), np.zeros(0), None, dim
    shapes_ok = (boxes.ndim == 2 and boxes.shape[1] == 4 and n == boxes.shape[0]
                 and (emb is None or (emb.ndim == 2 and emb.shape[0] == n and emb.shape[1] > 0)))
    if not shapes_ok:
        got = f"boxes {boxes.shape}, scores {scores.shape}" + (f", embeddings {emb.shape}" if emb is not None else "")
        need = "boxes [N, 4], scores [N]" + (" and embeddings [N, D]" if need_embeddings else "")
        raise ValueError(f"{where}: shapes disagree ({got}); need {need} with the same N")
    return boxes, scores, emb, (emb.shape[1] if emb is not None else None)


def _first_bad_row(ok_rows: np.ndarray, ends: np.ndarray, names: list, what: str, hint: str = "") -> None:
    """ValueError naming the image (and its row) of the first False in `ok_rows` (rows of the concatenation)."""
    bad = np.flatnonzero(~ok_rows)
    if bad.size:
        i = int(np.searchsorted(ends, bad[0], side="right"))
        row = int(bad[0] - (ends[i - 1] if i else 0))
        raise ValueError(f"detections[{names[i]!r}]: {what} contain NaN or inf (row {row}){hint}")


def example_names(names) -> str:
    """Up to three names, quoted, for a message."""
    names = list(names)
    return ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")


def prepare_detections(detections, scene_names, score_threshold: float, *, known_names=(),
                       need_embeddings: bool = True, image_sizes=None, dataset_name: str = "the dataset"
                       ) -> DetectionTable:
    """Check `detections` and keep, for each of `scene_names`, the detections scoring >= `score_threshold`.

    Args:
        detections: dict image file name -> (boxes [N, 4], scores [N], embeddings [N, D]).
        scene_names: the scenes to keep, in table order (a protocol's `scene_names`).
        known_names: other test scenes: entries for them are dropped without a warning.
        need_embeddings: check and normalise the embeddings (search); detection scoring ignores them.
        image_sizes: optional dict name -> (height, width): boxes beyond the right / bottom edge are
            counted too (otherwise only negative coordinates are).
    Raises:
        ValueError naming the image for what cannot be scored, or `detections` when none of its
        names is a test scene.
    """
    if not isinstance(detections, Mapping):
        raise ValueError(f"detections must be a dict image file name -> (boxes, scores, embeddings), "
                         f"got {type(detections).__name__}")
    index = {}
    for i, n in enumerate(scene_names):
        index.setdefault(n, i)  # a name listed twice: its first scene gets the detections
    known = set(known_names)
    entries, has_entry = [], np.zeros(len(scene_names), bool)
    unknown, empty, dim, dim_from = [], [], None, None
    for name, value in detections.items():
        s = index.get(name)
        if s is None:
            if name not in known:
                unknown.append(name)
            continue
        b, sc, e, d = _entry_arrays(name, value, need_embeddings)
        has_entry[s] = True
        if need_embeddings and d is not None and len(sc):
            if dim is None:
                dim, dim_from = d, name
            elif d != dim:
                raise ValueError(f"detections[{name!r}]: embeddings have dimension {d}, but "
                                 f"detections[{dim_from!r}] has {dim}: all must come from the same model")
        if len(sc) == 0:
            empty.append(name)
            continue
        entries.append((s, name, b, sc, e))
    if detections and not has_entry.any():
        raise ValueError(f"none of the {len(detections)} image name(s) in detections is a test scene of "
                         f"{dataset_name} (got {example_names(detections)}; expected file names such as "
                         f"{example_names(list(scene_names)[:2])})")
    entries.sort(key=lambda entry: entry[0])  # the table is in scene order, each image's rows in its order
    names = [entry[1] for entry in entries]
    sizes = np.array([len(entry[3]) for entry in entries], np.int64)
    ends = np.cumsum(sizes)
    all_boxes = np.concatenate([entry[2] for entry in entries], dtype=np.float64) if entries else np.zeros((0, 4))
    all_scores = np.concatenate([entry[3] for entry in entries], dtype=np.float64) if entries else np.zeros(0)
    _first_bad_row(np.isfinite(all_boxes).all(axis=1), ends, names, "boxes")
    _first_bad_row(np.isfinite(all_scores), ends, names, "scores")
    keep = all_scores >= score_threshold
    count = np.bincount(np.repeat([entry[0] for entry in entries], sizes).astype(np.int64)[keep],
                        minlength=len(scene_names)).astype(np.int64)
    start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    table_emb, warnings = None, []
    if need_embeddings:
        all_emb = (np.concatenate([entry[4] for entry in entries], dtype=np.float32) if entries
                   else np.zeros((0, dim or 0), np.float32))
        norms = np.sqrt(np.einsum("ij,ij->i", all_emb, all_emb)).astype(np.float64)
        overflow = ~np.isfinite(norms)  # NaN or inf in the row, or squares past float32's range
        if overflow.any():
            norms[overflow] = np.sqrt(np.einsum("ij,ij->i", all_emb[overflow], all_emb[overflow], dtype=np.float64))
            _first_bad_row(np.isfinite(norms), ends, names, "embeddings", "; check the model output")
        table_emb, changed = _normalise_rows(all_emb[keep], norms[keep], start, count, scene_names)
        del all_emb
        if changed:
            warnings.append(f"normalised {changed} detection embedding(s) that were not unit-norm "
                            f"(|norm - 1| > {UNIT_NORM_TOLERANCE:g}; docs/protocols.md (d))")
    no_area = int(np.count_nonzero((all_boxes[:, 2] <= all_boxes[:, 0]) | (all_boxes[:, 3] <= all_boxes[:, 1])))
    out = (all_boxes[:, 0] < 0) | (all_boxes[:, 1] < 0)
    if image_sizes is not None:
        height, width = np.repeat(np.array([image_sizes.get(n, (np.inf, np.inf)) for n in names],
                                           np.float64).reshape(-1, 2), sizes, axis=0).T
        out |= (all_boxes[:, 2] > width) | (all_boxes[:, 3] > height)
    outside = int(np.count_nonzero(out))
    table_boxes, table_scores = all_boxes[keep], all_scores[keep]
    scene = np.repeat(np.arange(len(scene_names)), count)
    if empty:
        warnings.append(f"{len(empty)} image(s) have an empty detection list (e.g. {example_names(empty)})")
    if unknown:
        warnings.append(f"ignored the detections of {len(unknown)} image name(s) that are not test scenes of "
                        f"{dataset_name} (e.g. {example_names(unknown)})")
    if no_area:
        warnings.append(f"{no_area} detection box(es) have no area (x2 <= x1 or y2 <= y1) and can never match")
    if outside:
        edge = "outside the image" if image_sizes is not None else "left of or above the image (negative coordinates)"
        warnings.append(f"{outside} detection box(es) reach {edge}")
    if len(table_scores) < FEW_DETECTIONS:
        warnings.append(f"only {len(table_scores)} detection(s) score >= {score_threshold:g} over all "
                        f"{len(scene_names)} scene(s) (fewer than {FEW_DETECTIONS}): an untrained detector?")
    return DetectionTable(tuple(scene_names), table_boxes, table_scores, table_emb, scene, start, count,
                          dim, has_entry, warnings)


def _normalise_rows(emb: np.ndarray, norms: np.ndarray, start, count, scene_names) -> tuple:
    """`emb` (a fresh float32 array) L2-normalised in place, and how many rows were not unit-norm;
    ValueError naming the image of an all-zero row."""
    if emb.shape[0] == 0:
        return np.ascontiguousarray(emb, np.float32), 0
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        s = int(np.searchsorted(start + count, zero[0], side="right"))
        raise ValueError(f"detections[{scene_names[s]!r}]: a detection scoring at least the threshold has an "
                         "all-zero embedding: it cannot be L2-normalised")
    changed = int(np.count_nonzero(np.abs(norms - 1.0) > UNIT_NORM_TOLERANCE))
    np.divide(emb, norms[:, None], out=emb, casting="unsafe")  # float64 norms: huge rows stay finite
    return emb, changed


def first_per_group(group: np.ndarray, *keys) -> np.ndarray:
    """Boolean mask of the entry of each `group` value that sorts first by `keys` (primary key
    first), e.g. `first_per_group(det, -iou, gt)`: per detection its highest-IoU box, ties to the lower box."""
    mask = np.zeros(group.shape[0], bool)
    if group.shape[0] == 0:
        return mask
    order = np.lexsort(tuple(reversed(keys)) + (group,))
    g = group[order]
    mask[order[np.concatenate([[True], g[1:] != g[:-1]])]] = True
    return mask


def _pairs(det_scene: np.ndarray, gt_start: np.ndarray, gt_count: np.ndarray) -> tuple:
    """(detection row, box row) of every detection-box pair within the same scene."""
    n = gt_count[det_scene]
    det = np.repeat(np.arange(det_scene.shape[0]), n)
    gt = np.repeat(gt_start[det_scene] - (np.cumsum(n) - n), n) + np.arange(int(n.sum()))
    return det, gt


def match_detections(det_boxes, det_scores, det_scene, gt_boxes, gt_scene, num_scenes: int,
                     matching: str = "mutual_best") -> np.ndarray:
    """Boolean [num detections]: which detections are true positives (docs/protocols.md (e)).

    `det_scene` / `gt_scene` give each row's scene (0..num_scenes-1); pairs never cross scenes.
    mutual_best: a pair with IoU >= 0.5 counts when the box is the detection's highest-IoU box and
    the detection the box's highest-IoU detection (ties to the lower index, as `np.argmax`).
    voc: detections by descending score (ties keep their order) each claim their highest-IoU box;
    the first claim of a box with IoU >= 0.5 is a true positive, the others are false positives.
    """
    gt_count = np.bincount(gt_scene, minlength=num_scenes).astype(np.int64)
    order = np.argsort(gt_scene, kind="stable")
    gt_start = np.concatenate([[0], np.cumsum(gt_count)[:-1]]).astype(np.int64)
    det, gt_sorted = _pairs(det_scene, gt_start, gt_count)
    gt = order[gt_sorted]
    iou = paired_iou(det_boxes[det], gt_boxes[gt])
    is_tp = np.zeros(det_scene.shape[0], bool)
    best_box = first_per_group(det, -iou, gt)
    if matching == "mutual_best":
        tp = (iou >= MATCH_IOU) & best_box & first_per_group(gt, -iou, det)
    else:
        rank = np.empty(det_scores.shape[0], np.int64)
        rank[np.argsort(-det_scores, kind="stable")] = np.arange(det_scores.shape[0])
        claim = best_box & (iou >= MATCH_IOU)
        tp = np.zeros_like(claim)
        tp[np.flatnonzero(claim)[first_per_group(gt[claim], rank[det[claim]])]] = True
    is_tp[det[tp]] = True
    return is_tp


def precision_recall(is_tp: np.ndarray, scores: np.ndarray, num_boxes: int, distinct: bool = True):
    """(precision, recall) along the detections by descending score; recall over `num_boxes`.

    distinct=True: one point per distinct score (tied scores form one threshold, as sklearn);
    distinct=False: one point per detection in stable order (the VOC curve).
    """
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(is_tp[order])
    seen = np.arange(1, order.shape[0] + 1)
    if distinct and order.shape[0]:
        s = scores[order]
        last = np.concatenate([s[1:] != s[:-1], [True]])
        tp, seen = tp[last], seen[last]
    return tp / np.maximum(seen, 1), tp / max(num_boxes, 1)


def average_precision(precision: np.ndarray, recall: np.ndarray, interpolated: bool) -> float:
    """Area under a precision-recall curve: sum of recall steps times precision (non-interpolated,
    sklearn style), or with precision replaced by its maximum to the right (VOC all-point)."""
    if recall.shape[0] == 0:
        return 0.0
    if interpolated:
        precision = np.maximum.accumulate(precision[::-1])[::-1]
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def _gt_arrays(gallery) -> tuple:
    boxes = [np.asarray(s.boxes, np.float64).reshape(-1, 4) for s in gallery]
    pids = [np.asarray(s.pids).reshape(-1) for s in gallery]
    scene = np.repeat(np.arange(len(gallery)), [len(b) for b in boxes])
    cat = np.concatenate(boxes) if boxes else np.zeros((0, 4))
    return cat, (np.concatenate(pids) if pids else np.zeros(0, np.int64)), scene


def evaluate_detection(detections, dataset, score_threshold: float = 0.5, matching: str = "mutual_best",
                       ap_score_threshold: float = 0.01, *, image_sizes=None) -> dict:
    """Detection AP and recall on the gallery scenes of `dataset` (docs/protocols.md (e)).

    Ground truth: every box of every `dataset.gallery` scene; a scene missing from `detections`
    has all its boxes missed. Embeddings are not used (an entry may be `(boxes, scores)`).

    Returns a dict: "ap" (detections scoring >= `ap_score_threshold`; mutual_best: sklearn-style AP
    times recall, voc: all-point interpolated), "recall" and "recall_labeled" (boxes whose pid is not
    `UNLABELED`) and "precision" at `score_threshold`, "recalls" = (precision, recall) 1-d arrays of
    the curve AP is computed from, "num_boxes", "num_labeled_boxes", "num_detections" (at
    `score_threshold`), "matching", "score_threshold", "ap_score_threshold", "warnings".
    """
    if matching not in MATCHINGS:
        raise ValueError(f"matching must be one of {MATCHINGS}, got {matching!r}")
    for arg, value in (("score_threshold", score_threshold), ("ap_score_threshold", ap_score_threshold)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value):
            raise ValueError(f"{arg} must be a finite number, got {value!r}")
    names = [s.name for s in dataset.gallery]
    gt_boxes, gt_pids, gt_scene = _gt_arrays(dataset.gallery)
    if gt_boxes.shape[0] == 0:
        raise ValueError(f"{dataset.name}: the gallery scenes have no annotated box: detection cannot be scored")
    labeled = gt_pids != UNLABELED
    table = prepare_detections(detections, names, min(score_threshold, ap_score_threshold),
                               need_embeddings=False, image_sizes=image_sizes, dataset_name=dataset.name)
    warnings = list(table.warnings)
    if len(set(names)) != len(names):
        warnings.append(f"{len(names) - len(set(names))} gallery scene name(s) are listed twice: "
                        "their detections are scored against the first one's boxes only")
    missed = int(np.count_nonzero(~table.has_entry[gt_scene]))
    if missed:
        absent = [n for n, h in zip(names, table.has_entry) if not h]
        warnings.append(f"{len(absent)} gallery scene(s) have no entry in detections: their {missed} box(es) "
                        f"count as missed (e.g. {example_names(absent)})")

    def tp_at(threshold, gt_mask):
        keep = table.scores >= threshold
        is_tp = match_detections(table.boxes[keep], table.scores[keep], table.scene[keep], gt_boxes[gt_mask],
                                 gt_scene[gt_mask], len(names), matching)
        return is_tp, table.scores[keep]

    is_tp, _ = tp_at(score_threshold, np.ones_like(labeled))
    is_tp_labeled, _ = tp_at(score_threshold, labeled)
    ap_tp, ap_scores = tp_at(ap_score_threshold, np.ones_like(labeled))
    curve = precision_recall(ap_tp, ap_scores, gt_boxes.shape[0], distinct=(matching == "mutual_best"))
    num_labeled = int(labeled.sum())
    if not num_labeled:
        warnings.append("no gallery box has an identity: recall_labeled is undefined (NaN)")
    return {
        "ap": average_precision(*curve, interpolated=(matching == "voc")),
        "recall": float(is_tp.sum() / gt_boxes.shape[0]),
        "recall_labeled": float(is_tp_labeled.sum() / num_labeled) if num_labeled else float("nan"),
        "precision": float(is_tp.mean()) if is_tp.size else float("nan"),
        "recalls": curve,
        "num_boxes": int(gt_boxes.shape[0]),
        "num_labeled_boxes": num_labeled,
        "num_detections": int(is_tp.size),
        "matching": matching,
        "score_threshold": float(score_threshold),
        "ap_score_threshold": float(ap_score_threshold),
        "warnings": warnings,
    }
