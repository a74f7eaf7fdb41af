"""tf.data streams of whole scenes with their boxes, for person search (detector + re-ID).

Each scene is read by path inside the graph (`decoding.decode_image`), resized keeping its aspect
ratio by the Faster R-CNN rule (`resize_scale`), optionally mirrored (boxes move with the pixels),
normalised for the backbone (`preprocessing_for`) and zero-padded at the bottom/right into a batch.
Elements are one dict of tensors (B = batch size, M = boxes per scene after padding):

    "images"      [B, H, W, 3] float32  normalised pixels; padding is 0 (after normalisation)
    "image_shape" [B, 2] int32          height, width of each resized image before padding
    "scale"       [B] float32           resized / original pixels (boxes map back as x / scale)
    "boxes"       [B, M, 4] float32     x1, y1, x2, y2 in resized pixels; padding rows all 0
    "pids"        [B, M] int32          dense labels, UNLABELED (-1) for unnamed people, PADDING (-2)
    "box_mask"    [B, M] bool           False = padding row (never a person, never matched)
    "index"       [B] int32             position of the scene in the `scenes` given
    "flipped"     [B] bool              the scene was mirrored (training stream only)

Why one dict: Faster R-CNN style detectors need the ground truth *inside* the forward pass
(anchors and proposals are labelled against it), so `model.fit(stream)` receives the dict as `x`
(Keras treats a lone dict as inputs, y = None) and the model's `train_step` / `call(training=True)`
reads "boxes", "pids" and "box_mask" from it. `TARGET_KEYS` names the ground-truth entries for a
model that wants `(inputs, targets)`: `split_targets(batch)`.

The training stream is addressed by (epoch, step) like the crop streams (`pipelines.py`): the
scene order of epoch e is a seeded permutation (`samplers.ShuffledBatchSampler`) and each scene's
flip is drawn from a seed that is a function of (seed, epoch, position) (`pipelines.position_seeds`),
so a run resumed at (epoch, step) sees exactly the batches the uninterrupted run saw from there.
Damaged files are found up front by `decoding.drop_damaged(dataset)`; one that slips through is
dropped by `ignore_errors(log_warning=True)` right after decoding, and the training stream then
drops its whole batch (so the batches after it keep their (epoch, step) address).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf

from reid_keras.data.augment import as_hw
from reid_keras.data.datasets.scenes import UNLABELED, SceneRecord
from reid_keras.data.decoding import decode_image
from reid_keras.data.pipelines import _check_initial_step, _epochs_of
from reid_keras.data.preprocessing import Preprocessing, preprocessing_for
from reid_keras.data.samplers import ShuffledBatchSampler

AUTOTUNE = tf.data.AUTOTUNE
# pid of a padding row: distinct from every label and from UNLABELED, so no loss or matcher that
# compares pids can pair a padding row with a person (box_mask says the same thing).
PADDING = -2
TARGET_KEYS = ("boxes", "pids", "box_mask")
# Min / max side of the published recipes. The OIM paper (§5.1) states only that it builds on
# py-faster-rcnn, whose defaults are a 600-px short side capped at 1,000 px on the long side;
# 900 / 1,500 is what later PyTorch re-implementations train and test at (SeqNet's INPUT.MIN_SIZE / MAX_SIZE).
PY_FASTER_RCNN_SIDES = (600, 1000)
PAPER_SIDES = (900, 1500)


def _check_sides(min_side, max_side) -> tuple:
    if not (isinstance(min_side, (int, np.integer)) and min_side >= 1):
        raise ValueError(f"min_side must be a positive int (pixels of the short side), got {min_side!r}")
    if not (isinstance(max_side, (int, np.integer)) and max_side >= min_side):
        raise ValueError(f"max_side must be an int >= min_side={min_side} (cap of the long side), got {max_side!r}")
    return int(min_side), int(max_side)


def resize_scale(height, width, min_side: int, max_side: int) -> float:
    """Faster R-CNN resize factor: the short side becomes `min_side` unless the long side would
    then exceed `max_side`, in which case the long side becomes `max_side` (aspect ratio kept).

    Example: a 400x600 scene at 900/1500 -> 2.25 (900x1350); a 100x1000 one -> 1.5 (150x1500).
    """
    min_side, max_side = _check_sides(min_side, max_side)
    if not (height >= 1 and width >= 1):
        raise ValueError(f"height and width must be >= 1 pixel, got {height!r} x {width!r}")
    return min(min_side / min(height, width), max_side / max(height, width))


def resized_shape(height, width, min_side: int, max_side: int) -> tuple:
    """`(new_height, new_width, scale)`: the sides are `round(side * scale)` (half to even, at least 1),
    exactly as the streams compute them."""
    scale = resize_scale(height, width, min_side, max_side)
    return max(1, int(np.round(height * scale))), max(1, int(np.round(width * scale))), scale


def _resize_in_graph(image, min_side: int, max_side: int):
    """`resized_shape` on a decoded image tensor: (resized image, scale float32, [h, w] int32)."""
    hw = tf.cast(tf.shape(image)[:2], tf.float64)  # float64: the same numbers as resize_scale in numpy
    scale = tf.minimum(min_side / tf.reduce_min(hw), max_side / tf.reduce_max(hw))
    size = tf.maximum(tf.cast(tf.round(hw * scale), tf.int32), 1)
    resized = tf.image.resize(image, size, method="bilinear")
    return resized, tf.cast(scale, tf.float32), size


def _scenes(scenes, name: str = "scenes") -> list:
    scenes = list(scenes)
    if not scenes:
        raise ValueError(f"{name} is empty: nothing to stream")
    for s in scenes:
        if not isinstance(s, SceneRecord):
            raise TypeError(f"{name} must hold SceneRecords (data.datasets.scenes.make_scene), got {type(s).__name__}")
        bad = s.pids[(s.pids < 0) & (s.pids != UNLABELED)]
        if bad.size:
            raise ValueError(f"scene {s.path}: person id {int(bad[0])} is not a label (>= 0) nor UNLABELED "
                             f"({UNLABELED}); relabel the scenes first (scenes.relabel_scenes)")
    return scenes


def _check_max_boxes(scenes: list, max_boxes) -> int:
    if not (isinstance(max_boxes, (int, np.integer)) and max_boxes >= 1):
        raise ValueError(f"max_boxes must be a positive int, got {max_boxes!r}")
    counts = np.array([len(s.boxes) for s in scenes])
    over = np.flatnonzero(counts > max_boxes)
    if over.size:
        worst = int(over[np.argmax(counts[over])])
        raise ValueError(f"scene {scenes[worst].path} has {counts[worst]} people but max_boxes={max_boxes} "
                         f"({over.size} scene(s) have more than max_boxes); raise max_boxes to at least "
                         f"{counts.max()} - boxes are never dropped silently")
    return int(max_boxes)


class _SceneLoader:
    """Scene index (+ seed) -> one element dict, with the scenes' paths and boxes held as constants."""

    def __init__(self, scenes: list, min_side, max_side, preprocess, pad_to=None, size_divisor=1):
        self.min_side, self.max_side = _check_sides(min_side, max_side)
        self.preprocess = preprocess if isinstance(preprocess, Preprocessing) else preprocessing_for(preprocess)
        self.pad_to = as_hw(pad_to, "pad_to")
        if not (isinstance(size_divisor, (int, np.integer)) and size_divisor >= 1):
            raise ValueError(f"size_divisor must be a positive int, got {size_divisor!r}")
        self.size_divisor = int(size_divisor)
        self.paths = tf.constant([s.path for s in scenes])
        splits = np.cumsum([0] + [len(s.boxes) for s in scenes]).astype(np.int64)
        flat_boxes = np.concatenate([s.boxes for s in scenes]).astype(np.float32).reshape(-1, 4)
        flat_pids = np.concatenate([s.pids for s in scenes]).astype(np.int32)
        self.boxes = tf.RaggedTensor.from_row_splits(tf.constant(flat_boxes), tf.constant(splits))
        self.pids = tf.RaggedTensor.from_row_splits(tf.constant(flat_pids), tf.constant(splits))

    def decode(self, index, seed):
        """The decoding step (errors here are the ones `ignore_errors` drops)."""
        path = tf.gather(self.paths, index)
        return decode_image(tf.io.read_file(path), path), index, seed

    def prepare(self, image, index, seed, flip: bool, max_boxes=None, extra_boxes=None) -> dict:
        """Resize, mirror (when `flip` and the seed says so), normalise, box bookkeeping."""
        image, scale, size = _resize_in_graph(image, self.min_side, self.max_side)
        h, w = tf.cast(size[0], tf.float32), tf.cast(size[1], tf.float32)
        limits = tf.stack([w, h, w, h])
        boxes = tf.clip_by_value(self.boxes[index] * scale, 0.0, limits)
        pids = self.pids[index]
        out = {}
        if extra_boxes is not None:  # the query box (query_dataset), scaled like the others
            out["query_box"] = tf.clip_by_value(extra_boxes * scale, 0.0, limits)
        if flip:
            mirrored = tf.random.stateless_uniform([], seed) < 0.5
            image = tf.cond(mirrored, lambda: tf.reverse(image, axis=[1]), lambda: image)
            x1, y1, x2, y2 = tf.unstack(boxes, axis=-1)
            boxes = tf.where(mirrored, tf.stack([w - x2, y1, w - x1, y2], axis=-1), boxes)
            out["flipped"] = mirrored
        image = self.preprocess(image)
        if self.pad_to is not None:
            fits = (size[0] <= self.pad_to[0]) & (size[1] <= self.pad_to[1])
            tf.debugging.Assert(fits, ["pad_to", self.pad_to, "is smaller than the resized scene",
                                       tf.gather(self.paths, index), "of height, width", size,
                                       "; use pad_to >= (max_side, max_side) for scenes of any orientation"])
            image = tf.ensure_shape(tf.image.pad_to_bounding_box(image, 0, 0, *self.pad_to), [*self.pad_to, 3])
        n = tf.shape(boxes)[0]
        if max_boxes is not None:  # fixed M (training): pad here, so every batch has the same shape
            boxes = tf.ensure_shape(tf.pad(boxes, [[0, max_boxes - n], [0, 0]]), [max_boxes, 4])
            pids = tf.ensure_shape(tf.pad(pids, [[0, max_boxes - n]], constant_values=PADDING), [max_boxes])
            mask = tf.range(max_boxes) < n
        else:
            mask = tf.ones([n], tf.bool)
        out.update({"images": image, "image_shape": size, "scale": scale, "boxes": boxes, "pids": pids,
                    "box_mask": mask, "index": tf.cast(index, tf.int32)})
        return out

    def padded_batch(self, ds, batch_size: int, drop_remainder: bool = False):
        """Batch elements, padding images (0), boxes (0), pids (PADDING) and masks (False)."""
        spec = ds.element_spec
        values = {k: tf.constant(PADDING if k == "pids" else (False if v.dtype == tf.bool else 0), v.dtype)
                  for k, v in spec.items()}
        shapes = {k: v.shape for k, v in spec.items()}
        ds = ds.padded_batch(batch_size, padded_shapes=shapes, padding_values=values, drop_remainder=drop_remainder)
        return ds.map(self._round_up) if self.pad_to is None and self.size_divisor > 1 else ds

    def _round_up(self, batch: dict) -> dict:
        """Pad the batch's canvas to a multiple of `size_divisor` (the backbone's stride)."""
        hw = tf.shape(batch["images"])[1:3]
        d = self.size_divisor
        extra = (-hw) % d
        images = tf.pad(batch["images"], [[0, 0], [0, extra[0]], [0, extra[1]], [0, 0]])
        return {**batch, "images": images}


