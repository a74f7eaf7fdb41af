"""ResNet50 / VGG16 backbones (issue 5 item 1): parameter counts, ImageNet through Keras' cache with
the offline fallback, weights files and checkpoints, and no EfficientNet stem rescaling.

ResNet50 builds take a second or two on two CPU cores: inputs are 32x32 and weights random.
"""
import hashlib
import urllib.error
import warnings

import h5py
import keras
import numpy as np
import pytest
from keras.src.applications import resnet as keras_resnet  # WEIGHTS_HASHES, for the fake cache
from keras.src.backend import config as keras_config  # KERAS_HOME as Keras read it at import
from keras.src.legacy.saving import legacy_h5_format  # writes the .h5 layout of Keras' ImageNet files
from keras.src.utils import file_utils

from reid_keras.io_utils import atomic_save_keras
from reid_keras.models import backbones
from reid_keras.models.backbones import WeightsUnavailableWarning, build_backbone

SIZE = (32, 32)
# keras.applications' documented parameter counts for include_top=False (keras.io/api/applications)
DOCUMENTED_PARAMS = {"resnet50": 23_587_712, "vgg16": 14_714_688}
RESNET_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"


def images(n, seed):
    return np.random.default_rng(seed).uniform(-120, 150, (n, *SIZE, 3)).astype("float32")


@pytest.fixture(scope="module")
def resnet():
    keras.utils.set_random_seed(1)
    model, info = build_backbone("resnet50", SIZE, weights=None)
    return model, info


@pytest.fixture
def empty_keras_home(tmp_path, monkeypatch):
    home = tmp_path / "keras_home"
    home.mkdir()
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(home))
    return home


def _no_download(*args, **kwargs):
    raise AssertionError(f"unexpected download attempt {args[:1]}")


def _layer_types(model):
    return [type(layer).__name__ for layer in model.layers]


def test_parameter_counts_match_keras_applications(resnet):
    model, info = resnet
    reference = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(*SIZE, 3))
    assert model.count_params() == reference.count_params() == DOCUMENTED_PARAMS["resnet50"]
    assert model.name == "resnet50" and tuple(model.output.shape) == (None, 1, 1, 2048)
    assert (info.requested, info.used, info.imagenet_stem) == ("none", "none", False)

    vgg, vgg_info = build_backbone("VGG-16", (64, 32), weights="none")
    reference = keras.applications.VGG16(include_top=False, weights=None, input_shape=(64, 32, 3))
    assert vgg.count_params() == reference.count_params() == DOCUMENTED_PARAMS["vgg16"]
    assert vgg.name == "vgg16" and tuple(vgg.output.shape) == (None, 2, 1, 512)
    assert vgg_info.used == "none"


def test_no_normalisation_inside_resnet_and_vgg(resnet):
    """Caffe preprocessing happens in the pipelines: the model must not rescale or normalise."""
    model, _ = resnet
    vgg, _ = build_backbone("vgg16", SIZE, weights=None)
    for net in (model, vgg):
        kinds = set(_layer_types(net))
        assert not kinds & {"Rescaling", "Normalization"}, net.name
    assert _layer_types(model)[1] == "ZeroPadding2D" and _layer_types(vgg)[1] == "Conv2D"


def test_names_files_and_preprocessing():
    assert backbones.canonical_backbone_name("ResNet50") == "resnet50"
    assert backbones.canonical_backbone_name("resnet_50") == "resnet50"
    assert backbones.weights_file_name("resnet50") == RESNET_FILE
    assert backbones.weights_file_name("vgg16") == "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert backbones.weights_file_name("b3") == "efficientnetb3_notop.h5"
    # the URLs keras.applications itself downloads from (applications/resnet.py, vgg16.py)
    assert backbones.weights_origin("resnet50") == keras_resnet.BASE_WEIGHTS_PATH + RESNET_FILE
    from keras.src.applications import vgg16 as keras_vgg16
    assert backbones.weights_origin("vgg16") == keras_vgg16.WEIGHTS_PATH_NO_TOP
    assert backbones.backbone_preprocessing("resnet50") == "caffe"
    assert backbones.backbone_preprocessing("vgg16") == "caffe"
    assert backbones.backbone_preprocessing("EfficientNetB2") == "efficientnet"
    with pytest.raises(ValueError, match="unknown backbone 'resnet18'.*resnet50, vgg16"):
        build_backbone("resnet18", SIZE)
    with pytest.raises(ValueError, match="bad image_size"):
        build_backbone("vgg16", (16, 64))


