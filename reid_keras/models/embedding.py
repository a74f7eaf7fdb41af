"""The embedding sub-model every re-ID model shares: one image -> backbone -> global pooling -> feature.

It is named "embedding": the siamese and ID+verification models apply it to both images of a pair,
the single-image models to one; evaluation, export and the identity warm-up look it up by that
name. An optional projection sets the feature width, in one of the two ways the papers' code does:

- "conv": a 1x1 Conv2D + ReLU on the feature map, before pooling (the EfficientNet siamese authors'
  released code projects to 4096 channels, the paper's "1x1x4096" features);
- "dense": Dense + BatchNormalization after pooling (OIM paper §5.3 Table 4: a low-dimensional
  projection regularises training; Open-ReID uses 128-d).
"""
from __future__ import annotations

from typing import Optional

import keras
from keras import layers

POOLINGS = ("avg", "max")
PROJECTIONS = ("conv", "dense")


def check_feature_dim(feature_dim) -> Optional[int]:
    """None, or `feature_dim` as a positive int (ValueError naming it otherwise)."""
    if feature_dim is None:
        return None
    if isinstance(feature_dim, bool) or int(feature_dim) != feature_dim or int(feature_dim) < 1:
        raise ValueError(f"feature_dim must be a positive integer or None, got {feature_dim!r}")
    return int(feature_dim)


def build_embedding(backbone: keras.Model, pooling: str = "avg", feature_dim: Optional[int] = None,
                    projection: str = "dense", name: str = "embedding") -> keras.Model:
    """One image -> pooled feature vector, wrapping the no-top feature-map model `backbone`.

    Args:
        backbone: a no-top feature-map model (see `backbones.build_backbone`).
        pooling: "avg" (GlobalAveragePooling2D) or "max".
        feature_dim: None (the backbone's channels) or the width of the projection.
        projection: "conv" (1x1 Conv2D + ReLU before pooling) or "dense" (Dense + BatchNormalization after).
        name: the sub-model's name; the models look it up as "embedding".

    Example:
        >>> embedding = build_embedding(build_backbone("resnet50", (256, 128))[0], feature_dim=256)
    """
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
    if projection not in PROJECTIONS:
        raise ValueError(f"unknown projection {projection!r}: expected one of {', '.join(PROJECTIONS)}")
    feature_dim = check_feature_dim(feature_dim)
    image = keras.Input(backbone.input.shape[1:], name="image")
    x = backbone(image)
    if feature_dim is not None and projection == "conv":
        x = layers.Conv2D(feature_dim, 1, activation="relu", name="projection")(x)
    pool = layers.GlobalAveragePooling2D if pooling == "avg" else layers.GlobalMaxPooling2D
    x = pool(name=f"{pooling}_pool")(x)
    if feature_dim is not None and projection == "dense":
        x = layers.Dense(feature_dim, name="projection")(x)
        x = layers.BatchNormalization(name="projection_bn")(x)
    return keras.Model(image, x, name=name)
