"""Feature extraction for evaluation: tf.data fed, L2-normalised, flip-averaged, cached to `.npz`.

Similarity is the dot product of L2-normalised embeddings (docs/protocols.md, common rules). Flip
averaging is the usual test-time augmentation of re-ID toolkits: the mean of the raw features of
an image and of its horizontal mirror, normalised afterwards.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Optional

import numpy as np

from reid_keras.io_utils import atomic_write


class NoDecodableImages(ValueError):
    """Every image record given to `extract_features` failed to decode; the message names some."""


@dataclasses.dataclass
class FeatureSet:
    """Features of one split with the identity, camera and file of every row.

    `features` is (N, D) float32 with unit rows; `pids` / `camids` are int64 (N,); `paths` is a
    str array (N,) or empty when the images came as an array; `meta` records how they were made.
    """

    features: np.ndarray
    pids: np.ndarray
    camids: np.ndarray
    paths: np.ndarray
    meta: dict = dataclasses.field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def subset(self, index) -> "FeatureSet":
        """Rows `index` (mask or integer array) as a new FeatureSet."""
        paths = self.paths[index] if len(self.paths) else self.paths
        return FeatureSet(self.features[index], self.pids[index], self.camids[index], paths, dict(self.meta))


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of `x` divided by their Euclidean norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


def save_features(path: str, features: FeatureSet, key: Optional[str] = None) -> str:
    """Write `features` to `path` (.npz) atomically: a temp file in the same folder, then os.replace."""
    meta = dict(features.meta)
    if key is not None:
        meta["cache_key"] = key

    def write(tmp):
        with open(tmp, "wb") as out:  # a file object: np.savez would append ".npz" to a bare name
            np.savez(out, features=features.features.astype(np.float32), pids=features.pids.astype(np.int64),
                     camids=features.camids.astype(np.int64), paths=np.asarray(features.paths, dtype=str),
                     meta=np.asarray(json.dumps(meta, sort_keys=True)))

    return atomic_write(path, write)


def load_features(path: str) -> FeatureSet:
    """Read a `.npz` written by `save_features`; a clear error names a missing or foreign file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"feature file {path!r} does not exist")
    with np.load(path, allow_pickle=False) as data:
        missing = {"features", "pids", "camids", "paths"} - set(data.files)
        if missing:
            raise ValueError(f"{path!r} is not a reid_keras feature file: missing arrays {sorted(missing)}")
        meta = json.loads(str(data["meta"])) if "meta" in data.files else {}
        return FeatureSet(data["features"], data["pids"], data["camids"], data["paths"], meta)


def _iterate_batches(images, batch_size: int, image_size):
    """Yield `(image batch, pids or None, camids or None)` and the number of rows, if known."""
    import tensorflow as tf  # tf.data is the input pipeline of the package

    if isinstance(images, (list, tuple)) and images and hasattr(images[0], "path"):
        if image_size is None:
            raise ValueError("extract_features on image records needs image_size=(height, width) "
                             "(or a loaded model that knows its input size)")
        from reid_keras.data.pipelines import image_dataset

        # Raw 0..255 pixels: the model (EmbeddingModel) applies its backbone's preprocessing.
        dataset = image_dataset(list(images), image_size, batch_size, preprocess="none", with_meta=True)
        return ((b, m["index"], None) for b, m in dataset), len(images)
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"extract_features expects images of shape (N, H, W, 3); got {images.shape}")
        dataset = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
        return ((b, None, None) for b in dataset), len(images)
    if isinstance(images, tf.data.Dataset):
        spec = images.element_spec
        first = spec[0] if isinstance(spec, tuple) else spec
        if len(first.shape) == 3:  # unbatched single images
            images = images.batch(batch_size)
        def gen():
            for element in images:
                if not isinstance(element, tuple):
                    yield element, None, None
                elif len(element) > 1 and isinstance(element[1], dict):  # image_dataset(with_meta=True)
                    yield element[0], element[1].get("pid"), element[1].get("camid")
                else:
                    yield element[0], (element[1] if len(element) > 1 else None), \
                        (element[2] if len(element) > 2 else None)
        return gen(), None  # rows unknown until iterated
    raise TypeError("images must be a list of ImageRecord, an (N, H, W, 3) array or a tf.data.Dataset; "
                    f"got {type(images).__name__}")


