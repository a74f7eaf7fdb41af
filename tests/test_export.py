"""SavedModel export (`embed` / `verify` on raw uint8 images), atomic writes, and the match CLI."""
import json
import os
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf

from reid_keras.cli import export as export_cli
from reid_keras.cli import match
from reid_keras.models import saved_model as export_lib
from reid_keras.io_utils import atomic_export_dir, atomic_save_keras, atomic_write_json
from tests.fixtures.siamese_models import calibrated_siamese


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A calibrated 32x32 B0 siamese model, saved as .keras (outside a run folder) and exported through the CLI."""
    root = tmp_path_factory.mktemp("export")
    model = calibrated_siamese("softmax", seed=3)
    keras_path = str(root / "best.keras")
    atomic_save_keras(model, keras_path)
    out = str(root / "saved")
    assert export_cli.main(["--model", keras_path, "--out", out, "--family", "siamese"]) == 0
    loaded, metadata = export_lib.load_export(out)
    return model, keras_path, out, loaded, metadata


def uint8_images(n, height, width, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)


def reference_input(images):
    """The resize the export must do, written independently: tf.image.resize, bilinear, float 0..255."""
    return tf.image.resize(tf.cast(images, tf.float32), (32, 32), method="bilinear", antialias=False).numpy()


def test_embed_matches_the_keras_embedding_on_any_image_size(exported):
    model, _, _, loaded, _ = exported
    embedding = model.get_layer("embedding")
    for height, width, seed in [(32, 32, 0), (71, 40, 1), (20, 13, 2)]:
        images = uint8_images(3, height, width, seed)
        got = loaded.embed(images).numpy()
        feats = embedding.predict(reference_input(images), verbose=0)
        want = feats / np.linalg.norm(feats, axis=1, keepdims=True)
        assert got.shape == (3, 1280) and got.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(got, want, atol=1e-5)
        # the serving signature gives the same numbers
        sig = loaded.signatures["embed"](images=tf.constant(images))
        np.testing.assert_allclose(next(iter(sig.values())).numpy(), got, atol=1e-6)


def test_verify_matches_the_keras_pair_probability(exported):
    model, _, _, loaded, _ = exported
    a, b = uint8_images(4, 64, 30, 5), uint8_images(4, 40, 48, 6)
    got = loaded.verify(a, b).numpy()
    want = model.predict([reference_input(a), reference_input(b)], verbose=0)[:, 1]
    assert got.shape == (4,)
    assert want.std() > 1e-3, "the test model must give input-dependent probabilities"
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_export_records_size_and_preprocessing(exported):
    model, _, out, loaded, metadata = exported
    assert sorted(loaded.signatures) == ["embed", "verify"]
    assert loaded.image_size.numpy().tolist() == [32, 32]
    assert loaded.preprocessing.numpy() == b"efficientnet"
    with open(os.path.join(out, export_lib.METADATA_FILE), encoding="utf-8") as handle:
        on_disk = json.load(handle)
    assert on_disk == metadata
    assert (metadata["image_size"], metadata["preprocessing"], metadata["head"], metadata["feature_dim"]) == \
        ([32, 32], "efficientnet", "softmax", 1280)
    # the evaluation side reads the same facts (models/loading.py)
    from reid_keras.models.loading import load_embedding_model

    embedder = load_embedding_model(out)
    assert embedder.image_size == (32, 32) and embedder.preprocessing == "efficientnet"
    images = uint8_images(2, 50, 25, 8)
    np.testing.assert_allclose(embedder.embed(images), loaded.embed(images).numpy(), atol=1e-6)


def test_failed_export_leaves_no_partial_folder(exported, tmp_path, monkeypatch):
    model = exported[0]

    def broken_save(obj, path, *args, **kwargs):
        with open(os.path.join(path, "saved_model.pb"), "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(tf.saved_model, "save", broken_save)
    fresh = tmp_path / "new_export"
    with pytest.raises(OSError, match="disk full"):
        export_lib.export_model(model, str(fresh))
    assert list(tmp_path.iterdir()) == []
    # an existing export survives a failed re-export untouched
    old = tmp_path / "old_export"
    old.mkdir()
    (old / "marker").write_text("previous export")
    with pytest.raises(OSError):
        export_lib.export_model(model, str(old))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old_export"]
    assert (old / "marker").read_text() == "previous export"


def test_atomic_helpers_replace_whole_and_clean_up(tmp_path):
    target = tmp_path / "run" / "export"
    with atomic_export_dir(str(target)) as tmp:
        assert os.path.dirname(tmp) == str(target.parent) and not target.exists()
        (tmp_path / "run" / os.path.basename(tmp) / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with atomic_export_dir(str(target)) as tmp:
        with open(os.path.join(tmp, "b.txt"), "w") as handle:
            handle.write("two")
    assert sorted(os.listdir(target)) == ["b.txt"]  # replaced whole, not merged
    assert sorted(os.listdir(tmp_path / "run")) == ["export"]

    class FailingModel:
        def save(self, path):
            with open(path, "wb") as handle:
                handle.write(b"half a zip")
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_save_keras(FailingModel(), str(tmp_path / "run" / "best.keras"))
    assert sorted(os.listdir(tmp_path / "run")) == ["export"]
    with pytest.raises(ValueError, match="must end in .keras"):
        atomic_save_keras(FailingModel(), str(tmp_path / "best.h5"))
    atomic_write_json(str(tmp_path / "run" / "config.json"), {"image_size": (160, 80)})
    assert json.loads((tmp_path / "run" / "config.json").read_text()) == {"image_size": [160, 80]}


def test_prepare_images_caffe_mode_matches_numpy():
    images = uint8_images(2, 8, 6, 9)
    got = keras.ops.convert_to_numpy(export_lib.prepare_images(images, (8, 6), "caffe"))
    want = images[..., ::-1].astype("float32") - np.array([103.939, 116.779, 123.68], dtype="float32")
    np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.raises(ValueError, match="unknown preprocessing 'zscore'"):
        export_lib.prepare_images(images, (8, 6), "zscore")


def test_export_cli_bad_arguments(exported, tmp_path, capsys):
    with pytest.raises(SystemExit):
        export_cli.main(["--model", str(tmp_path / "missing.keras"), "--out", str(tmp_path / "o")])
    assert "missing.keras" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_cli.main(["--model", exported[1], "--out", str(tmp_path / "o"), "--preprocessing", "zscore"])
    assert "zscore" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match=r"image_size \(16, 16\) differs from the input size \(32, 32\)"):
        export_lib.export_model(exported[0], str(tmp_path / "o"), image_size=(16, 16))
    with pytest.raises(ValueError, match="no layer named 'embedding'"):
        export_lib.export_model(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]), str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_export_cli_default_out_is_beside_the_model_or_under_runs(exported, tmp_path, monkeypatch):
    """Issue 12 item 6: without --out nothing lands in the working directory's root."""
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    shutil.copy(exported[1], run / "best.keras")
    (run / "config.json").write_text(json.dumps({"family": "siamese", "preprocessing": "efficientnet"}))
    monkeypatch.chdir(tmp_path)
    assert export_cli.main(["--model", str(run / "best.keras")]) == 0
    assert export_lib.read_metadata(str(run / "export_best"))["preprocessing"] == "efficientnet"
    outside = tmp_path / "loose.keras"
    shutil.copy(exported[1], outside)
    assert export_cli.main(["--model", str(outside), "--family", "siamese"]) == 0
    assert (tmp_path / "runs" / "export" / "loose" / "saved_model.pb").is_file()
    assert sorted(os.listdir(tmp_path)) == ["loose.keras", "runs"]


