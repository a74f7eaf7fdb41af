"""The body of a training run: data, strategy, model, fit with resumable callbacks, evaluation, export.

Model families plug in through a task object (`reid_keras.training.tasks`) that knows how to
build and compile its model, feed it, and evaluate it; everything else is shared.
"""
from __future__ import annotations

import os
import time

import keras

from reid_keras.io_utils import atomic_save_keras
from reid_keras.training import callbacks as cbs
from reid_keras.training.distribute import choose_strategy, describe, synchronize_batch_norm
from reid_keras.training.run_folder import prepare_run_folder, update_config
from reid_keras.training.warmup import identity_warmup, needs_warmup

SYNTHETIC_LAYOUT = "market1501"
SYNTHETIC_IDS = 300


def load_training_data(config: dict):
    """The `ReidDataset` a config names; `synthetic` is written under data/ once and reused."""
    from reid_keras.data.datasets import load_dataset

    name, root = config["dataset"], config.get("data_root")
    if name == "synthetic":
        from reid_keras.data.datasets.synthetic import ensure_synthetic

        root = ensure_synthetic(root or "data", layout=SYNTHETIC_LAYOUT,
                                num_ids=config.get("synthetic_ids", SYNTHETIC_IDS), seed=0)
        return load_dataset(SYNTHETIC_LAYOUT, root, strict=False)
    if not root:
        raise ValueError(f"--data-root is required for --dataset {name}: the folder where {name} is unpacked "
                         "(see data/README.md)")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data-root {root} does not exist (dataset {name}); see data/README.md")
    return load_dataset(name, root, **config.get("dataset_options", {}))


def run_training(config: dict, name: str | None, export: bool = True, plots: bool = True,
                 extra_callbacks=()) -> str:
    """Train, evaluate and export as `config` says; returns the run folder."""
    from reid_keras.training.tasks import FINAL_MODEL, make_task

    task = make_task(config)          # fails fast on a bad preset before any data is written
    run_dir = prepare_run_folder(config["output"], name, config, resume=config["resume"])
    print(f"run folder: {run_dir}", flush=True)
    keras.utils.set_random_seed(config["seed"])
    if config.get("mixed_precision"):
        keras.mixed_precision.set_global_policy("mixed_float16")

    dataset = load_training_data(config)
    print(dataset.summary(), flush=True)
    devices = config["devices"].split(",") if config.get("devices") else None
    strategy = choose_strategy(devices)
    with strategy.scope():
        model, weights_info = task.build(num_train_ids=dataset.num_train_ids)
        if strategy.num_replicas_in_sync > 1:
            synced = synchronize_batch_norm(model)
            print(f"{strategy.num_replicas_in_sync} replicas: {synced} BatchNormalization layers synchronised",
                  flush=True)
    update_config(run_dir, runtime_weights=weights_info, runtime_distribution=describe(strategy),
                  runtime_dataset={split: {"ids": i, "images": n, "cameras": c}
                                   for split, i, n, c in dataset.split_stats()},
                  runtime_dataset_info=dataset.info, runtime_skipped=dataset.skipped.counts)

    restored = config["resume"] and os.path.exists(cbs.TrainingStateBackup(run_dir).state_path)
    initial_epoch = cbs.TrainingStateBackup.load_state(run_dir, model) if restored else 0
    epochs = config["epochs"]
    if initial_epoch:
        print(f"resuming after epoch {initial_epoch} of {epochs}", flush=True)
    warmup_steps = needs_warmup(config, weights_info)
    if warmup_steps and not restored:
        summary = identity_warmup(model, dataset.train, dataset.num_train_ids, config, warmup_steps, strategy,
                                  verbose=cbs.fit_verbosity())
        update_config(run_dir, runtime_id_warmup=summary)
    if initial_epoch < epochs:
        train_data, steps = task.train_dataset(dataset.train, initial_epoch=initial_epoch, epochs=epochs,
                                               global_batch=config["batch_size"])
        callbacks = [
            cbs.AtomicCheckpoint(run_dir, monitor="loss"),
            cbs.TrainingStateBackup(run_dir, every_batches=config.get("backup_every_batches")),
            keras.callbacks.CSVLogger(os.path.join(run_dir, "history.csv"), append=initial_epoch > 0),
            keras.callbacks.TensorBoard(os.path.join(run_dir, "tensorboard"), write_graph=False),
            keras.callbacks.TerminateOnNaN(),
            *extra_callbacks,
        ]
        started = time.time()
        model.fit(train_data, epochs=epochs, initial_epoch=initial_epoch, steps_per_epoch=steps,
                  callbacks=callbacks, verbose=cbs.fit_verbosity(), shuffle=False)  # the stream shuffles
        update_config(run_dir, runtime_train_seconds=round(time.time() - started, 1))
        if model.stop_training:
            raise ValueError(f"training stopped early (NaN loss?); see {run_dir}/history.csv")

    final = os.path.join(run_dir, FINAL_MODEL)
    if not os.path.exists(final):  # --epochs 0: evaluate and export the model as built (or warmed up)
        atomic_save_keras(model, final)
    metrics = task.evaluate(model, dataset, run_dir, plots=plots)
    cbs.write_json_atomic(os.path.join(run_dir, "metrics.json"), metrics)
    print(task.format_metrics(metrics), flush=True)
    if export:
        task.export(model, os.path.join(run_dir, "export"))
        print(f"exported SavedModel to {os.path.join(run_dir, 'export')}", flush=True)
    return run_dir
