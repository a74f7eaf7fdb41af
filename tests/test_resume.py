"""Resume from any moment, exactly; run folders; no diverged model leaves a run.

The end-to-end chain trains the main job's model (siamese_b0 with an identity warm-up, tiny images,
12 synthetic ids) once without interruption, then again killed three times: during the warm-up, in the
middle of an epoch, and (a real SIGKILL of a subprocess) while a checkpoint is being written. Each
part resumes the previous one; the per-epoch losses and metrics must equal the uninterrupted run's
exactly (same data, augmentation seeds, dropout masks, optimizer state and metric sums).
"""
import csv
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from reid_keras.data.datasets.base import ImageRecord
from reid_keras.data.pipelines import pair_dataset, pk_dataset, position_seeds, random_batch_dataset
from reid_keras.data.samplers import PairRatioSchedule, ShuffledBatchSampler
from reid_keras.families import load_model
from reid_keras.families.config import resolve_config
from reid_keras.training import callbacks as cbs
from reid_keras.training.run_folder import (latest_resumable_run, locate_run_folder, prepare_run_folder,
                                            remove_stale_temporaries)
from reid_keras.training.runner import run_training
from reid_keras.training.snapshot import NonFiniteWeights, load_snapshot, read_position, save_snapshot

SIZE = (16, 8)


class Crash(Exception):
    """Stands in for a kill: raised from a callback, nothing after it runs."""


# -- streams: a resumed stream is the uninterrupted stream from that step on --------------------------

