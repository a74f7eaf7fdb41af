"""Loaders of the re-ID and person-search benchmarks as they are unpacked on disk (docs/datasets.md §1-7).

    >>> from reid_keras.data.datasets import load_dataset
    >>> ds = load_dataset("market1501", "/data/market1501")      # doctest: +SKIP
    >>> print(ds.summary())                                      # doctest: +SKIP

Every loader takes `root` (the unpacked folder or its parent) and `strict` (compare with the
published counts: None = only when the copy looks complete, True = always, False = never), plus
its own keyword options:

| name | options |
| --- | --- |
| market1501 | distractors_dir=None |
| dukemtmc | - |
| msmt17 | use_val=False |
| cuhk01 | split="paper871" / "random100" / "half", split_index=0, seed=0, split_file=None, direction="A->B" |
| cuhk03 | box_type="labeled" / "detected", protocol="classic" / "new", split_index=0, cache_dir=None |
| cuhk_sysu | - (person search: `SearchDataset`, `search_protocol(50 ... 4000 or -1)`) |
| prw | multi_view=False (person search: `SearchDataset`, one gallery) |
| synthetic | layout="market1501" / "dukemtmc" / "cuhk01" (crops: num_ids=300) or "cuhk_sysu" / "prw" (scenes: train_scenes=500, test_scenes=250, scene_size=(400, 600) or "400x600", multi_view=False for prw), seed=0 (root defaults to `data`) |

The person-search loaders (cuhk_sysu, prw) return a `scenes.SearchDataset` (whole scenes with their
boxes, the queries, and the gallery of each query) instead of a `ReidDataset`.

The dataset remembers its options (`ReidDataset.options`): `load_dataset(ds.name, ds.root,
**ds.options)` loads it again.
"""
from __future__ import annotations

import importlib
import inspect

from reid_keras.data.datasets.base import ReidDataset

DATASET_NAMES = ("market1501", "dukemtmc", "msmt17", "cuhk01", "cuhk03", "cuhk_sysu", "prw", "synthetic")


def parse_options(pairs, flag: str = "--dataset-option") -> dict:
    """Command-line `key=value` loader options -> dict.

    Values are Python literals when they parse (3, True, None, "a"), JSON's true/false/null too,
    else kept as text (split=half). Raises ValueError naming the flag for an item without `=`.
    """
    import ast

    json_words = {"true": True, "false": False, "null": None}
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{flag} {pair!r}: expected key=value (KEY=VALUE, e.g. split=half)")
        try:
            options[key.strip()] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key.strip()] = json_words.get(value, value)
    return options


def _module(name: str):
    if name not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")
    # Imported on demand: the commands import this package and need one loader at most.
    return importlib.import_module(f"reid_keras.data.datasets.{name}")


def get_loader(name: str):
    """The `load(root, strict=None, **options)` function of dataset `name`."""
    return _module(name).load


def default_root(name: str):
    """Where dataset `name` lives when no root is given (a loader's DEFAULT_ROOT: `data` for the
    generated synthetic set), else None."""
    return getattr(_module(name), "DEFAULT_ROOT", None)


def load_dataset(name: str, root: str | None = None, strict: bool | None = None, **options) -> ReidDataset:
    """Load benchmark `name` from `root` (default: `default_root(name)`); `options` are the loader's.

    Raises:
        ValueError: unknown dataset name or option, or no root for a dataset that needs one.
        DatasetLayoutError: `root` does not hold the dataset's layout (names what is missing).
        DatasetCountError: a full-looking copy whose counts differ from the published ones.
    """
    loader = get_loader(name)
    accepted = [p for p in inspect.signature(loader).parameters if p not in ("root", "strict")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {', '.join(unknown)}; accepted: {', '.join(accepted) or 'none'}")
    root = default_root(name) if root is None else root
    if root is None:
        raise ValueError(f"data_root is required for dataset {name}: the folder where {name} is unpacked "
                         "(see data/README.md)")
    dataset = loader(root, strict=strict, **options)
    dataset.options = dict(options)
    return dataset
