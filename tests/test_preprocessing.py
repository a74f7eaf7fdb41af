"""Backbone preprocessing by name: every mode against numpy and keras.applications, one name table."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from reid_keras.models import saved_model as export_lib
from reid_keras.data.pipelines import image_dataset
from reid_keras.data.datasets.base import ImageRecord
from reid_keras.data.preprocessing import (PREPROCESSING_MODES, Preprocessing, check_preprocessing, preprocess,
                                           preprocessing_for)
from reid_keras.models.loading import EmbeddingModel, ModelLoadError

MEAN_BGR = np.array([103.939, 116.779, 123.68], np.float32)
MEAN_RGB = np.array([0.485, 0.456, 0.406], np.float32)
STD_RGB = np.array([0.229, 0.224, 0.225], np.float32)


def numpy_reference(x, mode):
    x = x.astype(np.float32)
    return {"raw": lambda: x, "unit": lambda: x / np.float32(255.0),
            "caffe": lambda: x[..., ::-1] - MEAN_BGR,
            "tf": lambda: x / np.float32(127.5) - np.float32(1.0),
            "torch": lambda: (x / np.float32(255.0) - MEAN_RGB) / STD_RGB}[mode]()


@pytest.fixture(scope="module")
def pixels():
    x = np.random.default_rng(3).uniform(0, 255, (2, 5, 4, 3)).astype(np.float32)
    x[0, 0, 0] = (0.0, 0.0, 0.0)
    x[0, 0, 1] = (255.0, 255.0, 255.0)
    return x


@pytest.mark.parametrize("name", sorted(PREPROCESSING_MODES))
def test_each_name_matches_numpy_and_keras_applications(pixels, name):
    mode = PREPROCESSING_MODES[name]
    got = preprocess(pixels, name).numpy()
    assert got.dtype == np.float32 and got.shape == pixels.shape
    np.testing.assert_allclose(got, numpy_reference(pixels, mode), atol=1e-5)
    if mode in ("caffe", "tf", "torch"):
        want = keras.applications.imagenet_utils.preprocess_input(pixels.copy(), mode=mode)
        np.testing.assert_allclose(got, want, atol=1e-5)
    lo, hi = preprocessing_for(name).value_range
    # The black and the white pixel reach the bounds of each channel, so the range is tight.
    assert lo - 1e-4 <= got.min() and got.max() <= hi + 1e-4
    extremes = np.concatenate([got[0, 0, 0], got[0, 0, 1]])
    np.testing.assert_allclose([extremes.min(), extremes.max()], [lo, hi], atol=1e-4)


def test_keras_applications_modules_agree():
    x = np.random.default_rng(4).uniform(0, 255, (1, 3, 3, 3)).astype(np.float32)
    for name, module in [("resnet50", keras.applications.resnet50), ("vgg19", keras.applications.vgg19),
                         ("tf", keras.applications.mobilenet_v2), ("torch", keras.applications.densenet)]:
        np.testing.assert_allclose(preprocess(x, name), module.preprocess_input(x.copy()), atol=1e-5)


def test_names_are_case_and_separator_insensitive():
    assert check_preprocessing("EfficientNetB3") == "efficientnet"
    assert check_preprocessing("efficientnet_b0") == "efficientnet"
    assert check_preprocessing("ResNet-50") == "resnet50"
    assert check_preprocessing("VGG_16") == "vgg16"
    assert preprocessing_for("EfficientNetB3") == Preprocessing("efficientnet", "raw", (0.0, 255.0))
    with pytest.raises(ValueError, match=r"unknown preprocessing 'mobilenet': expected one of efficientnet, none, "
                                         r"raw, unit, caffe, resnet50"):
        check_preprocessing("mobilenet")


def test_integer_pixels_become_float32():
    x = np.array([[[0, 128, 255]]], np.uint8)
    got = preprocess(x, "unit")
    assert got.dtype == tf.float32
    np.testing.assert_allclose(got.numpy(), [[[0.0, 128 / 255, 1.0]]], rtol=1e-6)


def test_same_numbers_in_tf_function_and_tf_data(pixels):
    for name in ("caffe", "torch", "tf", "unit"):
        eager = preprocess(pixels, name).numpy()
        traced = tf.function(lambda x, n=name: preprocess(x, n))(tf.constant(pixels)).numpy()
        streamed = next(iter(tf.data.Dataset.from_tensors(pixels).map(lambda x, n=name: preprocess(x, n))))
        # Graph optimisation may fold x / 255 into a multiply: last-bit differences only.
        np.testing.assert_allclose(traced, eager, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(streamed.numpy(), eager, rtol=1e-6, atol=1e-6)


def test_pipeline_export_and_loading_share_the_math(pixels, tmp_path):
    """The three consumers give the same numbers for the same name (resizing to the same size is exact)."""
    image = np.rint(pixels[1]).astype(np.uint8)
    path = tmp_path / "a.png"
    tf.io.write_file(str(path), tf.io.encode_png(image))
    for name in ("resnet50", "torch", "unit", "efficientnet"):
        want = preprocess(image[None].astype(np.float32), name).numpy()
        exported = export_lib.prepare_images(image[None], image.shape[:2], name)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(exported), want, atol=1e-5)
        loaded = EmbeddingModel(embed_fn=lambda x: x, image_size=None, preprocessing=name, source="", kind="keras")
        np.testing.assert_allclose(loaded.embed(image[None]), want.reshape(1, -1), atol=1e-5)
        streamed, = list(image_dataset([ImageRecord(str(path), 0, 0)], image.shape[:2], 1, preprocess=name,
                                       with_labels=False))
        np.testing.assert_allclose(streamed.numpy(), want, atol=1e-4)


def test_consumers_report_bad_names_with_their_own_errors():
    with pytest.raises(export_lib.ExportError, match="unknown preprocessing 'zscore'"):
        export_lib.prepare_images(np.zeros((1, 2, 2, 3), np.uint8), (2, 2), "zscore")
    with pytest.raises(ModelLoadError, match="unknown preprocessing 'zscore'"):
        EmbeddingModel(embed_fn=lambda x: x, image_size=None, preprocessing="zscore", source="", kind="keras")
