"""One folder per run: `runs/<name>/` with config.json, history.csv, checkpoints, metrics, plots, export.

A run folder is what makes `--resume` possible: the config written at the start is compared with
the resumed one, so a resumed run cannot silently train a different model on old weights.
"""
from __future__ import annotations

import datetime as _dt
import json
import os

from reid_keras.io_utils import write_json

FINAL_MODEL = "last.keras"  # the model a run evaluates and exports (best.keras: lowest training loss)


def run_name(model: str, dataset: str) -> str:
    return f"{model}-{dataset}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def prepare_run_folder(config, name: str | None) -> str:
    """Create (or, with `config.resume`, reopen) the run folder of `config` (a `families.config.RunConfig`)
    and write its config.json.

    Raises:
        FileExistsError when the folder exists and `resume` is not set;
        FileNotFoundError when `resume` names a folder without config.json;
        ValueError when a resumed run's config differs in a key that changes the model or data.
    """
    folder = os.path.join(config.output, name) if name else None
    content = config.to_json()
    if config.resume:
        folder = folder or _latest_run(config.output, config.model)
        config_path = os.path.join(folder, "config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"--resume: no config.json in {folder}: nothing to resume")
        with open(config_path, encoding="utf-8") as handle:
            previous = json.load(handle)
        changed = config.changes_from(previous)
        if changed:
            rows = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(f"--resume {folder}: the configuration differs from the interrupted run ({rows}); "
                             "start a new run instead or pass the same arguments")
        # Facts of the interrupted part (e.g. its identity warm-up) stay; this part updates the rest.
        content = {**{k: v for k, v in previous.items() if k.startswith("runtime_")}, **content}
    else:
        folder = folder or os.path.join(config.output, run_name(config.model, config.dataset))
        if os.path.exists(os.path.join(folder, "config.json")):
            raise FileExistsError(f"run folder {folder} already holds a run: pass --resume to continue it "
                                  "or another --name")
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "config.json"), content)
    return folder


def _latest_run(output: str, model: str) -> str:
    if not os.path.isdir(output):
        raise FileNotFoundError(f"--resume: no runs folder {output}")
    candidates = [os.path.join(output, d) for d in os.listdir(output)
                  if d.startswith(model + "-") and os.path.exists(os.path.join(output, d, "config.json"))]
    if not candidates:
        raise FileNotFoundError(f"--resume: no run of {model} under {output}; pass --name")
    return max(candidates, key=os.path.getmtime)


def update_config(folder: str, **values) -> dict:
    """Add facts learnt during the run (weights actually used, dataset counts) to config.json."""
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    config.update(values)
    write_json(path, config)
    return config
