"""Single-image re-ID models trained with identification, batch-hard triplet and/or OIM losses.

    image ─ embedding ─ f ─┬─ BNNeck BN ─ Dropout ─ Dense(num_ids) ─ "id"    (IdentificationLoss)
                           ├─────────────────────────────────────── "triplet" (BatchHardTripletLoss)
                           └─ UnitNormalization ─ OIMMemory([f̂, pid]) ──── "oim"     (OIMLoss)

`embedding` (a sub-model, the test-time descriptor ranked by cosine) is a keras.applications
backbone without top (`backbones.build_backbone`), global pooling and an optional projection
`Dense(feature_dim) + BatchNormalization` (OIM paper §5.3 Table 4: a low-dimensional projection
regularises training; Open-ReID uses 128-d). The heads, chosen by `losses` ("id", "triplet",
"oim", joined by "+"):

- "id": identity logits (idver paper §III-C; OIM paper Table 3 "Softmax"). With `bnneck` the
  classifier sees `BN(f)` (BatchNormalization without shift, then a bias-free Dense) while the
  triplet loss sees `f` itself — the "BNNeck" of Luo et al. 2019 ("Bag of Tricks"), which keeps the
  ID loss's feature space from fighting the triplet loss's Euclidean one. Dropout before the
  classifier as in the idver paper §III-F.
- "triplet": `f` itself, for the batch-hard triplet loss (Hermans et al. 2017) on P x K batches.
- "oim": OIM logits over the lookup table (oim_person_search.txt §3.2) of the L2-normalised `f`;
  the model then takes `[image, pid]` (the memory update needs the labels), every crop labeled.

The model's outputs are a dict keyed by head name, so `compile` takes losses and `loss_weights`
keyed the same way (`compile_classifier`); a new head is one branch in `build_classifier` and one
loss entry in `compile_classifier`. Inputs are float32 images already normalised by the backbone's
preprocessing (`reid_keras.data.preprocessing`, applied by the pipelines: "efficientnet" keeps
0..255, "resnet50" / "vgg16" are caffe-style).
"""
from __future__ import annotations

from typing import Optional, Sequence

import keras
from keras import layers

from reid_keras.models.backbones import WeightsInfo, build_backbone, check_image_size
from reid_keras.models.embedding import build_embedding

HEADS = ("id", "triplet", "oim")
# Open-ReID (the OIM paper's re-ID code, Table 3) and the idver paper §III-F use dropout 0.5.
DEFAULT_DROPOUT = 0.5


def parse_losses(losses) -> tuple:
    """"id+triplet" (or a list) -> ("id", "triplet"), validated, in HEADS order."""
    parts = losses.split("+") if isinstance(losses, str) else list(losses)
    parts = [str(p).strip().lower() for p in parts if str(p).strip()]
    unknown = [p for p in parts if p not in HEADS]
    if unknown or not parts or len(set(parts)) != len(parts):
        raise ValueError(f"losses {losses!r}: expected heads from {', '.join(HEADS)} joined by '+', each at most "
                         "once, e.g. 'id', 'triplet', 'id+triplet', 'oim'")
    return tuple(h for h in HEADS if h in parts)


