"""Re-ID losses as Keras 3 `Loss` objects (keras.ops, usable in `model.compile` and under tf.distribute).

- `IdentificationLoss`: identity cross-entropy (identification_verification_embedding.txt §III-C,
  Eq. 2), optionally with label smoothing (Szegedy et al. 2016, "Rethinking the Inception
  Architecture", §7: target `(1 - eps) * onehot + eps / K`).
- `VerificationLoss`: same/different cross-entropy of a 2-way head (idver paper §III-D, Eq. 4);
  class index 1 = same person, as in `reid_keras.models.siamese`.
- `ContrastiveLoss`: `y d^2 + (1 - y) max(0, m - d)^2` on a pair distance (Hadsell et al. 2006;
  the idver paper's §IV comparison).
- `BatchHardTripletLoss`: batch-hard triplet loss with a hard or soft margin (Hermans et al. 2017,
  "In Defense of the Triplet Loss", the batch-hard loss L_BH; the slides' triplet loss).

Every loss returns one value per sample from `call`, and Keras' reduction (default
`"sum_over_batch_size"`: sum / batch size, then / number of replicas) turns them into the batch
loss, so `fit` under `MirroredStrategy` averages over the global batch like a single device does
(batch-hard mining is the exception: each replica mines its own slice, see `BatchHardTripletLoss`).
"""
from __future__ import annotations

import keras
from keras import ops

# Floor of probabilities before the log when a loss is given probabilities (Keras uses the same).
PROBABILITY_EPSILON = 1e-7


def _labels(y_true):
    """Integer labels of shape (batch,) from (batch,) or (batch, 1)."""
    y = ops.convert_to_tensor(y_true)
    if len(y.shape) == 2 and y.shape[-1] == 1:
        y = ops.squeeze(y, axis=-1)
    if len(y.shape) != 1:
        raise ValueError(f"labels must have shape (batch,) or (batch, 1), got {tuple(y.shape)}")
    return ops.cast(y, "int32")


def _log_probabilities(y_pred, from_logits: bool):
    if from_logits:
        return ops.log_softmax(y_pred, axis=-1)
    # Probabilities that do not sum to exactly 1 (float16 softmax) are renormalised, as Keras does.
    probs = y_pred / ops.sum(y_pred, axis=-1, keepdims=True)
    return ops.log(ops.clip(probs, PROBABILITY_EPSILON, 1.0))


def sparse_cross_entropy(y_true, y_pred, from_logits: bool = False, label_smoothing: float = 0.0):
    """Per-sample cross-entropy between integer labels and a K-way prediction.

    With smoothing `eps` the target is `(1 - eps) * onehot(y) + eps / K` over all K classes, so
    `loss = (1 - eps) * (-log p_y) + eps * mean_k(-log p_k)`.

    Args:
        y_true: int labels, shape (batch,) or (batch, 1), in 0..K-1.
        y_pred: (batch, K) logits (`from_logits=True`) or probabilities.
        from_logits: whether `y_pred` are logits.
        label_smoothing: `eps` in [0, 1).

    Returns:
        (batch,) float tensor.
    """
    log_p = _log_probabilities(y_pred, from_logits)
    labels = _labels(y_true)
    # take_along_axis is a gather: out-of-range ids fail loudly on CPU instead of scoring 0.
    nll = -ops.squeeze(ops.take_along_axis(log_p, labels[:, None], axis=-1), axis=-1)
    if not label_smoothing:
        return nll
    eps = ops.cast(label_smoothing, log_p.dtype)
    return (1.0 - eps) * nll - eps * ops.mean(log_p, axis=-1)


