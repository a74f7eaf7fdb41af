"""Heads on the 2048-d region feature of the identification net (oim_person_search.txt §3.1, Fig. 2).

- `BoxPredictor`: "a Softmax classifier and a linear regression to reject non-persons and refine the
  locations": 2 class logits (column 0 background, column 1 person) and one class-agnostic set of
  box deltas (dx, dy, dw, dh), to be decoded with `boxes.ROI_BOX_WEIGHTS`.
- `EmbeddingHead`: "we project the features into a L2-normalized 256 dimensional subspace (id-feat)":
  a linear projection then L2 normalisation; the OIM loss (`models/oim.py`) reads it. The paper has
  no normalisation layer between the two; `batch_norm=True` inserts a BatchNormalization as SeqNet
  and NAE do (not the paper's model).

Initialisers are py-faster-rcnn's, which the paper's implementation builds on (§5.1): Gaussian
std 0.01 for the classifier and the projection, 0.001 for the box regression, zero biases.
"""
from __future__ import annotations

import keras

NUM_CLASSES = 2  # background (column 0) and person (column 1)
BACKGROUND, PERSON = 0, 1


def _check_features(layer, input_shape):
    shape = tuple(input_shape)
    if len(shape) != 2 or shape[-1] is None:
        raise ValueError(f"{layer.name}: {type(layer).__name__} expects region features of shape (regions, channels) "
                         f"with a known number of channels (2048 after conv5), got {shape}")


@keras.saving.register_keras_serializable(package="reid_keras")
class BoxPredictor(keras.layers.Layer):
    """Person / background classifier and class-agnostic box regressor (§3.1).

    Args:
        class_initializer: kernel initialiser of the classifier (default Gaussian std 0.01).
        box_initializer: kernel initialiser of the regressor (default Gaussian std 0.001).

    Call args:
        features: (R, C) float region features (C = 2048 from conv5).

    Returns:
        `(class_logits, box_deltas)`: (R, 2) logits (column `BACKGROUND` = 0, `PERSON` = 1; softmax
        gives P(person)) and (R, 4) deltas (dx, dy, dw, dh) in `boxes.ROI_BOX_WEIGHTS` units.

    Example:
        >>> logits, deltas = BoxPredictor()(conv5(regions))
    """

    def __init__(self, class_initializer=None, box_initializer=None, **kwargs):
        super().__init__(**kwargs)
        self.class_initializer = keras.initializers.get(
            class_initializer or keras.initializers.RandomNormal(stddev=0.01))
        self.box_initializer = keras.initializers.get(box_initializer or keras.initializers.RandomNormal(stddev=0.001))
        self.classifier = keras.layers.Dense(NUM_CLASSES, kernel_initializer=self.class_initializer,
                                             dtype=self.dtype_policy, name="class_logits")
        self.regressor = keras.layers.Dense(4, kernel_initializer=self.box_initializer, dtype=self.dtype_policy,
                                            name="box_deltas")

    def build(self, input_shape):
        _check_features(self, input_shape)
        self.classifier.build(input_shape)
        self.regressor.build(input_shape)
        super().build(input_shape)

    def call(self, features):
        return self.classifier(features), self.regressor(features)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], NUM_CLASSES), (input_shape[0], 4)

    def get_config(self):
        config = super().get_config()
        config.update(class_initializer=keras.initializers.serialize(self.class_initializer),
                      box_initializer=keras.initializers.serialize(self.box_initializer))
        return config


@keras.saving.register_keras_serializable(package="reid_keras")
class EmbeddingHead(keras.layers.Layer):
    """Projection of the region feature to the L2-normalised id-feat (§3.1; Table 4 compares dimensions).

    Args:
        dim: length of the embedding (paper: 256; Table 4 finds 256 to 1024 equally good).
        batch_norm: BatchNormalization between projection and normalisation (SeqNet / NAE; not in the
            paper). Default False.
        kernel_initializer: initialiser of the projection (default Gaussian std 0.01).

    Call args:
        features: (R, C) float region features (C = 2048 from conv5).

    Returns:
        (R, dim) embeddings of unit L2 norm (an all-zero projection stays 0: UnitNormalization's
        epsilon 1e-12).

    Example:
        >>> id_feat = EmbeddingHead(256)(conv5(regions))
        >>> logits = OIMMemory(num_ids, 5000, 256)([id_feat, pids])
    """

    def __init__(self, dim: int = 256, batch_norm: bool = False, kernel_initializer=None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"EmbeddingHead: dim must be an integer >= 1 (paper: 256), got {dim!r}")
        if not isinstance(batch_norm, bool):
            raise ValueError(f"EmbeddingHead: batch_norm must be True or False, got {batch_norm!r}")
        self.dim = dim
        self.batch_norm = batch_norm
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer or keras.initializers.RandomNormal(stddev=0.01))
        self.projection = keras.layers.Dense(dim, kernel_initializer=self.kernel_initializer,
                                             dtype=self.dtype_policy, name="projection")
        self.normalization = (keras.layers.BatchNormalization(dtype=self.dtype_policy, name="projection_bn")
                              if batch_norm else None)
        self.unit_norm = keras.layers.UnitNormalization(axis=-1, dtype=self.dtype_policy, name="l2_normalize")

    def build(self, input_shape):
        _check_features(self, input_shape)
        self.projection.build(input_shape)
        if self.normalization is not None:
            self.normalization.build((input_shape[0], self.dim))
        super().build(input_shape)

    def call(self, features, training=None):
        x = self.projection(features)
        if self.normalization is not None:
            x = self.normalization(x, training=training)
        return self.unit_norm(x)

    def compute_output_shape(self, input_shape):
        return input_shape[0], self.dim

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, batch_norm=self.batch_norm,
                      kernel_initializer=keras.initializers.serialize(self.kernel_initializer))
        return config
