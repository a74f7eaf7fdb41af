"""Identification + verification model (models/idver.py), presets and trainer task (families/idver.py).

Losses are checked against numpy written here from the model's own outputs. The ResNet-50 model is
built once per module (64x32 inputs, random weights); variants use VGG16 at 32x32, which builds in
a fraction of a second.
"""
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from reid_keras.families.idver import PRESETS, IdVerTask, crop_size, idver_image_size
from reid_keras.models.idver import (LOSS_WEIGHTS, PairDistance, build_idver, compile_idver, has_verification_head,
                                     verification_view)
from reid_keras.models.layers import SquareLayer
from reid_keras.training.optimizers import StepDecayByEpoch, make_optimizer
from tests.fixtures.siamese_models import calibrate_batchnorm
from tests.fixtures.tiny_images import write_reid_set

SIZE = (64, 32)
NUM_IDS = 6
CAFFE_MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)


def caffe(images):
    """Caffe preprocessing, written out independently: RGB -> BGR, minus the ImageNet means."""
    return np.asarray(images, np.float32)[..., ::-1] - CAFFE_MEAN_BGR


def pixels(n, seed, size=SIZE):
    return np.random.default_rng(seed).uniform(0, 255, (n, *size, 3)).astype("float32")


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs, labels):
    return -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0))


def set_kernel(model, name, inputs, seed):
    """Gaussian kernel scaled so that the layer's logits on `inputs` have a standard deviation ~1:
    probabilities then vary with the input but stay away from 0 and 1."""
    dense = model.get_layer(name)
    rms = float(np.sqrt(np.mean(np.square(inputs))))
    kernel = np.random.default_rng(seed).normal(0.0, 1.0, tuple(dense.kernel.shape))
    dense.kernel.assign(kernel / (np.sqrt(inputs.shape[1]) * rms))


@pytest.fixture(scope="module")
def resnet_idver():
    """ResNet-50 I+V model with calibrated BatchNorm statistics (input-dependent features, see
    tests/fixtures/siamese_models.py) and head kernels of a known scale."""
    keras.utils.set_random_seed(0)
    model = build_idver(NUM_IDS, "resnet50", SIZE, weights=None)
    embedding = model.get_layer("embedding")
    calibrate_batchnorm(embedding, caffe(pixels(16, seed=100)))
    f1, f2 = (np.asarray(embedding(caffe(pixels(8, seed=s)), training=False)) for s in (101, 102))
    set_kernel(model, "identity", f1, seed=0)
    set_kernel(model, "verification", (f1 - f2) ** 2, seed=1)
    return model


@pytest.fixture(scope="module")
def batch():
    a, b = caffe(pixels(6, seed=1)), caffe(pixels(6, seed=2))
    targets = {"id_a": np.array([0, 1, 2, 3, 4, 5]), "id_b": np.array([0, 2, 2, 5, 1, 5]),
               "verification": np.array([1, 0, 1, 0, 0, 1])}
    return (a, b), targets


def test_heads_share_one_identification_layer(resnet_idver, batch):
    model = resnet_idver
    (a, b), _ = batch
    assert [t.name for t in model.inputs] == ["image_a", "image_b"]
    assert list(model.output) == ["id_a", "id_b", "verification"]
    assert isinstance(model.get_layer("square"), SquareLayer)
    embedding = model.get_layer("embedding")
    assert tuple(embedding.outputs[0].shape) == (None, 2048)
    backbone = embedding.get_layer("resnet50").count_params()
    # one backbone and one identification layer for both images, plus the 2-way verification layer
    assert model.count_params() == backbone + (2048 * NUM_IDS + NUM_IDS) + (2048 * 2 + 2)

    out = {k: np.asarray(v) for k, v in model((a, b), training=False).items()}
    f1 = np.asarray(embedding(a, training=False), np.float64)
    f2 = np.asarray(embedding(b, training=False), np.float64)
    w, bias = (np.asarray(v, np.float64) for v in model.get_layer("identity").weights)
    np.testing.assert_allclose(out["id_a"], softmax(f1 @ w + bias), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["id_b"], softmax(f2 @ w + bias), rtol=1e-4, atol=1e-6)
    wv, bv = (np.asarray(v, np.float64) for v in model.get_layer("verification").weights)
    np.testing.assert_allclose(out["verification"], softmax((f1 - f2) ** 2 @ wv + bv), rtol=1e-4, atol=1e-6)
    assert out["id_a"].std() > 1e-3 and out["verification"][:, 1].std() > 1e-3, "outputs must vary with input"


