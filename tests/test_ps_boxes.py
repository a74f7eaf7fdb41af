"""Anchors and box coding of the person-search detector (models/person_search/boxes.py)."""
import math

import numpy as np
import pytest
import tensorflow as tf

from reid_keras.models.person_search.boxes import (MAX_LOG_RATIO, ROI_BOX_WEIGHTS, RPN_BOX_WEIGHTS, box_area,
                                                   clip_boxes, decode_boxes, encode_boxes, generate_anchors,
                                                   pairwise_iou)

R2 = math.sqrt(2.0)


def random_boxes(rng, shape, low=0.0, high=200.0, min_side=1.0):
    xy = rng.uniform(low, high, size=shape + (2,))
    wh = rng.uniform(min_side, 120.0, size=shape + (2,))
    return np.concatenate([xy, xy + wh], axis=-1).astype(np.float32)


def numpy_iou(a, b):
    """IoU of [..., N, 4] with [..., M, 4], written from the definition."""
    a, b = np.asarray(a, np.float64)[..., :, None, :], np.asarray(b, np.float64)[..., None, :, :]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    union = area(a) + area(b) - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def numpy_encode(ref, box, weights):
    rw, rh = ref[..., 2] - ref[..., 0], ref[..., 3] - ref[..., 1]
    bw, bh = box[..., 2] - box[..., 0], box[..., 3] - box[..., 1]
    rx, ry = ref[..., 0] + rw / 2, ref[..., 1] + rh / 2
    bx, by = box[..., 0] + bw / 2, box[..., 1] + bh / 2
    wx, wy, ww, wh = weights
    return np.stack([wx * (bx - rx) / rw, wy * (by - ry) / rh, ww * np.log(bw / rw), wh * np.log(bh / rh)], -1)


@tf.function(input_signature=[tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32)])
def anchors_in_graph(height, width):
    return generate_anchors(height, width, 16, sizes=(32, 64), ratios=(0.5, 1.0, 2.0))


def test_anchors_2x2_map_stride_16_two_sizes_three_ratios_hand_computed():
    # size s, ratio r = h / w: w = s / sqrt(r), h = s * sqrt(r); half-widths / half-heights below.
    base = [  # size-major, ratio-minor: (32, .5), (32, 1), (32, 2), (64, .5), (64, 1), (64, 2)
        (16 * R2, 8 * R2), (16, 16), (8 * R2, 16 * R2),
        (32 * R2, 16 * R2), (32, 32), (16 * R2, 32 * R2)]
    centres = [(0, 0), (16, 0), (0, 16), (16, 16)]  # (cx, cy), row-major: y = 0 (x = 0, 1), then y = 1
    expected = [(cx - hw, cy - hh, cx + hw, cy + hh) for cx, cy in centres for hw, hh in base]
    anchors = anchors_in_graph(tf.constant(2), tf.constant(2))  # map size given as tensors (dynamic)
    assert anchors_in_graph.experimental_get_tracing_count() == 1
    assert anchors.dtype == tf.float32 and anchors.shape == (24, 4)
    np.testing.assert_allclose(anchors.numpy(), np.array(expected), atol=1e-4)
    np.testing.assert_allclose(anchors.numpy()[6], [16 - 16 * R2, -8 * R2, 16 + 16 * R2, 8 * R2], atol=1e-4)
    widths, heights = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    np.testing.assert_allclose((widths * heights).numpy()[:6], [32 ** 2] * 3 + [64 ** 2] * 3, rtol=1e-5)
    np.testing.assert_allclose((heights / widths).numpy()[:6], [0.5, 1, 2] * 2, rtol=1e-5)


