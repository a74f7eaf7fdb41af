"""The one optimizer and learning-rate-schedule factory every model family trains with.

`make_optimizer` builds Adam, SGD (momentum, optionally Nesterov: Open-ReID's recipe) or RMSprop,
with decoupled weight decay and gradient accumulation (`accumulate_steps` batches averaged into one
update, Keras' `gradient_accumulation_steps`). `learning_rate_schedule` turns a recipe's
`lr_schedule` into a Keras schedule whose steps are *updates*: Keras feeds a schedule the count
of accumulated batches, so with accumulation the schedule is wrapped to count updates.
"""
from __future__ import annotations

from typing import Optional

import keras
from keras import ops

OPTIMIZERS = ("adam", "sgd", "rmsprop")
SCHEDULES = ("step", "delayed_exponential", "epoch_step")


def micro_batch_size(global_batch: int, accumulate_steps: int) -> int:
    """Items per fed batch when each update accumulates `accumulate_steps` batches of `global_batch`."""
    accumulate_steps = int(accumulate_steps or 1)
    if accumulate_steps < 1 or global_batch % accumulate_steps:
        raise ValueError(f"--accumulate-steps {accumulate_steps} must be >= 1 and divide --batch-size "
                         f"{global_batch}")
    return global_batch // accumulate_steps


def split_batches(dataset, global_batch: int, accumulate_steps: int):
    """The batches of `dataset` cut into `accumulate_steps` consecutive micro-batches each (same items,
    same order): one update then still sees the whole batch, with about 1/N of the activations."""
    micro = micro_batch_size(global_batch, accumulate_steps)
    return dataset if micro == global_batch else dataset.unbatch().batch(micro, drop_remainder=True)


def make_optimizer(name: str = "adam", learning_rate=1e-3, momentum: float = 0.0, nesterov: bool = False,
                   weight_decay: Optional[float] = None, accumulate_steps: int = 1) -> keras.optimizers.Optimizer:
    """A Keras optimizer by name.

    Args:
        name: "adam", "sgd" or "rmsprop".
        learning_rate: a float or a `keras.optimizers.schedules.LearningRateSchedule`.
        momentum, nesterov: SGD's (ignored by Adam and RMSprop, whose own defaults are kept).
        weight_decay: decoupled weight decay (None or 0: none).
        accumulate_steps: batches whose gradients are averaged into one update (1: every batch).

    Example:
        >>> opt = make_optimizer("sgd", 0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    """
    accumulate_steps = int(accumulate_steps)
    if accumulate_steps < 1:
        raise ValueError(f"accumulate_steps must be >= 1, got {accumulate_steps}")
    common = {"learning_rate": learning_rate, "weight_decay": float(weight_decay) if weight_decay else None,
              "gradient_accumulation_steps": accumulate_steps if accumulate_steps > 1 else None}
    if name == "adam":
        return keras.optimizers.Adam(**common)
    if name == "sgd":
        return keras.optimizers.SGD(momentum=float(momentum), nesterov=bool(nesterov), **common)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(**common)
    raise ValueError(f"unknown optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")


def learning_rate_schedule(value: float, schedule: Optional[dict] = None, steps_per_epoch: Optional[int] = None,
                           accumulate_steps: int = 1):
    """`value`, or the schedule a recipe's `lr_schedule` dict describes, in optimizer updates:

    - {"type": "step", "boundaries": [...], "factor": 0.1}: x factor at each boundary (Open-ReID);
    - {"type": "delayed_exponential", "decay_start": ..., "decay_end": ..., "final_factor": 0.001}
      (Hermans et al. 2017);
    - {"type": "epoch_step", "decay_epoch": E, "factor": 0.1}: x factor from epoch E on (idver paper
      §III-F: 0.001, then 0.0001 for the final 5 epochs); needs `steps_per_epoch` (updates).
    """
    if not schedule:
        return float(value)
    kind = schedule.get("type")
    if kind == "step":
        boundaries = [int(b) for b in schedule["boundaries"]]
        factor = float(schedule.get("factor", 0.1))
        rate = keras.optimizers.schedules.PiecewiseConstantDecay(
            boundaries, [float(value) * factor ** i for i in range(len(boundaries) + 1)])
    elif kind == "delayed_exponential":
        rate = DelayedExponentialDecay(float(value), schedule["decay_start"], schedule["decay_end"],
                                       schedule.get("final_factor", 0.001))
    elif kind == "epoch_step":
        rate = StepDecayByEpoch(float(value), float(value) * float(schedule.get("factor", 0.1)),
                                decay_epoch=int(schedule["decay_epoch"]), steps_per_epoch=steps_per_epoch)
    else:
        raise ValueError(f"lr_schedule {schedule!r}: type must be one of {', '.join(SCHEDULES)}")
    return rate if int(accumulate_steps) == 1 else PerUpdate(rate, int(accumulate_steps))


