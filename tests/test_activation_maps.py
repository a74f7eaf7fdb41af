"""Activation maps (identification-verification paper Fig. 5) and `python -m reid_keras.visualize activations`.

Every map is checked against a numpy computation written here: the features of a tiny model with
1x1 convolutions (a matrix product), or of the in-memory EfficientNet before it was saved; then
ReLU, channel sum, half-pixel bilinear resize and min-max normalisation.
"""
import contextlib
import io
import json
import os

import keras
import numpy as np
import pytest
from PIL import Image

from reid_keras import activation_maps as am
from reid_keras import visualize
from reid_keras.data.preprocessing import CAFFE_MEAN_BGR
from reid_keras.models.layers import SquareLayer
from reid_keras.models.siamese import build_siamese
from tests.fixtures.siamese_models import calibrate_batchnorm, random_images

TINY = (16, 8)
EFF = (64, 32)


def _tiny_siamese(seed=0):
    """image -> `embedding` [Rescaling -> nested "resnet50" (1x1 convs) -> pooling]; two-input siamese."""
    rng = np.random.default_rng(seed)
    pixels = keras.Input((*TINY, 3), name="pixels")
    feat = keras.layers.Conv2D(4, 1, strides=2, name="conv4_block6_out")(pixels)
    head = keras.layers.Conv2D(3, 1, activation="relu", name="conv5_block3_out")(feat)
    backbone = keras.Model(pixels, head, name="resnet50")
    image = keras.Input((*TINY, 3), name="image")
    scaled = keras.layers.Rescaling(0.5, offset=1.0, name="prescale")(image)  # a layer before the backbone
    embedding = keras.Model(image, keras.layers.GlobalAveragePooling2D()(backbone(scaled)), name="embedding")
    a, b = keras.Input((*TINY, 3), name="image_a"), keras.Input((*TINY, 3), name="image_b")
    out = keras.layers.Dense(1, activation="sigmoid")(SquareLayer(name="square")([embedding(a), embedding(b)]))
    model = keras.Model([a, b], out)
    # Columns of mixed signs and sums: some units stay positive, some are cut by the ReLU, for every
    # preprocessing (inputs near 1..1.5 after "unit", -60..70 after "caffe", 1..128 after "none").
    kernel = np.array([[1.0, -0.5, 0.3, -1.2], [-0.7, 0.8, 0.6, 0.2], [0.4, -0.9, -0.2, 0.5]], np.float32)
    kernel = (kernel + rng.normal(scale=0.01, size=kernel.shape)).astype(np.float32)[None, None]
    bias = np.array([0.1, -0.2, 0.05, 0.0], np.float32)
    backbone.get_layer("conv4_block6_out").set_weights([kernel, bias])
    return model, kernel[0, 0], bias


def _write_png(path, array):
    Image.fromarray(array).save(path)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("activations")
    tiny, kernel, bias = _tiny_siamese()
    os.makedirs(base / "run_unit")
    unit = str(base / "run_unit" / "best.keras")
    tiny.save(unit)
    with open(base / "run_unit" / "config.json", "w") as f:
        json.dump({"preprocessing": "unit"}, f)
    os.makedirs(base / "bare")
    bare = str(base / "bare" / "tiny.keras")
    tiny.save(bare)
    keras.utils.set_random_seed(1)
    eff = build_siamese("efficientnetb0", EFF, weights=None)
    # Random BatchNorm statistics give near-constant maps; one batch's statistics make them image-dependent.
    calibrate_batchnorm(eff.get_layer("embedding"), random_images(8, EFF, seed=5))
    os.makedirs(base / "eff")
    eff_path = str(base / "eff" / "best.keras")
    eff.save(eff_path)
    backbone = eff.get_layer("embedding").get_layer("efficientnetb0")
    eff_features = keras.Model(backbone.input, backbone.get_layer("block6a_expand_activation").output)
    rng = np.random.default_rng(3)
    small = [_write_png(base / f"small{i}.png", rng.integers(0, 256, (2 * TINY[0], 2 * TINY[1], 3), np.uint8))
             for i in range(2)]
    large = [_write_png(base / f"large{i}.png", rng.integers(0, 256, (2 * EFF[0], 2 * EFF[1], 3), np.uint8))
             for i in range(2)]
    return {"base": base, "unit": unit, "bare": bare, "kernel": kernel, "bias": bias, "eff": eff_path,
            "eff_features": eff_features, "small": small, "large": large}


