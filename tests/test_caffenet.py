"""CaffeNet backbone (models/caffenet.py, models/caffe_weights.py; identification_verification_embedding.txt Fig. 3, §IV-A):
Caffe's shapes and parameter count, LRN against Caffe's formula, the .caffemodel reader on files
written by a protobuf encoder of our own (V2 `layer`, V1 `layers`, V0 nested), the weight layout
against numpy convolutions, `build_backbone("caffenet")` and the `convert` CLI.

The full 57M-parameter CaffeNet is built twice (module fixture + one build_backbone call); the
weights plumbing runs on a thin copy (`width=1/16`: same layers, 6..256 filters) by patching
`caffenet.build_caffenet`, which both the CLI and `backbones` look up at call time.
"""
import functools
import math
import os
import struct
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
from keras.src.backend import config as keras_config  # KERAS_HOME as Keras read it at import
from keras.src.utils import file_utils

from reid_keras.io_utils import atomic_save_keras
from reid_keras.cli import caffenet as caffenet_cli
from reid_keras.models import backbones, caffenet
from reid_keras.models.backbones import WeightsUnavailableWarning, build_backbone
from reid_keras.models.caffe_weights import caffe_to_keras, read_caffemodel
from reid_keras.models.caffenet import CaffeLRN

PAPER_SIZE = (227, 227)
THIN = 1 / 16
BUILD = caffenet.build_caffenet
LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7")
# BVLC reference CaffeNet: (out, in per group, kernel) of each weight layer
FULL_SHAPES = {"conv1": (96, 3, 11), "conv2": (256, 48, 5), "conv3": (384, 256, 3), "conv4": (384, 192, 3),
               "conv5": (256, 192, 3), "fc6": (4096, 256 * 6 * 6, None), "fc7": (4096, 4096, None)}
THIN_SHAPES = {"conv1": (6, 3, 11), "conv2": (16, 3, 5), "conv3": (24, 16, 3), "conv4": (24, 12, 3),
               "conv5": (16, 12, 3), "fc6": (256, 16 * 6 * 6, None), "fc7": (256, 256, None),
               "fc8": (10, 256, None)}


def caffe_blob_shapes(spec):
    """Caffe's InnerProduct (out, in) and Convolution (out, in/groups, k, k) weight shapes."""
    return {name: ((out, cin) if k is None else (out, cin, k, k)) for name, (out, cin, k) in spec.items()}


def random_blobs(spec, seed, scale=0.05):
    rng = np.random.default_rng(seed)
    return {name: [rng.standard_normal(shape, dtype=np.float32) * np.float32(scale),
                   rng.standard_normal(shape[0], dtype=np.float32)]
            for name, shape in caffe_blob_shapes(spec).items()}


# ---- a tiny protobuf encoder (developers.google.com/protocol-buffers/docs/encoding) ----

def varint(n):
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def key(field, wire):
    return varint(field << 3 | wire)


def vint(field, n):
    return key(field, 0) + varint(n)


def ld(field, payload):
    return key(field, 2) + varint(len(payload)) + payload


def floats(field, values, packed=True):
    values = np.asarray(values, "<f4").ravel()
    if packed:
        return ld(field, values.tobytes())
    return b"".join(key(field, 5) + struct.pack("<f", v) for v in values)


def blob_v2(array, packed_dims=True):
    dims = ld(1, b"".join(varint(d) for d in array.shape)) if packed_dims else b"".join(vint(1, d) for d in array.shape)
    return ld(7, dims) + floats(5, array) + floats(6, np.ones(3))  # field 6 = diff, to be ignored


def blob_legacy(array, packed=True):
    shape = (1,) * (4 - array.ndim) + array.shape  # (num, channels, height, width)
    return b"".join(vint(field, d) for field, d in zip((1, 2, 3, 4), shape)) + floats(5, array, packed)


def caffemodel_v2(blobs):
    layers = [ld(1, b"data") + ld(2, b"Input") + ld(4, b"data")]  # a layer without blobs
    for name, arrays in blobs.items():
        body = ld(1, name.encode()) + ld(2, b"Convolution") + ld(3, b"bottom") + vint(10, 1)
        body += b"".join(ld(7, blob_v2(a, packed_dims=(i == 0))) for i, a in enumerate(arrays))
        layers.append(body)
    return ld(1, b"CaffeNet") + vint(4, 227) + b"".join(ld(100, layer) for layer in layers)


