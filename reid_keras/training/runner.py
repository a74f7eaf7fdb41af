"""The body of a training run: data, strategy, model, fit with resumable callbacks, evaluation, export.

Model families plug in through their task (`config.task()`, see `families/base.py:Task`), which knows
how to build and compile its model, feed it, evaluate and export it; everything else is shared.

A run can be killed at any moment and resumed exactly: the warm-up and the epochs snapshot their
state (`snapshot.py`) at epoch ends and every few minutes or steps; a resumed run restores it and
feeds the rest of the interrupted epoch on its own (`fit` on a stream that starts at the saved step),
then the remaining epochs, so its per-epoch losses are those of the uninterrupted run. A diverged
run stops, keeps its last finite checkpoint, and is neither evaluated nor exported.
"""
from __future__ import annotations

import json
import os
import time

import keras

from reid_keras.io_utils import atomic_save_keras, write_json
from reid_keras.training import callbacks as cbs
from reid_keras.training.distribute import choose_strategy, describe, synchronize_batch_norm
from reid_keras.training.optimizers import split_batches
from reid_keras.training.run_folder import (FINAL_MODEL, WARMUP_STATE, holds_work, locate_run_folder,
                                            open_run_folder, remove_stale_temporaries, update_config)
from reid_keras.training.snapshot import PhaseCheckpoints, check_finite


def load_training_data(config):
    """The `ReidDataset` a run config names (`synthetic` is written under data/ once and reused), without
    its damaged images: every file is decoded once (verdicts cached, data/decoding.py) and the ones
    that fail, or decode with a libjpeg "corrupt data" warning, are dropped and counted in its
    `skipped` report, so one bad query image cannot throw a finished run away."""
    from reid_keras.data.datasets import load_dataset
    from reid_keras.data.decoding import drop_damaged

    dataset = load_dataset(config.dataset, config.data_root, **config.dataset_options)
    config.family.check_dataset(dataset, config.model)  # before the decode check reads every image
    dataset, _ = drop_damaged(dataset)
    return dataset


def _split_summary(dataset) -> dict:
    """config.json's per-split counts: ids / images / cameras (crops) or ids / scenes / boxes /
    unlabeled boxes (person-search scenes)."""
    keys = ("ids", "scenes", "boxes", "unlabeled") if dataset.kind == "scenes" else ("ids", "images", "cameras")
    return {row[0]: dict(zip(keys, row[1:])) for row in dataset.split_stats()}


def run_training(config, name: str | None = None, export: bool = True, plots: bool = True,
                 extra_callbacks=()) -> str:
    """Train, evaluate and export as `config` (a `families.config.RunConfig`) says; returns the run folder.

    Raises:
        ValueError: a configuration the run folder refuses, or a run that diverged (non-finite or
            exploding loss, non-finite weights): nothing is evaluated or exported then.
    """
    task = config.task()
    folder = locate_run_folder(config, name)  # configuration checks come before any work
    keras.utils.set_random_seed(config.seed)
    if config.mixed_precision:
        keras.mixed_precision.set_global_policy("mixed_float16")

    dataset = load_training_data(config)  # a bad data root fails here, before any run folder exists
    leftover = not config.resume and os.path.exists(os.path.join(folder, "config.json")) and not holds_work(folder)
    run_dir = open_run_folder(config, folder)
    print(f"run folder: {run_dir}" + (" (it held only the config.json of a start that failed: reused)"
                                      if leftover else ""), flush=True)
    if config.resume:
        stale = remove_stale_temporaries(run_dir)
        if stale:
            print(f"removed {len(stale)} temporary file(s) left by an interrupted write: {', '.join(stale[:5])}",
                  flush=True)
    print(dataset.summary(), flush=True)
    strategy = choose_strategy(config.devices.split(",") if config.devices else None)
    with strategy.scope():
        model, weights_info = task.build(num_train_ids=dataset.num_train_ids)
        if strategy.num_replicas_in_sync > 1:
            synced = synchronize_batch_norm(model)
            print(f"{strategy.num_replicas_in_sync} replicas: {synced} BatchNormalization layers synchronised",
                  flush=True)
    update_config(run_dir, runtime_weights=weights_info, runtime_distribution=describe(strategy),
                  runtime_dataset=_split_summary(dataset),
                  runtime_dataset_info=dataset.info, runtime_skipped=dataset.skipped.as_dict())

    epoch, step, snapshot = _restore_or_prepare(config, task, model, dataset, weights_info, strategy, run_dir)
    if epoch < config.recipe.epochs:
        _train(config, task, model, dataset, run_dir, epoch, step, snapshot, extra_callbacks)

    check_finite(model, f"{run_dir}: the trained model is not evaluated or exported")
    final = os.path.join(run_dir, FINAL_MODEL)
    if not os.path.exists(final):  # --epochs 0: evaluate and export the model as built (or warmed up)
        atomic_save_keras(model, final)
    metrics = dict(task.evaluate(model, dataset, run_dir, plots=plots), skipped=dataset.skipped.as_dict())
    write_json(os.path.join(run_dir, "metrics.json"), metrics)
    print(task.format_metrics(metrics), flush=True)
    if export:
        task.export(model, os.path.join(run_dir, "export"))
        print(f"exported SavedModel to {os.path.join(run_dir, 'export')}", flush=True)
    return run_dir


