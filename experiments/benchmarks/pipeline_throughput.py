"""Throughput and memory of the tf.data streams on a CUHK01-sized set (issue 2: pipelines benchmark).

    python experiments/benchmarks/pipeline_throughput.py [--epochs 5] [--train-steps 4] [--workdir DIR]

Writes a synthetic CUHK01 (971 ids x 4 images, 160x60 PNG) into a temp folder, then prints:
1. images/s of the single-image stream and pairs/s of the pair stream (160x80, batch 48,
   EfficientNet-paper augmentation), measured on the second pass so file-cache warm-up is excluded;
2. RSS of this process (tf.data threads included) at the end of each epoch of the pair stream:
   it must stay flat, since only indices are held per epoch;
3. pairs/s the pipeline delivers vs pairs/s one siamese EfficientNet-B0 training step consumes
   (160x80, weights=None, shared backbone, GAP, (f1-f2)^2, dropout, Dense(2, softmax), RMSprop
   1e-4, batch 48, no XLA), measured in the same run: the pipeline must be >= 3x faster.
The machine is shared: compare ratios, not absolute numbers.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

from reid_keras.data.augment import AugmentConfig  # noqa: E402
from reid_keras.data.datasets.base import ImageRecord, relabel  # noqa: E402
from reid_keras.data.pipelines import image_dataset, pair_dataset  # noqa: E402
from reid_keras.data.samplers import PairRatioSchedule  # noqa: E402
from machine import describe_machine  # noqa: E402  (experiments/benchmarks/machine.py)

IMAGE_SIZE = (160, 80)
BATCH = 48


def write_cuhk01(workdir: str) -> tuple[list, list]:
    """3,884 images in the CUHK01 layout; returns (all records, paper871 train records)."""
    try:
        from reid_keras.data.datasets import cuhk01, synthetic
    except ImportError:
        synthetic = None
    if synthetic is not None:
        synthetic.write_dataset(layout="cuhk01", out=workdir, num_ids=971, seed=0, images_per_id_cam=(2, 2),
                                workers=os.cpu_count() or 1)
        data = cuhk01.load(workdir, strict=False, split="paper871", split_file=workdir)
        return data.train + data.query + data.gallery, data.train
    import cv2  # fallback: random images with the same names and sizes

    folder = os.path.join(workdir, "CUHK01", "campus")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for pid in range(1, 972):
        for img in range(1, 5):
            path = os.path.join(folder, f"{pid:04d}{img:03d}.png")
            cv2.imwrite(path, rng.integers(0, 256, (160, 60, 3), dtype=np.uint8))
            records.append(ImageRecord(path, pid, (img - 1) // 2))
    train, _ = relabel([r for r in records if r.pid <= 871])
    return records, train


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2 ** 20


def timed_pass(iterator, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    return time.perf_counter() - start


def pipeline_rows(all_records, train) -> tuple[list, float]:
    rows = []
    aug = AugmentConfig.efficientnet_paper()
    for name, kwargs in (("none", {}), ("efficientnet_paper", {"augment": aug})):
        ds = image_dataset(all_records, IMAGE_SIZE, BATCH, preprocess="efficientnet", shuffle=True, **kwargs)
        steps = len(all_records) // BATCH
        for _ in ds:  # first pass: traces functions and warms the file cache
            pass
        seconds = timed_pass(iter(ds), steps)
        rows.append(("image_dataset", name, steps * BATCH, seconds, steps * BATCH / seconds))
    steps = len(train) // BATCH
    ds = pair_dataset(train, IMAGE_SIZE, BATCH, pairs_per_epoch=len(train), schedule=PairRatioSchedule.fixed(1.0),
                      preprocess="efficientnet", augment=aug, epochs=2)
    it = iter(ds)
    timed_pass(it, steps)
    seconds = timed_pass(it, steps)
    pair_rate = steps * BATCH / seconds
    rows.append(("pair_dataset", "efficientnet_paper", steps * BATCH, seconds, pair_rate))
    return rows, pair_rate


def memory_rows(train, epochs: int) -> list:
    steps = len(train) // BATCH
    ds = pair_dataset(train, IMAGE_SIZE, BATCH, pairs_per_epoch=len(train), schedule=PairRatioSchedule.idver(),
                      preprocess="efficientnet", augment=AugmentConfig.efficientnet_paper(), epochs=epochs)
    rows, it = [], iter(ds)
    peak = rss_mb()
    for epoch in range(epochs):
        for _ in range(steps):
            next(it)
            peak = max(peak, rss_mb())
        rows.append((epoch, steps * BATCH, rss_mb(), peak))
    return rows


def siamese_b0() -> keras.Model:
    """The EfficientNet siamese paper's network (§A-B), built here so the benchmark stands alone."""
    backbone = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(*IMAGE_SIZE, 3),
                                                 pooling="avg")
    a = keras.Input((*IMAGE_SIZE, 3), name="image_a")
    b = keras.Input((*IMAGE_SIZE, 3), name="image_b")
    diff = keras.layers.Subtract()([backbone(a), backbone(b)])
    square = keras.layers.Multiply()([diff, diff])
    out = keras.layers.Dense(2, activation="softmax")(keras.layers.Dropout(0.5)(square))
    model = keras.Model([a, b], out)
    model.compile(optimizer=keras.optimizers.RMSprop(1e-4), loss="sparse_categorical_crossentropy",
                  jit_compile=False)
    return model


