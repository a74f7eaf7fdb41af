"""Cost of the OIM loss (oim_person_search.txt §3.2; issue 6 benchmark).

Claim: OIM forward + backward + memory update adds <= 5 % to a ResNet-50 training step at
L = 5,532, Q = 5,000, D = 256, batch 64 (ratio measured in one run), and the memory update cost
grows linearly with the batch size, not with L.

(a) ResNet-50 (weights none, 128x64 input to stay affordable on a 2-core CPU) + global average
    pooling + 256-d projection + L2 normalisation, one SGD step on a batch of 64:
    baseline = the same network with a softmax-free loss on the features (mean squared error to a
    fixed target), versus the network + `OIMMemory` + `OIMLoss`. Steps of the two models
    alternate one by one and the median per-step time is reported (the machine is shared).
(b) OIM alone (features as a variable standing in for the network): forward + backward + update,
    the same without the update (training=False), and the update alone, versus the batch size at
    fixed L and versus L at fixed batch. Forward/backward are B x (L+Q) x D matrix products and grow
    with L by nature; the update gathers, renormalises and scatters B rows.

    python experiments/benchmarks/oim_overhead.py              # 3-8 minutes on 2 shared cores
    python experiments/benchmarks/oim_overhead.py --small      # a seconds-long smoke run
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import numpy as np  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from machine import describe_machine  # noqa: E402  (experiments/benchmarks/machine.py)
from reid_keras.losses import OIMLoss, oim_loss  # noqa: E402
from reid_keras.models.oim import UNLABELED, OIMMemory  # noqa: E402

NUM_IDS, QUEUE, DIM, BATCH = 5532, 5000, 256, 64
IMAGE = (128, 64)


def batch_labels(rng, batch, num_ids):
    """A PK-like batch: 3/4 of the rows are labeled in groups of 4 of one id, 1/4 unlabeled."""
    labeled = (3 * batch) // 4
    ids = rng.choice(num_ids, size=max(labeled // 4, 1), replace=False)
    labels = np.full(batch, UNLABELED, np.int32)
    labels[:labeled] = np.repeat(ids, 4)[:labeled]
    return labels


def fill_memory(layer, rng):
    def unit(shape):
        rows = rng.standard_normal(shape).astype(np.float32)
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)
    layer.lookup_table.assign(unit((layer.num_ids, layer.feature_dim)))
    if layer.queue_size:
        layer.queue.assign(unit((layer.queue_size, layer.feature_dim)))
        layer.queue_filled.assign(layer.queue_size)


def resnet_models(image_size):
    images = keras.Input(image_size + (3,), name="images")
    labels = keras.Input((), dtype="int32", name="labels")
    backbone = keras.applications.ResNet50(include_top=False, weights=None, input_shape=image_size + (3,),
                                           pooling="avg")
    features = keras.layers.UnitNormalization()(keras.layers.Dense(DIM, name="projection")(backbone(images)))
    baseline = keras.Model(images, features)
    baseline.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse", jit_compile=False)
    oim = OIMMemory(NUM_IDS, QUEUE, DIM, name="oim")
    with_oim = keras.Model([images, labels], oim([features, labels]))
    with_oim.compile(optimizer=keras.optimizers.SGD(1e-3), loss=OIMLoss(), jit_compile=False)
    return baseline, with_oim, oim


def part_a(steps: int, image_size) -> dict:
    rng = np.random.default_rng(0)
    baseline, with_oim, oim = resnet_models(image_size)
    fill_memory(oim, rng)
    images = rng.uniform(0, 255, (BATCH,) + image_size + (3,)).astype(np.float32)
    labels = batch_labels(rng, BATCH, NUM_IDS)
    target = rng.standard_normal((BATCH, DIM)).astype(np.float32) / np.sqrt(DIM)
    runs = {"baseline": lambda: baseline.train_on_batch(images, target),
            "oim": lambda: with_oim.train_on_batch([images, labels], labels)}
    for run in runs.values():  # trace and warm up
        run(), run()
    times = {name: [] for name in runs}
    order = list(runs)
    for step in range(steps):  # alternate step by step (and who goes first) so load swings hit both alike
        for name in (order if step % 2 == 0 else order[::-1]):
            started = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - started)
    result = {name: 1000 * float(np.median(t)) for name, t in times.items()}
    result["paired_ratio"] = float(np.median(np.array(times["oim"]) / np.array(times["baseline"])))
    return result


def oim_alone(batch: int, num_ids: int, repeats: int) -> tuple:
    """Best-of-`repeats` ms of (forward + backward + update, forward + backward, update alone)."""
    rng = np.random.default_rng(1)
    layer = OIMMemory(num_ids, QUEUE, DIM)
    layer.build([(None, DIM), (None,)])
    fill_memory(layer, rng)
    x = rng.standard_normal((batch, DIM)).astype(np.float32)
    features = tf.Variable(x / np.linalg.norm(x, axis=1, keepdims=True))
    labels = tf.constant(batch_labels(rng, batch, num_ids))

    def step(training):
        with tf.GradientTape() as tape:
            loss = oim_loss(labels, layer([features, labels], training=training))
        return tape.gradient(loss, features)

    full_step = tf.function(lambda: step(True), jit_compile=False)
    no_update = tf.function(lambda: step(False), jit_compile=False)

    @tf.function(jit_compile=False)
    def update_only():
        layer._update_memory(tf.convert_to_tensor(features), labels)
        return tf.convert_to_tensor(layer.queue_pointer)

    functions = (full_step, no_update, update_only)
    for fn in functions:  # trace and warm up
        fn(), fn()
    spent = [[] for _ in functions]
    for _ in range(repeats):  # interleaved, so a busy moment of the shared machine hits all three
        for times, fn in zip(spent, functions):
            started = time.perf_counter()
            np.asarray(fn())  # fetch the result: waits for the step to finish
            times.append(time.perf_counter() - started)
    return tuple(1000 * float(np.min(times)) for times in spent)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed ResNet-50 steps per model")
    parser.add_argument("--repeats", type=int, default=30, help="timed OIM-only steps per table row")
    parser.add_argument("--small", action="store_true", help="smoke run: 64x32 images, 2 steps, 3 repeats")
    args = parser.parse_args()
    image_size = (64, 32) if args.small else IMAGE
    if args.small:
        args.steps, args.repeats = 2, 3
    tf.config.threading.set_inter_op_parallelism_threads(os.cpu_count() or 1)
    print(describe_machine(tensorflow=tf.__version__, keras=keras.__version__))
    print(f"\n(a) one SGD step, ResNet-50 weights none, {image_size[0]}x{image_size[1]} input, batch {BATCH}, "
          f"no XLA; OIM L={NUM_IDS:,}, Q={QUEUE:,}, D={DIM}; median of {args.steps} steps per model, "
          f"the two models alternating step by step\n")
    a = part_a(args.steps, image_size)
    print("| model | ms/step | ratio to baseline |\n| --- | ---: | ---: |")
    print(f"| ResNet-50 + 256-d projection, MSE on features (softmax-free baseline) | {a['baseline']:.0f} | 1.000 |")
    print(f"| same + OIMMemory + OIMLoss | {a['oim']:.0f} | {a['oim'] / a['baseline']:.3f} "
          f"(median of step-pair ratios {a['paired_ratio']:.3f}) |")
    alone, _, _ = oim_alone(BATCH, NUM_IDS, args.repeats)
    print(f"\nOIM alone at batch {BATCH}: forward + backward + update {alone:.2f} ms = "
          f"{100 * alone / a['baseline']:.2f} % of the baseline step (target <= 5 %)")

    print(f"\n(b) OIM alone (features given), best of {args.repeats} interleaved steps (the least disturbed "
          f"on a shared machine), Q={QUEUE:,}, D={DIM}\n")
    print("| batch | L | forward + backward + update ms | forward + backward ms | update only ms |\n"
          "| ---: | ---: | ---: | ---: | ---: |")
    for batch, num_ids in [(b, NUM_IDS) for b in (16, 32, 64, 128, 256)] + \
            [(BATCH, n) for n in (1000, 2000, 5000, 10000, 20000)]:
        full, forward_backward, update = oim_alone(batch, num_ids, args.repeats)
        print(f"| {batch} | {num_ids:,} | {full:.2f} | {forward_backward:.2f} | {update:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