def caffemodel_v1(blobs, v0_layer=None):
    layers = []
    for name, arrays in blobs.items():
        body = ld(2, b"bottom") + ld(3, name.encode()) + ld(4, name.encode()) + vint(5, 4)
        body += b"".join(ld(6, blob_legacy(a, packed=(a.size > 64))) for a in arrays)
        layers.append(body)
    if v0_layer is not None:  # V1LayerParameter.layer = V0LayerParameter(name=1, type=2, blobs=50)
        name, arrays = v0_layer
        v0 = ld(1, name.encode()) + ld(2, b"conv") + b"".join(ld(50, blob_legacy(a)) for a in arrays)
        layers.append(ld(1, v0))
    return ld(1, b"CaffeNet") + b"".join(ld(2, layer) for layer in layers)


# ---- numpy references ----

def caffe_lrn(a, n=5, alpha=1e-4, beta=0.75, k=1.0):
    """Caffe's LRNLayer ACROSS_CHANNELS on a channels-last array."""
    channels, squares, out = a.shape[-1], a.astype(np.float64) ** 2, np.empty(a.shape)
    for c in range(channels):
        lo, hi = max(0, c - (n - 1) // 2), min(channels, c + (n - 1) // 2 + 1)
        out[..., c] = a[..., c] / (k + alpha / n * squares[..., lo:hi].sum(-1)) ** beta
    return out


def caffe_sizes(side):
    """Caffe's arithmetic: convolutions round down, pooling rounds up."""
    conv = lambda s, k, stride, pad: (s + 2 * pad - k) // stride + 1  # noqa: E731
    pool = lambda s: int(math.ceil((s - 3) / 2)) + 1  # noqa: E731
    c1 = conv(side, 11, 4, 0)
    p1 = pool(c1)
    p2 = pool(conv(p1, 5, 1, 2))
    p5 = pool(conv(conv(conv(p2, 3, 1, 1), 3, 1, 1), 3, 1, 1))
    return {"conv1": c1, "pool1": p1, "pool2": p2, "pool5": p5, "fc7": p5 - 6 + 1}


def layer_sizes(model):
    names = ("conv1", "pool1", "pool2", "pool5", "fc7")
    return {name: tuple(model.get_layer(name).output.shape[1:3]) for name in names}


# ---- fixtures ----

@pytest.fixture(scope="module")
def net():
    keras.utils.set_random_seed(3)
    return BUILD(PAPER_SIZE)


@pytest.fixture
def thin(monkeypatch):
    monkeypatch.setattr(caffenet, "build_caffenet", functools.partial(BUILD, width=THIN))


@pytest.fixture
def keras_home(tmp_path, monkeypatch):
    home = tmp_path / "keras_home"
    home.mkdir()
    monkeypatch.setattr(keras_config, "_KERAS_DIR", str(home))
    monkeypatch.setenv("KERAS_HOME", str(home))

    def no_network(*args, **kwargs):
        raise AssertionError(f"unexpected network access {args[:1]}")

    monkeypatch.setattr(backbones, "host_resolves", no_network)
    monkeypatch.setattr(file_utils, "urlretrieve", no_network)
    return home


# ---- architecture ----

def test_shapes_and_parameter_count_are_caffes(net):
    assert net.name == "caffenet" and tuple(net.output.shape) == (None, 1, 1, 4096)
    assert layer_sizes(net) == {"conv1": (55, 55), "pool1": (27, 27), "pool2": (13, 13), "pool5": (6, 6),
                                "fc7": (1, 1)}
    assert caffenet.feature_sizes(227)["pool5"] == caffe_sizes(227)["pool5"] == 6
    expected = sum(out * cin * (k or 1) ** 2 + out for out, cin, k in FULL_SHAPES.values())
    # the BVLC model's 60,965,224 parameters minus fc8 (4096 x 1000 + 1000)
    assert net.count_params() == expected == 60_965_224 - 4_097_000
    assert [net.get_layer(name).groups for name in LAYERS[:5]] == [1, 2, 1, 2, 2]
    kinds = {type(layer).__name__ for layer in net.layers}
    assert "CaffeLRN" in kinds and not kinds & {"Rescaling", "Normalization", "Dense"}
    assert [layer.name for layer in net.layers if layer.weights] == list(LAYERS)


def test_other_sizes_follow_caffes_ceil_pooling():
    keras.utils.set_random_seed(4)
    for size in ((224, 224), (256, 240), (199, 199)):
        model = BUILD(size, width=THIN)
        want = {name: (caffe_sizes(size[0])[name], caffe_sizes(size[1])[name]) for name in caffe_sizes(227)}
        assert layer_sizes(model) == want, size
    # 224: conv1 is 54 wide (even), so pool1's last window is clipped as in Caffe: compare with numpy.
    model = BUILD((224, 224), width=THIN)
    probe = keras.Model(model.input, [model.get_layer("relu1").output, model.get_layer("pool1").output])
    x = np.random.default_rng(5).uniform(-120, 140, (1, 224, 224, 3)).astype("float32")
    relu1, pool1 = (keras.ops.convert_to_numpy(t)[0] for t in probe(x))
    assert relu1.shape[0] == 54 and pool1.shape[0] == 27
    expected = np.array([[relu1[2 * i:min(2 * i + 3, 54), 2 * j:min(2 * j + 3, 54)].max(axis=(0, 1))
                          for j in range(27)] for i in range(27)])
    np.testing.assert_allclose(pool1, expected, rtol=1e-6)


@pytest.mark.parametrize("size", [(198, 227), (227, 198), (128, 64)])
def test_too_small_inputs_are_refused(size):
    assert caffenet.MIN_INPUT_SIDE == 199 and caffe_sizes(198)["fc7"] == 0 and caffe_sizes(199)["fc7"] == 1
    with pytest.raises(ValueError, match=rf"bad image_size \({size[0]}, {size[1]}\) for CaffeNet.*>= 199"):
        BUILD(size)


def test_lrn_matches_caffes_formula():
    a = np.random.default_rng(6).uniform(0, 300, (2, 3, 4, 11)).astype("float32")
    layer = CaffeLRN()
    got = keras.ops.convert_to_numpy(layer(a))
    np.testing.assert_allclose(got, caffe_lrn(a), rtol=2e-5)
    assert np.abs(got - a).max() > 1.0  # the normalisation is not negligible at these values
    other = CaffeLRN(local_size=3, alpha=0.01, beta=0.5, k=2.0)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(other(a)), caffe_lrn(a, 3, 0.01, 0.5, 2.0), rtol=2e-5)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(other))
    assert type(restored) is CaffeLRN and restored.get_config() == other.get_config()
    with pytest.raises(ValueError, match="local_size must be a positive odd integer"):
        CaffeLRN(local_size=4)