def _restore_or_prepare(config, task, model, dataset, weights_info, strategy, run_dir):
    """(epoch, step, snapshot) to train from: the saved training state of a resumed run, else the task's
    preparation (identity warm-up, itself resumable), after which the state is saved at (0, 0) so that a
    finished warm-up is never repeated."""
    recipe = config.recipe
    backup = cbs.TrainingStateBackup(run_dir)
    warmup_state = os.path.join(run_dir, WARMUP_STATE)
    if config.resume and os.path.exists(backup.weights_path):
        with strategy.scope():
            snapshot = cbs.TrainingStateBackup.load(run_dir, model)
        if os.path.exists(warmup_state):
            os.remove(warmup_state)  # the warm-up finished before this state was written
        epoch, step = int(snapshot.position["epoch"]), int(snapshot.position["step"])
        where = f"after epoch {epoch} of {recipe.epochs}" + (f", at step {step}" if step else "")
        note = "" if snapshot.exact else " (a state file of an older reid_keras: weights and optimizer only)"
        print(f"resuming {where}{note}", flush=True)
        return epoch, step, snapshot
    checkpoints = PhaseCheckpoints(warmup_state, recipe.checkpoint_every_steps, recipe.checkpoint_every_minutes)
    facts = task.prepare(model, dataset, weights_info, strategy, verbose=cbs.fit_verbosity(), checkpoints=checkpoints)
    if facts:
        update_config(run_dir, **facts)
        with strategy.scope():
            if model.optimizer is not None and not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
        backup.set_model(model)
        backup.save(completed_epochs=0, batch=0)
    if os.path.exists(warmup_state):
        os.remove(warmup_state)
    return 0, 0, None


def _train(config, task, model, dataset, run_dir, epoch, step, snapshot, extra_callbacks) -> None:
    """`fit` from (epoch, step) to the recipe's last epoch: the rest of an interrupted epoch on its own, then
    the remaining epochs. Raises ValueError when the run diverged."""
    recipe = config.recipe
    batch, accumulate, epochs = recipe.batch_size, recipe.accumulate_steps, recipe.epochs
    guard = cbs.DivergenceGuard(cause=f"learning_rate={recipe.learning_rate:g}")
    backup = cbs.TrainingStateBackup(run_dir, every_steps=recipe.checkpoint_every_steps,
                                     every_minutes=recipe.checkpoint_every_minutes, guard=guard,
                                     accumulate_steps=accumulate)
    history = cbs.EpochHistory(os.path.join(run_dir, "history.csv"), guard)
    history.keep_before(epoch)  # rows a kill left after the saved state are written again
    callbacks = [guard, backup, cbs.AtomicCheckpoint(run_dir, monitor="loss", guard=guard), history,
                 keras.callbacks.TensorBoard(os.path.join(run_dir, "tensorboard"), write_graph=False),
                 *extra_callbacks]
    parts = [(epoch, step, epoch + 1), (epoch + 1, 0, epochs)] if step else [(epoch, 0, epochs)]
    started = time.time()
    for first, skip, end in parts:
        if first >= end or guard.tripped:
            continue
        data, steps = task.train_dataset(dataset.train, initial_epoch=first, epochs=end, global_batch=batch,
                                         initial_step=skip)
        backup.begin_part(skip, snapshot)
        # With gradient accumulation the stream carries micro-batches; one update still sees `batch` items.
        model.fit(split_batches(data, batch, accumulate), epochs=end, initial_epoch=first,
                  steps_per_epoch=(steps - skip) * accumulate, callbacks=callbacks, verbose=cbs.fit_verbosity(),
                  shuffle=False)  # the stream shuffles
    update_config(run_dir, runtime_train_seconds=round(time.time() - started, 1))
    if guard.tripped:
        raise ValueError(f"{guard.message()}. Nothing was evaluated or exported; {run_dir} keeps the last "
                         f"finite checkpoint ({_saved_position(run_dir)})")
    if model.stop_training:
        raise ValueError(f"training stopped early; see {run_dir}/history.csv")


def _saved_position(run_dir: str) -> str:
    path = os.path.join(run_dir, cbs.STATE_JSON)
    if not os.path.exists(path):
        return "none: it diverged before its first checkpoint"
    with open(path, encoding="utf-8") as handle:
        state = json.load(handle)
    return f"state after epoch {state['completed_epochs']}" + (f", step {state['batch']}" if state["batch"] else "")
