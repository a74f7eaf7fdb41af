"""tf.data streams for re-ID: single images, siamese pairs with a ratio schedule, P x K and shuffled batches.

All of them read files by path inside the graph (no Python generator, no py_function in the hot
path): `tf.io.read_file` -> `decode_image` -> resize -> optional augmentation (`augment.py`) ->
backbone normalisation (`preprocessing.preprocessing_for`). Only paths and integer indices live in memory.

The training streams (pairs, P x K, shuffled batches) are addressed by (epoch, step): their indices come
from samplers seeded by (seed, epoch) and each element's augmentation seed is a function of (seed,
epoch, position) (`position_seeds`), so a run resumed at any step sees exactly what the uninterrupted
run saw from that step on.

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
from reid_keras.data.samplers import PairRatioSchedule, PairSampler, PKSampler, ShuffledBatchSampler

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
    """Attach a per-element stateless seed (int64 pair), new each time the dataset is iterated (evaluation and
    ad-hoc streams; the training streams below seed by position instead, see `position_seeds`)."""
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


def _check_initial_step(initial_step: int, steps: int) -> int:
    if not 0 <= int(initial_step) < int(steps):
        raise ValueError(f"need 0 <= initial_step < steps per epoch, got initial_step={initial_step}, steps={steps}")
    return int(initial_step)


def position_seeds(seed: int, epoch: int, positions) -> np.ndarray:
    """Stateless seeds (int64 pairs) of the elements at `positions` of epoch `epoch`: `[seed, epoch * 2**32 +
    position]`. A function of (seed, epoch, position) only, so a run resumed at any step draws exactly the
    augmentations the uninterrupted run drew there."""
    positions = np.asarray(positions, dtype=np.int64)
    if positions.size and (positions.min() < 0 or positions.max() >= 2 ** 32):
        raise ValueError("element positions must be in [0, 2**32)")
    return np.stack([np.full(positions.shape, int(seed), np.int64), int(epoch) * 2 ** 32 + positions], -1)


def _epochs_of(draw, items_per_epoch: int, seed: int, epochs: int, initial_epoch: int, skip: int):
    """`draw(e)` (arrays of `items_per_epoch` rows) for epochs initial_epoch..epochs (a spare one included), the
    first `skip` rows of the first epoch left out at the index level, and each row's position seed."""
    parts, seeds = [], []
    for e in _epoch_range(epochs, initial_epoch):
        start = skip if e == int(initial_epoch) else 0
        drawn = draw(e)
        parts.append(tuple(x[start:] for x in drawn) if isinstance(drawn, tuple) else drawn[start:])
        seeds.append(position_seeds(seed, e, np.arange(start, items_per_epoch)))
    arrays = tuple(np.concatenate(x) for x in zip(*parts)) if isinstance(parts[0], tuple) else np.concatenate(parts)
    return arrays, np.concatenate(seeds)


