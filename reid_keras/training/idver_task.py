"""Trainer task of the identification + verification family (identification_verification_embedding.txt).

Implements the trainer contract of `reid_keras.training.tasks` for presets with family "idver":
pairs with both identities from `pipelines.pair_dataset(..., with_ids=True)`, the model of
`models/idver.py`, evaluation of the shared embedding by cosine (§III-F "Testing"), export.

Config keys read (preset values, overridden by the recipe and CLI flags): backbone, weights,
image_size, input_shape ("square" | "person"), crop_scale, augment, preprocessing, pooling,
dropout, losses, verif_loss, contrastive_margin, label_smoothing, loss_weights, optimizer,
momentum, weight_decay, learning_rate, lr_drop_epochs, lr_drop_factor, epochs, pair_ratio,
pairs_per_epoch, steps_per_epoch, seed, jit_compile.
"""
from __future__ import annotations

from reid_keras.data.augment import as_hw
from reid_keras.training.tasks import EmbeddingEvaluation

# Pedestrian-shaped crops for input_shape="person" (height x width).
PERSON_IMAGE_SIZE = (256, 128)
# The paper's square crop, which input_shape="person" replaces.
PAPER_IMAGE_SIZE = (224, 224)
INPUT_SHAPES = ("square", "person")


def idver_image_size(config: dict) -> tuple:
    """The training / test input size: `image_size`, or 256x128 for `input_shape="person"`.

    Raises:
        ValueError: unknown input_shape, or input_shape "person" with an image_size set to
            something other than the paper's 224x224 or 256x128 itself.
    """
    size = as_hw(config.get("image_size", PAPER_IMAGE_SIZE), "image_size")
    shape = config.get("input_shape", "square")
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


class IdVerTask(EmbeddingEvaluation):
    """Siamese identification + verification network (pairs with identities in, dict of heads out)."""

    def __init__(self, config: dict):
        from reid_keras.models.idver import LOSSES, VERIF_LOSSES

        self.config = config
        self.image_size = idver_image_size(config)
        self.losses = config.get("losses", "id+verif")
        self.verif_loss = config.get("verif_loss", "crossentropy")
        if self.losses not in LOSSES:
            raise ValueError(f"--losses {self.losses!r}: expected one of {', '.join(LOSSES)}")
        if self.verif_loss not in VERIF_LOSSES:
            raise ValueError(f"--verif-loss {self.verif_loss!r}: expected one of {', '.join(VERIF_LOSSES)}")
        smoothing = float(config.get("label_smoothing") or 0.0)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"--label-smoothing must be in [0, 1), got {smoothing}")
        self._schedule = None

    # -- model ------------------------------------------------------------------------------
    def output_names(self) -> list:
        """The model's output keys for this config (also the keys of the training targets)."""
        from reid_keras.models.idver import DISTANCE, ID_A, ID_B, VERIFICATION

        names = [ID_A, ID_B] if self.losses in ("id+verif", "id") else []
        if self.losses in ("id+verif", "verif"):
            names.append(VERIFICATION if self.verif_loss == "crossentropy" else DISTANCE)
        return names

    def learning_rate(self):
        """A float, or a `StepDecayByEpoch` when `lr_drop_epochs` > 0 (paper: x0.1 for the last 5 epochs)."""
        from reid_keras.models.idver import StepDecayByEpoch

        c = self.config
        rate = float(c["learning_rate"])
        drop = int(c.get("lr_drop_epochs") or 0)
        if drop <= 0:
            return rate
        steps = c.get("steps_per_epoch")  # known now when the recipe fixes it; else set by train_dataset
        self._schedule = StepDecayByEpoch(rate, rate * float(c.get("lr_drop_factor", 0.1)),
                                          decay_epoch=max(int(c["epochs"]) - drop, 0),
                                          steps_per_epoch=int(steps) if steps else None)
        return self._schedule

    def build(self, num_train_ids: int):
        from reid_keras.models.idver import build_idver, compile_idver

        c = self.config
        weights = None if str(c.get("weights")).lower() in ("none", "null") else c.get("weights")
        model, info = build_idver(int(num_train_ids), c["backbone"], self.image_size, weights=weights,
                                  losses=self.losses, verif_loss=self.verif_loss, dropout=c.get("dropout", 0.5),
                                  pooling=c.get("pooling", "avg"), return_weights_info=True)
        compile_idver(model, learning_rate=self.learning_rate(), optimizer=c.get("optimizer", "sgd"),
                      momentum=c.get("momentum", 0.9), weight_decay=c.get("weight_decay"),
                      label_smoothing=float(c.get("label_smoothing") or 0.0),
                      contrastive_margin=float(c.get("contrastive_margin", 1.0)),
                      loss_weights=c.get("loss_weights"), jit_compile=c.get("jit_compile", False))
        return model, info.to_dict()

    # -- data -------------------------------------------------------------------------------
    def augment(self):
        """The AugmentConfig: the preset's `augment` plus the resize-then-crop of `crop_scale`."""
        from reid_keras.data.augment import AugmentConfig

        options = dict(self.config.get("augment") or {})
        crop = crop_size(self.image_size, self.config.get("crop_scale"))
        if crop is not None:
            options["crop"] = crop
        return AugmentConfig(**options) if options else None

    def train_dataset(self, records, initial_epoch: int, epochs: int, global_batch: int):
        """Batches `((image_a, image_b), {output name: target})` and the steps per epoch.

        Targets: `id_a` / `id_b` the pair's identities (0..K-1), `verification` / `distance` the
        `same` flag (1 = same person).
        """
        from reid_keras.data.pipelines import pair_dataset
        from reid_keras.data.samplers import PairRatioSchedule

        c = self.config
        ratio = c.get("pair_ratio", "idver")
        schedule = PairRatioSchedule.idver() if ratio == "idver" else PairRatioSchedule.fixed(float(ratio))
        pairs = c.get("pairs_per_epoch") or len(records)
        if c.get("steps_per_epoch"):
            pairs = int(c["steps_per_epoch"]) * global_batch
        ds = pair_dataset(records, self.image_size, global_batch, pairs_per_epoch=pairs, schedule=schedule,
                          preprocess=c["preprocessing"], augment=self.augment(), seed=c["seed"], epochs=epochs,
                          initial_epoch=initial_epoch, with_ids=True)
        source = {"id_a": "pid_a", "id_b": "pid_b", "verification": "same", "distance": "same"}
        names = self.output_names()
        ds = ds.map(lambda images, labels: (images, {name: labels[source[name]] for name in names}))
        steps = max(pairs // global_batch, 1)
        if self._schedule is not None:
            self._schedule.steps_per_epoch = steps  # before fit traces the train step
        return ds, steps

    # -- evaluation and export --------------------------------------------------------------
    def export(self, model, out_dir: str) -> None:
        """SavedModel with `embed` (and `verify` when the model has the softmax verification head).

        export_model serves `verify` for a two-image model with one pair-probability output, so the
        I+V and V models go through `verification_view`; the others (losses "id", verif_loss
        "contrastive") through `embedding_view`, a one-image model that export_model serves embed-only.
        """
        from reid_keras.export import export_model
        from reid_keras.models.idver import embedding_view, has_verification_head, verification_view

        target = verification_view(model) if has_verification_head(model) else embedding_view(model)
        export_model(target, out_dir, image_size=self.image_size, preprocessing=self.config["preprocessing"])
