"""Siamese EfficientNet verification model (efficientnet_siamese_cuhk01.txt §II, Fig. 2).

    image_a ─┐                      ┌─ f1 ─┐
             ├─ embedding (shared) ─┤      ├─ SquareLayer (f1−f2)² ─ Dropout ─ head ─ P(same)
    image_b ─┘                      └─ f2 ─┘

`embedding` is one sub-model applied to both inputs (shared weights): a keras.applications
EfficientNet without top, an optional 1×1 convolution (the authors' released code projects to
4096 channels, the paper's "1×1×4096" features), and global pooling. Inputs are float32 RGB
pixels in 0..255 — EfficientNet normalises inside the model.

Heads:
- "softmax" (the paper, §II.C): Dense(2, softmax) trained with cross-entropy. Class order is
  (different, same): index 1 is "same person". The paper writes q = (q1, q2) with q1 = same; the
  loss is the same up to this permutation, and this order lets the pair pipeline's `same` flag
  (1 = same person) be the integer label directly, and makes `probs[:, 1]` mean what the sigmoid
  head's single output means.
- "sigmoid" (the authors' released code): Dense(1, sigmoid) with binary cross-entropy.

Head metric (`head_metric`), for either head; the layer is named "verification" in both:
- "free" (the paper, §II.C): a Dense layer, whose weights on (f1−f2)² take both signs.
  Trained this way on the synthetic data, it ranks a gallery badly (rank-1 0.8 % where the same
  model's cosine embedding gives 49.9 %): a pair may score "same" because it differs on channels
  with positive weights, so a few gallery images with large features score "same" with every query.
- "nonneg": `layers.DiagonalMetricHead`, P(same) = sigmoid(threshold − Σ m_k (f1_k − f2_k)²) with
  m ≥ 0: a learned diagonal metric, so P(same) never rises as two images' features move apart.
  With the 2-way softmax its logits are (0, threshold − d): logit(same) − logit(different) is the
  monotone quantity, and P(same) is the same as the sigmoid head's. The default recipe's head.

Use `loss_and_metrics(head)` for the matching loss, and `same_probability(outputs)` to read P(same)
from either head.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import keras
from keras import layers

from reid_keras.models.backbones import WeightsInfo, build_backbone, check_image_size
from reid_keras.models.embedding import build_embedding
from reid_keras.models.layers import DiagonalMetricHead, SquareLayer

HEADS = ("softmax", "sigmoid")
HEAD_METRICS = ("nonneg", "free")  # DiagonalMetricHead (metric weights >= 0), or the paper's Dense
SAME_INDEX = 1  # softmax head column holding P(same person); column 0 is P(different)
# The authors' released code uses Dropout(0.2) before the last layer; the paper gives no rate.
DEFAULT_DROPOUT = 0.2


def build_siamese(backbone: str = "efficientnetb0", image_size: Sequence[int] = (160, 80), weights=None,
                  dropout: float = DEFAULT_DROPOUT, head: str = "softmax", pooling: str = "avg",
                  feature_dim: Optional[int] = None, head_metric: str = "free", return_weights_info: bool = False):
    """Build the siamese verification model as a Keras functional model.

    Args:
        backbone: "efficientnetb0" … "efficientnetb5".
        image_size: `(height, width)`; the paper resizes to (160, 80).
        weights: "imagenet", None / "none", or a path (see `backbones.build_backbone`).
        dropout: rate of the Dropout before the verification layer (paper §III.C).
        head: "softmax" (2 units, index 1 = same) or "sigmoid" (1 unit = P(same)).
        pooling: "avg" or "max" global pooling of the backbone's feature map.
        feature_dim: optional 1×1 projection width before pooling (authors' code: 4096).
        head_metric: "free" (the paper's Dense on (f1−f2)²) or "nonneg" (`DiagonalMetricHead`: P(same)
            falls with every squared difference).
        return_weights_info: also return the backbone's `WeightsInfo` (for config.json).

    Returns:
        `keras.Model` with inputs `(image_a, image_b)` (float32, 0..255, shape (H, W, 3)) and the pair
        probability as output; `model.get_layer("embedding")` is the shared one-image feature model.
        With `return_weights_info`, `(model, WeightsInfo)`.

    Example:
        >>> model = build_siamese("efficientnetb0", (160, 80), weights="imagenet")
        >>> compile_siamese(model, make_optimizer("rmsprop", 1e-4))
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}: expected one of {', '.join(HEADS)}")
    if head_metric not in HEAD_METRICS:
        raise ValueError(f"unknown head_metric {head_metric!r}: expected one of {', '.join(HEAD_METRICS)}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    height, width = check_image_size(image_size)
    net, info = build_backbone(backbone, (height, width), weights)
    embedding = build_embedding(net, pooling=pooling, feature_dim=feature_dim, projection="conv")
    image_a = keras.Input((height, width, 3), name="image_a")
    image_b = keras.Input((height, width, 3), name="image_b")
    f1, f2 = embedding(image_a), embedding(image_b)
    x = SquareLayer(name="square")([f1, f2])
    x = layers.Dropout(float(dropout), name="dropout")(x)
    if head_metric == "nonneg":
        out = DiagonalMetricHead(head, name="verification")(x)
    elif head == "softmax":
        out = layers.Dense(2, activation="softmax", name="verification")(x)
    else:
        out = layers.Dense(1, activation="sigmoid", name="verification")(x)
    model = keras.Model([image_a, image_b], out, name=f"siamese_{net.name}")
    return (model, info) if return_weights_info else model


def head_of(model: keras.Model) -> str:
    """"softmax" or "sigmoid", read from the width of the model's verification output."""
    units = model.outputs[0].shape[-1]
    if units == 2:
        return "softmax"
    if units == 1:
        return "sigmoid"
    raise ValueError(f"{model.name}: output has {units} units; a verification head has 2 (softmax) or 1 (sigmoid)")


def head_metric_of(model: keras.Model) -> str:
    """"nonneg" or "free": whether the model's "verification" layer is a `DiagonalMetricHead`."""
    return "nonneg" if isinstance(model.get_layer("verification"), DiagonalMetricHead) else "free"


def same_probability(outputs):
    """P(same person) of shape (batch,) from either head's output (keras.ops, works in graphs)."""
    units = outputs.shape[-1]
    if units == 2:
        return outputs[:, SAME_INDEX]
    if units == 1:
        return outputs[:, 0]
    raise ValueError(f"verification output must have 2 (softmax) or 1 (sigmoid) units, got shape {outputs.shape}")


def loss_and_metrics(head: str) -> Tuple[keras.losses.Loss, list]:
    """The verification loss and accuracy metric for `head`, for `model.compile`.

    Labels are the pair pipeline's `same` flag (1 = same person, 0 = different) for both heads:
    sparse categorical cross-entropy over (different, same) for "softmax" (paper §II.C), binary
    cross-entropy for "sigmoid" (authors' code).
    """
    if head == "softmax":
        return keras.losses.SparseCategoricalCrossentropy(), [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    if head == "sigmoid":
        return keras.losses.BinaryCrossentropy(), [keras.metrics.BinaryAccuracy(name="accuracy")]
    raise ValueError(f"unknown head {head!r}: expected one of {', '.join(HEADS)}")


def compile_siamese(model: keras.Model, optimizer, jit_compile=False) -> keras.Model:
    """Compile `model` with its head's loss and accuracy (§III.C trains with RMSprop at 1e-4: pass
    `reid_keras.training.optimizers.make_optimizer("rmsprop", 1e-4)`). XLA (`jit_compile`) makes
    EfficientNet ~10x slower on CPU."""
    loss, metrics = loss_and_metrics(head_of(model))
    model.compile(optimizer=optimizer, loss=loss, metrics=metrics, jit_compile=jit_compile)
    return model


__all__ = ["build_siamese", "loss_and_metrics", "compile_siamese", "same_probability",
           "head_of", "head_metric_of", "SAME_INDEX", "HEADS", "HEAD_METRICS", "WeightsInfo"]
