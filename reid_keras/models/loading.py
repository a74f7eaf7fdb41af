"""Load a trained model for embedding: a `.keras` file or an exported SavedModel folder.

Whatever the source, the result is an `EmbeddingModel` whose `embed(images)` takes a batch of raw
pixels (uint8 or float 0..255, NHWC) and returns one feature row per image. Evaluation, feature
extraction and serving then share one code path (DESIGN.md, "Each run writes one folder").

- `.keras`: loaded with `keras.saving.load_model(safe_mode=True)`, after the caller has registered the
  layers it names (`reid_keras.families.register_serializables()`, which the commands call). A sub-model or layer named
  `embedding` (the shared branch of a siamese / id-verification model) is used when present,
  else the model itself when it has a single image input.
- SavedModel: `tf.saved_model.load(folder)` exposing an `embed` function or signature that takes
  raw uint8 images (what `reid_keras.export` writes).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional

import numpy as np

from reid_keras.data.preprocessing import preprocess, preprocessing_mode


class ModelLoadError(ValueError):
    """The model path does not exist or does not hold a usable embedding model."""


def _preprocess_fn(name: Optional[str]) -> Callable:
    """numpy -> numpy backbone preprocessing (reid_keras.data.preprocessing); None means none."""
    if name in (None, ""):
        return lambda x: x
    try:
        mode = preprocessing_mode(name)
    except ValueError as err:
        raise ModelLoadError(str(err)) from None
    if mode == "raw":
        return lambda x: x
    return lambda x: np.asarray(preprocess(x, name))


@dataclasses.dataclass
class EmbeddingModel:
    """A callable image -> feature model with what the data pipeline needs to feed it.

    Attributes:
        embed_fn: maps a float32 / uint8 NHWC batch to features (after `preprocessing`).
        image_size: `(height, width)` the model expects, or None when it accepts any size.
        preprocessing: backbone preprocessing name applied inside `embed`, or None.
        source: the path it was loaded from.
        kind: "keras" or "saved_model".
        input_dtype: dtype the underlying function wants ("uint8" for exported SavedModels).
        handle: the loaded object (its variables die with it).
    """

    embed_fn: Callable
    image_size: Optional[tuple]
    preprocessing: Optional[str]
    source: str
    kind: str
    input_dtype: str = "float32"
    handle: object = dataclasses.field(default=None, repr=False)  # keeps a loaded SavedModel alive

    def __post_init__(self):
        # An exported SavedModel preprocesses inside its `embed`: the name is only reported.
        self._pre = _preprocess_fn(self.preprocessing) if self.kind == "keras" else (lambda x: x)

    def embed(self, images) -> np.ndarray:
        """Features of a batch of raw images (NHWC, pixel values 0..255) as a float32 array."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"embed expects a batch of RGB images (N, H, W, 3); got shape {images.shape}")
        if self.input_dtype == "uint8":
            batch = images if images.dtype == np.uint8 else np.clip(np.rint(images), 0, 255).astype(np.uint8)
        else:
            batch = self._pre(images.astype(np.float32))
        out = self.embed_fn(batch)
        if isinstance(out, dict):
            out = out["embedding"] if "embedding" in out else next(iter(out.values()))
        out = np.asarray(out, dtype=np.float32)
        return out.reshape(out.shape[0], -1)

    def __call__(self, images) -> np.ndarray:
        return self.embed(images)


def load_embedding_model(path: str, preprocessing: Optional[str] = None) -> EmbeddingModel:
    """Load `path` (a `.keras` file or a SavedModel folder) as an `EmbeddingModel`.

    Args:
        path: `.keras` file or exported SavedModel folder.
        preprocessing: backbone preprocessing name; overrides what the model records.

    Raises:
        ModelLoadError: missing path, unreadable file, or no embedding branch / `embed` function.
    """
    if not os.path.exists(path):
        raise ModelLoadError(f"model path {path!r} does not exist: expected a .keras file or a SavedModel folder")
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "saved_model.pb")):
            raise ModelLoadError(f"{path!r} is a folder without saved_model.pb: expected an exported "
                                 "SavedModel folder (python -m reid_keras.export) or a .keras file")
        return _load_saved_model(path, preprocessing)
    if not path.endswith(".keras"):
        raise ModelLoadError(f"{path!r} is neither a .keras file nor a SavedModel folder")
    return _load_keras(path, preprocessing)


