"""The single-image family (`models/classifier.py`): identification, batch-hard triplet and OIM losses.

Presets: `resnet50_softmax` and `resnet50_oim` (oim_person_search.txt §5.3 Table 3, with Open-ReID's
recipe, which the paper points to), `resnet50_triplet` (Hermans et al. 2017, the slides' triplet
loss). Training reads P x K batches ("pk" sampler, the global batch is P*K) or shuffled images
("random").
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from reid_keras.families.base import Family, Preset, Recipe, Task, check_numbers, finite, integer, margin
from reid_keras.models.classifier import DEFAULT_DROPOUT, parse_losses

SAMPLERS = ("pk", "random")
# The numbers only this family reads (families/base.py NUMBER_RULES has the shared ones).
NUMBER_RULES = {
    "triplet_margin": (margin, "a finite number > 0 or 'soft'"),
    "oim_momentum": (lambda v: finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "oim_scale": (lambda v: v is None or (finite(v) and v > 0), "a finite number > 0 or None"),
    "oim_temperature": (lambda v: v is None or (finite(v) and v > 0), "a finite number > 0 or None"),
    "P": (lambda v: integer(v) and v >= 1, "an integer >= 1"),
    "K": (lambda v: integer(v) and v >= 1, "an integer >= 1"),
}


@dataclasses.dataclass(frozen=True)
class ClassifierRecipe(Recipe):
    """Recipe of a single-image re-ID run. `oim_scale` (1/τ) replaces `oim_temperature` when set."""

    preprocessing: str = "resnet50"
    nesterov: bool = True  # SGD runs use Open-ReID's Nesterov momentum
    losses: str = "id"  # heads joined by "+": id, triplet, oim
    feature_dim: Optional[int] = None  # Dense + BN projection width; None: the pooled backbone feature
    pooling: str = "avg"
    dropout: float = DEFAULT_DROPOUT
    bnneck: bool = True
    label_smoothing: float = 0.0
    triplet_margin: object = 0.3  # a number or "soft"
    loss_weights: Optional[dict] = None  # None: 1 per head
    oim_momentum: float = 0.5
    oim_scale: Optional[float] = None
    oim_temperature: Optional[float] = None
    sampler: str = "pk"
    P: int = 18
    K: int = 4
    drop_small_ids: bool = False

    def __post_init__(self):
        super().__post_init__()
        check_numbers(self, NUMBER_RULES)
        heads = parse_losses(self.losses)
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r}: expected one of {', '.join(SAMPLERS)}")
        if self.sampler == "random" and "triplet" in heads:
            raise ValueError("losses with 'triplet' need P x K batches (sampler 'pk'): random batches rarely hold "
                             "two images of one identity, so almost every anchor would have no positive")
        if isinstance(self.triplet_margin, str) and self.triplet_margin.strip().lower() != "soft":
            self._set("triplet_margin", float(self.triplet_margin))


# "default" is a quick CPU recipe on the synthetic data; "paper" keeps the preset's values.
QUICK = {"image_size": (64, 32), "batch_size": 32, "epochs": 4, "steps_per_epoch": 100, "optimizer": "adam",
         "learning_rate": 1e-3, "lr_schedule": None, "weight_decay": None, "augment": {"flip": True, "crop": (72, 36)}}

# Open-ReID's training recipe (examples/softmax_loss.py, oim_loss.py), shared by the softmax and OIM presets:
OPEN_REID = dict(
    backbone="resnet50", weights="imagenet", image_size=(256, 128), preprocessing="resnet50",
    sampler="random", batch_size=256,
    # SGD, Nesterov momentum 0.9, weight decay 5e-4, 50 epochs, lr x0.1 after epoch 40. Open-ReID
    # uses 0.1 for new layers and 0.01 for the backbone; Keras has one rate: the backbone's.
    optimizer="sgd", learning_rate=0.01, momentum=0.9, weight_decay=5e-4, epochs=50,
    # An "epoch" is 50 steps (one pass of Market-1501's 12,936 images at 256), so the decay at epoch
    # 40 is iteration 2,000 whatever the dataset.
    steps_per_epoch=50, lr_schedule={"type": "step", "boundaries": [2000], "factor": 0.1},
    # Open-ReID: RandomSizedRectCrop + flip; approximated by resize to 288x144 + random 256x128 crop.
    augment={"flip": True, "crop": (288, 144)},
)

PRESETS = {
    # OIM paper §5.3 Table 3, "ResNet-50 Softmax": Open-ReID examples/softmax_loss.py.
    "resnet50_softmax": Preset(ClassifierRecipe(
        losses="id", feature_dim=128,  # Open-ReID --features 128 (Dense + BN; Open-ReID adds a ReLU)
        dropout=0.5, bnneck=False, **OPEN_REID), paper="oim_person_search.txt §5.3 Table 3 (Softmax baseline)",
        quick=QUICK),
    # OIM paper §5.3 Table 3, "ResNet-50 OIM": the same recipe (examples/oim_loss.py) with the OIM loss on
    # the L2-normalised 256-d projection (§3.1, Table 4's choice), τ = 0.1 (§3.2; Open-ReID and the
    # PyTorch ports use scale 30: --oim-scale 30), lookup-table momentum γ = 0.5.
    "resnet50_oim": Preset(ClassifierRecipe(
        losses="oim", oim_temperature=0.1, oim_momentum=0.5, feature_dim=256, **OPEN_REID),
        paper="oim_person_search.txt §5.3 Table 3 (OIM on re-ID crops)", quick=QUICK),
    # Hermans et al. 2017 ("In Defense of the Triplet Loss"): batch-hard triplet loss on P=18 x K=4
    # batches, Adam 3e-4 decayed from iteration 15,000 to 0.001x at 25,000, 256x128 crops of 288x144
    # images with flips, 128-d embedding (their TriNet head is Dense 1024 + BN + ReLU + Dense 128; ours is
    # Dense 128 + BN), soft margin (their best). Plus an ID head on a BNNeck (Luo et al. 2019) as asked
    # for "id+triplet"; --losses triplet is the paper alone, --triplet-margin 0.3 the BNNeck paper's margin.
    "resnet50_triplet": Preset(ClassifierRecipe(
        backbone="resnet50", weights="imagenet", image_size=(256, 128), preprocessing="resnet50",
        losses="id+triplet", loss_weights={"id": 1.0, "triplet": 1.0}, feature_dim=128, dropout=0.0,
        bnneck=True, triplet_margin="soft", sampler="pk", P=18, K=4, batch_size=72, optimizer="adam",
        learning_rate=3e-4, steps_per_epoch=250, epochs=100,  # 25,000 iterations
        lr_schedule={"type": "delayed_exponential", "decay_start": 15000, "decay_end": 25000, "final_factor": 0.001},
        augment={"flip": True, "crop": (288, 144)}),
        paper="Hermans et al. 2017, batch-hard triplet (reid_deep_learning_slides.txt)", quick={**QUICK, "P": 8, "K": 4}),
}


class ClassifierTask(Task):
    """Builds, feeds, evaluates and exports a `build_classifier` model."""

    def __init__(self, recipe: ClassifierRecipe, seed: int = 0):
        super().__init__(recipe, seed)
        self.heads = parse_losses(recipe.losses)

    def check_batch_slices(self, num_replicas: int) -> None:
        """Batch-hard triplet mines within each contiguous slice of the P x K batch (a replica's, and each
        accumulated micro-batch): only with P a multiple of the slice count does every slice hold whole
        identities (all K-1 positives)."""
        r = self.recipe
        if "triplet" not in self.heads or r.sampler != "pk":
            return
        if num_replicas > 1 and r.P % num_replicas:
            raise ValueError(f"P = {r.P} identities per batch is not a multiple of the {num_replicas} replicas: the "
                             "triplet loss mines each replica's slice of the batch, which would split identities; "
                             f"use P = {num_replicas * max(1, round(r.P / num_replicas))} (and --batch-size P*K)")
        slices = num_replicas * r.accumulate_steps
        if r.P % slices:
            raise ValueError(f"P = {r.P} identities per batch is not a multiple of {slices} slices ({num_replicas} "
                             f"replica(s) x accumulate_steps {r.accumulate_steps}): the triplet loss mines each "
                             "micro-batch, which would split identities")

    def build(self, num_train_ids: int):
        import tensorflow as tf

        from reid_keras.models.classifier import build_classifier, compile_classifier

        self.check_batch_slices(tf.distribute.get_strategy().num_replicas_in_sync)  # build runs in the scope
        r = self.recipe
        model, info = build_classifier(
            num_train_ids, r.backbone, self.image_size, weights=r.backbone_weights, losses=self.heads,
            feature_dim=r.feature_dim, pooling=r.pooling, dropout=r.dropout, bnneck=r.bnneck,
            oim_momentum=r.oim_momentum, oim_scale=r.oim_scale, oim_temperature=r.oim_temperature,
            return_weights_info=True)
        compile_classifier(model, self.optimizer(), label_smoothing=r.label_smoothing,
                           triplet_margin=r.triplet_margin, loss_weights=r.loss_weights, jit_compile=r.jit_compile)
        return model, info.to_dict()

    def train_dataset(self, records, initial_epoch: int, epochs: int, global_batch: int, initial_step: int = 0):
        """`((images[, pids]), {head: pids})` batches from step `initial_step` of epoch `initial_epoch`, and the
        steps per epoch.

        Under MirroredStrategy each replica gets a contiguous slice of the P x K batch; with P a
        multiple of the replica count every slice holds whole identities, so the batch-hard mining of
        each replica (see `BatchHardTripletLoss`) still finds all K-1 positives of every anchor.
        """
        from reid_keras.data.pipelines import pk_dataset, random_batch_dataset

        r = self.recipe
        if r.sampler == "pk":
            P, K = int(r.P), int(r.K)
            if int(global_batch) != P * K:
                raise ValueError(f"batch size {global_batch} != P x K = {P} x {K} = {P * K}: with the P x K "
                                 "sampler the batch is P identities x K images; set --batch-size to P*K or "
                                 "change P / K")
            steps = r.steps_per_epoch or max(len(records) // (P * K), 1)
            ds = pk_dataset(records, P, K, self.image_size, preprocess=r.preprocessing, augment=r.augment_config(),
                            seed=self.seed, epochs=epochs, initial_epoch=initial_epoch, initial_step=initial_step,
                            batches_per_epoch=steps, drop_small_ids=r.drop_small_ids)
        else:
            steps = r.steps_per_epoch or max(len(records) // int(global_batch), 1)
            ds = random_batch_dataset(records, global_batch, self.image_size, preprocess=r.preprocessing,
                                      augment=r.augment_config(), seed=self.seed, epochs=epochs,
                                      initial_epoch=initial_epoch, initial_step=initial_step, batches_per_epoch=steps)
        heads, with_pid = self.heads, "oim" in self.heads

        def to_model(images, pids):
            return ((images, pids) if with_pid else images), {h: pids for h in heads}

        return ds.map(to_model), int(steps)


FAMILY = Family(name="classifier", recipe=ClassifierRecipe, presets=PRESETS, task=ClassifierTask,
                serializables=("reid_keras.models.classifier", "reid_keras.models.oim", "reid_keras.losses",
                               "reid_keras.training.optimizers"))
