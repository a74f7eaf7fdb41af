"""Damaged and diverged models (issue 12): one loading path (reid_keras.models.loading) turns every damage
into a clean error naming the path and what is wrong; export, match and evaluate refuse NaN / inf weights
and outputs, naming the model. A tiny siamese model is saved and exported once; each test damages copies."""
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from reid_keras import evaluate
from reid_keras.cli import export as export_cli
from reid_keras.cli import match
from reid_keras.models import loading
from reid_keras.models.loading import ModelLoadError, NonFiniteModelError
from reid_keras.models.saved_model import ExportError, export_model
from tests.eval_helpers import IMAGE_SIZE, write_market_tree

SHARD = os.path.join("variables", "variables.data-00000-of-00001")
INDEX = os.path.join("variables", "variables.index")


def tiny_siamese(units=8):
    """`tests.eval_helpers.build_tiny_models`' siamese with every layer named: the messages name layers and
    variables, and Keras numbers unnamed layers by what the process built before (dense_2 after two)."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input(IMAGE_SIZE + (3,))
    x = keras.layers.Rescaling(1.0 / 255, name="rescaling")(inp)
    x = keras.layers.Flatten(name="flatten")(keras.layers.Conv2D(4, 3, strides=2, activation="relu", name="conv2d")(x))
    embedding = keras.Model(inp, keras.layers.Dense(units, name="dense")(x), name="embedding")
    a, b = keras.Input(IMAGE_SIZE + (3,), name="image_a"), keras.Input(IMAGE_SIZE + (3,), name="image_b")
    diff = keras.layers.Subtract(name="subtract")([embedding(a), embedding(b)])
    return keras.Model([a, b], keras.layers.Dense(2, activation="softmax", name="verification")(diff), name="siamese")


@pytest.fixture(scope="module")
def intact(tmp_path_factory):
    """A run folder (config.json, last.keras), its export through the CLI, two images and a tiny Market tree."""
    import tensorflow as tf

    from reid_keras.families import register_serializables

    register_serializables()
    root = tmp_path_factory.mktemp("damaged")
    run = root / "run"
    run.mkdir()
    siamese = tiny_siamese()
    siamese.save(str(run / "last.keras"))
    (run / "config.json").write_text(json.dumps({"family": "siamese", "preprocessing": "none"}))
    with contextlib.redirect_stdout(io.StringIO()):
        assert export_cli.main(["--model", str(run / "last.keras"), "--out", str(run / "export")]) == 0
    rng = np.random.default_rng(0)
    images = []
    for name in ("a.png", "b.png"):
        images.append(str(root / name))
        tf.io.write_file(images[-1], tf.io.encode_png(rng.integers(0, 256, (40, 20, 3), dtype=np.uint8)))
    data = root / "data"
    write_market_tree(str(data / "Market-1501-v15.09.15"), num_ids=3, cams=(1, 2), distractors=0)
    return {"root": root, "run": str(run), "keras": str(run / "last.keras"), "export": str(run / "export"),
            "model": siamese, "images": images, "data": str(data)}


def _match(intact, model):
    """(exit code, stdout, stderr) of `python -m reid_keras.match` in this process."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = match.main([*intact["images"], "--model", model])
        except SystemExit as stop:
            code = stop.code
    return code, out.getvalue(), err.getvalue()


def _export(model, out):
    out_buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out_buf), contextlib.redirect_stderr(err):
        try:
            code = export_cli.main(["--model", model, "--out", out])
        except SystemExit as stop:
            code = stop.code
    return code, out_buf.getvalue(), err.getvalue()


def _evaluate(intact, model, out):
    out_buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out_buf), contextlib.redirect_stderr(err):
        code = evaluate.main(["--model", model, "--dataset", "market1501", "--data-root", intact["data"],
                              "--out", out, "--no-plots"])
    return code, out_buf.getvalue(), err.getvalue()


def _truncate(path, keep):
    with open(path, "r+b") as handle:
        handle.truncate(keep)


def _flip(path, offset):
    data = bytearray(open(path, "rb").read())
    data[offset] ^= 0x40
    open(path, "wb").write(bytes(data))


def _resave_export(src, dst, value):
    """An export written before export checked its model: the embedding's dense kernel set to `value`."""
    import tensorflow as tf

    loaded = tf.saved_model.load(src)
    variable = loaded.model_variables[2]
    assert variable.name == "dense/kernel:0"
    variable.assign(tf.fill(variable.shape, value))
    tf.saved_model.save(loaded, dst, signatures={"embed": loaded.signatures["embed"],
                                                  "verify": loaded.signatures["verify"]})
    shutil.copy(os.path.join(src, "reid_keras_export.json"), dst)


