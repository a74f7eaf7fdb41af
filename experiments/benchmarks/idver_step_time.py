"""Issue 5 benchmark: training step time of `resnet50_idver` (I+V) relative to `resnet50_id` (I only).

Both models see the same 16 pairs (32 images) per step, so the ratio is the cost of the Square
layer, the verification head and its loss on top of the shared ResNet-50 and the two
identification heads (expected: close to 1). Weights none, SGD as in the paper preset, 751
identities (Market-1501), inputs already in memory. Steps of the two models alternate so that
load on the shared machine hits both alike; the median of N steps after warm-up is reported.

    python experiments/benchmarks/idver_step_time.py [--steps 20] [--image-size 128x64]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PAIRS = 16
NUM_IDS = 751


def _model(preset: str, image_size):
    import keras

    from reid_keras.families import get_preset

    family, preset = get_preset(preset)
    task = family.task(preset.resolve("paper").replace(image_size=image_size, weights="none", lr_drop_epochs=0))
    keras.utils.set_random_seed(0)
    model, _ = task.build(NUM_IDS)  # the paper's SGD recipe, without the epoch-based rate drop
    return model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model (tracing)")
    parser.add_argument("--image-size", default="128x64", help="HEIGHTxWIDTH")
    args = parser.parse_args()
    image_size = tuple(int(v) for v in args.image_size.lower().split("x"))

    import keras
    import numpy as np
    import tensorflow as tf

    from machine import describe_machine

    rng = np.random.default_rng(0)
    a = rng.uniform(-120, 150, (PAIRS, *image_size, 3)).astype("float32")
    b = rng.uniform(-120, 150, (PAIRS, *image_size, 3)).astype("float32")
    pid_a, pid_b = rng.integers(0, NUM_IDS, PAIRS), rng.integers(0, NUM_IDS, PAIRS)
    pid_b[::2] = pid_a[::2]
    targets = {"id_a": pid_a, "id_b": pid_b, "verification": (pid_a == pid_b).astype("int32")}

    models = {"resnet50_idver": _model("resnet50_idver", image_size), "resnet50_id": _model("resnet50_id", image_size)}
    batches = {name: {k: v for k, v in targets.items() if k in model.output} for name, model in models.items()}
    times = {name: [] for name in models}
    for step in range(args.warmup + args.steps):
        for name, model in models.items():
            started = time.perf_counter()
            model.train_on_batch((a, b), batches[name])
            elapsed = time.perf_counter() - started
            if step >= args.warmup:
                times[name].append(elapsed)

    median = {name: float(np.median(t)) for name, t in times.items()}
    print(describe_machine(tensorflow=tf.__version__, keras=keras.__version__))
    print(f"\nResNet-50, weights none, {image_size[0]}x{image_size[1]}, {PAIRS} pairs = {2 * PAIRS} images per step, "
          f"{NUM_IDS} ids, SGD, median of {args.steps} steps after {args.warmup} warm-up steps\n")
    print("| model | heads | median step (s) | images/s |\n| --- | --- | ---: | ---: |")
    for name, heads in (("resnet50_id", "2 x ID"), ("resnet50_idver", "2 x ID + verification")):
        print(f"| {name} | {heads} | {median[name]:.3f} | {2 * PAIRS / median[name]:.1f} |")
    print(f"\nratio resnet50_idver / resnet50_id step time: {median['resnet50_idver'] / median['resnet50_id']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
