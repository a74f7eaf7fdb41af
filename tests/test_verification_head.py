"""DiagonalMetricHead: the siamese verification head that is a weighted distance (issue 12 item 7).

Small pair models (a shared Dense "embedding" on 6-d inputs) keep these tests fast; the EfficientNet
siamese with this head is in tests/test_siamese.py.
"""
import keras
import numpy as np
import pytest

from reid_keras.models.layers import DiagonalMetricHead, SquareLayer
from reid_keras.models.siamese import head_metric_of, loss_and_metrics, same_probability

DIM = 5


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def pair_model(head="softmax", head_metric="nonneg", seed=0, **head_kwargs):
    """Two 6-d inputs -> shared Dense(DIM) -> (f1 - f2)^2 -> the head named "verification"."""
    keras.utils.set_random_seed(seed)
    a, b = keras.Input((6,), name="a"), keras.Input((6,), name="b")
    shared = keras.layers.Dense(DIM, name="shared")
    square = SquareLayer(name="square")([shared(a), shared(b)])
    if head_metric == "nonneg":
        out = DiagonalMetricHead(head, name="verification", **head_kwargs)(square)
    else:
        out = keras.layers.Dense(2 if head == "softmax" else 1, activation=head, name="verification")(square)
    return keras.Model([a, b], out)


def head_on(head_layer, squared):
    return keras.ops.convert_to_numpy(head_layer(np.asarray(squared, np.float32)))


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_output_is_sigmoid_of_threshold_minus_weighted_distance(head):
    layer = DiagonalMetricHead(head, threshold_init=0.7)
    s = np.random.default_rng(0).uniform(0, 2, (8, DIM)).astype(np.float32)
    layer.build(s.shape)
    metric = np.array([0.0, 0.3, 1.2, 0.05, 2.0], np.float32)
    layer.metric.assign(metric)
    probs = head_on(layer, s)
    p_same = sigmoid(0.7 - s.astype(np.float64) @ metric)
    if head == "softmax":
        assert probs.shape == (8, 2)
        np.testing.assert_allclose(probs[:, 1], p_same, rtol=1e-5)
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    else:
        assert probs.shape == (8, 1)
        np.testing.assert_allclose(probs[:, 0], p_same, rtol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(same_probability(probs)), p_same, rtol=1e-5)
    # the Dense(1)-logit view that families.siamese.verification_distance reads
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.kernel), -metric[:, None])
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.bias), [np.float32(0.7)])


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_constraint_is_a_projection_after_each_update(head):
    """One SGD step equals the unconstrained step clipped at 0 (checked against the gradient from a
    GradientTape), and weights stay >= 0 over further steps, some of them exactly 0."""
    model = pair_model(head, metric_init=0.5)
    layer = model.get_layer("verification")
    rng = np.random.default_rng(1)
    # unrelated pairs, most labelled "same": the loss pulls the metric weights down, some across 0
    a, b = rng.normal(size=(16, 6)).astype(np.float32), rng.normal(size=(16, 6)).astype(np.float32)
    same = np.array([1] * 12 + [0] * 4)
    loss_fn, metrics = loss_and_metrics(head)
    lr = 1.0
    model.compile(keras.optimizers.SGD(lr), loss=loss_fn, metrics=metrics)

    import tensorflow as tf  # the gradient of one step, to predict the update independently of Keras' fit
    with tf.GradientTape() as tape:
        loss = loss_fn(same, model([a, b], training=True))
    grad = tape.gradient(loss, layer.metric).numpy()
    before = layer.metric.numpy().copy()
    model.train_on_batch([a, b], same)
    unconstrained = before - lr * grad
    assert (unconstrained < 0).any() and (unconstrained > 0).any(), "the step must push some weights below 0"
    np.testing.assert_allclose(layer.metric.numpy(), np.maximum(unconstrained, 0.0), rtol=1e-5, atol=1e-6)

    for _ in range(5):
        model.train_on_batch([a, b], same)
        assert (layer.metric.numpy() >= 0).all()
    assert (layer.metric.numpy() == 0).any()


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_same_probability_never_rises_with_a_squared_difference(head):
    """For random pairs and random non-negative metrics, growing |f1_k - f2_k| on any one channel never
    raises P(same); the paper's free Dense head on the same inputs does raise it (so the check can fail)."""
    rng = np.random.default_rng(2)
    s = rng.uniform(0, 1, (200, DIM)).astype(np.float32)
    steps = rng.uniform(0.01, 1.0, (200, 1)).astype(np.float32)
    constrained = DiagonalMetricHead(head, threshold_init=1.0)
    constrained.build(s.shape)
    constrained.metric.assign(rng.uniform(0, 1, DIM).astype(np.float32) * (rng.random(DIM) > 0.2))
    free = keras.layers.Dense(2 if head == "softmax" else 1, activation=head)
    free.build(s.shape)
    rises = {"nonneg": 0, "free": 0}
    for k in range(DIM):
        wider = s.copy()
        wider[:, k] += steps[:, 0]  # a larger squared difference on channel k only
        for name, layer in (("nonneg", constrained), ("free", free)):
            p0 = keras.ops.convert_to_numpy(same_probability(layer(s)))
            p1 = keras.ops.convert_to_numpy(same_probability(layer(wider)))
            rises[name] += int((p1 > p0 + 1e-7).sum())
    assert rises["nonneg"] == 0
    assert rises["free"] > 0