def _box2(path):
    """What the pipeline's half-pixel bilinear resize to half size gives: the mean of each 2x2 block."""
    x = np.asarray(Image.open(path).convert("RGB"), np.float64)
    h, w = x.shape[0] // 2, x.shape[1] // 2
    return x.reshape(h, 2, w, 2, 3).mean(axis=(1, 3))


def _bilinear(a, size):
    """Half-pixel-centre bilinear resize of a 2-D array (tf.image.resize's convention)."""
    def taps(n_in, n_out):
        src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(src).astype(int)
        return lo, np.minimum(lo + 1, n_in - 1), src - lo

    r0, r1, tr = taps(a.shape[0], size[0])
    c0, c1, tc = taps(a.shape[1], size[1])
    rows = a[r0] * (1 - tr)[:, None] + a[r1] * tr[:, None]
    return rows[:, c0] * (1 - tc) + rows[:, c1] * tc


def _expected_map(features, size):
    summed = np.maximum(features, 0).sum(axis=-1)
    up = _bilinear(summed, size)
    return (up - up.min()) / (up.max() - up.min()), summed


PREPROCESS = {
    "unit": lambda x: x / 255.0,
    "caffe": lambda x: x[..., ::-1] - np.array(CAFFE_MEAN_BGR),
    "none": lambda x: x,
}


