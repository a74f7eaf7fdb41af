"""`python -m reid_keras.experiment experiments/X.toml --data-root DIR`: run a paper table's runs and
write its results table with the paper's numbers beside ours.

An experiment file names shared settings (dataset, recipe, weights, dataset options, metrics) and a
list of `[[runs]]`, each a preset plus optional flags and the paper's numbers. Every run is an
ordinary `python -m reid_keras.train` run, so each keeps its own run folder and can be resumed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib


def load_experiment(path: str) -> dict:
    """Read and check an experiment TOML file (clear errors naming the file and key)."""
    try:
        with open(path, "rb") as handle:
            spec = tomllib.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"no experiment file {path}")
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}")
    for key in ("title", "dataset", "runs", "metrics"):
        if key not in spec:
            raise ValueError(f"{path}: missing top-level key {key!r}")
    for i, run in enumerate(spec["runs"]):
        if "model" not in run:
            raise ValueError(f"{path}: [[runs]] number {i + 1} has no 'model'")
    return spec


def train_argv(spec: dict, run: dict, data_root: str | None, output: str, smoke: bool) -> list:
    """The `reid_keras.train` arguments of one run of the experiment."""
    argv = ["--model", run["model"], "--dataset", spec["dataset"], "--output", output,
            "--name", run.get("name", run["model"]), "--preset", spec.get("recipe", "default")]
    if data_root:
        argv += ["--data-root", data_root]
    weights = run.get("weights", spec.get("weights"))
    if weights:
        argv += ["--weights", weights]
    for key, value in {**spec.get("dataset_options", {}), **run.get("dataset_options", {})}.items():
        argv += ["--dataset-option", f"{key}={value}"]
    for flag, value in run.get("flags", {}).items():
        argv += [f"--{flag}", str(value)]
    if smoke:  # CI: a few steps on synthetic data, to prove the plumbing
        argv += ["--weights", "none", "--epochs", "1", "--steps-per-epoch", "2", "--batch-size", "4",
                 "--image-size", "64x32", "--synthetic-ids", "12"]
    return argv


def our_numbers(metrics: dict) -> dict:
    """Percent values keyed like the experiment's `metrics` list (rank1, rank5, ..., mAP)."""
    if "cuhk01_protocol" in metrics:
        table = metrics["cuhk01_protocol"]["mean_std_percent"]
        return {k.replace("-", ""): v[0] for k, v in table.items()}
    source = metrics.get("verification_head") or metrics.get("embedding_cosine") or metrics
    protocol = source.get("dataset_protocol")
    if protocol:  # the benchmark's paper protocol (classic CUHK03 single-shot), not PROTOCOLS.md (a)
        return {k.replace("-", ""): 100 * float(v[0]) for k, v in protocol["mean_std"].items()}
    return {k: 100 * float(v) for k, v in source.items()
            if isinstance(v, (int, float)) and (k.startswith("rank") or k in ("mAP", "mINP"))}


def run_label(run: dict) -> str:
    """A run's row label and folder name: its `name`, else its model (runs of one preset need names)."""
    return run.get("name", run["model"])


def results_table(spec: dict, rows: list) -> str:
    names = spec["metrics"]
    lines = [f"# {spec['title']}", "", "| model | source | " + " | ".join(names) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in names) + " |"]
    for run, ours in rows:
        paper, label = run.get("paper", {}), run_label(run)
        lines.append(f"| {label} | paper | " + " | ".join(
            f"{paper[n]:.1f}" if n in paper else "–" for n in names) + " |")
        lines.append(f"| {label} | ours | " + " | ".join(
            f"{ours[n]:.1f}" if ours and n in ours else "not run" for n in names) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reid_keras.experiment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="experiment TOML file")
    parser.add_argument("--data-root", default=None, help="dataset folder (or its parent)")
    parser.add_argument("--output", default="runs", help="folder for the run folders (default: %(default)s)")
    parser.add_argument("--results", default=None, help="results table path (default: experiments/results/<name>.md)")
    parser.add_argument("--only", default=None, help="comma-separated run names or models to run (default: all)")
    parser.add_argument("--smoke", action="store_true", help="synthetic data, a few steps per run (CI)")
    args = parser.parse_args(argv)
    from reid_keras.io_utils import atomic_write_text
    from reid_keras.train import run as train_run

    try:
        spec = load_experiment(args.config)
        if args.smoke:
            spec = dict(spec, dataset="synthetic", dataset_options={})
        only = set(args.only.split(",")) if args.only else None
        rows = []
        for run in spec["runs"]:
            if only and run["model"] not in only and run_label(run) not in only:
                rows.append((run, None))
                continue
            folder = os.path.join(args.output, run_label(run))
            resume = os.path.exists(os.path.join(folder, "config.json"))
            if resume and os.path.exists(os.path.join(folder, "metrics.json")):
                metrics = json.load(open(os.path.join(folder, "metrics.json")))
            else:
                argv_run = train_argv(spec, run, args.data_root, args.output, args.smoke) + (["--resume"] if resume else [])
                folder = train_run(argv_run)
                metrics = json.load(open(os.path.join(folder, "metrics.json")))
            rows.append((run, our_numbers(metrics)))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    name = os.path.splitext(os.path.basename(args.config))[0]
    path = args.results or os.path.join("experiments", "results", f"{name}{'_smoke' if args.smoke else ''}.md")
    atomic_write_text(path, results_table(spec, rows))
    print(open(path).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
