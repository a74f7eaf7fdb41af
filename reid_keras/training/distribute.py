"""Choosing the `tf.distribute` strategy for a run.

`MirroredStrategy` over all visible GPUs when there is more than one; otherwise the default
strategy. Tests (and curious users) can ask for mirroring over logical CPU devices with
`devices=["/cpu:0", "/cpu:1"]`. Keras' `fit` divides the global batch across replicas and
averages losses over the global batch, so the loss of a mirrored step equals the single-device
loss on the same global batch.
"""
from __future__ import annotations

import tensorflow as tf


def choose_strategy(devices=None) -> tf.distribute.Strategy:
    """Return the strategy for `devices` (None = every visible GPU, mirrored if > 1)."""
    if devices:
        known = {d.name.lower().replace("/device:", "/") for d in tf.config.list_logical_devices()}
        for device in devices:
            short = device.lower().replace("/device:", "/")
            if not any(k.endswith(short.lstrip("/")) for k in known):
                raise ValueError(f"--devices: unknown device {device!r}; visible: {sorted(known)}")
        return mirrored_strategy(list(devices)) if len(devices) > 1 else tf.distribute.OneDeviceStrategy(devices[0])
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return mirrored_strategy()
    return tf.distribute.get_strategy()


def mirrored_strategy(devices=None) -> tf.distribute.MirroredStrategy:
    """A MirroredStrategy whose collective keys differ from every earlier one in this process.

    Each MirroredStrategy numbers its collective groups from the same start, and TF's collective
    executor caches ops per (group, instance) key for the whole process: a second strategy in one
    process (a notebook training twice, a test session) then meets the first one's cached op and
    aborts ("Collective instance 100 expected type 2 ... but got type 0"). TF's own tests move the
    class's key base per strategy (tensorflow/python/distribute/strategy_combinations.py); so do we.
    """
    tf.distribute.MirroredStrategy._collective_key_base += 100000  # private, see the docstring
    return tf.distribute.MirroredStrategy(devices=devices)


def describe(strategy: tf.distribute.Strategy) -> dict:
    """What went into config.json about the strategy."""
    return {"strategy": type(strategy).__name__, "replicas": int(strategy.num_replicas_in_sync)}


def synchronize_batch_norm(model) -> int:
    """Make every BatchNormalization layer of `model` (nested models included) compute its batch
    statistics over the global batch instead of each replica's slice; returns how many it changed.

    With N replicas each GPU sees 1/N of the batch; unsynchronised statistics then differ from a
    single-device run (and get noisy for re-ID's small per-GPU batches). Keras reads the flag at
    call time and stores it in the layer config, so it survives `.keras` round trips.
    """
    import keras

    def walk(layer):
        for sub in getattr(layer, "layers", []):
            yield sub
            yield from walk(sub)

    changed = 0
    for layer in walk(model):
        if isinstance(layer, keras.layers.BatchNormalization) and not layer.synchronized:
            layer.synchronized = True
            changed += 1
    return changed