@pytest.fixture(scope="module")
def textured(tmp_path_factory):
    """12 noise images of 4 ids on 2 cameras (augmentations of noise are visible, unlike flat colours)."""
    root = tmp_path_factory.mktemp("textured")
    rng = np.random.default_rng(0)
    records = []
    for i in range(12):
        path = str(root / f"{i}.png")
        Image.fromarray(rng.integers(0, 256, (20, 10, 3), dtype=np.uint8)).save(path)
        records.append(ImageRecord(path, i // 3, i % 2))
    return records


def _batches(ds, n):
    return [tuple(np.asarray(t) for t in tf.nest.flatten(b)) for b in ds.take(n)]


def _assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        for x, y in zip(g, e):
            np.testing.assert_array_equal(x, y)


def test_streams_resumed_at_any_step_equal_the_uninterrupted_stream(textured):
    from reid_keras.data.augment import AugmentConfig

    augment = AugmentConfig(flip=True, zoom=0.2, width_shift=0.2)
    schedule = PairRatioSchedule(start=1.0, factor=2.0, maximum=4.0)

    def pairs(**kw):
        return pair_dataset(textured, SIZE, 2, pairs_per_epoch=8, schedule=schedule, preprocess="none",
                            augment=augment, seed=5, epochs=3, **kw)

    whole = _batches(pairs(), 12)  # 3 epochs x 4 steps
    _assert_same_batches(_batches(pairs(initial_epoch=1, initial_step=3), 5), whole[7:12])
    _assert_same_batches(_batches(pairs(initial_epoch=2), 4), whole[8:12])
    assert not np.array_equal(whole[0][0], whole[4][0]), "another epoch draws other pairs or augmentations"

    def pk(**kw):
        return pk_dataset(textured, 2, 2, SIZE, preprocess="none", augment=augment, seed=1, epochs=2,
                          batches_per_epoch=3, **kw)

    _assert_same_batches(_batches(pk(initial_epoch=1, initial_step=2), 1), _batches(pk(), 6)[5:6])

    def shuffled(**kw):
        return random_batch_dataset(textured, 5, SIZE, preprocess="none", augment=augment, seed=2, epochs=3,
                                    batches_per_epoch=3, **kw)

    _assert_same_batches(_batches(shuffled(initial_epoch=2, initial_step=1), 2), _batches(shuffled(), 9)[7:9])
    with pytest.raises(ValueError, match="need 0 <= initial_step < steps per epoch, got initial_step=4, steps=4"):
        pairs(initial_step=4)


def test_position_seeds_and_shuffled_batches():
    np.testing.assert_array_equal(position_seeds(7, 2, [0, 5]), [[7, 2 * 2 ** 32], [7, 2 * 2 ** 32 + 5]])
    sampler = ShuffledBatchSampler(10, 3)  # 3 batches per pass, one record left out of each pass
    rows = np.concatenate([sampler.epoch(e, 2, seed=4) for e in range(3)])  # 6 batches = 2 passes
    for p in range(2):
        taken = rows[3 * p:3 * p + 3].ravel()
        assert len(set(taken)) == 9 and set(taken) <= set(range(10))
        np.testing.assert_array_equal(taken, np.random.default_rng([4, p]).permutation(10)[:9])
    np.testing.assert_array_equal(sampler.epoch(1, 2, seed=4), rows[2:4])  # epoch 1 alone, same batches
    with pytest.raises(ValueError, match="3 records are less than one batch of 4"):
        ShuffledBatchSampler(3, 4)


# -- snapshots, guard, checkpoints on tiny models ------------------------------------------------------

def _tiny_model(seed=0):
    keras.utils.set_random_seed(seed)
    image = keras.Input((4,))
    x = keras.layers.Dropout(0.5, name="drop")(keras.layers.Dense(6, name="hidden")(image))
    model = keras.Model(image, keras.layers.Dense(2, activation="softmax", name="out")(x))
    model.compile(keras.optimizers.Adam(1e-2), "sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def _tiny_data(n=16):
    x = np.random.default_rng(1).normal(size=(n, 4)).astype("float32")
    return x, (x[:, 0] > 0).astype("int32")


def test_snapshot_restores_what_keras_weights_files_leave_out(tmp_path):
    x, y = _tiny_data()
    model = _tiny_model()
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, shuffle=False)
    random.seed(11)
    np.random.seed(12)
    path = str(tmp_path / "s.weights.h5")
    save_snapshot(model, path, {"phase": "train", "epoch": 1, "step": 2})
    expected_python, expected_numpy = random.random(), np.random.random()
    assert read_position(path) == {"phase": "train", "epoch": 1, "step": 2}

    fresh = _tiny_model(seed=9)
    random.seed(0)
    snap = load_snapshot(fresh, path)
    assert snap.exact and snap.position["step"] == 2
    for restored, saved in zip(fresh.variables, model.variables):  # weights and the dropout seed state
        np.testing.assert_array_equal(np.asarray(restored), np.asarray(saved), err_msg=restored.path)
    assert any("seed_generator" in v.path for v in fresh.variables)
    assert int(fresh.optimizer.iterations) == 4
    assert (random.random(), np.random.random()) == (expected_python, expected_numpy)
    # The running epoch's metric sums (loss total and count, accuracy) travel too.
    np.testing.assert_array_equal(np.concatenate([np.ravel(m) for m in snap.metrics]),
                                  np.concatenate([np.ravel(np.asarray(v)) for v in model.metrics_variables]))
    assert snap.metrics[1] == 16.0  # loss count: 16 samples seen


def test_nothing_non_finite_is_saved_and_the_guard_stops_training(tmp_path):
    x, y = _tiny_data()
    model = _tiny_model()
    folder = str(tmp_path)
    guard = cbs.DivergenceGuard(cause="learning_rate=1e+06")
    backup = cbs.TrainingStateBackup(folder, guard=guard)
    checkpoint = cbs.AtomicCheckpoint(folder, guard=guard)
    model.fit(x, y, batch_size=4, epochs=1, verbose=0, callbacks=[guard, backup, checkpoint])
    saved = {n: (tmp_path / n).read_bytes() for n in ("state.weights.h5", "state.json", "last.keras")}

    kernel = model.get_layer("out").kernel
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    with pytest.raises(NonFiniteWeights, match=r"not writing s.weights.h5: 1 weight tensor\(s\).*out/kernel"):
        save_snapshot(model, str(tmp_path / "s.weights.h5"), {})
    assert not backup.save(completed_epochs=2, batch=0)
    assert guard.tripped and "hold NaN or inf" in guard.reason and model.stop_training
    checkpoint.on_epoch_end(1, {"loss": 0.1})
    assert {n: (tmp_path / n).read_bytes() for n in saved} == saved, "a non-finite model overwrote a checkpoint"
    assert not [p for p in os.listdir(folder) if ".tmp" in p]

    nan_guard = cbs.DivergenceGuard(cause="learning_rate=1e+06")
    nan_guard.on_train_batch_end(0, {"loss": float("nan")})
    assert nan_guard.message() == ("training diverged: the loss became nan in epoch 1, batch 1; the likely cause is "
                                   "the learning rate (learning_rate=1e+06): lower it")
    exploding = cbs.DivergenceGuard()
    exploding.on_train_batch_end(0, {"loss": 0.7})
    exploding.on_train_batch_end(1, {"loss": 9.9e3})
    assert not exploding.tripped
    exploding.on_train_batch_end(2, {"loss": 9.5e21})
    assert exploding.reason == "the loss exploded to 9.5e+21 (first 0.7) in epoch 1, batch 3"


def test_history_drops_rows_a_resumed_run_writes_again(tmp_path):
    history = cbs.EpochHistory(str(tmp_path / "history.csv"))
    for epoch in range(3):
        history.on_epoch_end(epoch, {"loss": 1.0 / (epoch + 1), "accuracy": 0.5})
    assert history.keep_before(1) == 2
    with open(tmp_path / "history.csv") as handle:
        assert list(csv.DictReader(handle)) == [{"epoch": "0", "loss": "1.0", "accuracy": "0.5"}]


# -- recipe values ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, key, value, message", [
    ("siamese_b0", "learning_rate", -1.0, "learning_rate must be a finite number > 0, got -1.0"),
    ("siamese_b0", "learning_rate", float("inf"), "learning_rate must be a finite number > 0, got inf"),
    ("siamese_b0", "batch_size", 0, "batch_size must be an integer >= 1, got 0"),
    ("siamese_b0", "id_warmup_lr", float("nan"), "id_warmup_lr must be a finite number > 0, got nan"),
    ("siamese_b0", "checkpoint_every_minutes", 0, "checkpoint_every_minutes must be a finite number > 0 or None, "
                                                  "got 0"),
    ("resnet50_idver", "momentum", 1.0, r"momentum must be a number in \[0, 1\), got 1.0"),
    ("resnet50_idver", "weight_decay", -5e-4, "weight_decay must be a finite number >= 0 or None, got -0.0005"),
    ("resnet50_idver", "contrastive_margin", 0.0, "contrastive_margin must be a finite number > 0, got 0.0"),
    ("resnet50_oim", "oim_momentum", 1.5, r"oim_momentum must be a number in \[0, 1\), got 1.5"),
    ("resnet50_triplet", "triplet_margin", "-0.3", "triplet_margin must be a finite number > 0 or 'soft', got '-0.3'"),
    ("resnet50_triplet", "epochs", -1, "epochs must be an integer >= 0, got -1"),
])
def test_recipe_numbers_are_checked_naming_the_key(model, key, value, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        resolve_config(model, overrides={key: value})
    assert resolve_config("siamese_b0", overrides={"learning_rate": 1e6}).recipe.learning_rate == 1e6  # legal


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "error: --lr must be a finite number > 0, got -1.0"),
    (["--lr", "nan"], "error: --lr must be a finite number > 0, got nan"),
    (["--checkpoint-every-minutes", "0"], "error: --checkpoint-every-minutes must be a finite number > 0 or None, "
                                          "got 0.0"),
])
def test_the_train_command_names_the_flag_of_a_bad_number(argv, message, tmp_path, capsys):
    from reid_keras.cli import train

    assert train.main(["--model", "siamese_b0", "--output", str(tmp_path / "runs"), *argv]) == 2
    assert capsys.readouterr().err.strip() == message
    assert not (tmp_path / "runs").exists()