def _in(name, fn, *args):
    """Damage: `fn(<export copy>/name, *args)`."""
    return lambda folder: fn(os.path.join(folder, name), *args)


def _write(path, data):
    open(path, "wb").write(data)


EXPORT_DAMAGE = {  # kind: (damage of an export copy, what the message says after the folder)
    "data shard deleted": (_in(SHARD, os.remove), "no weight data in variables/"),
    "index deleted": (_in(INDEX, os.remove), "variables/variables.index is missing"),
    "variables/ deleted": (_in("variables", shutil.rmtree), "the variables/ folder (the weights) is missing"),
    "data shard truncated": (_in(SHARD, _truncate, 2000),
                             "its weight data (variables/variables.data-...) is truncated"),
    "data shard empty": (_in(SHARD, _truncate, 0), "variables/variables.data-00000-of-00001 is empty (0 bytes"),
    "data shard byte flipped": (_in(SHARD, _flip, 1500),
                                "its weight data (variables/) is corrupted (a checksum does not match)"),
    "index garbage": (_in(INDEX, _write, b"x" * 600), "variables/variables.index is corrupted (not an sstable"),
    "saved_model.pb garbage": (_in("saved_model.pb", _write, b"junk" * 50), "saved_model.pb is corrupted or truncated"),
    "saved_model.pb truncated": (_in("saved_model.pb", _truncate, 20000), "saved_model.pb is corrupted or truncated"),
    "saved_model.pb deleted": (_in("saved_model.pb", os.remove), "saved_model.pb (the graph) is missing"),
}


@pytest.mark.parametrize("kind", sorted(EXPORT_DAMAGE))
def test_damaged_export_gives_clean_errors(intact, tmp_path, kind):
    damage, message = EXPORT_DAMAGE[kind]
    folder = str(tmp_path / "export")
    shutil.copytree(intact["export"], folder)
    damage(folder)
    code, out, err = _match(intact, folder)
    assert code == 2 and out == ""
    assert f"error: could not load SavedModel {folder!r}: {message}" in err
    with pytest.raises(ModelLoadError) as raised:
        loading.load_embedding_model(folder)
    assert str(raised.value).startswith(f"could not load SavedModel {folder!r}: {message}")


def test_match_command_on_a_deleted_shard_exits_2_without_traceback(intact, tmp_path):
    """The tester's case, through the real command: `OpError` traceback before, a clean error now."""
    folder = str(tmp_path / "export")
    shutil.copytree(intact["export"], folder)
    os.remove(os.path.join(folder, SHARD))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-m", "reid_keras.match", *intact["images"], "--model", folder],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert "Traceback" not in done.stderr
    assert f"could not load SavedModel {folder!r}: no weight data in variables/" in done.stderr


def _rezip(src, dst, drop=None, replace=None):
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w") as new:
        for name in old.namelist():
            if name != drop:
                new.writestr(name, (replace or {}).get(name, old.read(name)))


def _other_architecture_weights(src, dst):
    """Weights of the same layout with a 4-d embedding where ours has 8: same layer names, other shapes."""
    path = os.path.join(os.path.dirname(dst), "other.keras")
    tiny_siamese(units=4).save(path)
    _rezip(src, dst, replace={"model.weights.h5": zipfile.ZipFile(path).read("model.weights.h5")})


def _rename_layer_class(src, dst, module, class_name, registered_name):
    """`src` whose config.json names another class for its Subtract layer."""
    config = json.loads(zipfile.ZipFile(src).read("config.json"))
    layer = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Subtract")
    layer.update(module=module, class_name=class_name, registered_name=registered_name)
    _rezip(src, dst, replace={"config.json": json.dumps(config).encode()})


