"""RPN head and proposals (models/person_search/rpn.py) against hand-set weights and a numpy reference."""
from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from reid_keras.models.person_search import rpn
from reid_keras.models.person_search.boxes import generate_anchors
from reid_keras.models.person_search.rpn import ProposalLayer, RPNHead, generate_proposals

STRIDE = 16
SIZES = (32.0, 64.0, 128.0)
RATIOS = (0.5, 1.0, 2.0)


# ---------------------------------------------------------------- numpy reference (torchvision's rules)

def np_decode(anchors, deltas, max_log_ratio=math.log(1000.0 / 16)):
    widths = anchors[:, 2] - anchors[:, 0]
    heights = anchors[:, 3] - anchors[:, 1]
    cx = anchors[:, 0] + 0.5 * widths
    cy = anchors[:, 1] + 0.5 * heights
    dx, dy = deltas[..., 0], deltas[..., 1]
    dw = np.minimum(deltas[..., 2], max_log_ratio)
    dh = np.minimum(deltas[..., 3], max_log_ratio)
    px, py = dx * widths + cx, dy * heights + cy
    pw, ph = np.exp(dw) * widths, np.exp(dh) * heights
    return np.stack([px - pw / 2, py - ph / 2, px + pw / 2, py + ph / 2], axis=-1)


def np_iou_one(box, boxes):
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def np_proposals(logits, deltas, anchors, image_shape, pre, post, nms_iou, min_size):
    """One image, step by step: decode, clip, drop small, stable sort, top pre, greedy NMS, top post."""
    boxes = np_decode(anchors.astype(np.float64), deltas.astype(np.float64))
    height, width = image_shape
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, width)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, height)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    keep = np.flatnonzero((w >= min_size) & (h >= min_size) & (w > 0) & (h > 0))
    order = keep[np.argsort(-logits[keep], kind="stable")][:pre]  # equal logits: lower index first
    kept = []
    suppressed = np.zeros(len(order), bool)
    for i in range(len(order)):
        if suppressed[i]:
            continue
        kept.append(order[i])
        if len(kept) == post:
            break
        suppressed |= np_iou_one(boxes[order[i]], boxes[order]) > nms_iou
    kept = np.asarray(kept, int)
    return boxes[kept], 1 / (1 + np.exp(-logits[kept].astype(np.float64))), len(keep)


def random_rpn_outputs(rng, batch, feature_hw, num_anchors):
    n = feature_hw[0] * feature_hw[1] * num_anchors
    logits = np.round(rng.normal(size=(batch, n)), 1).astype(np.float32)  # 0.1 steps: many ties
    deltas = (rng.normal(size=(batch, n, 4)) * 0.3).astype(np.float32)
    deltas[:, ::17, 2:] = 8.0  # beyond the clamp log(62.5) = 4.1
    return logits, deltas


# ---------------------------------------------------------------- RPNHead

def test_head_output_shapes_and_anchor_order():
    """With hand-set weights objectness(y, x, a) = 1000y + 10x + a lands at row (y*Wf + x)*A + a."""
    batch, fh, fw, num_anchors = 2, 3, 5, 3
    head = RPNHead(num_anchors, channels=4)
    y, x = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
    features = np.zeros((batch, fh, fw, 4), np.float32)
    features[..., 0], features[..., 1], features[..., 2] = y, x, 1.0
    features[1, ..., 3] = 1.0  # image 1 gets +100000 everywhere
    head.build(features.shape)
    identity = np.zeros((3, 3, 4, 4), np.float32)
    identity[1, 1] = np.eye(4)  # centre tap only: hidden = relu(features) = features
    obj_kernel = np.zeros((1, 1, 4, num_anchors), np.float32)
    obj_kernel[0, 0, 0], obj_kernel[0, 0, 1], obj_kernel[0, 0, 3] = 1000, 10, 100000
    obj_kernel[0, 0, 2] = np.arange(num_anchors)
    delta_kernel = np.zeros((1, 1, 4, 4 * num_anchors), np.float32)
    delta_kernel[0, 0, 0], delta_kernel[0, 0, 1], delta_kernel[0, 0, 3] = 1000, 10, 100000
    delta_kernel[0, 0, 2] = np.arange(4 * num_anchors) / 4.0  # channel a*4 + k -> a + k/4
    head.conv.set_weights([identity, np.zeros(4, np.float32)])
    head.objectness_conv.set_weights([obj_kernel, np.zeros(num_anchors, np.float32)])
    head.deltas_conv.set_weights([delta_kernel, np.zeros(4 * num_anchors, np.float32)])

    objectness, deltas = head(features)
    assert objectness.shape == (batch, fh * fw * num_anchors) and objectness.dtype == tf.float32
    assert deltas.shape == (batch, fh * fw * num_anchors, 4) and deltas.dtype == tf.float32
    anchors = generate_anchors(fh, fw, STRIDE, SIZES[:1], RATIOS).numpy()
    for b in range(batch):
        for yy in range(fh):
            for xx in range(fw):
                for a in range(num_anchors):
                    row = (yy * fw + xx) * num_anchors + a
                    base = 100000 * b + 1000 * yy + 10 * xx
                    assert objectness[b, row] == base + a
                    np.testing.assert_array_equal(deltas[b, row], base + a + np.arange(4) / 4.0)
                    # the same row of generate_anchors is anchor a centred on location (y, x)
                    centre = (anchors[row, :2] + anchors[row, 2:]) / 2
                    np.testing.assert_allclose(centre, [STRIDE * xx, STRIDE * yy], atol=1e-4)
                    assert np.isclose((anchors[row, 3] - anchors[row, 1]) / (anchors[row, 2] - anchors[row, 0]),
                                      RATIOS[a])