# ---- reader ----

def test_reader_v2_v1_and_v0_layouts(tmp_path):
    blobs = random_blobs({"conv1": (4, 3, 3), "fc6": (5, 8, None)}, seed=7)
    v2 = tmp_path / "v2.caffemodel"
    v2.write_bytes(caffemodel_v2(blobs))
    read = read_caffemodel(str(v2))
    assert list(read) == ["conv1", "fc6"]
    for name in blobs:
        for got, want in zip(read[name], blobs[name]):
            assert got.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_array_equal(got, want)

    old = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([5.0, -1.0], np.float32)]
    v1 = tmp_path / "v1.caffemodel"
    v1.write_bytes(caffemodel_v1(blobs, v0_layer=("ip_old", old)))
    read = read_caffemodel(str(v1))
    assert list(read) == ["conv1", "fc6", "ip_old"]
    # legacy 4-D (num, channels, height, width) shapes, as V1 files store them
    assert [b.shape for b in read["fc6"]] == [(1, 1, 5, 8), (1, 1, 1, 5)]
    assert [b.shape for b in read["conv1"]] == [(4, 3, 3, 3), (1, 1, 1, 4)]
    np.testing.assert_array_equal(read["fc6"][0].reshape(5, 8), blobs["fc6"][0])
    np.testing.assert_array_equal(read["conv1"][1].ravel(), blobs["conv1"][1])  # 4 unpacked floats
    np.testing.assert_array_equal(read["ip_old"][0].reshape(2, 3), old[0])