def build_classifier(num_ids: int, backbone: str = "resnet50", image_size: Sequence[int] = (256, 128),
                     weights=None, losses="id", feature_dim: Optional[int] = None, pooling: str = "avg",
                     dropout: float = DEFAULT_DROPOUT, bnneck: bool = True, oim_momentum: float = 0.5,
                     oim_scale: Optional[float] = None, oim_temperature: Optional[float] = None,
                     return_weights_info: bool = False):
    """Build the single-image re-ID model (see the module docstring for the graph).

    Args:
        num_ids: training identities (labels 0..num_ids-1), the ID classifier / OIM table size.
        backbone: a `backbones.build_backbone` name ("resnet50", "vgg16", "efficientnetb0", ...), or
            a ready no-top `keras.Model` (image -> feature map) taking `image_size` inputs; `weights`
            must then be None.
        image_size: `(height, width)`.
        weights: "imagenet", None / "none", or a path (see `build_backbone`).
        losses: "id", "triplet", "oim" or a "+"-joined combination, e.g. "id+triplet".
        feature_dim: None (the pooled backbone feature) or the width of the Dense + BN projection.
        pooling: "avg" or "max".
        dropout: rate before the ID classifier.
        bnneck: ID classifier on BN(f) (shift-free BN, bias-free Dense) instead of on f.
        oim_momentum, oim_scale, oim_temperature: `OIMMemory`'s γ and 1/τ or τ (default τ 0.1, the
            paper's; Open-ReID uses scale 30).
        return_weights_info: also return the backbone's `WeightsInfo`.

    Returns:
        `keras.Model`: input `image` (plus `pid` with "oim"), outputs a dict keyed by head;
        `model.get_layer("embedding")` is the one-image feature model. With `return_weights_info`,
        `(model, WeightsInfo)`.

    Example:
        >>> model = build_classifier(751, "resnet50", (256, 128), "imagenet", losses="id+triplet")
        >>> compile_classifier(model, make_optimizer("adam", 3e-4), triplet_margin=0.3)
    """
    heads = parse_losses(losses)
    if isinstance(num_ids, bool) or int(num_ids) != num_ids or int(num_ids) < 1:
        raise ValueError(f"num_ids must be a positive integer, got {num_ids!r}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    height, width = check_image_size(image_size)
    if isinstance(backbone, keras.Model):
        if weights is not None or tuple(backbone.input.shape[1:3]) != (height, width):
            raise ValueError(f"backbone model {backbone.name!r}: expected input size {(height, width)} (got "
                             f"{tuple(backbone.input.shape[1:3])}) and weights=None (got {weights!r})")
        net, info = backbone, WeightsInfo("model", "model")
    else:
        net, info = build_backbone(backbone, (height, width), weights)
    embedding = build_embedding(net, pooling=pooling, feature_dim=feature_dim, projection="dense")
    image = keras.Input((height, width, 3), name="image")
    inputs = [image]
    f = embedding(image)
    outputs = {}
    if "id" in heads:
        x = layers.BatchNormalization(center=False, name="bnneck")(f) if bnneck else f
        x = layers.Dropout(float(dropout), name="id_dropout")(x)
        outputs["id"] = layers.Dense(int(num_ids), use_bias=not bnneck, name="id")(x)
    if "triplet" in heads:
        outputs["triplet"] = f
    if "oim" in heads:
        from reid_keras.models.oim import OIMMemory

        pid = keras.Input((), dtype="int32", name="pid")
        inputs.append(pid)
        unit = layers.UnitNormalization(name="oim_normalize")(f)
        outputs["oim"] = OIMMemory(int(num_ids), queue_size=0, feature_dim=int(f.shape[-1]), momentum=oim_momentum,
                                   scale=oim_scale, temperature=oim_temperature, name="oim")([unit, pid])
    model = keras.Model(inputs if len(inputs) > 1 else image, outputs, name=f"classifier_{net.name}")
    return (model, info) if return_weights_info else model


def heads_of(model: keras.Model) -> tuple:
    """The heads ("id", "triplet", "oim") a `build_classifier` model outputs."""
    names = tuple(model.output.keys()) if isinstance(model.output, dict) else ()
    heads = tuple(h for h in HEADS if h in names)
    if not heads:
        raise ValueError(f"model {model.name!r} has no classifier heads (outputs keyed by {', '.join(HEADS)}); "
                         "build it with reid_keras.models.classifier.build_classifier")
    return heads


def compile_classifier(model: keras.Model, optimizer, label_smoothing: float = 0.0, triplet_margin=0.3,
                       loss_weights: Optional[dict] = None, jit_compile=False) -> keras.Model:
    """Compile a `build_classifier` model with one loss per head and `loss_weights` (default 1 each).

    Args:
        optimizer: a Keras optimizer (see `training.optimizers.make_optimizer`; Open-ReID: SGD with
            Nesterov momentum, Hermans et al.: Adam).
        label_smoothing: of the "id" head's IdentificationLoss.
        triplet_margin: float or "soft", for the "triplet" head.
        loss_weights: e.g. {"id": 1.0, "triplet": 1.0}; keys must be heads of the model.
    """
    from reid_keras.losses import BatchHardTripletLoss, IdentificationLoss

    heads = heads_of(model)
    weights = {h: 1.0 for h in heads}
    extra = sorted(set(loss_weights or {}) - set(heads))
    if extra:
        raise ValueError(f"loss_weights has {', '.join(extra)}, but the model's heads are {', '.join(heads)}")
    weights.update({k: float(v) for k, v in (loss_weights or {}).items()})
    losses, metrics = {}, {}
    if "id" in heads:
        losses["id"] = IdentificationLoss(label_smoothing, from_logits=True)
        metrics["id"] = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
    if "triplet" in heads:
        losses["triplet"] = BatchHardTripletLoss(triplet_margin)
    if "oim" in heads:
        from reid_keras.losses import OIMLoss
        from reid_keras.models.oim import OIMAccuracy

        losses["oim"] = OIMLoss()
        metrics["oim"] = [OIMAccuracy(name="accuracy")]
    model.compile(optimizer=optimizer, loss=losses, loss_weights=weights, metrics=metrics, jit_compile=jit_compile)
    return model


__all__ = ["build_classifier", "compile_classifier", "parse_losses", "heads_of", "HEADS"]