def test_head_float32_outputs_under_mixed_precision_and_safe_round_trip(tmp_path):
    features = np.random.default_rng(0).normal(size=(1, 4, 6, 8)).astype(np.float32)
    mixed = RPNHead(9, channels=16, dtype="mixed_float16")
    objectness, deltas = mixed(features)
    assert mixed.conv.compute_dtype == "float16"
    assert objectness.dtype == tf.float32 and deltas.dtype == tf.float32

    inputs = keras.Input((None, None, 8))
    model = keras.Model(inputs, RPNHead(9, channels=16, name="rpn_head")(inputs))
    assert model.outputs[0].shape == (None, None) and model.outputs[1].shape == (None, None, 4)
    path = tmp_path / "head.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    head = loaded.get_layer("rpn_head")
    assert isinstance(head, RPNHead) and (head.num_anchors, head.channels) == (9, 16)
    assert isinstance(head.kernel_initializer, keras.initializers.RandomNormal)
    assert head.kernel_initializer.stddev == 0.01
    for got, want in zip(loaded(features), model(features)):
        np.testing.assert_array_equal(got, want)


def test_head_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"RPNHead: num_anchors must be an integer >= 1, got 0"):
        RPNHead(0)
    with pytest.raises(ValueError, match=r"RPNHead: channels must be an integer >= 1, got 2.5"):
        RPNHead(9, channels=2.5)
    with pytest.raises(ValueError, match=r"RPNHead expects features \[batch, height, width, channels\]"):
        RPNHead(9)(np.zeros((2, 5, 8), np.float32))


# ---------------------------------------------------------------- proposals

def test_paper_defaults_are_named_constants():
    # issue 14 / SeqNet MODEL.RPN: 12,000 / 2,000 while training, 6,000 / 300 at test, NMS 0.7;
    # OIM §3.1 keeps 128 after NMS at test; §3.1 RPN conv 512 x 3 x 3.
    assert (rpn.PRE_NMS_TOP_N_TRAIN, rpn.POST_NMS_TOP_N_TRAIN) == (12000, 2000)
    assert (rpn.PRE_NMS_TOP_N_TEST, rpn.POST_NMS_TOP_N_TEST) == (6000, 300)
    assert rpn.PAPER_POST_NMS_TOP_N_TEST == 128 and rpn.NMS_IOU == 0.7 and rpn.RPN_CHANNELS == 512
    layer = ProposalLayer(rpn.PRE_NMS_TOP_N_TEST, rpn.POST_NMS_TOP_N_TEST)
    assert (layer.nms_iou, layer.min_size) == (rpn.NMS_IOU, rpn.MIN_PROPOSAL_SIZE)
    assert RPNHead(9).channels == 512