def test_bad_arguments_name_the_layer_and_value():
    with pytest.raises(ValueError, match=r"verification: unknown head 'softmax3': expected one of softmax, sigmoid"):
        DiagonalMetricHead("softmax3", name="verification")
    with pytest.raises(ValueError, match=r"head: metric_init must be >= 0 .* got -1"):
        DiagonalMetricHead(metric_init=-1, name="head")
    with pytest.raises(ValueError, match="needs a known feature size"):
        DiagonalMetricHead(name="head").build((None, None))


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
def test_get_config_round_trip(head):
    layer = DiagonalMetricHead(head, metric_init=0.2, threshold_init=-0.5, name="verification")
    config = layer.get_config()
    assert (config["head"], config["metric_init"], config["threshold_init"]) == (head, 0.2, -0.5)
    again = DiagonalMetricHead.from_config(config)
    assert again.get_config() == config
    s = np.random.default_rng(3).uniform(0, 1, (4, DIM)).astype(np.float32)
    np.testing.assert_allclose(head_on(again, s), head_on(layer, s), rtol=1e-6)
    # the initial values are the configured ones: P(same) = sigmoid(-0.5 - 0.2 * sum(s))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(same_probability(head_on(again, s))),
                               sigmoid(-0.5 - 0.2 * s.astype(np.float64).sum(1)), rtol=1e-5)


@pytest.mark.parametrize("head", ["softmax", "sigmoid"])
@pytest.mark.parametrize("head_metric", ["nonneg", "free"])
def test_trained_pair_model_saves_and_loads_in_safe_mode(head, head_metric, tmp_path):
    from reid_keras.io_utils import atomic_save_keras

    model = pair_model(head, head_metric, metric_init=0.1) if head_metric == "nonneg" else pair_model(head, head_metric)
    loss_fn, metrics = loss_and_metrics(head)
    model.compile(keras.optimizers.SGD(0.5), loss=loss_fn, metrics=metrics)
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(8, 6)).astype(np.float32), rng.normal(size=(8, 6)).astype(np.float32)
    model.train_on_batch([a, b], np.array([1, 0] * 4))
    path = tmp_path / f"{head}_{head_metric}.keras"
    atomic_save_keras(model, str(path))
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert head_metric_of(loaded) == head_metric
    assert type(loaded.get_layer("verification")) is type(model.get_layer("verification"))
    np.testing.assert_allclose(loaded([a, b]), model([a, b]), rtol=1e-6, atol=1e-7)
    # the optimizer state came back too: one more identical step gives identical weights
    for m in (model, loaded):
        m.train_on_batch([a, b], np.array([1, 0] * 4))
    for got, want in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
