"""Detection losses of the person search network (OIM paper §3.1, §5.1; Faster R-CNN, Ren et al.
2015, Eq. 1): RPN objectness + box regression, box classification + box regression of the RoI head.
The identification loss is `reid_keras.losses.OIMLoss` over `models/oim.py:OIMMemory`.

Conventions (torchvision's detection losses, which SeqNet uses too):
- Labels come from `sampling.py`: anchors 1 positive / 0 negative / -1 not sampled; RoIs 1 person /
  0 background with `weights` 1 sampled / 0 padding.
- Box losses are smooth-L1 summed over the 4 deltas of the *positives* and divided by the number of
  *sampled* entries (positives and negatives), so a batch with few positives is not up-weighted.
- A batch with nothing sampled, or no positive, gives 0 (finite, finite gradients), never NaN.
- Any leading shape: [B, N] and [B * N] are the same to these functions (they flatten), so
  a RoI head output [B * S, k] pairs with labels [B, S].
- Every loss is a float32 scalar, whatever the dtype of the predictions (mixed precision).
- Normalised by this call's own counts: under MirroredStrategy each replica's loss is the mean over
  its own samples.

smooth-L1 beta: 1/9 for the RPN (py-faster-rcnn's sigma = 3, torchvision), 1 for the RoI head
(py-faster-rcnn's sigma = 1, on which the OIM paper's Caffe code is built (§5.1); SeqNet's default).
"""
from __future__ import annotations

import math

from keras import ops

RPN_BOX_BETA = 1.0 / 9.0
ROI_BOX_BETA = 1.0


def _check_beta(beta, function):
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"{function}: beta must be a finite number >= 0 (0 = plain L1), got {beta!r}")
    return float(beta)


def _static_size(shape):
    return None if any(d is None for d in shape) else math.prod(shape)


def _check_rows(function, labels_name, labels, other_name, other, trailing):
    """Static shape check: `other` is [..., trailing] (or labels' shape when trailing is None) and
    has as many rows as `labels` has elements."""
    if trailing is not None and (len(other.shape) < 1 or other.shape[-1] not in (None, trailing)):
        raise ValueError(f"{function}: {other_name} must have shape [..., {trailing}], got {tuple(other.shape)}")
    rows = other.shape[:-1] if trailing is not None else other.shape
    a, b = _static_size(labels.shape), _static_size(rows)
    if a is not None and b is not None and a != b:
        what = f"{other_name} has {b} rows" if trailing is not None else f"{other_name} has {b} entries"
        raise ValueError(f"{function}: {labels_name} has {a} entries but {what} (shapes {tuple(labels.shape)} "
                         f"and {tuple(other.shape)}): one per anchor / RoI")


def _flat(x, dtype, trailing=None):
    x = ops.cast(x, dtype)
    return ops.reshape(x, (-1,) if trailing is None else (-1, trailing))


def smooth_l1(pred, target, beta):
    """Element-wise smooth-L1 (Huber / beta): 0.5 d² / beta for |d| < beta, |d| - 0.5 beta otherwise.

    d = pred - target. Value (0.5 beta) and slope (±1) are continuous at |d| = beta; beta = 0 is
    plain |d|. Returns a float32 tensor of the broadcast shape (not reduced).
    """
    beta = _check_beta(beta, "smooth_l1")
    diff = ops.abs(ops.cast(pred, "float32") - ops.cast(target, "float32"))
    if beta == 0.0:
        return diff
    # Both branches are finite for finite d, so ops.where passes no NaN into the gradient.
    return ops.where(diff < beta, 0.5 * ops.square(diff) / beta, diff - 0.5 * beta)


def rpn_objectness_loss(labels, logits):
    """Sigmoid cross-entropy of the anchors' objectness, mean over the sampled anchors.

    Args:
        labels: [B, N] int, 1 positive, 0 negative, -1 not sampled (`sampling.anchor_targets`).
        logits: [B, N] objectness logits (`rpn.RPNHead`).

    Returns:
        float32 scalar; 0 when no anchor is sampled.
    """
    logits = ops.convert_to_tensor(logits)
    labels = ops.convert_to_tensor(labels)
    _check_rows("rpn_objectness_loss", "labels", labels, "logits", logits, None)
    labels, logits = _flat(labels, "int32"), _flat(logits, "float32")
    sampled = labels >= 0
    per_anchor = ops.binary_crossentropy(ops.cast(labels > 0, "float32"), logits, from_logits=True)
    total = ops.sum(ops.where(sampled, per_anchor, 0.0))
    return ops.divide_no_nan(total, ops.sum(ops.cast(sampled, "float32")))


