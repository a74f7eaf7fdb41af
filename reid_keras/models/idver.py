"""Siamese identification + verification model (identification_verification_embedding.txt §III, Fig. 3).

    image_a ─┐                      ┌─ f1 ─ Dropout ─ Dense(K) ─ id_a          (shared ID layer)
             ├─ embedding (shared) ─┤
    image_b ─┘                      └─ f2 ─ Dropout ─ Dense(K) ─ id_b
                                      f1, f2 ─ SquareLayer (f1−f2)² ─ Dropout ─ Dense(2) ─ verification

`embedding` is one sub-model applied to both images (shared weights): a keras.applications
ResNet50 or VGG16, or our CaffeNet (`models/caffenet.py`), without top and global average pooling
(ResNet-50: the 2048-d pool5 vector; CaffeNet: the 4,096-d fc7, a 1×1 map; it is also the test-time
descriptor, ranked by cosine, §III-F "Testing"). Inputs are "caffe"
preprocessed pixels (`reid_keras.data.preprocessing`), applied by the pipelines. The paper's
"1×1 convolution" heads on a 1×1×C feature are Dense layers here. Class order of the
verification head is (different, same), index 1 = same, as in `models/siamese.py`.

Variants (`losses`), as compared in Table II: "id+verif" (I+V), "id" (two ID heads, no
verification head; with weights 0.5/0.5 this is the mean ID loss over the 2B images of a batch
of B pairs, i.e. the paper's fine-tuned classification baseline), "verif" (V only).

`verif_loss="contrastive"` replaces the Square-layer cross-entropy by the contrastive loss on the
Euclidean distance of the two features (§IV-B "Cross-entropy vs. Contrastive loss", as in DeepID).
The paper does not say whether the features were normalised; we L2-normalise them first
(`PairDistance`): the test-time ranking is cosine, i.e. Euclidean on normalised features, and a
fixed margin then means the same thing whatever the feature scale. No dropout precedes it
(§II-C: dropout cannot be applied on the embedding before the contrastive loss).

Losses are weighted 0.5 / 0.5 / 1 (ID a, ID b, verification; §III-F "Training").
"""
from __future__ import annotations

from typing import Optional, Sequence

import keras
from keras import layers, ops

# Imported at module level: registering this family's modules (families.register_serializables) then
# also registers the losses a compiled .keras file names.
from reid_keras.losses import ContrastiveLoss, IdentificationLoss, VerificationLoss
from reid_keras.models.backbones import build_backbone, check_image_size
from reid_keras.models.layers import SquareLayer
from reid_keras.models.embedding import build_embedding

LOSSES = ("id+verif", "id", "verif")
VERIF_LOSSES = ("crossentropy", "contrastive")
ID_A, ID_B, VERIFICATION, DISTANCE = "id_a", "id_b", "verification", "distance"
# §III-F: gradient weight 1 for the verification loss, 0.5 for each identification loss.
LOSS_WEIGHTS = {ID_A: 0.5, ID_B: 0.5, VERIFICATION: 1.0, DISTANCE: 1.0}
# §III-F "we insert the dropout function before the final convolutional layer"; the paper gives no
# rate: 0.5 is the usual fine-tuning choice (Srivastava et al., the paper's ref. [22]).
DEFAULT_DROPOUT = 0.5
# New layers start from small Gaussian weights (std 0.001, zero bias), as the first author's later
# re-ID baseline initialises its classifier: the heads then start near-uniform. With Keras' default
# Glorot init the verification logits sum 2048 squared differences and start so large that the
# cross-entropy begins at ~2.4 (vs ln 2) and stays above chance for hundreds of steps.
HEAD_INIT_STDDEV = 0.001


