"""OIM training runs: the lookup table survives the trainer's backup (issue 6 item 2), and the OIM
experiment files (paper Tables 3-4, experiments/oim_*.toml) load and give valid train arguments.

The checkpoint tests train a `ClassifierTask` OIM model on a tiny backbone (build_classifier takes
a ready no-top model) for one short epoch with `TrainingStateBackup`, then restore the backup into
a freshly built model, as `runner.run_training --resume` does.
"""
import inspect
import json
import os
import pathlib

import keras
import numpy as np
import pytest

from reid_keras import paper_tables
from reid_keras.cli import experiment
from reid_keras.families.classifier import ClassifierRecipe, ClassifierTask
from reid_keras.training.callbacks import TrainingStateBackup
from tests.fixtures.tiny_images import write_reid_set

SIZE = (32, 32)
NUM_IDS = 5
BATCH, STEPS = 4, 3
EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def tiny_backbone(seed):
    """A no-top conv net with fixed layer names (weights files match variables by layer path)."""
    keras.utils.set_random_seed(seed)
    image = keras.Input((*SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0, name="tiny_rescale")(image)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu", name="tiny_conv1")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="tiny_conv2")(x)
    return keras.Model(image, x, name="tiny")


def oim_task(seed):
    config = ClassifierRecipe(backbone=tiny_backbone(seed), weights="none", image_size=SIZE,
                              preprocessing="efficientnet", losses="oim", feature_dim=8, oim_momentum=0.5,
                              oim_temperature=0.1, optimizer="adam", learning_rate=1e-2, sampler="random",
                              steps_per_epoch=STEPS, augment=None)
    return ClassifierTask(config, seed=0)


def table(model):
    return np.asarray(model.get_layer("oim").lookup_table)


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory):
    """One epoch of STEPS batches fed as the task's stream gives them, backed up by the trainer's callback."""
    layout = [(pid, cam, 2) for pid in range(10, 10 + NUM_IDS) for cam in (0, 1)]
    records = write_reid_set(tmp_path_factory.mktemp("train"), layout, size=(40, 20))
    records = [r._replace(pid=r.pid - 10) for r in records]          # the trainer's 0..N-1 relabelling
    task = oim_task(seed=0)
    model, _ = task.build(num_train_ids=NUM_IDS)
    stream, steps = task.train_dataset(records, initial_epoch=0, epochs=1, global_batch=BATCH)
    assert steps == STEPS
    batches = list(stream.take(STEPS))
    images = np.concatenate([np.asarray(x[0]) for x, _ in batches])
    pids = np.concatenate([np.asarray(x[1]) for x, _ in batches])
    targets = np.concatenate([np.asarray(y["oim"]) for _, y in batches])
    np.testing.assert_array_equal(pids, targets)
    folder = str(tmp_path_factory.mktemp("run"))
    # The same batches in the same order (shuffle=False), so we know which identities were written.
    model.fit([images, pids], {"oim": pids}, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[TrainingStateBackup(folder)])
    return model, folder, images, pids


def test_backup_holds_the_trained_lookup_table(backed_up):
    model, folder, _, pids = backed_up
    with open(os.path.join(folder, "state.json"), encoding="utf-8") as handle:
        assert json.load(handle) == {"completed_epochs": 1, "batch": 0}
    assert os.path.getsize(os.path.join(folder, "state.weights.h5")) > 0
    # OIM §3.2: every identity of the batches has a unit-norm row; the others are still zero.
    norms = np.linalg.norm(table(model), axis=1)
    seen = sorted(set(pids.tolist()))
    np.testing.assert_allclose(norms[seen], 1.0, rtol=1e-5)
    unseen = [i for i in range(NUM_IDS) if i not in seen]
    np.testing.assert_array_equal(norms[unseen], 0.0)


def test_load_state_restores_the_memory_into_a_fresh_model(backed_up):
    model, folder, images, pids = backed_up
    fresh, _ = oim_task(seed=1).build(num_train_ids=NUM_IDS)
    assert not np.any(table(fresh))                                       # a new table is all zeros
    def first_conv(m):
        return np.asarray(m.get_layer("embedding").get_layer("tiny").get_layer("tiny_conv1").kernel)

    assert not np.allclose(first_conv(fresh), first_conv(model))         # another initialisation

    assert TrainingStateBackup.load_state(folder, fresh) == 1
    np.testing.assert_array_equal(table(fresh), table(model))
    assert np.any(table(fresh))
    for restored, trained in zip(fresh.weights, model.weights):
        np.testing.assert_array_equal(np.asarray(restored), np.asarray(trained), err_msg=restored.path)
    assert int(fresh.optimizer.iterations) == int(model.optimizer.iterations) == STEPS
    # The resumed model scores a batch against the memory exactly as the interrupted one would.
    batch = [images[:BATCH], pids[:BATCH]]
    np.testing.assert_allclose(np.asarray(fresh(batch, training=False)["oim"]),
                               np.asarray(model(batch, training=False)["oim"]), rtol=1e-6, atol=1e-6)