def pair_dataset(records, image_size, batch_size, pairs_per_epoch=None, schedule=None, preprocess="efficientnet",
                 augment=None, seed=0, cross_camera=True, epochs=1, initial_epoch=0, initial_step=0,
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
    sampler's epoch e. A run resumed after `initial_step` batches of epoch `initial_epoch` passes
    both: the stream starts at that batch (skipped as indices, never decoded), with the same pairs
    and augmentation seeds (`position_seeds`) as the uninterrupted run. Pairs come from the given
    records only (pass the training split).
    """
    records = _records(records)
    schedule = schedule or PairRatioSchedule.fixed(1.0)
    pairs_per_epoch = len(records) if pairs_per_epoch is None else int(pairs_per_epoch)
    steps = pairs_per_epoch // int(batch_size)
    if steps < 1:
        raise ValueError(f"pairs_per_epoch={pairs_per_epoch} is less than one batch of {batch_size}")
    skip = _check_initial_step(initial_step, steps) * int(batch_size)
    sampler = PairSampler(records, cross_camera=cross_camera)
    (logger.warning if sampler.num_single_image_ids else logger.info)(sampler.summary())
    n = steps * int(batch_size)
    (a, b, same), seeds = _epochs_of(lambda e: sampler.epoch(e, n, schedule, seed), n, seed, epochs, initial_epoch,
                                     skip)
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

    ds = tf.data.Dataset.from_tensor_slices(((a.astype(np.int32), b.astype(np.int32), same), seeds))
    ds = ds.map(load, num_parallel_calls=AUTOTUNE).ignore_errors(log_warning=True)
    return ds.batch(int(batch_size), drop_remainder=True).prefetch(AUTOTUNE)


def _batch_stream(records, batches: np.ndarray, seeds: np.ndarray, loader) -> tf.data.Dataset:
    """`(images, pids)` per row of record indices `batches`; row i's images are seeded from `seeds[i]`. A batch
    holding an undecodable file is dropped whole (the others keep their structure)."""
    paths = tf.constant([r.path for r in records])
    pids = tf.constant([r.pid for r in records], tf.int32)
    spec = tf.TensorSpec([*loader.image_size, 3], tf.float32)
    size = int(batches.shape[1])

    def load(idx, s):
        image_seeds = tf.random.experimental.stateless_split(s, size)
        images = tf.map_fn(lambda x: loader(tf.gather(paths, x[0]), x[1]), (idx, image_seeds),
                           fn_output_signature=spec)
        return images, tf.gather(pids, idx)

    ds = tf.data.Dataset.from_tensor_slices((batches.astype(np.int32), seeds))
    return ds.map(load, num_parallel_calls=AUTOTUNE).ignore_errors(log_warning=True).prefetch(AUTOTUNE)


def pk_dataset(records, P, K, image_size, preprocess="efficientnet", augment=None, seed=0, epochs=1,
               initial_epoch=0, initial_step=0, batches_per_epoch=None, drop_small_ids=False) -> tf.data.Dataset:
    """Batches `(images, pids)` of P distinct identities x K images (identification / triplet losses).

    Ids with fewer than K images are sampled with replacement unless `drop_small_ids` (see
    `PKSampler`). `batches_per_epoch` defaults to len(records) // (P*K); pass it as fit's
    steps_per_epoch. A batch that contains an undecodable file is dropped whole (so every batch
    keeps its P x K structure). `initial_epoch` / `initial_step` resume as in `pair_dataset`.
    """
    records = _records(records)
    sampler = PKSampler(records, P, K, drop_small_ids=drop_small_ids)
    (logger.warning if sampler.num_small_ids else logger.info)(sampler.summary())
    steps = int(batches_per_epoch or sampler.default_batches_per_epoch())
    skip = _check_initial_step(initial_step, steps)
    batches, seeds = _epochs_of(lambda e: sampler.epoch(e, steps, seed), steps, seed, epochs, initial_epoch, skip)
    return _batch_stream(records, batches, seeds, _Loader(image_size, preprocess, augment))


def random_batch_dataset(records, batch_size, image_size, preprocess="efficientnet", augment=None, seed=0,
                         epochs=1, initial_epoch=0, initial_step=0, batches_per_epoch=None) -> tf.data.Dataset:
    """Batches `(images, pids)` of shuffled images (`ShuffledBatchSampler`: passes over the records, each
    its own permutation), for epochs `initial_epoch .. epochs-1` of `batches_per_epoch` batches (default:
    one pass). Resumes at (`initial_epoch`, `initial_step`) exactly, as `pair_dataset` does."""
    records = _records(records)
    sampler = ShuffledBatchSampler(len(records), int(batch_size))
    steps = int(batches_per_epoch or sampler.batches_per_pass)
    skip = _check_initial_step(initial_step, steps)
    batches, seeds = _epochs_of(lambda e: sampler.epoch(e, steps, seed), steps, seed, epochs, initial_epoch, skip)
    return _batch_stream(records, batches, seeds, _Loader(image_size, preprocess, augment))