@keras.saving.register_keras_serializable(package="reid_keras")
class PairDistance(keras.layers.Layer):
    """Euclidean distance between two feature batches, optionally after L2 normalisation.

    `sqrt(sum((n(f1) - n(f2))^2) + epsilon)` with `n` the L2 normalisation when `normalize`:
    the epsilon keeps the gradient finite for identical features (sqrt has an infinite slope at 0).

    Call args:
        inputs: `[f1, f2]`, two tensors of shape (batch, D).

    Returns:
        (batch, 1) distances.
    """

    def __init__(self, normalize: bool = True, epsilon: float = 1e-12, **kwargs):
        super().__init__(**kwargs)
        self.normalize = bool(normalize)
        self.epsilon = float(epsilon)
        if not self.epsilon > 0:
            raise ValueError(f"PairDistance: epsilon must be > 0, got {epsilon}")

    def call(self, inputs):
        if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
            raise ValueError(f"{self.name}: PairDistance expects a list of two feature tensors [f1, f2]")
        f1, f2 = inputs
        if self.normalize:
            f1 = ops.normalize(f1, axis=-1, epsilon=self.epsilon)
            f2 = ops.normalize(f2, axis=-1, epsilon=self.epsilon)
        return ops.sqrt(ops.sum(ops.square(f1 - f2), axis=-1, keepdims=True) + self.epsilon)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], 1)

    def get_config(self):
        config = super().get_config()
        config.update({"normalize": self.normalize, "epsilon": self.epsilon})
        return config


