"""SquareLayer and L2Normalize: maths against numpy, errors, serialisation (safe_mode=True)."""
import keras
import numpy as np
import pytest

from reid_keras.models.layers import L2Normalize, SquareLayer


def test_square_layer_matches_numpy_on_vectors_and_maps():
    rng = np.random.default_rng(0)
    for shape in [(5, 7), (2, 3, 4, 6)]:
        a = rng.normal(size=shape).astype("float32")
        b = rng.normal(size=shape).astype("float32")
        out = keras.ops.convert_to_numpy(SquareLayer()([a, b]))
        np.testing.assert_allclose(out, (a - b) ** 2, rtol=1e-6, atol=1e-7)
    # symmetric and zero for identical inputs (the verification head sees an unordered pair)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(SquareLayer()([b, a])), (a - b) ** 2, rtol=1e-6)
    assert not keras.ops.convert_to_numpy(SquareLayer()([a, a])).any()


def test_square_layer_has_no_weights_and_keeps_shape():
    f1, f2 = keras.Input((12,)), keras.Input((12,))
    layer = SquareLayer()
    out = layer([f1, f2])
    assert tuple(out.shape) == (None, 12)
    assert layer.weights == []


def test_square_layer_rejects_bad_inputs():
    with pytest.raises(ValueError, match="two feature tensors"):
        SquareLayer()(keras.Input((4,)))
    with pytest.raises(ValueError, match="same shape"):
        SquareLayer()([keras.Input((4,)), keras.Input((5,))])


def test_l2_normalize_matches_numpy_and_handles_zero_rows():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 9)).astype("float32") * 10
    x[2] = 0.0
    out = keras.ops.convert_to_numpy(L2Normalize()(x))
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    expected = np.where(norms > 0, x / np.maximum(norms, 1e-30), 0.0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-7)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(np.linalg.norm(np.delete(out, 2, axis=0), axis=1), 1.0, rtol=1e-5)
    # another axis: columns get unit norm
    cols = keras.ops.convert_to_numpy(L2Normalize(axis=0)(x))
    np.testing.assert_allclose(cols, x / np.linalg.norm(x, axis=0, keepdims=True), rtol=1e-5, atol=1e-7)


def test_l2_normalize_rejects_bad_epsilon():
    with pytest.raises(ValueError, match="epsilon"):
        L2Normalize(epsilon=0)


def test_layers_round_trip_through_keras_file_in_safe_mode(tmp_path):
    a, b = keras.Input((8,), name="a"), keras.Input((8,), name="b")
    dense = keras.layers.Dense(8, name="shared")
    square = SquareLayer(name="square")([dense(a), dense(b)])
    out = L2Normalize(axis=-1, epsilon=1e-9, name="l2")(square)
    model = keras.Model([a, b], out)
    path = tmp_path / "tiny.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded.get_layer("square"), SquareLayer)
    l2 = loaded.get_layer("l2")
    assert isinstance(l2, L2Normalize) and l2.epsilon == 1e-9 and l2.axis == -1
    rng = np.random.default_rng(2)
    xa, xb = rng.normal(size=(3, 8)).astype("float32"), rng.normal(size=(3, 8)).astype("float32")
    np.testing.assert_allclose(loaded([xa, xb]), model([xa, xb]), rtol=1e-6, atol=1e-7)
