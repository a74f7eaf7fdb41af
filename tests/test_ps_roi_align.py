"""RoI align (models/person_search/roi_align.py) against a numpy RoIAlign written here with
torchvision's rules: s x s bilinear samples per bin at the centres of a regular sub-grid, averaged;
a sample with y < -1 or y > H (x < -1 or x > W) is 0, any other is read at its coordinates clamped
into the map."""
import numpy as np
import pytest
import tensorflow as tf

import keras
from reid_keras.models.person_search.roi_align import RoIAlign, roi_align

SCALE = 1.0 / 16


def bilinear(feature, y, x):
    height, width = feature.shape[:2]
    if not (-1.0 <= y <= height and -1.0 <= x <= width):
        return np.zeros(feature.shape[-1])
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = int(y), int(x)
    if y0 >= height - 1:
        y0 = y1 = height - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= width - 1:
        x0 = x1 = width - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * feature[y0, x0] + (1 - ly) * lx * feature[y0, x1]
            + ly * (1 - lx) * feature[y1, x0] + ly * lx * feature[y1, x1])


def sample_points(box, scale, output_size, ratio, aligned):
    """(ys, xs) of every sample of one box, bin by bin, in feature pixels (float64)."""
    x1, y1, x2, y2 = np.asarray(box, np.float64) * scale - (0.5 if aligned else 0.0)
    width, height = x2 - x1, y2 - y1
    if not aligned:
        width, height = max(width, 1.0), max(height, 1.0)
    bin_h, bin_w = height / output_size[0], width / output_size[1]
    ys = [[y1 + ph * bin_h + (iy + 0.5) * bin_h / ratio for iy in range(ratio)] for ph in range(output_size[0])]
    xs = [[x1 + pw * bin_w + (ix + 0.5) * bin_w / ratio for ix in range(ratio)] for pw in range(output_size[1])]
    return ys, xs


def reference_roi_align(features, rois, scale, output_size, ratio, aligned):
    features = np.asarray(features, np.float64)
    out = []
    for b, boxes in enumerate(np.asarray(rois, np.float64)):
        for box in boxes:
            ys, xs = sample_points(box, scale, output_size, ratio, aligned)
            pooled = np.zeros((*output_size, features.shape[-1]))
            for ph in range(output_size[0]):
                for pw in range(output_size[1]):
                    pooled[ph, pw] = np.mean([bilinear(features[b], y, x) for y in ys[ph] for x in xs[pw]], axis=0)
            out.append(pooled)
    return np.stack(out)