@pytest.mark.parametrize("pre, post", [(60, 25), (400, 200)])
def test_proposals_match_numpy_reference(pre, post):
    """Random logits with ties, clamped deltas, two image sizes, min-size drops, top-n, greedy NMS 0.7."""
    rng = np.random.default_rng(7)
    fh, fw, num_anchors = 6, 8, len(SIZES) * len(RATIOS)
    anchors = generate_anchors(fh, fw, STRIDE, SIZES, RATIOS).numpy()
    logits, deltas = random_rpn_outputs(rng, 2, (fh, fw), num_anchors)
    image_shape = np.array([[96, 128], [70, 100]], np.int32)  # image 1 is padded to 96 x 128
    min_size = 12.0
    proposals, scores, valid = generate_proposals(logits, deltas, anchors, image_shape, pre, post,
                                                  nms_iou=0.7, min_size=min_size)
    assert proposals.shape == (2, post, 4) and scores.shape == (2, post) and valid.shape == (2, post)
    assert valid.dtype == tf.bool
    for b in range(2):
        want_boxes, want_scores, num_kept = np_proposals(logits[b], deltas[b], anchors, image_shape[b],
                                                         pre, post, 0.7, min_size)
        assert num_kept < len(anchors)  # some boxes were dropped by min_size / the padding
        count = int(np.sum(valid[b]))
        assert count == len(want_boxes)
        np.testing.assert_array_equal(valid[b], np.arange(post) < count)  # valid rows first
        np.testing.assert_allclose(proposals[b, :count], want_boxes, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(scores[b, :count], want_scores, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(proposals[b, count:], 0.0)
        np.testing.assert_array_equal(scores[b, count:], 0.0)
        # the test exercises ties: equal logits among the selected proposals
        assert len(np.unique(want_scores)) < len(want_scores)
    if post == 200:  # fewer boxes survive NMS than post_nms_top_n: padding is marked invalid
        assert not np.all(valid)
    else:
        assert np.all(valid)


def test_proposals_clip_each_image_to_its_own_size():
    """Same RPN outputs for two images of different sizes: each is clipped to its own height / width."""
    fh, fw = 4, 6
    anchors = generate_anchors(fh, fw, STRIDE, (128.0,), (1.0,))
    n = fh * fw
    logits = np.tile(np.linspace(1, 0, n, dtype=np.float32), (2, 1))
    deltas = np.zeros((2, n, 4), np.float32)
    image_shape = np.array([[64, 96], [40, 50]], np.int32)
    proposals, _, valid = generate_proposals(logits, deltas, anchors, image_shape, 100, 50, nms_iou=1.0)
    for b, (height, width) in enumerate(image_shape):
        boxes = proposals[b][valid[b]].numpy()
        assert boxes[:, [0, 1]].min() == 0.0
        assert boxes[:, 2].max() == width and boxes[:, 3].max() == height
        # every anchor centred inside the image gives a box; those over the padding have no area left
        centres = np.stack(np.meshgrid(np.arange(fw) * STRIDE, np.arange(fh) * STRIDE), -1).reshape(-1, 2)
        inside = (centres[:, 0] - 64 < width) & (centres[:, 1] - 64 < height)
        assert len(boxes) == inside.sum()


def test_dropped_boxes_are_never_selected():
    """A tiny box with the best score, a NaN box and NaN logits never become proposals."""
    anchors = np.array([[0, 0, 4, 4], [10, 10, 40, 60], [50, 10, 80, 60], [0, 0, 30, 30]], np.float32)
    logits = np.array([[9.0, 1.0, 2.0, np.nan]], np.float32)
    deltas = np.zeros((1, 4, 4), np.float32)
    deltas[0, 2, 0] = np.nan
    proposals, scores, valid = generate_proposals(logits, deltas, anchors, [[100, 100]], 10, 4, min_size=5)
    np.testing.assert_array_equal(valid, [[True, False, False, False]])
    np.testing.assert_allclose(proposals[0, 0], [10, 10, 40, 60])
    np.testing.assert_allclose(scores[0, 0], 1 / (1 + math.exp(-1.0)), rtol=1e-6)


def test_nms_suppresses_above_the_threshold_only():
    """IoU exactly nms_iou keeps both boxes (torchvision's `IoU > threshold` rule); just above suppresses."""
    anchors = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [40, 0, 50, 10], [40, 0, 50, 5]], np.float32)  # IoU 0.5
    logits = np.array([[4.0, 3.0, 2.0, 1.0]], np.float32)
    deltas = np.zeros((1, 4, 4), np.float32)
    deltas[0, 3, 3] = 0.01  # the second pair: IoU = 0.5025 > 0.5
    _, _, valid = generate_proposals(logits, deltas, anchors, [[64, 64]], 10, 4, nms_iou=0.5)
    np.testing.assert_array_equal(valid, [[True, True, True, False]])


def test_no_gradient_through_proposals():
    head = RPNHead(3, channels=4)
    features = tf.constant(np.random.default_rng(1).normal(size=(1, 3, 4, 2)), tf.float32)
    anchors = generate_anchors(3, 4, STRIDE, (32.0,), RATIOS)
    with tf.GradientTape(persistent=True) as tape:
        objectness, deltas = head(features)
        proposals, scores, _ = generate_proposals(objectness, deltas, anchors, [[48, 64]], 20, 10)
        through_proposals = tf.reduce_sum(proposals) + tf.reduce_sum(scores)
        through_head = tf.reduce_sum(objectness) + tf.reduce_sum(deltas)
    assert all(g is None for g in tape.gradient(through_proposals, head.trainable_weights + [objectness, deltas]))
    assert all(g is not None for g in tape.gradient(through_head, head.trainable_weights))