def build_idver(num_ids: int, backbone: str = "resnet50", image_size: Sequence[int] = (224, 224), weights=None,
                losses: str = "id+verif", verif_loss: str = "crossentropy", dropout: float = DEFAULT_DROPOUT,
                pooling: str = "avg", return_weights_info: bool = False):
    """Build the identification + verification siamese model.

    Args:
        num_ids: training identities K (width of the shared identification layer).
        backbone: "resnet50", "vgg16" or "caffenet" (any `backbones.BACKBONES` name works).
        image_size: `(height, width)`; the paper crops 224×224.
        weights: "imagenet", None / "none", or a path (see `backbones.build_backbone`).
        losses: "id+verif", "id" or "verif" (Table II's I+V, I, V).
        verif_loss: "crossentropy" (Square layer + 2-way softmax, §III-D) or "contrastive" (a
            `distance` output for `reid_keras.losses.ContrastiveLoss`, §IV-B).
        dropout: rate of the Dropout before each final layer (none before the contrastive distance).
        pooling: "avg" or "max" global pooling of the backbone's feature map.
        return_weights_info: also return the backbone's `WeightsInfo`.

    Returns:
        `keras.Model` with inputs `(image_a, image_b)` and a dict of outputs: `id_a`, `id_b`
        (softmax over K ids) for the ID variants, `verification` (softmax over (different, same))
        or `distance` for the verification variants. `model.get_layer("embedding")` is the shared
        one-image feature model. With `return_weights_info`, `(model, WeightsInfo)`.

    Example:
        >>> model = build_idver(751, "resnet50", (224, 224), weights="imagenet")
        >>> compile_idver(model, make_optimizer("sgd", 1e-3, momentum=0.9))
    """
    if losses not in LOSSES:
        raise ValueError(f"unknown losses {losses!r}: expected one of {', '.join(LOSSES)}")
    if verif_loss not in VERIF_LOSSES:
        raise ValueError(f"unknown verif_loss {verif_loss!r}: expected one of {', '.join(VERIF_LOSSES)}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    use_id = losses in ("id+verif", "id")
    if use_id and (isinstance(num_ids, bool) or not isinstance(num_ids, int) or num_ids < 2):
        raise ValueError(f"num_ids must be an integer >= 2 (the training identities), got {num_ids!r}")
    height, width = check_image_size(image_size)
    net, info = build_backbone(backbone, (height, width), weights)
    embedding = build_embedding(net, pooling=pooling)
    image_a = keras.Input((height, width, 3), name="image_a")
    image_b = keras.Input((height, width, 3), name="image_b")
    f1, f2 = embedding(image_a), embedding(image_b)
    outputs = {}
    if use_id:
        # One dropout and one classifier layer for both images: the two ID heads share weights (§III-C).
        id_dropout = layers.Dropout(float(dropout), name="id_dropout")
        classifier = layers.Dense(int(num_ids), activation="softmax", name="identity",
                                  kernel_initializer=keras.initializers.RandomNormal(stddev=HEAD_INIT_STDDEV))
        outputs[ID_A] = classifier(id_dropout(f1))
        outputs[ID_B] = classifier(id_dropout(f2))
    if losses in ("id+verif", "verif"):
        if verif_loss == "crossentropy":
            x = SquareLayer(name="square")([f1, f2])
            x = layers.Dropout(float(dropout), name="verif_dropout")(x)
            outputs[VERIFICATION] = layers.Dense(
                2, activation="softmax", name="verification",
                kernel_initializer=keras.initializers.RandomNormal(stddev=HEAD_INIT_STDDEV))(x)
        else:
            outputs[DISTANCE] = PairDistance(name="pair_distance")([f1, f2])
    name = f"idver_{net.name}" if losses == "id+verif" else f"{losses}_{net.name}"
    model = keras.Model([image_a, image_b], outputs, name=name)
    return (model, info) if return_weights_info else model


def output_names(model: keras.Model) -> list:
    """The keys of the model's output dict (`id_a`, `id_b`, `verification` / `distance`)."""
    if not isinstance(model.output, dict):
        raise ValueError(f"{model.name}: not an identification+verification model (outputs are not a dict)")
    return list(model.output)


def loss_weights_for(model: keras.Model, weights: Optional[dict] = None) -> dict:
    """`LOSS_WEIGHTS` (0.5 / 0.5 / 1, §III-F), updated by `weights`, for the model's outputs."""
    merged = dict(LOSS_WEIGHTS, **(weights or {}))
    return {name: float(merged[name]) for name in output_names(model)}


def losses_and_metrics(model: keras.Model, label_smoothing: float = 0.0, contrastive_margin: float = 1.0):
    """`(loss dict, metrics dict)` for `model.compile`, keyed by the model's outputs.

    Targets are the pair stream's labels: `id_a` / `id_b` the two identities (0..K-1),
    `verification` / `distance` the `same` flag (1 = same person).
    """
    loss, metrics = {}, {}
    for name in output_names(model):
        if name in (ID_A, ID_B):
            loss[name] = IdentificationLoss(label_smoothing=label_smoothing)
            metrics[name] = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
        elif name == VERIFICATION:
            loss[name] = VerificationLoss()
            metrics[name] = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
        elif name == DISTANCE:
            loss[name] = ContrastiveLoss(margin=contrastive_margin)
    return loss, metrics


def compile_idver(model: keras.Model, optimizer, label_smoothing: float = 0.0, contrastive_margin: float = 1.0,
                  loss_weights: Optional[dict] = None, jit_compile=False) -> keras.Model:
    """Compile `model` with its losses weighted 0.5 / 0.5 / 1 (§III-F) and accuracy metrics.

    Args:
        model: from `build_idver`.
        optimizer: a Keras optimizer (§III-F: SGD with momentum, see `training.optimizers.make_optimizer`).
        label_smoothing: of the identification loss (0 = the paper's plain cross-entropy).
        contrastive_margin: margin of the contrastive loss (verif_loss="contrastive").
        loss_weights: overrides of `LOSS_WEIGHTS` by output name.
        jit_compile: passed to `model.compile` (XLA is slow for these on CPU).
    """
    loss, metrics = losses_and_metrics(model, label_smoothing, contrastive_margin)
    model.compile(optimizer=optimizer, loss=loss, loss_weights=loss_weights_for(model, loss_weights),
                  metrics=metrics, jit_compile=jit_compile)
    return model


def has_verification_head(model: keras.Model) -> bool:
    """Whether the model has the Square-layer softmax verification head (`verify` can be exported)."""
    return VERIFICATION in output_names(model)


def verification_view(model: keras.Model) -> keras.Model:
    """A two-image model sharing `model`'s layers whose one output is the verification head's
    (different, same) softmax: the shape `reid_keras.export.export_model` takes today.

    Raises:
        ValueError: the model has no cross-entropy verification head ("id" variant or contrastive).
    """
    if not has_verification_head(model):
        raise ValueError(f"{model.name} has no verification head (outputs: {', '.join(output_names(model))}); "
                         "only its embedding can be exported")
    return keras.Model(model.inputs, model.output[VERIFICATION], name=model.name)


__all__ = ["build_idver", "compile_idver", "losses_and_metrics", "loss_weights_for",
           "verification_view", "has_verification_head", "output_names", "PairDistance",
           "LOSSES", "VERIF_LOSSES", "LOSS_WEIGHTS", "DEFAULT_DROPOUT"]
