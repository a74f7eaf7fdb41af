"""Online Instance Matching memory (oim_person_search.txt §3.2, Eq. 1-4, Fig. 3).

`OIMMemory` holds the lookup table V (one L2-normalised row per labeled identity) and the circular
queue U (features of recent unlabeled persons) as non-trainable Keras variables, so both are saved
in `.keras` files and checkpoints. Called as `logits = OIMMemory(...)([features, labels])` it returns
the scaled cosine similarities x·[V;U]ᵀ/τ computed from the memory as it was *before* the batch,
and, when `training=True`, then writes the batch into the memory (§3.2 "During backward"):

    v_t <- normalize(γ v_t + (1 - γ) x)      for every labeled row (label t >= 0), in batch order
    push x into U (oldest dropped)            for every unlabeled row (label UNLABELED = -1)
    nothing                                   for background / ignored rows (label <= IGNORE = -2)

The loss over these logits is `reid_keras.losses.OIMLoss` (softmax cross-entropy over the labeled
rows, Eq. 1-3); the memory is a constant for backprop, so d loss / dx is Eq. 4.

Distribution: under `tf.distribute.MirroredStrategy` every replica all-gathers the features and
labels of the global batch (replica order = global batch order), computes the same update, and the
variables use aggregation ONLY_FIRST_REPLICA ("every replica is performing the same update, but we
only want to perform the update once", tf.VariableAggregation docs). With the default aggregation
NONE, TensorFlow applies a replica-context assignment to that replica's copy only, so copies fed
from local batches silently drift apart; ONLY_FIRST_REPLICA broadcasts replica 0's value instead.
"""
from __future__ import annotations

import keras
import tensorflow as tf
from keras import ops

UNLABELED = -1  # a person who is none of the L labeled identities: pushed into the circular queue
IGNORE = -2  # background / ignored row (any label <= -2): neither in the loss nor in the memory
MASKED_LOGIT = -1e9  # logit of a column left out of the softmax (empty queue slot, unsampled column)


