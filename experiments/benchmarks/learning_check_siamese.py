"""Learning check of the main job (issue 4 item 6): does `python -m reid_keras.train --model siamese_b0`
learn, within 10 minutes on this machine?

Runs the default main job exactly as a user would (a subprocess, default arguments, synthetic data),
then scores, on the same held-out split and with the same evaluation engine:
  (a) the same network untrained (same seed, no training step), and
  (b) the colour-histogram baseline (reid_keras.baselines).
Prints one table; the trained model must beat both by >= 10 points in rank-1 and mAP.

    python experiments/benchmarks/learning_check_siamese.py [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", default=None, help="work folder to keep (default: a temp folder, deleted)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="extra train flags")
    args = parser.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="reid_learning_check_")
    os.makedirs(work, exist_ok=True)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")

    command = [sys.executable, "-m", "reid_keras.train", "--model", "siamese_b0",
               "--data-root", os.path.join(work, "data"), "--output", os.path.join(work, "runs"),
               "--name", "main_job", *args.extra]
    started = time.time()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.time() - started
    if result.returncode != 0:
        print(result.stdout[-3000:], result.stderr[-3000:], sep="\n")
        return 1
    run_dir = os.path.join(work, "runs", "main_job")
    trained = json.load(open(os.path.join(run_dir, "metrics.json")))
    config = json.load(open(os.path.join(run_dir, "config.json")))

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    from reid_keras.baselines import colour_histogram_features
    from reid_keras.metrics import evaluate_ranking
    from reid_keras.families.config import config_from_json
    from reid_keras.training.runner import load_training_data

    run = config_from_json(dict(config, resume=False))
    dataset = load_training_data(run)
    labels = dict(query_pids=[r.pid for r in dataset.query], gallery_pids=[r.pid for r in dataset.gallery],
                  query_cams=[r.camid for r in dataset.query], gallery_cams=[r.camid for r in dataset.gallery])

    keras.utils.set_random_seed(config["seed"])
    task = run.task()
    untrained, _ = task.build(num_train_ids=dataset.num_train_ids)
    embedding = untrained.get_layer("embedding")
    q, g = (task._raw_features(embedding, getattr(dataset, s)) for s in ("query", "gallery"))
    untrained_result = evaluate_ranking(query_features=q, gallery_features=g, metric="cosine", **labels)

    size = tuple(config["image_size"])
    hq = colour_histogram_features([r.path for r in dataset.query], size=size)
    hg = colour_histogram_features([r.path for r in dataset.gallery], size=size)
    colour = evaluate_ranking(query_features=hq, gallery_features=hg, metric="cosine", **labels)

    rows = [("siamese_b0, trained (main job), verification head", trained["verification_head"]["rank1"],
             trained["verification_head"]["mAP"]),
            ("siamese_b0, trained (main job), embedding cosine", trained["embedding_cosine"]["rank1"],
             trained["embedding_cosine"]["mAP"]),
            ("siamese_b0, untrained (same seed), embedding cosine", untrained_result["cmc"][0], untrained_result["mAP"]),
            ("colour histogram (stripes x HSV)", colour["cmc"][0], colour["mAP"])]
    best_trained = max(rows[:2], key=lambda r: r[1])
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, TF {__import__('tensorflow').__version__}")
    print(f"main job: {' '.join(command[1:])}")
    print(f"main job wall time: {wall / 60:.1f} min (target <= 10); train split "
          f"{config['runtime_dataset']['train']}, query {config['runtime_dataset']['query']}, "
          f"gallery {config['runtime_dataset']['gallery']}\n")
    print("| model | rank-1 (%) | mAP (%) |\n| --- | ---: | ---: |")
    for name, r1, ap in rows:
        print(f"| {name} | {100 * r1:.1f} | {100 * ap:.1f} |")
    margin_r1 = 100 * (best_trained[1] - max(rows[2][1], rows[3][1]))
    margin_map = 100 * (max(rows[0][2], rows[1][2]) - max(rows[2][2], rows[3][2]))
    ok = wall <= 600 and margin_r1 >= 10 and margin_map >= 10
    print(f"\nmargin over the better baseline: rank-1 {margin_r1:+.1f} points, mAP {margin_map:+.1f} points "
          f"(target >= +10 each): {'PASS' if ok else 'FAIL'}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
