"""Single-image re-ID models trained with identification, batch-hard triplet and/or OIM losses.

    image ─ embedding ─ f ─┬─ BNNeck BN ─ Dropout ─ Dense(num_ids) ─ "id"    (IdentificationLoss)
                           ├─────────────────────────────────────── "triplet" (BatchHardTripletLoss)
                           └─ L2Normalize ─ OIMMemory([f̂, pid]) ──── "oim"     (OIMLoss)

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
from keras import layers, ops

from reid_keras.models.backbones import WeightsInfo, build_backbone, check_image_size

HEADS = ("id", "triplet", "oim")
POOLINGS = ("avg", "max")
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


def build_classifier_embedding(backbone: keras.Model, pooling: str = "avg", feature_dim: Optional[int] = None,
                               name: str = "embedding") -> keras.Model:
    """One image -> feature f: backbone, global pooling, optional Dense(feature_dim) + BatchNormalization."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}: expected one of {', '.join(POOLINGS)}")
    image = keras.Input(backbone.input.shape[1:], name="image")
    x = backbone(image)
    pool = layers.GlobalAveragePooling2D if pooling == "avg" else layers.GlobalMaxPooling2D
    x = pool(name=f"{pooling}_pool")(x)
    if feature_dim is not None:
        if isinstance(feature_dim, bool) or int(feature_dim) != feature_dim or int(feature_dim) < 1:
            raise ValueError(f"feature_dim must be a positive integer or None, got {feature_dim!r}")
        x = layers.Dense(int(feature_dim), name="projection")(x)
        x = layers.BatchNormalization(name="projection_bn")(x)
    return keras.Model(image, x, name=name)


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
        >>> compile_classifier(model, learning_rate=3e-4, triplet_margin=0.3)
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
    embedding = build_classifier_embedding(net, pooling=pooling, feature_dim=feature_dim)
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
        from reid_keras.models.layers import L2Normalize
        from reid_keras.models.oim import OIMMemory

        pid = keras.Input((), dtype="int32", name="pid")
        inputs.append(pid)
        unit = L2Normalize(name="oim_normalize")(f)
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


@keras.saving.register_keras_serializable(package="reid_keras")
class DelayedExponentialDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Constant learning rate until `decay_start`, then exponential decay reaching
    `initial_learning_rate * final_factor` at `decay_end` (Hermans et al. 2017: 3e-4, decay
    from iteration 15,000 to 0.001x at 25,000). Steps are optimizer iterations."""

    def __init__(self, initial_learning_rate: float, decay_start: int, decay_end: int, final_factor: float = 0.001):
        if not 0 <= int(decay_start) < int(decay_end):
            raise ValueError(f"DelayedExponentialDecay: need 0 <= decay_start < decay_end, got {decay_start}, "
                             f"{decay_end}")
        if not 0 < float(final_factor) <= 1:
            raise ValueError(f"DelayedExponentialDecay: final_factor must be in (0, 1], got {final_factor!r}")
        self.initial_learning_rate = float(initial_learning_rate)
        self.decay_start, self.decay_end = int(decay_start), int(decay_end)
        self.final_factor = float(final_factor)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        progress = ops.clip((step - self.decay_start) / (self.decay_end - self.decay_start), 0.0, 1.0)
        return self.initial_learning_rate * ops.power(self.final_factor, progress)

    def get_config(self):
        return {"initial_learning_rate": self.initial_learning_rate, "decay_start": self.decay_start,
                "decay_end": self.decay_end, "final_factor": self.final_factor}


def learning_rate_schedule(value: float, schedule: Optional[dict] = None):
    """`value`, or a schedule from a config dict (steps are optimizer iterations):
    {"type": "step", "boundaries": [...], "factor": 0.1} (x factor at each boundary) or
    {"type": "delayed_exponential", "decay_start": ..., "decay_end": ..., "final_factor": 0.001}."""
    if not schedule:
        return float(value)
    kind = schedule.get("type")
    if kind == "step":
        boundaries = [int(b) for b in schedule["boundaries"]]
        factor = float(schedule.get("factor", 0.1))
        values = [float(value) * factor ** i for i in range(len(boundaries) + 1)]
        return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)
    if kind == "delayed_exponential":
        return DelayedExponentialDecay(float(value), schedule["decay_start"], schedule["decay_end"],
                                       schedule.get("final_factor", 0.001))
    raise ValueError(f"lr_schedule {schedule!r}: type must be 'step' or 'delayed_exponential'")


def compile_classifier(model: keras.Model, learning_rate: float = 3e-4, optimizer: str = "adam",
                       label_smoothing: float = 0.0, triplet_margin=0.3, loss_weights: Optional[dict] = None,
                       momentum: float = 0.9, weight_decay: Optional[float] = None,
                       lr_schedule: Optional[dict] = None, jit_compile=False) -> keras.Model:
    """Compile a `build_classifier` model with one loss per head and `loss_weights` (default 1 each).

    Args:
        learning_rate: base step size (see `learning_rate_schedule` for `lr_schedule`).
        optimizer: "adam" (Hermans et al.), "sgd" (Nesterov momentum `momentum`, Open-ReID) or "rmsprop".
        label_smoothing: of the "id" head's IdentificationLoss.
        triplet_margin: float or "soft", for the "triplet" head.
        loss_weights: e.g. {"id": 1.0, "triplet": 1.0}; keys must be heads of the model.
        weight_decay: decoupled weight decay of the optimizer (None: none).
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
    rate = learning_rate_schedule(learning_rate, lr_schedule)
    wd = None if not weight_decay else float(weight_decay)
    if optimizer == "adam":
        opt = keras.optimizers.Adam(learning_rate=rate, weight_decay=wd)
    elif optimizer == "sgd":
        opt = keras.optimizers.SGD(learning_rate=rate, momentum=momentum, nesterov=True, weight_decay=wd)
    elif optimizer == "rmsprop":
        opt = keras.optimizers.RMSprop(learning_rate=rate, weight_decay=wd)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}: expected adam, sgd or rmsprop")
    model.compile(optimizer=opt, loss=losses, loss_weights=weights, metrics=metrics, jit_compile=jit_compile)
    return model