def test_reader_errors_name_the_file(tmp_path):
    garbage = tmp_path / "garbage.caffemodel"
    garbage.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"garbage\.caffemodel: not a binary \.caffemodel"):
        read_caffemodel(str(garbage))
    no_layers = tmp_path / "empty.caffemodel"
    no_layers.write_bytes(ld(1, b"CaffeNet"))
    with pytest.raises(ValueError, match=r"empty\.caffemodel: .*no layer with weights"):
        read_caffemodel(str(no_layers))
    data = caffemodel_v2(random_blobs({"conv1": (4, 3, 3)}, seed=8))
    cut = tmp_path / "cut.caffemodel"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.caffemodel: not a binary"):
        read_caffemodel(str(cut))
    with pytest.raises(ValueError, match=r"missing\.caffemodel: cannot read"):
        read_caffemodel(str(tmp_path / "missing.caffemodel"))
    mismatch = ld(100, ld(1, b"conv1") + ld(7, ld(7, ld(1, varint(3) + varint(2))) + floats(5, np.ones(5))))
    odd = tmp_path / "odd.caffemodel"
    odd.write_bytes(mismatch)
    with pytest.raises(ValueError, match=r"odd\.caffemodel: .*shape \(3, 2\) holds 5 values"):
        read_caffemodel(str(odd))


# ---- conversion ----

def test_caffe_to_keras_layout_against_numpy(net):
    blobs = random_blobs(FULL_SHAPES, seed=9, scale=0.01)
    blobs["fc8"] = [np.zeros((1000, 4096), np.float32), np.zeros(1000, np.float32)]  # ignored
    assert caffe_to_keras(blobs, net) == list(LAYERS)
    rng = np.random.default_rng(10)

    # conv1: cross-correlation, stride 4, valid; input channels in the same (BGR) order as Caffe's
    x = rng.uniform(-120, 140, (1, 227, 227, 3)).astype("float32")
    conv1 = keras.ops.convert_to_numpy(keras.Model(net.input, net.get_layer("conv1").output)(x))[0]
    w, b = blobs["conv1"]
    for i, j in ((0, 0), (54, 54), (13, 40)):
        patch = x[0, 4 * i:4 * i + 11, 4 * j:4 * j + 11, :]  # (u, v, c)
        want = np.einsum("ocuv,uvc->o", w.astype(np.float64), patch) + b
        np.testing.assert_allclose(conv1[i, j], want, rtol=1e-4, atol=1e-3)

    # conv2: pad 2, group 2 (output channel o reads the input half o // 128)
    y = rng.uniform(0, 3, (1, 27, 27, 96)).astype("float32")
    conv2 = keras.ops.convert_to_numpy(net.get_layer("conv2")(net.get_layer("conv2_pad")(y)))[0]
    padded = np.pad(y[0], ((2, 2), (2, 2), (0, 0)))
    w, b = blobs["conv2"]
    for i, j in ((0, 0), (26, 3), (12, 12)):
        patch = padded[i:i + 5, j:j + 5]
        want = np.concatenate([np.einsum("ocuv,uvc->o", w[g * 128:(g + 1) * 128].astype(np.float64),
                                         patch[:, :, g * 48:(g + 1) * 48]) for g in range(2)]) + b
        np.testing.assert_allclose(conv2[i, j], want, rtol=1e-4, atol=1e-4)

    # fc6 / fc7: Caffe's InnerProduct over pool5 flattened in (C, H, W) order
    z = rng.uniform(0, 2, (6, 6, 256)).astype("float32")
    fc6 = keras.ops.convert_to_numpy(net.get_layer("fc6")(z[None]))[0, 0, 0]
    w, b = blobs["fc6"]
    # float32 products (a float64 copy of fc6 alone would take 300 MB); sums of 9216 terms of ~0.01
    np.testing.assert_allclose(fc6, w @ z.transpose(2, 0, 1).reshape(-1) + b, rtol=1e-4, atol=1e-4)
    v = rng.uniform(0, 2, 4096).astype("float32")
    fc7 = keras.ops.convert_to_numpy(net.get_layer("fc7")(v.reshape(1, 1, 1, 4096)))[0, 0, 0]
    w, b = blobs["fc7"]
    np.testing.assert_allclose(fc7, w @ v + b, rtol=1e-4, atol=1e-4)


