"""Issue 4 benchmarks for the siamese EfficientNet-B0 (160x80, weights none, batch 48, RMSprop 1e-4):

1. training pairs/s fed by our tf.data pair stream vs the same step fed from tensors already in
   memory (target: >= 95 %);
2. exported SavedModel `embed` (uint8 in, resize + normalisation in the graph) vs the Keras
   embedding model's `predict` on the same batches (target: >= 95 %);
3. peak RSS of a training process on a CUHK01-sized set (3,884 images) (target: <= 3 GB), with the
   batch of 48 pairs fed whole, and fed as 2 x 24 and 4 x 12 pairs with gradient accumulation
   (`--accumulate-steps 2|4`, the same update).

Each section runs in its own child process so that peak RSS and TensorFlow state do not leak
between them. `python experiments/benchmarks/siamese_training_speed.py [--steps 40]`
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

IMAGE_SIZE = (160, 80)
BATCH = 48


def _child(section: str, work: str, steps: int, accumulate: int = 1) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run([sys.executable, __file__, "--child", section, "--work", work, "--steps", str(steps),
                          "--accumulate", str(accumulate)],
                         env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{section} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _dataset(work: str):
    from reid_keras.data.datasets import load_dataset
    from reid_keras.data.datasets.synthetic import ensure_synthetic

    root = ensure_synthetic(os.path.join(work, "data"), layout="cuhk01", num_ids=971, seed=0)
    return load_dataset("cuhk01", root, strict=False, split_file=os.path.join(work, "splits"))


def _model(accumulate: int = 1):
    import keras

    from reid_keras.models.siamese import build_siamese, compile_siamese
    from reid_keras.training.optimizers import make_optimizer

    keras.utils.set_random_seed(0)
    model = build_siamese("efficientnetb0", IMAGE_SIZE, weights=None)
    return compile_siamese(model, make_optimizer("rmsprop", 1e-4, accumulate_steps=accumulate), jit_compile=False)


def _timed_fit(model, data, steps: int) -> float:
    model.fit(data, epochs=1, steps_per_epoch=3, verbose=0, shuffle=False)  # trace + warm up
    started = time.perf_counter()
    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
    return steps * BATCH / (time.perf_counter() - started)


def child_feed(work: str, steps: int) -> dict:
    import numpy as np
    import tensorflow as tf

    from reid_keras.data.augment import AugmentConfig
    from reid_keras.data.pipelines import pair_dataset

    dataset = _dataset(work)
    model = _model()
    stream = pair_dataset(dataset.train, IMAGE_SIZE, BATCH, pairs_per_epoch=(steps + 3) * BATCH * 2,
                          augment=AugmentConfig.efficientnet_paper(), seed=0, epochs=2)
    (a, b), same = next(iter(stream))
    in_memory = tf.data.Dataset.from_tensors(((a, b), same)).repeat()
    rates = {"memory": [], "pipeline": []}
    for _ in range(2):  # interleave so machine load hits both alike
        rates["pipeline"].append(_timed_fit(model, stream, steps))
        rates["memory"].append(_timed_fit(model, in_memory, steps))
    return {k: float(np.median(v)) for k, v in rates.items()}


def child_export(work: str, steps: int) -> dict:
    import numpy as np
    import tensorflow as tf

    from reid_keras.models.saved_model import export_model

    model = _model()
    export_dir = os.path.join(work, "export")
    export_model(model, export_dir, image_size=IMAGE_SIZE, preprocessing="efficientnet", verifier=model)
    served = tf.saved_model.load(export_dir)
    embedding = model.get_layer("embedding")
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (64,) + IMAGE_SIZE + (3,), dtype=np.uint8) for _ in range(max(steps // 4, 5))]
    n = sum(len(b) for b in batches)

    def keras_predict():
        for batch in batches:
            embedding.predict(batch.astype(np.float32), verbose=0, batch_size=64)

    def saved_embed():
        for batch in batches:
            served.embed(tf.constant(batch))

    keras_predict(), saved_embed()  # warm up both
    rates = {"keras_predict": [], "savedmodel_embed": []}
    for _ in range(3):
        for name, fn in (("keras_predict", keras_predict), ("savedmodel_embed", saved_embed)):
            started = time.perf_counter()
            fn()
            rates[name].append(n / (time.perf_counter() - started))
    return {k: float(np.median(v)) for k, v in rates.items()}


def child_memory(work: str, steps: int, accumulate: int = 1) -> dict:
    from reid_keras.data.augment import AugmentConfig
    from reid_keras.data.pipelines import pair_dataset

    dataset = _dataset(work)
    model = _model(accumulate)
    stream = pair_dataset(dataset.train, IMAGE_SIZE, BATCH // accumulate, pairs_per_epoch=steps * BATCH,
                          augment=AugmentConfig.efficientnet_paper(), seed=0, epochs=3)
    model.fit(stream, epochs=3, steps_per_epoch=steps * accumulate, verbose=0, shuffle=False)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"images": len(dataset.train) + len(dataset.query) + len(dataset.gallery),
            "train_images": len(dataset.train), "epochs": 3, "steps": steps, "peak_rss_mb": peak_mb,
            "accumulate": accumulate}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per measurement")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--accumulate", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        if args.child == "memory":
            result = child_memory(args.work, args.steps, args.accumulate)
        else:
            result = {"feed": child_feed, "export": child_export}[args.child](args.work, args.steps)
        print(json.dumps(result))
        return 0

    work = tempfile.mkdtemp(prefix="reid_siamese_bench_")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; EfficientNet-B0 siamese {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, "
          f"weights none, batch {BATCH}, no XLA\n")
    feed = _child("feed", work, args.steps)
    export = _child("export", work, args.steps)
    memories = [_child("memory", work, args.steps, accumulate) for accumulate in (1, 2, 4)]
    ratio_feed = feed["pipeline"] / feed["memory"]
    ratio_export = export["savedmodel_embed"] / export["keras_predict"]
    print("| measurement | ours | reference | ratio | target |\n| --- | ---: | ---: | ---: | --- |")
    print(f"| training pairs/s: pair stream vs in-memory tensors | {feed['pipeline']:.1f} | {feed['memory']:.1f} "
          f"| {100 * ratio_feed:.1f} % | >= 95 % |")
    print(f"| embed images/s: SavedModel (uint8, resize in graph) vs Keras predict | {export['savedmodel_embed']:.1f} "
          f"| {export['keras_predict']:.1f} | {100 * ratio_export:.1f} % | >= 95 % |")
    for memory in memories:
        feed_as = ("batch of 48 fed whole" if memory["accumulate"] == 1 else
                   f"{memory['accumulate']} x {BATCH // memory['accumulate']} pairs, --accumulate-steps "
                   f"{memory['accumulate']}")
        print(f"| peak RSS training on {memory['images']} images ({memory['train_images']} train), "
              f"{memory['epochs']} epochs x {memory['steps']} updates, {feed_as} | {memory['peak_rss_mb']:.0f} MB "
              f"| 3072 MB | {100 * memory['peak_rss_mb'] / 3072:.0f} % | <= 100 % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
