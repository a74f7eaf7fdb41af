"""Convergence of OIM vs softmax on the synthetic data (oim_person_search.txt §5.3, Fig. 6 analogue; issue 6).

Fig. 6 of the paper plots, over training iterations, the training identification accuracy and the
test mAP of the OIM loss against a softmax classifier; OIM starts lower but converges faster and
keeps improving the test mAP. Here the same comparison on re-ID crops of the built-in synthetic
Market-style set (300 identities: 150 train, 150 held out), one run each of

    resnet50_oim      ResNet-50, 256-d projection, L2-normalised, OIM over the lookup table (τ = 0.1, γ = 0.5)
    resnet50_softmax  ResNet-50, 128-d projection, dropout 0.5, softmax classifier over the 150 train ids

with the presets' default CPU recipe for both (64x32 inputs, weights none, batch 32 of shuffled
images, Adam 1e-3, flip + random 64x32 crops of 72x36, seed 0) — exactly what
`python -m reid_keras.train --model <preset> --weights none` trains. Every `--eval-every` steps:
the training ID accuracy averaged over those steps (OIM: `OIMAccuracy`, argmax of the logits over
the lookup table *before* the batch's update, as the paper measures it; softmax: the classifier's
accuracy) and the held-out mAP (embedding features, cosine, docs/protocols.md (a), no flip averaging).
Step 0 is the untrained network. Prints a markdown table and the machine, writes a two-panel PNG
and a JSON of the curves beside it (both atomically).

    python experiments/benchmarks/oim_convergence.py --steps 400 --eval-every 100 --out oim_convergence.png
    python experiments/benchmarks/oim_convergence.py --steps 4 --eval-every 2 --synthetic-ids 20   # smoke
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import numpy as np  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from machine import describe_machine  # noqa: E402  (experiments/benchmarks/machine.py)
from reid_keras.io_utils import atomic_write, atomic_write_json  # noqa: E402

MODELS = ("resnet50_oim", "resnet50_softmax")
LABELS = {"resnet50_oim": "OIM", "resnet50_softmax": "Softmax"}


def run_config(model: str, args, work: str):
    """The RunConfig `python -m reid_keras.train` would resolve for this run (same flags for both models)."""
    from reid_keras.cli.train import build_parser, config_from_args

    argv = ["--model", model, "--weights", "none", "--steps-per-epoch", str(args.eval_every),
            "--epochs", str(args.steps // args.eval_every), "--batch-size", str(args.batch_size),
            "--synthetic-ids", str(args.synthetic_ids), "--seed", str(args.seed),
            "--data-root", os.path.join(work, "data"), "--output", os.path.join(work, "runs")]
    return config_from_args(build_parser().parse_args(argv))


def embed(forward, records, image_size, preprocessing) -> np.ndarray:
    """Raw embedding features of `records`, in record order (no flip averaging)."""
    from reid_keras.data.pipelines import image_dataset

    ds = image_dataset(records, image_size, 128, preprocess=preprocessing, with_meta=True)
    features, index = [], []
    for images, meta in ds:
        features.append(np.asarray(forward(images), dtype=np.float32))
        index.append(meta["index"].numpy())
    index = np.concatenate(index)
    if len(index) != len(records):
        raise ValueError(f"{len(records) - len(index)} held-out image(s) could not be decoded")
    return np.concatenate(features)[np.argsort(index)]


def held_out_map(forward, dataset, config) -> tuple:
    """(mAP, rank-1) of the embedding `forward` on the held-out query / gallery, cosine distance."""
    from reid_keras.metrics import evaluate_ranking

    size = tuple(config["image_size"])
    q = embed(forward, dataset.query, size, config["preprocessing"])
    g = embed(forward, dataset.gallery, size, config["preprocessing"])
    result = evaluate_ranking(query_features=q, gallery_features=g, metric="cosine",
                              query_pids=[r.pid for r in dataset.query], gallery_pids=[r.pid for r in dataset.gallery],
                              query_cams=[r.camid for r in dataset.query],
                              gallery_cams=[r.camid for r in dataset.gallery])
    return float(result["mAP"]), float(result["cmc"][0])


class ConvergenceLog(keras.callbacks.Callback):
    """Records the epoch's mean training ID accuracy and the held-out mAP after every epoch
    (one epoch = `--eval-every` steps) and each epoch's training time, evaluations excluded."""

    def __init__(self, dataset, config, eval_every: int):
        super().__init__()
        self.dataset, self.config, self.eval_every = dataset, config, eval_every
        self.rows, self.epoch_seconds, self._started = [], [], 0.0
        self._forward = None

    def evaluate(self, step: int, accuracy):
        if self._forward is None:   # one traced graph per model: eager ResNet-50 calls are slow on CPU
            embedding = self.model.get_layer("embedding")
            self._forward = tf.function(lambda x: embedding(x, training=False), reduce_retracing=True)
        m_ap, rank1 = held_out_map(self._forward, self.dataset, self.config)
        self.rows.append({"step": step, "train_accuracy": accuracy, "mAP": m_ap, "rank1": rank1})
        acc = "   –  " if accuracy is None else f"{100 * accuracy:5.1f}%"
        print(f"  {self.config['model']:<17} step {step:>5}: train ID accuracy {acc}, held-out mAP "
              f"{100 * m_ap:5.1f}%, rank-1 {100 * rank1:5.1f}%", flush=True)

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_seconds.append(time.perf_counter() - self._started)
        logs = logs or {}
        keys = [k for k in logs if k.endswith("accuracy") and not k.startswith("val_")]
        if len(keys) != 1:
            raise RuntimeError(f"expected one training accuracy in the logs, got {sorted(logs)}")
        self.evaluate((epoch + 1) * self.eval_every, float(logs[keys[0]]))


