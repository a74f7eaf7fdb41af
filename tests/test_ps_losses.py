"""Detection losses (models/person_search/losses.py) against numpy references written here: values,
the smooth-L1 switch at beta, zero (finite, with finite gradients) when nothing is positive, and
not-sampled / padded entries contributing nothing even when they hold huge values."""
import numpy as np
import pytest
import tensorflow as tf

from reid_keras.models.person_search.losses import (ROI_BOX_BETA, RPN_BOX_BETA, box_classification_loss,
                                                    box_regression_loss, rpn_box_loss, rpn_objectness_loss,
                                                    smooth_l1)


def np_smooth_l1(d, beta):
    d = np.abs(np.asarray(d, np.float64))
    if beta == 0:
        return d
    return np.where(d < beta, 0.5 * d ** 2 / beta, d - 0.5 * beta)


def np_sigmoid_ce(z, y):
    p = 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def np_softmax_ce(logits, labels):
    logits = np.asarray(logits, np.float64)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.take_along_axis(log_p, np.asarray(labels)[..., None], -1)[..., 0]


def value_and_gradient(loss_fn, *args, wrt=1):
    args = [tf.constant(a) for a in args]
    with tf.GradientTape() as tape:
        tape.watch(args[wrt])
        loss = loss_fn(*args)
    return loss, tape.gradient(loss, args[wrt])


def anchors(seed=0, batch=2, num=40):
    rng = np.random.default_rng(seed)
    labels = rng.choice([-1, 0, 1], size=(batch, num), p=[0.5, 0.3, 0.2]).astype(np.int32)
    return rng, labels


def test_smooth_l1_matches_numpy_for_several_betas():
    rng = np.random.default_rng(0)
    pred, target = rng.uniform(-3, 3, size=(2, 30, 4)), rng.uniform(-3, 3, size=(2, 30, 4))
    for beta in (RPN_BOX_BETA, 0.5, ROI_BOX_BETA, 0.0):
        got = smooth_l1(pred.astype(np.float32), target.astype(np.float32), beta)
        assert got.shape == (2, 30, 4) and got.dtype == tf.float32
        np.testing.assert_allclose(got.numpy(), np_smooth_l1(pred - target, beta), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [RPN_BOX_BETA, 1.0])
def test_smooth_l1_is_quadratic_below_beta_linear_above_and_continuous_at_beta(beta):
    d = np.array([0.5 * beta, beta, 2 * beta, -0.5 * beta, -2 * beta, beta * (1 - 1e-3), beta * (1 + 1e-3)],
                 np.float32)
    _, grad = value_and_gradient(lambda p, t: tf.reduce_sum(smooth_l1(p, t, beta)), d, np.zeros(7, np.float32), wrt=0)
    values = smooth_l1(d, np.zeros(7, np.float32), beta).numpy()
    expected = [0.125 * beta, 0.5 * beta, 1.5 * beta, 0.125 * beta, 1.5 * beta]
    np.testing.assert_allclose(values[:5], expected, rtol=1e-6)  # quadratic would give 2 beta at 2 beta
    # Continuous value and slope at the switch: 1e-3 beta either side, both values are 0.5 beta
    # + O(1e-3 beta) (quadratic below, linear above) and both slopes 1 - O(1e-3).
    np.testing.assert_allclose(values[5:], [0.5 * (1 - 1e-3) ** 2 * beta, (0.5 + 1e-3) * beta], rtol=1e-5)
    assert np.all(np.abs(values[5:] - 0.5 * beta) < 1.01e-3 * beta)
    np.testing.assert_allclose(grad.numpy(), [0.5, 1.0, 1.0, -0.5, -1.0, 1 - 1e-3, 1.0], rtol=1e-5, atol=1e-6)


