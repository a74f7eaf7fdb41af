"""Market-1501 (+ the optional 500k distractor folder), docs/datasets.md §1.

Also holds the "Market rules" shared with DukeMTMC-reID and the CUHK03 image-folder release:
the basename regex `^(-?\\d+)_c(\\d)`, junk (-1) dropped, distractors (0000) kept in the gallery
as pid 0, training labels dense over the sorted training ids.

The optional `gt_bbox/` folder (hand-drawn boxes) feeds the multi-query protocol (docs/datasets.md §1):
its boxes of the queries' (id, camera) pairs are the records of the dataset's `multi_query` protocol.
"""
from __future__ import annotations

import os
import re

from reid_keras.data.datasets.base import (DatasetLayoutError, EvaluationProtocol, ImageRecord, ReidDataset,
                                           SkipReport, relabel, resolve_root)
from reid_keras.data.datasets.common import scan_split_folder, split_counts, verify_counts

NAME_RE = re.compile(r"^(-?\d+)_c(\d)")
JUNK_PID = -1
DISTRACTOR_PID = 0

CANDIDATES = ("Market-1501-v15.09.15", "Market-1501", "market1501",
              os.path.join("market1501", "Market-1501-v15.09.15"))
REQUIRED = ("bounding_box_train", "bounding_box_test", "query")
LAYOUT = """Market-1501-v15.09.15/
  bounding_box_train/  0002_c1s1_000451_03.jpg ...  (12,936 images)
  bounding_box_test/   0000_c1s1_000151_01.jpg ...  (19,732 images, incl. junk -1 and distractors 0000)
  query/               0001_c1s1_001051_00.jpg ...  (3,368 images)
  gt_bbox/             0001_c1s1_001051_00.jpg ...  (25,259 hand-drawn boxes; optional, for multi-query)"""

# docs/datasets.md §1 table; module-level so tests can substitute small numbers.
EXPECTED_COUNTS = {
    "train images": 12936, "train ids": 751,
    "query images": 3368, "query ids": 750,
    "gallery images": 15913, "gallery ids": 751,  # 750 test ids + pid 0
    "gallery junk dropped": 3819,
}
EXPECTED_500K = {"500k distractor images": 500000}

_BAD_NAME = "unparseable file name (expected <pid>_c<camera>..., e.g. 0002_c1s1_000451_03.jpg)"


def parse_name(name: str, num_cams: int):
    """`(pid, camid)` from a basename, or a skip reason string. camid is 0-based."""
    match = NAME_RE.match(name)
    if match is None:
        return _BAD_NAME
    pid, cam = int(match.group(1)), int(match.group(2))
    if not 1 <= cam <= num_cams:
        return f"camera number outside 1-{num_cams}"
    if pid < JUNK_PID:
        return "negative person id other than -1"
    return pid, cam - 1


def read_market_split(folder: str, num_cams: int, skipped: SkipReport, layout: str) -> list:
    """All parseable records of one split folder, pids as in the names (junk included)."""
    records = []
    for path in scan_split_folder(folder, skipped, layout):
        # Only the basename: a parent folder like `exp1_c2/` must not leak into the parse.
        parsed = parse_name(os.path.basename(path), num_cams)
        if isinstance(parsed, str):
            skipped.add(parsed, path)
        else:
            records.append(ImageRecord(path, parsed[0], parsed[1]))
    return records


def load_market_style(folder: str, name: str, num_cams: int, layout: str) -> ReidDataset:
    """Load `bounding_box_train/`, `bounding_box_test/`, `query/` of `folder` with Market rules."""
    skipped = SkipReport()
    train_all = read_market_split(os.path.join(folder, "bounding_box_train"), num_cams, skipped, layout)
    gallery_all = read_market_split(os.path.join(folder, "bounding_box_test"), num_cams, skipped, layout)
    query_all = read_market_split(os.path.join(folder, "query"), num_cams, skipped, layout)

    # Junk and distractors are test-side notions; neither may become a training class.
    train, train_id_map = relabel(r for r in train_all if r.pid > DISTRACTOR_PID)
    query = [r for r in query_all if r.pid > DISTRACTOR_PID]
    gallery = [r for r in gallery_all if r.pid != JUNK_PID]
    info = {
        "gallery junk dropped": len(gallery_all) - len(gallery),
        "gallery distractors (pid 0)": sum(r.pid == DISTRACTOR_PID for r in gallery),
    }
    if len(train) != len(train_all):
        info["train junk/distractors dropped"] = len(train_all) - len(train)
    if len(query) != len(query_all):
        info["query junk/distractors dropped"] = len(query_all) - len(query)
    return ReidDataset(name=name, root=folder, train=train, query=query, gallery=gallery,
                       train_id_map=train_id_map, skipped=skipped, info=info)


