"""The assembled person-search network (issue 14 Deliver 1-2; OIM paper §3, §5.1).

One small model (real ResNet-50 blocks, weights=None; 4 anchors, 64 proposals, 32 RoIs of 8 x 8,
queue 8, 16-d embedding) is built for the module and trained once on two 128 x 192 scenes drawn with
cv2 and fed by the scene pipeline. The fit is the only training-graph trace (~20 s).
"""
import os

import cv2
import keras
import numpy as np
import pytest
import tensorflow as tf

from reid_keras.data.datasets.scenes import UNLABELED, make_scene
from reid_keras.data.scene_pipeline import PADDING, scene_train_dataset
from reid_keras.models.person_search.boxes import generate_anchors
from reid_keras.models.person_search.detector_outputs import select_detections
from reid_keras.models.person_search.losses import box_classification_loss, box_regression_loss
from reid_keras.models.person_search.model import (LOSS_NAMES, PersonSearchConfig, PersonSearchModel,
                                                   build_person_search_model)
from reid_keras.models.person_search.sampling import roi_targets

HEIGHT, WIDTH = 128, 192
# x1, y1, x2, y2, pid, colour: solid "people" on a noisy background.
PEOPLE = [[(20, 30, 50, 110, 0, (200, 40, 40)), (80, 20, 112, 100, 1, (40, 200, 40)),
           (140, 40, 170, 118, UNLABELED, (40, 40, 200))],
          [(30, 25, 62, 105, 0, (200, 40, 40)), (100, 35, 130, 115, 2, (200, 200, 40))]]
SMALL = dict(num_ids=3, anchor_sizes=(48, 96), anchor_ratios=(1.0, 2.5), rpn_pre_nms_top_n_train=256,
             rpn_post_nms_top_n_train=64, rpn_pre_nms_top_n_test=256, rpn_post_nms_top_n_test=64,
             rpn_batch_size=64, roi_batch_size=32, roi_size=8, embedding_dim=16, queue_size=8, max_detections=12)
STEPS = 12


def _scenes(folder):
    rng = np.random.default_rng(0)
    scenes = []
    for i, people in enumerate(PEOPLE):
        image = rng.integers(90, 140, (HEIGHT, WIDTH, 3)).astype(np.uint8)
        for x1, y1, x2, y2, _, colour in people:
            cv2.rectangle(image, (x1, y1), (x2, y2), colour, -1)
        path = os.path.join(folder, f"scene{i}.png")
        assert cv2.imwrite(path, image[..., ::-1])
        scenes.append(make_scene(path, [p[:4] for p in people], [p[4] for p in people]))
    return scenes


