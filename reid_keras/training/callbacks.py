"""Callbacks that never lose work: atomic checkpoints and a resumable training-state backup.

Keras' own `ModelCheckpoint` and `BackupAndRestore` write in place: a run killed while writing
leaves a truncated file where the last good one was. These write to a temporary file in the same
folder and `os.replace` it over the old one (reid_keras.io_utils), atomic on POSIX and Windows.

Resuming is explicit: the trainer reads `TrainingStateBackup.load_state(...)` *before* building
its input pipeline (the pair-ratio schedule depends on the epoch) and passes `initial_epoch` to
`fit`, instead of relying on Keras' private `_initial_epoch` hook.
"""
from __future__ import annotations

import json
import math
import os

import keras

from reid_keras.io_utils import atomic_save_keras, atomic_write, write_json


class AtomicCheckpoint(keras.callbacks.Callback):
    """Save `last.keras` every epoch and `best.keras` when `monitor` improves.

    Args:
        folder: run folder.
        monitor: a key of the epoch logs (e.g. "loss"); missing keys fall back to saving `best`
            every epoch (so `best.keras` always exists after the first epoch).
        mode: "min" or "max".
    """

    def __init__(self, folder: str, monitor: str = "loss", mode: str = "min"):
        super().__init__()
        if mode not in ("min", "max"):
            raise ValueError(f"AtomicCheckpoint mode must be 'min' or 'max', got {mode!r}")
        self.folder, self.monitor, self.mode = folder, monitor, mode
        self.best = math.inf if mode == "min" else -math.inf

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        atomic_save_keras(self.model, os.path.join(self.folder, "last.keras"))
        value = logs.get(self.monitor)
        improved = value is None or (value < self.best if self.mode == "min" else value > self.best)
        if improved:
            if value is not None:
                self.best = float(value)
            atomic_save_keras(self.model, os.path.join(self.folder, "best.keras"))
            write_json(os.path.join(self.folder, "best.json"),
                              {"epoch": epoch + 1, "monitor": self.monitor, "value": value})


class TrainingStateBackup(keras.callbacks.Callback):
    """Back up weights + optimizer state and the epoch reached, so a killed run can resume.

    Written at every epoch end (and every `every_batches` batches if set): `state.weights.h5`
    then `state.json`, each atomically; `state.json` is written last, so it never points at
    weights newer or older than itself by more than the step being written.
    A resumed run restarts the interrupted epoch from its beginning (with the latest weights),
    as Keras' BackupAndRestore does.
    """

    def __init__(self, folder: str, every_batches: int | None = None):
        super().__init__()
        self.folder = folder
        self.every_batches = every_batches
        self._epoch = 0

    @property
    def weights_path(self) -> str:
        return os.path.join(self.folder, "state.weights.h5")

    @property
    def state_path(self) -> str:
        return os.path.join(self.folder, "state.json")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.every_batches and (batch + 1) % self.every_batches == 0:
            self._save(completed_epochs=self._epoch, batch=batch + 1)

    def on_epoch_end(self, epoch, logs=None):
        self._save(completed_epochs=epoch + 1, batch=0)

    def _save(self, completed_epochs: int, batch: int) -> None:
        atomic_write(self.weights_path, lambda tmp: self.model.save_weights(tmp, overwrite=True))
        write_json(self.state_path, {"completed_epochs": completed_epochs, "batch": batch})

    @staticmethod
    def load_state(folder: str, model: keras.Model) -> int:
        """Restore weights + optimizer state from `folder`; return the epoch to resume at (0 if none)."""
        backup = TrainingStateBackup(folder)
        if not os.path.exists(backup.state_path) or not os.path.exists(backup.weights_path):
            return 0
        with open(backup.state_path, encoding="utf-8") as handle:
            state = json.load(handle)
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(backup.weights_path)
        return int(state["completed_epochs"])


def fit_verbosity() -> int:
    """1 (progress bar) on a terminal, 2 (a line per epoch) in logs and notebooks' captured output."""
    import sys

    return 1 if sys.stdout.isatty() else 2