def test_caffe_to_keras_errors(net):
    blobs = random_blobs(THIN_SHAPES, seed=11)
    with pytest.raises(ValueError, match=r"my\.caffemodel: layer 'conv1' weights have shape \(6, 3, 11, 11\), "
                                         r"expected \(96, 3, 11, 11\)"):
        caffe_to_keras(blobs, net, source="my.caffemodel")
    del blobs["fc7"]
    with pytest.raises(ValueError, match=r"my\.caffemodel: no layer 'fc7' with weights"):
        caffe_to_keras(blobs, net, source="my.caffemodel")


# ---- backbones ----

def test_build_backbone_caffenet_random_init():
    keras.utils.set_random_seed(12)
    model, info = build_backbone("CaffeNet", PAPER_SIZE, weights=None)
    assert model.name == "caffenet" and tuple(model.output.shape) == (None, 1, 1, 4096)
    assert model.count_params() == 56_868_224 and (info.requested, info.used) == ("none", "none")
    del model
    assert backbones.canonical_backbone_name("CaffeNet") == backbones.canonical_backbone_name("caffe_net") == "caffenet"
    assert backbones.backbone_preprocessing("caffenet") == "caffe"
    assert backbones.weights_file_name("caffenet") == "caffenet_imagenet.weights.h5"
    with pytest.raises(ValueError, match="caffenet has no download URL.*caffenet convert"):
        backbones.weights_origin("caffenet")
    assert backbones.check_image_size((227, 227), "caffenet") == (227, 227)
    assert backbones.check_image_size((128, 64)) == (128, 64)  # other backbones keep their minimum of 32
    with pytest.raises(ValueError, match=r"bad image_size \(128, 64\) for CaffeNet"):
        backbones.check_image_size((128, 64), "caffenet")
    with pytest.raises(ValueError, match=r"bad image_size \(16, 64\): expected \(height, width\), two integers >= 32"):
        backbones.check_image_size((16, 64), "vgg16")
    with pytest.raises(ValueError, match=r"bad image_size \(160, 80\) for CaffeNet"):
        build_backbone("caffenet", (160, 80))


def test_imagenet_without_converted_file_warns_and_starts_random(thin, keras_home):
    with pytest.warns(WeightsUnavailableWarning) as caught:
        model, info = build_backbone("caffenet", PAPER_SIZE, weights="imagenet")
    text = str(caught[0].message)
    cache = str(keras_home / "models")
    assert f"caffenet_imagenet.weights.h5 is not usable in the Keras cache folder {cache} (no such file)" in text
    assert "no download for CaffeNet" in text and "RANDOM" in text
    assert "python -m reid_keras.models.caffenet convert bvlc_reference_caffenet.caffemodel" in text
    assert (info.requested, info.used, info.file, info.warning) == (
        "imagenet", "none", os.path.join(cache, "caffenet_imagenet.weights.h5"), text)
    assert model.get_layer("fc7").filters == 256  # the thin copy

    os.makedirs(cache)
    with open(os.path.join(cache, "caffenet_imagenet.weights.h5"), "wb") as handle:
        handle.write(b"not hdf5")
    with pytest.warns(WeightsUnavailableWarning, match="is not usable in the Keras cache folder"):
        _, info = build_backbone("caffenet", PAPER_SIZE, weights="imagenet")
    assert info.used == "none"


def _assert_caffe_weights(model, blobs):
    for name in LAYERS:
        kernel, bias = model.get_layer(name).get_weights()
        out = blobs[name][0].shape[0]
        want = blobs[name][0].reshape(out, kernel.shape[2], kernel.shape[0], kernel.shape[1])  # (out, in, kh, kw)
        np.testing.assert_array_equal(kernel, np.transpose(want, (2, 3, 1, 0)), err_msg=name)
        np.testing.assert_array_equal(bias, blobs[name][1], err_msg=name)


