"""OIM memory layer and loss (oim_person_search.txt §3.2) against numpy references written here."""
import numpy as np
import pytest
import tensorflow as tf

import keras
from reid_keras.losses import OIMLoss, oim_loss
from reid_keras.models.layers import L2Normalize
from reid_keras.models.oim import IGNORE, MASKED_LOGIT, UNLABELED, OIMAccuracy, OIMMemory, oim_accuracy
from reid_keras.training.distribute import mirrored_strategy


def unit(a):
    a = np.asarray(a, np.float64)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)


def reference_update(table, queue, pointer, filled, x, labels, gamma):
    """The paper's update, one row at a time in batch order (§3.2)."""
    table, queue = table.copy(), queue.copy()
    for row, label in zip(x, labels):
        if label >= 0:
            v = gamma * table[label] + (1 - gamma) * row
            table[label] = v / np.linalg.norm(v)
        elif label == UNLABELED and len(queue):
            queue[pointer] = row
            pointer = (pointer + 1) % len(queue)
            filled = min(filled + 1, len(queue))
    return table, queue, pointer, filled


def reference_logits(table, queue, filled, x, scale):
    logits = scale * x @ np.concatenate([table, queue]).T
    logits[:, table.shape[0] + filled:] = MASKED_LOGIT
    return logits


def make_layer(num_ids=5, queue_size=4, dim=3, seed=0, filled=None, dtype="float32", **kwargs):
    """A built layer whose memory holds random unit rows (the first `filled` queue slots)."""
    rng = np.random.default_rng(seed)
    layer = OIMMemory(num_ids, queue_size, dim, dtype=dtype, **kwargs)
    layer.build([(None, dim), (None,)])
    filled = queue_size if filled is None else filled
    queue = np.zeros((queue_size, dim))
    queue[:filled] = unit(rng.normal(size=(filled, dim)))
    layer.lookup_table.assign(unit(rng.normal(size=(num_ids, dim))))
    layer.queue.assign(queue)
    layer.queue_filled.assign(filled)
    layer.queue_pointer.assign(filled % queue_size if queue_size else 0)
    return layer


def state(layer):
    return (layer.lookup_table.numpy().astype(np.float64), layer.queue.numpy().astype(np.float64),
            int(layer.queue_pointer.numpy()), int(layer.queue_filled.numpy()))


def test_logits_are_scaled_cosines_and_empty_queue_slots_are_masked():
    layer = make_layer(filled=2, temperature=0.1)
    x = unit(np.random.default_rng(1).normal(size=(3, 3))).astype("float32")
    table, queue, _, filled = state(layer)
    logits = layer([x, np.array([0, -1, -2])], training=False).numpy()
    assert logits.shape == (3, 9)
    np.testing.assert_allclose(logits, reference_logits(table, queue, filled, x, 10.0), rtol=1e-5, atol=1e-5)
    assert (logits[:, 7:] == MASKED_LOGIT).all()
    scaled = make_layer(filled=2, scale=30.0)([x, np.array([0, -1, -2])], training=False).numpy()
    np.testing.assert_allclose(scaled[:, :7], 3.0 * logits[:, :7], rtol=1e-5)
    assert state(layer)[3] == 2  # training=False leaves the memory alone
    normalising = make_layer(filled=2, normalize_inputs=True)
    np.testing.assert_allclose(normalising([7.0 * x, np.array([0, -1, -2])]).numpy(), logits, rtol=1e-5, atol=1e-5)


def test_loss_value_and_gradient_follow_eq_1_to_4_in_float64():
    layer = make_layer(num_ids=4, queue_size=3, dim=5, seed=2, dtype="float64")
    table, queue, _, _ = state(layer)
    x = tf.constant(unit(np.random.default_rng(3).normal(size=(4, 5))))
    labels = np.array([2, UNLABELED, 0, IGNORE])
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = oim_loss(labels, layer([x, labels], training=False))
    grad = tape.gradient(loss, x).numpy()

    memory, tau = np.concatenate([table, queue]), 0.1
    z = x.numpy() @ memory.T / tau
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    labeled = [0, 2]
    np.testing.assert_allclose(float(loss), np.mean([-np.log(p[i, labels[i]]) for i in labeled]), rtol=1e-10)
    expected = np.zeros_like(grad)
    for i in labeled:  # Eq. 4 is d log p_t / dx; the loss is -mean(log p_t)
        t = labels[i]
        eq4 = ((1 - p[i, t]) * table[t] - sum(p[i, j] * table[j] for j in range(4) if j != t)
               - sum(p[i, 4 + k] * queue[k] for k in range(3))) / tau
        expected[i] = -eq4 / len(labeled)
    np.testing.assert_allclose(grad, expected, rtol=1e-7, atol=1e-10)

    def loss_at(values):
        return float(oim_loss(labels, layer([tf.constant(values), labels], training=False)))
    numeric = np.zeros_like(grad)
    for index in np.ndindex(*grad.shape):
        step = np.zeros_like(grad)
        step[index] = 1e-6
        numeric[index] = (loss_at(x.numpy() + step) - loss_at(x.numpy() - step)) / 2e-6
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)
    assert not np.any(grad[[1, 3]])  # unlabeled / ignored rows get no gradient from the loss