def load_multi_query(dataset: ReidDataset, num_cams: int, layout: str) -> None:
    """Declare the `multi_query` protocol (docs/datasets.md §1) with the boxes of `<root>/gt_bbox/`.

    Kept: boxes of a real id (pid > 0) whose (pid, camid) is that of some query, in file order;
    unparseable names go to the skip report. A missing or empty folder is not an error: the
    dataset then declares no multi-query protocol and `dataset.info` says so in one entry.
    """
    folder = os.path.join(dataset.root, "gt_bbox")
    if not os.path.isdir(folder):
        dataset.info["gt_bbox"] = "no gt_bbox/ folder: no multi-query evaluation"
        return
    try:
        records = read_market_split(folder, num_cams, dataset.skipped, layout)
    except DatasetLayoutError:  # a folder without usable images: skips are already counted
        dataset.info["gt_bbox"] = "gt_bbox/ holds no usable images: no multi-query evaluation"
        return
    wanted = {(r.pid, r.camid) for r in dataset.query}
    kept = tuple(r for r in records if r.pid > DISTRACTOR_PID and (r.pid, r.camid) in wanted)
    if kept:
        dataset.protocols = (*dataset.protocols, EvaluationProtocol("multi_query", records=kept))
    covered = {(r.pid, r.camid) for r in kept}
    dataset.info["gt_bbox images read"] = len(records)
    dataset.info["gt_bbox images kept for multi-query (query ids and cameras)"] = len(kept)
    dataset.info["queries with no gt_bbox image of their id and camera"] = sum(
        (r.pid, r.camid) not in covered for r in dataset.query)


def load_distractors(folder: str, skipped: SkipReport) -> list:
    """Every image under `folder` as pid 0, camid -1; names are not parsed (docs/datasets.md §1)."""
    layout = f"{folder}/  the unpacked 500k distractor images (any names, subfolders allowed)"
    paths = scan_split_folder(folder, skipped, layout, recursive=True)
    return [ImageRecord(p, DISTRACTOR_PID, -1) for p in paths]


def load(root: str, strict: bool | None = None, distractors_dir: str | None = None) -> ReidDataset:
    """Load Market-1501 from the unpacked folder or its parent.

    Args:
        root: `Market-1501-v15.09.15/` or a folder containing it.
        strict: compare with the published counts: None = only for a full-looking copy.
        distractors_dir: optional folder of the 500k distractors, appended to the gallery.

    Raises:
        DatasetLayoutError, DatasetCountError.
    """
    folder = resolve_root(root, CANDIDATES, REQUIRED, LAYOUT)
    dataset = load_market_style(folder, "market1501", num_cams=6, layout=LAYOUT)
    found = split_counts(dataset)
    found["gallery junk dropped"] = dataset.info["gallery junk dropped"]
    verify_counts("market1501", found, EXPECTED_COUNTS, strict)
    load_multi_query(dataset, num_cams=6, layout=LAYOUT)
    if distractors_dir is not None:
        extra = load_distractors(distractors_dir, dataset.skipped)
        verify_counts("market1501 500k distractors", {"500k distractor images": len(extra)},
                      EXPECTED_500K, strict)
        dataset.gallery.extend(extra)
        dataset.info["distractors_dir"] = os.path.abspath(distractors_dir)
        dataset.info["500k distractors added (pid 0, camid -1)"] = len(extra)
    return dataset