def test_anchor_order_is_the_rpn_output_reshape_order():
    hf, wf, sizes, ratios = 2, 3, (32, 64), (1.0, 4.0)
    anchors = generate_anchors(hf, wf, 8, sizes, ratios, offset=0.5).numpy()
    # what row i of an RPN output [1, Hf, Wf, A * k] reshaped to [1, Hf*Wf*A, k] comes from
    y, x, a = (grid.reshape(-1) for grid in np.meshgrid(range(hf), range(wf), range(4), indexing="ij"))
    np.testing.assert_allclose((anchors[:, 0] + anchors[:, 2]) / 2, (x + 0.5) * 8, atol=1e-5)
    np.testing.assert_allclose((anchors[:, 1] + anchors[:, 3]) / 2, (y + 0.5) * 8, atol=1e-5)
    size, ratio = np.array(sizes)[a // 2], np.array(ratios)[a % 2]
    np.testing.assert_allclose(anchors[:, 2] - anchors[:, 0], size / np.sqrt(ratio), rtol=1e-5)
    np.testing.assert_allclose(anchors[:, 3] - anchors[:, 1], size * np.sqrt(ratio), rtol=1e-5)


def test_encode_matches_the_formula_and_decode_inverts_it():
    rng = np.random.default_rng(0)
    anchors = random_boxes(rng, (50,))
    boxes = random_boxes(rng, (3, 50))
    for weights in (RPN_BOX_WEIGHTS, ROI_BOX_WEIGHTS):
        deltas = encode_boxes(anchors, boxes, weights)  # [N, 4] anchors broadcast over the batch
        assert deltas.shape == (3, 50, 4)
        np.testing.assert_allclose(deltas.numpy(), numpy_encode(anchors.astype(np.float64), boxes, weights),
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(decode_boxes(anchors, deltas, weights).numpy(), boxes, rtol=1e-5, atol=1e-3)


def test_decode_clamps_log_size_deltas_so_huge_deltas_stay_finite():
    ref = np.array([[10.0, 20.0, 50.0, 100.0]], np.float32)  # 40 x 80
    for weights in (RPN_BOX_WEIGHTS, ROI_BOX_WEIGHTS):
        big = decode_boxes(ref, np.full((1, 4), 100.0, np.float32), weights).numpy()
        assert np.isfinite(big).all()
        limit = math.exp(MAX_LOG_RATIO)  # 62.5
        np.testing.assert_allclose(big[0, 2] - big[0, 0], 40 * min(limit, math.exp(100 / weights[2])), rtol=1e-5)
        np.testing.assert_allclose(big[0, 3] - big[0, 1], 80 * min(limit, math.exp(100 / weights[3])), rtol=1e-5)
        assert big[0, 2] - big[0, 0] <= 40 * limit * (1 + 1e-6)
    small = decode_boxes(ref, np.full((1, 4), -100.0, np.float32), RPN_BOX_WEIGHTS).numpy()
    assert np.isfinite(small).all() and 0 <= small[0, 2] - small[0, 0] < 1e-6
    assert math.isclose(MAX_LOG_RATIO, math.log(1000 / 16))
    # a smaller clamp is honoured too
    capped = decode_boxes(ref, [[0.0, 0.0, 5.0, 5.0]], RPN_BOX_WEIGHTS, max_log_ratio=math.log(2)).numpy()
    np.testing.assert_allclose(capped, [[-10.0, -20.0, 70.0, 140.0]], rtol=1e-5)


def test_pairwise_iou_against_numpy_for_every_rank():
    rng = np.random.default_rng(1)
    a, b = random_boxes(rng, (2, 7)), random_boxes(rng, (2, 5))
    b[0, 0] = a[0, 3]  # identical box: IoU 1
    b[1, 1] = 0.0  # zero-area padding box: IoU 0 with everything
    b[1, 2] = [1000, 1000, 1100, 1100]  # disjoint
    np.testing.assert_allclose(pairwise_iou(a, b).numpy(), numpy_iou(a, b), atol=1e-6)
    np.testing.assert_allclose(pairwise_iou(a[0], b[0]).numpy(), numpy_iou(a[0], b[0]), atol=1e-6)
    np.testing.assert_allclose(pairwise_iou(a, b[1]).numpy(), numpy_iou(a, b[1][None]), atol=1e-6)
    four_a, four_b = random_boxes(rng, (2, 3, 4)), random_boxes(rng, (2, 3, 6))
    np.testing.assert_allclose(pairwise_iou(four_a, four_b).numpy(), numpy_iou(four_a, four_b), atol=1e-6)
    iou = pairwise_iou(a, b).numpy()
    assert iou[0, 3, 0] == pytest.approx(1.0, abs=1e-6) and (iou[1, :, 1] == 0).all() and (iou[1, :, 2] == 0).all()


def test_clip_boxes_per_image_and_shared_shape_and_area():
    boxes = np.array([[[-5, -5, 500, 500], [10, 20, 30, 40]], [[-5, 50, 500, 500], [60, 70, 80, 400]]], np.float32)
    per_image = clip_boxes(boxes, np.array([[100, 200], [300, 50]], np.int32)).numpy()  # (height, width)
    np.testing.assert_array_equal(per_image, [[[0, 0, 200, 100], [10, 20, 30, 40]],
                                              [[0, 50, 50, 300], [50, 70, 50, 300]]])
    shared = clip_boxes(boxes[1], [100, 70]).numpy()
    np.testing.assert_array_equal(shared, [[0, 50, 70, 100], [60, 70, 70, 100]])
    np.testing.assert_array_equal(box_area(per_image).numpy(), [[20000, 400], [12500, 0]])
    assert box_area([[5.0, 5.0, 1.0, 9.0]]).numpy()[0] == 0  # inverted box: area 0, not negative


@tf.function(input_signature=[tf.TensorSpec([None, None, 4], tf.float32), tf.TensorSpec([None, 2], tf.int32),
                              tf.TensorSpec([], tf.int32)])
def coding_in_graph(boxes, image_shape, map_height):
    anchors = generate_anchors(map_height, 3, 16, (32,), (1.0,))
    deltas = encode_boxes(anchors[None, :tf.shape(boxes)[1]], boxes, ROI_BOX_WEIGHTS)
    decoded = clip_boxes(decode_boxes(anchors[None, :tf.shape(boxes)[1]], deltas, ROI_BOX_WEIGHTS), image_shape)
    return anchors, decoded, pairwise_iou(decoded, boxes)


def test_box_functions_run_in_one_graph_with_dynamic_shapes():
    rng = np.random.default_rng(2)
    boxes = random_boxes(rng, (2, 6), high=80)
    anchors, decoded, iou = coding_in_graph(boxes, np.array([[400, 400], [400, 400]], np.int32), tf.constant(2))
    assert anchors.shape == (6, 4) and decoded.shape == (2, 6, 4) and iou.shape == (2, 6, 6)
    np.testing.assert_allclose(decoded.numpy(), boxes, atol=1e-3)
    np.testing.assert_allclose(np.diagonal(iou.numpy(), axis1=1, axis2=2), 1.0, atol=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda: generate_anchors(2, 2, 16, (), (1.0,)), "sizes must be a non-empty sequence of positive numbers"),
    (lambda: generate_anchors(2, 2, 16, (32,), (0.0,)), "ratios must be a non-empty sequence of positive numbers"),
    (lambda: generate_anchors(2, 2, -16, (32,), (1.0,)),
     r"stride must be a positive number \(input pixels per feature-map step\), got -16"),
    (lambda: encode_boxes(np.zeros((3, 4)), np.zeros((3, 4)), (1.0, 1.0, 1.0)),
     r"weights must hold 4 positive numbers \(wx, wy, ww, wh\), got \(1.0, 1.0, 1.0\)"),
    (lambda: decode_boxes(np.zeros((3, 4)), np.zeros((3, 3)), RPN_BOX_WEIGHTS),
     r"deltas must have shape \[..., 4\] \(x1, y1, x2, y2\) with at least 1 dimension\(s\), got shape \(3, 3\)"),
    (lambda: decode_boxes(np.zeros((3, 4)), np.zeros((3, 4)), RPN_BOX_WEIGHTS, max_log_ratio=float("inf")),
     "max_log_ratio must be a finite number"),
    (lambda: pairwise_iou(np.zeros((4,)), np.zeros((3, 4))), r"boxes_a must have shape \[..., 4\]"),
    (lambda: clip_boxes(np.zeros((2, 3, 4)), [1, 2, 3]), r"image_shape must be \[2\] \(height, width\) or \[B, 2\]"),
    (lambda: clip_boxes(np.zeros((3, 4)), [[1, 2]]), r"image_shape \[B, 2\] needs boxes of shape \[B, N, 4\]"),
])
def test_bad_arguments_are_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()
