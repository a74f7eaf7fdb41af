"""SavedModel export for serving: `embed` and `verify` endpoints on raw uint8 images of any size.

    python -m reid_keras.export --model runs/x/best.keras --out runs/x/export

The folder is a TensorFlow SavedModel (`tf.saved_model.load(DIR)`) with

- `embed(images)`: uint8 `[N, H, W, 3]` RGB → float32 `[N, D]` L2-normalised features of the
  siamese model's shared `embedding` branch;
- `verify(images_a, images_b)`: two uint8 batches of the same length → float32 `[N]` same-person
  probability (the model's verification head);
- variables `image_size` (int32 `[height, width]`) and `preprocessing` (string), plus
  `reid_keras_export.json` beside `saved_model.pb` with the same facts.

Inside the graph, images are cast to float32 0..255, resized bilinearly (no antialiasing) to the
training size and passed through the backbone's preprocessing, exactly as `prepare_images` does in
Python. The folder is written under a temporary name next to `--out` and renamed when complete.
The export is for inference: custom gradients are not saved, so it cannot be fine-tuned.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from reid_keras.data.preprocessing import PREPROCESSING_MODES, check_preprocessing, preprocess

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


def _check_model(model):
    import keras

    try:
        embedding = model.get_layer("embedding")
    except ValueError:
        raise ExportError(f"model {model.name!r} has no layer named 'embedding' (the shared one-image branch); "
                          "build it with reid_keras.models.siamese.build_siamese") from None
    if not isinstance(embedding, keras.Model) or len(embedding.inputs) != 1:
        raise ExportError(f"model {model.name!r}: layer 'embedding' must be a one-input sub-model")
    if len(model.inputs) == 2 and len(model.outputs) == 1 and model.outputs[0].shape[-1] in (1, 2):
        return embedding, True          # siamese: embed + verify
    return embedding, False             # any other model with an embedding branch: embed only


def _export_module(model, embedding, image_size, preprocessing, with_verify=True):
    """A tf.Module holding the model's variables and the two endpoints.

    The Keras model itself is not attached: tf.saved_model.save would then trace every layer's
    `call` for serialisation (a minute for EfficientNet). Like keras.export.ExportArchive, only the
    variables are tracked and the endpoints close over the model.
    """
    import tensorflow as tf  # tf.Module / tf.function / SavedModel have no Keras 3 equivalent

    from reid_keras.models.layers import L2Normalize
    from reid_keras.models.siamese import same_probability

    size = (int(image_size[0]), int(image_size[1]))
    l2 = L2Normalize(name="l2_normalize")

    def embed(images):
        return l2(embedding(prepare_images(images, size, preprocessing), training=False))

    def verify(images_a, images_b):
        a = prepare_images(images_a, size, preprocessing)
        b = prepare_images(images_b, size, preprocessing)
        return same_probability(model([a, b], training=False))

    module = tf.Module(name="reid_keras_siamese")
    module.model_variables = list(model.variables)
    module.image_size = tf.Variable(size, dtype=tf.int32, trainable=False, name="image_size")
    module.preprocessing = tf.Variable(preprocessing, dtype=tf.string, trainable=False, name="preprocessing")
    module.embed = tf.function(embed, autograph=False, input_signature=[
        tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")])
    if with_verify:
        module.verify = tf.function(verify, autograph=False, input_signature=[
            tf.TensorSpec([None, None, None, 3], tf.uint8, name="images_a"),
            tf.TensorSpec([None, None, None, 3], tf.uint8, name="images_b")])
    return module


def export_model(model, out_dir: str, image_size: Optional[Sequence[int]] = None,
                 preprocessing: str = "efficientnet") -> str:
    """Export a siamese model (see `build_siamese`) to the SavedModel folder `out_dir`, atomically.

    Args:
        model: Keras model with inputs (image_a, image_b), the pair probability as output and a
            sub-model layer named "embedding".
        out_dir: destination folder; replaced only once the new export is complete.
        image_size: `(height, width)` images are resized to; default (and, for a model with a fixed
            input shape, the only accepted value): the model's input size.
        preprocessing: backbone preprocessing name ("efficientnet" for EfficientNet backbones).

    Returns:
        `out_dir`.
    """
    import keras
    import tensorflow as tf

    from reid_keras.io_utils import atomic_export_dir
    from reid_keras.data.augment import as_hw
    from reid_keras.models.siamese import head_of

    embedding, with_verify = _check_model(model)
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
    module = _export_module(model, embedding, (height, width), preprocessing, with_verify)
    endpoints = {"embed": "images uint8 [N,H,W,3] -> L2-normalised features float32 [N,D]"}
    if with_verify:
        endpoints["verify"] = "images_a, images_b uint8 [N,H,W,3] -> same-person probability float32 [N]"
    metadata = {
        "format": FORMAT,
        "image_size": [height, width],
        "preprocessing": preprocessing,
        "head": head_of(model) if with_verify else None,
        "model_name": model.name,
        "feature_dim": int(embedding.outputs[0].shape[-1]),
        "endpoints": endpoints,
        "keras_version": keras.__version__,
        "tensorflow_version": tf.__version__,
    }
    with atomic_export_dir(out_dir) as tmp:
        # Serving only: not saving custom gradients (e.g. of swish) cuts the save from ~30 s to ~6 s
        # on two CPU cores; a reloaded export can run but not be differentiated through.
        signatures = {"embed": module.embed, **({"verify": module.verify} if with_verify else {})}
        tf.saved_model.save(module, tmp, signatures=signatures,
                            options=tf.saved_model.SaveOptions(experimental_custom_gradients=False))
        with open(os.path.join(tmp, METADATA_FILE), "w", encoding="utf-8") as handle:
            json.dump(metadata, handle, indent=2)
    return out_dir


def load_export(export_dir: str):
    """`tf.saved_model.load` an export folder, returning `(loaded, metadata)`.

    Silences TensorFlow's "unsaved custom gradients" load warning, which is expected here.
    """
    import logging

    import tensorflow as tf

    metadata = read_metadata(export_dir)

    class _Quiet(logging.Filter):
        def filter(self, record):
            return "unsaved custom gradients" not in record.getMessage()

    quiet = _Quiet()
    absl_logger = logging.getLogger("absl")
    absl_logger.addFilter(quiet)
    try:
        loaded = tf.saved_model.load(export_dir)
    finally:
        absl_logger.removeFilter(quiet)
    return loaded, metadata


def read_metadata(export_dir: str) -> dict:
    """The `reid_keras_export.json` of an export folder (clear error if it is not one)."""
    path = os.path.join(export_dir, METADATA_FILE)
    if not os.path.isfile(os.path.join(export_dir, "saved_model.pb")) or not os.path.isfile(path):
        raise ExportError(f"{export_dir!r} is not a reid_keras export: expected saved_model.pb and {METADATA_FILE} "
                          "(write one with python -m reid_keras.export)")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _default_preprocessing(model_path: str, model) -> str:
    config = os.path.join(os.path.dirname(os.path.abspath(model_path)), "config.json")
    if os.path.isfile(config):
        try:
            with open(config, encoding="utf-8") as handle:
                value = json.load(handle).get("preprocessing")
            if isinstance(value, str):
                return value
        except (OSError, ValueError, AttributeError):
            pass
    from reid_keras.models.backbones import BACKBONE_PREPROCESSING

    # The backbone sub-model keeps its keras.applications name (efficientnetb0, resnet50, vgg16).
    for layer in model.get_layer("embedding").layers:
        for backbone, preprocessing in BACKBONE_PREPROCESSING.items():
            if layer.name.startswith(backbone):
                return preprocessing
    raise ExportError(f"cannot tell the preprocessing of {model_path!r} (no run config.json beside it and no "
                      f"known backbone): pass --preprocessing, one of {', '.join(PREPROCESSING)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reid_keras.export", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="trained siamese model, a .keras file")
    parser.add_argument("--out", required=True, help="destination SavedModel folder (replaced atomically)")
    parser.add_argument("--preprocessing", choices=PREPROCESSING,
                        help="backbone preprocessing (default: the run's config.json, else efficientnet)")
    args = parser.parse_args(argv)
    if not args.model.endswith(".keras") or not os.path.isfile(args.model):
        parser.error(f"--model {args.model!r}: expected an existing .keras file")
    import keras

    import reid_keras.models.layers  # noqa: F401  (registers SquareLayer / L2Normalize for safe loading)

    try:
        model = keras.saving.load_model(args.model, safe_mode=True, compile=False)
    except Exception as err:  # Keras raises many types for a bad file
        parser.error(f"--model {args.model!r}: cannot load with safe_mode=True ({type(err).__name__}: {err})")
    try:
        _check_model(model)
        preprocessing = args.preprocessing or _default_preprocessing(args.model, model)
        export_model(model, args.out, preprocessing=preprocessing)
    except ExportError as err:
        parser.error(str(err))
    meta = read_metadata(args.out)
    print(f"exported {args.model} -> {args.out} (image_size {meta['image_size'][0]}x{meta['image_size'][1]}, "
          f"preprocessing {meta['preprocessing']}, {meta['feature_dim']}-d features, "
          f"{'embed only' if meta['head'] is None else meta['head'] + ' head'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