@keras.saving.register_keras_serializable(package="reid_keras")
class IdentificationLoss(keras.losses.Loss):
    """Identity classification loss, idver paper §III-C Eq. 2, with optional label smoothing.

    Args:
        label_smoothing: `eps` in [0, 1): the target puts `1 - eps + eps/K` on the true id and
            `eps/K` on each of the K classes (Szegedy et al. 2016 §7). 0 is plain cross-entropy.
        from_logits: `y_pred` are logits (True) or softmax probabilities (False, Keras' default).

    `y_true`: integer ids (batch,) or (batch, 1) in 0..K-1; `y_pred`: (batch, K).

    Example:
        >>> model.compile("adam", loss={"id": IdentificationLoss(0.1, from_logits=True)})
    """

    def __init__(self, label_smoothing: float = 0.0, from_logits: bool = False, name: str = "identification",
                 reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise ValueError(f"IdentificationLoss: label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)
        self.from_logits = bool(from_logits)

    def call(self, y_true, y_pred):
        return sparse_cross_entropy(y_true, y_pred, self.from_logits, self.label_smoothing)

    def get_config(self):
        config = super().get_config()
        config.update({"label_smoothing": self.label_smoothing, "from_logits": self.from_logits})
        return config


@keras.saving.register_keras_serializable(package="reid_keras")
class VerificationLoss(keras.losses.Loss):
    """Same/different cross-entropy of a 2-way verification head (idver paper §III-D, Eq. 4).

    This is sparse 2-class cross-entropy: `y_true` is the pair's `same` flag (1 = same person,
    0 = different) and `y_pred` has 2 columns ordered (different, same) — index 1 = same, the order
    of `reid_keras.models.siamese` (the paper writes q1 = same; the loss is the same up to that
    permutation).

    Args:
        from_logits: `y_pred` are logits (True) or softmax probabilities (False, the siamese head).
    """

    def __init__(self, from_logits: bool = False, name: str = "verification", reduction="sum_over_batch_size",
                 dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = bool(from_logits)

    def call(self, y_true, y_pred):
        if y_pred.shape[-1] != 2:
            raise ValueError(f"VerificationLoss expects a 2-way prediction (different, same), got shape "
                             f"{tuple(y_pred.shape)}; for a 1-unit sigmoid head use keras.losses.BinaryCrossentropy")
        return sparse_cross_entropy(y_true, y_pred, self.from_logits)

    def get_config(self):
        config = super().get_config()
        config["from_logits"] = self.from_logits
        return config


@keras.saving.register_keras_serializable(package="reid_keras")
class ContrastiveLoss(keras.losses.Loss):
    """Contrastive loss on a pair distance: `y d^2 + (1 - y) max(0, margin - d)^2` (Hadsell et al. 2006).

    Hadsell et al. write both terms with a factor 1/2; it is dropped here (it only rescales the
    learning rate). The idver paper §III-D / §IV compares its cross-entropy verification against it.

    Args:
        margin: `m` > 0; dissimilar pairs farther apart than `m` cost nothing.

    `y_true`: same flag (1 = same person), (batch,) or (batch, 1); `y_pred`: the pair's distance
    `d >= 0`, (batch,) or (batch, 1) — e.g. the Euclidean distance of the two embeddings.
    """

    def __init__(self, margin: float = 1.0, name: str = "contrastive", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if not float(margin) > 0:
            raise ValueError(f"ContrastiveLoss: margin must be > 0, got {margin!r}")
        self.margin = float(margin)

    def call(self, y_true, y_pred):
        d = ops.reshape(y_pred, (-1,))
        y = ops.cast(ops.reshape(y_true, (-1,)), d.dtype)
        return y * ops.square(d) + (1.0 - y) * ops.square(ops.relu(self.margin - d))

    def get_config(self):
        config = super().get_config()
        config["margin"] = self.margin
        return config


def pairwise_distances(embeddings, squared: bool = False, epsilon: float = 1e-12):
    """(batch, batch) Euclidean (or squared Euclidean) distances between the rows of `embeddings`.

    Uses `|a|^2 - 2 a.b + |b|^2` (memory batch^2, not batch^2 x dim), clipped at 0 (rounding can
    make it slightly negative) with an exact 0 diagonal. The square root is taken of
    `d^2 + epsilon`, so its gradient stays finite when two embeddings coincide (plain sqrt has an
    infinite derivative at 0, which turns into NaN).
    """
    x = ops.convert_to_tensor(embeddings)
    norms = ops.sum(ops.square(x), axis=-1)
    sq = norms[:, None] - 2.0 * ops.matmul(x, ops.transpose(x)) + norms[None, :]
    n = ops.shape(x)[0]
    sq = ops.maximum(sq, 0.0) * (1.0 - ops.eye(n, dtype=sq.dtype))
    return sq if squared else ops.sqrt(sq + epsilon)


@keras.saving.register_keras_serializable(package="reid_keras")
class BatchHardTripletLoss(keras.losses.Loss):
    """Batch-hard triplet loss L_BH (Hermans et al. 2017), `y_true` = person ids, `y_pred` = embeddings.

    For every anchor a of the batch: the hardest positive `max_{p: y_p = y_a, p != a} D(a, p)`, the
    hardest negative `min_{n: y_n != y_a} D(a, n)`, and
    `[margin + D_ap - D_an]_+` (hard margin) or `softplus(D_ap - D_an) = log(1 + exp(...))`
    (`margin="soft"`, their soft margin). D is the Euclidean distance (`squared=True`: its square).

    Anchors with no positive (an id seen once in the batch) or no negative (one id only) have no
    triplet: they contribute 0 and are left out of the mean. To make Keras' per-sample reduction
    ("sum_over_batch_size" = sum / batch size) return exactly the mean over the *valid* anchors,
    `call` returns `loss_a * batch / num_valid` for valid anchors and 0 for the others (Keras' own
    masked-loss reduction uses the same rescaling); with no valid anchor the loss is 0. Use
    `per_anchor` for the raw per-anchor values and the validity mask.

    Distributed training: mining sees only the batch it is given, i.e. each replica's slice under
    `MirroredStrategy` (Keras splits a global batch into contiguous per-replica slices), and the
    replicas' means are averaged. A P x K batch from `pipelines.pk_dataset` keeps each id's K images
    together, so with P divisible by the number of replicas every replica holds whole identities and
    each replica computes the batch-hard loss of a (P / replicas) x K batch; otherwise one identity
    is split between two replicas (its images still have positives if K >= 4, but fewer).

    Args:
        margin: float >= 0 (the paper's hard margin, e.g. 0.3) or "soft".
        squared: use squared Euclidean distances.
        epsilon: added under the square root (finite gradient for coinciding embeddings).
    """

    def __init__(self, margin=0.3, squared: bool = False, epsilon: float = 1e-12, name: str = "batch_hard_triplet",
                 reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        if isinstance(margin, str) and margin.strip().lower() == "soft":
            margin = "soft"
        else:  # a number, or its text as a CLI flag gives it ("0.3")
            try:
                margin = float(margin)
            except (TypeError, ValueError):
                raise ValueError(f"BatchHardTripletLoss: margin must be a number >= 0 or 'soft', got {margin!r}") \
                    from None
            if not margin >= 0:
                raise ValueError(f"BatchHardTripletLoss: margin must be >= 0, got {margin!r}")
        if not float(epsilon) > 0:
            raise ValueError(f"BatchHardTripletLoss: epsilon must be > 0, got {epsilon!r}")
        self.margin = margin
        self.squared = bool(squared)
        self.epsilon = float(epsilon)

    def per_anchor(self, y_true, y_pred):
        """`(losses, valid)`: each anchor's triplet loss (0 where invalid) and a bool validity mask."""
        if len(y_pred.shape) != 2:
            raise ValueError(f"BatchHardTripletLoss expects embeddings of shape (batch, dim), got "
                             f"{tuple(y_pred.shape)}")
        pids = _labels(y_true)
        d = pairwise_distances(y_pred, squared=self.squared, epsilon=self.epsilon)
        same = ops.equal(pids[:, None], pids[None, :])
        positive = ops.logical_and(same, ops.logical_not(ops.cast(ops.eye(ops.shape(d)[0]), "bool")))
        negative = ops.logical_not(same)
        valid = ops.logical_and(ops.any(positive, axis=1), ops.any(negative, axis=1))
        # Distances are >= 0, so 0 outside the positives never beats a real positive; a value above
        # every distance never beats a real negative (and carries no gradient).
        hardest_positive = ops.max(ops.where(positive, d, 0.0), axis=1)
        far = ops.stop_gradient(ops.max(d)) + 1.0
        hardest_negative = ops.min(ops.where(negative, d, far), axis=1)
        gap = hardest_positive - hardest_negative
        losses = ops.softplus(gap) if self.margin == "soft" else ops.relu(gap + self.margin)
        return ops.where(valid, losses, 0.0), valid

    def call(self, y_true, y_pred):
        losses, valid = self.per_anchor(y_true, y_pred)
        count = ops.cast(ops.shape(losses)[0], losses.dtype)
        num_valid = ops.sum(ops.cast(valid, losses.dtype))
        return losses * ops.divide_no_nan(count, num_valid)

    def get_config(self):
        config = super().get_config()
        config.update({"margin": self.margin, "squared": self.squared, "epsilon": self.epsilon})
        return config


# --- OIM (oim_person_search.txt §3.2) ---
# Labels of OIM logits (see reid_keras.models.oim): t >= 0 a labeled identity (column t of the
# lookup table), -1 (UNLABELED) and <= -2 (IGNORE) take no part in the loss.
import tensorflow as tf  # noqa: E402  (replica context for the global labeled count: not in keras.ops)


def _oim_global_count(count):
    """`count` summed over the replicas of a multi-replica step (Keras' fit under MirroredStrategy)."""
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        return context.all_reduce(tf.distribute.ReduceOp.SUM, count)
    return count


def oim_per_row(labels, logits):
    """`(nll, labeled)`: -log p_t per row (OIM paper Eq. 1, 3), 0 on rows with label < 0, and the
    float mask of labeled rows. `logits`: (batch, L + Q) from `OIMMemory`; labels (batch,) / (batch, 1)."""
    labels = _labels(labels)
    labeled = labels >= 0
    log_p = ops.log_softmax(ops.convert_to_tensor(logits), axis=-1)
    # Column 0 stands in for rows without a target, so the gather stays in range and finite.
    nll = -ops.squeeze(ops.take_along_axis(log_p, ops.where(labeled, labels, 0)[:, None], axis=-1), axis=-1)
    return ops.where(labeled, nll, ops.zeros_like(nll)), ops.cast(labeled, nll.dtype)


def oim_loss(labels, logits):
    """OIM loss (paper Eq. 3, negated): mean of -log p_t over the labeled rows; 0 when there are none.

    Inside a multi-replica step the mean is over the labeled rows of the *global* batch (the count is
    all-reduced), so summing the replicas' gradients, as tf.distribute does, gives the single-device
    gradient. The gradient w.r.t. the features is Eq. 4 because `OIMMemory` stops it at the memory.
    """
    nll, labeled = oim_per_row(labels, logits)
    count = _oim_global_count(ops.sum(labeled))
    return ops.sum(nll) / ops.maximum(count, 1.0)


@keras.saving.register_keras_serializable(package="reid_keras")
class OIMLoss(keras.losses.Loss):
    """Keras `Loss` form of `oim_loss` for `model.compile(loss=OIMLoss())` on `OIMMemory` logits.

    Rows with label < 0 (UNLABELED, IGNORE) are left out and the loss is the mean over labeled rows
    (0, not NaN, for a batch without any). As in `BatchHardTripletLoss`, `call` rescales the per-row
    values so that Keras' "sum_over_batch_size" reduction (sum / local batch / replicas) yields
    sum(nll) / labeled rows of the global batch — equal to the single-device loss under MirroredStrategy.
    `sample_weight`, if given, multiplies the rows and does not change the normalisation.

    Example:
        >>> model.compile(optimizer="sgd", loss=OIMLoss(), metrics=[OIMAccuracy()])
    """

    def __init__(self, name: str = "oim", reduction="sum_over_batch_size", dtype=None):
        if reduction != "sum_over_batch_size":
            raise ValueError(f"OIMLoss: only reduction='sum_over_batch_size' (mean over labeled rows) is "
                             f"supported, got {reduction!r}; use oim_per_row for per-row values")
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        nll, labeled = oim_per_row(y_true, y_pred)
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        rows = ops.cast(ops.shape(nll)[0], nll.dtype)
        count = _oim_global_count(ops.sum(labeled))
        return nll * (rows * replicas / ops.maximum(count, 1.0))