def test_update_renormalises_table_rows_and_fills_queue_like_numpy():
    layer = make_layer(num_ids=6, queue_size=5, dim=4, seed=4, filled=1, momentum=0.7)
    before = state(layer)
    x = unit(np.random.default_rng(5).normal(size=(6, 4)))
    labels = np.array([3, UNLABELED, 0, IGNORE, UNLABELED, 5])
    logits = layer([x.astype("float32"), labels], training=True).numpy()
    # logits come from the memory before the update
    np.testing.assert_allclose(logits, reference_logits(before[0], before[1], before[3], x, 10.0), atol=1e-5)
    table, queue, pointer, filled = reference_update(*before, x, labels, gamma=0.7)
    after = state(layer)
    np.testing.assert_allclose(after[0], table, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(after[0][[0, 3, 5]], axis=1), 1.0, atol=1e-6)
    np.testing.assert_array_equal(after[0][[1, 2, 4]], before[0][[1, 2, 4]])
    np.testing.assert_allclose(after[1], queue, atol=1e-6)
    assert (after[2], after[3]) == (pointer, filled) == (3, 3)


@pytest.mark.parametrize("graph", [False, True])
def test_duplicate_labels_are_applied_sequentially(graph):
    layer = make_layer(num_ids=4, queue_size=0, dim=3, seed=6)
    before = state(layer)
    x = np.random.default_rng(7).normal(size=(8, 3))  # not unit: makes the order matter more
    labels = np.array([2, 0, 2, 2, 0, 1, 2, IGNORE])
    call = tf.function(lambda f, y: layer([f, y], training=True)) if graph else \
        (lambda f, y: layer([f, y], training=True))
    call(tf.constant(x, tf.float32), tf.constant(labels))
    table, *_ = reference_update(*before, x, labels, gamma=0.5)
    np.testing.assert_allclose(state(layer)[0], table, atol=1e-6)
    # a simultaneous (unordered) mean of the duplicates would be a different table
    naive = unit(0.5 * before[0][2] + 0.5 * x[labels == 2].mean(0))
    assert np.abs(naive - table[2]).max() > 1e-3


def test_queue_wraps_around_and_keeps_only_the_newest():
    layer = make_layer(num_ids=2, queue_size=4, dim=2, filled=0)
    rows = np.arange(1, 19, dtype="float32").reshape(9, 2)
    layer([rows[:3], np.full(3, UNLABELED)], training=True)
    layer([rows[3:6], np.full(3, UNLABELED)], training=True)  # wraps: slots 3, 0, 1
    np.testing.assert_array_equal(layer.queue.numpy(), rows[[4, 5, 2, 3]])
    assert (int(layer.queue_pointer.numpy()), int(layer.queue_filled.numpy())) == (2, 4)
    many = np.arange(100, 112, dtype="float32").reshape(6, 2)  # 6 rows into 4 slots at pointer 2
    layer([many, np.full(6, UNLABELED)], training=True)
    _, queue, pointer, _ = reference_update(*state(make_layer(2, 4, 2, filled=0)), rows[:6], np.full(6, -1), 0.5)
    _, queue, pointer, _ = reference_update(np.zeros((2, 2)), queue, pointer, 4, many, np.full(6, -1), 0.5)
    np.testing.assert_array_equal(layer.queue.numpy(), queue)
    assert int(layer.queue_pointer.numpy()) == pointer == 0


