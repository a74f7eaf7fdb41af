"""SavedModel export for serving: `embed` and `verify` endpoints on raw uint8 images of any size.

The folder is a TensorFlow SavedModel (`tf.saved_model.load(DIR)`) with

- `embed(images)`: uint8 `[N, H, W, 3]` RGB → float32 `[N, D]` L2-normalised features of the
  model's `embedding` sub-model (every family names its one-image branch so);
- `verify(images_a, images_b)`, when the family has a pair view of the model (`Task.verifier`): two
  uint8 batches of the same length → float32 `[N]` same-person probability;
- variables `image_size` (int32 `[height, width]`) and `preprocessing` (string), plus
  `reid_keras_export.json` beside `saved_model.pb` with the same facts.

Inside the graph, images are cast to float32 0..255, resized bilinearly (no antialiasing) to the
training size and passed through the backbone's preprocessing, exactly as `prepare_images` does in
Python. The folder is written under a temporary name next to `--out` and renamed when complete.
The export is for inference: custom gradients are not saved, so it cannot be fine-tuned.

No NaN model is exported or served: `export_model` refuses NaN / inf weights and endpoints that give
NaN / inf on two probe images (finite weights that overflow); `load_export` reads a folder through
`reid_keras.models.loading` (damaged files named, NaN / inf weights refused) and `match_images`
refuses NaN / inf outputs.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from reid_keras.data.preprocessing import PREPROCESSING_MODES, check_preprocessing, preprocess
from reid_keras.models.loading import ModelLoadError, NonFiniteModelError, check_finite_outputs, check_finite_weights

METADATA_FILE = "reid_keras_export.json"
FORMAT = "reid_keras.export/1"
# Accepted --preprocessing names; the names and the math live in reid_keras.data.preprocessing.
PREPROCESSING = tuple(PREPROCESSING_MODES)


class ExportError(ValueError):
    """The model or the arguments cannot be exported as asked."""


def _check_preprocessing(name: str) -> str:
    try:
        return check_preprocessing(name)
    except ValueError as err:
        raise ExportError(str(err)) from None


def prepare_images(images, image_size: Sequence[int], preprocessing: str = "efficientnet"):
    """uint8 (or float 0..255) `[N, H, W, 3]` → float32 `[N, height, width, 3]` network input.

    Bilinear resize without antialiasing (`keras.ops.image.resize`, i.e. `tf.image.resize`), then
    the named preprocessing (`reid_keras.data.preprocessing.preprocess`). Works eagerly and inside
    `tf.function`.
    """
    import keras

    _check_preprocessing(preprocessing)
    x = keras.ops.cast(images, "float32")
    x = keras.ops.image.resize(x, (int(image_size[0]), int(image_size[1])), interpolation="bilinear",
                               antialias=False)
    return preprocess(x, preprocessing)


def _embedding_of(model):
    import keras

    try:
        embedding = model.get_layer("embedding")
    except ValueError:
        raise ExportError(f"model {model.name!r} has no layer named 'embedding' (the shared one-image branch); "
                          "build it with a reid_keras.models builder") from None
    if not isinstance(embedding, keras.Model) or len(embedding.inputs) != 1:
        raise ExportError(f"model {model.name!r}: layer 'embedding' must be a one-input sub-model")
    return embedding


def _check_verifier(verifier, model) -> None:
    """A pair view: two image inputs, a 2-way softmax or 1-unit sigmoid output (else ExportError)."""
    from reid_keras.models.siamese import head_of

    inputs = getattr(verifier, "inputs", None) or []
    if len(inputs) != 2:
        raise ExportError(f"model {model.name!r}: the verifier must take two images, it takes {len(inputs)} input(s); "
                          "is this model of the family it is exported as?")
    try:
        head_of(verifier)
    except ValueError as err:
        raise ExportError(f"model {model.name!r}: {err}") from None


def probe_images(image_size: Sequence[int]):
    """Two uint8 images of `image_size`: mid-grey, and a colour gradient (deterministic; no data needed)."""
    import numpy as np

    height, width = int(image_size[0]), int(image_size[1])
    rows = np.linspace(0, 255, height)[:, None, None]
    cols = np.linspace(255, 0, width)[None, :, None]
    gradient = (rows * np.array([1.0, 0.5, 0.0]) + cols * np.array([0.0, 0.5, 1.0])).clip(0, 255)
    return np.stack([np.full((height, width, 3), 128.0), gradient]).astype(np.uint8)


def _check_finite_endpoints(module, model, image_size, has_verify: bool) -> None:
    """ExportError when the endpoints give NaN / inf on two probe images (weights finite, outputs overflowing)."""
    images = probe_images(image_size)
    try:
        check_finite_outputs(module.embed(images).numpy(), model.name, "features", unit="probe image")
        if has_verify:
            check_finite_outputs(module.verify(images, images[::-1]).numpy(), model.name,
                                 "same-person probability", unit="probe image pair")
    except NonFiniteModelError as err:
        raise ExportError(str(err)) from None


def _export_module(model, embedding, image_size, preprocessing, verifier=None):
    """A tf.Module holding the model's variables and the endpoints.

    The Keras model itself is not attached: tf.saved_model.save would then trace every layer's
    `call` for serialisation (a minute for EfficientNet). Like keras.export.ExportArchive, only the
    variables are tracked and the endpoints close over the model.
    """
    import tensorflow as tf  # tf.Module / tf.function / SavedModel have no Keras 3 equivalent

    import keras

    from reid_keras.models.siamese import same_probability

    size = (int(image_size[0]), int(image_size[1]))
    l2 = keras.layers.UnitNormalization(name="l2_normalize")

    def embed(images):
        return l2(embedding(prepare_images(images, size, preprocessing), training=False))

    def verify(images_a, images_b):
        a = prepare_images(images_a, size, preprocessing)
        b = prepare_images(images_b, size, preprocessing)
        return same_probability(verifier([a, b], training=False))

    module = tf.Module(name="reid_keras_siamese")
    module.model_variables = list(model.variables)
    module.image_size = tf.Variable(size, dtype=tf.int32, trainable=False, name="image_size")
    module.preprocessing = tf.Variable(preprocessing, dtype=tf.string, trainable=False, name="preprocessing")
    module.embed = tf.function(embed, autograph=False, input_signature=[
        tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    if verifier is not None:
        module.verify = tf.function(verify, autograph=False, input_signature=[
            tf.TensorSpec([None, None, None, 3], tf.uint8, name="images_a"),
            tf.TensorSpec([None, None, None, 3], tf.uint8, name="images_b")])
    return module


def export_model(model, out_dir: str, image_size: Optional[Sequence[int]] = None,
                 preprocessing: str = "efficientnet", verifier=None) -> str:
    """Export `model`'s "embedding" sub-model (`embed`) and, given a `verifier`, its pair probability
    (`verify`) to the SavedModel folder `out_dir`, atomically.

    Args:
        model: a Keras model with a one-image sub-model named "embedding".
        verifier: None, or a model `[images_a, images_b] -> P(same)` sharing `model`'s layers (2-way softmax
            or 1-unit sigmoid output; a family's `Task.verifier(model)`).
        out_dir: destination folder; replaced only once the new export is complete.
        image_size: `(height, width)` images are resized to; default (and, for a model with a fixed
            input shape, the only accepted value): the model's input size.
        preprocessing: backbone preprocessing name ("efficientnet" for EfficientNet backbones).

    Returns:
        `out_dir`.

    Raises:
        ExportError: no "embedding" sub-model, a verifier that is not a pair view, an image size other
            than the model's, NaN / inf weights (naming the first such variable) or NaN / inf outputs
            on the probe images (`probe_images`). Nothing is written then.
    """
    import keras
    import tensorflow as tf

    from reid_keras.io_utils import atomic_export_dir
    from reid_keras.data.augment import as_hw
    from reid_keras.models.siamese import head_of

    embedding = _embedding_of(model)
    try:
        check_finite_weights(model.variables, model.name)
    except NonFiniteModelError as err:
        raise ExportError(str(err)) from None
    if verifier is not None:
        _check_verifier(verifier, model)
    if image_size is None:
        image_size = tuple(embedding.inputs[0].shape[1:3])
    try:
        height, width = as_hw(image_size, "image_size")
    except ValueError as err:
        raise ExportError(str(err)) from None
    fixed = tuple(embedding.inputs[0].shape[1:3])
    if None not in fixed and fixed != (height, width):
        raise ExportError(f"image_size {(height, width)} differs from the input size {fixed} model "
                          f"{model.name!r} was built (and trained) for")
    _check_preprocessing(preprocessing)
    module = _export_module(model, embedding, (height, width), preprocessing, verifier)
    _check_finite_endpoints(module, model, (height, width), verifier is not None)
    endpoints = {"embed": "images uint8 [N,H,W,3] -> L2-normalised features float32 [N,D]"}
    if verifier is not None:
        endpoints["verify"] = "images_a, images_b uint8 [N,H,W,3] -> same-person probability float32 [N]"
    metadata = {
        "format": FORMAT,
        "image_size": [height, width],
        "preprocessing": preprocessing,
        "head": head_of(verifier) if verifier is not None else None,
        "model_name": model.name,
        "feature_dim": int(embedding.outputs[0].shape[-1]),
        "endpoints": endpoints,
        "keras_version": keras.__version__,
        "tensorflow_version": tf.__version__,
    }
    with atomic_export_dir(out_dir) as tmp:
        # Serving only: not saving custom gradients (e.g. of swish) cuts the save from ~30 s to ~6 s
        # on two CPU cores; a reloaded export can run but not be differentiated through.
        signatures = {"embed": module.embed, **({"verify": module.verify} if verifier is not None else {})}
        tf.saved_model.save(module, tmp, signatures=signatures,
                            options=tf.saved_model.SaveOptions(experimental_custom_gradients=False))
        with open(os.path.join(tmp, METADATA_FILE), "w", encoding="utf-8") as handle:
            json.dump(metadata, handle, indent=2)
    return out_dir


def load_export(export_dir: str):
    """Load a reid_keras export folder, returning `(loaded, metadata)`.

    Goes through `reid_keras.models.loading.load_saved_model`: a damaged folder (missing or truncated
    files, corrupted weights) or NaN / inf weights raise `ModelLoadError` naming the folder and what is wrong.
    """
    from reid_keras.models.loading import inspect_model_path, load_saved_model

    if inspect_model_path(export_dir) != "saved_model":
        raise ModelLoadError(f"{export_dir!r} is a .keras file, not a reid_keras export: export it first "
                             f"(python -m reid_keras.export --model {export_dir} --out DIR)")
    metadata = read_metadata(export_dir)
    return load_saved_model(export_dir), metadata


def read_metadata(export_dir: str) -> dict:
    """The `reid_keras_export.json` of an export folder (clear error if it is not one or it is damaged)."""
    path = os.path.join(export_dir, METADATA_FILE)
    if not os.path.isfile(os.path.join(export_dir, "saved_model.pb")) or not os.path.isfile(path):
        raise ExportError(f"{export_dir!r} is not a reid_keras export: expected saved_model.pb and {METADATA_FILE} "
                          "(write one with python -m reid_keras.export)")
    try:
        with open(path, encoding="utf-8") as handle:
            metadata = json.load(handle)
    except (OSError, ValueError) as err:
        raise ExportError(f"{path!r} is damaged (not readable JSON: {err}): export the model again") from None
    if not isinstance(metadata, dict):
        raise ExportError(f"{path!r} is damaged (a JSON {type(metadata).__name__}, not an object): "
                          "export the model again")
    return metadata


def match_images(loaded, image_a, image_b, source: str = "the export") -> tuple:
    """`(same-person probability, cosine similarity)` of two uint8 RGB images under a loaded export.

    The probability is None when the export has no `verify` endpoint (an embedding-only model).

    Raises:
        NonFiniteModelError: the model gave NaN / inf features or probability (named by `source`).
    """
    import numpy as np

    a = np.asarray(image_a, dtype=np.uint8)[None]
    b = np.asarray(image_b, dtype=np.uint8)[None]
    features = np.concatenate([np.asarray(loaded.embed(a)), np.asarray(loaded.embed(b))])
    check_finite_outputs(features, source, "features")
    probability = None
    if hasattr(loaded, "verify"):
        value = np.asarray(loaded.verify(a, b)).reshape(-1)
        check_finite_outputs(value, source, "same-person probability", unit="image pair")
        probability = float(value[0])
    return probability, float(np.dot(features[0], features[1]))
