"""tf.data streams for re-ID: single images, siamese pairs with a ratio schedule, and P x K batches.

All three read files by path inside the graph (no Python generator, no py_function in the hot
path): `tf.io.read_file` -> `decode_image` -> resize -> optional augmentation (`augment.py`) ->
backbone normalisation (`preprocessing.preprocessing_for`). Only paths and integer indices live in memory.

Undecodable files (empty, truncated, not an image) never end an epoch: each stream applies
`ignore_errors(log_warning=True)` right after decoding, so a bad element is dropped and TensorFlow
logs a warning (shown unless TF_CPP_MIN_LOG_LEVEL >= 2). Empty and unknown-format files are caught
by an in-graph check whose message names the file. `validate_records` does a full decode pass up
front and returns the good records plus a counted `SkipReport` (both in `decoding.py`).
"""
from __future__ import annotations

import logging

import numpy as np
import tensorflow as tf

from reid_keras.data.augment import AugmentConfig, as_hw, augment_image
from reid_keras.data.datasets.base import ImageRecord
# Re-exported: callers and tests name the decoder through this module.
from reid_keras.data.decoding import decode_image, validate_records  # noqa: F401
# Re-exported: callers and tests name the normalisation through this module.
from reid_keras.data.preprocessing import Preprocessing, preprocessing_for  # noqa: F401
from reid_keras.data.samplers import PairRatioSchedule, PairSampler, PKSampler

logger = logging.getLogger(__name__)
AUTOTUNE = tf.data.AUTOTUNE
class _Loader:
    """path (+ element seed) -> normalised (H, W, 3) float32 image."""

    def __init__(self, image_size, preprocess, augment):
        self.image_size = as_hw(image_size, "image_size")
        self.preprocess = preprocess if isinstance(preprocess, Preprocessing) else preprocessing_for(preprocess)
        if augment is not None and not isinstance(augment, AugmentConfig):
            raise TypeError(f"augment must be an AugmentConfig or None, got {type(augment).__name__}")
        self.augment = None if augment is None or augment.is_identity else augment
        self.decode_size = self.augment.decode_size(self.image_size) if self.augment else self.image_size

    def __call__(self, path, seed):
        image = decode_image(tf.io.read_file(path), path)
        image = tf.image.resize(image, self.decode_size, method="bilinear")
        if self.augment is not None:
            image = augment_image(image, seed, self.augment, self.image_size)
        return self.preprocess(tf.ensure_shape(image, [*self.image_size, 3]))


def _records(records) -> list:
    records = [ImageRecord(str(r[0]), int(r[1]), int(r[2])) for r in records]
    if not records:
        raise ValueError("records is empty: nothing to stream")
    return records


def _with_seeds(ds, seed: int):
    """Attach a per-element stateless seed (int64 pair), new each time the dataset is iterated."""
    rnd = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    return tf.data.Dataset.zip(ds, rnd).map(lambda x, r: (x, tf.stack([tf.constant(seed, tf.int64), r])))


def image_dataset(records, image_size, batch_size, preprocess="efficientnet", augment=None, shuffle=False,
                  seed=0, with_labels=True, with_meta=False, drop_remainder=False) -> tf.data.Dataset:
    """Batches of single images: `images`, `(images, pids)` or `(images, {"pid", "camid", "index"})`.

    Order follows `records` unless `shuffle` (reshuffled, reproducibly, at every iteration).
    With `with_meta=True` (evaluation) `index` is the position in `records`, so a file dropped as
    undecodable shows up as a missing index instead of shifting features against records.
    """
    records = _records(records)
    loader = _Loader(image_size, preprocess, augment)
    paths = tf.constant([r.path for r in records])
    pids = tf.constant([r.pid for r in records], tf.int32)
    camids = tf.constant([r.camid for r in records], tf.int32)
    ds = tf.data.Dataset.range(len(records))
    if shuffle:
        ds = ds.shuffle(len(records), seed=seed, reshuffle_each_iteration=True)
    ds = _with_seeds(ds, seed).map(lambda i, s: (loader(tf.gather(paths, i), s), i), num_parallel_calls=AUTOTUNE)
    ds = ds.ignore_errors(log_warning=True)
    if with_meta:
        ds = ds.map(lambda x, i: (x, {"pid": tf.gather(pids, i), "camid": tf.gather(camids, i),
                                      "index": tf.cast(i, tf.int32)}))
    elif with_labels:
        ds = ds.map(lambda x, i: (x, tf.gather(pids, i)))
    else:
        ds = ds.map(lambda x, i: x)
    return ds.batch(int(batch_size), drop_remainder=drop_remainder).prefetch(AUTOTUNE)


def _epoch_range(epochs: int, initial_epoch: int) -> range:
    if not 0 <= int(initial_epoch) < int(epochs):
        raise ValueError(f"need 0 <= initial_epoch < epochs, got initial_epoch={initial_epoch}, epochs={epochs}")
    # One spare epoch at the end: fit() never reaches it unless undecodable files dropped elements.
    return range(int(initial_epoch), int(epochs) + 1)


