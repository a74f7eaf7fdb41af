"""Person-search ResNet-50 stem and conv5 identification net (issue 14, OIM paper §3.1, §5.1).

One random-initialised ResNet50 is built for the module and split once (builds are slow on two
cores); images are tiny. The train step is the only graph trace (~20 s).
"""
import hashlib

import h5py
import keras
import numpy as np
import pytest
from keras.src.applications import resnet as keras_resnet  # WEIGHTS_HASHES, for the fake cache
from keras.src.backend import config as keras_config  # KERAS_HOME as Keras read it at import
from keras.src.legacy.saving import legacy_h5_format  # writes the .h5 layout of Keras' ImageNet files
from keras.src.utils import file_utils

from reid_keras.models import backbones
from reid_keras.models.backbones import WeightsUnavailableWarning
from reid_keras.models.person_search import backbone
from reid_keras.models.person_search.backbone import (CONV5_OUTPUT, STEM_OUTPUT, InferenceModeModel,
                                                      build_resnet50, build_resnet50_parts, freeze_stem,
                                                      split_resnet50)

RESNET_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
RESNET50_NOTOP_PARAMS = 23_587_712  # keras.io/api/applications, include_top=False


def images(n, height, width, seed=0):
    return np.random.default_rng(seed).uniform(-120, 150, (n, height, width, 3)).astype("float32")


def regions(n, seed=1):
    return np.random.default_rng(seed).uniform(0, 2, (n, 14, 14, 1024)).astype("float32")


@pytest.fixture(scope="module")
def parts():
    keras.utils.set_random_seed(7)
    resnet, info = build_resnet50(None)
    stem, conv5 = split_resnet50(resnet)
    return resnet, info, stem, conv5


def _is_input(layer):
    return isinstance(layer, keras.layers.InputLayer)


def _stem_batch_norms(stem):
    return [layer for layer in stem.layers if isinstance(layer, keras.layers.BatchNormalization)]


def test_stem_has_stride_16_and_1024_channels(parts):
    _, info, stem, _ = parts
    assert (info.requested, info.used) == ("none", "none")
    assert tuple(stem.output.shape) == (None, None, None, 1024) and stem.name == "resnet50_stem"
    assert tuple(stem(images(1, 128, 192)).shape) == (1, 8, 12, 1024)
    assert tuple(stem(images(2, 100, 150)).shape) == (2, 7, 10, 1024)  # ceil(100/16), ceil(150/16)


def test_conv5_maps_pooled_regions_to_2048_by_average_pooling(parts):
    resnet, _, _, conv5 = parts
    assert tuple(conv5.input.shape) == (None, 14, 14, 1024) and tuple(conv5.output.shape) == (None, 2048)
    x = regions(3)
    got = keras.ops.convert_to_numpy(conv5(x))
    assert got.shape == (3, 2048)
    # the original graph's conv5_x (its own nodes, not our rewiring), 7x7 after the strided first unit
    original = keras.Model(resnet.get_layer(STEM_OUTPUT).output, resnet.get_layer(CONV5_OUTPUT).output)
    maps = keras.ops.convert_to_numpy(original(x))
    assert maps.shape == (3, 7, 7, 2048)
    np.testing.assert_allclose(got, maps.mean(axis=(1, 2)), rtol=1e-5, atol=1e-5)


def test_stem_and_conv5_are_the_resnet50_layers_shared_not_copied(parts):
    resnet, _, stem, conv5 = parts
    stem_layers = [layer for layer in stem.layers if not _is_input(layer)]
    conv5_layers = [layer for layer in conv5.layers if not _is_input(layer)]
    assert conv5_layers[-1].name == "conv5_pool" and isinstance(conv5_layers[-1], keras.layers.GlobalAveragePooling2D)
    resnet_layers = [layer for layer in resnet.layers if not _is_input(layer)]
    assert [layer.name for layer in stem_layers + conv5_layers[:-1]] == [layer.name for layer in resnet_layers]
    assert all(ours is theirs for ours, theirs in zip(stem_layers + conv5_layers[:-1], resnet_layers))
    assert stem_layers[0].name == "conv1_pad" and stem_layers[-1].name == STEM_OUTPUT
    assert conv5_layers[0].name == "conv5_block1_1_conv" and conv5_layers[-2].name == CONV5_OUTPUT
    ids = {id(variable) for variable in resnet.weights}
    assert all(id(variable) in ids for variable in stem.weights + conv5.weights)
    assert len(stem.weights) + len(conv5.weights) == len(resnet.weights)
    assert stem.count_params() + conv5.count_params() == resnet.count_params() == RESNET50_NOTOP_PARAMS
    # a change through the ResNet50 is seen by the stem: the same variable
    kernel = resnet.get_layer("conv1_conv").kernel
    assert stem.get_layer("conv1_conv").kernel is kernel