def test_total_loss_is_half_id_a_plus_half_id_b_plus_verification(resnet_idver, batch):
    model = resnet_idver
    (a, b), targets = batch
    # predict runs the same graph as evaluate (eager and graph ResNet-50 differ by float32 rounding)
    out = {k: np.asarray(v, np.float64) for k, v in model.predict((a, b), batch_size=6, verbose=0).items()}
    id_a = nll(out["id_a"], targets["id_a"]).mean()
    id_b = nll(out["id_b"], targets["id_b"]).mean()
    verif = nll(out["verification"], targets["verification"]).mean()
    assert min(id_a, id_b, verif) > 0.05

    compile_idver(model, make_optimizer("sgd", 1e-3, momentum=0.9))
    result = model.evaluate((a, b), targets, batch_size=6, verbose=0, return_dict=True)
    assert result["loss"] == pytest.approx(0.5 * id_a + 0.5 * id_b + verif, rel=1e-5)
    assert result["id_a_loss"] == pytest.approx(id_a, rel=1e-5)
    assert result["verification_loss"] == pytest.approx(verif, rel=1e-5)
    assert LOSS_WEIGHTS["id_a"] == LOSS_WEIGHTS["id_b"] == 0.5 and LOSS_WEIGHTS["verification"] == 1.0

    # label smoothing eps: (1 - eps) * nll + eps * mean_k(-log p_k) on the identification losses only
    eps = 0.2

    def smoothed(p, y):
        return ((1 - eps) * nll(p, y) + eps * -np.log(p).mean(axis=1)).mean()

    compile_idver(model, make_optimizer("sgd", 1e-3, momentum=0.9), label_smoothing=eps)
    result = model.evaluate((a, b), targets, batch_size=6, verbose=0, return_dict=True)
    want = 0.5 * smoothed(out["id_a"], targets["id_a"]) + 0.5 * smoothed(out["id_b"], targets["id_b"]) + verif
    assert result["loss"] == pytest.approx(want, rel=1e-5)


def test_embedding_export_round_trip(resnet_idver, tmp_path):
    from reid_keras.models.saved_model import load_export

    model = resnet_idver
    config = PRESETS["resnet50_idver"].recipe.replace(image_size=SIZE)
    IdVerTask(config).export(model, str(tmp_path / "export"))
    loaded, metadata = load_export(str(tmp_path / "export"))
    assert metadata["preprocessing"] == "caffe" and metadata["image_size"] == list(SIZE)
    assert metadata["feature_dim"] == 2048
    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, (3, 90, 41, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (3, 64, 32, 3), dtype=np.uint8)
    resized_a = tf.image.resize(a.astype(np.float32), SIZE, method="bilinear", antialias=False).numpy()
    features = np.asarray(model.get_layer("embedding")(caffe(resized_a), training=False))
    want = features / np.linalg.norm(features, axis=1, keepdims=True)
    np.testing.assert_allclose(loaded.embed(a).numpy(), want, atol=1e-5)
    probs = np.asarray(model((caffe(resized_a), caffe(b.astype(np.float32))), training=False)["verification"])
    # (f1 - f2)^2 amplifies the float32 rounding differences of the SavedModel's ResNet-50 graph
    np.testing.assert_allclose(loaded.verify(a, b).numpy(), probs[:, 1], atol=1e-4)


def test_variants_have_the_right_heads():
    keras.utils.set_random_seed(1)
    only_id = build_idver(5, "vgg16", (32, 32), losses="id")
    assert list(only_id.output) == ["id_a", "id_b"] and not has_verification_head(only_id)
    names = {layer.name for layer in only_id.layers}
    assert "identity" in names and not names & {"square", "verification", "verif_dropout"}
    with pytest.raises(ValueError, match="no verification head"):
        verification_view(only_id)
    # new heads start small (std 0.001, zero bias): near-uniform probabilities at step 0
    kernel, bias = (np.asarray(v) for v in only_id.get_layer("identity").weights)
    assert kernel.std() == pytest.approx(0.001, rel=0.1) and not bias.any()

    only_verif = build_idver(5, "vgg16", (32, 32), losses="verif")
    assert list(only_verif.output) == ["verification"] and has_verification_head(only_verif)
    assert "identity" not in {layer.name for layer in only_verif.layers}
    assert only_verif.count_params() == only_verif.get_layer("embedding").count_params() + 512 * 2 + 2
    view = verification_view(only_verif)
    assert len(view.outputs) == 1 and tuple(view.outputs[0].shape) == (None, 2)