def test_smooth_l1_with_beta_zero_is_l1_with_finite_gradient_and_negative_beta_is_refused():
    _, grad = value_and_gradient(lambda p, t: tf.reduce_sum(smooth_l1(p, t, 0.0)),
                                 np.array([0.0, 0.5, -2.0], np.float32), np.zeros(3, np.float32), wrt=0)
    assert np.all(np.isfinite(grad.numpy())) and grad.numpy()[1] == 1.0 and grad.numpy()[2] == -1.0
    with pytest.raises(ValueError, match="smooth_l1: beta must be a finite number >= 0"):
        smooth_l1(np.zeros(2, np.float32), np.zeros(2, np.float32), -0.1)
    with pytest.raises(ValueError, match="rpn_box_loss: beta must be a finite number >= 0"):
        rpn_box_loss(np.zeros((1, 2), np.int32), np.zeros((1, 2, 4), np.float32), np.zeros((1, 2, 4), np.float32),
                     beta=float("nan"))


def test_rpn_objectness_is_the_mean_sigmoid_cross_entropy_of_the_sampled_anchors():
    rng, labels = anchors()
    logits = rng.normal(scale=3, size=labels.shape).astype(np.float32)
    sampled = labels >= 0
    expected = np_sigmoid_ce(logits[sampled], labels[sampled] > 0).mean()
    loss, grad = value_and_gradient(rpn_objectness_loss, labels, logits)
    assert loss.shape == () and loss.dtype == tf.float32
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)
    # d/dz of mean BCE = (sigmoid(z) - y) / number sampled on sampled anchors, 0 elsewhere.
    expected_grad = np.where(sampled, (1 / (1 + np.exp(-logits)) - (labels > 0)) / sampled.sum(), 0.0)
    np.testing.assert_allclose(grad.numpy(), expected_grad, atol=1e-7)
    # Not-sampled anchors with absurd logits change nothing.
    wild = np.where(sampled, logits, np.float32(1e30) * rng.choice([-1, 1], size=logits.shape)).astype(np.float32)
    loss_wild, grad_wild = value_and_gradient(rpn_objectness_loss, labels, wild)
    assert loss_wild.numpy() == loss.numpy()
    np.testing.assert_array_equal(grad_wild.numpy()[~sampled], 0.0)


def test_rpn_box_loss_sums_the_positives_and_divides_by_the_sampled_count():
    rng, labels = anchors(seed=1)
    pred, targets = rng.normal(size=(2, 40, 4)), rng.normal(size=(2, 40, 4))
    positive, sampled = labels == 1, labels >= 0
    expected = np_smooth_l1(pred - targets, 1 / 9)[positive].sum() / sampled.sum()
    loss, grad = value_and_gradient(rpn_box_loss, labels, pred.astype(np.float32), targets.astype(np.float32))
    assert loss.shape == () and loss.dtype == tf.float32
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)
    # Negatives and not-sampled anchors: any prediction and target, no effect and no gradient.
    wild_pred = np.where(positive[..., None], pred, 1e30).astype(np.float32)
    wild_targets = np.where(positive[..., None], targets, -1e30).astype(np.float32)
    loss_wild, grad_wild = value_and_gradient(rpn_box_loss, labels, wild_pred, wild_targets)
    np.testing.assert_allclose(loss_wild.numpy(), loss.numpy(), rtol=1e-6)
    np.testing.assert_array_equal(grad_wild.numpy()[~positive], 0.0)
    np.testing.assert_allclose(grad_wild.numpy()[positive], grad.numpy()[positive], rtol=1e-6)


def test_rpn_losses_are_zero_and_finite_without_positives_or_samples():
    rng = np.random.default_rng(2)
    pred, targets = rng.normal(size=(2, 6, 4)).astype(np.float32), rng.normal(size=(2, 6, 4)).astype(np.float32)
    negatives_only = np.array([[0, -1, 0, -1, -1, 0], [-1, -1, 0, -1, -1, -1]], np.int32)
    nothing = np.full((2, 6), -1, np.int32)
    for labels in (negatives_only, nothing):
        loss, grad = value_and_gradient(rpn_box_loss, labels, pred, targets)
        assert loss.numpy() == 0.0 and np.all(grad.numpy() == 0.0)
    loss, grad = value_and_gradient(rpn_objectness_loss, nothing, pred[..., 0])
    assert loss.numpy() == 0.0 and np.all(grad.numpy() == 0.0)
    loss = rpn_objectness_loss(negatives_only, pred[..., 0])
    np.testing.assert_allclose(loss.numpy(), np_sigmoid_ce(pred[..., 0][negatives_only == 0], 0).mean(), rtol=1e-5)