def test_load_state_without_a_backup_starts_at_epoch_zero(tmp_path):
    fresh, _ = oim_task(seed=2).build(num_train_ids=NUM_IDS)
    assert TrainingStateBackup.load_state(str(tmp_path), fresh) == 0
    assert not np.any(table(fresh))


# -- experiment files of the OIM paper's Tables 3 and 4 ---------------------------------------

# oim_person_search.txt §5.3 Table 3, ResNet-50 rows (CMC top-1 %), typed in from the paper.
TABLE3 = {"cuhk03": {"resnet50_softmax": 70.8, "resnet50_oim": 77.5},
          "market1501": {"resnet50_softmax": 81.4, "resnet50_oim": 82.1},
          "dukemtmc": {"resnet50_softmax": 62.5, "resnet50_oim": 68.1}}
# Table 4: feature dimension -> (top-1 %, mAP %); None is the paper's "N/A" (2048-d pooled feature).
TABLE4 = {None: (59.3, 54.2), 128: (65.9, 62.1), 256: (78.7, 75.5), 512: (78.2, 75.3), 1024: (78.5, 75.7)}


def resolved(argv):
    from reid_keras.cli.train import build_parser, config_from_args

    return config_from_args(build_parser().parse_args(argv)).flat()


def check_dataset_options(spec, path):
    """Option names the dataset's loader really accepts (a typo would only fail on the real data)."""
    from reid_keras.data.datasets import get_loader

    accepted = set(inspect.signature(get_loader(spec["dataset"])).parameters) - {"root", "strict"}
    assert set(spec.get("dataset_options", {})) <= accepted, (path, accepted)


@pytest.mark.parametrize("dataset", sorted(TABLE3))
def test_table3_files_load_and_parse(dataset):
    path = EXPERIMENTS / f"oim_reid_{dataset}.toml"
    spec = paper_tables.load_experiment(str(path))
    assert spec["dataset"] == dataset and spec["recipe"] == "paper" and spec["weights"] == "imagenet"
    assert "rank1" in spec["metrics"]
    assert {run["model"]: run["paper"]["rank1"] for run in spec["runs"]} == TABLE3[dataset]
    check_dataset_options(spec, path)
    for run in spec["runs"]:
        argv = experiment.train_argv(spec, run, "/data/" + dataset, "runs", smoke=False)
        config = resolved(argv)
        assert config["model"] == run["model"] and config["dataset"] == dataset
        assert config["losses"] == ("oim" if run["model"] == "resnet50_oim" else "id")
        assert config["weights"] == "imagenet" and config["image_size"] == (256, 128)
        assert config["batch_size"] == 256 and config["optimizer"] == "sgd"
        assert config["dataset_options"] == spec.get("dataset_options", {})
        smoke = resolved(experiment.train_argv(spec, run, None, "runs", smoke=True))
        assert smoke["weights"] == "none" and smoke["image_size"] == (64, 32) and smoke["epochs"] == 1
    if dataset == "cuhk03":
        assert spec["dataset_options"] == {"protocol": "classic", "box_type": "labeled", "split_index": 0}
    table = paper_tables.results_table(spec, [(run, None) for run in spec["runs"]])
    oim_run = next(run for run in spec["runs"] if run["model"] == "resnet50_oim")
    assert f"| {paper_tables.run_label(oim_run)} | paper | {TABLE3[dataset]['resnet50_oim']:.1f} |" in table


def test_table4_file_sweeps_the_feature_dimension():
    path = EXPERIMENTS / "oim_feature_dim.toml"
    spec = paper_tables.load_experiment(str(path))
    assert "CUHK-SYSU" in path.read_text(encoding="utf-8")    # the note that the paper's table is person search
    assert spec["metrics"] == ["rank1", "mAP"]
    check_dataset_options(spec, path)
    dims = {}
    for run in spec["runs"]:
        assert run["model"] == "resnet50_oim"
        config = resolved(experiment.train_argv(spec, run, "/data/market", "runs", smoke=False))
        assert config["losses"] == "oim" and config["oim_temperature"] == 0.1
        dims[config["feature_dim"]] = (run["paper"]["rank1"], run["paper"]["mAP"])
    assert dims == TABLE4          # "none" became None (no projection), the others integers


def test_oim_experiment_run_folders_are_distinct():
    names = []
    for path in sorted(EXPERIMENTS.glob("oim_*.toml")):
        names += [run.get("name", run["model"]) for run in paper_tables.load_experiment(str(path))["runs"]]
    assert len(names) == 11 and len(set(names)) == len(names), names


def test_feature_dim_none_builds_the_pooled_feature():
    """What `--feature-dim none` of oim_feature_dim.toml means for the model (tiny backbone stand-in)."""
    from reid_keras.models.classifier import build_classifier

    pooled = build_classifier(3, tiny_backbone(0), SIZE, losses="oim", feature_dim=None)
    projected = build_classifier(3, tiny_backbone(0), SIZE, losses="oim", feature_dim=12)
    assert pooled.get_layer("embedding").outputs[0].shape[-1] == 16      # the backbone's channels
    assert pooled.get_layer("oim").feature_dim == 16
    assert projected.get_layer("embedding").outputs[0].shape[-1] == 12 and projected.get_layer("oim").feature_dim == 12