@keras.saving.register_keras_serializable(package="reid_keras")
class DelayedExponentialDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Constant learning rate until `decay_start`, then exponential decay reaching
    `initial_learning_rate * final_factor` at `decay_end` (Hermans et al. 2017: 3e-4, decay
    from iteration 15,000 to 0.001x at 25,000). Steps are optimizer updates."""

    def __init__(self, initial_learning_rate: float, decay_start: int, decay_end: int, final_factor: float = 0.001):
        if not 0 <= int(decay_start) < int(decay_end):
            raise ValueError(f"DelayedExponentialDecay: need 0 <= decay_start < decay_end, got {decay_start}, "
                             f"{decay_end}")
        if not 0 < float(final_factor) <= 1:
            raise ValueError(f"DelayedExponentialDecay: final_factor must be in (0, 1], got {final_factor!r}")
        self.initial_learning_rate = float(initial_learning_rate)
        self.decay_start, self.decay_end = int(decay_start), int(decay_end)
        self.final_factor = float(final_factor)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        progress = ops.clip((step - self.decay_start) / (self.decay_end - self.decay_start), 0.0, 1.0)
        return self.initial_learning_rate * ops.power(self.final_factor, progress)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "decay_start": self.decay_start,
                "decay_end": self.decay_end, "final_factor": self.final_factor}


@keras.saving.register_keras_serializable(package="reid_keras")
class StepDecayByEpoch(keras.optimizers.schedules.LearningRateSchedule):
    """`learning_rate` until epoch `decay_epoch`, then `final_learning_rate` (idver paper §III-F: 0.001,
    then 0.0001 for the final 5 epochs).

    The optimizer counts steps, so the schedule needs `steps_per_epoch`; the trainer sets it once
    the input stream is known, before `fit` traces the train step. The epoch is derived from the
    optimizer's step counter, so a resumed run (whose optimizer state is restored) continues on the
    right side of the boundary.
    """

    def __init__(self, learning_rate: float, final_learning_rate: float, decay_epoch: int,
                 steps_per_epoch: Optional[int] = None):
        self.learning_rate = float(learning_rate)
        self.final_learning_rate = float(final_learning_rate)
        self.decay_epoch = int(decay_epoch)
        self.steps_per_epoch = None if steps_per_epoch is None else int(steps_per_epoch)

    def __call__(self, step):
        if not self.steps_per_epoch:
            raise ValueError("StepDecayByEpoch.steps_per_epoch is not set: set it to the batches per epoch "
                             "before training")
        epoch = ops.floor_divide(ops.cast(step, "int64"), self.steps_per_epoch)
        return ops.where(epoch >= self.decay_epoch, self.final_learning_rate, self.learning_rate)

    def get_config(self):
        return {"learning_rate": self.learning_rate, "final_learning_rate": self.final_learning_rate,
                "decay_epoch": self.decay_epoch, "steps_per_epoch": self.steps_per_epoch}


@keras.saving.register_keras_serializable(package="reid_keras")
class PerUpdate(keras.optimizers.schedules.LearningRateSchedule):
    """`schedule` counted in updates when each update accumulates `accumulate_steps` batches: Keras calls a
    schedule with the number of batches seen, so a boundary at update u would otherwise come at u / N."""

    def __init__(self, schedule, accumulate_steps: int):
        self.schedule = keras.optimizers.schedules.deserialize(schedule) if isinstance(schedule, dict) else schedule
        self.accumulate_steps = int(accumulate_steps)

    def __call__(self, step):
        return self.schedule(ops.floor_divide(ops.cast(step, "int64"), self.accumulate_steps))

    def get_config(self):
        return {"schedule": keras.optimizers.schedules.serialize(self.schedule),
                "accumulate_steps": self.accumulate_steps}
