"""Helpers shared by the benchmark loaders: scanning a split folder and the count check.

The count check follows docs/datasets.md §0: a copy that looks like the full benchmark must match the
published counts; a small custom subset (or the synthetic data) is not checked.
"""
from __future__ import annotations

import os

from reid_keras.data.datasets.base import DatasetLayoutError, ReidDataset, SkipReport, check_counts
from reid_keras.data.imagefiles import list_image_files

# strict=None checks the counts once any split holds at least this share of its published images.
AUTO_CHECK_FRACTION = 0.5


def scan_split_folder(folder: str, skipped: SkipReport, layout: str, recursive: bool = False) -> list:
    """Usable image paths in `folder`; a clear DatasetLayoutError when it has none."""
    if not os.path.isdir(folder):
        raise DatasetLayoutError(f"no folder {folder!r}: expected the layout\n{layout}")
    before = skipped.total
    paths = list_image_files(folder, skipped, recursive=recursive)
    if not paths:
        dropped = skipped.total - before
        detail = f" ({dropped} file(s) skipped as unusable: see the skip report)" if dropped else ""
        raise DatasetLayoutError(f"folder {folder!r} holds no usable image files{detail}; "
                                 f"expected the layout\n{layout}")
    return paths


def split_counts(dataset: ReidDataset) -> dict:
    """`{'train images': n, 'train ids': m, ...}` for the three splits of `dataset`."""
    found = {}
    for split, ids, images, _ in dataset.split_stats():
        found[f"{split} images"] = images
        found[f"{split} ids"] = ids
    return found


def verify_counts(name: str, found: dict, expected: dict, strict: bool | None) -> bool:
    """Run `check_counts` when asked to (True), never (False) or for a full-looking copy (None).

    The copy looks full when some `'<x> images'` entry reaches AUTO_CHECK_FRACTION of its
    published value. Returns whether the check ran.
    """
    if strict is None:
        strict = any(found.get(k, 0) >= AUTO_CHECK_FRACTION * v
                     for k, v in expected.items() if k.endswith("images"))
    check_counts(name, found, expected, bool(strict))
    return bool(strict)
