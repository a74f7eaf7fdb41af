"""The body of a training run: data, strategy, model, fit with resumable callbacks, evaluation, export.

Model families plug in through their task (`config.task()`, see `families/base.py:Task`), which knows
how to build and compile its model, feed it, evaluate and export it; everything else is shared.
"""
from __future__ import annotations

import os
import time

import keras

from reid_keras.io_utils import atomic_save_keras, write_json
from reid_keras.training import callbacks as cbs
from reid_keras.training.distribute import choose_strategy, describe, synchronize_batch_norm
from reid_keras.training.optimizers import split_batches
from reid_keras.training.run_folder import FINAL_MODEL, prepare_run_folder, update_config


def load_training_data(config):
    """The `ReidDataset` a run config names (`synthetic` is written under data/ once and reused)."""
    from reid_keras.data.datasets import load_dataset

    return load_dataset(config.dataset, config.data_root, **config.dataset_options)


def run_training(config, name: str | None = None, export: bool = True, plots: bool = True,
                 extra_callbacks=()) -> str:
    """Train, evaluate and export as `config` (a `families.config.RunConfig`) says; returns the run folder."""
    task = config.task()
    run_dir = prepare_run_folder(config, name)
    print(f"run folder: {run_dir}", flush=True)
    keras.utils.set_random_seed(config.seed)
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")

    dataset = load_training_data(config)
    print(dataset.summary(), flush=True)
    strategy = choose_strategy(config.devices.split(",") if config.devices else None)
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

    restored = config.resume and os.path.exists(cbs.TrainingStateBackup(run_dir).state_path)
    initial_epoch = cbs.TrainingStateBackup.load_state(run_dir, model) if restored else 0
    epochs = config.recipe.epochs
    if initial_epoch:
        print(f"resuming after epoch {initial_epoch} of {epochs}", flush=True)
    if not restored:
        facts = task.prepare(model, dataset, weights_info, strategy, verbose=cbs.fit_verbosity())
        if facts:
            update_config(run_dir, **facts)
    if initial_epoch < epochs:
        batch, accumulate = config.recipe.batch_size, config.recipe.accumulate_steps
        train_data, steps = task.train_dataset(dataset.train, initial_epoch=initial_epoch, epochs=epochs,
                                               global_batch=batch)
        callbacks = [
            cbs.AtomicCheckpoint(run_dir, monitor="loss"),
            cbs.TrainingStateBackup(run_dir),
            keras.callbacks.CSVLogger(os.path.join(run_dir, "history.csv"), append=initial_epoch > 0),
            keras.callbacks.TensorBoard(os.path.join(run_dir, "tensorboard"), write_graph=False),
            keras.callbacks.TerminateOnNaN(),
            *extra_callbacks,
        ]
        started = time.time()
        # With gradient accumulation the stream carries micro-batches; one update still sees `batch` items.
        model.fit(split_batches(train_data, batch, accumulate), epochs=epochs, initial_epoch=initial_epoch,
                  steps_per_epoch=steps * accumulate, callbacks=callbacks, verbose=cbs.fit_verbosity(),
                  shuffle=False)  # the stream shuffles
        update_config(run_dir, runtime_train_seconds=round(time.time() - started, 1))
        if model.stop_training:
            raise ValueError(f"training stopped early (NaN loss?); see {run_dir}/history.csv")

    final = os.path.join(run_dir, FINAL_MODEL)
    if not os.path.exists(final):  # --epochs 0: evaluate and export the model as built (or warmed up)
        atomic_save_keras(model, final)
    metrics = task.evaluate(model, dataset, run_dir, plots=plots)
    write_json(os.path.join(run_dir, "metrics.json"), metrics)
    print(task.format_metrics(metrics), flush=True)
    if export:
        task.export(model, os.path.join(run_dir, "export"))
        print(f"exported SavedModel to {os.path.join(run_dir, 'export')}", flush=True)
    return run_dir
