"""Callbacks that never lose work and never keep a diverged model.

- `DivergenceGuard` stops training at the first non-finite (or exploding) loss and tells the others,
  which then write nothing: the last finite checkpoint stays.
- `TrainingStateBackup` writes the exact resume state (`snapshot.py`) at every epoch end and every
  N minutes / N steps inside an epoch; `state.json` mirrors its position for people and scripts.
- `AtomicCheckpoint` keeps `last.keras` and `best.keras`; `EpochHistory` appends `history.csv`.

Keras' own `ModelCheckpoint` and `BackupAndRestore` write in place: a run killed while writing
leaves a truncated file where the last good one was. These write to a temporary file in the same
folder and `os.replace` it over the old one (reid_keras.io_utils), atomic on POSIX and Windows.

Resuming is explicit: the trainer reads the snapshot *before* building its input pipeline (the
stream starts at the saved epoch and step) instead of relying on Keras' private `_initial_epoch` hook.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import time

import keras

from reid_keras.io_utils import append_csv_row, atomic_save_keras, atomic_write_text, write_json
from reid_keras.training.snapshot import (NonFiniteWeights, PhaseCheckpoints, Snapshot, add_metric_state,
                                          check_finite, load_snapshot, save_snapshot)

STATE_WEIGHTS = "state.weights.h5"
STATE_JSON = "state.json"
# Losses above this many times the first one (or 1, whichever is larger) count as diverged.
EXPLODING_LOSS_FACTOR = 1e4


class DivergenceGuard(keras.callbacks.Callback):
    """Stop training at the first non-finite or exploding loss (`EXPLODING_LOSS_FACTOR` x the first
    loss seen); `reason` then says what happened and where, and the saving callbacks write nothing.

    Args:
        cause: the likely cause named in `message()`, e.g. "learning_rate=1e+06".
    """

    def __init__(self, cause: str = ""):
        super().__init__()
        self.cause, self.reason = cause, None
        self._first, self._epoch = None, 0

    @property
    def tripped(self) -> bool:
        return self.reason is not None

    def trip(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        if self.model is not None:
            self.model.stop_training = True

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        loss = float(loss)
        if not math.isfinite(loss):
            self.trip(f"the loss became {loss} in epoch {self._epoch + 1}, batch {batch + 1}")
        elif self._first is None:
            self._first = loss
        elif loss > EXPLODING_LOSS_FACTOR * max(abs(self._first), 1.0):
            self.trip(f"the loss exploded to {loss:.3g} (first {self._first:.3g}) in epoch {self._epoch + 1}, "
                      f"batch {batch + 1}")

    def message(self, what: str = "training") -> str:
        cause = f"; the likely cause is the learning rate ({self.cause}): lower it" if self.cause else ""
        return f"{what} diverged: {self.reason}{cause}"


class _Saver(keras.callbacks.Callback):
    """Writes nothing once `guard` tripped, and trips it on non-finite weights instead of saving them."""

    def __init__(self, guard: DivergenceGuard | None = None):
        super().__init__()
        self.guard = guard

    def _save(self, write) -> bool:
        if self.guard is not None and self.guard.tripped:
            return False
        try:
            write()
        except NonFiniteWeights as err:
            if self.guard is None:
                raise
            self.guard.trip(str(err))
            return False
        return True


class _Schedule:
    """When a periodic snapshot is due: every `every_steps` steps and / or `every_minutes` minutes."""

    def __init__(self, every_steps: int | None, every_minutes: float | None):
        self.every_steps, self.every_minutes = every_steps, every_minutes
        self.restart()

    def restart(self) -> None:
        self._last = time.monotonic()

    def due(self, step: int) -> bool:
        if self.every_steps and step % int(self.every_steps) == 0:
            return True
        return bool(self.every_minutes) and time.monotonic() - self._last >= 60 * float(self.every_minutes)


class AtomicCheckpoint(_Saver):
    """Save `last.keras` every epoch and `best.keras` when `monitor` improves (a resumed run continues
    from the best value in `best.json`).

    Args:
        folder: run folder.
        monitor: a key of the epoch logs (e.g. "loss"); missing keys fall back to saving `best`
            every epoch (so `best.keras` always exists after the first epoch).
        mode: "min" or "max".
        guard: the run's `DivergenceGuard` (None: raise on non-finite weights).
    """

    def __init__(self, folder: str, monitor: str = "loss", mode: str = "min", guard: DivergenceGuard | None = None):
        super().__init__(guard)
        if mode not in ("min", "max"):
            raise ValueError(f"AtomicCheckpoint mode must be 'min' or 'max', got {mode!r}")
        self.folder, self.monitor, self.mode = folder, monitor, mode
        self.best = math.inf if mode == "min" else -math.inf
        best = os.path.join(folder, "best.json")
        if os.path.exists(best):
            with open(best, encoding="utf-8") as handle:
                earlier = json.load(handle)
            if earlier.get("monitor") == monitor and earlier.get("value") is not None:
                self.best = float(earlier["value"])

    def _write(self, epoch, value, improved):
        check_finite(self.model, "not writing last.keras")
        atomic_save_keras(self.model, os.path.join(self.folder, "last.keras"))
        if improved:
            if value is not None:
                self.best = float(value)
            atomic_save_keras(self.model, os.path.join(self.folder, "best.keras"))
            write_json(os.path.join(self.folder, "best.json"),
                       {"epoch": epoch + 1, "monitor": self.monitor, "value": value})

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        improved = value is None or (value < self.best if self.mode == "min" else value > self.best)
        self._save(lambda: self._write(epoch, value, improved))


class TrainingStateBackup(_Saver):
    """Back up the exact training state (`snapshot.py`) so that a killed run resumes where it was.

    Written at every epoch end, and inside an epoch every `every_steps` updates and / or every
    `every_minutes` minutes (at an update boundary: with gradient accumulation, every
    `accumulate_steps` fed batches). The snapshot is `state.weights.h5`; `state.json` then mirrors
    its position as `{"completed_epochs": e, "batch": updates done in epoch e}`.

    A resumed part of an epoch is fed to `fit` alone: `begin_part(step_offset, snapshot)` tells the
    callback how many updates of the epoch came before, and which metric sums to add back.
    """

    def __init__(self, folder: str, every_steps: int | None = None, every_minutes: float | None = None,
                 guard: DivergenceGuard | None = None, accumulate_steps: int = 1):
        super().__init__(guard)
        self.folder = folder
        self.schedule = _Schedule(every_steps, every_minutes)
        self.accumulate_steps = int(accumulate_steps)
        self._epoch, self._offset, self._pending_metrics = 0, 0, None

    @property
    def weights_path(self) -> str:
        return os.path.join(self.folder, STATE_WEIGHTS)

    @property
    def state_path(self) -> str:
        return os.path.join(self.folder, STATE_JSON)

    def begin_part(self, step_offset: int = 0, snapshot: Snapshot | None = None) -> None:
        """The next `fit` starts `step_offset` updates into its first epoch, whose metric sums so far are
        `snapshot.metrics` (None or a fresh epoch: nothing to add)."""
        self._offset = int(step_offset)
        self._pending_metrics = snapshot.metrics if (snapshot is not None and step_offset and snapshot.metrics) else None

    def on_train_begin(self, logs=None):
        self.schedule.restart()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self._pending_metrics is not None:
            add_metric_state(self.model, self._pending_metrics)
            self._pending_metrics = None
        fed = batch + 1
        if fed % self.accumulate_steps:
            return  # inside an accumulated update: its partial gradients are not a state to resume from
        step = self._offset + fed // self.accumulate_steps
        if self.schedule.due(step):
            self.save(completed_epochs=self._epoch, batch=step)

    def on_epoch_end(self, epoch, logs=None):
        self._offset = 0
        self.save(completed_epochs=epoch + 1, batch=0)

    def save(self, completed_epochs: int, batch: int) -> bool:
        """Write the snapshot at (completed_epochs, batch), then state.json; False when the guard forbids it."""
        def write():
            save_snapshot(self.model, self.weights_path, {"phase": "train", "epoch": completed_epochs, "step": batch})
            write_json(self.state_path, {"completed_epochs": completed_epochs, "batch": batch})

        saved = self._save(write)
        if saved:
            self.schedule.restart()
        return saved

    @staticmethod
    def load(folder: str, model: keras.Model) -> Snapshot:
        """Restore `folder`'s training state into `model`; the snapshot's position says where to go on.

        A state file written by an older reid_keras (weights and optimizer only) resumes at the start of the
        epoch `state.json` names (`Snapshot.exact` False)."""
        backup = TrainingStateBackup(folder)
        snapshot = load_snapshot(model, backup.weights_path)
        if not snapshot.exact:
            with open(backup.state_path, encoding="utf-8") as handle:
                snapshot.position = {"phase": "train", "epoch": int(json.load(handle)["completed_epochs"]), "step": 0}
        return snapshot

    @staticmethod
    def load_state(folder: str, model: keras.Model) -> int:
        """Restore the training state of `folder` into `model`; return the completed epochs (0 if none)."""
        backup = TrainingStateBackup(folder)
        if not os.path.exists(backup.weights_path):
            return 0
        return int(TrainingStateBackup.load(folder, model).position["epoch"])


class WarmupBackup(_Saver):
    """Snapshots of an identity warm-up (one `fit` epoch of `steps` steps, resumed after `step_offset`) at
    `checkpoints.path`, as often as `checkpoints` says; position `{"phase": "warmup", "step", "steps"}`."""

    def __init__(self, checkpoints: PhaseCheckpoints, steps: int, step_offset: int = 0,
                 guard: DivergenceGuard | None = None, snapshot: Snapshot | None = None):
        super().__init__(guard)
        self.checkpoints, self.steps, self.offset = checkpoints, int(steps), int(step_offset)
        self.schedule = _Schedule(checkpoints.every_steps, checkpoints.every_minutes)
        self._pending_metrics = snapshot.metrics if (snapshot is not None and step_offset and snapshot.metrics) else None

    def on_train_begin(self, logs=None):
        self.schedule.restart()

    def on_train_batch_end(self, batch, logs=None):
        if self._pending_metrics is not None:
            add_metric_state(self.model, self._pending_metrics)
            self._pending_metrics = None
        step = self.offset + batch + 1
        if step < self.steps and self.schedule.due(step):
            position = {"phase": "warmup", "step": step, "steps": self.steps}
            if self._save(lambda: save_snapshot(self.model, self.checkpoints.path, position)):
                self.schedule.restart()


class EpochHistory(_Saver):
    """One row per finished epoch in `path` (`epoch` then the epoch logs), each append atomic.

    `keep_before(epoch)` drops the rows of `epoch` and later: a resumed run writes them again (a kill
    between the row and the state would otherwise leave the row twice).
    """

    def __init__(self, path: str, guard: DivergenceGuard | None = None):
        super().__init__(guard)
        self.path = path

    def keep_before(self, epoch: int) -> int:
        """Drop the rows of epochs >= `epoch`; returns how many were dropped."""
        if not os.path.exists(self.path):
            return 0
        with open(self.path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header, rows = reader.fieldnames or ["epoch"], list(reader)
        kept = [row for row in rows if int(row["epoch"]) < epoch]
        if len(kept) < len(rows):
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
            writer.writeheader()
            writer.writerows(kept)
            atomic_write_text(self.path, buffer.getvalue())
        return len(rows) - len(kept)

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch, **{k: float(v) for k, v in (logs or {}).items()}}
        self._save(lambda: append_csv_row(self.path, row, fields=("epoch",)))


def fit_verbosity() -> int:
    """1 (progress bar) on a terminal, 2 (a line per epoch) in logs and notebooks' captured output."""
    import sys

    return 1 if sys.stdout.isatty() else 2