def training_rate(train, steps: int) -> float:
    ds = pair_dataset(train, IMAGE_SIZE, BATCH, pairs_per_epoch=BATCH, preprocess="efficientnet")
    (xa, xb), y = next(iter(ds))
    model = siamese_b0()
    for _ in range(2):  # tracing + first-step allocations
        model.train_on_batch([xa, xb], y)
    start = time.perf_counter()
    for _ in range(steps):
        model.train_on_batch([xa, xb], y)
    return steps * BATCH / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=5, help="pair-stream epochs for the memory table")
    parser.add_argument("--train-steps", type=int, default=4, help="timed siamese training steps")
    parser.add_argument("--workdir", default=None, help="where to write the images (default: a temp folder)")
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="reid_pipeline_bench_")
    try:
        start = time.perf_counter()
        all_records, train = write_cuhk01(workdir)
        print(f"machine: {describe_machine(TensorFlow=tf.__version__, Keras=keras.__version__)}")
        print(f"data: {len(all_records)} images ({len(train)} train, {len({r.pid for r in train})} train ids), "
              f"written in {time.perf_counter() - start:.1f} s to {workdir}\n")

        rows, pair_rate = pipeline_rows(all_records, train)
        print(f"### 1. Stream throughput ({IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, batch {BATCH}, second pass)\n")
        print("| stream | augmentation | items | seconds | items/s |\n| --- | --- | ---: | ---: | ---: |")
        for stream, aug, n, s, rate in rows:
            print(f"| {stream} | {aug} | {n} | {s:.2f} | {rate:.0f} |")

        mem = memory_rows(train, args.epochs)
        held = len(train) * 2 * IMAGE_SIZE[0] * IMAGE_SIZE[1] * 3 * 4 / 2 ** 20
        print("\n### 2. RSS at the end of each pair-stream epoch (idver schedule, augmentation on)\n")
        print("| epoch | pairs | RSS MB | peak RSS MB so far |\n| ---: | ---: | ---: | ---: |")
        for epoch, n, rss, peak in mem:
            print(f"| {epoch} | {n} | {rss:.0f} | {peak:.0f} |")
        print(f"\nGrowth from epoch 0 to {args.epochs - 1}: {mem[-1][2] - mem[0][2]:+.0f} MB. Holding one epoch's "
              f"{len(train)} pairs as float32 arrays (the authors' offline approach) would take {held:.0f} MB.")

        train_rate = training_rate(train, args.train_steps)
        print("\n### 3. Pipeline vs siamese EfficientNet-B0 training step (same run)\n")
        print("| pipeline pairs/s | training pairs/s | ratio (target >= 3) |\n| ---: | ---: | ---: |")
        print(f"| {pair_rate:.0f} | {train_rate:.1f} | {pair_rate / train_rate:.1f}x |")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
