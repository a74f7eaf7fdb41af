"""Person-search heads (issue 14, OIM paper §3.1): box predictor and L2-normalised embedding, against numpy."""
import keras
import numpy as np
import pytest

from reid_keras.models.person_search.heads import BACKGROUND, PERSON, BoxPredictor, EmbeddingHead

CHANNELS = 2048


def features(rows, channels=CHANNELS, seed=0):
    return np.random.default_rng(seed).normal(0.0, 1.0, (rows, channels)).astype("float32")


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_box_predictor_is_two_linear_maps_with_faster_rcnn_initialisation():
    keras.utils.set_random_seed(3)
    head = BoxPredictor()
    x = features(7)
    logits, deltas = head(x)
    assert tuple(logits.shape) == (7, 2) and tuple(deltas.shape) == (7, 4)
    assert (BACKGROUND, PERSON) == (0, 1)
    w_cls, b_cls = head.classifier.get_weights()
    w_box, b_box = head.regressor.get_weights()
    np.testing.assert_allclose(logits, x @ w_cls + b_cls, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(deltas, x @ w_box + b_box, rtol=1e-4, atol=1e-6)
    # py-faster-rcnn: N(0, 0.01) classifier, N(0, 0.001) regressor, zero biases.
    assert abs(w_cls.std() - 0.01) < 0.001 and abs(w_box.std() - 0.001) < 0.0001
    assert not b_cls.any() and not b_box.any()
    assert head.compute_output_shape((None, CHANNELS)) == ((None, 2), (None, 4))


def test_embedding_head_projects_to_unit_vectors():
    keras.utils.set_random_seed(4)
    head = EmbeddingHead()
    x = features(6)
    out = keras.ops.convert_to_numpy(head(x))
    assert out.shape == (6, 256)
    kernel, bias = head.projection.get_weights()
    np.testing.assert_allclose(out, unit(x @ kernel + bias), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    assert abs(kernel.std() - 0.01) < 0.001 and not bias.any()
    # an all-zero projection (zero input, zero bias) stays finite instead of 0/0
    zero = keras.ops.convert_to_numpy(head(np.zeros((2, CHANNELS), "float32")))
    assert np.isfinite(zero).all() and not zero.any()


def test_embedding_head_batch_norm_option_uses_batch_statistics_in_training():
    keras.utils.set_random_seed(5)
    head = EmbeddingHead(dim=8, batch_norm=True)
    x = features(5, channels=16)
    head(x)  # build
    kernel, bias = head.projection.get_weights()
    z = x @ kernel + bias
    epsilon = head.normalization.epsilon
    # inference with fresh moving statistics (mean 0, variance 1): only the 1/sqrt(1 + eps) scale, gone after L2
    inferred = keras.ops.convert_to_numpy(head(x, training=False))
    np.testing.assert_allclose(inferred, unit(z), rtol=1e-4, atol=1e-6)
    trained = keras.ops.convert_to_numpy(head(x, training=True))
    np.testing.assert_allclose(trained, unit((z - z.mean(0)) / np.sqrt(z.var(0) + epsilon)), rtol=1e-3, atol=1e-5)
    momentum = head.normalization.momentum
    np.testing.assert_allclose(head.normalization.moving_mean.numpy(), (1 - momentum) * z.mean(0), atol=1e-7)
    assert EmbeddingHead(dim=8).normalization is None  # the paper's head has none


def test_heads_round_trip_through_a_keras_file_in_safe_mode(tmp_path):
    keras.utils.set_random_seed(6)
    inputs = keras.Input((16,))
    logits, deltas = BoxPredictor(box_initializer=keras.initializers.RandomNormal(stddev=0.5), name="box")(inputs)
    embeddings = EmbeddingHead(dim=8, batch_norm=True, name="id_feat")(inputs)
    model = keras.Model(inputs, [logits, deltas, embeddings])
    model.get_layer("id_feat").normalization.moving_mean.assign(np.linspace(-1, 1, 8).astype("float32"))
    path = str(tmp_path / "heads.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    x = features(4, channels=16)
    for got, want in zip(loaded(x), model(x)):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(got), keras.ops.convert_to_numpy(want))
    assert type(loaded.get_layer("box")) is BoxPredictor and type(loaded.get_layer("id_feat")) is EmbeddingHead
    assert loaded.get_layer("id_feat").get_config() == model.get_layer("id_feat").get_config()
    assert loaded.get_layer("box").box_initializer.stddev == 0.5
    assert [w.path for w in loaded.weights] == [w.path for w in model.weights]


def test_heads_refuse_bad_arguments_and_inputs_by_name():
    with pytest.raises(ValueError, match=r"EmbeddingHead: dim must be an integer >= 1 \(paper: 256\), got 0"):
        EmbeddingHead(dim=0)
    with pytest.raises(ValueError, match="EmbeddingHead: batch_norm must be True or False, got 'yes'"):
        EmbeddingHead(batch_norm="yes")
    with pytest.raises(ValueError, match=r"box: BoxPredictor expects region features of shape \(regions, channels\)"
                                         r".*got \(None, 7, 7, 2048\)"):
        BoxPredictor(name="box")(keras.Input((7, 7, 2048)))
    with pytest.raises(ValueError, match=r"emb: EmbeddingHead expects .* got \(None, None\)"):
        EmbeddingHead(name="emb")(keras.Input((None,)))
