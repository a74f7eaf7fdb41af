"""`python -m reid_keras.experiment experiments/X.toml --data-root DIR`: train a paper table's runs and write
its results table with the paper's numbers beside ours (the file format: `reid_keras.paper_tables`).

Each run is the `python -m reid_keras.train` command its file describes (`train_argv`); a finished run
folder is reused, an interrupted one resumed. `--smoke` trains every run for two steps on the
synthetic data (CI).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from reid_keras.cli.arguments import add_verbose_argument
from reid_keras.paper_tables import (SMOKE_SPLITS, distractor_evaluation, gallery_curve_table, load_experiment,
                                     results_table, run_label, split_numbers, split_runs)

SMOKE_IMAGE_SIZE = (64, 32)


def train_argv(spec: dict, run: dict, data_root: str | None, output: str, smoke: bool) -> list:
    """The `reid_keras.train` arguments of one run of the experiment."""
    argv = ["--model", run["model"], "--dataset", "synthetic" if smoke else spec["dataset"], "--output", output,
            "--name", run.get("name", run["model"]), "--preset", spec.get("recipe", "default")]
    if data_root:
        argv += ["--data-root", data_root]
    weights = run.get("weights", spec.get("weights"))
    if weights:
        argv += ["--weights", weights]
    options = {} if smoke else {**spec.get("dataset_options", {}), **run.get("dataset_options", {})}
    for key, value in options.items():  # the synthetic smoke data takes no benchmark options
        argv += ["--dataset-option", f"{key}={value}"]
    for flag, value in run.get("flags", {}).items():
        argv += [f"--{flag}", str(value)]
    if smoke:  # CI: a few steps on synthetic data, to prove the plumbing
        argv += ["--weights", "none", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4",
                 "--image-size", smoke_image_size(run["model"]), "--synthetic-ids", "12"]
    return argv


def smoke_image_size(model: str) -> str:
    """64x32, or the preset's own quick-recipe size when its backbone needs more (CaffeNet: 227x227)."""
    from reid_keras.families import get_preset

    try:
        height, width = get_preset(model)[1].resolve("default").image_size
    except ValueError:  # an unknown preset is reported by the trainer itself
        height, width = SMOKE_IMAGE_SIZE
    return f"{max(height, SMOKE_IMAGE_SIZE[0])}x{max(width, SMOKE_IMAGE_SIZE[1])}"


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message):
        raise ValueError(message)


def check_runs(path: str, spec: dict, data_root, output: str, smoke: bool) -> None:
    """Every run's train flags parse and apply to its model's family, before anything trains."""
    from reid_keras.cli.train import build_parser, recipe_overrides
    from reid_keras.families.config import resolve_config

    parser = build_parser(parser_class=_RaisingParser, argv=[])
    for run in spec["runs"]:
        try:
            args = parser.parse_args(train_argv(spec, run, data_root, output, smoke))
            resolve_config(args.model, args.preset, recipe_overrides(args))
        except ValueError as err:
            raise ValueError(f"{path}: run {run_label(run)}: {err}") from None


def run_experiment(spec: dict, args) -> tuple:
    """Train (or reuse) every run; returns the table rows and the gallery-curve rows."""
    from reid_keras.cli.train import run as train_run

    only = set(args.only.split(",")) if args.only else None
    sizes = [int(float(v)) for v in args.distractor_sizes.split(",")] if args.distractor_sizes else None
    rows, curves = [], []
    for run in spec["runs"]:
        if only and run["model"] not in only and run_label(run) not in only:
            rows.append((run, []))
            curves.append((run, None))
            continue
        per_split, curve = [], None
        for training in split_runs(spec, run, args.smoke):
            folder = os.path.join(args.output, run_label(training))
            resume = os.path.exists(os.path.join(folder, "config.json"))
            if not (resume and os.path.exists(os.path.join(folder, "metrics.json"))):
                argv = train_argv(spec, training, args.data_root, args.output, args.smoke)
                folder = train_run(argv + (["--resume"] if resume else []))
            with open(os.path.join(folder, "metrics.json"), encoding="utf-8") as handle:
                metrics = json.load(handle)
            per_split.append(split_numbers(spec, metrics))
            if spec.get("gallery_curve"):
                curve = distractor_evaluation(folder, metrics, args.distractors, sizes)
        rows.append((run, per_split))
        curves.append((run, curve))
    return rows, curves


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reid_keras.experiment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="experiment TOML file")
    parser.add_argument("--data-root", default=None, help="dataset folder (or its parent)")
    parser.add_argument("--output", default="runs", help="folder for the run folders (default: %(default)s)")
    parser.add_argument("--results", default=None, help="results table path (default: experiments/results/<name>.md)")
    parser.add_argument("--only", default=None, help="comma-separated run names or models to run (default: all)")
    parser.add_argument("--distractors", default=None,
                        help="distractor image folder, required by files with gallery_curve = true")
    parser.add_argument("--distractor-sizes", default=None, help="comma-separated distractor counts of the curve")
    parser.add_argument("--smoke", action="store_true",
                        help=f"synthetic data, a few steps per run, at most {SMOKE_SPLITS} splits (CI)")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)
    from reid_keras.io_utils import atomic_write_text

    try:
        spec = load_experiment(args.config)
        if spec.get("gallery_curve") and not args.distractors:
            raise ValueError(f"{args.config} draws the gallery-size curve: pass --distractors DIR (the folder of "
                             "distractor images, e.g. Market-1501's 500k)")
        check_runs(args.config, spec, args.data_root, args.output, args.smoke)
        rows, curves = run_experiment(spec, args)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    name = os.path.splitext(os.path.basename(args.config))[0]
    path = args.results or os.path.join("experiments", "results", f"{name}{'_smoke' if args.smoke else ''}.md")
    text = results_table(spec, rows)
    if spec.get("gallery_curve"):
        text += "\n" + gallery_curve_table(curves)
    atomic_write_text(path, text)
    print(text)
    return 0