__all__ = ["build_classifier", "build_classifier_embedding", "compile_classifier", "parse_losses", "heads_of",
           "learning_rate_schedule", "DelayedExponentialDecay", "HEADS", "CLASSIFIER_PRESETS"]


# Presets for `models/presets.py` (family "classifier", read by training/classifier_task.py).
# "default" is a quick CPU recipe on the synthetic data; "paper" keeps the values below.
_CPU_RECIPE = {"image_size": (64, 32), "batch_size": 32, "epochs": 4, "steps_per_epoch": 100,
               "optimizer": "adam", "learning_rate": 1e-3, "lr_schedule": None, "weight_decay": None,
               "augment": {"flip": True, "crop": (72, 36)}}

# Open-ReID's training recipe (examples/softmax_loss.py, oim_loss.py), shared by the softmax and OIM presets.
_OPEN_REID_RECIPE = {
    "sampler": "random", "batch_size": 256,
    # SGD, Nesterov momentum 0.9, weight decay 5e-4, 50 epochs, lr x0.1 after epoch 40. Open-ReID
    # uses 0.1 for new layers and 0.01 for the backbone; Keras has one rate: the backbone's.
    "optimizer": "sgd", "learning_rate": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "epochs": 50,
    # An "epoch" is 50 steps (one pass of Market-1501's 12,936 images at 256), so the decay at epoch
    # 40 is iteration 2,000 whatever the dataset.
    "steps_per_epoch": 50, "lr_schedule": {"type": "step", "boundaries": [2000], "factor": 0.1},
    # Open-ReID: RandomSizedRectCrop + flip; approximated by resize to 288x144 + random 256x128 crop.
    "augment": {"flip": True, "crop": (288, 144)},
    "recipes": {"default": _CPU_RECIPE, "paper": {}},
}

CLASSIFIER_PRESETS = {
    # OIM paper §5.3 Table 3, "ResNet-50 Softmax" (the paper points to Open-ReID for the recipe;
    # values from Open-ReID examples/softmax_loss.py unless marked).
    "resnet50_softmax": {
        "family": "classifier",
        "paper": "oim_person_search.txt §5.3 Table 3 (Softmax baseline)",
        "backbone": "resnet50", "weights": "imagenet", "image_size": (256, 128),
        "preprocessing": "resnet50",
        "losses": "id",
        "feature_dim": 128,          # Open-ReID --features 128 (Dense + BN; Open-ReID adds a ReLU)
        "pooling": "avg", "dropout": 0.5, "bnneck": False, "label_smoothing": 0.0,
        **_OPEN_REID_RECIPE,
    },
    # OIM paper §5.3 Table 3, "ResNet-50 OIM": the same Open-ReID recipe (examples/oim_loss.py) with the
    # OIM loss on the L2-normalised 256-d projection (§3.1, Table 4's choice), τ = 0.1 (§3.2; Open-ReID
    # and the PyTorch ports use scale 30: --oim-scale 30), lookup-table momentum γ = 0.5.
    "resnet50_oim": {
        "family": "classifier",
        "paper": "oim_person_search.txt §5.3 Table 3 (OIM on re-ID crops)",
        "backbone": "resnet50", "weights": "imagenet", "image_size": (256, 128),
        "preprocessing": "resnet50",
        "losses": "oim", "oim_temperature": 0.1, "oim_scale": None, "oim_momentum": 0.5,
        "feature_dim": 256, "pooling": "avg",
        **_OPEN_REID_RECIPE,
    },
    # Hermans et al. 2017 ("In Defense of the Triplet Loss", the slides' triplet loss): batch-hard
    # triplet loss on P=18 x K=4 batches, Adam 3e-4 decayed from iteration 15,000 to 0.001x at
    # 25,000, 256x128 crops of 288x144 images with flips, 128-d embedding (their TriNet head is
    # Dense 1024 + BN + ReLU + Dense 128; ours is Dense 128 + BN), soft margin (their best).
    # Plus an ID head on a BNNeck (Luo et al. 2019) as asked for "id+triplet"; --losses triplet is
    # the paper alone, --triplet-margin 0.3 the BNNeck paper's margin.
    "resnet50_triplet": {
        "family": "classifier",
        "paper": "Hermans et al. 2017, batch-hard triplet (reid_deep_learning_slides.txt)",
        "backbone": "resnet50", "weights": "imagenet", "image_size": (256, 128),
        "preprocessing": "resnet50",
        "losses": "id+triplet", "loss_weights": {"id": 1.0, "triplet": 1.0},
        "feature_dim": 128, "pooling": "avg", "dropout": 0.0, "bnneck": True, "label_smoothing": 0.0,
        "triplet_margin": "soft",
        "sampler": "pk", "P": 18, "K": 4, "batch_size": 72,
        "optimizer": "adam", "learning_rate": 3e-4, "weight_decay": None,
        "steps_per_epoch": 250, "epochs": 100,   # 25,000 iterations
        "lr_schedule": {"type": "delayed_exponential", "decay_start": 15000, "decay_end": 25000,
                        "final_factor": 0.001},
        "augment": {"flip": True, "crop": (288, 144)},
        "recipes": {"default": {**_CPU_RECIPE, "P": 8, "K": 4}, "paper": {}},
    },
}
