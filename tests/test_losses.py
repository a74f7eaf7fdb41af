"""Losses against brute-force numpy: identification (label smoothing), verification, contrastive,
batch-hard triplet (explicit loops over anchors, positives and negatives), finite gradients,
and the per-sample reduction inside fit, with and without two mirrored replicas."""
import itertools
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from reid_keras.training.distribute import mirrored_strategy

from reid_keras.losses import (BatchHardTripletLoss, ContrastiveLoss, IdentificationLoss, VerificationLoss,
                               pairwise_distances)


def np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


# -- identification ----------------------------------------------------------------------------

def test_identification_matches_numpy_with_and_without_smoothing():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype("float32") * 3
    labels = np.array([0, 4, 2, 2, 1, 3])
    log_p = np_log_softmax(logits.astype(np.float64))
    for eps in (0.0, 0.1, 0.5):
        target = np.full((6, 5), eps / 5)
        target[np.arange(6), labels] += 1 - eps       # Szegedy et al.: (1 - eps) onehot + eps / K
        expected = -(target * log_p).sum(axis=1)
        got = IdentificationLoss(eps, from_logits=True, reduction=None)(labels, logits)
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)
        reduced = IdentificationLoss(eps, from_logits=True)(labels[:, None], logits)
        np.testing.assert_allclose(float(reduced), expected.mean(), rtol=1e-5)
        # From probabilities: the same numbers.
        probs = np.exp(log_p).astype("float32")
        got_p = IdentificationLoss(eps, from_logits=False, reduction=None)(labels, probs)
        np.testing.assert_allclose(np.asarray(got_p), expected, rtol=1e-4)


def test_label_smoothing_value_on_uniform_and_confident_predictions():
    # Uniform logits: every class has -log p = log K, whatever the smoothing.
    loss = IdentificationLoss(0.1, from_logits=True)(np.array([2]), np.zeros((1, 4), "float32"))
    assert float(loss) == pytest.approx(math.log(4), rel=1e-6)
    # p = (0.7, 0.2, 0.1), true class 0, eps = 0.3: 0.8 * -log 0.7 + 0.1 * (-log 0.2 - log 0.1).
    probs = np.array([[0.7, 0.2, 0.1]], "float32")
    expected = -(0.8 * math.log(0.7) + 0.1 * math.log(0.2) + 0.1 * math.log(0.1))
    assert float(IdentificationLoss(0.3)(np.array([0]), probs)) == pytest.approx(expected, rel=1e-6)


def test_identification_rejects_bad_smoothing_and_round_trips_config():
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        IdentificationLoss(1.0)
    loss = IdentificationLoss(0.2, from_logits=True)
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(clone, IdentificationLoss)
    assert (clone.label_smoothing, clone.from_logits) == (0.2, True)


# -- verification and contrastive ------------------------------------------------------------

def test_verification_is_two_way_cross_entropy_with_index_one_same():
    probs = np.array([[0.9, 0.1], [0.25, 0.75], [0.5, 0.5]], "float32")
    same = np.array([1, 1, 0])
    got = VerificationLoss(reduction=None)(same, probs)
    np.testing.assert_allclose(np.asarray(got), [-math.log(0.1), -math.log(0.75), -math.log(0.5)], rtol=1e-6)
    with pytest.raises(ValueError, match="2-way prediction"):
        VerificationLoss()(same, np.full((3, 3), 1 / 3, "float32"))


def test_contrastive_values():
    d = np.array([0.5, 0.5, 2.0, 0.0, 0.25], "float32")
    y = np.array([1, 0, 0, 1, 0])
    got = ContrastiveLoss(margin=1.0, reduction=None)(y, d[:, None])
    # same: d^2; different: max(0, 1 - d)^2
    np.testing.assert_allclose(np.asarray(got), [0.25, 0.25, 0.0, 0.0, 0.5625], rtol=1e-6)
    assert float(ContrastiveLoss(2.0)(y, d)) == pytest.approx(np.mean([0.25, 2.25, 0, 0, 3.0625]), rel=1e-6)
    with pytest.raises(ValueError, match="margin must be > 0"):
        ContrastiveLoss(0)


# -- batch-hard triplet --------------------------------------------------------------------

def brute_force_batch_hard(x, pids, margin, squared=False):
    """Loops over anchors, positives and negatives; the anchor's loss is its worst triplet."""
    x = np.asarray(x, np.float64)
    n = len(x)

    def dist(i, j):
        sq = float(np.sum((x[i] - x[j]) ** 2))
        return sq if squared else math.sqrt(sq)

    losses, valid = np.zeros(n), np.zeros(n, bool)
    for a in range(n):
        worst = None
        for p, q in itertools.product(range(n), range(n)):
            if p == a or pids[p] != pids[a] or pids[q] == pids[a]:
                continue
            gap = dist(a, p) - dist(a, q)
            value = math.log1p(math.exp(gap)) if margin == "soft" else max(0.0, margin + gap)
            worst = value if worst is None else max(worst, value)
        if worst is not None:
            losses[a], valid[a] = worst, True
    return losses, valid


