"""kill -9 the main job at four moments, resume it, and compare with the uninterrupted run (issue 12).

The main job (`siamese_b0`, its default recipe: 64x32 images, batch 32, RMSprop, identity warm-up
because no ImageNet weights are at hand), shortened so that the benchmark ends within the hour:
`--id-warmup-steps 120`, 3 epochs of 80 steps, and resume state written every 15 s instead of the
default 2 minutes (`checkpoint_every_minutes` 0.25; the default only makes each interval 8x longer). Each run is a
separate process started the way `python -m reid_keras.train` starts it (`run_training` on the
`resolve_config` of the same values), on the default synthetic data (300 ids).

1. One uninterrupted run: its `history.csv` is the reference.
2. For each moment, a fresh run is SIGKILLed (`kill -9`):
   - warm-up: 10 s after the warm-up's first snapshot (`warmup.weights.h5`);
   - early epoch: 5 s into the first epoch (its last state is the one written after the warm-up);
   - mid-epoch: 10 s after the first snapshot written inside an epoch;
   - checkpoint write: the moment a temporary checkpoint file (`.*.tmp*`) appears in the run folder
     (the folder is polled every 5 ms; the kill lands during the write, which the partial file left
     behind proves);
   then resumed with `resume=True` (the CLI's `--resume`) until the run ends.
3. Table: whether the resumed run's per-epoch losses and accuracies equal the reference's, the largest
   difference, the work redone (kill time minus the time of the snapshot the resume starts from) and the
   extra wall time of the killed + resumed processes over the uninterrupted one (start-up included).

    python experiments/benchmarks/kill_resume.py [--keep DIR]
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import describe_machine  # noqa: E402

OVERRIDES = {"weights": "none", "id_warmup_steps": 120, "epochs": 3, "steps_per_epoch": 80,
             "checkpoint_every_minutes": 0.25}
DRIVER = """
import json, sys
from reid_keras.families.config import resolve_config
from reid_keras.training.runner import run_training
spec = json.loads(sys.argv[1])
config = resolve_config("siamese_b0", "default", spec["overrides"], dataset="synthetic", data_root=spec["data_root"],
                        seed=0, output=spec["output"], resume=spec["resume"])
run_training(config, name=spec["name"], export=False, plots=False)
"""


def start(workdir: str, name: str, resume: bool) -> tuple:
    spec = {"overrides": OVERRIDES, "data_root": os.path.join(workdir, "data"), "output": os.path.join(workdir, "runs"),
            "name": name, "resume": resume}
    log = open(os.path.join(workdir, f"{name}{'-resumed' if resume else ''}.log"), "w")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    process = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(spec)], stdout=log, stderr=subprocess.STDOUT,
                               env=env)
    return process, log


def run_to_end(workdir: str, name: str, resume: bool) -> float:
    started = time.time()
    process, log = start(workdir, name, resume)
    code = process.wait()
    log.close()
    if code != 0:
        raise RuntimeError(f"run {name} (resume={resume}) failed with exit code {code}; see {log.name}")
    return time.time() - started


def _state(folder: str) -> dict:
    try:
        with open(os.path.join(folder, "state.json"), encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return {}


CHECKPOINTS = (".state.weights.h5.", ".warmup.weights.h5.", ".last.keras.", ".best.keras.")


def _temporaries(folder: str) -> list:
    """Temporary files of checkpoints being written (io_utils.atomic_write names them .<name>.<random>.tmp<ext>)."""
    try:
        return [n for n in os.listdir(folder) if n.startswith(CHECKPOINTS) and ".tmp" in n]
    except OSError:
        return []


# moment -> (condition on the run folder that arms the kill, seconds to wait after it)
MOMENTS = {
    "warm-up": (lambda f: os.path.exists(os.path.join(f, "warmup.weights.h5")), 10.0),
    "early epoch": (lambda f: os.path.exists(os.path.join(f, "state.weights.h5")), 5.0),
    "mid-epoch": (lambda f: _state(f).get("batch", 0) > 0, 10.0),
    "checkpoint write": (lambda f: bool(_temporaries(f)) and os.path.exists(os.path.join(f, "state.weights.h5")), 0.0),
}


def kill_at(workdir: str, name: str, moment: str) -> dict:
    """Start run `name`, SIGKILL it at `moment`; returns what the kill left and when it happened."""
    folder = os.path.join(workdir, "runs", name)
    armed, delay = MOMENTS[moment]
    started = time.time()
    process, log = start(workdir, name, resume=False)
    while process.poll() is None and not armed(folder):
        time.sleep(0.005)
    time.sleep(delay)
    if process.poll() is not None:
        raise RuntimeError(f"run {name} ended before the {moment} kill; see {log.name}")
    os.kill(process.pid, signal.SIGKILL)
    killed = time.time()
    process.wait()
    log.close()
    snapshot = next((os.path.join(folder, n) for n in ("state.weights.h5", "warmup.weights.h5")
                     if os.path.exists(os.path.join(folder, n))), None)
    return {"seconds": killed - started, "left": _temporaries(folder), "state": _state(folder),
            "redone": killed - (os.path.getmtime(snapshot) if snapshot else started), "snapshot": snapshot}


def history(workdir: str, name: str) -> list:
    with open(os.path.join(workdir, "runs", name, "history.csv"), encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def compare(rows: list, reference: list) -> tuple:
    """(exactly equal?, largest |difference| over the epochs and columns)."""
    if [r["epoch"] for r in rows] != [r["epoch"] for r in reference]:
        return False, float("inf")
    diffs = [abs(float(a[k]) - float(b[k])) for a, b in zip(rows, reference) for k in b if k != "epoch"]
    return rows == reference, max(diffs)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    workdir = args.keep or tempfile.mkdtemp(prefix="kill_resume-")
    os.makedirs(workdir, exist_ok=True)
    print(describe_machine(), flush=True)
    print(f"recipe: siamese_b0 default with {OVERRIDES}", flush=True)
    reference_seconds = run_to_end(workdir, "uninterrupted", resume=False)
    reference = history(workdir, "uninterrupted")
    print(f"uninterrupted: {reference_seconds:.0f} s, losses {[round(float(r['loss']), 4) for r in reference]}",
          flush=True)
    rows = []
    for i, moment in enumerate(MOMENTS):
        name = f"killed-{i}"
        try:
            kill = kill_at(workdir, name, moment)
        except RuntimeError as err:  # e.g. epochs shorter than the snapshot interval on a fast machine
            print(f"{moment}: not measured: {err}", flush=True)
            continue
        resumed_seconds = run_to_end(workdir, name, resume=True)
        with open(os.path.join(workdir, f"{name}-resumed.log"), encoding="utf-8") as handle:
            said = [line.strip() for line in handle if line.startswith(("resuming", "removed", "identity warm-up"))]
        equal, largest = compare(history(workdir, name), reference)
        rows.append((moment, equal, largest, kill, kill["seconds"] + resumed_seconds - reference_seconds, said))
        print(f"{moment}: killed after {kill['seconds']:.0f} s, state {kill['state'] or 'none'}, "
              f"temporary files left {kill['left'] or 'none'}; resume said {said}", flush=True)
    print("\n| moment | resumed equal? | max abs loss/accuracy diff | work redone (s) | extra wall vs uninterrupted (s) |")
    print("| --- | --- | --- | --- | --- |")
    for moment, equal, largest, kill, extra, _ in rows:
        print(f"| {moment} | {'yes' if equal else 'NO'} | {largest:.1e} | {kill['redone']:.0f} | {extra:.0f} |")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(equal for _, equal, *_ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