def test_convert_cli_and_every_weights_source(thin, keras_home, tmp_path, capsys):
    blobs = random_blobs(THIN_SHAPES, seed=13)
    source = tmp_path / "bvlc_reference_caffenet.caffemodel"
    source.write_bytes(caffemodel_v1(blobs))  # the model zoo file is V1
    assert caffenet_cli.main(["convert", str(source)]) == 0
    written = keras_home / "models" / "caffenet_imagenet.weights.h5"
    out = capsys.readouterr().out
    assert f"wrote {written}" in out and "ignored layers: fc8" in out and str(source) in out
    assert written.is_file() and not [p for p in os.listdir(written.parent) if p.startswith(".")]  # no temp left

    with warnings.catch_warnings():
        warnings.simplefilter("error", WeightsUnavailableWarning)
        model, info = build_backbone("caffenet", PAPER_SIZE, weights="imagenet")
    assert (info.used, info.file, info.warning) == ("imagenet", str(written), None)
    _assert_caffe_weights(model, blobs)

    bigger, info = build_backbone("caffenet", (256, 240), weights=str(written))
    assert info.used == "file" and tuple(bigger.output.shape) == (None, 2, 2, 256)
    _assert_caffe_weights(bigger, blobs)

    v2 = tmp_path / "v2.caffemodel"
    v2.write_bytes(caffemodel_v2(blobs))
    direct, info = build_backbone("caffenet", PAPER_SIZE, weights=str(v2))
    assert (info.used, info.file) == ("file", str(v2))
    _assert_caffe_weights(direct, blobs)

    # a .keras checkpoint holding the backbone inside an embedding model, re-instantiated at another size
    image = keras.Input((*PAPER_SIZE, 3))
    wrapper = keras.Model(image, keras.layers.GlobalAveragePooling2D()(model(image)), name="embedding")
    checkpoint = tmp_path / "ckpt.keras"
    atomic_save_keras(wrapper, str(checkpoint))
    again, info = build_backbone("caffenet", (256, 240), weights=str(checkpoint))
    assert info.used == "checkpoint" and layer_sizes(again) == layer_sizes(bigger)
    _assert_caffe_weights(again, blobs)
    with pytest.raises(ValueError, match="checkpoint's backbone is caffenet, but vgg16"):
        build_backbone("vgg16", (32, 32), weights=str(checkpoint))
    with pytest.raises(ValueError, match=r"a \.caffemodel is only for the caffenet backbone, not vgg16"):
        build_backbone("vgg16", (32, 32), weights=str(v2))


def test_convert_cli_errors(thin, tmp_path, capsys):
    garbage = tmp_path / "garbage.caffemodel"
    garbage.write_bytes(b"\xff" * 64)
    assert caffenet_cli.main(["convert", str(garbage), "--out", str(tmp_path / "x.weights.h5")]) == 2
    err = capsys.readouterr().err
    assert f"{garbage}: not a binary .caffemodel" in err and "Traceback" not in err
    assert not (tmp_path / "x.weights.h5").exists()
    good = tmp_path / "good.caffemodel"
    good.write_bytes(caffemodel_v2(random_blobs(THIN_SHAPES, seed=14)))
    assert caffenet_cli.main(["convert", str(good), "--out", str(tmp_path / "x.h5")]) == 2
    assert "must end in .weights.h5" in capsys.readouterr().err
    partial = tmp_path / "partial.caffemodel"
    partial.write_bytes(caffemodel_v2(random_blobs({"conv1": THIN_SHAPES["conv1"]}, seed=15)))
    assert caffenet_cli.main(["convert", str(partial), "--out", str(tmp_path / "x.weights.h5")]) == 2
    assert f"{partial}: no layer 'conv2' with weights" in capsys.readouterr().err


def test_python_m_entry_point_reports_errors_without_traceback(tmp_path):
    garbage = tmp_path / "garbage.caffemodel"
    garbage.write_bytes(b"\xff" * 64)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-m", "reid_keras.models.caffenet", "convert", str(garbage)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and f"error: {garbage}: not a binary .caffemodel" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_activation_maps_default_to_conv5():
    from reid_keras.activation_maps import default_layer

    net = BUILD(PAPER_SIZE, width=THIN)
    assert default_layer(net) == "relu5" and tuple(net.get_layer("relu5").output.shape[1:3]) == (13, 13)