def test_box_classification_two_way_softmax_weighted_mean_over_sampled_rois():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=(2, 8)).astype(np.int32)
    weights = np.ones((2, 8), np.float32)
    weights[1, 5:] = 0.0  # padding: not enough proposals in image 1
    logits = rng.normal(scale=2, size=(16, 2)).astype(np.float32)  # the head's [B * S, 2]
    used = weights.ravel() > 0
    expected = np_softmax_ce(logits[used], labels.ravel()[used]).mean()
    loss, grad = value_and_gradient(box_classification_loss, labels, logits, weights)
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)
    assert np.all(grad.numpy()[~used] == 0.0)
    # Column 1 is "person": raising it lowers the loss of person RoIs only.
    assert np.all(grad.numpy()[used & (labels.ravel() == 1), 1] < 0)
    assert np.all(grad.numpy()[used & (labels.ravel() == 0), 1] > 0)
    wild = logits.copy()
    wild[~used] = [1e30, -1e30]
    np.testing.assert_allclose(box_classification_loss(labels, wild, weights).numpy(), loss.numpy(), rtol=1e-6)
    # Fractional weights: a weighted mean.
    soft = rng.uniform(0.2, 1.0, size=(2, 8)).astype(np.float32)
    per_roi = np_softmax_ce(logits, labels.ravel())
    np.testing.assert_allclose(box_classification_loss(labels, logits, soft).numpy(),
                               (soft.ravel() * per_roi).sum() / soft.sum(), rtol=1e-5)
    # Without weights every RoI counts.
    np.testing.assert_allclose(box_classification_loss(labels, logits.reshape(2, 8, 2)).numpy(), per_roi.mean(),
                               rtol=1e-5)


def test_box_classification_single_sigmoid_logit_equals_softmax_over_zero_and_the_logit():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, size=(2, 8)).astype(np.int32)
    z = rng.normal(scale=2, size=(2, 8, 1)).astype(np.float32)
    expected = np_sigmoid_ce(z[..., 0], labels).mean()
    sigmoid = box_classification_loss(labels, z)
    np.testing.assert_allclose(sigmoid.numpy(), expected, rtol=1e-5)
    two_way = box_classification_loss(labels, np.concatenate([np.zeros_like(z), z], -1))
    np.testing.assert_allclose(sigmoid.numpy(), two_way.numpy(), rtol=1e-5)


def test_box_regression_person_rois_only_divided_by_sampled_rois():
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, size=(2, 8)).astype(np.int32)
    weights = np.ones((2, 8), np.float32)
    weights[0, 6:] = 0.0
    labels[0, 6] = 1  # a padded row that says "person" must still be ignored
    pred, targets = rng.normal(size=(16, 4)), rng.normal(scale=2, size=(2, 8, 4))
    counted = (labels.ravel() == 1) & (weights.ravel() > 0)
    per_roi = np_smooth_l1(pred - targets.reshape(16, 4), ROI_BOX_BETA).sum(-1)
    expected = per_roi[counted].sum() / weights.sum()
    loss, grad = value_and_gradient(box_regression_loss, labels, pred.astype(np.float32),
                                    targets.astype(np.float32), weights)
    assert loss.shape == () and loss.dtype == tf.float32
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-5)
    np.testing.assert_array_equal(grad.numpy()[~counted], 0.0)
    beta9 = box_regression_loss(labels, pred.astype(np.float32), targets.astype(np.float32), weights, beta=1 / 9)
    np.testing.assert_allclose(beta9.numpy(), np_smooth_l1(pred - targets.reshape(16, 4), 1 / 9).sum(-1)[counted].sum()
                               / weights.sum(), rtol=1e-5)
    background = np.zeros_like(labels)
    loss, grad = value_and_gradient(box_regression_loss, background, np.full((16, 4), 1e30, np.float32),
                                    targets.astype(np.float32), weights)
    assert loss.numpy() == 0.0 and np.all(grad.numpy() == 0.0)
    loss = box_regression_loss(labels, pred.astype(np.float32), targets.astype(np.float32), np.zeros_like(weights))
    assert loss.numpy() == 0.0