def test_imagenet_offline_falls_back_to_random_init_with_a_warning(empty_keras_home, monkeypatch):
    monkeypatch.setattr(backbones, "host_resolves", lambda host, timeout: False)
    monkeypatch.setattr(file_utils, "urlretrieve", _no_download)
    with pytest.warns(WeightsUnavailableWarning) as caught:
        model, info = build_backbone("vgg16", SIZE, weights="imagenet")
    text = str(caught[0].message)
    cache = str(empty_keras_home / "models")
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in text and cache in text and "RANDOM" in text
    assert "storage.googleapis.com cannot be resolved" in text
    assert (info.requested, info.used, info.imagenet_stem, info.warning) == ("imagenet", "none", False, text)
    assert model.count_params() == DOCUMENTED_PARAMS["vgg16"]


def test_imagenet_download_failure_falls_back(empty_keras_home, monkeypatch):
    calls = []

    def failing_urlretrieve(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(backbones, "host_resolves", lambda host, timeout: True)
    monkeypatch.setattr(file_utils, "urlretrieve", failing_urlretrieve)
    with pytest.warns(WeightsUnavailableWarning, match="network is unreachable"):
        _, info = build_backbone("vgg16", SIZE, weights="imagenet")
    assert calls == ["https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
                     "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"]
    assert info.used == "none"


def test_imagenet_weights_are_read_from_the_keras_cache_without_a_stem(resnet, empty_keras_home, monkeypatch,
                                                                       tmp_path):
    source, _ = resnet
    cache = empty_keras_home / "models"
    cache.mkdir()
    cached = cache / RESNET_FILE
    with h5py.File(cached, "w") as handle:  # the layout of Keras' own ImageNet file
        legacy_h5_format.save_weights_to_hdf5_group(handle, source)
    md5 = hashlib.md5(cached.read_bytes()).hexdigest()
    hashes = dict(keras_resnet.WEIGHTS_HASHES)
    hashes["resnet50"] = (hashes["resnet50"][0], md5)  # Keras checks the cached file's hash first
    monkeypatch.setattr(keras_resnet, "WEIGHTS_HASHES", hashes)
    monkeypatch.setattr(file_utils, "urlretrieve", _no_download)

    model, info = build_backbone("resnet50", SIZE, weights="imagenet")
    assert (info.used, info.file, info.warning, info.imagenet_stem) == ("imagenet", str(cached), None, False)
    assert _layer_types(model) == _layer_types(source)  # nothing inserted
    for got, want in zip(model.get_weights(), source.get_weights()):
        np.testing.assert_array_equal(got, want)

    # The same file by path, at another input size: loaded as is.
    again, info = build_backbone("resnet50", (64, 32), weights=str(cached))
    assert (info.used, info.imagenet_stem) == ("file", False)
    assert tuple(again.input.shape) == (None, 64, 32, 3) and _layer_types(again) == _layer_types(source)
    for got, want in zip(again.get_weights(), source.get_weights()):
        np.testing.assert_array_equal(got, want)


def test_keras_checkpoint_as_backbone_weights(tmp_path):
    from reid_keras.models.idver import build_idver

    keras.utils.set_random_seed(2)
    model = build_idver(4, "vgg16", SIZE)
    path = tmp_path / "ckpt.keras"
    atomic_save_keras(model, str(path))
    net, info = build_backbone("vgg16", (64, 32), weights=str(path))
    assert info.used == "checkpoint" and not info.imagenet_stem
    for got, want in zip(net.get_weights(), model.get_layer("embedding").get_layer("vgg16").get_weights()):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="checkpoint's backbone is vgg16, but resnet50"):
        build_backbone("resnet50", SIZE, weights=str(path))
    bad = tmp_path / "vgg.weights.h5"
    net.save_weights(bad)
    with pytest.raises(ValueError, match=r"vgg\.weights\.h5: cannot load it as resnet50 backbone weights"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras warns per mismatching layer before it raises
        build_backbone("resnet50", SIZE, weights=str(bad))
