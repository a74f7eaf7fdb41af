"""SavedModel export of a person-search model: `detect` and `embed_query` on raw uint8 scenes.

The folder is a TensorFlow SavedModel (`tf.saved_model.load(DIR)`) with

- `detect(images)`: uint8 `[N, H, W, 3]` RGB scenes (one size per call, any size) -> "boxes"
  float32 `[N, K, 4]` x1, y1, x2, y2 in the pixels of the *given* scenes, "scores" `[N, K]`
  (person probability), "embeddings" `[N, K, D]` (unit norm), "valid" bool `[N, K]` (False: a
  padding row; keep `valid & (scores >= threshold)`);
- `embed_query(images, boxes)`: uint8 `[N, H, W, 3]` scenes and float32 `[N, 4]` x1, y1, x2, y2 of the
  query person in each (scene pixels) -> float32 `[N, D]` unit-norm embeddings; the box is a fixed
  RoI on the whole scene (docs/protocols.md (d): not a crop, not a detection);
- `reid_keras_export.json` beside `saved_model.pb` with the resize rule and preprocessing.

Inside the graph the scenes are resized by the Faster R-CNN rule of the training pipeline
(`data.scene_pipeline`: short side `min_side`, long side capped at `max_side`, bilinear), normalised
(`preprocessing`) and zero-padded at the bottom / right to a multiple of `size_divisor`, exactly as
`scene_eval_dataset` / `query_dataset` feed the Keras model; boxes are mapped back with the same
scale (`to_original_pixels`). The export is for inference only (no gradients saved).
"""
from __future__ import annotations

import json
import os

from reid_keras.data.scene_pipeline import _check_sides
from reid_keras.models.loading import NonFiniteModelError, check_finite_outputs, check_finite_weights
from reid_keras.models.saved_model import ExportError, _check_preprocessing

METADATA_FILE = "reid_keras_export.json"
FORMAT = "reid_keras.person_search_export/1"
DETECT_KEYS = ("boxes", "scores", "embeddings", "valid")


def _prepare_scenes(images, min_side: int, max_side: int, preprocessing: str, size_divisor: int):
    """uint8 `[N, H, W, 3]` -> (network input `[N, H', W', 3]`, image_shape `[N, 2]` int32, scale float32).

    The same numbers as `scene_pipeline._SceneLoader.prepare` + `padded_batch`: every scene of a call
    has one size, hence one scale."""
    import tensorflow as tf

    from reid_keras.data.preprocessing import preprocess

    images = tf.convert_to_tensor(images)
    n = tf.shape(images)[0]
    # scene_pipeline._resize_in_graph on a batch: float64 scale, rounded size, bilinear resize
    hw = tf.cast(tf.shape(images)[1:3], tf.float64)
    scale64 = tf.minimum(min_side / tf.reduce_min(hw), max_side / tf.reduce_max(hw))
    size = tf.maximum(tf.cast(tf.round(hw * scale64), tf.int32), 1)
    resized = tf.image.resize(tf.cast(images, tf.float32), size, method="bilinear")
    scale = tf.cast(scale64, tf.float32)
    x = preprocess(resized, preprocessing)
    extra = (-size) % size_divisor
    x = tf.pad(x, [[0, 0], [0, extra[0]], [0, extra[1]], [0, 0]])
    return x, tf.tile(size[None], [n, 1]), scale