def test_losses_in_a_graph_with_float16_predictions_return_float32_scalars():
    rng, labels = anchors(seed=6, num=12)
    logits = rng.normal(size=(2, 12)).astype(np.float16)
    deltas, targets = rng.normal(size=(2, 12, 4)).astype(np.float16), rng.normal(size=(2, 12, 4)).astype(np.float32)
    roi_labels = (labels > 0).astype(np.int32)
    class_logits = rng.normal(size=(24, 2)).astype(np.float16)
    weights = (labels >= 0).astype(np.float32)

    @tf.function
    def all_losses(labels, logits, deltas, targets, roi_labels, class_logits, weights):
        return (rpn_objectness_loss(labels, logits), rpn_box_loss(labels, deltas, targets),
                box_classification_loss(roi_labels, class_logits, weights),
                box_regression_loss(roi_labels, tf.reshape(deltas, [24, 4]), targets, weights))

    got = all_losses(labels, logits, deltas, targets, roi_labels, class_logits, weights)
    sampled, positive = labels >= 0, labels == 1
    expected = (np_sigmoid_ce(logits[sampled].astype(np.float64), positive[sampled]).mean(),
                np_smooth_l1(deltas.astype(np.float64) - targets, 1 / 9)[positive].sum() / sampled.sum(),
                np_softmax_ce(class_logits, roi_labels.ravel())[sampled.ravel()].mean(),
                np_smooth_l1(deltas.astype(np.float64) - targets, 1.0)[positive].sum() / sampled.sum())
    for value, reference in zip(got, expected):
        assert value.dtype == tf.float32 and value.shape == ()
        np.testing.assert_allclose(value.numpy(), reference, rtol=1e-5)


@pytest.mark.parametrize("call, message", [
    (lambda: rpn_objectness_loss(np.zeros((2, 10), np.int32), np.zeros((2, 11), np.float32)),
     "rpn_objectness_loss: labels has 20 entries but logits has 22 entries"),
    (lambda: rpn_box_loss(np.zeros((2, 10), np.int32), np.zeros((2, 10, 3), np.float32), np.zeros((2, 10, 4))),
     "rpn_box_loss: pred_deltas must have shape [..., 4], got (2, 10, 3)"),
    (lambda: rpn_box_loss(np.zeros((2, 10), np.int32), np.zeros((2, 10, 4), np.float32), np.zeros((2, 9, 4))),
     "rpn_box_loss: labels has 20 entries but box_targets has 18 rows"),
    (lambda: box_classification_loss(np.zeros((2, 4), np.int32), np.zeros((8, 3), np.float32)),
     "box_classification_loss: logits must have shape [..., 2] (background, person) or [..., 1]"),
    (lambda: box_classification_loss(np.zeros((2, 4), np.int32), np.zeros((8, 2), np.float32), np.ones((2, 5))),
     "box_classification_loss: labels has 8 entries but weights has 10 entries"),
    (lambda: box_regression_loss(np.zeros((2, 4), np.int32), np.zeros((6, 4), np.float32), np.zeros((2, 4, 4))),
     "box_regression_loss: labels has 8 entries but pred has 6 rows"),
])
def test_mismatched_shapes_are_named(call, message):
    with pytest.raises(ValueError) as error:
        call()
    assert message in str(error.value)