def train_one(model_name: str, dataset, args, work: str) -> dict:
    run = run_config(model_name, args, work)
    config = run.flat()
    keras.utils.set_random_seed(config["seed"])
    task = run.task()
    model, _ = task.build(num_train_ids=dataset.num_train_ids)
    train_data, steps = task.train_dataset(dataset.train, initial_epoch=0, epochs=config["epochs"],
                                           global_batch=config["batch_size"])
    log = ConvergenceLog(dataset, config, args.eval_every)
    log.set_model(model)
    log.evaluate(0, None)
    model.fit(train_data, epochs=config["epochs"], steps_per_epoch=steps, verbose=0, shuffle=False,
              callbacks=[log, keras.callbacks.TerminateOnNaN()])
    if model.stop_training:
        raise RuntimeError(f"{model_name}: training stopped on a NaN loss")
    recipe = {k: config.get(k) for k in ("image_size", "weights", "batch_size", "optimizer", "learning_rate",
                                          "sampler", "augment", "feature_dim", "losses", "oim_temperature",
                                          "oim_momentum", "dropout", "seed")}
    keras.backend.clear_session()
    # The first epoch also traces the training graph: the per-step time is taken from the later ones.
    later = log.epoch_seconds[1:] or log.epoch_seconds
    return {"rows": log.rows, "epoch_seconds": log.epoch_seconds, "steps": config["epochs"] * steps,
            "ms_per_step": 1000 * float(np.median(later)) / steps, "recipe": recipe}


def plot(results: dict, path: str) -> str:
    from matplotlib.figure import Figure  # Agg canvas, no display needed

    fig = Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
    acc_ax, map_ax = fig.subplots(1, 2)
    for name, result in results.items():
        rows = result["rows"]
        trained = [r for r in rows if r["train_accuracy"] is not None]
        acc_ax.plot([r["step"] for r in trained], [100 * r["train_accuracy"] for r in trained], marker="o",
                    label=f"{LABELS[name]} ({100 * trained[-1]['train_accuracy']:.1f}%)")
        map_ax.plot([r["step"] for r in rows], [100 * r["mAP"] for r in rows], marker="o",
                    label=f"{LABELS[name]} ({100 * rows[-1]['mAP']:.1f}%)")
    for ax, title, ylabel in ((acc_ax, "Training identification accuracy", "accuracy (%)"),
                              (map_ax, "Held-out mAP (synthetic, cosine)", "mAP (%)")):
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)   # top left to the data: short CPU runs stay far below 100 %
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


