"""Layers shared by the re-ID models.

`SquareLayer` is the comparison layer of the siamese verification models
(efficientnet_siamese_cuhk01.txt §II.C, identification_verification_embedding.txt: f_s = (f1 - f2)^2).
`DiagonalMetricHead` is a verification head on top of it whose P(same) falls with every squared
difference: a learned diagonal metric (the default recipe's head; the paper's is a free Dense).
`L2Normalize` is `keras.layers.UnitNormalization` under the name older `.keras` files saved.
All are registered Keras serializables, so `.keras` files holding them load with `safe_mode=True`.
"""
from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="reid_keras")
class SquareLayer(keras.layers.Layer):
    """Element-wise squared difference of two feature tensors: f_s = (f1 - f2)^2.

    The paper's Square Layer (efficientnet_siamese_cuhk01.txt §II.C): it has no weights, so the
    verification head on top of it sees a symmetric comparison of the two branches.

    Call args:
        inputs: a list/tuple `[f1, f2]` of two tensors of the same shape.

    Returns:
        a tensor of that shape.

    Example:
        >>> fs = SquareLayer()([f1, f2])
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    def _split(self, inputs):
        if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
            length = f" of length {len(inputs)}" if isinstance(inputs, (list, tuple)) else ""
            raise ValueError(f"{self.name}: SquareLayer expects a list of two feature tensors [f1, f2], "
                             f"got {type(inputs).__name__}{length}")
        return inputs

    def _split_shapes(self, input_shape):
        # A single tensor's shape is also a 2-tuple for rank-2 inputs: require two shapes.
        if not (isinstance(input_shape, (list, tuple)) and len(input_shape) == 2
                and all(isinstance(s, (list, tuple)) for s in input_shape)):
            raise ValueError(f"{self.name}: SquareLayer expects a list of two feature tensors [f1, f2], "
                             f"got one input of shape {tuple(input_shape) if input_shape is not None else None}")
        return input_shape

    def build(self, input_shape):
        shape_a, shape_b = self._split_shapes(input_shape)
        if tuple(shape_a) != tuple(shape_b):
            raise ValueError(
                f"{self.name}: SquareLayer needs two inputs of the same shape, "
                f"got {tuple(shape_a)} and {tuple(shape_b)}")
        super().build(input_shape)

    def call(self, inputs):
        f1, f2 = self._split(inputs)
        return ops.square(ops.subtract(f1, f2))

    def compute_output_shape(self, input_shape):
        return tuple(self._split_shapes(input_shape)[0])

    def get_config(self):
        return super().get_config()


PAIR_HEADS = ("softmax", "sigmoid")


@keras.saving.register_keras_serializable(package="reid_keras")
class DiagonalMetricHead(keras.layers.Layer):
    """Same-vs-different head over squared differences s = (f1 - f2)^2 that is a weighted distance.

    The paper's head (efficientnet_siamese_cuhk01.txt §II.C) is Dense(2, softmax) on s: its
    logit(same) - logit(different) is `sum_k w_k s_k + c` with weights w of both signs, so a pair can
    score "same" *because* its features differ on some channels, and a few gallery images with extreme
    features then score "same" with every query. This head computes

        d = sum_k m_k s_k,   m_k >= 0   (a diagonal Mahalanobis distance; m is `metric`)
        z = threshold - d              (= logit(same) - logit(different))

    and outputs sigmoid(z) (head "sigmoid": 1 unit) or softmax([0, z]) = (1 - sigmoid(z), sigmoid(z))
    ("softmax": 2 units, index 1 = same, the order of models/siamese.py). P(same) therefore never
    rises when any |f1_k - f2_k| grows, for both outputs. `m >= 0` is kept by
    `keras.constraints.NonNeg`, applied after each optimizer update (projected gradient descent): a
    channel whose weight the gradient pushes below 0 is dropped from the metric (m_k = 0, exactly)
    rather than kept as a small positive weight, as a softplus or exp reparametrisation would.

    `metric` starts at the constant `metric_init` (the head starts as a scaled squared Euclidean
    distance) and `threshold` at `threshold_init`: a positive threshold lets two identical images
    score P(same) = sigmoid(threshold) > 0.5; at threshold 0 no pair scores above 0.5. The start
    matters because the paper's RMSprop at 1e-4 moves each weight by about 1e-4 per step: 0.06 over
    the 600 steps of the default recipe. The defaults suit pooled EfficientNet features: after the
    identity warm-up, squared distances over 1280 channels are ~140 (same id) and ~660 (different ids),
    so d starts near 0.14 and 0.66 around the threshold 1, and the metric grows from there (mean
    0.005-0.01 after training). Started at threshold 0, the head ranked as well but its pair accuracy
    stayed at 50 % (the threshold reached 0.06).

    `kernel` and `bias` give the head as the logit of the Dense(1) it replaces (`kernel` = -metric as a
    (D, 1) column, `bias` = [threshold]), so code written for a Dense head reads logit weights with
    the right sign (`families.siamese.verification_distance`).

    Args:
        head: "softmax" (2 units) or "sigmoid" (1 unit).
        metric_init: initial value of every metric weight (>= 0).
        threshold_init: initial threshold (the pair logit at distance 0).

    Call args:
        inputs: squared differences of shape (batch, D) (the output of `SquareLayer`).

    Returns:
        P(different), P(same) of shape (batch, 2), or P(same) of shape (batch, 1).

    Example:
        >>> probs = DiagonalMetricHead("softmax", name="verification")(SquareLayer()([f1, f2]))
    """

    def __init__(self, head: str = "softmax", metric_init: float = 1e-3, threshold_init: float = 1.0,
                 **kwargs):
        super().__init__(**kwargs)
        if head not in PAIR_HEADS:
            raise ValueError(f"{self.name}: unknown head {head!r}: expected one of {', '.join(PAIR_HEADS)}")
        if not float(metric_init) >= 0.0:
            raise ValueError(f"{self.name}: metric_init must be >= 0 (a distance's weights), got {metric_init!r}")
        self.head = head
        self.metric_init = float(metric_init)
        self.threshold_init = float(threshold_init)

    def build(self, input_shape):
        dim = input_shape[-1]
        if dim is None:
            raise ValueError(f"{self.name}: DiagonalMetricHead needs a known feature size, got shape "
                             f"{tuple(input_shape)}")
        self.metric = self.add_weight(shape=(int(dim),), name="metric",
                                      initializer=keras.initializers.Constant(self.metric_init),
                                      constraint=keras.constraints.NonNeg())
        self.threshold = self.add_weight(shape=(), name="threshold",
                                         initializer=keras.initializers.Constant(self.threshold_init))
        super().build(input_shape)

    def pair_logit(self, inputs):
        """z = threshold - sum_k metric_k * inputs_k: logit(same) - logit(different), shape (batch, 1)."""
        distance = ops.sum(ops.multiply(inputs, self.metric), axis=-1, keepdims=True)
        return ops.subtract(self.threshold, distance)

    def call(self, inputs):
        z = self.pair_logit(inputs)
        if self.head == "sigmoid":
            return ops.sigmoid(z)
        # softmax over (different, same) logits (0, z): P(same) = sigmoid(z); Keras' cross-entropy reads
        # the logits attached to a softmax output, so the loss stays exact when P saturates.
        return ops.softmax(ops.concatenate([ops.zeros_like(z), z], axis=-1), axis=-1)

    def compute_output_shape(self, input_shape):
        return (*tuple(input_shape)[:-1], 2 if self.head == "softmax" else 1)

    @property
    def kernel(self):
        """The pair logit's weights as a Dense(1) kernel, shape (D, 1): -metric."""
        return ops.expand_dims(ops.negative(self.metric), -1)

    @property
    def bias(self):
        """The pair logit's bias as a Dense(1) bias, shape (1,): [threshold]."""
        return ops.reshape(self.threshold, (1,))

    def get_config(self):
        return {**super().get_config(), "head": self.head, "metric_init": self.metric_init,
                "threshold_init": self.threshold_init}


@keras.saving.register_keras_serializable(package="reid_keras")
class L2Normalize(keras.layers.UnitNormalization):
    """`keras.layers.UnitNormalization` with an `epsilon` floor on the norm, kept so that `.keras` files
    saved before the models switched to UnitNormalization still load; new code uses UnitNormalization.

    Args:
        axis: axis to normalise over (default: the feature axis, -1).
        epsilon: floor of the norm, so an all-zero feature stays zero instead of NaN.
    """

    def __init__(self, axis=-1, epsilon=1e-12, **kwargs):
        super().__init__(axis=axis, **kwargs)
        self.epsilon = float(epsilon)
        if not self.epsilon > 0:
            raise ValueError(f"L2Normalize: epsilon must be > 0, got {epsilon}")

    def call(self, inputs):
        return ops.normalize(inputs, axis=self.axis, order=2, epsilon=self.epsilon)

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
