"""Anchors and box coding for the person-search detector (OIM paper §3.1, after Faster R-CNN).

Boxes are `x1, y1, x2, y2` float32 in the pixels of the (resized, padded) input image; a box's
width is `x2 - x1` (no "+1" pixel convention). Box deltas are the Faster R-CNN parametrisation in
the order `(dx, dy, dw, dh)`, multiplied by per-coordinate `weights`:

    dx = wx (x - xa) / wa    dy = wy (y - ya) / ha    dw = ww log(w / wa)    dh = wh log(h / ha)

with (x, y, w, h) the centre and size of the box and (xa, ya, wa, ha) those of the reference box
(anchor or RoI). The RPN uses weights 1 (`RPN_BOX_WEIGHTS`), the box regressor on the RoIs
(10, 10, 5, 5) (`ROI_BOX_WEIGHTS`), as in py-faster-rcnn / torchvision.

Built on `keras.utils.bounding_boxes` (IoU, encode, decode, clip). Its decoder does not clamp the
log-size deltas (a delta of 100 gives exp(100) = inf pixels); `decode_boxes` clamps dw and dh at
`MAX_LOG_RATIO` = log(1000 / 16) first, so a box grows at most 62.5 times its reference, as in
torchvision.
"""
from __future__ import annotations

import math

import numpy as np
from keras import ops
from keras.utils import bounding_boxes

RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
MAX_LOG_RATIO = math.log(1000.0 / 16)


def _positive_numbers(values, name: str) -> tuple:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of positive numbers, got {values!r}") from None
    if not out or not all(np.isfinite(v) and v > 0 for v in out):
        raise ValueError(f"{name} must be a non-empty sequence of positive numbers, got {values!r}")
    return out


def _box_weights(weights) -> tuple:
    out = _positive_numbers(weights, "weights")
    if len(out) != 4:
        raise ValueError(f"weights must hold 4 positive numbers (wx, wy, ww, wh), got {weights!r}")
    return out


def _check_boxes(boxes, name: str, min_rank: int = 1):
    boxes = ops.convert_to_tensor(boxes, "float32")
    if len(boxes.shape) < min_rank or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape [..., 4] (x1, y1, x2, y2) with at least {min_rank} "
                         f"dimension(s), got shape {tuple(boxes.shape)}")
    return boxes


def generate_anchors(feature_height, feature_width, stride, sizes, ratios, offset=0.0):
    """Anchors of every location of a feature map (Faster R-CNN RPN, OIM paper §3.1).

    Args:
        feature_height, feature_width: Hf, Wf of the feature map (ints or scalar int tensors:
            the map size may be dynamic).
        stride: pixels of the input image per feature-map step (16 for the ResNet-50 stem).
        sizes: anchor sizes s in pixels (sqrt of the area).
        ratios: aspect ratios r = h / w. An anchor of size s and ratio r has
            w = s / sqrt(r), h = s * sqrt(r) (area s², not rounded to whole pixels).
        offset: centre of location (y, x) is ((x + offset) * stride, (y + offset) * stride).
            Default 0, the torchvision / SeqNet convention, and where keras.applications ResNet-50
            centres its cells: its stride-2 convolutions sample input 2i, so the receptive field
            of `conv4_block6_out` cell (y, x) is centred on pixel (16 y, 16 x) (measured: cell
            (12, 15) of a 512 x 512 input sees rows 47..337, columns 95..385). Use 0.5 for a
            backbone whose cells are centred at stride / 2.

    Returns:
        float32 tensor [Hf * Wf * A, 4] (x1, y1, x2, y2), A = len(sizes) * len(ratios); rows are
        row-major over locations (y, then x), then the A anchors of a location size-major,
        ratio-minor: the order of an RPN output [B, Hf, Wf, A * k] reshaped to [B, Hf*Wf*A, k].

    Example:
        >>> generate_anchors(2, 2, 16, sizes=(32, 64), ratios=(0.5, 1.0, 2.0))  # [24, 4]
    """
    sizes = _positive_numbers(sizes, "sizes")
    ratios = _positive_numbers(ratios, "ratios")
    if isinstance(stride, bool) or not isinstance(stride, (int, float, np.number)) or not 0 < stride < np.inf:
        raise ValueError(f"stride must be a positive number (input pixels per feature-map step), got {stride!r}")
    if not np.isfinite(float(offset)):
        raise ValueError(f"offset must be a finite number, got {offset!r}")
    s = np.asarray(sizes, np.float64)[:, None]
    r = np.asarray(ratios, np.float64)[None, :]
    half_w = (s / np.sqrt(r) / 2).reshape(-1)  # size-major, ratio-minor
    half_h = (s * np.sqrt(r) / 2).reshape(-1)
    base = ops.convert_to_tensor(np.stack([-half_w, -half_h, half_w, half_h], axis=1), "float32")  # [A, 4]
    ys = (ops.cast(ops.arange(feature_height), "float32") + float(offset)) * float(stride)
    xs = (ops.cast(ops.arange(feature_width), "float32") + float(offset)) * float(stride)
    cy, cx = ops.meshgrid(ys, xs, indexing="ij")  # [Hf, Wf]
    centres = ops.reshape(ops.stack([cx, cy, cx, cy], axis=-1), (-1, 1, 4))  # [Hf*Wf, 1, 4]
    return ops.reshape(centres + base[None], (-1, 4))