def split_targets(batch: dict) -> tuple:
    """`(inputs, targets)`: the batch dict cut into the ground truth (`TARGET_KEYS`) and the rest."""
    return ({k: v for k, v in batch.items() if k not in TARGET_KEYS},
            {k: v for k, v in batch.items() if k in TARGET_KEYS})


def scene_train_dataset(scenes, min_side: int, max_side: int, batch_size: int, max_boxes: int,
                        preprocess="resnet50", flip: bool = True, seed: int = 0, epochs: int = 1,
                        initial_epoch: int = 0, initial_step: int = 0, pad_to=None, drop_remainder: bool = True,
                        batches_per_epoch: int | None = None, size_divisor: int = 32) -> tf.data.Dataset:
    """Training batches of scenes (the dict in the module docstring) for epochs `initial_epoch .. epochs-1`.

    Args:
        scenes: `SceneRecord`s with dense labels (or UNLABELED); a scene may have no person.
        min_side, max_side: the resize rule (`resize_scale`); `PAPER_SIDES` = 900/1500, CPU
            recipes smaller (e.g. 400/600).
        batch_size: scenes per batch (OIM paper §5.1: two).
        max_boxes: M, the boxes rows of every scene; a scene with more people is an error here,
            naming it (never truncated).
        flip: mirror each scene with probability 0.5, seeded by (seed, epoch, position).
        pad_to: `(H, W)`: a fixed canvas, so every batch has the same static shape (a model traces
            once); it must hold every resized scene - `(max_side, max_side)` always does - else the
            stream stops with an error naming the scene. None: each batch is padded to its largest
            scene, rounded up to a multiple of `size_divisor`.
        epochs, initial_epoch, initial_step, batches_per_epoch: as `pipelines.random_batch_dataset`:
            epoch e has `batches_per_epoch` (default `len(scenes) // batch_size`) batches; a run
            resumed at (initial_epoch, initial_step) gets the uninterrupted run's batches from there.
            One spare epoch follows, in case damaged files dropped batches; pass
            `steps_per_epoch` to `fit`.
        drop_remainder: drop a batch that lost a scene to a damaged file (static batch size).

    Raises:
        ValueError naming the scene with more than `max_boxes` people, or the bad argument.
    """
    scenes = _scenes(scenes)
    max_boxes = _check_max_boxes(scenes, max_boxes)
    loader = _SceneLoader(scenes, min_side, max_side, preprocess, pad_to, size_divisor)
    if not (isinstance(batch_size, (int, np.integer)) and 1 <= batch_size <= len(scenes)):
        raise ValueError(f"batch_size must be an int in [1, {len(scenes)}] (the number of scenes), got {batch_size!r}")
    batch_size = int(batch_size)
    sampler = ShuffledBatchSampler(len(scenes), batch_size)
    steps = int(batches_per_epoch or sampler.batches_per_pass)
    skip = _check_initial_step(initial_step, steps)
    batches, seeds = _epochs_of(lambda e: sampler.epoch(e, steps, seed), steps, seed, epochs, initial_epoch, skip)

    def one_batch(indices, batch_seed):
        element_seeds = tf.random.experimental.stateless_split(batch_seed, batch_size)
        ds = tf.data.Dataset.from_tensor_slices((indices, element_seeds))
        ds = ds.map(loader.decode, num_parallel_calls=AUTOTUNE).ignore_errors(log_warning=True)
        ds = ds.map(lambda image, i, s: loader.prepare(image, i, s, flip, max_boxes))
        return loader.padded_batch(ds, batch_size)

    ds = tf.data.Dataset.from_tensor_slices((batches.astype(np.int32), seeds))
    # One inner dataset per batch, run in parallel and delivered in order: a damaged scene shortens
    # only its own batch, which is then dropped whole, so later batches keep their (epoch, step).
    ds = ds.interleave(one_batch, block_length=1, num_parallel_calls=AUTOTUNE, deterministic=True)
    if drop_remainder:
        ds = ds.filter(lambda b: tf.shape(b["index"])[0] == batch_size)
        ds = ds.map(lambda b: {k: tf.ensure_shape(v, [batch_size, *v.shape[1:]]) for k, v in b.items()})
    return ds.prefetch(AUTOTUNE)


