"""`python -m reid_keras.experiment experiments/X.toml --data-root DIR`: run a paper table's runs and
write its results table with the paper's numbers beside ours.

An experiment file names shared settings (dataset, recipe, weights, dataset options, metrics) and a
list of `[[runs]]`, each a preset plus optional flags and the paper's numbers. Every run is an
ordinary `python -m reid_keras.train` run, so each keeps its own run folder and can be resumed; a
finished run folder of the same name is reused, not trained again. Optional top-level keys:

- `protocols = ["single_query", "multi_query"]`: one column group per evaluation protocol. The first
  is the run's headline numbers (paper numbers in `paper`); each other one is read from the run's
  metrics.json under its name (`multi_query`: Market-1501 pooled queries; `multi_shot`: classic
  CUHK03 Table V) with paper numbers in `paper_<name>`.
- `splits = 20`: every run is trained once per `split_index` 0..N-1 (classic CUHK03's 20 random
  splits, PROTOCOLS.md (b)) in folders `<name>-splitNN`; the table shows mean ± sd over the splits.
- `gallery_curve = true`: after training, each run's final model is evaluated again with the
  distractor folder given as `--distractors` (Market-1501 500k; idver paper Table VI) and a second
  table puts the curve beside `paper_gallery_curve` (keys = distractors added).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib

import numpy as np

SPLIT_OPTION = "split_index"
SMOKE_SPLITS = 2
SMOKE_IMAGE_SIZE = (64, 32)


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
    splits = spec.get("splits", 1)
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"{path}: 'splits' must be a positive integer (runs per split_index), got {splits!r}")
    protocols = spec.get("protocols", [])
    if not isinstance(protocols, list) or not all(isinstance(p, str) and p for p in protocols):
        raise ValueError(f"{path}: 'protocols' must be a list of names, e.g. [\"single_query\", \"multi_query\"]")
    if not isinstance(spec.get("gallery_curve", False), bool):
        raise ValueError(f"{path}: 'gallery_curve' must be true or false")
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
    from reid_keras.models.presets import get_preset

    try:
        height, width = get_preset(model)["recipes"]["default"].get("image_size", SMOKE_IMAGE_SIZE)
    except (ValueError, KeyError):  # an unknown preset is reported by the trainer itself
        height, width = SMOKE_IMAGE_SIZE
    return f"{max(height, SMOKE_IMAGE_SIZE[0])}x{max(width, SMOKE_IMAGE_SIZE[1])}"


def run_label(run: dict) -> str:
    """A run's row label and folder name: its `name`, else its model (runs of one preset need names)."""
    return run.get("name", run["model"])


def split_runs(spec: dict, run: dict, smoke: bool = False) -> list:
    """The trainings behind one row: the run itself, or one per split_index when `splits` > 1."""
    count = spec.get("splits", 1)
    if count == 1:
        return [run]
    if smoke:
        count = min(count, SMOKE_SPLITS)
    return [dict(run, name=f"{run_label(run)}-split{i:02d}",
                 dataset_options={**run.get("dataset_options", {}), SPLIT_OPTION: i}) for i in range(count)]


def protocol_names(spec: dict) -> list:
    """Column groups of the table; None = the single headline protocol of a file without `protocols`."""
    return spec.get("protocols") or [None]


def _percent_table(mean_std: dict) -> dict:
    return {k.replace("-", ""): 100 * float(v[0]) for k, v in mean_std.items() if v[0] is not None}


def our_numbers(metrics: dict, protocol: str | None = None) -> dict | None:
    """Percent values keyed like the experiment's `metrics` list (rank1, rank5, ..., mAP).

    `protocol` None: the run's headline numbers. A name: that protocol's table in metrics.json
    (e.g. `multi_query`, or `multi_shot` inside the classic-CUHK03 `dataset_protocol`); None if the
    run did not compute it.
    """
    if protocol is not None:
        for source in (metrics.get("embedding_cosine"), metrics):
            if not source:
                continue
            table = source.get(protocol) or (source.get("dataset_protocol") or {}).get(protocol)
            if table:
                return _percent_table(table["mean_std"])
        return None
    if "cuhk01_protocol" in metrics:
        table = metrics["cuhk01_protocol"]["mean_std_percent"]
        return {k.replace("-", ""): v[0] for k, v in table.items()}
    source = metrics.get("verification_head") or metrics.get("embedding_cosine") or metrics
    protocol_table = source.get("dataset_protocol")
    if protocol_table:  # the benchmark's paper protocol (classic CUHK03 single-shot), not PROTOCOLS.md (a)
        return _percent_table(protocol_table["mean_std"])
    return {k: 100 * float(v) for k, v in source.items()
            if isinstance(v, (int, float)) and (k.startswith("rank") or k in ("mAP", "mINP"))}


def split_numbers(spec: dict, metrics: dict) -> dict:
    """{protocol: percent numbers or None} of one finished training."""
    names = protocol_names(spec)
    return {name: our_numbers(metrics, None if i == 0 else name) for i, name in enumerate(names)}


def mean_over_splits(per_split: list, protocol) -> tuple:
    """(mean, sd) dicts of one protocol over the splits that computed it, and how many did (sd ddof=1)."""
    done = [s[protocol] for s in per_split if s and s.get(protocol)]
    if not done:
        return None, None, 0
    keys = [k for k in done[0] if all(k in d for d in done)]
    values = {k: np.array([d[k] for d in done], dtype=float) for k in keys}
    sd = {k: float(v.std(ddof=1)) for k, v in values.items()} if len(done) > 1 else None
    return {k: float(v.mean()) for k, v in values.items()}, sd, len(done)


