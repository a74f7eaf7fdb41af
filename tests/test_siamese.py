"""Siamese EfficientNet model, backbone weights handling and presets (issue 4 items 1, 2).

EfficientNet graphs are slow to build on two CPU cores: models are shared through module-scoped
fixtures, inputs are 32x32 and weights are random (no network here).
"""
import hashlib
import urllib.error

import h5py
import keras
import numpy as np
import pytest
from keras.src.applications import efficientnet as keras_efficientnet  # WEIGHTS_HASHES, for the fake cache
from keras.src.backend import config as keras_config  # KERAS_HOME as Keras read it at import
from keras.src.legacy.saving import legacy_h5_format  # writes the .h5 layout of Keras' ImageNet files
from keras.src.utils import file_utils

from reid_keras.io_utils import atomic_save_keras
from reid_keras.models import backbones
from reid_keras.models.backbones import WeightsUnavailableWarning, build_backbone
from reid_keras.models.layers import SquareLayer
from reid_keras.families import get_preset, presets
from reid_keras.families.siamese import PRESETS
from reid_keras.models.siamese import (SAME_INDEX, build_siamese, compile_siamese, head_of, loss_and_metrics,
                                       same_probability)
from reid_keras.training.optimizers import make_optimizer
from tests.fixtures.siamese_models import IMAGE_SIZE, calibrate_batchnorm, calibrated_siamese, random_images

# keras.applications' documented parameter counts for include_top=False (keras.io/api/applications)
BACKBONE_PARAMS = {"efficientnetb0": 4_049_571, "efficientnetb1": 6_575_239, "efficientnetb2": 7_768_569,
                   "efficientnetb3": 10_783_535, "efficientnetb4": 17_673_823, "efficientnetb5": 28_513_527}


@pytest.fixture(scope="module")
def siamese():
    return calibrated_siamese("softmax", seed=0)


@pytest.fixture(scope="module")
def pairs():
    return random_images(4, seed=1), random_images(4, seed=2)


def test_structure_and_shared_embedding(siamese):
    names = [t.name for t in siamese.inputs]
    assert names == ["image_a", "image_b"]
    assert [tuple(t.shape) for t in siamese.inputs] == [(None, 32, 32, 3)] * 2
    assert tuple(siamese.outputs[0].shape) == (None, 2)
    embedding = siamese.get_layer("embedding")
    assert isinstance(embedding, keras.Model) and len(embedding.inputs) == 1
    assert tuple(embedding.outputs[0].shape) == (None, 1280)
    assert isinstance(siamese.get_layer("square"), SquareLayer)
    # one backbone shared by both branches: only the 2-way head adds parameters
    assert siamese.count_params() == BACKBONE_PARAMS["efficientnetb0"] + 1280 * 2 + 2
    assert head_of(siamese) == "softmax"


def test_pair_probability_follows_the_square_layer(siamese, pairs):
    a, b = pairs
    probs = keras.ops.convert_to_numpy(siamese([a, b], training=False))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    assert probs[:, SAME_INDEX].std() > 1e-3, "calibrated model should give input-dependent probabilities"
    # (f1 - f2)^2 is symmetric: swapping the images does not change the answer
    np.testing.assert_allclose(siamese([b, a], training=False), probs, rtol=1e-5, atol=1e-6)
    # recompute the head by hand from the shared embedding
    emb = siamese.get_layer("embedding")
    fs = (keras.ops.convert_to_numpy(emb(a)) - keras.ops.convert_to_numpy(emb(b))) ** 2
    dense = siamese.get_layer("verification")
    logits = fs @ keras.ops.convert_to_numpy(dense.kernel) + keras.ops.convert_to_numpy(dense.bias)
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(same_probability(probs)), probs[:, 1])


def test_keras_round_trip_in_safe_mode(siamese, pairs, tmp_path):
    path = tmp_path / "best.keras"
    atomic_save_keras(siamese, str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.keras"]  # no temporary left behind
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded.get_layer("square"), SquareLayer)
    np.testing.assert_allclose(loaded(list(pairs), training=False), siamese(list(pairs), training=False),
                               rtol=1e-5, atol=1e-6)


def test_backbone_parameter_counts_b0_to_b5():
    for name, expected in BACKBONE_PARAMS.items():
        model, info = build_backbone(name, (32, 32), weights=None)
        assert model.count_params() == expected, name
        assert model.name == name and info.used == "none"