def tied_batch(seed):
    """Grid-valued embeddings (many tied distances), duplicated rows, a singleton id (no positive)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 3, size=(11, 4)).astype("float32") * 0.5
    x[4] = x[3]            # duplicate within an id (distance 0)
    x[7] = x[2]            # duplicate across ids
    pids = np.array([5, 5, 5, 9, 9, 2, 2, 2, 5, 9, 40])  # id 40 appears once
    return x, pids


@pytest.mark.parametrize("margin,squared", [(0.3, False), (1.0, True), ("soft", False), (0.0, False)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_hard_matches_brute_force(margin, squared, seed):
    x, pids = tied_batch(seed)
    expected, expected_valid = brute_force_batch_hard(x, pids, margin, squared)
    loss = BatchHardTripletLoss(margin=margin, squared=squared)
    per_anchor, valid = loss.per_anchor(pids, tf.constant(x))
    np.testing.assert_array_equal(np.asarray(valid), expected_valid)
    assert not expected_valid[10] and expected_valid[:10].all()
    np.testing.assert_allclose(np.asarray(per_anchor), expected, rtol=1e-5, atol=1e-5)
    # The reduced loss is the mean over valid anchors only (the singleton is left out).
    np.testing.assert_allclose(float(loss(pids, x)), expected[expected_valid].mean(), rtol=1e-5, atol=1e-6)


def test_anchors_without_positive_or_negative_are_excluded():
    x = np.array([[0, 0], [1, 0], [0, 3], [4, 4]], "float32")
    pids = np.array([1, 1, 2, 3])           # anchors 2 and 3 have no positive
    loss = BatchHardTripletLoss(margin=0.5)
    # anchor 0: d_ap = 1, d_an = 3 -> 0; anchor 1: d_ap = 1, d_an = sqrt(10) -> 0
    x2 = np.array([[0, 0], [2, 0], [0, 1], [4, 4]], "float32")
    # anchor 0: max(0, 0.5 + 2 - 1) = 1.5; anchor 1: max(0, 0.5 + 2 - sqrt(5)) = 2.5 - sqrt(5)
    assert float(loss(pids, x2)) == pytest.approx((1.5 + 2.5 - math.sqrt(5)) / 2, rel=1e-5)
    assert float(loss(pids, x)) == pytest.approx(0.0, abs=1e-7)
    # One identity only: nobody has a negative; the loss is 0, not NaN.
    assert float(loss(np.zeros(4, int), x2)) == 0.0
    # All distinct ids: nobody has a positive.
    assert float(loss(np.arange(4), x2)) == 0.0


@pytest.mark.parametrize("margin", [0.3, "soft"])
def test_gradient_finite_when_embeddings_coincide(margin):
    x = tf.Variable(np.array([[1, 2], [1, 2], [1, 2], [0, 0], [0, 0]], "float32"))
    pids = np.array([0, 0, 1, 1, 2])         # coinciding positives and coinciding negatives
    for squared in (False, True):
        with tf.GradientTape() as tape:
            value = BatchHardTripletLoss(margin=margin, squared=squared)(pids, x)
        grad = tape.gradient(value, x)
        assert np.isfinite(float(value)) and np.all(np.isfinite(grad.numpy())), (margin, squared)
        assert np.abs(grad.numpy()).sum() > 0   # coinciding negatives are pushed apart


def test_pairwise_distances_match_numpy():
    x = np.random.default_rng(3).normal(size=(7, 5)).astype("float32")
    expected = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    np.testing.assert_allclose(np.asarray(pairwise_distances(x)), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(pairwise_distances(x, squared=True)), expected ** 2, atol=1e-4)
    assert np.all(np.diag(np.asarray(pairwise_distances(x, squared=True))) == 0)


def test_triplet_argument_errors_and_config():
    assert BatchHardTripletLoss(margin="0.3").margin == 0.3   # as a CLI flag gives it
    for bad in ("hard", -0.1, None, float("nan")):
        with pytest.raises(ValueError, match="margin must be"):
            BatchHardTripletLoss(margin=bad)
    with pytest.raises(ValueError, match=r"embeddings of shape \(batch, dim\)"):
        BatchHardTripletLoss()(np.zeros(2), np.zeros((2, 3, 1), "float32"))
    clone = keras.losses.deserialize(keras.losses.serialize(BatchHardTripletLoss("SOFT", squared=True)))
    assert (clone.margin, clone.squared) == ("soft", True)


# -- inside fit / under MirroredStrategy ------------------------------------------------------

def _linear_model():
    inputs = keras.Input((3,))
    return keras.Model(inputs, keras.layers.Dense(2, kernel_initializer=keras.initializers.RandomNormal(seed=1),
                                                  use_bias=False)(inputs))


def test_triplet_loss_reported_by_fit_machinery_single_and_mirrored():
    rng = np.random.default_rng(5)
    features = rng.normal(size=(8, 3)).astype("float32")
    pids = np.array([0, 0, 1, 1, 2, 2, 3, 3], np.int32)        # P = 4, K = 2: each half holds 2 whole ids
    results = {}
    for devices in (["/cpu:0"], ["/cpu:0", "/cpu:1"]):
        strategy = mirrored_strategy(devices) if len(devices) > 1 else tf.distribute.get_strategy()
        with strategy.scope():
            model = _linear_model()
            model.compile(optimizer="sgd", loss=BatchHardTripletLoss(0.3))
        weights = model.layers[-1].kernel.numpy().astype(np.float64)
        embeddings = features @ weights
        results[len(devices)] = (model.evaluate(features, pids, batch_size=8, verbose=0), embeddings)
    value_one, emb = results[1]
    full, _ = brute_force_batch_hard(emb, pids, 0.3)
    assert value_one == pytest.approx(full.mean(), rel=1e-5, abs=1e-6)
    # Two replicas mine within their own half and average the halves' means.
    value_two, emb = results[2]
    halves = [brute_force_batch_hard(emb[s], pids[s], 0.3)[0].mean() for s in (slice(0, 4), slice(4, 8))]
    assert value_two == pytest.approx(np.mean(halves), rel=1e-5, abs=1e-6)