def scene_eval_dataset(scenes, min_side: int, max_side: int, batch_size: int = 1, preprocess="resnet50",
                       pad_to=None, size_divisor: int = 32) -> tf.data.Dataset:
    """Inference batches of `scenes` in order (no flip), the dict of the module docstring without
    "flipped"; boxes and pids padded per batch to its most crowded scene. Map a box predicted on
    "images" back to original pixels with `to_original_pixels(boxes, batch["scale"])`. A damaged
    scene is dropped (its "index" is missing) and logged; the last batch may be smaller."""
    scenes = _scenes(scenes)
    loader = _SceneLoader(scenes, min_side, max_side, preprocess, pad_to, size_divisor)
    ds = tf.data.Dataset.range(len(scenes)).map(lambda i: loader.decode(i, tf.zeros([2], tf.int64)),
                                                num_parallel_calls=AUTOTUNE)
    ds = ds.ignore_errors(log_warning=True).map(lambda image, i, s: loader.prepare(image, i, s, flip=False),
                                                num_parallel_calls=AUTOTUNE)
    return loader.padded_batch(ds, int(batch_size)).prefetch(AUTOTUNE)


def query_dataset(dataset, min_side: int, max_side: int, batch_size: int = 1, preprocess="resnet50",
                  pad_to=None, size_divisor: int = 32) -> tf.data.Dataset:
    """Each query's scene with its box as the fixed RoI, in `dataset.queries` order.

    Elements are `scene_eval_dataset`'s dict plus "query_box" [B, 4] (the query person's box in
    resized pixels); "index" is the query's position in `dataset.queries` (the order of the
    `query_embeddings` that `metrics.search.evaluate_search` takes), "boxes" / "pids" are every
    annotated person of the query's scene.

    Raises:
        ValueError naming the query whose scene is not among `dataset.gallery`.
    """
    queries = list(dataset.queries)
    if not queries:
        raise ValueError(f"{dataset.name}: the dataset has no queries")
    scenes = []
    for q in queries:
        try:
            scenes.append(dataset.scene(q.scene))
        except KeyError:
            raise ValueError(f"{dataset.name}: query {q.index} (pid {q.pid}) is in scene {q.scene!r}, which is "
                             "not a gallery scene of the dataset (dropped as damaged? use decoding.drop_damaged, "
                             "which drops its queries too)") from None
    scenes = _scenes(scenes, "the query scenes")
    loader = _SceneLoader(scenes, min_side, max_side, preprocess, pad_to, size_divisor)
    query_boxes = tf.constant(np.stack([np.asarray(q.box, np.float32).reshape(4) for q in queries]))
    ds = tf.data.Dataset.range(len(queries)).map(lambda i: loader.decode(i, tf.zeros([2], tf.int64)),
                                                 num_parallel_calls=AUTOTUNE)
    ds = ds.ignore_errors(log_warning=True).map(
        lambda image, i, s: loader.prepare(image, i, s, flip=False, extra_boxes=tf.gather(query_boxes, i)),
        num_parallel_calls=AUTOTUNE)
    return loader.padded_batch(ds, int(batch_size)).prefetch(AUTOTUNE)


def to_original_pixels(boxes, scale) -> np.ndarray:
    """Boxes `[B, M, 4]` (or `[B, 4]`) in resized pixels -> original image pixels (`x / scale`)."""
    boxes = np.asarray(boxes, np.float32)
    scale = np.asarray(scale, np.float32).reshape([-1] + [1] * (boxes.ndim - 1))
    return boxes / scale


def steps_per_epoch(num_scenes: int, batch_size: int) -> int:
    """Batches in one training epoch by default (`scene_train_dataset` without batches_per_epoch)."""
    if int(num_scenes) < int(batch_size):
        raise ValueError(f"{num_scenes} scene(s) are less than one batch of {batch_size}")
    return int(num_scenes) // int(batch_size)