def _write_png(path, image):
    tf.io.write_file(str(path), tf.io.encode_png(image))


def test_match_cli_prints_probability_and_cosine(exported, tmp_path, capsys):
    _, _, out, loaded, _ = exported
    a, b = uint8_images(1, 60, 30, 10)[0], uint8_images(1, 45, 52, 11)[0]
    _write_png(tmp_path / "a.png", a)
    _write_png(tmp_path / "b.png", b)
    assert match.main([str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--model", out]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == ["same_person_probability", "cosine_similarity"]
    probability, cosine = (float(line.split(": ")[1]) for line in lines)
    fa, fb = loaded.embed(a[None]).numpy()[0], loaded.embed(b[None]).numpy()[0]
    assert probability == pytest.approx(float(loaded.verify(a[None], b[None]).numpy()[0]), abs=1e-6)
    assert cosine == pytest.approx(float(fa @ fb / np.linalg.norm(fa) / np.linalg.norm(fb)), abs=1e-5)
    assert match.main([str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--model", out, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["same_person_probability"] == pytest.approx(probability, abs=1e-6)


def test_match_cli_bad_arguments(exported, tmp_path, capsys):
    out = exported[2]
    _write_png(tmp_path / "a.png", uint8_images(1, 20, 10, 12)[0])
    with pytest.raises(SystemExit):
        match.main([str(tmp_path / "a.png"), str(tmp_path / "nope.jpg"), "--model", out])
    assert "nope.jpg" in capsys.readouterr().err
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(SystemExit):
        match.main([str(tmp_path / "a.png"), str(tmp_path / "text.png"), "--model", out])
    err = capsys.readouterr().err
    assert "text.png" in err and "cannot be decoded" in err
    with pytest.raises(SystemExit):
        match.main([str(tmp_path / "a.png"), str(tmp_path / "a.png"), "--model", str(tmp_path)])
    assert "not a reid_keras export" in capsys.readouterr().err


def test_load_model_reopens_a_run_model_in_a_fresh_process(tmp_path):
    """A fresh interpreter knows none of our registered layers: plain Keras fails, `load_model` works."""
    import subprocess
    import sys

    import keras

    from reid_keras.models.layers import SquareLayer

    a, b = keras.Input((4,)), keras.Input((4,))
    out = keras.layers.Dense(2, name="verification")(SquareLayer(name="square")([a, b]))
    model = keras.Model([a, b], out)
    model.compile(optimizer="rmsprop", loss="sparse_categorical_crossentropy")
    path = str(tmp_path / "last.keras")
    model.save(path)
    x = np.arange(8, dtype="float32").reshape(2, 4) / 8
    expected = np.asarray(model([x, x[::-1]]))
    script = (f"import numpy as np; x = np.arange(8, dtype='float32').reshape(2, 4) / 8\n"
              f"from reid_keras.families import load_model\nm = load_model({path!r})\n"
              f"np.save({str(tmp_path / 'out.npy')!r}, np.asarray(m([x, x[::-1]])))")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    plain = subprocess.run([sys.executable, "-c", f"import keras; keras.saving.load_model({path!r})"],
                           capture_output=True, text=True, env=env)
    assert plain.returncode != 0 and "SquareLayer" in plain.stderr
    ours = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert ours.returncode == 0, ours.stderr[-2000:]
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-6)