def scene(seed=0, height=9, width=13, channels=3):
    """Features of 2 images and 7 different RoIs each: inside, touching and crossing the border,
    samples in [-1, 0) and in (H - 1, H], one box entirely outside, one smaller than a feature pixel."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(2, height, width, channels)).astype(np.float32)
    w, h = width / SCALE, height / SCALE
    fixed = np.array([
        [[0, 0, w, h], [-12, -10, 60, 70], [w - 50, h - 40, w + 9, h + 12], [-300, -200, -40, -30],
         [33.3, 41.7, 36.1, 44.9]],
        [[16, 16, 64, 96], [-20, 30, 100, h + 20], [w - 17, 0, w + 40, 50], [-5, -5, w + 5, h + 5],
         [100.5, 20.25, 100.5, 20.25]],
    ], np.float32)
    x1 = rng.uniform(-40, w, size=(2, 2))
    y1 = rng.uniform(-40, h, size=(2, 2))
    random = np.stack([x1, y1, x1 + rng.uniform(2, 120, (2, 2)), y1 + rng.uniform(2, 120, (2, 2))], -1)
    return features, np.concatenate([fixed, random.astype(np.float32)], axis=1)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("output_size, ratio", [((7, 5), 2), ((3, 4), 1), ((2, 2), 3)])
def test_roi_align_matches_numpy_reference(aligned, output_size, ratio):
    features, rois = scene()
    # The scene really has samples in the clamped bands [-1, 0) and (H - 1, H] and beyond -1.
    ys = np.concatenate([np.ravel(sample_points(b, SCALE, output_size, ratio, aligned)[0]) for b in rois.reshape(-1, 4)])
    assert ((ys >= -1) & (ys < 0)).any() and ((ys > 8) & (ys <= 9)).any() and (ys < -1).any()
    got = roi_align(features, rois, spatial_scale=SCALE, output_size=output_size, sampling_ratio=ratio,
                    aligned=aligned)
    assert got.shape == (14, *output_size, 3) and got.dtype == tf.float32
    np.testing.assert_allclose(got.numpy(), reference_roi_align(features, rois, SCALE, output_size, ratio, aligned),
                               atol=1e-5, rtol=0)


def test_border_samples_repeat_the_edge_where_crop_and_resize_alone_fills_zeros():
    features, _ = scene(seed=1)
    rois = np.array([[[-12, -12, 40, 40]], [[-300, -200, -40, -30]]], np.float32)
    ours = roi_align(features, rois, spatial_scale=SCALE, output_size=(4, 4), sampling_ratio=2).numpy()
    reference = reference_roi_align(features, rois, SCALE, (4, 4), 2, False)
    np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)
    assert np.all(ours[1] == 0.0)  # every sample below -1: zeros, as torchvision
    # The same samples read by crop_and_resize on the unpadded map: the top-left bin's samples in
    # [-1, 0) become zeros there, so that bin is wrong by far more than rounding.
    x1, y1, x2, y2 = rois[0, 0] * SCALE
    step = (x2 - x1) / 8
    first, last = x1 + 0.5 * step, x1 + 7.5 * step
    naive = tf.image.crop_and_resize(features[:1], [[first / 8, first / 12, last / 8, last / 12]], [0], [8, 8])
    naive = tf.nn.avg_pool2d(naive, 2, 2, "VALID").numpy()[0]
    assert np.abs(naive[0, 0] - reference[0, 0, 0]).max() > 0.1
    np.testing.assert_allclose(naive[1:, 1:], reference[0, 1:, 1:], atol=1e-5)


def test_graph_mode_dynamic_map_size_and_gradient_is_the_transpose_of_roi_align():
    features, rois = scene(seed=2)
    rng = np.random.default_rng(3)
    upstream = rng.normal(size=(14, 7, 7, 3)).astype(np.float32)

    @tf.function(input_signature=[tf.TensorSpec([2, None, None, 3]), tf.TensorSpec([2, 7, 4])])
    def pooled_and_gradients(x, boxes):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([x, boxes])
            y = roi_align(x, boxes, spatial_scale=SCALE, output_size=(7, 7), sampling_ratio=2, aligned=True)
            loss = tf.reduce_sum(y * upstream)
        assert y.shape == (14, 7, 7, 3)  # static in the graph although the map size is not
        return y, tape.gradient(loss, x), tape.gradient(loss, boxes)

    y, grad, box_grad = pooled_and_gradients(tf.constant(features), tf.constant(rois))
    np.testing.assert_allclose(y.numpy(), reference_roi_align(features, rois, SCALE, (7, 7), 2, True), atol=1e-5)
    assert box_grad is None  # rois are constants, as in torchvision's RoIAlign
    # roi_align is linear in the features (y = A f), so d<upstream, y>/df = Aᵀ upstream and
    # <Aᵀ upstream, v> = <upstream, A v> for any v: checked with the numpy A.
    probe = rng.normal(size=features.shape)
    expected = np.sum(upstream * reference_roi_align(probe, rois, SCALE, (7, 7), 2, True))
    assert grad.shape == features.shape and np.abs(grad.numpy()).max() > 0
    np.testing.assert_allclose(np.sum(grad.numpy() * probe), expected, rtol=1e-4)
    # Another map size through the same graph.
    small, _ = scene(seed=4, height=5, width=6)
    y_small, _, _ = pooled_and_gradients(tf.constant(small), tf.constant(rois))
    np.testing.assert_allclose(y_small.numpy(), reference_roi_align(small, rois, SCALE, (7, 7), 2, True), atol=1e-5)


def test_layer_in_a_model_round_trips_through_a_keras_file_in_safe_mode(tmp_path):
    features, rois = scene(seed=5)
    feature_input = keras.Input(shape=(None, None, 3), batch_size=2)
    roi_input = keras.Input(shape=(7, 4), batch_size=2)
    layer = RoIAlign(output_size=(6, 5), spatial_scale=SCALE, sampling_ratio=2, aligned=True)
    output = layer([feature_input, roi_input])
    assert tuple(output.shape) == (14, 6, 5, 3)
    model = keras.Model([feature_input, roi_input], output)
    expected = reference_roi_align(features, rois, SCALE, (6, 5), 2, True)
    np.testing.assert_allclose(model([features, rois]).numpy(), expected, atol=1e-5)
    assert layer.get_config()["output_size"] == [6, 5] and layer.get_config()["aligned"] is True
    path = str(tmp_path / "roi_align.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    restored = loaded.layers[-1]
    assert isinstance(restored, RoIAlign)
    assert (restored.output_size, restored.spatial_scale, restored.sampling_ratio, restored.aligned) == \
        ((6, 5), SCALE, 2, True)
    np.testing.assert_allclose(loaded([features, rois]).numpy(), expected, atol=1e-5)


def test_mixed_precision_keeps_roi_coordinates_in_float32():
    # Features equal to (column - 1000): pooled values are mean sample x - 1000, which float16
    # holds to ~1e-3 near 0, while a float16 roi at x = 1000.3 would be rounded to 1000.
    width = 1100
    features = np.broadcast_to(np.arange(width, dtype=np.float32) - 1000, (1, 2, width)).copy()[..., None]
    rois = np.array([[[1000.3, 0.0, 1004.3, 1.0], [990.7, 0.0, 1001.9, 1.0]]], np.float32)
    layer = RoIAlign(output_size=(1, 2), spatial_scale=1.0, sampling_ratio=2, dtype="mixed_float16")
    got = layer([features, rois])
    assert got.dtype == tf.float16
    expected = reference_roi_align(features, rois, 1.0, (1, 2), 2, False)
    np.testing.assert_allclose(got.numpy().astype(np.float64), expected, atol=4e-3)
    assert np.abs(got.numpy()[0, 0, 0, 0] - 1.3) < 4e-3  # (1000.3 + 1002.3) / 2 - 1000


@pytest.mark.parametrize("kwargs, features_shape, rois_shape, message", [
    (dict(sampling_ratio=0), (1, 4, 4, 2), (1, 1, 4), "sampling_ratio must be an integer >= 1"),
    (dict(output_size=(14,)), (1, 4, 4, 2), (1, 1, 4), "output_size must be two integers >= 1"),
    (dict(spatial_scale=0.0), (1, 4, 4, 2), (1, 1, 4), "spatial_scale must be a finite number > 0"),
    ({}, (4, 4, 2), (1, 1, 4), "features must have shape [batch, height, width, channels]"),
    ({}, (1, 4, 4, 2), (1, 5), "rois must have shape [batch, num_rois, 4]"),
    ({}, (1, 4, 4, 2), (1, 1, 5), "rois must have shape [batch, num_rois, 4]"),
    ({}, (2, 4, 4, 2), (1, 1, 4), "features hold 2 images but rois 1"),
])
def test_bad_arguments_are_named(kwargs, features_shape, rois_shape, message):
    with pytest.raises(ValueError) as error:
        roi_align(np.zeros(features_shape, np.float32), np.zeros(rois_shape, np.float32), **kwargs)
    assert message in str(error.value)


def test_layer_refuses_a_single_input_and_bad_arguments():
    with pytest.raises(ValueError, match="sampling_ratio must be an integer >= 1"):
        RoIAlign(sampling_ratio=1.5)
    with pytest.raises(ValueError, match=r"RoIAlign expects inputs \[features, rois\]"):
        RoIAlign()(np.zeros((1, 4, 4, 2), np.float32))