def test_optimizer_steps_lower_the_loss_on_a_fixed_batch():
    keras.utils.set_random_seed(1)
    model = build_siamese("efficientnetb0", IMAGE_SIZE, weights=None, dropout=0.0)
    # EfficientNet's stochastic depth would make training-mode losses random: switch it off so
    # the before/after comparison is deterministic.
    for layer in model.get_layer("embedding").get_layer("efficientnetb0").layers:
        if isinstance(layer, keras.layers.Dropout):
            layer.rate = 0.0
    compile_siamese(model, make_optimizer("rmsprop", 1e-4))  # the paper's RMSprop 1e-4
    model.run_eagerly = True  # three steps: cheaper than tracing the train function
    a = random_images(6, seed=3)
    b = np.concatenate([a[:3], random_images(3, seed=4)])
    same = np.array([1, 1, 1, 0, 0, 0])
    loss_fn, _ = loss_and_metrics("softmax")

    def loss():
        return float(loss_fn(same, model([a, b], training=True)))

    before = loss()
    for _ in range(3):
        model.train_on_batch([a, b], same)
    after = loss()
    assert after < 0.5 * before, (before, after)


def test_sigmoid_head_and_loss_conventions():
    model = build_siamese("efficientnetb0", IMAGE_SIZE, weights=None, head="sigmoid")
    assert tuple(model.outputs[0].shape) == (None, 1) and head_of(model) == "sigmoid"
    p = np.array([[0.9], [0.2]], dtype="float32")
    bce, metrics = loss_and_metrics("sigmoid")
    same = np.array([1, 0])
    assert float(bce(same, p)) == pytest.approx(-(np.log(0.9) + np.log(0.8)) / 2, rel=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(same_probability(p)), [0.9, 0.2])
    # softmax head: label 1 (same) is scored by column SAME_INDEX = 1
    q = np.array([[0.3, 0.7], [0.6, 0.4]], dtype="float32")
    ce, metrics = loss_and_metrics("softmax")
    assert float(ce(same, q)) == pytest.approx(-(np.log(0.7) + np.log(0.6)) / 2, rel=1e-5)
    assert metrics[0].name == "accuracy"


def test_bad_arguments_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown preset 'siamese_b9'.*siamese_b0, siamese_b1"):
        get_preset("siamese_b9")
    for size in [(16, 16), (160,), ("a", 80), (160.5, 80)]:
        with pytest.raises(ValueError, match="bad image_size"):
            build_siamese(image_size=size)
    with pytest.raises(ValueError, match="unknown backbone 'resnet18'.*efficientnetb0"):
        build_siamese(backbone="resnet18")
    with pytest.raises(ValueError, match="unknown head"):
        build_siamese(head="softmax3")
    with pytest.raises(ValueError, match="dropout"):
        build_siamese(dropout=1.5)
    missing = tmp_path / "nope.weights.h5"
    with pytest.raises(ValueError, match="nope.weights.h5.*no such file"):
        build_backbone("b0", (32, 32), weights=str(missing))
    bad = tmp_path / "weights.txt"
    bad.write_text("x")
    with pytest.raises(ValueError, match=r"weights\.txt.*\.h5"):
        build_backbone("b0", (32, 32), weights=str(bad))


def test_presets_hold_the_paper_recipe():
    from reid_keras.data.augment import AugmentConfig

    assert sorted(k for k in presets() if k.startswith("siamese")) == [f"siamese_b{i}" for i in range(6)]
    for i in range(6):
        family, entry = get_preset(f"siamese_b{i}")
        preset = entry.resolve("paper")
        assert family.name == "siamese" and preset.backbone == f"efficientnetb{i}"
        assert preset.image_size == (160, 80)
        assert (preset.optimizer, preset.learning_rate, preset.batch_size, preset.epochs) == \
            ("rmsprop", 1e-4, 48, 18)
        assert preset.pair_ratio == 1.0 and preset.head == "softmax"
        assert preset.preprocessing == "efficientnet" and 0 < preset.dropout < 1
        assert preset.augment_config() == AugmentConfig.efficientnet_paper()
    copy = get_preset("siamese_b0")[1].resolve("paper")
    copy.augment["flip"] = False
    assert PRESETS["siamese_b0"].recipe.augment["flip"] is True  # callers get a deep copy