def _header(spec: dict) -> list:
    names, protocols = spec["metrics"], protocol_names(spec)
    if protocols == [None]:
        return list(names)
    return [f"{p.replace('_', ' ')} {n}" for p in protocols for n in names]


def results_table(spec: dict, rows: list) -> str:
    """Markdown: a paper row and an ours row per run. `rows` = [(run, per-split numbers list)], each
    split's numbers as `split_numbers` gives them; an empty list = not run."""
    names, protocols = spec["metrics"], protocol_names(spec)
    header = _header(spec)
    lines = [f"# {spec['title']}", "", "| model | source | " + " | ".join(header) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in header) + " |"]
    expected = len(split_runs(spec, {"model": "x"}))
    for run, per_split in rows:
        label, per_split = run_label(run), per_split or []
        paper_cells, our_cells = [], []
        for i, protocol in enumerate(protocols):
            paper = run.get("paper" if i == 0 else f"paper_{protocol}", {})
            paper_cells += [f"{paper[n]:.1f}" if n in paper else "–" for n in names]
            mean, sd, done = mean_over_splits(per_split, protocol)
            fewer = f" ({done} of {len(per_split)} splits)" if 0 < done < len(per_split) else ""
            for n in names:
                if not per_split:
                    our_cells.append("not run")
                elif mean is None or n not in mean:
                    our_cells.append("not computed")
                else:
                    our_cells.append(f"{mean[n]:.1f}" + (f" ± {sd[n]:.1f}" if sd else "") + fewer)
        source = "ours"
        if expected > 1 and per_split:
            source = f"ours, mean ± sd of {len(per_split)} split{'s' if len(per_split) != 1 else ''}" + (
                f" (of {expected})" if len(per_split) != expected else "")
        lines.append(f"| {label} | paper | " + " | ".join(paper_cells) + " |")
        lines.append(f"| {label} | {source} | " + " | ".join(our_cells) + " |")
    return "\n".join(lines) + "\n"


def gallery_curve_table(rows: list) -> str:
    """Markdown: rank-1 / mAP per number of distractors added, paper (`paper_gallery_curve`) vs ours.
    `rows` = [(run, curve rows of metrics.json `gallery_size_curve` or None)]."""
    sizes = set()
    for run, curve in rows:
        sizes |= {int(k) for k in run.get("paper_gallery_curve", {})}
        sizes |= {int(r["distractors"]) for r in curve or []}
    sizes = sorted(sizes)
    lines = ["## Gallery growth: rank-1 / mAP (%) with distractors added to the gallery", "",
             "| model | source | " + " | ".join(f"+{s:,}" for s in sizes) + " |",
             "| --- | --- | " + " | ".join("---:" for _ in sizes) + " |"]
    for run, curve in rows:
        paper = {int(k): v for k, v in run.get("paper_gallery_curve", {}).items()}
        ours = {int(r["distractors"]): r for r in curve or []}
        lines.append(f"| {run_label(run)} | paper | " + " | ".join(
            f"{paper[s]['rank1']:.1f} / {paper[s]['mAP']:.1f}" if s in paper else "–" for s in sizes) + " |")
        lines.append(f"| {run_label(run)} | ours | " + " | ".join(
            (f"{100 * ours[s]['rank1']:.1f} / {100 * ours[s]['mAP']:.1f}" if s in ours else "–") if curve
            else "not run" for s in sizes) + " |")
    return "\n".join(lines) + "\n"


def distractor_evaluation(folder: str, metrics: dict, args) -> list:
    """The gallery-size curve of a finished run: `reid_keras.evaluate --distractors` on the model the run
    evaluated (`last.keras`), written to `<run>/eval_distractors` and reused when already there."""
    from reid_keras import evaluate
    from reid_keras.training.tasks import FINAL_MODEL

    out = os.path.join(folder, "eval_distractors")
    path = os.path.join(out, "metrics.json")
    if not os.path.exists(path):
        source = metrics.get("embedding_cosine") or metrics
        argv = ["--model", os.path.join(folder, FINAL_MODEL), "--dataset", source["dataset"],
                "--data-root", source["data_root"], "--distractors", args.distractors, "--out", out,
                "--no-plots", "--seed", str(source.get("seed", 0))]
        for key, value in (source.get("dataset_options") or {}).items():
            argv += ["--dataset-option", f"{key}={value}"]
        if args.distractor_sizes:
            argv += ["--distractor-sizes", args.distractor_sizes]
        if evaluate.main(argv) != 0:
            raise ValueError(f"the distractor evaluation of {folder} failed (see the error above)")
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)["gallery_size_curve"]


def run_experiment(spec: dict, args) -> tuple:
    """Train (or reuse) every run; returns the table rows and the gallery-curve rows."""
    from reid_keras.train import run as train_run

    only = set(args.only.split(",")) if args.only else None
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
                curve = distractor_evaluation(folder, metrics, args)
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
    args = parser.parse_args(argv)
    from reid_keras.io_utils import atomic_write_text

    try:
        spec = load_experiment(args.config)
        if spec.get("gallery_curve") and not args.distractors:
            raise ValueError(f"{args.config} draws the gallery-size curve: pass --distractors DIR (the folder of "
                             "distractor images, e.g. Market-1501's 500k)")
        if args.smoke:
            spec = dict(spec, dataset="synthetic")
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


if __name__ == "__main__":
    sys.exit(main())
