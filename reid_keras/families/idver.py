"""The identification + verification family (identification_verification_embedding.txt): recipe, presets, task.

`resnet50_idver`, `resnet50_id`, `resnet50_verif`, `vgg16_idver` and `caffenet_idver` follow §III-F:
224x224 (CaffeNet: 227x227) random crops of 256x256 images with mirroring, SGD (lr 0.001, 0.0001 for
the final 5 epochs), batch 48 (CaffeNet: 128) pairs, 75 (ResNet-50) / 65 (VGG16) / 155 (CaffeNet)
epochs, negatives:positives growing from 1:1 by x1.01 per epoch up to 4:1. Values the paper leaves
open are marked with where they come from. The model is `models/idver.py`; training feeds pairs with
both identities, evaluation ranks the shared embedding by cosine (§III-F "Testing").
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from reid_keras.data.augment import as_hw
from reid_keras.families.base import Family, Preset, Recipe, Task, check_numbers, finite, integer
from reid_keras.models.idver import LOSSES, VERIF_LOSSES

# Pedestrian-shaped crops for input_shape="person" (height x width), and the paper's square crop it replaces.
PERSON_IMAGE_SIZE = (256, 128)
PAPER_IMAGE_SIZE = (224, 224)
INPUT_SHAPES = ("square", "person")
# The numbers only this family reads (families/base.py NUMBER_RULES has the shared ones).
NUMBER_RULES = {
    "contrastive_margin": (lambda v: finite(v) and v > 0, "a finite number > 0"),
    "lr_drop_epochs": (lambda v: integer(v) and v >= 0, "an integer >= 0"),
    "lr_drop_factor": (lambda v: finite(v) and 0 < v <= 1, "a number in (0, 1]"),
}


@dataclasses.dataclass(frozen=True)
class IdVerRecipe(Recipe):
    """Recipe of an identification + verification run (defaults: §III-F)."""

    image_size: tuple = PAPER_IMAGE_SIZE  # §III-F random 224x224 crops (CaffeNet 227)
    optimizer: str = "sgd"  # §III-F mini-batch SGD
    learning_rate: float = 1e-3
    momentum: float = 0.9  # not in the paper; MatConvNet cnn_train's default
    weight_decay: Optional[float] = 5e-4  # not in the paper; MatConvNet cnn_train's default
    batch_size: int = 48  # pairs
    epochs: int = 75
    losses: str = "id+verif"  # Table II: "id+verif" (I+V), "id" (I), "verif" (V)
    verif_loss: str = "crossentropy"  # §III-D; "contrastive" is the §IV-B comparison
    contrastive_margin: float = 1.0  # not in the paper; on L2-normalised features (distances in 0..2)
    label_smoothing: float = 0.0  # not in the paper (plain cross-entropy, Eq. 2)
    loss_weights: Optional[dict] = None  # None: 0.5 / 0.5 / 1 (§III-F, models.idver.LOSS_WEIGHTS)
    # "square": the paper's 256x256 resize + 224x224 crop; "person": 256x128 crops from a 293x146
    # resize (same crop_scale), the pedestrian-shaped input later re-ID work uses.
    input_shape: str = "square"
    crop_scale: Optional[float] = 256 / 224  # §III-F resize to 256x256, random crop 224x224
    pooling: str = "avg"  # ResNet-50 pool5; Keras' VGG16 without top has no fc6/fc7 (4096-d)
    dropout: float = 0.5  # §III-F dropout before the final layers; rate not given
    lr_drop_epochs: int = 5  # §III-F 0.0001 for the final 5 epochs
    lr_drop_factor: float = 0.1
    pair_ratio: object = "idver"  # §III-F negatives:positives 1:1, x1.01 per epoch up to 4:1
    pairs_per_epoch: Optional[int] = None  # §III-F one pair per (shuffled) training image

    def __post_init__(self):
        super().__post_init__()
        check_numbers(self, NUMBER_RULES)
        if self.losses not in LOSSES:
            raise ValueError(f"--losses {self.losses!r}: expected one of {', '.join(LOSSES)}")
        if self.verif_loss not in VERIF_LOSSES:
            raise ValueError(f"--verif-loss {self.verif_loss!r}: expected one of {', '.join(VERIF_LOSSES)}")
        if not 0.0 <= float(self.label_smoothing or 0.0) < 1.0:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")


def idver_image_size(recipe: IdVerRecipe) -> tuple:
    """The training / test input size: `image_size`, or 256x128 for `input_shape="person"`.

    Raises:
        ValueError: unknown input_shape, or input_shape "person" with an image_size set to
            something other than the paper's 224x224 or 256x128 itself.
    """
    size = as_hw(recipe.image_size, "image_size")
    shape = recipe.input_shape
    if shape not in INPUT_SHAPES:
        raise ValueError(f"input_shape must be one of {', '.join(INPUT_SHAPES)}, got {shape!r}")
    if shape == "square":
        return size
    if size not in (PAPER_IMAGE_SIZE, PERSON_IMAGE_SIZE):
        raise ValueError(f"input_shape 'person' trains on {PERSON_IMAGE_SIZE[0]}x{PERSON_IMAGE_SIZE[1]} crops, but "
                         f"image_size is {size[0]}x{size[1]}: use input_shape 'square' to train at another size")
    return PERSON_IMAGE_SIZE


def crop_size(image_size, crop_scale) -> tuple | None:
    """The size images are resized to before the random `image_size` crop (None: no crop)."""
    if crop_scale in (None, 0, 1, 1.0):
        return None
    scale = float(crop_scale)
    if not scale > 1.0:
        raise ValueError(f"crop_scale must be > 1 (resize larger, then random-crop image_size), got {crop_scale!r}")
    return tuple(int(round(side * scale)) for side in image_size)


def _preset(backbone: str, losses: str, epochs: int, **values) -> Preset:
    # The quick CPU recipe on the synthetic data (weights none learn within ~6 minutes on 2 cores).
    quick = {"image_size": (64, 32), "batch_size": 16, "epochs": 6, "steps_per_epoch": 60, "optimizer": "adam",
             "learning_rate": 3e-4, "lr_drop_epochs": 1, "weight_decay": None}
    if backbone == "caffenet":  # CaffeNet needs >= 199 pixels a side (fc6 is a 6x6 window over pool5)
        quick["image_size"] = (227, 227)
    return Preset(IdVerRecipe(
        backbone=backbone,  # §III-B: CaffeNet, VGG16 or ResNet-50 without the final FC layer
        weights="imagenet",  # §III-B ImageNet pre-trained
        losses=losses, epochs=epochs,
        loss_weights={"id_a": 0.5, "id_b": 0.5, "verification": 1.0},  # §III-F
        augment={"flip": True},  # §III-F mirrored horizontally
        # §III-F subtracts the training set's mean image; ImageNet weights expect Keras' caffe means.
        preprocessing="caffe", **values), paper="identification_verification_embedding.txt", quick=quick)


PRESETS = {
    "resnet50_idver": _preset("resnet50", "id+verif", 75),
    "resnet50_id": _preset("resnet50", "id", 75),
    "resnet50_verif": _preset("resnet50", "verif", 75),
    "vgg16_idver": _preset("vgg16", "id+verif", 65),
    # §III-F for CaffeNet: 227x227 crops of 256x256, 128 pairs per batch, 155 epochs; its embedding is the
    # 4,096-d fc7 (models/caffenet.py builds fc6/fc7 as convolutions, so the global pooling keeps it).
    "caffenet_idver": _preset("caffenet", "id+verif", 155, image_size=(227, 227), crop_scale=256 / 227,
                              batch_size=128),
}


class IdVerTask(Task):
    """Siamese identification + verification network (pairs with identities in, dict of heads out)."""

    def __init__(self, recipe: IdVerRecipe, seed: int = 0):
        super().__init__(recipe, seed)
        self._image_size = idver_image_size(recipe)
        self._schedule = None

    @property
    def image_size(self) -> tuple:
        return self._image_size

    def output_names(self) -> list:
        """The model's output keys for this recipe (also the keys of the training targets)."""
        from reid_keras.models.idver import DISTANCE, ID_A, ID_B, VERIFICATION

        r = self.recipe
        names = [ID_A, ID_B] if r.losses in ("id+verif", "id") else []
        if r.losses in ("id+verif", "verif"):
            names.append(VERIFICATION if r.verif_loss == "crossentropy" else DISTANCE)
        return names

    def learning_rate(self):
        """A float, or the x`lr_drop_factor` drop for the last `lr_drop_epochs` epochs (§III-F)."""
        from reid_keras.training.optimizers import PerUpdate, learning_rate_schedule

        r = self.recipe
        drop = int(r.lr_drop_epochs or 0)
        if drop <= 0:
            return learning_rate_schedule(r.learning_rate, r.lr_schedule, accumulate_steps=r.accumulate_steps)
        # steps_per_epoch is known now when the recipe fixes it; else train_dataset sets it.
        rate = learning_rate_schedule(r.learning_rate, {"type": "epoch_step", "factor": r.lr_drop_factor,
                                                        "decay_epoch": max(int(r.epochs) - drop, 0)},
                                      r.steps_per_epoch, accumulate_steps=r.accumulate_steps)
        self._schedule = rate.schedule if isinstance(rate, PerUpdate) else rate
        return rate

    def build(self, num_train_ids: int):
        from reid_keras.models.idver import build_idver, compile_idver

        r = self.recipe
        model, info = build_idver(int(num_train_ids), r.backbone, self.image_size, weights=r.backbone_weights,
                                  losses=r.losses, verif_loss=r.verif_loss, dropout=r.dropout, pooling=r.pooling,
                                  return_weights_info=True)
        compile_idver(model, self.optimizer(self.learning_rate()), label_smoothing=float(r.label_smoothing or 0.0),
                      contrastive_margin=float(r.contrastive_margin), loss_weights=r.loss_weights,
                      jit_compile=r.jit_compile)
        return model, info.to_dict()

    def augment(self):
        """The AugmentConfig: the recipe's `augment` plus the resize-then-crop of `crop_scale`."""
        from reid_keras.data.augment import AugmentConfig

        options = dict(self.recipe.augment or {})
        crop = crop_size(self.image_size, self.recipe.crop_scale)
        if crop is not None:
            options["crop"] = crop
        return AugmentConfig(**options) if options else None

    def train_dataset(self, records, initial_epoch: int, epochs: int, global_batch: int, initial_step: int = 0):
        """Batches `((image_a, image_b), {output name: target})` from step `initial_step` of epoch
        `initial_epoch`, and the steps per epoch.

        Targets: `id_a` / `id_b` the pair's identities (0..K-1), `verification` / `distance` the
        `same` flag (1 = same person).
        """
        from reid_keras.data.pipelines import pair_dataset
        from reid_keras.data.samplers import PairRatioSchedule

        r = self.recipe
        schedule = PairRatioSchedule.idver() if r.pair_ratio == "idver" else PairRatioSchedule.fixed(float(r.pair_ratio))
        pairs = int(r.steps_per_epoch) * global_batch if r.steps_per_epoch else (r.pairs_per_epoch or len(records))
        ds = pair_dataset(records, self.image_size, global_batch, pairs_per_epoch=pairs, schedule=schedule,
                          preprocess=r.preprocessing, augment=self.augment(), seed=self.seed, epochs=epochs,
                          initial_epoch=initial_epoch, initial_step=initial_step, with_ids=True)
        source = {"id_a": "pid_a", "id_b": "pid_b", "verification": "same", "distance": "same"}
        names = self.output_names()
        ds = ds.map(lambda images, labels: (images, {name: labels[source[name]] for name in names}))
        steps = max(pairs // global_batch, 1)
        if self._schedule is not None:
            self._schedule.steps_per_epoch = steps  # before fit traces the train step
        return ds, steps


    @staticmethod
    def verifier(model):
        """The two-image (different, same) softmax view; None for the "id" and contrastive variants (their
        single (batch, 1) distance is not a pair probability)."""
        from reid_keras.models.idver import has_verification_head, verification_view

        return verification_view(model) if has_verification_head(model) else None


FAMILY = Family(name="idver", recipe=IdVerRecipe, presets=PRESETS, task=IdVerTask,
                serializables=("reid_keras.models.idver", "reid_keras.training.optimizers"))
