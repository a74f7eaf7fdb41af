"""One folder per run: `runs/<name>/` with config.json, history.csv, checkpoints, metrics, plots, export.

A run folder is what makes `--resume` possible: the config written at the start is compared with
the resumed one, so a resumed run cannot silently train a different model on old weights.
"""
from __future__ import annotations

import datetime as _dt
import json
import os

from reid_keras.io_utils import atomic_write_json

# Config keys that may change between a run and its resumption without invalidating the state.
RESUMABLE_CHANGES = {"epochs", "resume", "output", "verbose", "devices", "eval_only"}


def run_name(model: str, dataset: str) -> str:
    return f"{model}-{dataset}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def prepare_run_folder(output: str, name: str | None, config: dict, resume: bool) -> str:
    """Create (or, with `resume`, reopen) the run folder and write config.json.

    Raises:
        FileExistsError when the folder exists and `resume` is not set;
        FileNotFoundError when `resume` names a folder without config.json;
        ValueError when a resumed run's config differs in a key that changes the model or data.
    """
    folder = os.path.join(output, name) if name else None
    if resume:
        folder = folder or _latest_run(output, config["model"])
        config_path = os.path.join(folder, "config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"--resume: no config.json in {folder}: nothing to resume")
        with open(config_path, encoding="utf-8") as handle:
            previous = json.load(handle)
        config = json.loads(json.dumps(config, default=str))  # tuples -> lists, as stored
        changed = {k for k in set(previous) | set(config)
                   if k not in RESUMABLE_CHANGES and previous.get(k) != config.get(k)
                   and not k.startswith("runtime_")}
        if changed:
            rows = ", ".join(f"{k}: {previous.get(k)!r} -> {config.get(k)!r}" for k in sorted(changed))
            raise ValueError(f"--resume {folder}: the configuration differs from the interrupted run ({rows}); "
                             "start a new run instead or pass the same arguments")
        # Facts of the interrupted part (e.g. its identity warm-up) stay; this part updates the rest.
        config = {**{k: v for k, v in previous.items() if k.startswith("runtime_")}, **config}
    else:
        folder = folder or os.path.join(output, run_name(config["model"], config["dataset"]))
        if os.path.exists(os.path.join(folder, "config.json")):
            raise FileExistsError(f"run folder {folder} already holds a run: pass --resume to continue it "
                                  "or another --name")
    os.makedirs(folder, exist_ok=True)
    atomic_write_json(os.path.join(folder, "config.json"), config, default=str)
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
    atomic_write_json(path, config, default=str)
    return config