@pytest.mark.parametrize("which, argument, used, mode", [
    ("unit", None, "unit", "unit"),            # the run's config.json
    ("bare", None, "resnet50", "caffe"),       # no config.json: the backbone sub-model's name
    ("bare", "none", "none", "none"),          # an explicit argument wins
])
def test_tiny_maps_match_numpy(setup, which, argument, used, mode):
    model = am.load_activation_model(setup[which], preprocessing=argument)
    assert (model.layer, model.owner, model.preprocessing, model.image_size) == ("conv4_block6_out", "resnet50",
                                                                                 used, TINY)
    result = am.compute_activation_maps([model], setup["small"])
    assert result["maps"].shape == (1, 2, *TINY) and result["layers"] == ["conv4_block6_out"]
    for i, path in enumerate(setup["small"]):
        pixels = _box2(path)
        np.testing.assert_array_equal(result["images"][i], np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
        x = PREPROCESS[mode](pixels) * 0.5 + 1.0  # the embedding's Rescaling layer
        features = x[::2, ::2] @ setup["kernel"] + setup["bias"]  # 1x1 conv, stride 2
        expected, summed = _expected_map(features, TINY)
        np.testing.assert_allclose(result["raw_maps"][0][i], summed, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(result["maps"][0, i], expected, atol=1e-4)
        assert result["active_fraction"][0, i] == pytest.approx(np.mean(features > 0))
        assert 0 < np.mean(features > 0) < 1  # ReLU changes the sum in this test


def test_efficientnet_maps_match_the_model_before_saving(setup):
    model = am.load_activation_model(setup["eff"])
    assert (model.layer, model.owner, model.preprocessing) == ("block6a_expand_activation", "efficientnetb0",
                                                               "efficientnet")
    result = am.compute_activation_maps([model], setup["large"])
    pixels = np.stack([_box2(p) for p in setup["large"]]).astype(np.float32)
    features = np.asarray(setup["eff_features"](pixels, training=False), np.float64)  # raw 0..255 input
    assert features.shape == (2, EFF[0] // 16, EFF[1] // 16, 672)
    for i in range(2):
        expected, _ = _expected_map(features[i], EFF)
        np.testing.assert_allclose(result["maps"][0, i], expected, atol=2e-3)
    assert result["maps"].min() == 0.0 and result["maps"].max() == 1.0


def test_models_of_different_sizes_share_the_first_models_size(setup):
    models = [am.load_activation_model(setup["unit"]), am.load_activation_model(setup["eff"])]
    result = am.compute_activation_maps(models, setup["large"])
    assert result["maps"].shape == (2, 2, *TINY) and result["images"].shape == (2, *TINY, 3)
    assert result["raw_maps"][0].shape == (2, 8, 4) and result["raw_maps"][1].shape == (2, 4, 2)
    expected = [_bilinear(raw, TINY) for raw in result["raw_maps"][1]]
    for i, up in enumerate(expected):
        np.testing.assert_allclose(result["maps"][1, i], (up - up.min()) / (up.max() - up.min()), atol=1e-4)


def test_layer_choice_and_unknown_layer(setup):
    model = am.load_activation_model(setup["bare"], layer="conv5_block3_out")
    assert model.feature_maps(np.zeros((3, *TINY, 3))).shape == (3, 8, 4, 3)
    assert am.load_activation_model(setup["bare"], layer="res4fx").layer == "conv4_block6_out"  # paper's name
    with pytest.raises(am.ActivationMapError, match=r"images of shape \(8, 8, 3\) given; the model takes \(16, 8, 3\)"):
        model.feature_maps(np.zeros((1, 8, 8, 3)))
    with pytest.raises(am.ActivationMapError) as err:
        am.load_activation_model(setup["bare"], layer="conv4_block6_ot")
    text = str(err.value)
    assert setup["bare"] in text and "'conv4_block6_ot'" in text and "did you mean conv4_block6_out" in text
    assert "stage outputs: prescale (16x8), conv5_block3_out (8x4)" in text
    with pytest.raises(am.ActivationMapError, match=r"stage outputs: .*block6a_expand_activation \(4x2\), top_activation \(2x1\)$"):
        am.load_activation_model(setup["eff"], layer="block6a_expand_activatoin")
    image = keras.Input((*TINY, 3))
    plain = keras.Model(image, keras.layers.Conv2D(2, 3, name="mine")(image))
    with pytest.raises(am.ActivationMapError, match=r"no known backbone block .*pass --layer.*mine \(14x6\)"):
        am.ActivationModel(plain, source="plain")


def test_channel_sum_maps_constant_and_range():
    maps, raw = am.channel_sum_maps(np.stack([np.full((3, 2, 4), -1.0), np.arange(24.0).reshape(3, 2, 4)]), (6, 4))
    np.testing.assert_array_equal(maps[0], 0.0)
    np.testing.assert_array_equal(raw[0], 0.0)  # all negative: ReLU leaves nothing
    np.testing.assert_allclose(raw[1], np.arange(24.0).reshape(3, 2, 4).sum(-1))
    assert maps[1].min() == 0.0 and maps[1].max() == 1.0


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = visualize.main(argv)
    return code, out.getvalue(), err.getvalue()


def test_cli_writes_figure_of_expected_size_and_npz(setup, tmp_path):
    figure, npz = str(tmp_path / "fig5.png"), str(tmp_path / "maps.npz")
    code, stdout, stderr = _run(["activations", "--model", setup["unit"], setup["bare"], "--labels", "I", "I+V",
                                 "--images", *setup["small"], "--out", figure, "--npz", npz])
    assert code == 0, stderr
    assert stdout.strip() == figure and "layer conv4_block6_out of resnet50, preprocessing unit" in stderr
    # 3 columns of 2 in x 2*8/16 in panels (+0.25 in), a 0.9 in colour bar; 2 rows of 2 + 0.45 in, 0.5 in title
    with Image.open(figure) as img:
        assert img.format == "PNG" and img.size == (round((3 * (2.0 * 8 / 16 + 0.25) + 0.9) * 100),
                                                    round((2 * (2.0 + 0.45) + 0.5) * 100))
    saved = np.load(npz)
    assert list(saved["labels"]) == ["I", "I+V"] and list(saved["paths"]) == setup["small"]
    assert saved["maps"].shape == (2, 2, *TINY) and saved["raw_maps_1"].shape == (2, 8, 4)
    direct = am.compute_activation_maps([am.load_activation_model(setup["unit"])], setup["small"])
    np.testing.assert_allclose(saved["maps"][0], direct["maps"][0])
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]  # atomic writes left no temporary files


def test_cli_takes_images_from_a_dataset(setup, tmp_path):
    from reid_keras.data.datasets import load_dataset, synthetic

    synthetic.write_dataset("market1501", str(tmp_path / "data"), num_ids=8, seed=0)
    npz = str(tmp_path / "maps.npz")
    code, _, stderr = _run(["activations", "--model", setup["bare"], "--dataset", "market1501", "--data-root",
                            str(tmp_path / "data"), "--num-images", "3", "--out", str(tmp_path / "f.png"),
                            "--npz", npz])
    assert code == 0, stderr
    query = {r.path: r.pid for r in load_dataset("market1501", str(tmp_path / "data")).query}
    paths = list(np.load(npz)["paths"])
    assert len(paths) == 3 and len({query[p] for p in paths}) == 3  # three query identities
    assert list(np.load(npz)["labels"]) == ["bare"]  # default label: the run folder's name
    code, _, stderr = _run(["activations", "--model", setup["bare"], "--dataset", "market1501", "--data-root",
                            str(tmp_path / "data"), "--num-images", "99", "--out", str(tmp_path / "g.png")])
    assert code == 2 and "--num-images 99" in stderr and "identities" in stderr


def _bad_png(path):
    with open(path, "wb") as f:  # right signature and end chunk (passes the probe), garbage inside
        f.write(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4 + b"\x00\x00\x00\x00IEND\xaeB`\x82")
    return str(path)


@pytest.mark.parametrize("case", ["labels", "model", "not_image", "empty", "undecodable", "missing_image",
                                  "no_root", "bad_root", "layer"])
def test_cli_errors_name_the_problem(setup, tmp_path, case):
    images = list(setup["small"])
    argv = ["--model", setup["bare"], "--out", str(tmp_path / "f.png")]
    expect = []
    if case == "labels":
        argv = ["--model", setup["bare"], setup["unit"], "--labels", "I", "V", "I+V", "--out", str(tmp_path / "f.png")]
        expect = ["3 labels (I V I+V) for 2 models"]
    elif case == "model":
        argv[1] = str(tmp_path / "nope.keras")
        expect = ["nope.keras", "does not exist"]
    elif case == "not_image":
        (tmp_path / "page.jpg").write_text("<html>not found</html>")
        images.append(str(tmp_path / "page.jpg"))
        expect = ["page.jpg", "not an image"]
    elif case == "empty":
        (tmp_path / "empty.png").write_bytes(b"")
        images.append(str(tmp_path / "empty.png"))
        expect = ["empty.png", "empty file"]
    elif case == "undecodable":
        images.append(_bad_png(tmp_path / "bad.png"))
        expect = ["bad.png", "cannot be decoded"]
    elif case == "missing_image":
        images.append(str(tmp_path / "gone.png"))
        expect = ["gone.png", "does not exist"]
    elif case == "layer":
        argv += ["--layer", "nope"]
        expect = ["'nope'", "stage outputs"]
    if case == "no_root":
        argv += ["--dataset", "market1501"]
        expect = ["--dataset needs --data-root"]
    elif case == "bad_root":
        argv += ["--dataset", "market1501", "--data-root", str(tmp_path / "nowhere")]
        expect = ["nowhere", "does not exist"]
    else:
        argv += ["--images", *images]
    code, stdout, stderr = _run(["activations", *argv])
    assert code == 2 and stdout == ""
    assert stderr.startswith("error: ") or "error: " in stderr
    for text in expect:
        assert text in stderr, stderr
    assert not os.path.exists(tmp_path / "f.png")