class _Progress:
    """Keras progress bar on a terminal; a plain line per `every` percent in log files."""

    def __init__(self, total: Optional[int], verbose: Optional[bool], label: str, every: int = 10):
        import keras

        self.tty = sys.stdout.isatty() if verbose is None else bool(verbose)
        self.total, self.label, self.every, self.done, self.next_pct = total, label, every, 0, every
        self.bar = keras.utils.Progbar(total, verbose=1 if self.tty else 0, unit_name="image")
        self.quiet = verbose is False

    def update(self, n: int) -> None:
        self.done += n
        self.bar.update(self.done)
        if self.tty or self.quiet or not self.total:
            return
        pct = 100 * self.done // self.total
        if pct >= self.next_pct:
            print(f"{self.label}: {pct}% ({self.done}/{self.total} images)", flush=True)
            self.next_pct = (pct // self.every + 1) * self.every


def _model_fn(model):
    if hasattr(model, "embed"):
        return lambda x: np.asarray(model.embed(np.asarray(x)), dtype=np.float32)
    import keras

    if isinstance(model, keras.Model):
        return lambda x: np.asarray(model(x, training=False), dtype=np.float32)
    if callable(model):
        return lambda x: np.asarray(model(x), dtype=np.float32)
    raise TypeError(f"model must be a keras.Model, an EmbeddingModel or a callable; got {type(model).__name__}")


def extract_features(model, images, batch_size: int = 64, flip: bool = True, image_size=None,
                     cache: Optional[str] = None, cache_key: Optional[str] = None,
                     pids=None, camids=None, verbose: Optional[bool] = None,
                     label: str = "extracting features") -> FeatureSet:
    """Embed `images` with `model`, L2-normalise (optionally flip-average) and cache the result.

    Args:
        model: an `EmbeddingModel` (`reid_keras.models.loading`), a keras.Model or a callable.
        images: a list of `ImageRecord` (read through `reid_keras.data.pipelines.image_dataset`,
            ids and cameras come along), an (N, H, W, 3) array, or a tf.data.Dataset of images or
            of `(images, pids, camids)` tuples.
        batch_size: images per forward pass.
        flip: average the raw features of each image and its horizontal mirror, then normalise.
        image_size: `(height, width)` for records; defaults to `model.image_size`.
        cache: `.npz` path; reused when its paths (and `cache_key`) match, else (re)written.
        cache_key: identifies the model and settings (e.g. model path + mtime); for array inputs
            it must also identify the data, as there are no paths to compare.
        pids, camids: labels for array inputs (default -1 = unknown).
        verbose: None = progress bar on a terminal, a line per 10 % otherwise; False = silent.

    Returns:
        FeatureSet with rows in input order.
    """
    records = isinstance(images, (list, tuple)) and len(images) > 0 and hasattr(images[0], "path")
    paths = np.asarray([r.path for r in images], dtype=str) if records else np.asarray([], dtype=str)
    key = json.dumps({"key": cache_key, "flip": bool(flip)}, sort_keys=True)
    if cache and os.path.isfile(cache):
        try:
            cached = load_features(cache)
        except (ValueError, OSError):
            cached = None  # a damaged cache is rebuilt, never trusted
        if cached is not None and cached.meta.get("cache_key") == key:
            dropped = set(cached.meta.get("skipped", []))
            expected = paths[~np.isin(paths, list(dropped))] if dropped else paths
            if np.array_equal(cached.paths, expected):
                return cached
    if image_size is None:
        image_size = getattr(model, "image_size", None)
    batches, total = _iterate_batches(images, batch_size, image_size)
    fn = _model_fn(model)
    progress = _Progress(total, verbose, label)
    feats, batch_pids, batch_cams = [], [], []
    for batch, bp, bc in batches:
        out = fn(batch)
        if flip:
            out = 0.5 * (out + fn(np.asarray(batch)[:, :, ::-1, :]))  # width axis of NHWC
        feats.append(out.reshape(out.shape[0], -1))
        if bp is not None:  # for records: the pipeline's record index
            batch_pids.append(np.asarray(bp))
            batch_cams.append(np.asarray(bc) if bc is not None else np.full(len(out), -1))
        progress.update(len(out))
    if not feats:
        if records:
            raise NoDecodableImages(f"none of the {len(images)} image(s) could be decoded, "
                                    f"e.g. {', '.join(paths[:3].tolist())}")
        raise ValueError("extract_features got no images")
    features = l2_normalize(np.concatenate(feats))
    n = len(features)
    skipped = []
    if records:
        # The pipeline drops undecodable files; its `index` keeps rows aligned with the records.
        index = np.concatenate(batch_pids)
        if len(index) != len(images):
            kept = set(index.tolist())
            skipped = [r.path for i, r in enumerate(images) if i not in kept]
            print(f"warning: {len(skipped)} undecodable image(s) left out, e.g. {', '.join(skipped[:3])}", flush=True)
        pids = [images[i].pid for i in index]
        camids = [images[i].camid for i in index]
        paths = paths[index]
    elif batch_pids:
        pids, camids = np.concatenate(batch_pids), np.concatenate(batch_cams)
    pids = np.full(n, -1, np.int64) if pids is None else np.asarray(pids, np.int64)
    camids = np.full(n, -1, np.int64) if camids is None else np.asarray(camids, np.int64)
    if len(pids) != n or len(camids) != n:
        raise ValueError(f"pids/camids have {len(pids)}/{len(camids)} entries for {n} images")
    result = FeatureSet(features, pids, camids, paths, {"cache_key": key, "flip": bool(flip), "skipped": skipped})
    if cache:
        save_features(cache, result)
    return result
