"""MSMT17 (V1 and V2), docs/datasets.md §3: the four list files define the splits.

Line format: `0000/0000_000_01_0303morning_0015_0.jpg 0`, a path relative to the image folder of
the split (train lists: `train/`, test lists: `test/`) and a label. camid = third `_` field of the
file name - 1. Test labels restart at 0 and would collide with training labels, so query and
gallery ids are offset by (largest train/val label + 1), recorded in `info`.
"""
from __future__ import annotations

import os

from reid_keras.data.datasets.base import (DatasetLayoutError, ImageRecord, ReidDataset, SkipReport,
                                           relabel, resolve_root)
from reid_keras.data.datasets.common import verify_counts, split_counts
from reid_keras.data.imagefiles import probe_image_file

NUM_CAMS = 15
LISTS = ("list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt")
# (train folder, test folder) of V1 and V2 (faces blurred).
IMAGE_DIRS = (("train", "test"), ("mask_train_v2", "mask_test_v2"))
CANDIDATES = ("MSMT17_V1", "MSMT17_V2", "msmt17", os.path.join("msmt17", "MSMT17_V1"),
              os.path.join("msmt17", "MSMT17_V2"))
LAYOUT = """MSMT17_V1/                              (or MSMT17_V2/ with mask_train_v2/, mask_test_v2/)
  train/<id>/*.jpg   test/<id>/*.jpg
  list_train.txt  list_val.txt  list_query.txt  list_gallery.txt
  line: "0000/0000_000_01_0303morning_0015_0.jpg 0" (path relative to train/ or test/, label)"""

# docs/datasets.md §3. The published train count covers list_train + list_val together, so that sum
# is checked whatever `use_val` says.
EXPECTED_COUNTS = {
    "train+val list images": 32621, "train ids": 1041,
    "query images": 11659, "query ids": 3060,
    "gallery images": 82161, "gallery ids": 3060,
}

_BAD_LINE = "unparseable list line (expected '<relative path> <label>')"


def parse_camid(name: str):
    """0-based camera from the third `_` field of a basename, or a skip reason."""
    fields = name.split("_")
    if len(fields) < 3 or not fields[2].isdigit():
        return "unparseable file name (expected <id>_<n>_<camera>_..., e.g. 0000_000_01_0303morning_0015_0.jpg)"
    cam = int(fields[2])
    if not 1 <= cam <= NUM_CAMS:
        return f"camera number outside 1-{NUM_CAMS}"
    return cam - 1


def read_list(list_path: str, image_dir: str, skipped: SkipReport) -> list:
    """Records `(path, label, camid)` of one list file; bad lines and files are counted skips."""
    records = []
    with open(list_path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            parts = line.split()
            if not parts:
                continue
            where = f"{list_path}:{number}"
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                skipped.add(_BAD_LINE, where)
                continue
            camid = parse_camid(os.path.basename(parts[0]))
            if isinstance(camid, str):
                skipped.add(camid, where)
                continue
            path = os.path.join(image_dir, parts[0])
            if not os.path.isfile(path):
                skipped.add("listed image missing on disk", path)
                continue
            reason = probe_image_file(path)
            if reason is not None:
                skipped.add(reason, path)
                continue
            records.append(ImageRecord(os.path.abspath(path), int(parts[1]), camid))
    return records


def _image_dirs(folder: str) -> tuple:
    for train_dir, test_dir in IMAGE_DIRS:
        if os.path.isdir(os.path.join(folder, train_dir)) and os.path.isdir(os.path.join(folder, test_dir)):
            return os.path.join(folder, train_dir), os.path.join(folder, test_dir)
    raise DatasetLayoutError(f"no image folders 'train/' and 'test/' (V1) or 'mask_train_v2/' and "
                             f"'mask_test_v2/' (V2) under {folder}: expected the layout\n{LAYOUT}")


def load(root: str, strict: bool | None = None, use_val: bool = False) -> ReidDataset:
    """Load MSMT17 from the unpacked folder or its parent.

    Args:
        root: `MSMT17_V1/` (or V2) or a folder containing it.
        strict: compare with the published counts: None = only for a full-looking copy.
        use_val: also train on `list_val.txt` (papers quoting 32,621 training images do).

    Raises:
        DatasetLayoutError, DatasetCountError.
    """
    folder = resolve_root(root, CANDIDATES, LISTS, LAYOUT)
    train_dir, test_dir = _image_dirs(folder)
    skipped = SkipReport()
    lists = {}
    for list_name, image_dir in zip(LISTS, (train_dir, train_dir, test_dir, test_dir)):
        lists[list_name] = read_list(os.path.join(folder, list_name), image_dir, skipped)
    for list_name in ("list_train.txt", "list_query.txt", "list_gallery.txt"):
        if not lists[list_name]:
            raise DatasetLayoutError(f"{os.path.join(folder, list_name)} lists no usable image; "
                                     f"expected the layout\n{LAYOUT}")

    train_val = lists["list_train.txt"] + lists["list_val.txt"]
    offset = max(r.pid for r in train_val) + 1
    train, train_id_map = relabel(train_val if use_val else lists["list_train.txt"])
    query = [ImageRecord(r.path, r.pid + offset, r.camid) for r in lists["list_query.txt"]]
    gallery = [ImageRecord(r.path, r.pid + offset, r.camid) for r in lists["list_gallery.txt"]]
    info = {
        "version": "V2" if train_dir.endswith("mask_train_v2") else "V1",
        "list_val used for training": bool(use_val),
        "test id offset": offset,
        "train list images": len(lists["list_train.txt"]),
        "val list images": len(lists["list_val.txt"]),
    }
    dataset = ReidDataset(name="msmt17", root=folder, train=train, query=query, gallery=gallery,
                          train_id_map=train_id_map, skipped=skipped, info=info)
    found = split_counts(dataset)
    found["train+val list images"] = len(train_val)
    found["train ids"] = len({r.pid for r in train_val})
    verify_counts("msmt17", found, EXPECTED_COUNTS, strict)
    return dataset