@keras.saving.register_keras_serializable(package="reid_keras")
class OIMMemory(keras.layers.Layer):
    """OIM lookup table + circular queue producing the logits of Eq. 1-2 (OIM paper §3.2).

    Args:
        num_ids: L, number of labeled identities (train labels are 0..L-1).
        queue_size: Q, slots of the circular queue of unlabeled features (0 = no queue, e.g. re-ID
            on crops where every person is labeled).
        feature_dim: D, length of the feature vectors.
        momentum: γ of the table update v_t <- γ v_t + (1 - γ) x (paper: 0.5).
        temperature: τ of Eq. 1-2; logits are x·mᵀ/τ. Default 0.1 (the paper's value).
        scale: alternative to `temperature` (scale = 1/τ); popular PyTorch ports use 30. Give at
            most one of the two.
        num_sampled: if set, training logits keep every target column of the batch plus this many
            other columns drawn uniformly without replacement (§3.2 "Scalability", Fig. 7a); the
            others get MASKED_LOGIT. Evaluation (`training=False`) always uses every column.
        normalize_inputs: L2-normalise the features inside the layer. Features are expected to be
            L2-normalised already (the paper's id-feat); leave False when they are.
        seed: seed of the column sampler (only used with `num_sampled`).

    Call args:
        inputs: `[features, labels]`: features (B, D) float, labels (B,) or (B, 1) int with
            t >= 0 a labeled identity, UNLABELED (-1) an unlabeled person, <= IGNORE (-2) ignored.
        training: update the memory after computing the logits.

    Returns:
        logits (B, L + Q) float32 (float64 when the layer dtype is float64): columns 0..L-1 are the
        table, L.. the queue; queue slots never written yet are MASKED_LOGIT.

    The memory update uses ops with data-dependent shapes, so compile the model with
    `jit_compile=False` (the default "auto" already picks it, as the layer reports
    `supports_jit = False`).

    Example:
        >>> feats = keras.layers.UnitNormalization()(keras.layers.Dense(256)(backbone_output))
        >>> logits = OIMMemory(5532, 5000, 256)([feats, labels])
        >>> model.compile(optimizer="sgd", loss=OIMLoss(), metrics=[OIMAccuracy()])
    """

    def __init__(self, num_ids, queue_size, feature_dim, momentum=0.5, temperature=None, scale=None,
                 num_sampled=None, normalize_inputs=False, seed=None, **kwargs):
        super().__init__(**kwargs)
        for name, value, low in (("num_ids", num_ids, 1), ("queue_size", queue_size, 0),
                                 ("feature_dim", feature_dim, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"OIMMemory: {name} must be an integer >= {low}, got {value!r}")
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"OIMMemory: momentum (γ) must be in [0, 1], got {momentum!r}")
        if temperature is not None and scale is not None:
            raise ValueError("OIMMemory: give either temperature (τ) or scale (= 1/τ), not both; "
                             f"got temperature={temperature!r}, scale={scale!r}")
        for name, value in (("temperature", temperature), ("scale", scale)):
            if value is not None and not float(value) > 0:
                raise ValueError(f"OIMMemory: {name} must be > 0, got {value!r}")
        if num_sampled is not None and (not isinstance(num_sampled, int) or num_sampled < 1):
            raise ValueError(f"OIMMemory: num_sampled must be None or an integer >= 1, got {num_sampled!r}")
        self.num_ids = num_ids
        self.queue_size = queue_size
        self.feature_dim = feature_dim
        self.momentum = float(momentum)
        self.temperature = None if temperature is None else float(temperature)
        self.scale = None if scale is None else float(scale)
        self.num_sampled = num_sampled
        self.normalize_inputs = bool(normalize_inputs)
        self.seed = seed
        self._logit_scale = self.scale if self.scale is not None else 1.0 / (self.temperature or 0.1)
        # tf.unique / boolean masks have data-dependent shapes: keeps compile(jit_compile="auto") off XLA.
        self.supports_jit = False
        self.seed_generator = keras.random.SeedGenerator(seed) if num_sampled is not None else None

    @property
    def _memory_dtype(self):
        return "float64" if self.variable_dtype == "float64" else "float32"

    def build(self, input_shape):
        if not (isinstance(input_shape, (list, tuple)) and len(input_shape) == 2):
            raise ValueError(f"{self.name}: OIMMemory expects inputs [features, labels], got {input_shape}")
        feature_shape = tuple(input_shape[0])
        if len(feature_shape) != 2 or feature_shape[-1] not in (None, self.feature_dim):
            raise ValueError(f"{self.name}: features must have shape (batch, {self.feature_dim}), "
                             f"got {feature_shape}")
        memory = dict(initializer="zeros", trainable=False, autocast=False, aggregation="only_first_replica")
        self.lookup_table = self.add_weight(shape=(self.num_ids, self.feature_dim), dtype=self._memory_dtype,
                                            name="lookup_table", **memory)
        self.queue = self.add_weight(shape=(self.queue_size, self.feature_dim), dtype=self._memory_dtype,
                                     name="queue", **memory)
        self.queue_pointer = self.add_weight(shape=(), dtype="int32", name="queue_pointer", **memory)
        self.queue_filled = self.add_weight(shape=(), dtype="int32", name="queue_filled", **memory)
        super().build(input_shape)

    def call(self, inputs, training=None):
        features, labels = inputs
        x = ops.cast(features, self._memory_dtype)
        if self.normalize_inputs:
            x = ops.normalize(x, axis=-1, epsilon=1e-12)
        labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
        if training:
            tf.debugging.assert_less(labels, self.num_ids,
                                     message=f"{self.name}: a label is >= num_ids={self.num_ids}; labels must be "
                                             f"0..num_ids-1, UNLABELED={UNLABELED} or IGNORE={IGNORE}")
        if training and self.num_sampled is not None:
            logits = self._sampled_logits(x, labels)
        else:
            logits = self._full_logits(x)
        if training:
            self._update_memory(ops.stop_gradient(x), labels)
        return logits

    def _full_logits(self, x):
        # stop_gradient: the memory is an external buffer, not a parameter (§3.2), so d/dx is Eq. 4.
        table = ops.stop_gradient(ops.convert_to_tensor(self.lookup_table))
        logits = ops.matmul(x, ops.transpose(table)) * ops.cast(self._logit_scale, x.dtype)
        if not self.queue_size:
            return logits
        queue = ops.stop_gradient(ops.convert_to_tensor(self.queue))
        queue_logits = ops.matmul(x, ops.transpose(queue)) * ops.cast(self._logit_scale, x.dtype)
        # Slots never written hold zeros; they are no identity, so they stay out of the softmax.
        filled = ops.arange(self.queue_size, dtype="int32") < ops.convert_to_tensor(self.queue_filled)
        queue_logits = ops.where(filled[None, :], queue_logits, ops.cast(MASKED_LOGIT, x.dtype))
        return ops.concatenate([logits, queue_logits], axis=1)

    def _sampled_logits(self, x, labels):
        """Logits over the batch's target columns plus `num_sampled` random others (§3.2 Scalability).

        Only the kept memory rows are multiplied (B x S x D instead of B x (L+Q) x D); tf.* for the
        dynamic-size column list, which keras.ops cannot express.
        """
        total = self.num_ids + self.queue_size
        targets = tf.boolean_mask(labels, labels >= 0)
        is_target = tf.scatter_nd(targets[:, None], tf.ones_like(targets), [total]) > 0
        valid = tf.concat([tf.ones([self.num_ids], tf.bool),
                           tf.range(self.queue_size) < tf.convert_to_tensor(self.queue_filled)], axis=0)
        score = keras.random.uniform((total,), seed=self.seed_generator)
        score = tf.where(is_target, -1.0, tf.where(valid, score, -2.0))  # only valid non-targets are drawn
        top, chosen = tf.math.top_k(score, k=min(self.num_sampled, total))
        chosen = tf.boolean_mask(chosen, top >= 0.0)
        keep = is_target | (tf.scatter_nd(chosen[:, None], tf.ones_like(chosen), [total]) > 0)
        columns = tf.cast(tf.where(keep)[:, 0], tf.int32)
        rows = tf.gather(self.lookup_table.value, tf.minimum(columns, self.num_ids - 1))
        if self.queue_size:
            queue_rows = tf.gather(self.queue.value, tf.maximum(columns - self.num_ids, 0))
            rows = tf.where((columns < self.num_ids)[:, None], rows, queue_rows)
        sampled = tf.matmul(x, tf.stop_gradient(rows), transpose_b=True) * self._logit_scale  # (B, S)
        dense = tf.transpose(tf.scatter_nd(columns[:, None], tf.transpose(sampled), [total, tf.shape(x)[0]]))
        return tf.where(keep[None, :], dense, tf.cast(MASKED_LOGIT, x.dtype))

    def _update_memory(self, x, labels):
        """Write the (global) batch into V and U; tf.* because Keras has no sparse variable update,
        no replica context and no dynamic-size masking."""
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            x = context.all_gather(x, axis=0)
            labels = context.all_gather(labels, axis=0)
        self._update_table(tf.boolean_mask(x, labels >= 0), tf.boolean_mask(labels, labels >= 0))
        if self.queue_size:
            self._push_queue(tf.boolean_mask(x, tf.equal(labels, UNLABELED)))

    def _update_table(self, x, labels):
        """v_t <- normalize(γ v_t + (1-γ) x) row by row in batch order, vectorised over labels.

        Rows of one label are applied in "rounds": round r updates, for every label at once, its r-th
        occurrence in the batch. A tf.while_loop runs max-multiplicity rounds (1 when labels are
        distinct, K for PK batches), each O(n·D); the result equals the sequential update exactly,
        since renormalisation after every step makes the recursion non-linear (no closed form).
        """
        unique, segment = tf.unique(labels)  # unique labels in first-appearance order
        count = tf.size(unique)
        same = tf.equal(segment[:, None], segment[None, :])
        n = tf.size(labels)
        earlier = tf.range(n)[None, :] < tf.range(n)[:, None]
        rank = tf.reduce_sum(tf.cast(same & earlier, tf.int32), axis=1)  # occurrence index per row
        rounds = tf.reduce_max(tf.concat([rank + 1, [0]], axis=0))
        gamma = tf.cast(self.momentum, x.dtype)

        def one_round(r, current):
            chosen = tf.equal(rank, r)
            new = tf.math.unsorted_segment_sum(tf.where(chosen[:, None], x, tf.zeros_like(x)), segment, count)
            present = tf.math.unsorted_segment_max(tf.cast(chosen, tf.int32), segment, count) > 0
            updated = ops.normalize(gamma * current + (1.0 - gamma) * new, axis=-1, epsilon=1e-12)
            return r + 1, tf.where(present[:, None], updated, current)

        # Gather from the variable itself (a sparse read of n rows), not from a dense read of all L rows.
        current = tf.gather(self.lookup_table.value, unique)
        _, current = tf.while_loop(lambda r, _: r < rounds, one_round, (tf.constant(0), current))
        # Sparse write: O(batch·D), independent of L (a full assign would copy the whole table).
        self.lookup_table.value.scatter_update(tf.IndexedSlices(current, unique))

    def _push_queue(self, x):
        """Push rows in order into the circular queue; with more rows than slots only the last Q stay."""
        pushed = tf.shape(x)[0]
        kept = tf.minimum(pushed, self.queue_size)
        pointer = tf.convert_to_tensor(self.queue_pointer)
        slots = tf.math.floormod(pointer + tf.range(pushed - kept, pushed), self.queue_size)
        self.queue.value.scatter_update(tf.IndexedSlices(x[pushed - kept:], slots))
        self.queue_pointer.assign(tf.math.floormod(pointer + pushed, self.queue_size))
        self.queue_filled.assign(tf.minimum(tf.convert_to_tensor(self.queue_filled) + pushed, self.queue_size))

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], self.num_ids + self.queue_size)

    def get_config(self):
        config = super().get_config()
        config.update({"num_ids": self.num_ids, "queue_size": self.queue_size, "feature_dim": self.feature_dim,
                       "momentum": self.momentum, "temperature": self.temperature, "scale": self.scale,
                       "num_sampled": self.num_sampled, "normalize_inputs": self.normalize_inputs,
                       "seed": self.seed})
        return config


