"""Scenes/s of the person-search training stream vs a detector training step's demand (issue 13 benchmark).

    python experiments/benchmarks/scene_pipeline_throughput.py [--scenes 60] [--train-steps 2] [--workdir DIR]

Writes `--scenes` JPEG scenes of 400x600 (height x width, quality 90: textured background, 1-12
people-sized blocks, a portrait scene every tenth) into a temp folder, then for two recipes, the
CPU one (min/max side 400/600) and the paper one (900/1500: `scene_pipeline.PAPER_SIDES`), prints
1. scenes/s of `scene_train_dataset` (batch 2 as in OIM §5.1, flip on, ResNet-50 normalisation,
   per-batch padding to multiples of 32), timed over epochs 2..1+`--timed-epochs` (tracing and
   file cache warmed by the first);
2. scenes/s one training step consumes, measured in the same run on a batch from that stream: a
   PROXY for the person-search model, which does not exist yet: forward + backward + SGD update
   of `keras.applications.ResNet50(weights=None, include_top=False)` on the padded batch, loss =
   mean of the last feature map, no XLA. The real model runs ResNet-50 conv1-conv4 on the whole
   scene (as here) and conv5 on 128 RoIs per scene instead of the whole map, plus the RPN: the
   same order of cost.
The target is pipeline >= 3x the step's demand. The pipeline and the step are timed one after the
other, each with the whole (shared, 2-core) machine; compare ratios, not absolute numbers.
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

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import tensorflow as tf  # noqa: E402
import keras  # noqa: E402

from reid_keras.data.datasets.scenes import UNLABELED, make_scene  # noqa: E402
from reid_keras.data.scene_pipeline import PAPER_SIDES, scene_train_dataset  # noqa: E402
from machine import describe_machine  # noqa: E402  (experiments/benchmarks/machine.py)

BATCH = 2  # OIM paper §5.1: "Each mini-batch consists of two scene images"
MAX_BOXES = 12
RECIPES = (("CPU recipe", 400, 600), ("paper", *PAPER_SIDES))


def write_scenes(folder: str, count: int, seed: int = 0) -> list:
    """`count` JPEG scenes with 1-12 boxes each; returns their SceneRecords."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    scenes = []
    for i in range(count):
        h, w = (600, 400) if i % 10 == 9 else (400, 600)
        ramp = np.linspace(40, 200, w, dtype=np.float32)[None, :, None]
        image = np.clip(ramp + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        image = cv2.GaussianBlur(image, (5, 5), 0)
        boxes, pids = [], []
        for _ in range(rng.integers(1, MAX_BOXES + 1)):
            bh = int(rng.integers(40, min(300, h - 1)))
            bw = max(8, bh * 2 // 5)
            x1, y1 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            colour = [int(c) for c in rng.integers(0, 256, 3)]
            cv2.rectangle(image, (x1, y1), (x1 + bw, y1 + bh), colour, thickness=-1)
            boxes.append([x1, y1, x1 + bw, y1 + bh])
            pids.append(int(rng.integers(0, 50)) if rng.random() < 0.6 else UNLABELED)
        path = os.path.join(folder, f"s{i:05d}.jpg")
        cv2.imwrite(path, image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        scenes.append(make_scene(path, boxes, pids))
    return scenes


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2 ** 20


def pipeline_rate(scenes: list, min_side: int, max_side: int, timed_epochs: int) -> tuple:
    """(scenes/s over epochs 1..timed_epochs, one batch of the stream, seconds of the first epoch)."""
    steps = len(scenes) // BATCH
    ds = scene_train_dataset(scenes, min_side, max_side, BATCH, MAX_BOXES, seed=0, epochs=1 + timed_epochs)
    it = iter(ds)
    start = time.perf_counter()
    batch = next(it)
    for _ in range(steps - 1):
        next(it)
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps * timed_epochs):
        next(it)
    return steps * timed_epochs * BATCH / (time.perf_counter() - start), batch, first


def proxy_step_rate(images: tf.Tensor, steps: int) -> tuple:
    """(scenes/s of the proxy step, seconds of its first call, peak RSS MB) on `images` [B, H, W, 3]."""
    model = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(None, None, 3))
    optimizer = keras.optimizers.SGD(1e-3, momentum=0.9)

    @tf.function(jit_compile=False)
    def step(x):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    start = time.perf_counter()
    step(images).numpy()  # tracing + first-step allocations
    first = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step(images).numpy()
    rate = steps * int(images.shape[0]) / (time.perf_counter() - start)
    return rate, first, rss_mb()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenes", type=int, default=60, help="scenes to write (400x600 JPEG)")
    parser.add_argument("--timed-epochs", type=int, default=3, help="pipeline epochs timed after the first")
    parser.add_argument("--train-steps", type=int, default=2, help="timed proxy training steps per recipe")
    parser.add_argument("--workdir", default=None, help="where to write the scenes (default: a temp folder)")
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="reid_scene_bench_")
    try:
        start = time.perf_counter()
        scenes = write_scenes(os.path.join(workdir, "scenes"), args.scenes)
        boxes = sum(len(s.boxes) for s in scenes)
        print(f"machine: {describe_machine(TensorFlow=tf.__version__, Keras=keras.__version__)}")
        print(f"data: {len(scenes)} JPEG scenes of 400x600 (every tenth 600x400), {boxes} boxes, written in "
              f"{time.perf_counter() - start:.1f} s to {workdir}\n")
        rows = []
        for name, min_side, max_side in RECIPES:
            rate, batch, first = pipeline_rate(scenes, min_side, max_side, args.timed_epochs)
            images = batch["images"]
            demand, step_first, peak = proxy_step_rate(images, args.train_steps)
            rows.append((name, min_side, max_side, tuple(images.shape[1:3]), rate, first, demand, step_first, peak))
            print(f"{name}: pipeline {rate:.1f} scenes/s (first epoch {first:.1f} s), proxy step {demand:.2f} "
                  f"scenes/s (first call {step_first:.1f} s), RSS {peak:.0f} MB", flush=True)
        print(f"\n### Scene pipeline vs a detector training step (batch {BATCH}, same run)\n")
        print("| recipe | min/max side | padded batch H x W | pipeline scenes/s | step demand scenes/s (PROXY: "
              "ResNet-50 fwd+bwd on the whole scene) | ratio (target >= 3) |")
        print("| --- | --- | --- | ---: | ---: | ---: |")
        for name, lo, hi, hw, rate, _, demand, _, _ in rows:
            print(f"| {name} | {lo}/{hi} | {hw[0]} x {hw[1]} | {rate:.1f} | {demand:.2f} | {rate / demand:.0f}x |")
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