def test_ignored_rows_touch_neither_loss_nor_memory():
    layer = make_layer(seed=8)
    before = state(layer)
    x = unit(np.random.default_rng(9).normal(size=(4, 3))).astype("float32")
    labels = np.array([IGNORE, 1, -7, 4])
    logits = layer([x, labels], training=True)
    only_labeled = make_layer(seed=8)([x[[1, 3]], labels[[1, 3]]], training=False)  # same initial memory
    np.testing.assert_allclose(float(oim_loss(labels, logits)), float(oim_loss(labels[[1, 3]], only_labeled)),
                               rtol=1e-6)
    after = state(layer)
    np.testing.assert_array_equal(after[1], before[1])
    assert after[2:] == before[2:]
    np.testing.assert_array_equal(after[0][[0, 2, 3]], before[0][[0, 2, 3]])
    assert np.abs(after[0][[1, 4]] - before[0][[1, 4]]).max() > 1e-3


def test_batch_without_labeled_rows_gives_zero_loss_and_still_fills_queue():
    layer = make_layer(filled=0)
    x = tf.constant(unit(np.random.default_rng(10).normal(size=(3, 3))), tf.float32)
    labels = np.array([UNLABELED, IGNORE, UNLABELED])
    with tf.GradientTape() as tape:
        tape.watch(x)
        logits = layer([x, labels], training=True)
        loss = OIMLoss()(labels, logits)
    grad = tape.gradient(loss, x)
    assert float(loss) == 0.0 and float(oim_loss(labels, logits)) == 0.0
    assert np.all(np.isfinite(grad.numpy())) and not np.any(grad.numpy())
    np.testing.assert_allclose(layer.queue.numpy()[:2], x.numpy()[[0, 2]])
    assert int(layer.queue_filled.numpy()) == 2


def test_oim_loss_class_equals_masked_mean_and_accuracy_counts_labeled_rows():
    logits = np.array([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 1.0]], "float32")
    labels = np.array([0, 2, UNLABELED, 2])
    log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    expected = -np.mean([log_p[0, 0], log_p[1, 2], log_p[3, 2]])
    np.testing.assert_allclose(float(OIMLoss()(labels, logits)), expected, rtol=1e-6)
    np.testing.assert_allclose(float(oim_loss(labels[:, None], logits)), expected, rtol=1e-6)
    assert float(oim_accuracy(labels, logits)) == pytest.approx(2 / 3)
    metric = OIMAccuracy()
    metric.update_state(labels, logits)
    metric.update_state(np.array([IGNORE, 1]), logits[:2])  # one more hit
    assert float(metric.result()) == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="sum_over_batch_size"):
        OIMLoss(reduction="sum")


def test_subsampling_keeps_targets_and_draws_num_sampled_others():
    layer = make_layer(num_ids=20, queue_size=10, dim=4, filled=6, num_sampled=5, seed=11)
    x = unit(np.random.default_rng(12).normal(size=(4, 4))).astype("float32")
    labels = np.array([3, 17, 3, UNLABELED])
    full = layer([x, labels], training=False).numpy()
    sampled = layer([x, labels], training=True).numpy()
    kept = sampled[0] != MASKED_LOGIT
    assert (kept == (sampled != MASKED_LOGIT)).all(axis=0).all()  # one column set for the batch
    assert kept[[3, 17]].all() and kept.sum() == 2 + 5
    assert not kept[26:].any()  # empty queue slots are never drawn
    np.testing.assert_allclose(sampled[:, kept], full[:, kept], rtol=1e-5, atol=1e-6)
    few = make_layer(num_ids=3, queue_size=2, dim=4, filled=1, num_sampled=50)
    out = few([x, np.array([0, 0, 1, UNLABELED])], training=True).numpy()
    assert ((out != MASKED_LOGIT).sum(axis=1) == 4).all()  # every valid column, no padding
    with tf.GradientTape() as tape:
        xt = tf.constant(x)
        tape.watch(xt)
        loss = oim_loss(labels, layer([xt, labels], training=True))
    assert np.isfinite(float(loss)) and np.all(np.isfinite(tape.gradient(loss, xt).numpy()))