def _export_module(model, min_side, max_side, preprocessing, size_divisor):
    """A tf.Module tracking the model's variables, with the two endpoints closing over the model (as
    `models.saved_model`: attaching the Keras model would trace every layer for serialisation)."""
    import tensorflow as tf

    def detect(images):
        x, shape, scale = _prepare_scenes(images, min_side, max_side, preprocessing, size_divisor)
        out = model.detect(x, shape)
        result = {k: tf.cast(out[k], tf.float32) for k in ("boxes", "scores", "embeddings")}
        result["boxes"] = result["boxes"] / scale
        result["valid"] = tf.cast(out["valid"], tf.bool)
        return result

    def embed_query(images, boxes):
        x, shape, scale = _prepare_scenes(images, min_side, max_side, preprocessing, size_divisor)
        hw = tf.cast(shape[0], tf.float32)
        limits = tf.stack([hw[1], hw[0], hw[1], hw[0]])
        rois = tf.clip_by_value(tf.cast(boxes, tf.float32) * scale, 0.0, limits)  # as query_dataset's query_box
        return tf.cast(model.embed_query(x, shape, rois), tf.float32)

    module = tf.Module(name="reid_keras_person_search")
    module.model_variables = list(model.variables)
    module.detect = tf.function(detect, autograph=False, input_signature=[
        tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    module.embed_query = tf.function(embed_query, autograph=False, input_signature=[
        tf.TensorSpec([None, None, None, 3], tf.uint8, name="images"),
        tf.TensorSpec([None, 4], tf.float32, name="boxes")])
    return module


def probe_scene(height: int = 96, width: int = 128):
    """One deterministic uint8 scene `[1, height, width, 3]` (a colour gradient) and a box in it."""
    import numpy as np

    rows = np.linspace(0, 255, height)[:, None, None]
    cols = np.linspace(255, 0, width)[None, :, None]
    scene = (rows * np.array([1.0, 0.5, 0.0]) + cols * np.array([0.0, 0.5, 1.0])).clip(0, 255).astype(np.uint8)
    box = np.array([[width * 0.25, height * 0.1, width * 0.5, height * 0.9]], np.float32)
    return scene[None], box


def export_person_search(model, out_dir: str, min_side: int, max_side: int, preprocessing: str = "caffe",
                         size_divisor: int = 32) -> str:
    """Export `model` (a `PersonSearchModel`: `detect(images, image_shape)`, `embed_query(images,
    image_shape, boxes)`) to the SavedModel folder `out_dir`, atomically; returns `out_dir`.

    Args:
        min_side, max_side: the resize rule the model was trained / evaluated with.
        preprocessing: the normalisation of the scene pipeline ("caffe" for the ResNet-50 stem).
        size_divisor: the canvas is padded to a multiple of it (the scene pipeline's; the stem's stride).

    Raises:
        ExportError: a model without `detect` / `embed_query`, a bad argument (named), NaN / inf weights
            or NaN / inf outputs on a probe scene. Nothing is written then.
    """
    import keras
    import tensorflow as tf

    from reid_keras.io_utils import atomic_export_dir

    for method in ("detect", "embed_query"):
        if not callable(getattr(model, method, None)):
            raise ExportError(f"model {getattr(model, 'name', model)!r} has no {method}() method: not a person-search "
                              "model (build it with models.person_search.model.build_person_search_model)")
    try:
        min_side, max_side = _check_sides(min_side, max_side)
    except ValueError as err:
        raise ExportError(str(err)) from None
    if isinstance(size_divisor, bool) or not isinstance(size_divisor, int) or size_divisor < 1:
        raise ExportError(f"size_divisor must be a positive int, got {size_divisor!r}")
    preprocessing = _check_preprocessing(preprocessing)
    try:
        check_finite_weights(model.variables, model.name)
    except NonFiniteModelError as err:
        raise ExportError(str(err)) from None
    module = _export_module(model, min_side, max_side, preprocessing, size_divisor)
    scene, box = probe_scene()
    probe = module.detect(scene)
    try:
        check_finite_outputs(probe["embeddings"].numpy(), model.name, "detection embeddings", unit="probe scene")
        check_finite_outputs(module.embed_query(scene, box).numpy(), model.name, "query embeddings",
                             unit="probe scene")
    except NonFiniteModelError as err:
        raise ExportError(str(err)) from None
    metadata = {
        "format": FORMAT,
        "min_side": min_side, "max_side": max_side, "size_divisor": size_divisor, "preprocessing": preprocessing,
        "model_name": model.name,
        "embedding_dim": int(probe["embeddings"].shape[-1]),
        "max_detections": int(probe["boxes"].shape[1]),
        "endpoints": {
            "detect": "images uint8 [N,H,W,3] -> boxes [N,K,4] x1y1x2y2 scene pixels, scores [N,K], "
                      "embeddings [N,K,D] unit norm, valid bool [N,K]",
            "embed_query": "images uint8 [N,H,W,3], boxes float32 [N,4] x1y1x2y2 scene pixels -> embeddings [N,D]",
        },
        "keras_version": keras.__version__,
        "tensorflow_version": tf.__version__,
    }
    with atomic_export_dir(out_dir) as tmp:
        tf.saved_model.save(module, tmp, signatures={"detect": module.detect, "embed_query": module.embed_query},
                            options=tf.saved_model.SaveOptions(experimental_custom_gradients=False))
        with open(os.path.join(tmp, METADATA_FILE), "w", encoding="utf-8") as handle:
            json.dump(metadata, handle, indent=2)
    return out_dir
