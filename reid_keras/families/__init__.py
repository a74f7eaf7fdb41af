"""The model families, each declared once (`families/<name>.py`), and what is derived from them: the preset
names, a preset's family, the modules to import before loading a `.keras` file.

A new family is one module with its `Recipe`, presets, `Task` and `FAMILY`, listed in `_MODULES` below
(ARCHITECTURE.md, "How to add a model family").
"""
from __future__ import annotations

import importlib

_MODULES = ("siamese", "idver", "classifier", "person_search")


def families() -> dict:
    """{name: Family} of every registered family, in registration order."""
    found = {}
    for module in _MODULES:
        family = importlib.import_module(f"reid_keras.families.{module}").FAMILY
        found[family.name] = family
    return found


def _lookup(table: dict, name: str, what: str, names):
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(names)}")
    return table[name]


def get_family(name: str):
    """The `Family` called `name` (ValueError listing the known ones otherwise)."""
    known = families()
    return _lookup(known, name, "model family", known)


def presets() -> dict:
    """{preset name: (Family, Preset)} over every family."""
    found = {}
    for family in families().values():
        for name, preset in family.presets.items():
            if name in found:
                raise ValueError(f"preset {name!r} is declared by two families: {found[name][0].name} and {family.name}")
            found[name] = (family, preset)
    return found


def get_preset(name: str):
    """`(Family, Preset)` of preset `name` (ValueError listing the known presets otherwise)."""
    known = presets()
    return _lookup(known, name, "preset", sorted(known))


def register_serializables() -> None:
    """Import the modules every family declares, so that its layers, losses and schedules deserialise
    (a fresh Python process knows none of them; Keras refuses unknown classes in safe mode)."""
    for family in families().values():
        for module in family.serializables:
            importlib.import_module(module)


def load_model(path: str, compile: bool = True):
    """`keras.saving.load_model` (safe mode) for a `.keras` file written by reid_keras, e.g. a run's
    `last.keras`, in any Python process: the families' layers, losses and schedules are registered first.
    A damaged file or NaN / inf weights raise `models.loading.ModelLoadError` naming the file."""
    from reid_keras.models.loading import load_keras_model

    register_serializables()
    return load_keras_model(path, compile=compile)