# --- weights: imagenet through Keras' cache, offline fallback, files and checkpoints ---------------

@pytest.fixture
def empty_keras_home(tmp_path, monkeypatch):
    home = tmp_path / "keras_home"
    home.mkdir()  # Keras creates its home folder at import; get_file falls back to /tmp without it
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(home))
    return home


def _no_download(*args, **kwargs):
    raise AssertionError(f"unexpected download attempt {args[:1]}")


def test_imagenet_offline_falls_back_to_random_init_with_a_warning(empty_keras_home, monkeypatch):
    monkeypatch.setattr(backbones, "host_resolves", lambda host, timeout: False)
    monkeypatch.setattr(file_utils, "urlretrieve", _no_download)
    with pytest.warns(WeightsUnavailableWarning) as caught:
        model, info = build_backbone("efficientnetb0", (32, 32), weights="imagenet")
    text = str(caught[0].message)
    cache = str(empty_keras_home / "models")
    assert "efficientnetb0_notop.h5" in text and cache in text and "RANDOM" in text
    assert (info.requested, info.used, info.warning) == ("imagenet", "none", text)
    assert info.file == f"{cache}/efficientnetb0_notop.h5" and info.cache_dir == cache
    assert info.to_dict()["used"] == "none"
    # random-init stem: only Rescaling(1/255), not the ImageNet std rescaling
    assert sum(isinstance(l, keras.layers.Rescaling) for l in model.layers) == 1


def test_imagenet_download_failure_falls_back(empty_keras_home, monkeypatch):
    calls = []

    def failing_urlretrieve(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(backbones, "host_resolves", lambda host, timeout: True)
    monkeypatch.setattr(file_utils, "urlretrieve", failing_urlretrieve)
    with pytest.warns(WeightsUnavailableWarning, match="network is unreachable"):
        _, info = build_backbone("efficientnetb0", (32, 32), weights="imagenet")
    assert calls == ["https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5"]
    assert info.used == "none" and "efficientnetb0_notop.h5" in info.warning


def _fake_imagenet_backbone():
    """A B0 with recognisable weights and the ImageNet stem statistics of Keras' file."""
    keras.utils.set_random_seed(5)
    model = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(32, 32, 3))
    norm = backbones._stem_normalization(model)
    norm.adapt_mean.assign([0.485, 0.456, 0.406])
    norm.adapt_variance.assign([0.229, 0.224, 0.225])
    norm.finalize_state()
    calibrate_batchnorm(model, random_images(8, seed=7))  # well-scaled features, see fixtures
    return model


def test_imagenet_weights_are_read_from_the_keras_cache(empty_keras_home, monkeypatch, tmp_path):
    source = _fake_imagenet_backbone()
    cache = empty_keras_home / "models"
    cache.mkdir()
    cached = cache / "efficientnetb0_notop.h5"
    with h5py.File(cached, "w") as handle:  # the layout of Keras' own ImageNet file
        legacy_h5_format.save_weights_to_hdf5_group(handle, source)
    md5 = hashlib.md5(cached.read_bytes()).hexdigest()
    hashes = dict(keras_efficientnet.WEIGHTS_HASHES)
    hashes["b0"] = (hashes["b0"][0], md5)  # Keras checks the cached file's hash before using it
    monkeypatch.setattr(keras_efficientnet, "WEIGHTS_HASHES", hashes)
    monkeypatch.setattr(file_utils, "urlretrieve", _no_download)

    model, info = build_backbone("efficientnetb0", (32, 32), weights="imagenet")
    assert (info.used, info.file, info.warning, info.imagenet_stem) == ("imagenet", str(cached), None, True)
    for got, want in zip(model.get_weights(), source.get_weights()):
        np.testing.assert_array_equal(got, want)
    # Keras' ImageNet stem: Rescaling(1/255), Normalization, Rescaling(1/sqrt(std))
    stem = [type(l).__name__ for l in model.layers[1:4]]
    assert stem == ["Rescaling", "Normalization", "Rescaling"]

    # The same weights by file path keep that stem (the trap of loading ImageNet weights by path)
    path = tmp_path / "backbone.weights.h5"
    model.save_weights(path)
    x = random_images(2, seed=9)
    for weights in (str(path), str(cached)):
        again, info = build_backbone("efficientnetb0", (32, 32), weights=weights)
        assert info.used == "file" and info.imagenet_stem
        np.testing.assert_allclose(again(x), model(x), rtol=1e-5, atol=1e-4)
    # the stem really matters: without it the features differ
    plain = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=(32, 32, 3))
    plain.set_weights(model.get_weights())
    backbones._stem_normalization(plain).finalize_state()
    features = keras.ops.convert_to_numpy(model(x))
    assert features.std() > 0.1
    assert np.abs(keras.ops.convert_to_numpy(plain(x)) - features).max() > 0.1 * features.std()