# -- run folders -----------------------------------------------------------------------------------------

def _write_config(folder, config, *files):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(config.to_json(), handle)
    for name in files:
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(b"x")


def test_run_folder_choice_leftovers_and_stale_temporaries(tmp_path):
    out = str(tmp_path / "runs")
    config = resolve_config("siamese_b0", output=out)
    resume = resolve_config("siamese_b0", output=out, resume=True)
    _write_config(f"{out}/killed", config, "state.weights.h5")
    _write_config(f"{out}/finished-older", config, "state.weights.h5", "metrics.json")
    os.utime(f"{out}/finished-older/state.weights.h5", (1, 1))
    time.sleep(0.01)
    _write_config(f"{out}/leftover", config)                      # a start that failed: config.json only
    _write_config(f"{out}/other-model", resolve_config("resnet50_oim", output=out), "state.weights.h5")
    assert latest_resumable_run(out, "siamese_b0") == f"{out}/killed"
    assert locate_run_folder(resume, None) == f"{out}/killed"
    assert prepare_run_folder(config, "leftover") == f"{out}/leftover"  # its name is free again
    with pytest.raises(FileExistsError, match="killed already holds a run"):
        locate_run_folder(config, "killed")
    changed = resolve_config("siamese_b0", output=out, resume=True, overrides={"learning_rate": 0.5})
    with pytest.raises(ValueError, match=r"differs from the interrupted run \(learning_rate: 0.0001 -> 0.5\); "
                                         r"resume with the interrupted run's values.*another name \(--name\)"):
        locate_run_folder(changed, "killed")
    with pytest.raises(FileNotFoundError, match="no run of vgg16_idver with resume state"):
        latest_resumable_run(out, "vgg16_idver")

    folder = tmp_path / "run"
    (folder / "evaluation").mkdir(parents=True)
    stale = [".state.weights.h5.k2x.tmp.weights.h5", ".last.keras.a1.tmp.keras", "evaluation/.cmc.png.z.tmp.png"]
    for name in stale + ["state.weights.h5", "last.keras"]:
        (folder / name).write_bytes(b"partial")
    (folder / ".export.tmp-abc").mkdir()
    (folder / ".export.tmp-abc" / "saved_model.pb").write_bytes(b"half")
    assert sorted(remove_stale_temporaries(str(folder))) == sorted(stale + [".export.tmp-abc"])
    assert sorted(os.listdir(folder)) == ["evaluation", "last.keras", "state.weights.h5"]