def _losses(model, batch):
    """The five losses on `batch` with the step-0 sample of anchors. The RoI-head losses are taken on fixed
    RoIs (the anchors, sampled with a fixed seed): the model's own proposals change while the RPN learns."""
    out = model.training_outputs(batch, training=True, step=0)
    losses = {k: float(v) for k, v in out["losses"].items()}
    features = model.stem(batch["images"])
    anchors = generate_anchors(features.shape[1], features.shape[2], 16, SMALL["anchor_sizes"],
                               SMALL["anchor_ratios"])
    rois = roi_targets(tf.tile(anchors[None], [2, 1, 1]), batch["boxes"], batch["pids"], batch["box_mask"],
                       seed=[1, 2], num_samples=SMALL["roi_batch_size"])
    logits, deltas = model.box_predictor(model.conv5(model.roi_align([features, rois["rois"]]), training=True))
    losses["box_classification"] = float(box_classification_loss(rois["labels"], logits, rois["weights"]))
    losses["box_regression"] = float(box_regression_loss(rois["labels"], deltas, rois["box_targets"],
                                                         rois["weights"]))
    return losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model, batch, losses before, losses after, fit history)."""
    scenes = _scenes(str(tmp_path_factory.mktemp("ps_scenes")))
    stream = scene_train_dataset(scenes, HEIGHT, WIDTH, batch_size=2, max_boxes=3, flip=False, epochs=STEPS,
                                 size_divisor=16)
    batch = next(iter(stream))
    keras.utils.set_random_seed(3)
    model = build_person_search_model(PersonSearchConfig(**SMALL))
    before = _losses(model, batch)
    model.compile(keras.optimizers.Adam(3e-4), jit_compile=False)
    history = model.fit(stream, steps_per_epoch=1, epochs=STEPS, verbose=0).history
    after = _losses(model, batch)
    return model, batch, before, after, history


def test_config_defaults_are_the_papers_and_bad_values_are_named():
    c = PersonSearchConfig(num_ids=5532)
    assert c.num_anchors == 9 and c.anchor_sizes == (128.0, 256.0, 512.0) and c.anchor_ratios == (0.5, 1.0, 2.0)
    assert (c.rpn_pre_nms_top_n_train, c.rpn_post_nms_top_n_train, c.rpn_pre_nms_top_n_test,
            c.rpn_post_nms_top_n_test, c.rpn_nms_iou) == (12000, 2000, 6000, 300, 0.7)
    assert (c.rpn_batch_size, c.rpn_positive_fraction, c.rpn_positive_iou, c.rpn_negative_iou) == (256, 0.5, 0.7, 0.3)
    assert (c.roi_batch_size, c.roi_foreground_iou, c.roi_size, c.embedding_dim) == (128, 0.5, 14, 256)
    assert (c.queue_size, c.oim_momentum, c.oim_temperature) == (5000, 0.5, 0.1)
    assert c.loss_weights == {name: 1.0 for name in LOSS_NAMES}
    assert (c.detection_nms_iou, c.max_detections) == (0.4, 100)
    assert PersonSearchConfig.from_dict(c.to_dict()) == c
    partial = PersonSearchConfig(num_ids=2, loss_weights={"oim": 0.5})
    assert partial.loss_weights == {**{name: 1.0 for name in LOSS_NAMES}, "oim": 0.5}
    with pytest.raises(ValueError, match=r"unknown key\(s\) anchors;"):
        PersonSearchConfig.from_dict({"num_ids": 2, "anchors": 9})
    with pytest.raises(ValueError, match="num_ids .* is required"):
        PersonSearchConfig.from_dict({"queue_size": 5})
    with pytest.raises(ValueError, match=r"PersonSearchConfig.roi_batch_size must be an integer >= 1, got 0"):
        PersonSearchConfig(num_ids=2, roi_batch_size=0)
    with pytest.raises(ValueError, match=r"PersonSearchConfig.rpn_negative_iou must be <= rpn_positive_iou=0.5"):
        PersonSearchConfig(num_ids=2, rpn_positive_iou=0.5, rpn_negative_iou=0.6)
    with pytest.raises(ValueError, match=r"PersonSearchConfig.loss_weights must be a dict .*, got \{'rpn': 1\}"):
        PersonSearchConfig(num_ids=2, loss_weights={"rpn": 1})
    with pytest.raises(ValueError, match=r"PersonSearchConfig.anchor_sizes must be a non-empty sequence"):
        PersonSearchConfig(num_ids=2, anchor_sizes=())


def test_training_forward_shapes_and_finite_losses(trained):
    model, batch, before, _, _ = trained
    out = model.training_outputs(batch, training=False, step=0)  # no memory update
    assert set(out["losses"]) == set(LOSS_NAMES)
    assert all(v.shape == () and v.dtype == tf.float32 and np.isfinite(float(v)) for v in out["losses"].values())
    rois = 2 * SMALL["roi_batch_size"]
    assert tuple(out["oim_logits"].shape) == (rois, SMALL["num_ids"] + SMALL["queue_size"])
    assert tuple(out["roi_pids"].shape) == (rois,)
    pids = out["roi_pids"].numpy()
    # RoIs carry the identities of the scenes (both scenes have pid 0, the unlabeled person is -1) or IGNORE.
    assert set(np.unique(pids)) <= {0, 1, 2, UNLABELED, -2} and {0, 1, 2} <= set(np.unique(pids))
    # Before any training the lookup table is empty: the OIM loss is log(L) over zero logits (Eq. 1-3).
    assert before["oim"] == pytest.approx(np.log(SMALL["num_ids"]), rel=1e-5)


def test_padded_ground_truth_is_never_used(trained):
    model, batch, _, _, _ = trained
    assert not batch["box_mask"].numpy()[1, 2] and batch["pids"].numpy()[1, 2] == PADDING
    garbage = dict(batch)
    boxes = batch["boxes"].numpy().copy()
    boxes[1, 2] = [0, 0, WIDTH, HEIGHT]  # a padding row whose box covers everything
    garbage["boxes"] = tf.constant(boxes)
    garbage["pids"] = tf.constant(np.where(batch["box_mask"].numpy(), batch["pids"].numpy(), 1))
    clean = model.training_outputs(batch, training=False, step=5)["losses"]
    dirty = model.training_outputs(garbage, training=False, step=5)["losses"]
    assert {k: float(v) for k, v in clean.items()} == {k: float(v) for k, v in dirty.items()}


def test_a_few_steps_lower_the_losses_and_fill_the_memory(trained):
    model, _, before, after, history = trained
    for name in ("loss",) + LOSS_NAMES + ("oim_accuracy",):
        assert len(history[name]) == STEPS and np.all(np.isfinite(history[name])), name
    # box_regression is left out: in the first dozen steps from a random ResNet-50 the person RoIs are
    # mostly the added ground-truth boxes (target 0), so the regressor sees few non-zero targets and its
    # loss on other RoIs does not move reliably (measured: 0.25 -> 0.26 after 20 steps at 1e-4).
    lower = {name: (before[name], after[name]) for name in LOSS_NAMES if name != "box_regression"}
    assert all(a < b for b, a in lower.values()), lower
    assert np.isfinite(after["box_regression"])
    assert int(model.optimizer.iterations) == STEPS
    table = model.oim.lookup_table.numpy()
    np.testing.assert_allclose(np.linalg.norm(table, axis=1), 1.0, atol=1e-5)  # every identity was seen
    assert int(model.oim.queue_filled.numpy()) == SMALL["queue_size"]  # the unlabeled person fills the queue


def test_keras_round_trip_in_safe_mode_keeps_outputs_and_memory(trained, tmp_path):
    model, batch, _, _, _ = trained
    path = str(tmp_path / "person_search.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, PersonSearchModel) and loaded.config == model.config
    for name in ("lookup_table", "queue", "queue_pointer", "queue_filled"):
        np.testing.assert_array_equal(getattr(loaded.oim, name).numpy(), getattr(model.oim, name).numpy())
    expected = model.detect(batch["images"], batch["image_shape"])
    got = loaded.detect(batch["images"], batch["image_shape"])
    for key in expected:
        np.testing.assert_allclose(got[key].numpy(), expected[key].numpy(), atol=1e-6, err_msg=key)
    queries = batch["boxes"][:, 0]
    np.testing.assert_allclose(loaded.embed_query(batch["images"], batch["image_shape"], queries).numpy(),
                               model.embed_query(batch["images"], batch["image_shape"], queries).numpy(), atol=1e-6)


def _iou(a, b):
    w = np.clip(np.minimum(a[2], b[2]) - np.maximum(a[0], b[0]), 0, None)
    h = np.clip(np.minimum(a[3], b[3]) - np.maximum(a[1], b[1]), 0, None)
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def test_detect_returns_unit_embeddings_of_nms_boxes_inside_each_image(trained):
    model, batch, _, _, _ = trained
    shapes = np.array([[HEIGHT, 160], [96, WIDTH]], np.int32)  # smaller than the canvas: clipping per image
    out = {k: v.numpy() for k, v in model.detect(batch["images"], shapes).items()}
    k = SMALL["max_detections"]
    assert out["boxes"].shape == (2, k, 4) and out["scores"].shape == (2, k) and out["valid"].dtype == bool
    assert out["embeddings"].shape == (2, k, SMALL["embedding_dim"]) and out["embeddings"].dtype == np.float32
    assert out["valid"].any(axis=1).all()
    for b in range(2):
        valid = out["valid"][b]
        assert not np.any(valid[np.argmin(valid):]) if not valid.all() else True  # valid rows first
        boxes, scores = out["boxes"][b][valid], out["scores"][b][valid]
        assert np.all(np.diff(scores) <= 0) and np.all(scores >= 0.01) and np.all(scores <= 1)
        height, width = shapes[b]
        assert np.all(boxes[:, :2] >= 0) and np.all(boxes[:, 2] <= width) and np.all(boxes[:, 3] <= height)
        assert np.all(boxes[:, 2] > boxes[:, 0]) and np.all(boxes[:, 3] > boxes[:, 1])
        np.testing.assert_allclose(np.linalg.norm(out["embeddings"][b][valid], axis=1), 1.0, atol=1e-5)
        assert not out["embeddings"][b][~valid].any() and not out["boxes"][b][~valid].any()
        assert all(_iou(boxes[i], boxes[j]) <= 0.4 + 1e-6 for i in range(len(boxes)) for j in range(i))


def test_embed_query_is_unit_norm_deterministic_and_independent_of_the_batch(trained):
    model, batch, _, _, _ = trained
    gt = batch["boxes"][:, 0]
    first = model.embed_query(batch["images"], batch["image_shape"], gt).numpy()
    assert first.shape == (2, SMALL["embedding_dim"]) and first.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(model.embed_query(batch["images"], batch["image_shape"], gt).numpy(), first)
    alone = model.embed_query(batch["images"][1:], batch["image_shape"][1:], gt[1:]).numpy()
    np.testing.assert_allclose(alone[0], first[1], atol=1e-5)  # inference BN: no batch statistics
    # The same person in the two scenes (pid 0) is closer than two different people.
    other = model.embed_query(batch["images"][:1], batch["image_shape"][:1], batch["boxes"][:1, 1]).numpy()
    assert float(first[0] @ first[1]) > float(first[0] @ other[0])
    with pytest.raises(ValueError, match=r"embed_query boxes must have shape \[batch, 4\]"):
        model.embed_query(batch["images"], batch["image_shape"], batch["boxes"])


def test_bad_inputs_are_refused_by_name(trained):
    model, batch, _, _, _ = trained
    with pytest.raises(ValueError, match="a training batch needs .*; missing boxes, pids, box_mask"):
        model({"images": batch["images"], "image_shape": batch["image_shape"]}, training=True)
    with pytest.raises(ValueError, match="inputs must be the scene pipeline's dict"):
        model(batch["images"], training=True)
    with pytest.raises(ValueError, match="there is no evaluation loss for a person-search model"):
        model.compute_loss(y_pred={"boxes": batch["boxes"]})
    with pytest.raises(TypeError, match="config must be a PersonSearchConfig, got int"):
        PersonSearchModel(3)


def test_select_detections_against_a_hand_computed_case():
    # Image 0: three proposals; 0 and 1 overlap with IoU 0.6 (> 0.4: the lower score goes), proposal 2 scores
    # below min_score. Image 1: a padding proposal (valid False) with the best score never comes out.
    proposals = np.array([[[0, 0, 10, 20], [0, 5, 10, 25], [30, 0, 40, 20]],
                          [[5, 5, 15, 25], [0, 0, 50, 50], [0, 0, 0, 0]]], np.float32)
    valid = np.array([[True, True, True], [True, False, True]])
    person = np.array([[0.9, 0.8, 0.005], [0.7, 0.99, 0.3]])
    logits = np.stack([np.zeros(6), np.log(person / (1 - person)).reshape(-1)], axis=1).astype(np.float32)
    deltas = np.zeros((6, 4), np.float32)
    deltas[3] = [10.0, 0.0, 0.0, 0.0]  # dx 10 / weight 10 = one box width to the right
    embeddings = np.eye(6, 4, dtype=np.float32)
    out = select_detections(proposals, valid, logits, deltas, embeddings, np.array([[100, 100], [100, 100]]),
                            nms_iou=0.4, min_score=0.01, max_detections=4)
    out = {k: v.numpy() for k, v in out.items()}
    np.testing.assert_array_equal(out["valid"], [[True, False, False, False], [True, False, False, False]])
    np.testing.assert_allclose(out["scores"][:, 0], [0.9, 0.7], rtol=1e-5)
    np.testing.assert_allclose(out["boxes"][:, 0], [[0, 0, 10, 20], [15, 5, 25, 25]], atol=1e-4)
    np.testing.assert_array_equal(out["embeddings"][:, 0], [embeddings[0], embeddings[3]])
    assert not out["boxes"][:, 1:].any() and not out["scores"][:, 1:].any()


def test_two_replicas_give_the_one_device_step(tmp_path):
    """A batch of 2 scenes split over 2 replicas: same losses, OIM memory and updated weights as on one device
    (per-image sampling seeds, synchronised conv5 BatchNorm, OIM all-gather, replica-scaled losses)."""
    from reid_keras.training.distribute import mirrored_strategy

    # Keras' MirroredStrategy set-up averages the first batch over the replicas, which TensorFlow cannot do for
    # bool tensors: the masks travel as int32 (the model casts box_mask back to bool).
    stream = scene_train_dataset(_scenes(str(tmp_path)), HEIGHT, WIDTH, batch_size=2, max_boxes=3, flip=False,
                                 size_divisor=16)
    stream = stream.map(lambda b: {k: tf.cast(v, tf.int32) if v.dtype == tf.bool else v for k, v in b.items()})
    results = {}
    for name, strategy in (("one", tf.distribute.get_strategy()), ("two", mirrored_strategy(["/cpu:0", "/cpu:1"]))):
        keras.utils.set_random_seed(5)
        with strategy.scope():
            model = build_person_search_model(PersonSearchConfig(**SMALL))
            model.compile(keras.optimizers.SGD(1e-2), jit_compile=False)
        # (the embedding projection gets no gradient at step 1: the OIM memory is all zeros, logits constant)
        conv5_kernel = next(layer for layer in model.conv5.layers if isinstance(layer, keras.layers.Conv2D)).kernel
        weights = [model.rpn_head.weights[0], model.box_predictor.weights[0], model.box_predictor.weights[2],
                   conv5_kernel]
        initial = [w.numpy() for w in weights]
        history = model.fit(stream, steps_per_epoch=1, epochs=1, verbose=0).history
        updates = [w.numpy() - w0 for w, w0 in zip(weights, initial)]
        results[name] = ({k: v[0] for k, v in history.items()}, updates, model.oim.lookup_table.numpy(),
                         model.oim.queue.numpy())
    (one, one_updates, *one_memory), (two, two_updates, *two_memory) = results["one"], results["two"]
    assert set(one) == {"loss", "oim_accuracy", *LOSS_NAMES}
    for key in one:
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
    for a, b in zip(one_updates, two_updates):  # the summed replica gradients are the one-device gradient
        assert np.abs(a).max() > 0
        np.testing.assert_allclose(b, a, atol=5e-3 * np.abs(a).max())  # float rounding of other kernels
    for a, b in zip(one_memory, two_memory):
        np.testing.assert_allclose(b, a, atol=1e-5)