def test_random_init_weights_file_keeps_the_plain_stem(tmp_path):
    keras.utils.set_random_seed(6)
    source, _ = build_backbone("efficientnetb0", (32, 32), weights=None)
    path = tmp_path / "plain.weights.h5"
    source.save_weights(path)
    model, info = build_backbone("efficientnetb0", (48, 32), weights=str(path))
    assert info.used == "file" and not info.imagenet_stem
    for got, want in zip(model.get_weights(), source.get_weights()):
        np.testing.assert_array_equal(got, want)
    assert tuple(model.input.shape) == (None, 48, 32, 3)


def test_keras_checkpoint_as_backbone_weights(siamese, tmp_path):
    path = tmp_path / "ckpt.keras"
    atomic_save_keras(siamese, str(path))
    model, info = build_siamese("efficientnetb0", IMAGE_SIZE, weights=str(path), return_weights_info=True)
    assert info.used == "checkpoint" and info.file == str(path)
    x = random_images(3, seed=11)
    np.testing.assert_allclose(model.get_layer("embedding")(x), siamese.get_layer("embedding")(x),
                               rtol=1e-5, atol=1e-4)
    with pytest.raises(ValueError, match="checkpoint's backbone is efficientnetb0, but efficientnetb1"):
        build_backbone("efficientnetb1", (32, 32), weights=str(path))


def test_gradient_accumulation_equals_one_big_batch():
    """Two micro-batches of 2 pairs with accumulate_steps=2 make the same update as one batch of 4."""
    from reid_keras.training.optimizers import micro_batch_size

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(4, 6)).astype("float32"), rng.normal(size=(4, 6)).astype("float32")
    same = np.array([1, 0, 1, 0])

    def pair_model():
        keras.utils.set_random_seed(1)
        xa, xb = keras.Input((6,)), keras.Input((6,))
        dense = keras.layers.Dense(3, name="shared")
        square = SquareLayer()([dense(xa), dense(xb)])
        return keras.Model([xa, xb], keras.layers.Dense(2, activation="softmax")(square))

    whole, micro = pair_model(), pair_model()
    compile_siamese(whole, make_optimizer("sgd", 0.1), jit_compile=False)
    compile_siamese(micro, make_optimizer("sgd", 0.1, accumulate_steps=2), jit_compile=False)
    whole.fit([a, b], same, batch_size=4, epochs=1, shuffle=False, verbose=0)
    micro.fit([a, b], same, batch_size=2, epochs=1, shuffle=False, verbose=0)
    for w, m in zip(whole.get_weights(), micro.get_weights()):
        np.testing.assert_allclose(m, w, rtol=1e-5, atol=1e-6)
    assert not np.allclose(whole.get_weights()[0], pair_model().get_weights()[0])  # it did train

    assert micro_batch_size(48, 2) == 24 and micro_batch_size(48, None) == 48
    with pytest.raises(ValueError, match="--accumulate-steps 5 must be >= 1 and divide --batch-size 48"):
        micro_batch_size(48, 5)
    with pytest.raises(ValueError, match="accumulate_steps must be >= 1"):
        compile_siamese(pair_model(), make_optimizer(accumulate_steps=0))


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_verification_distance_is_the_heads_logit_in_closed_form(head):
    """-(logit same - logit different) from three matrix products equals the model's own output, up
    to the bias (a constant per model), for every query x gallery pair."""
    from reid_keras.families.siamese import verification_distance

    model = calibrated_siamese(head=head, seed=2, kernel_scale=1e-5)  # no saturated probabilities
    query, gallery = random_images(3, seed=5), random_images(4, seed=6)
    embedding = model.get_layer("embedding")
    distmat = verification_distance(model, np.asarray(embedding(query)), np.asarray(embedding(gallery)))
    a = np.repeat(query, len(gallery), axis=0)
    b = np.tile(gallery, (len(query), 1, 1, 1))
    probs = np.asarray(model([a, b], training=False), dtype=np.float64)
    if head == "softmax":
        logit = np.log(probs[:, 1]) - np.log(probs[:, 0])
        bias = model.get_layer("verification").bias.numpy()
        logit -= bias[1] - bias[0]
    else:
        logit = np.log(probs[:, 0]) - np.log1p(-probs[:, 0]) - model.get_layer("verification").bias.numpy()[0]
    np.testing.assert_allclose(distmat.reshape(-1), -logit, rtol=1e-3, atol=1e-4)
    assert np.ptp(logit) > 1e-2  # the comparison is sensitive: logits differ between pairs