def box_area(boxes):
    """Area of `x1, y1, x2, y2` boxes [..., 4] -> [...]; 0 for boxes with x2 < x1 or y2 < y1."""
    boxes = _check_boxes(boxes, "boxes")
    return ops.maximum(boxes[..., 2] - boxes[..., 0], 0.0) * ops.maximum(boxes[..., 3] - boxes[..., 1], 0.0)


def pairwise_iou(boxes_a, boxes_b):
    """IoU of every box of `boxes_a` [..., N, 4] with every box of `boxes_b` [..., M, 4] -> [..., N, M].

    Both ranks 2 ([N, 4] with [M, 4]) and batched ([B, N, 4] with [B, M, 4], or one side
    unbatched) go through `keras.utils.bounding_boxes.compute_iou`; higher ranks must share their
    leading dimensions, which are flattened into one batch. A box of zero area has IoU 0 with
    everything (the union gets keras' epsilon), so zero-padding rows never match.
    """
    a = _check_boxes(boxes_a, "boxes_a", min_rank=2)
    b = _check_boxes(boxes_b, "boxes_b", min_rank=2)
    if len(a.shape) <= 3 and len(b.shape) <= 3:
        return bounding_boxes.compute_iou(a, b, bounding_box_format="xyxy")
    if len(a.shape) != len(b.shape):
        raise ValueError(f"pairwise_iou: boxes_a {tuple(a.shape)} and boxes_b {tuple(b.shape)} must have the same "
                         "rank when it is above 3 (shared leading dimensions)")
    lead = ops.shape(a)[:-2]
    flat = bounding_boxes.compute_iou(ops.reshape(a, (-1,) + tuple(ops.shape(a)[-2:])),
                                      ops.reshape(b, (-1,) + tuple(ops.shape(b)[-2:])), bounding_box_format="xyxy")
    return ops.reshape(flat, tuple(lead) + (ops.shape(a)[-2], ops.shape(b)[-2]))


def encode_boxes(reference, boxes, weights):
    """Deltas (dx, dy, dw, dh) that move `reference` boxes onto `boxes` (module docstring).

    Args:
        reference: anchors or RoIs [..., 4] (x1, y1, x2, y2), broadcastable against `boxes`
            (anchors [N, 4] with boxes [B, N, 4] is fine).
        boxes: target boxes [..., 4].
        weights: (wx, wy, ww, wh), `RPN_BOX_WEIGHTS` or `ROI_BOX_WEIGHTS`.

    Returns:
        float32 deltas with the broadcast shape of the inputs. Widths and heights below keras'
        epsilon are taken as epsilon, so the deltas stay finite for degenerate boxes.
    """
    weights = _box_weights(weights)
    reference = _check_boxes(reference, "reference")
    boxes = _check_boxes(boxes, "boxes")
    deltas = bounding_boxes.encode_box_to_deltas(reference, boxes, anchor_format="xyxy", box_format="xyxy",
                                                 encoding_format="center_xywh")
    return deltas * ops.convert_to_tensor(weights, "float32")


def decode_boxes(reference, deltas, weights, max_log_ratio=MAX_LOG_RATIO):
    """Boxes obtained by applying `deltas` (dx, dy, dw, dh) to `reference` (inverse of `encode_boxes`).

    dw / ww and dh / wh are clamped at `max_log_ratio` before exp, so a decoded box is finite and at
    most exp(max_log_ratio) = 62.5 times as wide / tall as its reference (upper clamp only, as in
    torchvision: a very negative delta gives a width near 0, which is finite). Returns float32 boxes
    [..., 4], not clipped to the image (`clip_boxes`).
    """
    weights = _box_weights(weights)
    if not (isinstance(max_log_ratio, (int, float, np.number)) and np.isfinite(max_log_ratio)):
        raise ValueError(f"max_log_ratio must be a finite number, got {max_log_ratio!r}")
    reference = _check_boxes(reference, "reference")
    deltas = _check_boxes(deltas, "deltas") / ops.convert_to_tensor(weights, "float32")
    deltas = ops.concatenate([deltas[..., :2], ops.minimum(deltas[..., 2:], float(max_log_ratio))], axis=-1)
    return bounding_boxes.decode_deltas_to_boxes(reference, deltas, anchor_format="xyxy", box_format="xyxy",
                                                 encoded_format="center_xywh")


def clip_boxes(boxes, image_shape):
    """Clip `boxes` [..., N, 4] to their image: x to [0, width], y to [0, height].

    Args:
        boxes: [N, 4] or [B, N, 4] (x1, y1, x2, y2).
        image_shape: [2] (height, width) for all boxes, or [B, 2], one per image of a [B, N, 4]
            batch (the size before padding, `image_shape` of the scene pipeline).
    """
    boxes = _check_boxes(boxes, "boxes")
    shape = ops.cast(ops.convert_to_tensor(image_shape), "float32")
    if len(shape.shape) not in (1, 2) or shape.shape[-1] != 2:
        raise ValueError(f"image_shape must be [2] (height, width) or [B, 2], got shape {tuple(shape.shape)}")
    if len(shape.shape) == 2:
        if len(boxes.shape) != 3:
            raise ValueError(f"image_shape [B, 2] needs boxes of shape [B, N, 4], got {tuple(boxes.shape)}")
        shape = shape[:, None, None, :]  # broadcasts over the N boxes and their coordinates
    clipped = bounding_boxes.clip_to_image_size({"boxes": boxes}, height=shape[..., 0], width=shape[..., 1],
                                                bounding_box_format="xyxy")
    return clipped["boxes"]