def markdown_table(results: dict) -> str:
    oim, softmax = (results[m]["rows"] for m in MODELS)

    def pct(value):
        return "–" if value is None else f"{100 * value:.1f}"

    lines = ["| step | OIM train acc (%) | softmax train acc (%) | OIM held-out mAP (%) | softmax held-out mAP (%) |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for a, b in zip(oim, softmax):
        lines.append(f"| {a['step']} | {pct(a['train_accuracy'])} | {pct(b['train_accuracy'])} | {pct(a['mAP'])} | "
                     f"{pct(b['mAP'])} |")
    return "\n".join(lines)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive_int, default=400, help="training steps per model (default: 400)")
    parser.add_argument("--eval-every", type=positive_int, default=100,
                        help="steps between held-out evaluations; must divide --steps (default: 100)")
    parser.add_argument("--out", default="oim_convergence.png", help="PNG to write; the curves go to the same "
                        "name with .json (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="batch of both models (default: 32)")
    parser.add_argument("--synthetic-ids", type=positive_int, default=300, help="synthetic identities (default: 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="folder for the synthetic data (kept; default: a temp folder)")
    args = parser.parse_args(argv)
    if args.steps % args.eval_every:
        parser.error(f"--eval-every {args.eval_every} must divide --steps {args.steps}")
    if not args.out.lower().endswith(".png"):
        parser.error(f"--out {args.out!r} must end in .png")
    work = args.work or tempfile.mkdtemp(prefix="oim_convergence_")
    from reid_keras.data.datasets import load_dataset

    started = time.time()
    try:
        dataset = load_dataset("synthetic", os.path.join(work, "data"), num_ids=args.synthetic_ids)
        print(f"synthetic market1501 layout: train {dataset.num_train_ids} ids / {len(dataset.train)} images, "
              f"held-out query {len(dataset.query)}, gallery {len(dataset.gallery)}", flush=True)
        results = {name: train_one(name, dataset, args, work) for name in MODELS}
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    wall = time.time() - started

    plot(results, args.out)
    json_path = os.path.splitext(args.out)[0] + ".json"
    atomic_write_json(json_path, {"args": vars(args), "results": results, "wall_seconds": round(wall, 1)},
                      default=str)
    oim, softmax = results["resnet50_oim"], results["resnet50_softmax"]
    r = oim["recipe"]
    print(f"\nMachine: {describe_machine(tensorflow=tf.__version__, keras=keras.__version__)}")
    print(f"Recipe (both models): {r['image_size'][0]}x{r['image_size'][1]}, weights {r['weights']}, batch "
          f"{r['batch_size']} ({r['sampler']} sampler), {r['optimizer']} lr {r['learning_rate']}, augment "
          f"{r['augment']}, seed {r['seed']}, {args.steps} steps each; OIM: {r['feature_dim']}-d, "
          f"tau {r['oim_temperature']}, gamma {r['oim_momentum']}; softmax: "
          f"{softmax['recipe']['feature_dim']}-d, dropout {softmax['recipe']['dropout']}.")
    held_out_ids = len({r.pid for r in dataset.query})
    print(f"Held-out: {len(dataset.query)} queries x {len(dataset.gallery)} gallery images, {held_out_ids} ids unseen "
          "in training; mAP by cosine on raw embeddings (docs/protocols.md (a), no flip).\n")
    print(markdown_table(results))
    per_step = {m: results[m]["ms_per_step"] for m in MODELS}
    print(f"\nfinal held-out rank-1: OIM {100 * oim['rows'][-1]['rank1']:.1f}%, softmax "
          f"{100 * softmax['rows'][-1]['rank1']:.1f}%; mAP OIM - softmax: "
          f"{100 * (oim['rows'][-1]['mAP'] - softmax['rows'][-1]['mAP']):+.1f} points")
    ratio = per_step["resnet50_oim"] / per_step["resnet50_softmax"]
    print(f"training time per step (median epoch after the first, evaluations excluded): OIM "
          f"{per_step['resnet50_oim']:.0f} ms, softmax {per_step['resnet50_softmax']:.0f} ms (ratio {ratio:.2f}); "
          f"wall time {wall / 60:.1f} min")
    print(f"wrote {args.out} and {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
