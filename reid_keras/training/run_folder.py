"""One folder per run: `runs/<name>/` with config.json, history.csv, checkpoints, metrics, plots, export.

A run folder is what makes `resume` possible: the config written at the start is compared with
the resumed one, so a resumed run cannot silently train a different model on old weights. The
trainer locates (and checks) the folder first, and creates it only once the data has loaded, so a
failed start leaves nothing behind; a folder holding only the config.json of such a start (from an
older version) is reused rather than blocking its name.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil

from reid_keras.io_utils import write_json

FINAL_MODEL = "last.keras"  # the model a run evaluates and exports (best.keras: lowest training loss)
WARMUP_STATE = "warmup.weights.h5"  # snapshot of an identity warm-up in progress (training/warmup.py)
# Files that hold a run's work: resume state, checkpoints, results. A folder without any is an empty leftover.
RESUME_STATE = ("state.weights.h5", WARMUP_STATE)
WORK = RESUME_STATE + ("state.json", FINAL_MODEL, "best.keras", "history.csv", "metrics.json", "export")
# Temporary names io_utils gives a file or folder being written: ".<name>.<random>.tmp<ext>",
# ".<name>.tmp-<random>" and ".<name>.old-<random>" (folders). A kill mid-write leaves them.
_TEMPORARY = re.compile(r"^\..+\.(tmp|old-)")


def run_name(model: str, dataset: str) -> str:
    return f"{model}-{dataset}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def has_resume_state(folder: str) -> bool:
    return any(os.path.exists(os.path.join(folder, name)) for name in RESUME_STATE)


def holds_work(folder: str) -> bool:
    """Whether `folder` holds anything of a run beyond its config.json (state, checkpoints, results)."""
    return any(os.path.exists(os.path.join(folder, name)) for name in WORK)


def locate_run_folder(config, name: str | None) -> str:
    """The folder of the run `config` (a `families.config.RunConfig`) describes, checked but not created.

    With `config.resume`: the folder `name`, or the newest run of `config.model` under `config.output`
    that has resume state; its config.json must exist and match `config` (apart from
    `RESUMABLE_CHANGES`). Without: `name` (default model-dataset-time), which must not hold a run's work.

    Raises:
        FileExistsError when the folder holds a run's work and `resume` is not set;
        FileNotFoundError when `resume` finds no run to continue;
        ValueError when the resumed run's config differs in a key that changes the model or data.
    """
    folder = os.path.join(config.output, name) if name else None
    if not config.resume:
        folder = folder or os.path.join(config.output, run_name(config.model, config.dataset))
        if holds_work(folder):
            raise FileExistsError(f"run folder {folder} already holds a run: resume it (--resume) or choose "
                                  "another name (--name)")
        return folder
    folder = folder or latest_resumable_run(config.output, config.model)
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"resume: no config.json in {folder}: nothing to resume")
    with open(config_path, encoding="utf-8") as handle:
        changed = config.changes_from(json.load(handle))
    if changed:
        rows = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        hint = ("resume with the interrupted run's values, or train with the new ones as a new run under another "
                "name (--name)") if holds_work(folder) else (
                "it holds no training state (a start that failed): train without resume to start it afresh with "
                "the new values, or choose another name (--name)")
        raise ValueError(f"resume {folder}: the configuration differs from the interrupted run ({rows}); {hint}")
    return folder


def open_run_folder(config, folder: str) -> str:
    """Create (or reopen) `folder` and write config.json; a resumed run keeps the earlier `runtime_*` facts."""
    content = config.to_json()
    config_path = os.path.join(folder, "config.json")
    if config.resume and os.path.exists(config_path):
        with open(config_path, encoding="utf-8") as handle:
            previous = json.load(handle)
        # Facts of the interrupted part (e.g. its identity warm-up) stay; this part updates the rest.
        content = {**{k: v for k, v in previous.items() if k.startswith("runtime_")}, **content}
    os.makedirs(folder, exist_ok=True)
    write_json(config_path, content)
    return folder


def prepare_run_folder(config, name: str | None) -> str:
    """`locate_run_folder`, then `open_run_folder`: the run folder, created, with its config.json."""
    return open_run_folder(config, locate_run_folder(config, name))


def latest_resumable_run(output: str, model: str) -> str:
    """The run of `model` under `output` whose resume state was written last."""
    if not os.path.isdir(output):
        raise FileNotFoundError(f"resume: no runs folder {output}")
    candidates = {}
    for entry in os.listdir(output):
        folder = os.path.join(output, entry)
        config_path = os.path.join(folder, "config.json")
        if not (os.path.isfile(config_path) and has_resume_state(folder)):
            continue
        try:
            with open(config_path, encoding="utf-8") as handle:
                if json.load(handle).get("model") != model:
                    continue
        except (OSError, ValueError):
            continue
        candidates[folder] = max(os.path.getmtime(os.path.join(folder, n)) for n in RESUME_STATE
                                 if os.path.exists(os.path.join(folder, n)))
    if not candidates:
        raise FileNotFoundError(f"resume: no run of {model} with resume state under {output}; pass the run's name "
                                "(--name)")
    return max(candidates, key=candidates.get)


def remove_stale_temporaries(folder: str) -> list:
    """Delete what interrupted atomic writes left in `folder` (and its sub-folders); returns their paths
    relative to `folder`. Call it only on a folder no running process writes to (a resumed run's own)."""
    removed = []
    for root, dirs, files in os.walk(folder):
        for entry in sorted(dirs + files):
            if not _TEMPORARY.match(entry):
                continue
            path = os.path.join(root, entry)
            if entry in dirs:
                dirs.remove(entry)  # not walked into: it is going
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
            removed.append(os.path.relpath(path, folder))
    return removed


def update_config(folder: str, **values) -> dict:
    """Add facts learnt during the run (weights actually used, dataset counts) to config.json."""
    path = os.path.join(folder, "config.json")
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    config.update(values)
    write_json(path, config)
    return config