def test_conv1_and_every_stem_batch_norm_are_frozen_and_in_inference_mode(parts):
    _, _, stem, conv5 = parts
    stem_bns = _stem_batch_norms(stem)
    assert len(stem_bns) == 1 + (3 + 4 + 6) * 3 + 3  # conv1, 3 per unit of conv2..conv4_x, 3 shortcuts
    frozen = {layer.name for layer in stem.layers if not layer.trainable}
    assert frozen == {"conv1_conv"} | {layer.name for layer in stem_bns}
    assert all(layer.trainable for layer in conv5.layers)  # §5.1: conv5's BN stay "as normal"
    assert stem.trainable and type(stem) is InferenceModeModel
    x = images(2, 64, 64)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(stem(x, training=True)),
                                  keras.ops.convert_to_numpy(stem(x, training=False)))


def test_freeze_stem_restores_the_frozen_layers_after_an_enclosing_unfreeze(parts):
    _, _, stem, _ = parts
    expected = [layer.trainable for layer in stem.layers]
    stem.trainable = False  # e.g. a warm-up freezing the model, then unfreezing it:
    stem.trainable = True  # Keras sets the flag on every sub-layer
    assert stem.get_layer("conv1_conv").trainable and stem.get_layer("conv1_bn").trainable
    assert freeze_stem(stem) is stem
    assert [layer.trainable for layer in stem.layers] == expected


def test_inference_mode_model_ignores_training_even_for_a_trainable_batch_norm():
    inputs = keras.Input((3,))
    norm = keras.layers.BatchNormalization(momentum=0.5)
    outputs = norm(inputs)
    x = np.array([[1.0, 2.0, 3.0], [3.0, 6.0, 9.0]], "float32")
    forced = InferenceModeModel(inputs, outputs)
    assert norm.trainable
    np.testing.assert_array_equal(forced(x, training=True), forced(x, training=False))
    np.testing.assert_array_equal(norm.moving_mean.numpy(), np.zeros(3))
    # control: the plain functional model of the same layer trains it in batch-statistics mode
    keras.Model(inputs, outputs)(x, training=True)
    np.testing.assert_allclose(norm.moving_mean.numpy(), 0.5 * x.mean(axis=0))


@pytest.mark.slow
def test_a_train_step_leaves_the_frozen_stem_unchanged_and_trains_the_rest(parts):
    _, _, stem, conv5 = parts
    inputs = keras.Input((64, 64, 3))
    pooled = keras.layers.Resizing(14, 14, name="stand_in_roi_pooling")(stem(inputs))
    score = keras.layers.Dense(1, name="score")(conv5(pooled))
    model = keras.Model(inputs, score)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.1), loss="mse", jit_compile=False)

    frozen = [stem.get_layer("conv1_conv")] + _stem_batch_norms(stem)
    trained = [stem.get_layer(name) for name in ("conv2_block1_1_conv", "conv3_block2_2_conv", "conv4_block6_3_conv")]
    trained += [conv5.get_layer(name) for name in ("conv5_block1_1_conv", "conv5_block3_3_conv")]
    conv5_bn = conv5.get_layer("conv5_block1_1_bn")
    before = {variable.path: variable.numpy().copy() for layer in frozen + trained + [conv5_bn]
              for variable in layer.weights}

    loss = model.train_on_batch(images(2, 64, 64), np.array([[1.0], [-1.0]], "float32"))
    assert np.isfinite(loss)

    for layer in frozen:  # conv1 kernel + bias; every stem BN's gamma, beta, moving mean and variance
        for variable in layer.weights:
            np.testing.assert_array_equal(variable.numpy(), before[variable.path], err_msg=variable.path)
    for layer in trained:
        assert not np.array_equal(layer.kernel.numpy(), before[layer.kernel.path]), layer.name
    # the identification net's BN is "as normal" (§5.1): batch statistics move its moving mean
    assert not np.array_equal(conv5_bn.moving_mean.numpy(), before[conv5_bn.moving_mean.path])


