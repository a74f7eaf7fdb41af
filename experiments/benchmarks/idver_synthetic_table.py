"""Synthetic-data table of identification_verification_embedding.txt Table II: I, V and I+V.

Trains `resnet50_id` (I), `resnet50_verif` (V) and `resnet50_idver` (I+V) with the same default
recipe (same steps, same seed, weights none, synthetic data) as a user would, one
`python -m reid_keras.train` subprocess at a time, then scores the colour-histogram baseline
(reid_keras.baselines) on the same held-out split with the same ranking engine. Prints one
markdown table (held-out rank-1 / mAP in whatever order they come, single query and the multi-query
protocol of Table III, train minutes) and the machine.

No ImageNet weights here (no network): the paper's ordering V < I < I+V (Table II) was measured
with pretrained backbones and real data, so this table is a plumbing-and-learning check, not a
reproduction.

    python experiments/benchmarks/idver_synthetic_table.py [--keep DIR] [--models resnet50_id,...]
        [--extra --steps-per-epoch 30 ...]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import describe_machine  # noqa: E402  (sibling script, not a package)

MODELS = {"resnet50_id": "I (identification only)", "resnet50_verif": "V (verification only)",
          "resnet50_idver": "I+V (identification + verification)"}
SEED = 0


def train(model: str, work: str, extra: list, env: dict) -> dict:
    """One default-recipe run; returns its row (rank-1, mAP, minutes) or the failure."""
    command = [sys.executable, "-m", "reid_keras.train", "--model", model, "--weights", "none",
               "--seed", str(SEED), "--data-root", os.path.join(work, "data"),
               "--output", os.path.join(work, "runs"), "--name", model, "--no-export", "--no-plots", *extra]
    started = time.time()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.time() - started
    run_dir = os.path.join(work, "runs", model)
    if result.returncode != 0 or not os.path.exists(os.path.join(run_dir, "metrics.json")):
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"model": model, "error": f"exit code {result.returncode}: {tail[0][:200]}", "wall": wall,
                "command": command}
    metrics = json.load(open(os.path.join(run_dir, "metrics.json")))["embedding_cosine"]
    config = json.load(open(os.path.join(run_dir, "config.json")))
    row = {"model": model, "rank1": metrics["rank1"], "mAP": metrics["mAP"], "wall": wall,
           "train_seconds": config.get("runtime_train_seconds"), "config": config, "command": command}
    if "multi_query" in metrics:  # the synthetic Market has gt_bbox/: Table III's multiple queries
        table = metrics["multi_query"]["mean_std"]
        row.update(mq_rank1=table["rank-1"][0], mq_mAP=table["mAP"][0])
    return row


def colour_baseline(config: dict) -> dict:
    """Colour histograms (stripes x HSV) ranked by cosine on the run's own query / gallery split."""
    from reid_keras.baselines import colour_histogram_features
    from reid_keras.metrics import evaluate_ranking
    from reid_keras.families.config import config_from_json
    from reid_keras.training.runner import load_training_data

    dataset = load_training_data(config_from_json(dict(config, resume=False)))
    size = tuple(config["image_size"])
    started = time.time()
    hq = colour_histogram_features([r.path for r in dataset.query], size=size)
    hg = colour_histogram_features([r.path for r in dataset.gallery], size=size)
    ids = dict(query_pids=[r.pid for r in dataset.query], gallery_pids=[r.pid for r in dataset.gallery],
               query_cams=[r.camid for r in dataset.query], gallery_cams=[r.camid for r in dataset.gallery])
    result = evaluate_ranking(query_features=hq, gallery_features=hg, metric="cosine", **ids)
    row = {"model": "colour histogram (stripes x HSV), no training", "rank1": float(result["cmc"][0]),
           "mAP": float(result["mAP"]), "train_seconds": 0.0}
    boxes = dataset.protocol("multi_query")
    if boxes is not None:  # the same mean pooling as the evaluation's multi-query protocol
        from reid_keras.metrics import pool_multi_query

        hm = colour_histogram_features([r.path for r in boxes.records], size=size)
        pooled, _ = pool_multi_query(ids["query_pids"], ids["query_cams"], hq, [r.pid for r in boxes.records],
                                     [r.camid for r in boxes.records], hm)
        mq = evaluate_ranking(query_features=pooled, gallery_features=hg, metric="cosine", **ids)
        row.update(mq_rank1=float(mq["cmc"][0]), mq_mAP=float(mq["mAP"]))
    return dict(row, wall=time.time() - started)


def format_table(rows: list) -> str:
    lines = ["| model | rank-1 (%) | mAP (%) | multi-query rank-1 (%) | multi-query mAP (%) | train minutes | "
             "run minutes (train + evaluation) |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        label = f"{row['model']}" + (f" — {MODELS[row['model']]}" if row["model"] in MODELS else "")
        if "error" in row:
            lines.append(f"| {label} | failed | failed | failed | failed | – | {row['wall'] / 60:.1f} |")
            continue
        train_min = "–" if row.get("train_seconds") is None else f"{row['train_seconds'] / 60:.1f}"
        mq = [f"{100 * row[k]:.1f}" if k in row else "–" for k in ("mq_rank1", "mq_mAP")]
        lines.append(f"| {label} | {100 * row['rank1']:.1f} | {100 * row['mAP']:.1f} | {mq[0]} | {mq[1]} | "
                     f"{train_min} | {row['wall'] / 60:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", default=None, help="work folder to keep (default: a temp folder, deleted)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated presets (default: %(default)s)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                        help="extra train flags given to every run (keep the budget equal)")
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        parser.error(f"--models {','.join(unknown)}: expected some of {', '.join(MODELS)}")
    work = args.keep or tempfile.mkdtemp(prefix="reid_idver_table_")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")

    rows = []
    for model in models:  # one heavy TensorFlow job at a time (shared CPU)
        row = train(model, work, args.extra, env)
        rows.append(row)
        status = row.get("error") or f"rank-1 {100 * row['rank1']:.1f}%, mAP {100 * row['mAP']:.1f}%"
        print(f"{model}: {status} ({row['wall'] / 60:.1f} min)", file=sys.stderr, flush=True)
    done = [r for r in rows if "config" in r]
    if done:
        rows.append(colour_baseline(done[0]["config"]))

    import tensorflow as tf

    print(describe_machine(TensorFlow=tf.__version__))
    if done:
        c = done[0]["config"]
        split = c.get("runtime_dataset", {})
        keys = ("epochs", "steps_per_epoch", "batch_size", "image_size", "optimizer", "learning_rate")
        recipe = ", ".join(f"{k} {c[k]}" for k in keys if k in c)
        print(f"recipe: default ({recipe}), weights none, seed {SEED}, synthetic data; split {json.dumps(split)}")
        print(f"command: {' '.join(done[0]['command'][1:])}  (--model varies)")
    print()
    print(format_table(rows))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