# -- end to end: kills in the warm-up, mid-epoch and during a checkpoint write ---------------------------

RECIPE = dict(weights="none", image_size=(32, 32), batch_size=4, epochs=2, steps_per_epoch=3, id_warmup_steps=4)


def _config(out, data, resume=False, **overrides):
    return resolve_config("siamese_b0", overrides={**RECIPE, **overrides}, dataset="synthetic", data_root=data,
                          dataset_options={"num_ids": 12}, seed=3, output=out, resume=resume)


def _history(folder):
    with open(os.path.join(folder, "history.csv")) as handle:
        return list(csv.DictReader(handle))


class CrashAt(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.epoch, self.batch, self.current = epoch, batch, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.current, batch) == (self.epoch, self.batch):
            raise Crash(f"killed after batch {batch + 1} of epoch {self.epoch + 1}")


# The subprocess of the third kill: resume, and block inside the first checkpoint write (after the
# temporary file is written, before it replaces the state) so the test can SIGKILL it there.
KILLED_IN_WRITE = textwrap.dedent("""
    import json, os, sys, time
    import keras
    from reid_keras.families.config import config_from_json
    from reid_keras.training.runner import run_training

    config_path, marker, name = sys.argv[1:4]
    save_weights = keras.Model.save_weights

    def blocking(self, path, *args, **kwargs):
        save_weights(self, path, *args, **kwargs)
        if ".tmp" in os.path.basename(path):
            open(marker, "w").close()
            time.sleep(600)

    keras.Model.save_weights = blocking
    with open(config_path) as handle:
        run_training(config_from_json(json.load(handle)), name=name, export=False, plots=False)
""")