# --- the non-negative diagonal metric head (issue 12 item 7) -----------------------------------------

@pytest.fixture(scope="module")
def nonneg_siamese():
    from tests.fixtures.siamese_models import calibrate_batchnorm

    keras.utils.set_random_seed(3)
    model = build_siamese("efficientnetb0", IMAGE_SIZE, weights=None, head_metric="nonneg")
    calibrate_batchnorm(model.get_layer("embedding"), random_images(16, seed=103))
    # calibrated features are large (std ~20): small random weights keep P(same) away from 0 and 1
    layer = model.get_layer("verification")
    layer.metric.assign(np.random.default_rng(3).uniform(0, 2e-6, layer.metric.shape).astype("float32"))
    return model


def test_nonneg_head_on_the_siamese_model_ranks_by_its_own_logit(nonneg_siamese, tmp_path):
    """The head adds 1280 + 1 weights; `verification_distance` (written for a Dense head) reads it with the
    right sign: its distance is -(logit same - logit different) of the model's own output; .keras round trip."""
    from reid_keras.families.siamese import verification_distance
    from reid_keras.models.layers import DiagonalMetricHead
    from reid_keras.models.siamese import head_metric_of

    model = nonneg_siamese
    assert model.count_params() == BACKBONE_PARAMS["efficientnetb0"] + 1280 + 1
    assert head_of(model) == "softmax" and head_metric_of(model) == "nonneg"
    query, gallery = random_images(3, seed=5), random_images(4, seed=6)
    embedding = model.get_layer("embedding")
    distmat = verification_distance(model, np.asarray(embedding(query)), np.asarray(embedding(gallery)))
    a = np.repeat(query, len(gallery), axis=0)
    b = np.tile(gallery, (len(query), 1, 1, 1))
    probs = np.asarray(model([a, b], training=False), dtype=np.float64)
    logit = np.log(probs[:, 1]) - np.log(probs[:, 0]) - float(model.get_layer("verification").threshold.numpy())
    np.testing.assert_allclose(distmat.reshape(-1), -logit, rtol=1e-3, atol=1e-4)
    assert np.ptp(logit) > 1e-2 and (distmat >= 0).all()  # a weighted squared distance, pairs differ

    path = tmp_path / "nonneg.keras"
    atomic_save_keras(model, str(path))
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded.get_layer("verification"), DiagonalMetricHead)
    np.testing.assert_allclose(loaded([a, b], training=False), probs, rtol=1e-5, atol=1e-6)


def test_presets_choose_the_head_metric():
    from reid_keras.families.siamese import SiameseRecipe

    entry = get_preset("siamese_b0")[1]
    assert entry.resolve("paper").head_metric == "free"  # §II.C: a Dense on (f1 - f2)^2
    assert entry.resolve("default").head_metric == "nonneg"
    assert SiameseRecipe().head_metric == "free"
    with pytest.raises(ValueError, match="unknown head_metric 'l2': expected one of nonneg, free"):
        SiameseRecipe(head_metric="l2")
    with pytest.raises(ValueError, match="unknown head_metric 'l2': expected one of nonneg, free"):
        build_siamese(head_metric="l2")


@pytest.mark.parametrize("recipe, layer_type", [
    ("paper", "Dense"), ("default", "DiagonalMetricHead")])
def test_task_builds_the_recipes_head(recipe, layer_type):
    from reid_keras.families.siamese import SiameseTask

    values = get_preset("siamese_b0")[1].resolve(recipe).replace(image_size=IMAGE_SIZE, weights="none")
    model, _ = SiameseTask(values).build(num_train_ids=4)
    assert type(model.get_layer("verification")).__name__ == layer_type
