"""Single-image re-ID models (models/classifier.py) and their family's trainer task (families/classifier.py).

Model-structure and learning tests use a tiny convolutional backbone (build_classifier accepts a
ready no-top model), so they run in seconds; the task tests build a real keras.applications backbone
once (VGG16 at 32x32: 19 layers, far quicker to build and trace than ResNet-50 on a shared CPU).
"""
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from reid_keras.families.classifier import PRESETS as CLASSIFIER_PRESETS
from reid_keras.families.classifier import ClassifierRecipe, ClassifierTask
from reid_keras.models.classifier import build_classifier, compile_classifier, parse_losses
from reid_keras.training.optimizers import DelayedExponentialDecay, learning_rate_schedule, make_optimizer
from tests.fixtures.tiny_images import write_reid_set

SIZE = (32, 32)


def tiny_backbone(seed=0):
    keras.utils.set_random_seed(seed)
    image = keras.Input((*SIZE, 3))
    x = keras.layers.Rescaling(1 / 255.0)(image)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    return keras.Model(image, x, name="tiny")


def pk_images(P=4, K=4, seed=0):
    """P identities x K images: a per-id random pattern plus noise, K consecutive rows per id."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 255, (P, *SIZE, 3))
    images = np.repeat(base, K, axis=0) + rng.normal(0, 20, (P * K, *SIZE, 3))
    return np.clip(images, 0, 255).astype("float32"), np.repeat(np.arange(P), K).astype("int32")


def test_parse_losses():
    assert parse_losses("id") == ("id",)
    assert parse_losses("triplet+id") == ("id", "triplet")
    assert parse_losses(" ID + Triplet + oim ") == ("id", "triplet", "oim")
    assert parse_losses(["oim", "id"]) == ("id", "oim")
    for bad in ("", "+", "softmax", "id+id", "id+verif"):
        with pytest.raises(ValueError, match="expected heads from id, triplet, oim"):
            parse_losses(bad)


@pytest.mark.parametrize("losses,keys", [("id", ["id"]), ("triplet", ["triplet"]), ("id+triplet", ["id", "triplet"]),
                                         ("oim", ["oim"]), ("id+triplet+oim", ["id", "triplet", "oim"])])
def test_outputs_per_losses(losses, keys):
    model = build_classifier(7, tiny_backbone(), SIZE, losses=losses, feature_dim=12, dropout=0.0)
    assert sorted(model.output) == sorted(keys)
    images, pids = pk_images(P=2, K=3)
    inputs = [images, pids] if "oim" in keys else images
    assert [t.name for t in model.inputs] == (["image", "pid"] if "oim" in keys else ["image"])
    out = model(inputs, training=False)
    embedding = model.get_layer("embedding")
    features = np.asarray(embedding(images, training=False))
    assert features.shape == (6, 12) and embedding.outputs[0].shape[-1] == 12
    if "id" in keys:
        assert tuple(out["id"].shape) == (6, 7)
        assert model.get_layer("bnneck").center is False and model.get_layer("id").use_bias is False
    if "triplet" in keys:   # the triplet loss sees the test-time feature itself (before the BNNeck)
        np.testing.assert_allclose(np.asarray(out["triplet"]), features, rtol=1e-5, atol=1e-6)
    if "oim" in keys:       # a fresh lookup table is all zeros: every logit is 0
        assert tuple(out["oim"].shape) == (6, 7) and np.all(np.asarray(out["oim"]) == 0)


def test_without_projection_or_bnneck():
    model = build_classifier(5, tiny_backbone(), SIZE, losses="id", feature_dim=None, bnneck=False)
    assert model.get_layer("embedding").outputs[0].shape[-1] == 16    # the pooled backbone width
    assert model.get_layer("id").use_bias and "bnneck" not in [layer.name for layer in model.layers]
    with pytest.raises(ValueError, match="feature_dim must be a positive integer"):
        build_classifier(5, tiny_backbone(), SIZE, feature_dim=0)
    with pytest.raises(ValueError, match="num_ids must be a positive integer"):
        build_classifier(0, tiny_backbone(), SIZE)
    with pytest.raises(ValueError, match="loss_weights has oim"):
        compile_classifier(model, make_optimizer(), loss_weights={"oim": 1.0})


@pytest.mark.parametrize("losses", ["id+triplet", "oim"])
def test_a_few_steps_on_a_pk_batch_lower_the_loss(losses):
    images, pids = pk_images(P=4, K=4, seed=1)
    model = build_classifier(4, tiny_backbone(seed=2), SIZE, losses=losses, feature_dim=16, dropout=0.0)
    compile_classifier(model, make_optimizer("adam", 3e-3), triplet_margin=0.3, label_smoothing=0.1)
    heads = parse_losses(losses)
    x = [images, pids] if "oim" in heads else images
    # One batch per epoch, in P x K order: history["loss"][0] is the loss before any update.
    history = model.fit(x, {h: pids for h in heads}, batch_size=16, epochs=25, shuffle=False, verbose=0).history
    first, last = history["loss"][0], float(np.mean(history["loss"][-3:]))
    assert np.all(np.isfinite(history["loss"]))
    assert last < 0.6 * first, (losses, history["loss"])
    for head in heads if len(heads) > 1 else ():   # each head's own loss goes down, not just the sum
        assert np.mean(history[f"{head}_loss"][-3:]) < history[f"{head}_loss"][0], (head, history[f"{head}_loss"])


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")  # never stepped: no slots yet
def test_learning_rate_schedules(tmp_path):
    schedule = DelayedExponentialDecay(3e-4, 15000, 25000, 0.001)
    for step, expected in ((0, 3e-4), (15000, 3e-4), (20000, 3e-4 * 0.001 ** 0.5), (25000, 3e-7), (40000, 3e-7)):
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-5)
    clone = DelayedExponentialDecay.from_config(schedule.get_config())
    assert float(clone(20000)) == pytest.approx(float(schedule(20000)))
    step = learning_rate_schedule(0.01, {"type": "step", "boundaries": [2000], "factor": 0.1})
    assert float(step(1999)) == pytest.approx(0.01) and float(step(2001)) == pytest.approx(0.001)
    assert learning_rate_schedule(0.5) == 0.5
    # A checkpoint of a model compiled with the schedule (and the custom losses) loads in safe mode.
    model = build_classifier(3, tiny_backbone(), SIZE, losses="id+triplet", feature_dim=4)
    rate = learning_rate_schedule(3e-4, {"type": "delayed_exponential", "decay_start": 10, "decay_end": 20})
    compile_classifier(model, ClassifierTask(ClassifierRecipe(optimizer="sgd", weight_decay=5e-4)).optimizer(rate),
                       triplet_margin="soft", label_smoothing=0.1)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    schedule_config = loaded.optimizer.get_config()["learning_rate"]
    assert schedule_config["registered_name"] == "reid_keras>DelayedExponentialDecay"
    assert schedule_config["config"]["decay_end"] == 20
    assert loaded.optimizer.weight_decay == pytest.approx(5e-4) and loaded.optimizer.nesterov
    assert loaded.loss["triplet"].margin == "soft" and loaded.loss["id"].label_smoothing == 0.1
    with pytest.raises(ValueError, match="type must be"):
        learning_rate_schedule(0.1, {"type": "cosine"})


def test_presets_are_complete():
    from reid_keras.families import get_preset

    for name, entry in CLASSIFIER_PRESETS.items():
        preset = entry.recipe
        assert get_preset(name)[0].name == "classifier" and entry.resolve("paper") == preset
        parse_losses(preset.losses)
        if preset.sampler == "pk":
            assert preset.P * preset.K == preset.batch_size, name
            recipe = entry.resolve("default")
            assert recipe.P * recipe.K == recipe.batch_size, name
    triplet = CLASSIFIER_PRESETS["resnet50_triplet"].recipe
    assert (triplet.P, triplet.K, triplet.learning_rate) == (18, 4, 3e-4)
    assert triplet.steps_per_epoch * triplet.epochs == 25000


# -- the trainer task, with a real backbone --------------------------------------------------

def task_config(**overrides):
    config = {"backbone": "vgg16", "weights": "none", "image_size": SIZE,
              "preprocessing": "vgg16", "losses": "id+triplet", "feature_dim": 8, "dropout": 0.0,
              "label_smoothing": 0.1, "triplet_margin": "0.3", "optimizer": "adam", "learning_rate": 1e-3,
              "sampler": "pk", "P": 2, "K": 2, "steps_per_epoch": 2, "augment": {"flip": True}}
    config.update(overrides)
    return ClassifierRecipe(**config)


@pytest.fixture(scope="module")
def train_records(tmp_path_factory):
    layout = [(pid, cam, 2) for pid in (10, 11, 12) for cam in (0, 1)]
    records = write_reid_set(tmp_path_factory.mktemp("train"), layout, size=(40, 20))
    # The trainer relabels train ids 0..N-1.
    return [r._replace(pid={10: 0, 11: 1, 12: 2}[r.pid]) for r in records]


@pytest.fixture(scope="module")
def trained(train_records):
    task = ClassifierTask(task_config())
    keras.utils.set_random_seed(0)
    model, info = task.build(num_train_ids=3)
    ds, steps = task.train_dataset(train_records, initial_epoch=0, epochs=1, global_batch=4)
    history = model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
    return task, model, info, ds, steps, history


def test_task_builds_feeds_and_fits(trained):
    task, model, info, ds, steps, history = trained
    assert info["used"] == "none" and steps == 2
    assert sorted(model.output) == ["id", "triplet"]
    assert isinstance(model.loss["triplet"], keras.losses.Loss) and model.loss["triplet"].margin == 0.3
    images, targets = next(iter(ds))
    assert tuple(images.shape) == (4, *SIZE, 3) and sorted(targets) == ["id", "triplet"]
    pids = targets["id"].numpy()
    np.testing.assert_array_equal(pids, targets["triplet"].numpy())
    assert pids[0] == pids[1] and pids[2] == pids[3] and pids[0] != pids[2]    # P=2 ids x K=2 images
    assert len(history.history["loss"]) == 1 and np.isfinite(history.history["loss"][0])
    assert {"id_loss", "triplet_loss", "id_accuracy"} <= set(history.history)


def test_task_data_errors_and_random_sampler(train_records):
    with pytest.raises(ValueError, match=r"batch size 6 != P x K = 2 x 2 = 4"):
        ClassifierTask(task_config()).train_dataset(train_records, 0, 1, global_batch=6)
    with pytest.raises(ValueError, match="need P x K batches"):
        ClassifierTask(task_config(sampler="random"))
    with pytest.raises(ValueError, match="sampler 'weird'"):
        ClassifierTask(task_config(sampler="weird"))
    task = ClassifierTask(task_config(sampler="random", losses="oim", steps_per_epoch=None))
    ds, steps = task.train_dataset(train_records, 0, 2, global_batch=5)
    assert steps == len(train_records) // 5
    seen = []
    for (images, pids), targets in ds.take(4):     # repeats past one pass
        assert tuple(images.shape) == (5, *SIZE, 3) and sorted(targets) == ["oim"]
        np.testing.assert_array_equal(pids.numpy(), targets["oim"].numpy())
        seen.extend(pids.numpy().tolist())
    assert sorted(set(seen)) == [0, 1, 2]


def test_task_export_embed_round_trip(trained, tmp_path):
    from reid_keras.models.saved_model import load_export, prepare_images

    task, model = trained[0], trained[1]
    out = tmp_path / "export"
    task.export(model, str(out))
    loaded, metadata = load_export(str(out))
    assert metadata["image_size"] == list(SIZE) and metadata["feature_dim"] == 8
    raw = np.random.default_rng(4).integers(0, 256, (3, 50, 26, 3)).astype(np.uint8)
    served = loaded.embed(tf.constant(raw))
    served = np.asarray(served["embedding"] if isinstance(served, dict) else served)
    features = np.asarray(model.get_layer("embedding")(prepare_images(raw, SIZE, "vgg16"), training=False))
    expected = features / np.linalg.norm(features, axis=1, keepdims=True)
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-5)


def test_task_evaluate_and_format(trained, tmp_path):
    from reid_keras.data.datasets import load_dataset
    from reid_keras.data.datasets.synthetic import write_dataset

    from reid_keras.data.preprocessing import preprocess
    from reid_keras.models.loading import load_embedding_model

    task, model = trained[0], trained[1]
    write_dataset("market1501", str(tmp_path / "data"), num_ids=8, seed=1)
    dataset = load_dataset("market1501", str(tmp_path / "data"), strict=False)
    # As the runner does: the checkpoint exists (evaluation keys its feature cache on it). It loads
    # in safe mode with its custom losses and gives the same features.
    os.makedirs(tmp_path / "run")
    model.save(tmp_path / "run" / "last.keras")
    images = np.random.default_rng(2).uniform(0, 255, (2, *SIZE, 3)).astype("float32")
    reloaded = load_embedding_model(str(tmp_path / "run" / "last.keras"), preprocessing="vgg16")
    expected = model.get_layer("embedding")(preprocess(images, "vgg16"), training=False)
    np.testing.assert_allclose(reloaded.embed(images), np.asarray(expected), rtol=1e-5, atol=1e-5)
    metrics = task.evaluate(model, dataset, str(tmp_path / "run"), plots=False)
    m = metrics["embedding_cosine"]
    assert 0.0 <= m["rank1"] <= m["rank5"] <= 1.0 and 0.0 < m["mAP"] <= 1.0
    assert os.path.isfile(tmp_path / "run" / "evaluation" / "metrics.json")
    table = task.format_metrics(metrics)
    assert table.splitlines()[2].startswith(f"| embedding, cosine | {100 * m['rank1']:.1f} |")


def test_triplet_under_two_replicas_needs_whole_identities_per_replica():
    from reid_keras.training.distribute import mirrored_strategy

    strategy = mirrored_strategy(["/cpu:0", "/cpu:1"])
    with strategy.scope(), pytest.raises(ValueError, match=r"P = 3 identities per batch is not a multiple of the 2 "
                                                           r"replicas.*use P = 4"):
        ClassifierTask(task_config(P=3)).build(num_train_ids=3)  # refused before any layer is built
    ClassifierTask(task_config(P=4)).check_batch_slices(2)
    ClassifierTask(task_config(P=3, losses="id")).check_batch_slices(2)  # no mining: any P
    ClassifierTask(task_config(P=3)).check_batch_slices(1)