def rpn_box_loss(labels, pred_deltas, box_targets, beta=RPN_BOX_BETA):
    """Smooth-L1 of the positive anchors' deltas, summed, / number of sampled anchors (torchvision).

    Args:
        labels: [B, N] int, 1 positive, 0 negative, -1 not sampled.
        pred_deltas: [B, N, 4] predicted RPN deltas (`rpn.RPNHead`).
        box_targets: [B, N, 4] RPN-encoded targets (`sampling.anchor_targets`; only positives read).
        beta: smooth-L1 switch point (1/9).

    Returns:
        float32 scalar; 0 when there is no positive.
    """
    beta = _check_beta(beta, "rpn_box_loss")
    return _box_loss("rpn_box_loss", labels, pred_deltas, box_targets, None, beta, "pred_deltas")


def box_classification_loss(labels, logits, weights=None):
    """Person / background cross-entropy of the sampled RoIs, weighted mean (OIM §3.1 "Softmax classifier").

    Args:
        labels: [B, S] int, 1 person, 0 background (`sampling.roi_targets`).
        logits: [B, S, 2] or [B * S, 2]: 2-way softmax, column 0 background, column 1 person
            (the label is the column, as torchvision / SeqNet); or [..., 1]: one sigmoid logit of
            "person" (binary cross-entropy; equal to the 2-way softmax with logits (0, z)).
        weights: [B, S] float, 1 sampled, 0 padding; None = all 1.

    Returns:
        float32 scalar, sum(weights * CE) / sum(weights); 0 when every weight is 0.
    """
    logits = ops.convert_to_tensor(logits)
    labels = ops.convert_to_tensor(labels)
    classes = logits.shape[-1] if len(logits.shape) else None
    if classes not in (1, 2):
        raise ValueError(f"box_classification_loss: logits must have shape [..., 2] (background, person) or "
                         f"[..., 1] (sigmoid person logit), got {tuple(logits.shape)}")
    _check_rows("box_classification_loss", "labels", labels, "logits", logits, classes)
    weights = _weights("box_classification_loss", labels, weights)
    labels, logits = _flat(labels, "int32"), _flat(logits, "float32", classes)
    person = labels > 0
    if classes == 2:
        per_roi = ops.sparse_categorical_crossentropy(ops.cast(person, "int32"), logits, from_logits=True)
    else:
        per_roi = ops.binary_crossentropy(ops.cast(person, "float32"), logits[:, 0], from_logits=True)
    used = weights > 0
    total = ops.sum(ops.where(used, per_roi * weights, 0.0))
    return ops.divide_no_nan(total, ops.sum(ops.where(used, weights, 0.0)))


def box_regression_loss(labels, pred, targets, weights=None, beta=ROI_BOX_BETA):
    """Smooth-L1 of the person RoIs' class-agnostic deltas, summed, / number of sampled RoIs.

    Args:
        labels: [B, S] int, 1 person, 0 background.
        pred: [B, S, 4] or [B * S, 4] predicted deltas (`heads.BoxPredictor`).
        targets: [B, S, 4] RoI-encoded targets (`sampling.roi_targets`; only persons read).
        weights: [B, S] float >= 0, 1 sampled, 0 padding; None = all 1. A RoI's loss is scaled by
            its weight and the sum divided by sum(weights).
        beta: smooth-L1 switch point (1, py-faster-rcnn's RoI head).

    Returns:
        float32 scalar; 0 when there is no person RoI.
    """
    beta = _check_beta(beta, "box_regression_loss")
    return _box_loss("box_regression_loss", labels, pred, targets, weights, beta, "pred")


def _weights(function, labels, weights):
    if weights is None:
        return ops.ones_like(_flat(labels, "float32"))
    weights = ops.convert_to_tensor(weights)
    _check_rows(function, "labels", labels, "weights", weights, None)
    return _flat(weights, "float32")


def _box_loss(function, labels, pred, targets, weights, beta, pred_name):
    pred, targets = ops.convert_to_tensor(pred), ops.convert_to_tensor(targets)
    labels = ops.convert_to_tensor(labels)
    _check_rows(function, "labels", labels, pred_name, pred, 4)
    _check_rows(function, "labels", labels, "box_targets" if function == "rpn_box_loss" else "targets",
                targets, 4)
    if weights is None:  # RPN: sampled = label >= 0
        weights = ops.cast(_flat(labels, "int32") >= 0, "float32")
    else:
        weights = _weights(function, labels, weights)
    labels = _flat(labels, "int32")
    per_box = ops.sum(smooth_l1(_flat(pred, "float32", 4), _flat(targets, "float32", 4), beta), axis=-1)
    positive = (labels > 0) & (weights > 0)
    total = ops.sum(ops.where(positive, per_box * weights, 0.0))
    return ops.divide_no_nan(total, ops.sum(ops.where(weights > 0, weights, 0.0)))
