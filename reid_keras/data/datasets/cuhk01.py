"""CUHK01, docs/datasets.md §4 (splits) and docs/protocols.md §(c).

`campus/NNNNIII.png`: identity NNNN, image III; images 1-2 are camera A, 3-4 camera B, so
`camid = (img - 1) // 2`. Identities are split, never images of one identity:

- `paper871`: ids ascending, the last 100 are the test ids (0872-0971 on the full set);
- `random100`: a seeded permutation, 100 test ids; 10 splits;
- `half`: a seeded permutation, 486 of 971 ids for test (the larger half); 10 splits.

Random splits are drawn once from `numpy.random.default_rng(seed)` and written, with the seed,
to a JSON split file; later loads (and other machines given the file) reuse it.
Query = the test ids' camera-A images, gallery = their camera-B images (`direction="B->A"`
swaps them); the dataset declares the `cuhk01_trials` protocol: the evaluator samples one image
per side for the single-shot trials of §(c).
"""
from __future__ import annotations

import json
import os
import re

import numpy as np

from reid_keras.data.datasets.base import (DatasetLayoutError, EvaluationProtocol, ImageRecord, ReidDataset,
                                           SkipReport, relabel, resolve_root)
from reid_keras.data.datasets.common import scan_split_folder, verify_counts
from reid_keras.io_utils import atomic_write_json

NAME_RE = re.compile(r"^(\d{4})(\d{3})\.[A-Za-z]+$")
SPLITS = ("paper871", "random100", "half")
NUM_RANDOM_SPLITS = 10
PAPER_TEST_IDS = 100
CANDIDATES = ("CUHK01", "cuhk01", os.path.join("cuhk01", "CUHK01"))
REQUIRED = ("campus",)
LAYOUT = """CUHK01/
  campus/0001001.png ... 0971004.png   (3,884 png = 971 ids x 4; images 1-2 camera A, 3-4 camera B)"""

EXPECTED_COUNTS = {"all images": 3884, "all ids": 971}

_BAD_NAME = "unparseable file name (expected 7 digits NNNNIII, e.g. 0001001.png)"


def parse_name(name: str):
    """`(pid, camid)` from a basename, or a skip reason."""
    match = NAME_RE.match(name)
    if match is None:
        return _BAD_NAME
    pid, img = int(match.group(1)), int(match.group(2))
    if not 1 <= img <= 4:
        return "image number outside 001-004"
    return pid, (img - 1) // 2