def oim_accuracy(labels, logits):
    """Top-1 identification accuracy over the labeled rows (labels >= 0); 0.0 when there are none."""
    labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
    labeled = ops.cast(labels >= 0, "float32")
    hits = ops.cast(ops.equal(ops.cast(ops.argmax(logits, axis=-1), "int32"), labels), "float32") * labeled
    return ops.divide_no_nan(ops.sum(hits), ops.sum(labeled))


@keras.saving.register_keras_serializable(package="reid_keras")
class OIMAccuracy(keras.metrics.Metric):
    """Running top-1 accuracy of OIM logits over labeled rows only (the paper's Fig. 6 training accuracy)."""

    def __init__(self, name="oim_accuracy", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.hits = self.add_variable(shape=(), initializer="zeros", name="hits")
        self.labeled = self.add_variable(shape=(), initializer="zeros", name="labeled")

    def update_state(self, y_true, y_pred, sample_weight=None):
        labels = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        labeled = ops.cast(labels >= 0, self.dtype)
        if sample_weight is not None:
            labeled = labeled * ops.reshape(ops.cast(sample_weight, self.dtype), (-1,))
        hits = ops.cast(ops.equal(ops.cast(ops.argmax(y_pred, axis=-1), "int32"), labels), self.dtype)
        self.hits.assign_add(ops.sum(hits * labeled))
        self.labeled.assign_add(ops.sum(labeled))

    def result(self):
        return ops.divide_no_nan(self.hits, self.labeled)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype}