def test_contrastive_variant_distance_and_loss():
    keras.utils.set_random_seed(2)
    model = build_idver(4, "vgg16", (32, 32), verif_loss="contrastive")
    assert list(model.output) == ["id_a", "id_b", "distance"] and not has_verification_head(model)
    assert isinstance(model.get_layer("pair_distance"), PairDistance)
    a, b = caffe(pixels(4, 5, (32, 32))), caffe(pixels(4, 6, (32, 32)))
    b[0] = a[0]  # identical images: distance ~0 (finite gradient thanks to epsilon)
    targets = {"id_a": np.array([0, 1, 2, 3]), "id_b": np.array([0, 1, 3, 2]), "distance": np.array([1, 1, 0, 0])}
    out = {k: np.asarray(v, np.float64) for k, v in model((a, b), training=False).items()}
    embedding = model.get_layer("embedding")
    f1, f2 = (np.asarray(embedding(x, training=False), np.float64) for x in (a, b))
    n1 = f1 / np.linalg.norm(f1, axis=1, keepdims=True)
    n2 = f2 / np.linalg.norm(f2, axis=1, keepdims=True)
    d = np.linalg.norm(n1 - n2, axis=1)
    np.testing.assert_allclose(out["distance"][:, 0], d, atol=1e-5)
    assert d[0] < 1e-5 < d[1:].min()

    margin = 0.7
    compile_idver(model, make_optimizer("adam"), contrastive_margin=margin)
    y = targets["distance"]
    contrastive = (y * d ** 2 + (1 - y) * np.maximum(margin - d, 0) ** 2).mean()
    want = 0.5 * nll(out["id_a"], targets["id_a"]).mean() + 0.5 * nll(out["id_b"], targets["id_b"]).mean() \
        + contrastive
    result = model.evaluate((a, b), targets, batch_size=4, verbose=0, return_dict=True)
    assert result["loss"] == pytest.approx(want, rel=1e-4)
    # no dropout between the features and the distance (paper §II-C), so training mode changes nothing
    np.testing.assert_allclose(np.asarray(model((a, b), training=True)["distance"]), out["distance"], atol=1e-5)


def test_models_without_the_softmax_head_export_embed_only(tmp_path):
    from reid_keras.models.saved_model import load_export

    keras.utils.set_random_seed(4)
    model = build_idver(4, "vgg16", (32, 32), losses="verif", verif_loss="contrastive")
    assert list(model.output) == ["distance"]  # one (batch, 1) output, but not a pair probability
    config = PRESETS["resnet50_verif"].recipe.replace(backbone="vgg16", verif_loss="contrastive", image_size=(32, 32))
    IdVerTask(config).export(model, str(tmp_path / "export"))
    loaded, metadata = load_export(str(tmp_path / "export"))
    assert metadata["head"] is None and list(metadata["endpoints"]) == ["embed"] and not hasattr(loaded, "verify")
    images = np.random.default_rng(5).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    features = np.asarray(model.get_layer("embedding")(caffe(images), training=False))
    np.testing.assert_allclose(loaded.embed(images).numpy(),
                               features / np.linalg.norm(features, axis=1, keepdims=True), atol=1e-5)


@pytest.mark.slow
def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    keras.utils.set_random_seed(3)
    model = build_idver(4, "resnet50", (32, 32), dropout=0.0)  # no dropout: the steps are deterministic
    compile_idver(model, make_optimizer("adam", 1e-3))
    model.run_eagerly = True  # six eager steps cost less than tracing ResNet-50's backward graph
    a, b = caffe(pixels(8, 7, (32, 32))), caffe(pixels(8, 8, (32, 32)))
    targets = {"id_a": np.array([0, 1, 2, 3, 0, 1, 2, 3]), "id_b": np.array([0, 2, 2, 1, 3, 1, 0, 3]),
               "verification": np.array([1, 0, 1, 0, 0, 1, 0, 1])}
    # one batch per epoch: history[i] is the loss of step i, before its update
    history = model.fit((a, b), targets, batch_size=8, epochs=6, verbose=0, shuffle=False).history
    assert history["loss"][0] == pytest.approx(0.5 * np.log(4) * 2 + np.log(2), rel=0.1)  # near-uniform heads
    assert np.isfinite(history["loss"]).all() and history["loss"][-1] < 0.5 * history["loss"][0]
    for head in ("id_a_loss", "id_b_loss", "verification_loss"):
        assert history[head][-1] < history[head][0], head


def test_learning_rate_drops_for_the_final_epochs():
    schedule = StepDecayByEpoch(1e-3, 1e-4, decay_epoch=70, steps_per_epoch=10)
    rates = [float(schedule(step)) for step in (0, 699, 700, 749)]
    assert rates == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])
    again = StepDecayByEpoch.from_config(schedule.get_config())
    assert float(again(700)) == pytest.approx(1e-4)
    with pytest.raises(ValueError, match="steps_per_epoch is not set"):
        StepDecayByEpoch(1e-3, 1e-4, decay_epoch=1)(0)