def num_test_ids(split: str, num_ids: int) -> int:
    """Test-set size: 100 (at most half the ids on small copies) or the larger half for `half`."""
    if split == "half":
        return num_ids - num_ids // 2
    return min(PAPER_TEST_IDS, num_ids - num_ids // 2)


def make_splits(ids: list, split: str, seed: int) -> list:
    """`[{'train': [...], 'test': [...]}, ...]`: one split for paper871, else 10 seeded ones."""
    ids = sorted(ids)
    n_test = num_test_ids(split, len(ids))
    if split == "paper871":
        return [{"train": ids[:-n_test], "test": ids[-n_test:]}]
    rng = np.random.default_rng(seed)
    splits = []
    for _ in range(NUM_RANDOM_SPLITS):
        perm = [int(i) for i in rng.permutation(ids)]
        splits.append({"train": sorted(perm[n_test:]), "test": sorted(perm[:n_test])})
    return splits


def default_split_file(folder: str, split: str, seed: int) -> str:
    return os.path.join(folder, f"cuhk01_splits_{split}_seed{seed}.json")


def load_or_make_splits(path: str, ids: list, split: str, seed: int) -> list:
    """Reuse the split file at `path` if present (checking it fits), else write it atomically."""
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as handle:
                stored = json.load(handle)
            splits, stored_ids = stored["splits"], stored["ids"]
            same = stored["split"] == split and stored["seed"] == seed
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DatasetLayoutError(f"split file {path} is unreadable ({err}); delete it to redraw") from err
        if not same:
            raise DatasetLayoutError(f"split file {path} holds split {stored['split']!r} seed {stored['seed']},"
                                     f" not {split!r} seed {seed}; pass another split_file")
        if sorted(stored_ids) != sorted(ids):
            raise DatasetLayoutError(
                f"split file {path} was drawn for {len(stored_ids)} ids, but {len(ids)} ids are on disk "
                "now; delete it to redraw the splits, or restore the images")
        return splits
    splits = make_splits(ids, split, seed)
    payload = {"dataset": "cuhk01", "split": split, "seed": seed, "ids": sorted(ids), "splits": splits,
               "rng": "numpy.random.default_rng(seed).permutation, test = first ids of each permutation"}
    try:
        atomic_write_json(path, payload, indent=1)
    except OSError as err:
        raise DatasetLayoutError(f"cannot write the split file {path} ({err}); pass split_file= a "
                                 "writable path (file or folder)") from err
    return splits


def load(root: str, strict: bool | None = None, split: str = "paper871", split_index: int = 0,
         seed: int = 0, split_file: str | None = None, direction: str = "A->B") -> ReidDataset:
    """Load CUHK01 with one identity split.

    Args:
        root: `CUHK01/` (holding `campus/`) or a folder containing it.
        strict: compare with the published counts: None = only for a full-looking copy.
        split: `paper871`, `random100` or `half`.
        split_index: which of the 10 random splits (0 for paper871).
        seed: seed of the random splits.
        split_file: JSON file (or a folder for it) to store/reuse random splits; default: next to
            `campus/` in the dataset folder.
        direction: `A->B` (query camera A, gallery camera B) or `B->A`.

    Raises:
        DatasetLayoutError, DatasetCountError, ValueError for bad options.
    """
    if split not in SPLITS:
        raise ValueError(f"cuhk01: unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    if direction not in ("A->B", "B->A"):
        raise ValueError(f"cuhk01: direction must be 'A->B' or 'B->A', got {direction!r}")
    n_splits = 1 if split == "paper871" else NUM_RANDOM_SPLITS
    if not 0 <= split_index < n_splits:
        raise ValueError(f"cuhk01: split_index {split_index} out of range for {split!r} (0..{n_splits - 1})")

    folder = resolve_root(root, CANDIDATES, REQUIRED, LAYOUT)
    skipped = SkipReport()
    records = []
    for path in scan_split_folder(os.path.join(folder, "campus"), skipped, LAYOUT):
        parsed = parse_name(os.path.basename(path))
        if isinstance(parsed, str):
            skipped.add(parsed, path)
        else:
            records.append(ImageRecord(path, parsed[0], parsed[1]))
    ids = sorted({r.pid for r in records})
    if len(ids) < 2:
        raise DatasetLayoutError(f"{os.path.join(folder, 'campus')} holds {len(ids)} identity; a split needs "
                                 f"at least 2: expected the layout\n{LAYOUT}")
    verify_counts("cuhk01", {"all images": len(records), "all ids": len(ids)}, EXPECTED_COUNTS, strict)

    info = {"split": split, "split_index": split_index, "direction": direction}
    if split == "paper871":
        chosen = make_splits(ids, split, seed)[0]
    else:
        if split_file is None:
            path = default_split_file(folder, split, seed)
        elif os.path.isdir(split_file):
            path = default_split_file(split_file, split, seed)
        else:
            path = split_file
        chosen = load_or_make_splits(path, ids, split, seed)[split_index]
        info.update({"seed": seed, "split_file": os.path.abspath(path)})
    test_ids = set(chosen["test"])
    info.update({"train ids": len(chosen["train"]), "test ids": len(test_ids)})

    train, train_id_map = relabel(r for r in records if r.pid not in test_ids)
    query_cam = 0 if direction == "A->B" else 1
    query = [r for r in records if r.pid in test_ids and r.camid == query_cam]
    gallery = [r for r in records if r.pid in test_ids and r.camid != query_cam]
    return ReidDataset(name="cuhk01", root=folder, train=train, query=query, gallery=gallery,
                       train_id_map=train_id_map, skipped=skipped, info=info,
                       protocols=(EvaluationProtocol("cuhk01_trials", {"direction": direction}),))