def run_config_beside(path: str) -> dict:
    """The config.json of the run folder holding the model file `path` ({} when there is none or it is unreadable)."""
    config = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
    try:
        with open(config, encoding="utf-8") as handle:
            data = json.load(handle)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _sidecar_preprocessing(path: str) -> Optional[str]:
    """`preprocessing` from the run's config.json next to the model, if the run recorded it."""
    value = run_config_beside(path).get("preprocessing")
    return value if isinstance(value, str) else None


def _load_keras(path: str, preprocessing: Optional[str]) -> EmbeddingModel:
    import keras

    try:
        model = keras.saving.load_model(path, safe_mode=True)
    except Exception as err:  # Keras raises many types (ValueError, TypeError, zipfile errors)
        raise ModelLoadError(
            f"could not load {path!r} with keras.saving.load_model(safe_mode=True): {type(err).__name__}: {err}. "
            "Is it a Keras 3 .keras file saved by reid_keras? Its custom layers must be registered first "
            "(reid_keras.families.register_serializables()); Lambda layers are refused in safe mode.") from None
    network = _embedding_network(model, path)
    shape = tuple(network.inputs[0].shape)
    size = (int(shape[1]), int(shape[2])) if shape[1] is not None and shape[2] is not None else None
    return EmbeddingModel(embed_fn=lambda x: network(x, training=False), image_size=size,
                          preprocessing=preprocessing or _sidecar_preprocessing(path),
                          source=path, kind="keras")


def _embedding_network(model, path: str):
    import keras

    try:
        branch = model.get_layer("embedding")
    except ValueError:
        branch = None
    if isinstance(branch, keras.Model):
        if len(branch.inputs) != 1:
            raise ModelLoadError(f"{path!r}: the 'embedding' sub-model has {len(branch.inputs)} inputs, expected 1")
        return branch
    if branch is not None:
        try:
            network = keras.Model(model.inputs, branch.output)
        except (ValueError, AttributeError) as err:
            raise ModelLoadError(f"{path!r}: layer 'embedding' cannot be cut out as a model ({err})") from None
        if len(network.inputs) == 1:
            return network
        raise ModelLoadError(f"{path!r}: layer 'embedding' depends on {len(network.inputs)} inputs, expected 1")
    if len(model.inputs) == 1 and len(model.inputs[0].shape) == 4:
        return model
    raise ModelLoadError(
        f"{path!r} has {len(model.inputs)} inputs and no sub-model or layer named 'embedding': "
        "name the shared branch 'embedding' or pass a single-image-input model")


def _load_saved_model(path: str, preprocessing: Optional[str]) -> EmbeddingModel:
    import tensorflow as tf  # SavedModel loading has no Keras 3 equivalent

    try:
        loaded = tf.saved_model.load(path)
    except Exception as err:  # corrupt protobufs raise several TF error types
        raise ModelLoadError(f"could not load SavedModel {path!r}: {type(err).__name__}: {err}") from None
    fn = getattr(loaded, "embed", None)
    spec = None
    if fn is not None and callable(fn):
        concretes = list(getattr(fn, "concrete_functions", []))
        if concretes:
            args = concretes[0].structured_input_signature[0]
            spec = args[0] if args else None
        call = fn
    elif "embed" in getattr(loaded, "signatures", {}):
        signature = loaded.signatures["embed"]
        kwargs = signature.structured_input_signature[1]
        if len(kwargs) != 1:
            raise ModelLoadError(f"{path!r}: the 'embed' signature takes {len(kwargs)} inputs, expected 1 image batch")
        name, spec = next(iter(kwargs.items()))
        call = lambda x: signature(**{name: tf.constant(x)})  # noqa: E731
    else:
        raise ModelLoadError(f"SavedModel {path!r} has no 'embed' function or signature: "
                             "export it with python -m reid_keras.export")
    size = None
    dtype = "uint8"
    if spec is not None and hasattr(spec, "shape"):
        dims = list(spec.shape)
        if len(dims) == 4 and dims[1] is not None and dims[2] is not None:
            size = (int(dims[1]), int(dims[2]))
        dtype = spec.dtype.name
    recorded = getattr(loaded, "image_size", None)
    if size is None and recorded is not None:
        size = tuple(int(v) for v in np.asarray(recorded).reshape(-1)[:2])
    if preprocessing is None and getattr(loaded, "preprocessing", None) is not None:
        value = np.asarray(loaded.preprocessing).item()
        preprocessing = value.decode() if isinstance(value, bytes) else str(value)
    return EmbeddingModel(embed_fn=lambda x: call(tf.constant(x)), image_size=size,
                          preprocessing=preprocessing, source=path, kind="saved_model", input_dtype=dtype,
                          handle=loaded)