def test_head_and_proposals_trace_once_inside_tf_function():
    """Fixed input signature: one trace for different values and feature-map sizes, static [B, post] shapes."""
    head = RPNHead(9, channels=8)
    head.build((2, None, None, 8))  # variables exist before tracing (creating them would trace twice)
    layer = ProposalLayer(pre_nms_top_n=300, post_nms_top_n=40)

    @tf.function(input_signature=[tf.TensorSpec([2, None, None, 8], tf.float32), tf.TensorSpec([2, 2], tf.int32)])
    def propose(features, image_shape):
        objectness, deltas = head(features)
        anchors = generate_anchors(tf.shape(features)[1], tf.shape(features)[2], STRIDE, SIZES, RATIOS)
        return layer([objectness, deltas, anchors, image_shape])

    rng = np.random.default_rng(3)
    outputs = []
    for fh, fw in ((4, 6), (5, 7)):
        features = rng.normal(size=(2, fh, fw, 8)).astype(np.float32)
        image_shape = np.array([[fh * STRIDE, fw * STRIDE], [fh * STRIDE - 20, fw * STRIDE - 30]], np.int32)
        got = propose(features, image_shape)
        eager = generate_proposals(*head(features), generate_anchors(fh, fw, STRIDE, SIZES, RATIOS), image_shape,
                                   300, 40)
        for g, e in zip(got, eager):
            np.testing.assert_array_equal(g, e)
        outputs.append(got)
    assert propose.experimental_get_tracing_count() == 1
    concrete = propose.get_concrete_function()
    assert [tuple(o.shape) for o in concrete.structured_outputs] == [(2, 40, 4), (2, 40), (2, 40)]


def test_proposal_layer_config_round_trip_and_functional_shapes():
    layer = ProposalLayer(123, 45, nms_iou=0.6, min_size=2.0, name="proposals")
    clone = ProposalLayer.from_config(layer.get_config())
    assert (clone.pre_nms_top_n, clone.post_nms_top_n, clone.nms_iou, clone.min_size) == (123, 45, 0.6, 2.0)
    assert clone.name == "proposals"
    objectness, deltas = keras.Input((None,)), keras.Input((None, 4))
    anchors, image_shape = keras.Input((4,), batch_size=None), keras.Input((2,), dtype="int32")
    proposals, scores, valid = layer([objectness, deltas, anchors, image_shape])
    assert (proposals.shape, scores.shape, valid.shape) == ((None, 45, 4), (None, 45), (None, 45))
    assert valid.dtype == "bool"


def test_proposal_layer_ranks_in_float32_under_mixed_precision():
    """Logits 1.0001 < 1.0002 are equal in float16; the layer keeps them float32, so the second box wins."""
    anchors = np.array([[0, 0, 10, 10], [20, 0, 30, 10]], np.float32)
    logits = np.array([[1.0001, 1.0002]], np.float32)
    proposals, scores, _ = ProposalLayer(10, 2, dtype="mixed_float16")([logits, np.zeros((1, 2, 4), np.float32),
                                                                       anchors, np.array([[64, 64]])])
    np.testing.assert_array_equal(proposals[0], anchors[::-1])
    assert proposals.dtype == tf.float32 and scores.dtype == tf.float32


def test_proposals_reject_bad_arguments():
    anchors = generate_anchors(2, 2, STRIDE, (32.0,), (1.0,))
    logits, deltas = np.zeros((1, 4), np.float32), np.zeros((1, 4, 4), np.float32)
    with pytest.raises(ValueError, match=r"^post_nms_top_n must be an integer >= 1, got 0$"):
        ProposalLayer(100, 0)
    with pytest.raises(ValueError, match=r"^nms_iou must be a number in \(0, 1\], got 1.5$"):
        generate_proposals(logits, deltas, anchors, [[32, 32]], 10, 5, nms_iou=1.5)
    with pytest.raises(ValueError, match=r"^min_size must be a finite number >= 0 \(pixels\), got -1$"):
        generate_proposals(logits, deltas, anchors, [[32, 32]], 10, 5, min_size=-1)
    with pytest.raises(ValueError, match=r"must hold the same number of anchors, got \{'objectness': 4, "
                                         r"'deltas': 4, 'anchors': 8\}"):
        generate_proposals(logits, deltas, np.zeros((8, 4), np.float32), [[32, 32]], 10, 5)
    with pytest.raises(ValueError, match=r"image_shape must have shape \[batch, 2\]"):
        generate_proposals(logits, deltas, anchors, [32, 32], 10, 5)
    with pytest.raises(ValueError, match=r"ProposalLayer expects inputs \[objectness, deltas, anchors, "
                                         r"image_shape\], got 2 input\(s\)"):
        ProposalLayer(10, 5)([logits, deltas])