def test_presets_hold_the_paper_recipe():
    from reid_keras.data.samplers import PairRatioSchedule

    expected = {"resnet50_idver": ("resnet50", "id+verif", 75), "resnet50_id": ("resnet50", "id", 75),
                "resnet50_verif": ("resnet50", "verif", 75), "vgg16_idver": ("vgg16", "id+verif", 65)}
    from reid_keras.families import get_preset

    for name, (backbone, losses, epochs) in expected.items():
        family, preset = get_preset(name)
        p = preset.recipe
        assert (family.name, p.backbone, p.losses, p.epochs) == ("idver", backbone, losses, epochs)
        assert (p.optimizer, p.momentum, p.learning_rate, p.lr_drop_epochs, p.lr_drop_factor) == \
            ("sgd", 0.9, 1e-3, 5, 0.1)
        assert p.batch_size == 48 and p.pair_ratio == "idver" and p.preprocessing == "caffe"
        assert p.loss_weights == {"id_a": 0.5, "id_b": 0.5, "verification": 1.0}
        assert p.verif_loss == "crossentropy" and p.weights == "imagenet"
        assert preset.resolve("paper") == p  # the paper recipe is the preset's values unchanged
        task = IdVerTask(p)
        assert task.image_size == (224, 224)
        assert task.augment().crop == (256, 256) and task.augment().flip  # §III-F 256 -> 224 crop + mirror
    assert PairRatioSchedule.idver().negatives_per_positive(200) == 4.0
    person = PRESETS["resnet50_idver"].recipe.replace(input_shape="person")
    assert idver_image_size(person) == (256, 128) and crop_size((256, 128), 256 / 224) == (293, 146)
    with pytest.raises(ValueError, match="input_shape 'person'.*image_size is 64x32"):
        idver_image_size(person.replace(image_size=(64, 32)))
    with pytest.raises(ValueError, match="crop_scale must be > 1"):
        crop_size((64, 32), 0.8)
    with pytest.raises(ValueError, match="--losses 'both'.*id\\+verif, id, verif"):
        IdVerTask(person.replace(losses="both"))
    with pytest.raises(ValueError, match="--verif-loss 'hinge'"):
        IdVerTask(person.replace(verif_loss="hinge"))
    with pytest.raises(ValueError, match="num_ids must be an integer >= 2"):
        build_idver(1, "vgg16", (32, 32))


@pytest.mark.slow
def test_task_feeds_pairs_with_identities_and_trains(tmp_path):
    # 4 ids over 2 cameras; constant-colour images (tests/fixtures/tiny_images.py)
    records = write_reid_set(tmp_path / "train", [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 1), (2, 0, 1),
                                                  (2, 1, 2), (3, 0, 2), (3, 1, 2)])
    config = PRESETS["resnet50_idver"].resolve("default").replace(
        weights="none", image_size=SIZE, epochs=2, steps_per_epoch=2, batch_size=4, lr_drop_epochs=1)
    task = IdVerTask(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # weights none: no download attempt, no warning
        model, info = task.build(num_train_ids=4)
    assert info["used"] == "none" and list(model.output) == task.output_names()
    ds, steps = task.train_dataset(records, initial_epoch=0, epochs=2, global_batch=4)
    assert steps == 2 and task.augment().crop == (73, 37)
    (a, b), targets = next(iter(ds))
    assert tuple(a.shape) == tuple(b.shape) == (4, *SIZE, 3)
    assert sorted(targets) == ["id_a", "id_b", "verification"]
    pid_of = {r.path: r.pid for r in records}
    assert set(np.asarray(targets["id_a"]).tolist()) <= set(pid_of.values())
    np.testing.assert_array_equal(np.asarray(targets["verification"]),
                                  (np.asarray(targets["id_a"]) == np.asarray(targets["id_b"])).astype(int))
    # caffe-normalised pixels: BGR minus the means, so inside [-123.68, 255 - 103.939]
    assert float(tf.reduce_min(a)) >= -123.7 and float(tf.reduce_max(a)) <= 151.1

    history = model.fit(ds, epochs=1, steps_per_epoch=steps, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"][0]) and int(model.optimizer.iterations) == 2
    # lr_drop_epochs=1: the rate drops x0.1 for the last of the 2 epochs, which starts at step 2
    assert float(model.optimizer.learning_rate) == pytest.approx(0.1 * config.learning_rate)