def test_stem_and_conv5_round_trip_through_a_keras_file_in_safe_mode(parts, tmp_path):
    _, _, stem, conv5 = parts
    inputs = keras.Input((None, None, 3))
    pooled = keras.layers.Resizing(14, 14)(stem(inputs))
    model = keras.Model(inputs, conv5(pooled))
    path = str(tmp_path / "parts.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    loaded_stem, loaded_conv5 = loaded.get_layer(stem.name), loaded.get_layer(conv5.name)
    assert type(loaded_stem) is InferenceModeModel
    assert [(layer.name, layer.trainable) for layer in loaded_stem.layers] == \
           [(layer.name, layer.trainable) for layer in stem.layers]
    assert all(layer.trainable for layer in loaded_conv5.layers)
    x = images(1, 80, 48)
    np.testing.assert_allclose(loaded(x), model(x), rtol=1e-6, atol=1e-6)


def test_imagenet_weights_come_from_the_keras_cache_into_both_parts(parts, tmp_path, monkeypatch):
    resnet, _, _, _ = parts
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path))
    cache = tmp_path / "models"
    cache.mkdir()
    cached = cache / RESNET_FILE
    with h5py.File(cached, "w") as handle:  # the layout of Keras' own ImageNet file
        legacy_h5_format.save_weights_to_hdf5_group(handle, resnet)
    hashes = dict(keras_resnet.WEIGHTS_HASHES)
    hashes["resnet50"] = (hashes["resnet50"][0], hashlib.md5(cached.read_bytes()).hexdigest())
    monkeypatch.setattr(keras_resnet, "WEIGHTS_HASHES", hashes)
    monkeypatch.setattr(file_utils, "urlretrieve", _no_download)

    loaded, info = build_resnet50("imagenet")
    assert (info.used, info.file, info.warning) == ("imagenet", str(cached), None)
    stem, conv5 = split_resnet50(loaded)
    for name, part in (("conv1_conv", stem), ("conv4_block6_3_bn", stem), ("conv5_block3_3_conv", conv5)):
        for got, want in zip(part.get_layer(name).get_weights(), resnet.get_layer(name).get_weights()):
            np.testing.assert_array_equal(got, want)


def _no_download(*args, **kwargs):
    raise AssertionError(f"unexpected download attempt {args[:1]}")


def test_missing_imagenet_weights_warn_and_fall_back_like_every_backbone(tmp_path, monkeypatch):
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(tmp_path))
    monkeypatch.setattr(backbones, "host_resolves", lambda host, timeout: False)
    monkeypatch.setattr(file_utils, "urlretrieve", _no_download)
    with pytest.warns(WeightsUnavailableWarning) as caught:
        stem, conv5 = build_resnet50_parts("imagenet")
    text = str(caught[0].message)
    assert RESNET_FILE in text and str(tmp_path / "models") in text and "RANDOM" in text
    assert stem.count_params() + conv5.count_params() == RESNET50_NOTOP_PARAMS


def test_bad_arguments_are_named(parts):
    resnet, _, _, _ = parts
    inputs = keras.Input((8, 8, 3))
    not_resnet = keras.Model(inputs, keras.layers.Conv2D(4, 3, name="conv1_conv")(inputs), name="tiny")
    with pytest.raises(ValueError, match="resnet: 'tiny' has no layer 'conv4_block6_out'; expected the model of "
                                         r"build_resnet50 \(keras.applications.ResNet50, include_top=False\)"):
        split_resnet50(not_resnet)
    with pytest.raises(ValueError, match=r"input_shape must be \(height, width, 3\) .* got \(None, None, 1\)"):
        split_resnet50(resnet, input_shape=(None, None, 1))
    with pytest.raises(ValueError, match=r"input_shape must be .* got \(16, 16, 3\)"):
        backbone.build_stem(input_shape=(16, 16, 3))  # refused before any build: under keras' minimum 32
    with pytest.raises(ValueError, match=r"roi_size must be \(height, width\), two integers >= 1, e.g. \(14, 14\) "
                                         r"as in the paper \(§3.1\); got \(14, 0\)"):
        split_resnet50(resnet, roi_size=(14, 0))