def test_bad_arguments_and_labels_are_reported():
    with pytest.raises(ValueError, match="either temperature"):
        OIMMemory(5, 4, 3, temperature=0.1, scale=30)
    with pytest.raises(ValueError, match="num_ids must be an integer >= 1"):
        OIMMemory(0, 4, 3)
    with pytest.raises(ValueError, match="momentum"):
        OIMMemory(5, 4, 3, momentum=1.5)
    with pytest.raises(ValueError, match=r"features must have shape \(batch, 3\)"):
        OIMMemory(5, 4, 3)([keras.Input((7,)), keras.Input((), dtype="int32")])
    layer = make_layer()
    with pytest.raises(tf.errors.InvalidArgumentError, match="label is >= num_ids=5"):
        layer([np.ones((2, 3), "float32"), np.array([1, 5])], training=True)


def _tiny_model(strategy, num_sampled=None):
    with strategy.scope():
        keras.utils.set_random_seed(1)
        features = keras.Input((6,), name="features")
        labels = keras.Input((), dtype="int32", name="labels")
        embedding = L2Normalize()(keras.layers.Dense(4, name="projection")(features))
        logits = OIMMemory(5, 6, 4, num_sampled=num_sampled, name="oim")([embedding, labels])
        model = keras.Model([features, labels], logits)
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=OIMLoss(), metrics=[OIMAccuracy()],
                      jit_compile=False)
    return model


# Global batches of 8: duplicates, unlabeled and ignored rows, and unequal labeled counts per half.
TRAIN_X = np.random.default_rng(13).normal(size=(16, 6)).astype("float32")
TRAIN_Y = np.array([0, 1, 1, 2, -1, -2, 1, 0, 3, -1, -1, 4, 4, 4, -2, 1], "int32")


def _fit(strategy):
    model = _tiny_model(strategy)
    history = model.fit([TRAIN_X, TRAIN_Y], TRAIN_Y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    memory = {v.name: [t.numpy() for t in strategy.experimental_local_results(v.value)]
              for v in model.get_layer("oim").weights}
    return history.history, memory, model


def test_two_replicas_keep_identical_memory_equal_to_one_device():
    one_history, one, one_model = _fit(tf.distribute.OneDeviceStrategy("/cpu:0"))
    two_history, two, two_model = _fit(mirrored_strategy(["/cpu:0", "/cpu:1"]))
    assert set(one) == {"lookup_table", "queue", "queue_pointer", "queue_filled"}
    for name, copies in two.items():
        assert len(copies) == 2
        np.testing.assert_array_equal(copies[0], copies[1], err_msg=f"{name}: replicas diverged")
        np.testing.assert_allclose(copies[0], one[name][0], atol=1e-5, err_msg=name)
    assert int(one["queue_filled"][0]) == 3  # both batches' unlabeled rows reached the queue
    touched = np.linalg.norm(one["lookup_table"][0], axis=1)
    np.testing.assert_allclose(touched, 1.0, atol=1e-6)  # ids 0..4 all seen across the two halves
    np.testing.assert_allclose(two_history["loss"], one_history["loss"], atol=1e-5)
    np.testing.assert_allclose(two_history["oim_accuracy"], one_history["oim_accuracy"], atol=1e-6)
    np.testing.assert_allclose(two_model.get_layer("projection").kernel.numpy(),
                               one_model.get_layer("projection").kernel.numpy(), atol=1e-5)


def test_layer_tells_keras_it_cannot_be_xla_compiled():
    # Keras' jit_compile="auto" compiles with XLA only if every layer has supports_jit True (it
    # already skips XLA on CPU-only machines, so on GPUs this attribute is what keeps OIM off XLA).
    assert keras.layers.Dense(2).supports_jit is True
    assert OIMMemory(3, 2, 4).supports_jit is False


def test_memory_survives_keras_save_and_load(tmp_path):
    model = _tiny_model(tf.distribute.get_strategy(), num_sampled=3)
    model.fit([TRAIN_X, TRAIN_Y], TRAIN_Y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    path = str(tmp_path / "oim.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    before, after = model.get_layer("oim"), loaded.get_layer("oim")
    assert isinstance(after, OIMMemory) and after.get_config() == before.get_config()
    assert int(after.queue_pointer.numpy()) == 3
    for name in ("lookup_table", "queue", "queue_pointer", "queue_filled"):
        np.testing.assert_array_equal(getattr(after, name).numpy(), getattr(before, name).numpy())
    np.testing.assert_allclose(loaded.predict([TRAIN_X, TRAIN_Y], verbose=0),
                               model.predict([TRAIN_X, TRAIN_Y], verbose=0), atol=1e-6)
