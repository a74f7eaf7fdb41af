"""Training targets of the detector: labelled, sampled anchors (RPN) and RoIs (box head + OIM).

Faster R-CNN's matching and balanced sampling (OIM paper §3.1, §5.1 via py-faster-rcnn), written as
in-graph operations with static shapes: no Python loop over images or boxes, so both functions
run inside a `tf.function` / Keras model. Ground truth comes padded as in the scene pipeline:
`gt_boxes` [B, M, 4], `gt_mask` [B, M] (False = padding row, never matched whatever its box).

Sampling draws one uniform key per candidate from `tf.random.stateless_uniform(seed)` and keeps
the candidates with the largest keys (top-k), so the same seed gives the same sample and a
different seed another one. TensorFlow ops are used directly where Keras has no equivalent
(stateless random numbers, top-k with a per-image count, scatter).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from reid_keras.models.oim import IGNORE
from reid_keras.models.person_search.boxes import RPN_BOX_WEIGHTS, ROI_BOX_WEIGHTS, encode_boxes, pairwise_iou

POSITIVE, NEGATIVE, NOT_SAMPLED = 1, 0, -1  # anchor labels
PERSON, BACKGROUND = 1, 0  # RoI labels


def _check_count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _check_fraction(value, name: str, low_open: bool = True) -> float:
    ok = isinstance(value, (int, float, np.number)) and not isinstance(value, bool) and np.isfinite(value)
    if not ok or not ((0.0 < value) if low_open else (0.0 <= value)) or value > 1.0:
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def _check_ground_truth(gt_boxes, gt_mask):
    gt_boxes = tf.convert_to_tensor(gt_boxes, tf.float32)
    gt_mask = tf.cast(gt_mask, tf.bool)
    if gt_boxes.shape.rank != 3 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must have shape [B, M, 4] (x1, y1, x2, y2), got {tuple(gt_boxes.shape)}")
    if gt_mask.shape.rank != 2:
        raise ValueError(f"gt_mask must have shape [B, M] (False = padding row), got {tuple(gt_mask.shape)}")
    if not gt_mask.shape.is_compatible_with(gt_boxes.shape[:2]):
        raise ValueError(f"gt_mask must have shape [B, M] = {tuple(gt_boxes.shape[:2])} like gt_boxes, "
                         f"got {tuple(gt_mask.shape)}")
    # One extra padding row: every image has a column to take max / argmax over, also when M = 0.
    return (tf.pad(gt_boxes, [[0, 0], [0, 1], [0, 0]]), tf.pad(gt_mask, [[0, 0], [0, 1]]))


def _check_seed(seed):
    seed = tf.convert_to_tensor(seed)
    if not seed.dtype.is_integer or seed.shape.rank != 1 or seed.shape[0] not in (None, 2):
        raise ValueError(f"seed must be an integer tensor of shape [2] (stateless random seed), "
                         f"got dtype {seed.dtype.name} shape {tuple(seed.shape)}")
    return tf.cast(seed, tf.int64)


def _sample(candidates, count, max_count: int, keys):
    """[B, N] bool: per image, the `count` [B] candidates with the largest `keys` (count <= #candidates)."""
    n = candidates.shape[1]
    k = min(max_count, n) if n is not None else tf.minimum(max_count, tf.shape(candidates)[1])
    _, index = tf.math.top_k(tf.where(candidates, keys, -1.0), k=k)  # candidates first, by key
    take = tf.range(tf.shape(index)[1])[None, :] < count[:, None]
    batch = tf.broadcast_to(tf.range(tf.shape(index)[0])[:, None], tf.shape(index))
    hits = tf.scatter_nd(tf.stack([batch, index], axis=-1), tf.cast(take, tf.int32), tf.shape(candidates))
    return hits > 0


def _balanced_counts(positive, negative, num_samples: int, positive_fraction: float):
    """Per image: min(#positive, num_samples * fraction) positives, then negatives up to num_samples."""
    max_positive = int(num_samples * positive_fraction)
    num_positive = tf.minimum(tf.reduce_sum(tf.cast(positive, tf.int32), axis=1), max_positive)
    num_negative = tf.minimum(tf.reduce_sum(tf.cast(negative, tf.int32), axis=1), num_samples - num_positive)
    return max_positive, num_positive, num_negative


def anchor_targets(anchors, gt_boxes, gt_mask, image_shape, seed, num_samples=256, positive_fraction=0.5,
                   positive_iou=0.7, negative_iou=0.3, allow_low_quality=True, straddle=None):
    """RPN training targets: label, sample and encode the anchors (Faster R-CNN, OIM paper §3.1).

    An anchor is positive if its IoU with a (non-padding) ground-truth box is >= `positive_iou`,
    or, with `allow_low_quality`, if it is (one of the tied) best anchor(s) of some ground-truth box
    with IoU > 0; negative if its best IoU is < `negative_iou` and it is not positive; otherwise
    ignored. An image without ground truth has only negatives. Then at most
    `num_samples * positive_fraction` positives are drawn at random, and negatives fill
    `num_samples` (torchvision's BalancedPositiveNegativeSampler).

    Args:
        anchors: [N, 4] (`boxes.generate_anchors`).
        gt_boxes: [B, M, 4]; gt_mask: [B, M] bool, False = padding row (never matched).
        image_shape: [B, 2] int (height, width before padding); used only with `straddle`.
        seed: [2] int, stateless random seed of the sampling.
        num_samples: anchors sampled per image (paper / py-faster-rcnn: 256).
        positive_fraction: at most this fraction of them positive (0.5).
        positive_iou, negative_iou: the IoU thresholds (0.7 / 0.3).
        allow_low_quality: also make the best anchor(s) of each ground-truth box positive.
        straddle: None (default) keeps anchors that cross the image border, as torchvision /
            SeqNet do (border anchors are ordinary negatives or positives; anchors over the
            zero padding of a batch are plain negatives). A number t >= 0 labels the anchors
            reaching more than t pixels outside their image NOT_SAMPLED (py-faster-rcnn's
            allowed border, t = 0).

    Returns:
        (labels [B, N] int32: 1 positive, 0 negative, -1 not sampled;
         box_targets [B, N, 4] float32: `encode_boxes(anchor, matched gt, RPN_BOX_WEIGHTS)` where
         the label is 1, zeros elsewhere).
    """
    num_samples = _check_count(num_samples, "num_samples")
    positive_fraction = _check_fraction(positive_fraction, "positive_fraction")
    positive_iou = _check_fraction(positive_iou, "positive_iou")
    negative_iou = _check_fraction(negative_iou, "negative_iou", low_open=False)
    if negative_iou > positive_iou:
        raise ValueError(f"negative_iou ({negative_iou}) must be <= positive_iou ({positive_iou})")
    if straddle is not None and not (isinstance(straddle, (int, float, np.number)) and not isinstance(straddle, bool)
                                     and np.isfinite(straddle) and straddle >= 0):
        raise ValueError(f"straddle must be None (keep border anchors) or a number of pixels >= 0, got {straddle!r}")
    anchors = tf.convert_to_tensor(anchors, tf.float32)
    if anchors.shape.rank != 2 or anchors.shape[-1] != 4:
        raise ValueError(f"anchors must have shape [N, 4] (x1, y1, x2, y2), got {tuple(anchors.shape)}")
    gt_boxes, gt_mask = _check_ground_truth(gt_boxes, gt_mask)
    image_shape = tf.cast(tf.convert_to_tensor(image_shape), tf.float32)
    if image_shape.shape.rank != 2 or image_shape.shape[-1] != 2:
        raise ValueError(f"image_shape must have shape [B, 2] (height, width), got {tuple(image_shape.shape)}")
    seed = _check_seed(seed)

    usable = tf.ones_like(gt_mask[:, :1], tf.bool) & tf.ones([1, tf.shape(anchors)[0]], tf.bool)  # [B, N]
    if straddle is not None:
        t = float(straddle)
        height, width = image_shape[:, None, 0], image_shape[:, None, 1]
        usable = ((anchors[None, :, 0] >= -t) & (anchors[None, :, 1] >= -t)
                  & (anchors[None, :, 2] <= width + t) & (anchors[None, :, 3] <= height + t))
    iou = pairwise_iou(gt_boxes, anchors)  # [B, M, N]
    iou = tf.where(gt_mask[:, :, None] & usable[:, None, :], iou, -1.0)
    best_iou = tf.reduce_max(iou, axis=1)  # [B, N], -1 when the image has no ground truth
    matches = tf.argmax(iou, axis=1, output_type=tf.int32)
    positive = best_iou >= positive_iou
    if allow_low_quality:
        best_of_gt = tf.reduce_max(iou, axis=2, keepdims=True)  # [B, M, 1]
        is_best = tf.equal(iou, best_of_gt) & (best_of_gt > 0.0)  # ties all count (torchvision)
        positive |= tf.reduce_any(is_best, axis=1)
    negative = (best_iou < negative_iou) & ~positive & usable

    max_positive, num_positive, num_negative = _balanced_counts(positive, negative, num_samples, positive_fraction)
    keys = tf.random.stateless_uniform(tf.shape(best_iou), seed)
    sampled_positive = _sample(positive, num_positive, max_positive, keys)
    sampled_negative = _sample(negative, num_negative, num_samples, keys)
    labels = tf.where(sampled_positive, POSITIVE, tf.where(sampled_negative, NEGATIVE, NOT_SAMPLED))

    matched_boxes = tf.gather(gt_boxes, matches, batch_dims=1)  # [B, N, 4]
    deltas = encode_boxes(anchors[None], matched_boxes, RPN_BOX_WEIGHTS)
    box_targets = tf.where(sampled_positive[:, :, None], deltas, 0.0)
    return tf.stop_gradient(labels), tf.stop_gradient(box_targets)


def roi_targets(proposals, gt_boxes, gt_pids, gt_mask, seed, num_samples=128, positive_fraction=0.5,
                foreground_iou=0.5, background_iou=(0.0, 0.5), add_ground_truth=True, proposal_mask=None):
    """Training RoIs of the box head and identification net, with their targets (OIM paper §3.1, §3.2).

    Each candidate (the proposals, plus the ground-truth boxes with `add_ground_truth`) takes the
    ground-truth box it overlaps most: IoU >= `foreground_iou` makes it a person whose identity is
    that box's pid (a label >= 0 for the lookup table, UNLABELED -1 for the queue); IoU in
    [background_iou[0], background_iou[1]) makes it background (pid IGNORE -2: no OIM term);
    anything else is never sampled. At most `num_samples * positive_fraction` persons are drawn at
    random, background fills up to `num_samples`; if there are not enough candidates the last rows
    are padding (weight 0, zero box). Rows are persons first, then background, then padding.

    Args:
        proposals: [B, P, 4] (RPN proposals; gradients are stopped here).
        gt_boxes: [B, M, 4]; gt_pids: [B, M] int; gt_mask: [B, M] bool (False = padding row).
        seed: [2] int, stateless random seed of the sampling.
        num_samples: S, RoIs per image (128).
        positive_fraction: at most this fraction persons (the issue: 1/4 to 1/2).
        foreground_iou: IoU making a candidate a person (0.5).
        background_iou: (low, high) IoU range of background, low inclusive, high exclusive.
        add_ground_truth: append the ground-truth boxes to the candidates (training).
        proposal_mask: optional [B, P] bool, False = padding proposal (the proposal layer's
            `valid`); such a row is never sampled. Default: all proposals valid.

    Returns:
        dict: "rois" [B, S, 4] float32, "labels" [B, S] int32 (1 person, 0 background or padding),
        "pids" [B, S] int32 (identity, UNLABELED -1, or IGNORE -2 for background and padding),
        "box_targets" [B, S, 4] float32 (`encode_boxes(roi, matched gt, ROI_BOX_WEIGHTS)` for persons,
        zeros elsewhere), "weights" [B, S] float32 (1 sampled, 0 padding).
    """
    num_samples = _check_count(num_samples, "num_samples")
    positive_fraction = _check_fraction(positive_fraction, "positive_fraction")
    foreground_iou = _check_fraction(foreground_iou, "foreground_iou")
    try:
        low, high = (float(v) for v in background_iou)
    except (TypeError, ValueError):
        raise ValueError(f"background_iou must be a pair (low, high), got {background_iou!r}") from None
    if not 0.0 <= low < high <= foreground_iou:
        raise ValueError(f"background_iou must satisfy 0 <= low < high <= foreground_iou={foreground_iou}, "
                         f"got {background_iou!r}")
    proposals = tf.stop_gradient(tf.convert_to_tensor(proposals, tf.float32))
    if proposals.shape.rank != 3 or proposals.shape[-1] != 4:
        raise ValueError(f"proposals must have shape [B, P, 4] (x1, y1, x2, y2), got {tuple(proposals.shape)}")
    gt_pids = tf.cast(gt_pids, tf.int32)
    if gt_pids.shape.rank != 2:
        raise ValueError(f"gt_pids must have shape [B, M], got {tuple(gt_pids.shape)}")
    gt_boxes, gt_mask = _check_ground_truth(gt_boxes, gt_mask)
    gt_pids = tf.pad(gt_pids, [[0, 0], [0, 1]], constant_values=IGNORE)
    seed = _check_seed(seed)
    if proposal_mask is None:
        proposal_mask = tf.ones(tf.shape(proposals)[:2], tf.bool)
    proposal_mask = tf.cast(proposal_mask, tf.bool)
    if proposal_mask.shape.rank != 2 or not proposal_mask.shape.is_compatible_with(proposals.shape[:2]):
        raise ValueError(f"proposal_mask must have shape [B, P] = {tuple(proposals.shape[:2])} like the proposals, "
                         f"got {tuple(proposal_mask.shape)}")

    candidates, usable = proposals, proposal_mask
    if add_ground_truth:
        candidates = tf.concat([candidates, gt_boxes], axis=1)
        usable = tf.concat([usable, gt_mask], axis=1)
    missing = tf.maximum(num_samples - tf.shape(candidates)[1], 0)  # top-k needs >= S candidates
    candidates = tf.pad(candidates, [[0, 0], [0, missing], [0, 0]])
    usable = tf.pad(usable, [[0, 0], [0, missing]])

    iou = tf.where(gt_mask[:, None, :], pairwise_iou(candidates, gt_boxes), -1.0)  # [B, C, M]
    best_iou = tf.maximum(tf.reduce_max(iou, axis=2), 0.0)  # no ground truth: IoU 0, background
    matches = tf.argmax(iou, axis=2, output_type=tf.int32)
    person = usable & (best_iou >= foreground_iou)
    background = usable & ~person & (best_iou >= low) & (best_iou < high)

    max_person, num_person, num_background = _balanced_counts(person, background, num_samples, positive_fraction)
    keys = tf.random.stateless_uniform(tf.shape(best_iou), seed)
    sampled_person = _sample(person, num_person, max_person, keys)
    sampled_background = _sample(background, num_background, num_samples, keys)
    order_key = tf.where(sampled_person, 2.0 + keys, tf.where(sampled_background, 1.0 + keys, -1.0))
    _, index = tf.math.top_k(order_key, k=num_samples)  # [B, S]: persons, background, padding

    sampled = tf.gather(sampled_person | sampled_background, index, batch_dims=1)
    is_person = tf.gather(sampled_person, index, batch_dims=1)
    rois = tf.where(sampled[:, :, None], tf.gather(candidates, index, batch_dims=1), 0.0)
    matched = tf.gather(matches, index, batch_dims=1)
    matched_boxes = tf.gather(gt_boxes, matched, batch_dims=1)
    box_targets = tf.where(is_person[:, :, None], encode_boxes(rois, matched_boxes, ROI_BOX_WEIGHTS), 0.0)
    pids = tf.where(is_person, tf.gather(gt_pids, matched, batch_dims=1), IGNORE)
    return {"rois": rois, "labels": tf.where(is_person, PERSON, BACKGROUND), "pids": pids,
            "box_targets": box_targets, "weights": tf.cast(sampled, tf.float32)}
