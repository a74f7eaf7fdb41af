"""Feature extraction (L2, flip averaging, cache) and model loading for embedding."""
import os

import numpy as np
import pytest

from reid_keras.data.datasets.base import ImageRecord
from reid_keras.metrics.features import FeatureSet, extract_features, load_features, save_features
from reid_keras.models.loading import ModelLoadError, load_embedding_model
from tests.eval_helpers import IMAGE_SIZE, build_tiny_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    embedding, siamese = build_tiny_models()
    folder = tmp_path_factory.mktemp("models")
    path = str(folder / "siamese.keras")
    siamese.save(path)
    return {"embedding": embedding, "siamese": siamese, "keras_path": path, "folder": folder}


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 256, size=(10,) + IMAGE_SIZE + (3,)).astype(np.float32)


def _normalise(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flip_averaging_matches_manual_mean(models, images):
    net = models["embedding"]
    plain = net(images, training=False).numpy()
    mirrored = net(images[:, :, ::-1, :].copy(), training=False).numpy()
    assert not np.allclose(plain, mirrored, atol=1e-4), "the tiny model must be flip-sensitive"
    got = extract_features(net, images, batch_size=4, flip=True, verbose=False)
    np.testing.assert_allclose(got.features, _normalise((plain + mirrored) / 2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(got.features, axis=1), 1.0, rtol=1e-6)
    no_flip = extract_features(net, images, batch_size=3, flip=False, verbose=False)
    np.testing.assert_allclose(no_flip.features, _normalise(plain), rtol=1e-5, atol=1e-6)
    assert got.features.dtype == np.float32 and got.pids.tolist() == [-1] * 10


def test_progress_lines_in_logs(models, images, capsys):
    extract_features(models["embedding"], images, batch_size=4, flip=False, label="query features")
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == ["query features: 40% (4/10 images)", "query features: 80% (8/10 images)",
                     "query features: 100% (10/10 images)"]


def _write_records(folder, count=7):
    from PIL import Image

    rng = np.random.default_rng(1)
    os.makedirs(folder, exist_ok=True)
    records = []
    for i in range(count):
        path = os.path.join(folder, f"{i:04d}.jpg")
        Image.fromarray(rng.integers(0, 256, size=(32, 16, 3), dtype=np.uint8)).save(path)
        records.append(ImageRecord(path, pid=100 + i // 2, camid=i % 3))
    return records


class _Exploding:
    """A model that must not be called (the cache has to answer)."""

    image_size = IMAGE_SIZE

    def embed(self, images):
        raise AssertionError("model called although the cache matches")


def test_records_cache_written_reused_and_invalidated(models, tmp_path):
    records = _write_records(str(tmp_path / "imgs"))
    cache = str(tmp_path / "cache" / "query.npz")
    model = load_embedding_model(models["keras_path"])
    first = extract_features(model, records, batch_size=3, cache=cache, cache_key="m1", verbose=False)
    assert first.pids.tolist() == [r.pid for r in records]
    assert first.camids.tolist() == [r.camid for r in records]
    assert first.paths.tolist() == [r.path for r in records]
    stamp = os.stat(cache).st_mtime_ns
    assert sorted(os.listdir(tmp_path / "cache")) == ["query.npz"]  # no temp file left behind

    again = extract_features(_Exploding(), records, batch_size=3, cache=cache, cache_key="m1", verbose=False)
    np.testing.assert_array_equal(again.features, first.features)
    assert os.stat(cache).st_mtime_ns == stamp
    # Another model key, other paths, or another flip setting must recompute.
    with pytest.raises(AssertionError, match="model called"):
        extract_features(_Exploding(), records, cache=cache, cache_key="m2", verbose=False)
    with pytest.raises(AssertionError, match="model called"):
        extract_features(_Exploding(), records[::-1], cache=cache, cache_key="m1", verbose=False)
    with pytest.raises(AssertionError, match="model called"):
        extract_features(_Exploding(), records, cache=cache, cache_key="m1", flip=False, verbose=False)
    reversed_ = extract_features(model, records[::-1], batch_size=3, cache=cache, cache_key="m1", verbose=False)
    np.testing.assert_allclose(reversed_.features, first.features[::-1], atol=1e-6)
    assert os.stat(cache).st_mtime_ns != stamp


def test_save_load_round_trip_and_errors(tmp_path):
    fs = FeatureSet(np.eye(3, dtype=np.float32), np.array([1, 2, 3]), np.array([0, 1, 0]),
                    np.array(["a.jpg", "b.jpg", "c.jpg"]), {"flip": True})
    path = save_features(str(tmp_path / "f.npz"), fs, key="k")
    back = load_features(path)
    np.testing.assert_array_equal(back.features, fs.features)
    assert back.paths.tolist() == ["a.jpg", "b.jpg", "c.jpg"] and back.meta == {"flip": True, "cache_key": "k"}
    np.savez(str(tmp_path / "other.npz"), x=np.zeros(2))
    with pytest.raises(ValueError, match="not a reid_keras feature file"):
        load_features(str(tmp_path / "other.npz"))
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_features(str(tmp_path / "missing.npz"))


def test_load_keras_uses_embedding_submodel(models, images):
    model = load_embedding_model(models["keras_path"])
    assert model.kind == "keras" and model.image_size == IMAGE_SIZE
    np.testing.assert_allclose(model.embed(images), models["embedding"](images).numpy(), rtol=1e-5, atol=1e-6)
    # uint8 input is the same image
    np.testing.assert_allclose(model.embed(images.astype(np.uint8)), model.embed(images), atol=1e-6)


def test_load_keras_single_input_model_and_errors(models, tmp_path):
    import keras

    single = str(tmp_path / "single.keras")
    models["embedding"].save(single)
    assert load_embedding_model(single).image_size == IMAGE_SIZE
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_embedding_model(str(tmp_path / "nope.keras"))
    broken = tmp_path / "broken.keras"
    broken.write_bytes(b"not a zip file")
    with pytest.raises(ModelLoadError, match="could not load .*broken.keras"):
        load_embedding_model(str(broken))
    with pytest.raises(ModelLoadError, match="without saved_model.pb"):
        load_embedding_model(str(tmp_path))
    a, b = keras.Input((4,)), keras.Input((4,))
    two = keras.Model([a, b], keras.layers.Add()([a, b]))
    two.save(str(tmp_path / "two.keras"))
    with pytest.raises(ModelLoadError, match="no sub-model or layer named 'embedding'"):
        load_embedding_model(str(tmp_path / "two.keras"))


def test_load_saved_model_embed_function(models, images, tmp_path):
    import keras
    import tensorflow as tf

    net = models["embedding"]
    archive = keras.export.ExportArchive()
    archive.track(net)
    archive.add_endpoint(name="embed", fn=lambda x: net(tf.cast(x, tf.float32), training=False),
                         input_signature=[tf.TensorSpec((None,) + IMAGE_SIZE + (3,), tf.uint8)])
    folder = str(tmp_path / "exported")
    archive.write_out(folder, verbose=False)
    model = load_embedding_model(folder)
    assert model.kind == "saved_model" and model.image_size == IMAGE_SIZE and model.input_dtype == "uint8"
    raw = images.astype(np.uint8)
    np.testing.assert_allclose(model.embed(raw), net(raw.astype(np.float32)).numpy(), rtol=1e-5, atol=1e-5)
    fs = extract_features(model, raw, batch_size=4, flip=False, verbose=False)
    np.testing.assert_allclose(fs.features, _normalise(net(raw.astype(np.float32)).numpy()), atol=1e-5)


def test_load_export_of_reid_keras_export(models, images, tmp_path):
    """The package's own exporter: `embed` on any-size uint8 plus recorded image_size / preprocessing."""
    from reid_keras.models.saved_model import export_model

    folder = export_model(models["siamese"], str(tmp_path / "export"), preprocessing="none")
    model = load_embedding_model(folder)
    assert model.image_size == IMAGE_SIZE and model.preprocessing == "none" and model.input_dtype == "uint8"
    raw = images.astype(np.uint8)
    np.testing.assert_allclose(model.embed(raw), _normalise(models["embedding"](raw.astype(np.float32)).numpy()),
                               atol=1e-5)


def test_dataset_input_carries_ids(models, images):
    import tensorflow as tf

    pids, cams = np.arange(10) + 5, np.arange(10) % 2
    single = tf.data.Dataset.from_tensor_slices((images, pids, cams))  # unbatched: batched inside
    got = extract_features(models["embedding"], single, batch_size=4, flip=False, verbose=False)
    assert got.pids.tolist() == pids.tolist() and got.camids.tolist() == cams.tolist()
    np.testing.assert_allclose(got.features, _normalise(models["embedding"](images).numpy()), atol=1e-5)
    with pytest.raises(TypeError, match="list of ImageRecord"):
        extract_features(models["embedding"], "not images")


def test_undecodable_file_left_out_and_rows_stay_aligned(models, tmp_path, capsys):
    records = _write_records(str(tmp_path / "imgs"), count=5)
    broken = tmp_path / "imgs" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff" + b"\x00" * 20)  # JPEG magic, no image
    records.insert(2, ImageRecord(str(broken), 999, 1))
    cache = str(tmp_path / "c.npz")
    model = load_embedding_model(models["keras_path"])
    got = extract_features(model, records, batch_size=4, cache=cache, cache_key="k", verbose=False)
    good = [r for r in records if r.pid != 999]
    assert got.paths.tolist() == [r.path for r in good] and got.pids.tolist() == [r.pid for r in good]
    assert got.meta["skipped"] == [str(broken)]
    assert "1 undecodable image(s) left out" in capsys.readouterr().out
    alone = extract_features(model, good, batch_size=4, flip=True, verbose=False)
    np.testing.assert_allclose(got.features, alone.features, atol=1e-6)
    again = extract_features(_Exploding(), records, cache=cache, cache_key="k", verbose=False)
    assert again.paths.tolist() == got.paths.tolist()


def test_keras_preprocessing_from_run_config(models, images, tmp_path):
    """A run's config.json names the backbone preprocessing; embed applies it (caffe: BGR minus mean)."""
    import json
    import shutil

    path = str(tmp_path / "model.keras")
    shutil.copy(models["keras_path"], path)
    (tmp_path / "config.json").write_text(json.dumps({"preprocessing": "resnet50"}))
    model = load_embedding_model(path)
    assert model.preprocessing == "resnet50"
    caffe = images[..., ::-1] - np.array([103.939, 116.779, 123.68], np.float32)
    np.testing.assert_allclose(model.embed(images), models["embedding"](caffe).numpy(), rtol=1e-4, atol=1e-5)
    assert load_embedding_model(path, preprocessing="none").preprocessing == "none"
    with pytest.raises(ModelLoadError, match="unknown preprocessing 'bogus'"):
        load_embedding_model(path, preprocessing="bogus")
