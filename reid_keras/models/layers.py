"""Parameter-free layers shared by the re-ID models.

`SquareLayer` is the comparison layer of the siamese verification models
(efficientnet_siamese_cuhk01.txt §II.C, identification_verification_embedding.txt: f_s = (f1 - f2)^2).
`L2Normalize` is `keras.layers.UnitNormalization` under the name older `.keras` files saved.
Both are registered Keras serializables, so `.keras` files holding them load with `safe_mode=True`.
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
