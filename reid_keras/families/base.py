"""What a model family is: a typed recipe, named presets, a trainer task, and the `Family` that ties them.

- `Recipe`: a frozen dataclass of everything a run's training reads, with its defaults in one place;
  each family subclasses it with its own fields. Unknown keys are refused with their name.
- `Preset`: a named recipe (the paper's values) plus the overrides of the quick "default" recipe.
- `Task`: how the trainer (`training/runner.py`) builds, feeds, evaluates and exports the model;
  the base class holds what every family shares (compiling through `training.optimizers`, the
  embedding evaluation, the export).
- `Family`: the one declaration the registry (`families/__init__.py`) lists.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import os
from typing import Mapping, Optional

from reid_keras.data.augment import AugmentConfig, as_hw

RECIPES = ("default", "paper")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The training recipe every family reads. Steps count optimizer updates; `batch_size` is global.

    `accumulate_steps` feeds each batch as that many micro-batches and averages their gradients into
    one update (about 1/N of the activation memory). `lr_schedule` is a dict for
    `training.optimizers.learning_rate_schedule`. `momentum` / `nesterov` are SGD's.
    `checkpoint_every_minutes` / `checkpoint_every_steps` (None: off) write the resume state inside
    an epoch (and during an identity warm-up) besides every epoch end: a kill loses at most that much
    work. Numbers are checked by `NUMBER_RULES` (a recipe of any family), naming the key and value.
    """

    backbone: object = "resnet50"  # a `backbones.build_backbone` name, or a ready no-top keras.Model
    weights: Optional[str] = "imagenet"
    image_size: tuple = (256, 128)
    preprocessing: str = "caffe"
    augment: Optional[dict] = None
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: Optional[float] = None
    lr_schedule: Optional[dict] = None
    batch_size: int = 32
    epochs: int = 1
    steps_per_epoch: Optional[int] = None
    accumulate_steps: int = 1
    jit_compile: bool = False
    checkpoint_every_minutes: Optional[float] = 2.0  # a kill loses at most ~2 minutes of work
    checkpoint_every_steps: Optional[int] = None

    def __post_init__(self):
        check_numbers(self)
        self._set("image_size", as_hw(self.image_size, "image_size"))
        if self.augment:
            AugmentConfig(**self.augment)  # unknown keys / bad values fail here, not in the first epoch
        from reid_keras.training.optimizers import micro_batch_size

        micro_batch_size(int(self.batch_size), int(self.accumulate_steps))  # divides, before any work

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)  # normalising a frozen dataclass's field in __post_init__

    @classmethod
    def field_names(cls) -> tuple:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, source: str = "", **values) -> "Recipe":
        """A copy with `values` changed; a key that is not a field is refused, naming it and `source`."""
        unknown = sorted(set(values) - set(self.field_names()))
        if unknown:
            where = f"{source}: " if source else ""
            raise ValueError(f"{where}unknown recipe key(s) {', '.join(unknown)} for a {type(self).__name__}; "
                             f"known keys: {', '.join(self.field_names())}")
        return dataclasses.replace(self, **values)

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.field_names()}

    @property
    def backbone_weights(self):
        """`weights` as `build_backbone` takes it: None for "none"."""
        return None if str(self.weights).lower() in ("none", "null") else self.weights

    def augment_config(self) -> Optional[AugmentConfig]:
        return AugmentConfig(**self.augment) if self.augment else None


def finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# Recipe key -> (test, what the value must be), for the keys several families share; a family checks its own
# keys with `check_numbers(recipe, ITS_RULES)`. A key applies to every recipe that has it; None is accepted
# where the rule says "or None". Checked in `Recipe.__post_init__`.
NUMBER_RULES = {
    "learning_rate": (lambda v: finite(v) and v > 0, "a finite number > 0"),
    "id_warmup_lr": (lambda v: finite(v) and v > 0, "a finite number > 0"),
    "momentum": (lambda v: finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "weight_decay": (lambda v: v is None or (finite(v) and v >= 0), "a finite number >= 0 or None"),
    "batch_size": (lambda v: integer(v) and v >= 1, "an integer >= 1"),
    "epochs": (lambda v: integer(v) and v >= 0, "an integer >= 0"),
    "steps_per_epoch": (lambda v: v is None or (integer(v) and v >= 1), "an integer >= 1 or None"),
    "accumulate_steps": (lambda v: integer(v) and v >= 1, "an integer >= 1"),
    "checkpoint_every_minutes": (lambda v: v is None or (finite(v) and v > 0), "a finite number > 0 or None"),
    "checkpoint_every_steps": (lambda v: v is None or (integer(v) and v >= 1), "an integer >= 1 or None"),
    "id_warmup_steps": (lambda v: integer(v) and v >= 0, "an integer >= 0"),
    "dropout": (lambda v: finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "label_smoothing": (lambda v: finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "feature_dim": (lambda v: v is None or (integer(v) and v >= 1), "an integer >= 1 or None"),
    "pairs_per_epoch": (lambda v: v is None or (integer(v) and v >= 1), "an integer >= 1 or None"),
    "pair_ratio": (lambda v: v == "idver" or (finite(v) and v > 0), "a finite number > 0 or 'idver'"),
}


def margin(value) -> bool:
    """A positive margin, also as the command line's text ("0.3"), or "soft"."""
    if isinstance(value, str):
        if value.strip().lower() == "soft":
            return True
        try:
            value = float(value)
        except ValueError:
            return False
    return finite(value) and value > 0


def check_numbers(recipe, rules=None) -> None:
    """Refuse a recipe whose numeric values are out of range (a learning rate of -1, a batch of 0, an inf
    weight decay), naming the key, what it must be and the value; keys a recipe lacks are skipped.
    `rules` (default `NUMBER_RULES`) maps a key to (test, expectation)."""
    for key, (valid, expected) in (NUMBER_RULES if rules is None else rules).items():
        if hasattr(recipe, key) and not valid(getattr(recipe, key)):
            raise ValueError(f"{key} must be {expected}, got {getattr(recipe, key)!r}")


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named model: the paper's recipe (`--preset paper`) and the overrides of the quick CPU recipe
    (`--preset default`, sized for the synthetic data)."""

    recipe: Recipe
    paper: str
    quick: Mapping = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        self.recipe.replace(source=f"quick recipe of {self.paper}", **self.quick)  # unknown keys fail at import

    def resolve(self, recipe: str = "default") -> Recipe:
        """The recipe's values (a deep copy: callers may change its dicts without changing the preset)."""
        if recipe not in RECIPES:
            raise ValueError(f"recipe {recipe!r}: expected one of {', '.join(RECIPES)}")
        return copy.deepcopy(self.recipe if recipe == "paper" else self.recipe.replace(**self.quick))


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family, declared once (ARCHITECTURE.md, "How a family plugs in").

    Attributes:
        name: the family's name, recorded in config.json.
        recipe: its `Recipe` subclass.
        presets: preset name -> `Preset`.
        task: its `Task` subclass.
        serializables: modules that register the layers, losses and schedules its `.keras` files name.
        data: what it trains on: "crops" (a `ReidDataset`) or "scenes" (a person-search `SearchDataset`).
    """

    name: str
    recipe: type
    presets: Mapping
    task: type
    serializables: tuple = ()
    data: str = "crops"

    def default_dataset_options(self, dataset: str, options: dict) -> dict:
        """`options` completed for this family: the synthetic data of a scene family is the synthetic
        CUHK-SYSU scenes unless a layout is given (the crop layouts are the synthetic default)."""
        options = dict(options or {})
        if dataset == "synthetic" and self.data == "scenes":
            options.setdefault("layout", "cuhk_sysu")
        return options

    def endpoints(self, model) -> tuple:
        """The SavedModel endpoints of `model`: a scene family's `detect` and `embed_query`; a crop
        family's "embed", and "verify" when the task has a pair view of it."""
        if self.data == "scenes":
            return ("detect", "embed_query")
        return ("embed", "verify") if self.task.verifier(model) is not None else ("embed",)

    def check_dataset(self, dataset, model: str) -> None:
        """Refuse a dataset of the other kind (crops vs scenes), naming both, before any work is done."""
        kind = dataset.kind
        if kind != self.data:
            what = {"crops": "person crops (a re-ID dataset)", "scenes": "whole scenes with boxes (a person-search dataset)"}
            raise ValueError(f"dataset {dataset.name!r} holds {what[kind]}, but model {model!r} (family {self.name}) "
                             f"trains on {what[self.data]}")



class Task:
    """How the trainer builds, feeds, evaluates and exports one family's model.

    Subclasses implement `build(num_train_ids) -> (compiled keras.Model, weights info dict)` (called in
    the strategy scope) and `train_dataset(records, initial_epoch, epochs, global_batch, initial_step=0)
    -> (tf.data.Dataset of whole batches, steps per epoch)`: the stream starts after `initial_step`
    batches of epoch `initial_epoch` (a resumed run) and must give, from there on, exactly the batches
    and augmentation seeds of an uninterrupted run (`data.pipelines` streams are addressed by epoch and
    step). The runner cuts the batches into micro-batches when the recipe accumulates gradients.
    """

    def __init__(self, recipe: Recipe, seed: int = 0):
        self.recipe, self.seed = recipe, int(seed)

    @property
    def image_size(self) -> tuple:
        return self.recipe.image_size

    def optimizer(self, learning_rate=None):
        """The recipe's optimizer (`training.optimizers`), on `learning_rate` or the recipe's schedule."""
        from reid_keras.training.optimizers import learning_rate_schedule, make_optimizer

        r = self.recipe
        if learning_rate is None:
            learning_rate = learning_rate_schedule(r.learning_rate, r.lr_schedule, accumulate_steps=r.accumulate_steps)
        return make_optimizer(r.optimizer, learning_rate, momentum=r.momentum, nesterov=r.nesterov,
                              weight_decay=r.weight_decay, accumulate_steps=r.accumulate_steps)

    def check_batch_slices(self, num_replicas: int) -> None:
        """Refuse a batch layout the losses cannot take once split over `num_replicas` replicas (and
        `recipe.accumulate_steps` micro-batches); nothing to refuse by default."""

    def prepare(self, model, dataset, weights_info: dict, strategy, verbose, checkpoints=None) -> Optional[dict]:
        """Work before the first epoch (e.g. an identity warm-up); returns facts for config.json, or None when
        there was nothing to do. Never called again once the run's training state exists. `checkpoints`
        (a `training.snapshot.PhaseCheckpoints`, or None) is where long work saves its progress and finds
        the progress of an interrupted start."""
        return None

    def evaluate(self, model, dataset, run_dir: str, plots: bool = True) -> dict:
        """The model's "embedding" ranked by cosine: metrics, plots and features under run_dir/evaluation."""
        return {"embedding_cosine": evaluate_embedding(model, dataset, run_dir, self.recipe, self.seed, plots)}

    @staticmethod
    def format_metrics(metrics: dict) -> str:
        return markdown_table([("embedding, cosine", metrics["embedding_cosine"])])

    @staticmethod
    def verifier(model):
        """The two-image P(same person) view of `model` that the SavedModel's `verify` serves; None when the
        model has no verification head (it then serves `embed` only)."""
        return None

    def export(self, model, out_dir: str) -> None:
        """SavedModel with `embed` (the "embedding" sub-model) and, with a verification head, `verify`."""
        from reid_keras.models.saved_model import export_model

        export_model(model, out_dir, image_size=self.image_size, preprocessing=self.recipe.preprocessing,
                     verifier=self.verifier(model))


def evaluate_embedding(model, dataset, run_dir: str, recipe: Recipe, seed: int, plots: bool = True) -> dict:
    """`model`'s "embedding" ranked by cosine with the evaluation library, as `python -m reid_keras.evaluate`
    ranks the run's last.keras: the final model, the one the run exports (`best.keras` is the lowest
    training loss). Files go to run_dir/evaluation."""
    from reid_keras.metrics.evaluation import evaluate_model
    from reid_keras.metrics.options import EvaluationOptions
    from reid_keras.models.loading import EmbeddingModel
    from reid_keras.training.run_folder import FINAL_MODEL

    embedding = model.get_layer("embedding")
    wrapped = EmbeddingModel(embed_fn=lambda x: embedding(x, training=False), image_size=recipe.image_size,
                             preprocessing=recipe.preprocessing, source=os.path.join(run_dir, FINAL_MODEL),
                             kind="keras")
    return evaluate_model(wrapped, dataset, os.path.join(run_dir, "evaluation"),
                          EvaluationOptions(seed=seed, plots=plots), recipe.image_size)


def markdown_table(rows) -> str:
    """Rows `(ranking name, metrics dict)` as the markdown table the trainer prints."""
    lines = ["| ranking by | rank-1 | rank-5 | rank-10 | mAP | mINP |", "| --- | --- | --- | --- | --- | --- |"]
    for name, m in rows:
        lines.append(f"| {name} | {100 * m['rank1']:.1f} | {100 * m['rank5']:.1f} | {100 * m['rank10']:.1f} | "
                     f"{100 * m['mAP']:.1f} | {100 * m['mINP']:.1f} |")
    return "\n".join(lines)