@pytest.mark.slow
def test_killed_in_warmup_mid_epoch_and_in_a_checkpoint_write_resumes_to_the_same_losses(tmp_path, capsys,
                                                                                         monkeypatch):
    out, data = str(tmp_path / "runs"), str(tmp_path / "data")
    # Uninterrupted, with the default checkpoint timing (no snapshot inside these short epochs).
    reference = run_training(_config(out, data), name="reference", export=False, plots=False)
    expected = _history(reference)
    assert [row["epoch"] for row in expected] == ["0", "1"]
    capsys.readouterr()

    # 1. Killed in the identity warm-up, right after its snapshot at step 2 of 4.
    every_step = dict(checkpoint_every_steps=1)
    warmup_batch_end = cbs.WarmupBackup.on_train_batch_end

    def killed_after_step_2(self, batch, logs=None):
        warmup_batch_end(self, batch, logs)
        if batch + 1 == 2:
            raise Crash("killed in the warm-up")

    monkeypatch.setattr(cbs.WarmupBackup, "on_train_batch_end", killed_after_step_2)
    with pytest.raises(Crash):
        run_training(_config(out, data, **every_step), name="killed", export=False, plots=False)
    monkeypatch.undo()
    run = os.path.join(out, "killed")
    assert read_position(os.path.join(run, "warmup.weights.h5")) == {"phase": "warmup", "step": 2, "steps": 4}
    assert not os.path.exists(os.path.join(run, "state.weights.h5"))

    # A failed start creates no folder; a leftover config.json of an older failed start (newer than the killed
    # run) is not what a resume without a name picks: the newest run with resume state is.
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run_training(dataclasses.replace(_config(out, data), dataset="market1501", data_root=str(tmp_path / "nowhere"),
                                         dataset_options={}),
                     name="bad-root")
    assert not os.path.exists(os.path.join(out, "bad-root"))
    _write_config(os.path.join(out, "siamese_b0-synthetic-leftover"), _config(out, data, **every_step))
    capsys.readouterr()

    # 2. Resumed (no name): finishes the warm-up from step 2, trains epoch 1, killed after step 1 of epoch 2.
    with pytest.raises(Crash):
        run_training(_config(out, data, resume=True, **every_step), export=False, plots=False,
                     extra_callbacks=[CrashAt(epoch=1, batch=0)])
    printed = capsys.readouterr().out
    assert f"run folder: {run}\n" in printed
    assert "identity warm-up: 4 steps of 6 ids x 4 images over 6 training ids (backbone has no pretrained " \
           "weights); resuming after step 2" in printed
    assert not os.path.exists(os.path.join(run, "warmup.weights.h5"))
    assert json.loads(open(os.path.join(run, "state.json")).read()) == {"completed_epochs": 1, "batch": 1}
    assert _history(run) == expected[:1], "the epoch after a resumed warm-up differs from the uninterrupted one"

    # 3. Resumed in a subprocess, SIGKILLed while writing its first checkpoint (the temporary file exists).
    config_path, marker = str(tmp_path / "config.json"), str(tmp_path / "writing")
    with open(config_path, "w") as handle:
        json.dump(_config(out, data, resume=True, **every_step).to_json(), handle)
    script = tmp_path / "killed_in_write.py"
    script.write_text(KILLED_IN_WRITE)
    # The script runs from tmp_path: put this checkout first on its path, whatever `pip install -e` points at.
    project = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [project, os.environ.get("PYTHONPATH")])))
    process = subprocess.Popen([sys.executable, str(script), config_path, marker, "killed"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=os.getcwd(), env=env)
    deadline = time.time() + 600
    while not os.path.exists(marker) and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert os.path.exists(marker), process.stderr.read().decode()[-3000:] if process.poll() is not None else "timeout"
    process.send_signal(signal.SIGKILL)
    process.wait()
    stale = [p for p in os.listdir(run) if ".tmp" in p]
    assert len(stale) == 1 and stale[0].startswith(".state.weights.h5.")
    assert json.loads(open(os.path.join(run, "state.json")).read()) == {"completed_epochs": 1, "batch": 1}

    # 4. Resumed again: the partial file is removed (and said), the run finishes; every epoch equals the reference.
    run_training(_config(out, data, resume=True, **every_step), name="killed", export=False, plots=False)
    printed = capsys.readouterr().out
    assert f"removed 1 temporary file(s) left by an interrupted write: {stale[0]}" in printed
    assert "resuming after epoch 1 of 2, at step 1" in printed
    assert not [p for p in os.listdir(run) if ".tmp" in p]
    assert _history(run) == expected
    warmup = json.loads(open(os.path.join(run, "config.json")).read())["runtime_id_warmup"]
    assert warmup["resumed_at_step"] == 2
    assert warmup["final_loss"] == json.loads(open(os.path.join(reference, "config.json")).read())[
        "runtime_id_warmup"]["final_loss"]
    assert os.path.exists(os.path.join(run, "metrics.json"))


@pytest.mark.slow
def test_a_diverging_run_stops_keeps_its_last_finite_checkpoint_and_exports_nothing(tmp_path):
    out = str(tmp_path / "runs")
    config = _config(out, str(tmp_path / "data"), learning_rate=1e6, id_warmup_steps=0, checkpoint_every_steps=1)
    with pytest.raises(ValueError) as error:
        run_training(config, name="lr1e6")
    message = str(error.value)
    assert message.startswith("training diverged: the loss ")
    assert "the likely cause is the learning rate (learning_rate=1e+06): lower it. Nothing was evaluated or " \
           "exported" in message
    run = os.path.join(out, "lr1e6")
    assert not os.path.exists(os.path.join(run, "export")) and not os.path.exists(os.path.join(run, "metrics.json"))
    written = [n for n in ("state.weights.h5", "last.keras", "best.keras") if os.path.exists(os.path.join(run, n))]
    for name in written:  # whatever was written before the divergence holds finite weights only
        path = os.path.join(run, name)
        if name.endswith(".keras"):
            weights = [np.asarray(w) for w in load_model(path, compile=False).weights]
        else:
            with h5py.File(path, "r") as handle:
                weights = []
                handle.visititems(lambda _, item: weights.append(item[()]) if isinstance(item, h5py.Dataset) else None)
        assert weights and all(np.all(np.isfinite(w)) for w in weights if w.dtype.kind == "f"), name
    state = os.path.join(run, "state.json")
    assert (f"keeps the last finite checkpoint (state after epoch {json.load(open(state))['completed_epochs']}"
            if os.path.exists(state) else "(none: it diverged before its first checkpoint)") in message
