"""Exact training snapshots: all a run needs to continue as if it had never been interrupted.

A snapshot is one `.weights.h5` file written atomically (`io_utils.atomic_write`): Keras' own weights
file of the model (weights and optimizer state, `model.save_weights`, loadable by `load_weights`) plus
a group `reid_keras_resume` with what Keras does not save:

- the states of the model's random seed generators (Dropout, EfficientNet's stochastic depth): they
  advance at every training step, and a resumed run must draw the masks the uninterrupted one drew;
- the metric accumulators of the epoch in progress (a mid-epoch snapshot's mean loss so far);
- Python's and numpy's global random states;
- the position: `{"phase": "train", "epoch": completed epochs, "step": updates done in the next one}`
  or `{"phase": "warmup", "step": ..., "steps": ...}`.

One file, so a kill leaves either the previous snapshot or the new one, never a mix. A model with a
non-finite weight is never written (`NonFiniteWeights`): the last finite snapshot stays.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Optional

import numpy as np

from reid_keras.io_utils import atomic_write

GROUP = "reid_keras_resume"


class NonFiniteWeights(ValueError):
    """A model with NaN or inf weights was about to be saved."""


def non_finite_variables(model) -> list:
    """Paths of `model`'s weights holding NaN or inf (empty when all are finite)."""
    return [v.path for v in model.weights if not np.all(np.isfinite(np.asarray(v)))]


def check_finite(model, what: str) -> None:
    """Raise `NonFiniteWeights` naming `what` (e.g. the file about to be written) and the first bad weights."""
    bad = non_finite_variables(model)
    if bad:
        raise NonFiniteWeights(f"{what}: {len(bad)} weight tensor(s) of the model hold NaN or inf (e.g. "
                               f"{', '.join(bad[:3])}); the model diverged")


def seed_states(model) -> list:
    """The state variables of the seed generators of `model` (its `variables` that are not weights)."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights]


@dataclasses.dataclass(frozen=True)
class PhaseCheckpoints:
    """Where work before the training epochs (an identity warm-up) keeps its snapshot, and how often
    (every `every_steps` steps and / or `every_minutes` minutes; None: never) it writes it."""

    path: str
    every_steps: Optional[int] = None
    every_minutes: Optional[float] = None


@dataclasses.dataclass
class Snapshot:
    """What `load_snapshot` restored: the position, and the metric accumulators to add back once the
    metrics exist again (`add_metric_state`). `exact` is False for a state written by an older
    reid_keras (weights and optimizer only)."""

    position: dict
    metrics: list
    exact: bool = True


def save_snapshot(model, path: str, position: dict) -> str:
    """Write `model`'s snapshot at `position` to `path` atomically; refuses non-finite weights."""
    import h5py

    check_finite(model, f"not writing {os.path.basename(path)}")

    def write(tmp):
        model.save_weights(tmp, overwrite=True)
        with h5py.File(tmp, "a") as handle:
            group = handle.create_group(GROUP)
            group.attrs["position"] = json.dumps(position)
            group.attrs["python_random"] = json.dumps(random.getstate())
            kind, keys, pos, has_gauss, gauss = np.random.get_state()
            group.attrs["numpy_random"] = json.dumps([kind, int(pos), int(has_gauss), float(gauss)])
            group.create_dataset("numpy_random_keys", data=keys)
            for name, variables in (("seeds", seed_states(model)), ("metrics", model.metrics_variables)):
                sub = group.create_group(name)
                for i, v in enumerate(variables):
                    sub.create_dataset(str(i), data=np.asarray(v))

    return atomic_write(path, write)


def read_position(path: str):
    """The position stored in the snapshot at `path` (None for an older state file without one)."""
    import h5py

    with h5py.File(path, "r") as handle:
        if GROUP not in handle:
            return None
        return json.loads(handle[GROUP].attrs["position"])


def load_snapshot(model, path: str) -> Snapshot:
    """Restore weights, optimizer, seed generators and global random states from `path` into `model`.

    Raises:
        ValueError: the snapshot was written by a model of another structure.
    """
    import h5py

    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(path)
    with h5py.File(path, "r") as handle:
        if GROUP not in handle:
            return Snapshot(position={}, metrics=[], exact=False)
        group = handle[GROUP]
        seeds = [group["seeds"][str(i)][()] for i in range(len(group["seeds"]))]
        metrics = [group["metrics"][str(i)][()] for i in range(len(group["metrics"]))]
        position = json.loads(group.attrs["position"])
        state = json.loads(group.attrs["python_random"])
        kind, pos, has_gauss, gauss = json.loads(group.attrs["numpy_random"])
        keys = group["numpy_random_keys"][()]
    variables = seed_states(model)
    if len(variables) != len(seeds) or any(v.shape != s.shape for v, s in zip(variables, seeds)):
        raise ValueError(f"{path}: its {len(seeds)} random seed states do not fit this model's {len(variables)}: "
                         "the snapshot is of another model")
    for variable, value in zip(variables, seeds):
        variable.assign(value)
    random.setstate((state[0], tuple(state[1]), state[2]))
    np.random.set_state((kind, keys, pos, has_gauss, gauss))
    return Snapshot(position=position, metrics=metrics)


def add_metric_state(model, saved: list) -> None:
    """Add the accumulators of a mid-epoch snapshot to `model`'s metric variables.

    Keras resets the metrics when an epoch begins and creates the compiled ones at the first step, so
    a resumed epoch adds the saved sums after its first step: every metric here (means, accuracies,
    OIM's hits / labeled) accumulates sums, and `saved + first step` is, bit for bit, the uninterrupted
    run's `sums so far + first step`.
    """
    variables = model.metrics_variables
    if len(variables) != len(saved) or any(tuple(v.shape) != s.shape for v, s in zip(variables, saved)):
        raise ValueError(f"the snapshot holds {len(saved)} metric accumulators, the model {len(variables)}: the "
                         "model was compiled with other metrics")
    for variable, value in zip(variables, saved):
        current = np.asarray(variable)
        variable.assign((np.asarray(value, dtype=current.dtype) + current).astype(current.dtype))
