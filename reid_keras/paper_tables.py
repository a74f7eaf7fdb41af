"""Experiment files: a paper table's runs (one TOML file each) and the results table that puts the paper's
numbers beside ours (`python -m reid_keras.experiment` trains the runs; this module reads the file,
expands the splits, reads each finished run's metrics.json and writes the tables).

An experiment file names shared settings (dataset, recipe, weights, dataset options, metrics) and a
list of `[[runs]]`, each a preset plus optional train flags and the paper's numbers. Every run is an
ordinary `python -m reid_keras.train` run, so each keeps its own run folder and can be resumed; a
finished run folder of the same name is reused, not trained again. Optional top-level keys:

- `protocols = ["single_query", "multi_query"]`: one column group per evaluation protocol. The first
  is the run's headline numbers (paper numbers in `paper`); each other one is read from the run's
  metrics.json under its name (`multi_query`: Market-1501 pooled queries; `multi_shot`: classic
  CUHK03 Table V) with paper numbers in `paper_<name>`.
- `splits = 20`: every run is trained once per `split_index` 0..N-1 (classic CUHK03's 20 random
  splits, docs/protocols.md (b)) in folders `<name>-splitNN`; the table shows mean ± sd over the splits.
- `gallery_curve = true`: after training, each run's final model is evaluated again with a
  distractor folder (Market-1501 500k; idver paper Table VI) and a second table puts the curve
  beside `paper_gallery_curve` (keys = distractors added).
"""
from __future__ import annotations

import json
import os
import tomllib

import numpy as np

SPLIT_OPTION = "split_index"
SMOKE_SPLITS = 2
TOP_KEYS = ("title", "dataset", "recipe", "weights", "dataset_options", "metrics", "runs", "protocols", "splits",
            "gallery_curve")
RUN_KEYS = ("model", "name", "flags", "weights", "dataset_options", "paper", "paper_gallery_curve")


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
    _refuse_unknown(path, "top-level key", spec, TOP_KEYS)
    run_keys = RUN_KEYS + tuple(f"paper_{p}" for p in protocols[1:])
    for i, run in enumerate(spec["runs"]):
        _refuse_unknown(path, f"key of [[runs]] number {i + 1} ({run_label(run)})", run, run_keys)
    return spec


def _refuse_unknown(path: str, what: str, table: dict, known) -> None:
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ValueError(f"{path}: unknown {what} {', '.join(map(repr, unknown))}; known: {', '.join(known)}")


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
    if protocol_table:  # the benchmark's paper protocol (classic CUHK03 single-shot), not docs/protocols.md (a)
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


def distractor_evaluation(folder: str, metrics: dict, distractors: str, sizes=None) -> list:
    """The gallery-size curve of a finished run: its final model (`last.keras`) evaluated with `distractors`
    added to the gallery, written to `<run>/eval_distractors` and reused when already there."""
    out = os.path.join(folder, "eval_distractors")
    path = os.path.join(out, "metrics.json")
    if not os.path.exists(path):
        from reid_keras.data.datasets import load_dataset
        from reid_keras.families import register_serializables
        from reid_keras.metrics.evaluation import evaluate_model
        from reid_keras.metrics.options import EvaluationOptions
        from reid_keras.models.loading import load_embedding_model
        from reid_keras.training.run_folder import FINAL_MODEL

        source = metrics.get("embedding_cosine") or metrics
        register_serializables()
        model = load_embedding_model(os.path.join(folder, FINAL_MODEL))
        dataset = load_dataset(source["dataset"], source["data_root"], **(source.get("dataset_options") or {}))
        evaluate_model(model, dataset, out, EvaluationOptions(
            distractors=distractors, distractor_sizes=tuple(sizes) if sizes else None, plots=False,
            seed=source.get("seed", 0)))
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)["gallery_size_curve"]
