"""A run's configuration: the preset's recipe, the chosen recipe ("default" or "paper"), the user's overrides,
and where the data and the run folder are. It is written to the run folder as `config.json` (flat,
readable JSON) and read back from it to resume, refusing keys it does not know by name.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Optional

from reid_keras.families import get_preset
from reid_keras.families.base import Family, Recipe

# Keys of config.json that are the run's, not the recipe's.
RUN_KEYS = ("family", "paper", "model", "recipe", "dataset", "data_root", "dataset_options", "seed",
            "mixed_precision", "output", "resume", "devices")
# Keys that may change between a run and its resumption without invalidating the saved state (how often it
# is saved included).
RESUMABLE_CHANGES = frozenset({"epochs", "resume", "output", "devices", "checkpoint_every_minutes",
                               "checkpoint_every_steps"})


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one training run needs. `recipe` holds the family's training values."""

    family: Family
    model: str  # the preset name
    recipe: Recipe
    recipe_name: str = "default"
    paper: str = ""
    dataset: str = "synthetic"
    data_root: Optional[str] = None
    dataset_options: dict = dataclasses.field(default_factory=dict)
    seed: int = 0
    mixed_precision: bool = False
    output: str = "runs"
    resume: bool = False
    devices: Optional[str] = None

    def task(self):
        """The family's trainer task for this run."""
        return self.family.task(self.recipe, self.seed)

    def flat(self) -> dict:
        """The recipe's keys and the run's in one dict (config.json's content before JSON encoding)."""
        run = {"family": self.family.name, "paper": self.paper, "model": self.model, "recipe": self.recipe_name,
               "dataset": self.dataset, "data_root": self.data_root, "dataset_options": dict(self.dataset_options),
               "seed": self.seed, "mixed_precision": self.mixed_precision, "output": self.output,
               "resume": self.resume, "devices": self.devices}
        return {**self.recipe.to_dict(), **run}

    def to_json(self) -> dict:
        """config.json's content: `flat()` as JSON stores it (tuples become lists)."""
        return json.loads(json.dumps(self.flat(), default=str))

    def changes_from(self, previous: dict) -> dict:
        """{key: (previous value, this value)} of the keys of an earlier config.json that differ from this
        run's, apart from RESUMABLE_CHANGES and the `runtime_*` facts a run records."""
        earlier, now = config_from_json(previous).to_json(), self.to_json()
        return {k: (earlier.get(k), now.get(k)) for k in sorted(set(earlier) | set(now))
                if k not in RESUMABLE_CHANGES and earlier.get(k) != now.get(k)}


def resolve_config(model: str, recipe: str = "default", overrides: Optional[dict] = None, **settings) -> RunConfig:
    """The run of preset `model` with recipe `recipe` ("default" | "paper"), `overrides` (recipe keys) and the
    run settings (`dataset`, `data_root`, `dataset_options`, `seed`, ...) as keyword arguments.

    Raises:
        ValueError: unknown preset, recipe or recipe key (named).
    """
    family, preset = get_preset(model)
    values = preset.resolve(recipe).replace(source=f"preset {model}", **(overrides or {}))
    settings["dataset_options"] = family.default_dataset_options(settings.get("dataset", "synthetic"),
                                                                 settings.get("dataset_options"))
    return RunConfig(family=family, model=model, recipe=values, recipe_name=recipe, paper=preset.paper, **settings)


def config_from_json(data: dict, source: str = "config.json") -> RunConfig:
    """The RunConfig an earlier run wrote (today's or an older reid_keras's): keys it lacks take the preset's
    value, keys it has that no recipe or run knows are refused, naming them and `source`."""
    data = {k: v for k, v in data.items() if not k.startswith("runtime_")}
    data.pop("family", None)
    data.pop("paper", None)
    if "synthetic_ids" in data:  # written by reid_keras before synthetic became a dataset with options
        ids = data.pop("synthetic_ids")
        if ids is not None:
            data["dataset_options"] = {"num_ids": ids, **(data.get("dataset_options") or {})}
    if "model" not in data:
        raise ValueError(f"{source}: no 'model' key; not a reid_keras run configuration")
    family, _ = get_preset(data["model"])
    recipe_keys = set(family.recipe.field_names())
    unknown = sorted(set(data) - recipe_keys - set(RUN_KEYS))
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)} for a {family.name} run; known keys: "
                         f"{', '.join(sorted(recipe_keys | set(RUN_KEYS)))}")
    settings = {k: data[k] for k in RUN_KEYS if k in data and k not in ("model", "recipe")}
    return resolve_config(data["model"], data.get("recipe", "default"),
                          {k: v for k, v in data.items() if k in recipe_keys}, **settings)