def pair_dataset(records, image_size, batch_size, pairs_per_epoch=None, schedule=None, preprocess="efficientnet",
                 augment=None, seed=0, cross_camera=True, epochs=1, initial_epoch=0,
                 with_ids=False) -> tf.data.Dataset:
    """Siamese pairs `((img_a, img_b), same)` for epochs `initial_epoch .. epochs-1`, in order.

    `same` is int32 1 (same id) / 0, ready for a 2-way softmax with sparse categorical
    cross-entropy; with `with_ids=True` the label is `{"same", "pid_a", "pid_b"}` (for the
    identification+verification model). Epoch e holds `steps_per_epoch * batch_size` pairs, with
    `steps_per_epoch = pairs_per_epoch // batch_size` (default pairs_per_epoch: one pair per
    image, as in the idver paper) and `schedule.negatives_per_positive(e)` negatives per positive
    (default `PairRatioSchedule.fixed(1.0)`). Use it as
    `model.fit(ds, epochs=epochs, initial_epoch=initial_epoch, steps_per_epoch=steps_per_epoch)`:
    Keras keeps one iterator across epochs when steps_per_epoch is given, so its epoch e sees the
    sampler's epoch e; a resumed run passes the same `initial_epoch` here. Pairs come from the
    given records only (pass the training split).
    """
    records = _records(records)
    schedule = schedule or PairRatioSchedule.fixed(1.0)
    pairs_per_epoch = len(records) if pairs_per_epoch is None else int(pairs_per_epoch)
    steps = pairs_per_epoch // int(batch_size)
    if steps < 1:
        raise ValueError(f"pairs_per_epoch={pairs_per_epoch} is less than one batch of {batch_size}")
    sampler = PairSampler(records, cross_camera=cross_camera)
    (logger.warning if sampler.num_single_image_ids else logger.info)(sampler.summary())
    epochs_arrays = [sampler.epoch(e, steps * int(batch_size), schedule, seed)
                     for e in _epoch_range(epochs, initial_epoch)]
    a, b, same = (np.concatenate(x) for x in zip(*epochs_arrays))
    loader = _Loader(image_size, preprocess, augment)
    paths = tf.constant([r.path for r in records])
    pids = tf.constant([r.pid for r in records], tf.int32)

    def load(idx, s):
        ia, ib, label = idx
        sa, sb = tf.unstack(tf.random.experimental.stateless_split(s, 2))
        images = (loader(tf.gather(paths, ia), sa), loader(tf.gather(paths, ib), sb))
        if with_ids:
            return images, {"same": label, "pid_a": tf.gather(pids, ia), "pid_b": tf.gather(pids, ib)}
        return images, label

    ds = tf.data.Dataset.from_tensor_slices((a.astype(np.int32), b.astype(np.int32), same))
    ds = _with_seeds(ds, seed).map(load, num_parallel_calls=AUTOTUNE).ignore_errors(log_warning=True)
    return ds.batch(int(batch_size), drop_remainder=True).prefetch(AUTOTUNE)


def pk_dataset(records, P, K, image_size, preprocess="efficientnet", augment=None, seed=0, epochs=1,
               initial_epoch=0, batches_per_epoch=None, drop_small_ids=False) -> tf.data.Dataset:
    """Batches `(images, pids)` of P distinct identities x K images (identification / triplet losses).

    Ids with fewer than K images are sampled with replacement unless `drop_small_ids` (see
    `PKSampler`). `batches_per_epoch` defaults to len(records) // (P*K); pass it as fit's
    steps_per_epoch. A batch that contains an undecodable file is dropped whole (so every batch
    keeps its P x K structure).
    """
    records = _records(records)
    sampler = PKSampler(records, P, K, drop_small_ids=drop_small_ids)
    (logger.warning if sampler.num_small_ids else logger.info)(sampler.summary())
    steps = int(batches_per_epoch or sampler.default_batches_per_epoch())
    batches = np.concatenate([sampler.epoch(e, steps, seed) for e in _epoch_range(epochs, initial_epoch)])
    loader = _Loader(image_size, preprocess, augment)
    paths = tf.constant([r.path for r in records])
    pids = tf.constant([r.pid for r in records], tf.int32)
    spec = tf.TensorSpec([*loader.image_size, 3], tf.float32)

    def load(idx, s):
        seeds = tf.random.experimental.stateless_split(s, sampler.batch_size)
        images = tf.map_fn(lambda x: loader(tf.gather(paths, x[0]), x[1]), (idx, seeds), fn_output_signature=spec)
        return images, tf.gather(pids, idx)

    ds = tf.data.Dataset.from_tensor_slices(batches.astype(np.int32))
    ds = _with_seeds(ds, seed).map(load, num_parallel_calls=AUTOTUNE).ignore_errors(log_warning=True)
    return ds.prefetch(AUTOTUNE)
