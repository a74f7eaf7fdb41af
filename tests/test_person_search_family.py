"""The person_search family (reid_keras/families/person_search.py): recipe and presets against the OIM paper
(§5.1), the flags and datasets it refuses, the scene evaluation and the SavedModel export
(models/person_search/export.py), and a short run of the quick recipe on tiny synthetic scenes.

The evaluation / export plumbing is checked on `GridModel` below: a small real Keras model with the
person-search inference API (`detect`, `embed_query`) whose boxes are known in advance, so the boxes
mapped back to original pixels can be checked against hand-computed values. The end-to-end run uses
the real `build_person_search_model` and is skipped (counted) until that module exists.
"""
import importlib.util
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from reid_keras.cli import train
from reid_keras.data.datasets import load_dataset
from reid_keras.data.decoding import decode_image
from reid_keras.data.scene_pipeline import PAPER_SIDES, scene_eval_dataset, to_original_pixels
from reid_keras.families import _MODULES
from reid_keras.families.person_search import (FAMILY, LOSS_NAMES, PRESETS, PersonSearchRecipe, detect_scenes,
                                               embed_queries, evaluate_person_search, search_gallery_sizes)
from reid_keras.models.person_search.export import ExportError, export_person_search
from reid_keras.models.person_search.roi_align import roi_align

HAS_MODEL = importlib.util.find_spec("reid_keras.models.person_search.model") is not None
SCENE = (128, 192)  # drawn scene size (height, width)
SIDES = (96, 144)  # fed at 0.75 of the drawn size


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("scenes"))
    return load_dataset("synthetic", root, layout="cuhk_sysu", train_scenes=4, test_scenes=4, scene_size=SCENE)