KERAS_DAMAGE = {
    "truncated to half": (lambda s, d: (shutil.copy(s, d), _truncate(d, os.path.getsize(s) // 2)),
                          "not a complete zip archive (it starts like one but its end is missing"),
    "last bytes cut": (lambda s, d: (shutil.copy(s, d), _truncate(d, os.path.getsize(s) - 10)),
                       "not a complete zip archive (it starts like one but its end is missing"),
    "empty": (lambda s, d: open(d, "wb").close(), "an empty file (0 bytes"),
    "text": (lambda s, d: open(d, "w").write("not a model\n"), "not a zip archive (a .keras model is one); it is a "
                                                                "text file of 12 bytes"),
    "no config.json": (lambda s, d: _rezip(s, d, drop="config.json"), "the .keras archive has no config.json"),
    "no weights": (lambda s, d: _rezip(s, d, drop="model.weights.h5"), "the .keras archive has no model.weights.h5"),
    "config not JSON": (lambda s, d: _rezip(s, d, replace={"config.json": b"{oops"}), "its config.json is not valid "
                                                                                      "JSON"),
    "byte flipped": (lambda s, d: (shutil.copy(s, d), _flip(d, os.path.getsize(s) // 2)),
                     "the .keras archive is corrupted (model.weights.h5 fails its CRC check)"),
    "weights of another architecture": (_other_architecture_weights,
                                        "its weights (model.weights.h5) do not fit the architecture in its config.json "
                                        "(weights of another model?); layer 'dense': a variable of shape (84, 8) gets "
                                        "(84, 4) from the file"),
    "unregistered class": (lambda s, d: _rename_layer_class(s, d, "reid_keras.models.layers", "NoSuchLayer",
                                                            "reid_keras>NoSuchLayer"),
                           "it uses the class 'NoSuchLayer' (module reid_keras.models.layers), which is not "
                           "registered: call reid_keras.families.register_serializables() first"),
    "class Keras lacks": (lambda s, d: _rename_layer_class(s, d, "keras.layers", "NoSuchLayer", None),
                          "its config.json names 'keras.layers.NoSuchLayer', which this Keras"),
}


@pytest.mark.parametrize("kind", sorted(KERAS_DAMAGE))
def test_damaged_keras_file_gives_clean_errors(intact, tmp_path, kind):
    damage, message = KERAS_DAMAGE[kind]
    shutil.copy(os.path.join(intact["run"], "config.json"), tmp_path)  # a run folder: export finds the family
    path = str(tmp_path / "last.keras")
    damage(intact["keras"], path)
    code, _, err = _export(path, str(tmp_path / "out"))
    assert code == 2 and f"error: could not load {path!r}: {message}" in err
    assert "File not found" not in err and not (tmp_path / "out").exists()
    with pytest.raises(ModelLoadError) as raised:
        loading.load_keras_model(path)
    assert str(raised.value).startswith(f"could not load {path!r}: {message}")


def test_paths_that_are_not_models(intact, tmp_path):
    run, export = intact["run"], intact["export"]
    cases = [
        (str(tmp_path / "missing"), f"model path {str(tmp_path / 'missing')!r} does not exist"),
        (str(tmp_path), f"could not load {str(tmp_path)!r}: an empty folder"),
        (run, f"could not load {run!r}: a training run folder, not a model; pass one of its models: "
              f"{os.path.join(run, 'last.keras')} or {os.path.join(run, 'export')}"),
        (os.path.join(export, "saved_model.pb"), f"the graph file of a SavedModel; pass the folder holding it, "
                                                 f"{export!r}"),
        (intact["images"][0], f"could not load {intact['images'][0]!r}: a PNG image, not a model"),
    ]
    for path, message in cases:
        with pytest.raises(ModelLoadError) as raised:
            loading.inspect_model_path(path)
        assert message in str(raised.value), path
        assert message in _match(intact, path)[2] and message in _export(path, str(tmp_path / "o"))[2]
    weights = str(tmp_path / "w.weights.h5")
    intact["model"].save_weights(weights)
    assert "an HDF5 weights file (weights without the architecture), not a model; pass the .keras model they " \
           "belong to" in _export(weights, str(tmp_path / "o"))[2]
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(intact["images"][0], images)
    code, _, err = _match(intact, str(images))
    assert code == 2 and "a folder without saved_model.pb, so not a reid_keras export" in err and "a.png" in err
    code, _, err = _match(intact, intact["keras"])
    assert code == 2 and f"{intact['keras']!r} is a .keras file, not a reid_keras export: export it first" in err
    code, _, err = _export(export, str(tmp_path / "o"))
    assert code == 2 and f"--model {export!r} is an exported SavedModel folder already" in err
    renamed = str(tmp_path / "model.zip")
    shutil.copy(intact["keras"], renamed)
    with pytest.raises(ModelLoadError, match="a Keras archive whose name does not end in .keras"):
        loading.load_keras_model(renamed)
    assert not (tmp_path / "o").exists()


def test_nan_weight_refused_by_export_and_evaluate_naming_the_model(intact, tmp_path):
    import keras

    model = keras.models.clone_model(intact["model"])
    model.set_weights(intact["model"].get_weights())
    kernel = model.get_layer("embedding").layers[-1].kernel
    values = kernel.numpy()
    values[3, 1], values[5, 0] = np.nan, np.nan
    values[7, 2] = np.inf
    kernel.assign(values)
    with pytest.raises(ExportError, match=r"model 'siamese' has non-finite weights: variable 'dense/kernel' holds 2 "
                                          r"NaN and 1 inf of its 672 values"):
        export_model(model, str(tmp_path / "lib_out"), preprocessing="none", verifier=model)
    path = str(tmp_path / "last.keras")
    model.save(path)
    shutil.copy(os.path.join(intact["run"], "config.json"), tmp_path)
    code, _, err = _export(path, str(tmp_path / "out"))
    assert code == 2
    assert f"model {path!r} has non-finite weights: variable 'dense/kernel' holds 2 NaN and 1 inf" in err
    code, _, err = _evaluate(intact, path, str(tmp_path / "eval"))
    assert code == 2 and f"error: model {path!r} has non-finite weights: variable 'dense/kernel'" in err
    assert "gallery_features" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "lib_out").exists()


def test_nan_export_refused_by_match_and_evaluate(intact, tmp_path):
    folder = str(tmp_path / "nan_export")
    _resave_export(intact["export"], folder, np.nan)
    code, out, err = _match(intact, folder)
    assert code == 2 and out == ""
    assert f"error: model {folder!r} has non-finite weights: variable 'dense/kernel' holds 672 NaN and 0 inf" in err
    code, _, err = _evaluate(intact, folder, str(tmp_path / "eval"))
    assert code == 2 and f"model {folder!r} has non-finite weights" in err


def test_overflowing_outputs_refused_by_export_match_and_evaluate(intact, tmp_path):
    """Finite weights whose outputs overflow to inf: export's probe images, match's and evaluate's outputs."""
    import keras

    model = keras.models.clone_model(intact["model"])
    model.set_weights(intact["model"].get_weights())
    kernel = model.get_layer("embedding").layers[-1].kernel
    kernel.assign(np.full(kernel.shape, 3e38, np.float32))
    loading.check_finite_weights(model.variables, "finite")  # the weights themselves pass
    with pytest.raises(ExportError, match=r"model 'siamese' produced non-finite features \(NaN or inf\) for 2 of 2 "
                                          r"probe image\(s\)"):
        export_model(model, str(tmp_path / "lib_out"), preprocessing="none", verifier=model)
    assert not (tmp_path / "lib_out").exists()
    folder = str(tmp_path / "overflow_export")
    _resave_export(intact["export"], folder, 3e38)
    code, out, err = _match(intact, folder)
    assert code == 2 and out == ""
    assert f"error: model {folder!r} produced non-finite features (NaN or inf) for 2 of 2 image(s)" in err
    code, _, err = _evaluate(intact, folder, str(tmp_path / "eval"))
    assert code == 2 and f"error: model {folder!r} produced non-finite features" in err
    assert "gallery_features" not in err and "dataset" not in err.split("error:")[-1]
    assert not os.path.exists(tmp_path / "eval" / "metrics.json")


def test_embedding_model_refuses_non_finite_features():
    """The wrapper the trainer's evaluation also uses: rows with NaN / inf counted, the model named."""
    def features(images):
        out = np.ones((len(images), 4), np.float32)
        if len(images) > 3:
            out[1, 2], out[3, 0] = np.nan, -np.inf
        return out

    model = loading.EmbeddingModel(embed_fn=features, image_size=(8, 4), preprocessing=None,
                                   source="runs/x/last.keras", kind="keras")
    with pytest.raises(NonFiniteModelError, match=r"model 'runs/x/last.keras' produced non-finite features \(NaN or "
                                                  r"inf\) for 2 of 5 image\(s\)"):
        model.embed(np.zeros((5, 8, 4, 3), np.float32))
    np.testing.assert_array_equal(model.embed(np.zeros((2, 8, 4, 3), np.float32)), np.ones((2, 4)))


def test_check_finite_weights_counts_against_numpy():
    import keras

    good = keras.Variable(np.ones((3, 3), np.float32), name="good")
    first = keras.Variable(np.array([np.nan, 1.0, np.inf, -np.inf], np.float32), name="first")
    second = keras.Variable(np.array([np.nan], np.float32), name="second")
    seed = keras.Variable(np.array([1, 2], np.int64), name="seed", dtype="int64")  # not float: skipped
    loading.check_finite_weights([good, seed], "m.keras")
    with pytest.raises(NonFiniteModelError) as raised:
        loading.check_finite_weights([good, first, seed, second], "m.keras")
    assert str(raised.value).startswith("model 'm.keras' has non-finite weights: variable 'first' holds 1 NaN and 2 "
                                        "inf of its 4 values (1 more variable(s) likewise)")


def test_match_on_an_embed_only_export_prints_the_cosine(intact, tmp_path):
    folder = export_model(intact["model"], str(tmp_path / "embed_only"), preprocessing="none")
    code, out, err = _match(intact, folder)
    assert code == 0 and "has no verify endpoint" in err
    loaded = loading.load_saved_model(folder)
    a, b = (np.asarray(loaded.embed(np.asarray(match.read_image(p))[None]))[0] for p in intact["images"])
    assert out.strip().splitlines() == [f"cosine_similarity: {float(a @ b):.6f}"]
