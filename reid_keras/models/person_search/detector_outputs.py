"""Inference post-processing of the person-search network: RoI-head outputs -> final detections.

Per image, as the OIM paper's test procedure (§3.1, §5.1, after py-faster-rcnn) and SeqNet's:

    person score = softmax(class logits)[person]
    refined box  = the proposal moved by the class-agnostic deltas (`boxes.ROI_BOX_WEIGHTS`, width /
                   height growth clamped), clipped to the image's own size (before padding)
    drop         padding proposals, scores below `min_score`, boxes with no area, non-finite values
    greedy NMS   a box is suppressed by a better-scored kept one when their IoU is > `nms_iou`
                 (torchvision's rule, as `rpn.generate_proposals`), then the best `max_detections`

Each detection keeps the embedding of its proposal's RoI feature: the network runs once on the
proposals, as in the paper (§3.1: one pass, the id-feat and the box regressor share the 2048-d
feature). SeqNet re-pools the refined boxes for a second pass; that is a different model (and
twice the conv5 cost) - not done here.

Shapes are static: `max_detections` rows per image, valid ones first by decreasing score, then
padding rows (zeros, `valid = False`).
"""
from __future__ import annotations

import math

import tensorflow as tf

from reid_keras.models.person_search.boxes import ROI_BOX_WEIGHTS, clip_boxes, decode_boxes
from reid_keras.models.person_search.heads import PERSON

DETECTION_KEYS = ("boxes", "scores", "embeddings", "valid")


def select_detections(proposals, proposal_valid, class_logits, box_deltas, embeddings, image_shape,
                      nms_iou: float, min_score: float, max_detections: int) -> dict:
    """Final detections of a batch from the RoI head run on its proposals (module docstring).

    Args:
        proposals: [B, P, 4] float32 proposals (x1, y1, x2, y2, input-image pixels).
        proposal_valid: [B, P] bool, False = padding proposal.
        class_logits: [B * P, 2] (background, person) logits of `heads.BoxPredictor`.
        box_deltas: [B * P, 4] class-agnostic deltas in `ROI_BOX_WEIGHTS` units.
        embeddings: [B * P, D] unit-norm embeddings of the proposals.
        image_shape: [B, 2] height, width of each image before padding.
        nms_iou: IoU above which the worse of two detections is suppressed (0.4 in SeqNet / OIM code).
        min_score: detections scoring below it are dropped.
        max_detections: rows per image.

    Returns:
        dict "boxes" [B, K, 4] float32, "scores" [B, K] float32, "embeddings" [B, K, D] float32,
        "valid" [B, K] bool, K = max_detections.
    """
    proposals = tf.cast(proposals, tf.float32)
    batch, count = tf.shape(proposals)[0], tf.shape(proposals)[1]
    dim = embeddings.shape[-1]
    scores = tf.reshape(tf.nn.softmax(tf.cast(class_logits, tf.float32), axis=-1)[:, PERSON], [batch, count])
    deltas = tf.reshape(tf.cast(box_deltas, tf.float32), [batch, count, 4])
    embeddings = tf.reshape(tf.cast(embeddings, tf.float32), [batch, count, dim])
    boxes = clip_boxes(decode_boxes(proposals, deltas, ROI_BOX_WEIGHTS), image_shape)
    widths, heights = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    keep = (tf.cast(proposal_valid, tf.bool) & (scores >= min_score) & (widths > 0) & (heights > 0)
            & tf.math.is_finite(scores) & tf.reduce_all(tf.math.is_finite(boxes), axis=-1))
    ranked = tf.where(keep, scores, tf.constant(-math.inf, tf.float32))

    def suppress(image):
        # One image at a time through TensorFlow's greedy kernel (a loop over the batch, not over
        # boxes); dropped boxes score -inf, which is not > score_threshold = -inf: never selected.
        image_boxes, image_scores = image
        selected = tf.raw_ops.NonMaxSuppressionV4(
            boxes=image_boxes, scores=image_scores, max_output_size=max_detections, iou_threshold=float(nms_iou),
            score_threshold=-math.inf, pad_to_max_output_size=True)
        return selected.selected_indices, selected.valid_outputs

    index, num_valid = tf.map_fn(
        suppress, (boxes, ranked),
        fn_output_signature=(tf.TensorSpec([max_detections], tf.int32), tf.TensorSpec([], tf.int32)))
    valid = tf.range(max_detections)[None, :] < num_valid[:, None]
    return {"boxes": tf.where(valid[..., None], tf.gather(boxes, index, batch_dims=1), 0.0),
            "scores": tf.where(valid, tf.gather(scores, index, batch_dims=1), 0.0),
            "embeddings": tf.where(valid[..., None], tf.gather(embeddings, index, batch_dims=1), 0.0),
            "valid": valid}