class GridModel(keras.Model):
    """Six boxes per scene on a fixed 2 x 3 grid of the unpadded image; scores and unit-norm embeddings
    from RoI-aligned features of a 3 x 3 convolution (stride 1)."""

    def __init__(self, dim=8, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(6, 3, padding="same", kernel_initializer=keras.initializers.RandomNormal(0, 0.05))
        self.project = keras.layers.Dense(dim, kernel_initializer=keras.initializers.RandomNormal(0, 1.0))
        self.score = keras.layers.Dense(1, kernel_initializer=keras.initializers.RandomNormal(0, 0.3))

    @staticmethod
    def grid(image_shape):
        hw = tf.cast(image_shape, tf.float32)
        rows = [(r, c) for r in range(2) for c in range(3)]
        boxes = [tf.stack([hw[:, 1] * c / 3, hw[:, 0] * r / 2, hw[:, 1] * (c + 1) / 3, hw[:, 0] * (r + 1) / 2], -1)
                 for r, c in rows]
        return tf.stack(boxes, axis=1)  # [B, 6, 4]

    def _heads(self, images, rois):
        pooled = tf.reduce_mean(roi_align(self.conv(images), rois, spatial_scale=1.0, output_size=(2, 2)), [1, 2])
        return tf.math.l2_normalize(self.project(pooled), -1), tf.sigmoid(self.score(pooled))[:, 0]

    def detect(self, images, image_shape):
        boxes = self.grid(image_shape)
        emb, scores = self._heads(images, boxes)
        b = tf.shape(boxes)[0]
        return {"boxes": boxes, "scores": tf.reshape(scores, [b, 6]), "embeddings": tf.reshape(emb, [b, 6, -1]),
                "valid": tf.ones([b, 6], tf.bool)}

    def embed_query(self, images, image_shape, boxes):
        return self._heads(images, boxes[:, None])[0]

    def call(self, images):
        return self.conv(images)


@pytest.fixture(scope="module")
def grid_model():
    keras.utils.set_random_seed(0)
    model = GridModel()
    model(tf.zeros([1, 32, 32, 3]))
    return model


def test_recipe_presets_follow_the_paper_and_refuse_bad_values():
    paper = PRESETS["person_search_oim"].resolve("paper")
    assert isinstance(paper, PersonSearchRecipe) and FAMILY.data == "scenes" and FAMILY.recipe is PersonSearchRecipe
    # OIM §5.1: two scenes per batch, lr 1e-3 -> 1e-4 after 40K of 50K iterations, tau 0.1, Q 5,000, ImageNet.
    assert (paper.batch_size, paper.optimizer, paper.learning_rate, paper.momentum) == (2, "sgd", 1e-3, 0.9)
    assert paper.lr_schedule == {"type": "step", "boundaries": [40000], "factor": 0.1}
    assert paper.epochs * paper.steps_per_epoch == 50000 and paper.weight_decay == 1e-4
    assert (paper.oim_temperature, paper.queue_size, paper.weights, paper.embedding_dim) == (0.1, 5000, "imagenet", 256)
    assert len(paper.anchor_sizes) * len(paper.anchor_ratios) == 9  # §3.1: 9 anchors per location
    assert (paper.min_side, paper.max_side) == PAPER_SIDES and paper.loss_weights is None
    assert (paper.rpn_batch_size, paper.roi_batch_size, paper.rpn_positive_fraction) == (256, 128, 0.5)
    quick = PRESETS["person_search_oim"].resolve("default")
    assert quick.weights is None and quick.max_side <= 384 and quick.roi_batch_size < paper.roi_batch_size
    with pytest.raises(ValueError, match=r"max_side must be >= min_side=600 .* got 500"):
        paper.replace(min_side=600, max_side=500)
    with pytest.raises(ValueError, match=r"oim_temperature must be a finite number > 0, got 0"):
        paper.replace(oim_temperature=0)
    with pytest.raises(ValueError, match=r"loss_weights: unknown loss\(es\) oimm; known: " + ", ".join(LOSS_NAMES)):
        paper.replace(loss_weights={"oimm": 1.0})
    with pytest.raises(ValueError, match=r"image_size \(160, 80\) is not read by the person-search family"):
        paper.replace(image_size=(160, 80))
    with pytest.raises(ValueError, match=r"backbone 'vgg16': the person-search model is built on ResNet-50"):
        paper.replace(backbone="vgg16")
    with pytest.raises(ValueError, match=r"unknown recipe key\(s\) P for a PersonSearchRecipe"):
        paper.replace(P=4)


@pytest.mark.skipif("person_search" not in _MODULES, reason="families/__init__.py does not register person_search yet")
def test_the_registry_lists_the_family_and_the_trainer_refuses_other_families_flags(capsys):
    from reid_keras.families import families, get_preset

    assert families()["person_search"] is FAMILY and get_preset("person_search_oim")[0] is FAMILY
    assert train.main(["--model", "person_search_oim", "--head", "sigmoid", "--oim-scale", "30"]) == 2
    err = capsys.readouterr().err
    assert "--head, --oim-scale does not apply to --model person_search_oim (family person_search)" in err
    assert "--min-side" in err and "--queue-size" in err
    assert train.main(["--model", "resnet50_oim", "--min-side", "300"]) == 2
    assert "--min-side does not apply to --model resnet50_oim (family classifier)" in capsys.readouterr().err


def test_a_crop_dataset_is_refused_by_name(tmp_path):
    crops = load_dataset("synthetic", str(tmp_path), num_ids=8)
    with pytest.raises(ValueError, match=r"dataset 'synthetic' holds person crops \(a re-ID dataset\), but model "
                                         r"'person_search_oim' \(family person_search\) trains on whole scenes"):
        FAMILY.check_dataset(crops, "person_search_oim")


def test_training_stream_is_scene_batches_addressed_by_epoch_and_step(scenes):
    recipe = PRESETS["person_search_oim"].resolve().replace(min_side=SIDES[0], max_side=SIDES[1], steps_per_epoch=2)
    task = FAMILY.task(recipe, seed=5)
    most = max(len(s.boxes) for s in scenes.train)
    assert task.max_boxes(scenes.train) == most
    stream, steps = task.train_dataset(scenes.train, initial_epoch=0, epochs=2, global_batch=2)
    batches = [b for _, b in zip(range(4), stream)]
    assert steps == 2 and batches[0]["images"].shape[0] == 2 and batches[0]["boxes"].shape == (2, most, 4)
    assert batches[0]["images"].shape[1] % 32 == 0 and tuple(batches[0]["image_shape"][0].numpy()) == SIDES
    resumed, _ = task.train_dataset(scenes.train, initial_epoch=1, epochs=2, global_batch=2, initial_step=1)
    first = next(iter(resumed))
    for key in ("images", "boxes", "pids", "box_mask", "index"):
        np.testing.assert_array_equal(first[key].numpy(), batches[3][key].numpy())
    with pytest.raises(ValueError, match=f"has {most} people but max_boxes=3"):
        FAMILY.task(recipe.replace(max_boxes=3)).train_dataset(scenes.train, 0, 1, 2)


def test_evaluation_maps_boxes_to_original_pixels_and_writes_the_metrics(scenes, grid_model, tmp_path):
    recipe = PRESETS["person_search_oim"].resolve().replace(min_side=SIDES[0], max_side=SIDES[1])
    detections = detect_scenes(grid_model, scenes.gallery, recipe)
    h, w = SCENE
    expected = np.array([[w * c / 3, h * r / 2, w * (c + 1) / 3, h * (r + 1) / 2] for r in range(2) for c in range(3)])
    assert sorted(detections) == sorted(s.name for s in scenes.gallery)
    for boxes, scores, emb in detections.values():
        np.testing.assert_allclose(boxes, expected, atol=1e-3)
        assert scores.shape == (6,) and emb.shape == (6, 8)
        np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    queries = embed_queries(grid_model, scenes, recipe)
    assert queries.shape == (len(scenes.queries), 8)
    # the query box is a fixed RoI on its whole scene, scaled like the scene (0.75)
    q = scenes.queries[0]
    image = tf.cast(decode_image(tf.io.read_file(scenes.scene(q.scene).path)), tf.uint8)[None]
    resized = tf.image.resize(tf.cast(image, tf.float32), SIDES)
    from reid_keras.data.preprocessing import preprocess

    x = preprocess(resized, "caffe")
    by_hand = grid_model.embed_query(x, tf.constant([SIDES]), tf.constant(np.asarray(q.box, np.float32)[None] * 0.75))
    np.testing.assert_allclose(queries[0], by_hand.numpy()[0], atol=1e-5)

    metrics = evaluate_person_search(grid_model, scenes, str(tmp_path), recipe, plots=True)
    from reid_keras.metrics.detection import evaluate_detection
    from reid_keras.metrics.detections_file import load_detections
    from reid_keras.metrics.search import evaluate_search

    saved, saved_queries, _ = load_detections(str(tmp_path / "detections.npz"))
    size = search_gallery_sizes(scenes)[0]
    again = evaluate_search(saved, saved_queries, scenes, gallery_size=size, score_threshold=0.5)
    assert metrics["mAP"] == pytest.approx(again["mAP"]) and metrics["top1"] == pytest.approx(again["top1"])
    assert metrics["detection"]["ap"] == pytest.approx(evaluate_detection(saved, scenes)["ap"])
    assert metrics["num_detections"] == 6 * len(scenes.gallery)
    assert [row["gallery_size"] for row in metrics["search"]] == search_gallery_sizes(scenes) == [-1]
    assert (tmp_path / metrics["plots"]["detection_pr"]).exists()


def test_export_endpoints_equal_the_keras_model(scenes, grid_model, tmp_path):
    out = str(tmp_path / "export")
    export_person_search(grid_model, out, *SIDES, preprocessing="caffe")
    meta = json.loads(open(os.path.join(out, "reid_keras_export.json")).read())
    assert (meta["min_side"], meta["max_side"], meta["embedding_dim"]) == (96, 144, 8)
    loaded = tf.saved_model.load(out)
    stream = scene_eval_dataset(scenes.gallery[:2], *SIDES, preprocess="caffe")
    for batch in stream:
        scene = scenes.gallery[int(batch["index"][0])]
        image = tf.cast(decode_image(tf.io.read_file(scene.path)), tf.uint8)[None]
        served = loaded.detect(image)
        keras_out = grid_model.detect(batch["images"], batch["image_shape"])
        np.testing.assert_allclose(served["boxes"].numpy(),
                                   to_original_pixels(keras_out["boxes"].numpy(), batch["scale"].numpy()), atol=1e-4)
        for key in ("scores", "embeddings"):
            np.testing.assert_allclose(served[key].numpy(), keras_out[key].numpy(), atol=1e-5)
        box = np.array([[20.0, 10.0, 60.0, 120.0]], np.float32)
        query = loaded.embed_query(image, box).numpy()
        expected = grid_model.embed_query(batch["images"], batch["image_shape"], box * batch["scale"].numpy()[:, None])
        np.testing.assert_allclose(query, expected.numpy(), atol=1e-5)
    # a scene of another size goes through the same graph (resize in the graph)
    other = loaded.detect(np.zeros([1, 200, 100, 3], np.uint8))
    assert other["boxes"].shape == (1, 6, 4) and float(other["boxes"][0, -1, 3]) == pytest.approx(200, abs=1e-3)
    with pytest.raises(ExportError, match="has no detect\\(\\) method: not a person-search model"):
        export_person_search(keras.Sequential([keras.layers.Dense(2)]), str(tmp_path / "bad"), *SIDES)
    assert not (tmp_path / "bad").exists()


@pytest.mark.skipif(not HAS_MODEL, reason="reid_keras/models/person_search/model.py (helper P5) has not landed yet")
def test_one_epoch_of_the_quick_recipe_trains_evaluates_and_exports(scenes, tmp_path):
    """The task as the runner drives it (build, fit, evaluate, metrics.json, export), on the real model."""
    from reid_keras.io_utils import write_json

    overrides = dict(min_side=SIDES[0], max_side=SIDES[1], epochs=1, steps_per_epoch=2, rpn_pre_nms_top_n_train=200,
                     rpn_post_nms_top_n_train=50, rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=30,
                     roi_batch_size=16, rpn_batch_size=64, queue_size=20, max_detections=20)
    recipe = PRESETS["person_search_oim"].resolve().replace(**overrides)
    task = FAMILY.task(recipe, seed=0)
    config = task.model_config(scenes.num_train_ids)
    assert (config.num_ids, config.roi_batch_size, config.queue_size, config.weights) == (scenes.num_train_ids, 16, 20,
                                                                                          None)
    assert scenes.num_train_ids >= 2 and config.sampling_seed == 0
    assert config.loss_weights == {name: 1.0 for name in LOSS_NAMES}
    keras.utils.set_random_seed(0)
    model, info = task.build(scenes.num_train_ids)
    assert isinstance(info, dict)
    data, steps = task.train_dataset(scenes.train, initial_epoch=0, epochs=1, global_batch=recipe.batch_size)
    history = model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0).history
    for name in ("loss", *LOSS_NAMES, "oim_accuracy"):
        assert np.isfinite(history[name][0]), (name, history)
    metrics = task.evaluate(model, scenes, str(tmp_path), plots=False)
    write_json(str(tmp_path / "metrics.json"), metrics)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert 0 <= saved["mAP"] <= 1 and 0 <= saved["detection"]["ap"] <= 1 and "recall" in saved["detection"]
    assert saved["search"][0]["gallery_size"] == -1 and (tmp_path / "evaluation" / "detections.npz").exists()
    assert "| gallery | mAP |" in task.format_metrics(saved)

    task.export(model, str(tmp_path / "export"))
    loaded = tf.saved_model.load(str(tmp_path / "export"))
    batch = next(iter(scene_eval_dataset(scenes.gallery[:1], *SIDES, preprocess=recipe.preprocessing)))
    image = tf.cast(decode_image(tf.io.read_file(scenes.gallery[0].path)), tf.uint8)[None]
    served, keras_out = loaded.detect(image), model.detect(batch["images"], batch["image_shape"])
    valid = keras_out["valid"].numpy()
    np.testing.assert_array_equal(served["valid"].numpy(), valid)
    np.testing.assert_allclose(served["boxes"].numpy()[valid],
                               to_original_pixels(keras_out["boxes"].numpy(), batch["scale"].numpy())[valid], atol=1e-4)
    np.testing.assert_allclose(served["scores"].numpy(), keras_out["scores"].numpy(), atol=1e-5)
    np.testing.assert_allclose(served["embeddings"].numpy(), keras_out["embeddings"].numpy(), atol=1e-5)
    box = np.asarray(scenes.gallery[0].boxes[:1], np.float32)
    np.testing.assert_allclose(loaded.embed_query(image, box).numpy(),
                               model.embed_query(batch["images"], batch["image_shape"],
                                                 box * batch["scale"].numpy()[:, None]).numpy(), atol=1e-5)
