"""CUHK-SYSU (PSDB) person search, docs/datasets.md §6 and docs/protocols.md (d).

`annotation/Images.mat` (key `Img`) lists every image with its boxes `x, y, w, h`; boxes with
`w <= 0` or `h <= 0` are dropped and counted. `annotation/pool.mat` names the 6,978 test scenes (the
gallery, in pool order); the training scenes are the other `Img` names, sorted. Identities are
assigned by looking up each identity box among its image's `Img` boxes (exactly equal integer
`[x, y, w, h]`; boxes not found are counted, 0 expected): training boxes get their identity's index
in `Train.mat` (dense labels 0..5,531), test boxes the query's index in `TestG50.mat` (0..2,899);
every other box is `UNLABELED`. Queries come from `TestG50.mat`, in file order.

`search_protocol(N)` reads `TestG<N>.mat` on first use (`gallery_sizes`: the N whose file exists,
plus -1 = TestG50's galleries followed by every other pool scene, pool order). A gallery name listed
twice is kept once (`SearchProtocol.duplicates`). The TestG files are read with `squeeze_me=True`:
TestG4000 holds 11.6 million entries; loadmat's defaults build three numpy arrays per entry (about
14 GB), squeezed it peaks at 4 GB and takes about 90 s on one CPU core.

    >>> ds = load_dataset("cuhk_sysu", "/data/CUHK-SYSU")          # doctest: +SKIP
    >>> ds.search_protocol(100).galleries[0][:5]                    # doctest: +SKIP
"""
from __future__ import annotations

import os
import zlib
from typing import NamedTuple

import numpy as np

from reid_keras.data.datasets.base import DatasetLayoutError, SkipReport, resolve_root
from reid_keras.data.datasets.common import verify_counts
from reid_keras.data.datasets.scenes import (UNLABELED, SearchDataset, SearchProtocol, SearchQuery, make_scene,
                                             xywh_to_corners)
from reid_keras.data.imagefiles import list_image_files

GALLERY_SIZES = (50, 100, 500, 1000, 2000, 4000)
FULL_SET = -1
IMAGES = os.path.join("annotation", "Images.mat")
POOL = os.path.join("annotation", "pool.mat")
PROTOCOL_DIR = os.path.join("annotation", "test", "train_test")
TRAIN = os.path.join(PROTOCOL_DIR, "Train.mat")
SCENE_DIR = os.path.join("Image", "SSM")
CANDIDATES = ("CUHK-SYSU", "cuhk_sysu", "cuhk-sysu", "PSDB", os.path.join("cuhk_sysu", "CUHK-SYSU"))
REQUIRED = (SCENE_DIR, IMAGES, POOL, TRAIN, os.path.join(PROTOCOL_DIR, "TestG50.mat"))
LAYOUT = """CUHK-SYSU/
  Image/SSM/s*.jpg                                  (18,184 scene images)
  annotation/Images.mat                             (key Img: every image and its boxes)
  annotation/pool.mat                               (key pool: the 6,978 test images)
  annotation/test/train_test/Train.mat              (key Train: 5,532 training identities)
  annotation/test/train_test/TestG50.mat            (key TestG50: 2,900 queries; also TestG100 ... TestG4000)"""

# docs/datasets.md §6 table; module-level so tests can substitute small numbers. The box counts
# (55,272 / 40,871) are reported in `info` but not enforced: whether they include the w/h <= 0
# boxes is not documented, and a correct copy must not fail to load over that.
EXPECTED_COUNTS = {"train images": 11206, "train ids": 5532, "test images": 6978, "queries": 2900}
REASON_MISSING = "listed in annotation/Images.mat but missing on disk"
# What scipy raises on a file that is not a MATLAB file, or a damaged one (MatReadError is a bare Exception).
MAT_READ_ERRORS = (ValueError, OSError, NotImplementedError, TypeError, KeyError, IndexError, EOFError, zlib.error)


def read_mat(path: str, key: str, layout: str = LAYOUT, **options):
    """`scipy.io.loadmat(path)[key]`; a DatasetLayoutError naming the file when it is missing,
    unreadable or lacks `key`."""
    import scipy.io

    if not os.path.isfile(path):
        raise DatasetLayoutError(f"no file {path!r}: expected the layout\n{layout}")
    try:
        mat = scipy.io.loadmat(path, variable_names=[key], **options)
    except (*MAT_READ_ERRORS, scipy.io.matlab.MatReadError) as err:
        raise DatasetLayoutError(f"cannot read {path} as a MATLAB file ({err.__class__.__name__}: {err})") from err
    if key not in mat:
        found = ", ".join(name for name, _, _ in scipy.io.whosmat(path)) or "none"
        raise DatasetLayoutError(f"{path} has no variable {key!r} (found: {found}); see docs/datasets.md")
    return mat[key]


def unwrap(value):
    """The content of MATLAB's 1x1 wrappers: a 1-element object array -> its element."""
    while isinstance(value, np.ndarray) and value.dtype == object and value.size == 1:
        value = value.ravel()[0]
    return value


def text(value) -> str:
    """A MATLAB string as loadmat returns it (`array(['s1.jpg'])`, or a str when squeezed)."""
    value = unwrap(value)
    if isinstance(value, np.ndarray):
        return str(value.ravel()[0]) if value.size else ""
    return str(value)


def xywh(value, where: str) -> np.ndarray:
    """An `idlocate` as int64 [x, y, w, h]; ValueError naming `where` for any other size (0 included)."""
    value = np.asarray(unwrap(value))
    if value.size != 4:
        raise ValueError(f"{where}: idlocate has {value.size} values, expected [x, y, w, h]")
    return value.astype(np.float64).ravel().astype(np.int64)


class ProtocolFile(NamedTuple):
    """One `TestG<N>.mat`, flattened: query q's gallery entries are `names[offsets[q]:offsets[q+1]]`;
    `boxed` are the entries with a non-empty idlocate, `boxes` their int64 [x, y, w, h]."""

    path: str
    query_names: list
    query_boxes: np.ndarray
    names: np.ndarray
    offsets: np.ndarray
    boxed: np.ndarray
    boxes: np.ndarray


def read_protocol_file(path: str, size: int) -> ProtocolFile:
    """Parse `TestG<size>.mat` (docs/datasets.md §6): loadmat (squeezed), then one flat array per field
    for all queries' gallery entries; only the non-empty idlocates (the positives) are visited one by one."""
    from operator import attrgetter

    key = f"TestG{size}"
    table = np.atleast_1d(read_mat(path, key, squeeze_me=True))
    try:
        queries = [unwrap(q) for q in table["Query"]]
        query_names = [text(q["imname"]) for q in queries]
        query_boxes = np.array([xywh(q["idlocate"], f"{path} query {i}") for i, q in enumerate(queries)],
                               np.int64).reshape(-1, 4)
        galleries = [np.atleast_1d(g) for g in table["Gallery"]]
        flat = np.concatenate(galleries) if galleries else np.zeros(0, [("imname", object), ("idlocate", object)])
        field_names = flat.dtype.names
        names = flat[field_names[0]]
        locs = flat[field_names[1]]
        sizes = np.fromiter(map(attrgetter("size"), map(np.asarray, locs)), np.int64, count=len(locs))
        boxed = np.flatnonzero(sizes)
        boxes = np.array([xywh(locs[i], f"{path} gallery entry {i}") for i in boxed], np.int64).reshape(-1, 4)
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise DatasetLayoutError(f"{path}: unexpected structure of {key} ({err}); expected per query a Query "
                                 "(imname, idlocate, ...) and a Gallery of (imname, idlocate, ishard) entries, "
                                 "docs/datasets.md §6") from err
    offsets = np.concatenate([[0], np.cumsum([len(g) for g in galleries])]).astype(np.int64)
    return ProtocolFile(path, query_names, query_boxes, names, offsets, boxed, boxes)


def check_same_queries(reference: ProtocolFile, other: ProtocolFile) -> None:
    """docs/datasets.md §6: the queries are in the same order in every TestG file."""
    if len(other.query_names) != len(reference.query_names):
        raise DatasetLayoutError(f"{other.path} has {len(other.query_names)} queries but {reference.path} has "
                                 f"{len(reference.query_names)}: every TestG file lists the same queries")
    for q, (a, b) in enumerate(zip(reference.query_names, other.query_names)):
        if a != b or not np.array_equal(reference.query_boxes[q], other.query_boxes[q]):
            raise DatasetLayoutError(
                f"{other.path}: query {q} is {b} {other.query_boxes[q].tolist()} but {reference.path} has "
                f"{a} {reference.query_boxes[q].tolist()} there: the queries must be in the same order in "
                "every TestG file (docs/datasets.md §6)")


def read_images(path: str, info: dict) -> dict:
    """`Images.mat` -> {image name: int64 [n, 4] x, y, w, h} with the w/h <= 0 boxes dropped (counted)."""
    images, dropped, examples = {}, 0, []
    try:
        for rec in np.ravel(read_mat(path, "Img").squeeze()):
            name = text(rec[0])
            entries = rec[2].ravel() if rec[2].size else ()
            boxes = np.array([xywh(b[0], f"{path} {name}") for b in entries], np.int64).reshape(-1, 4)
            keep = (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
            if not keep.all():
                dropped += int((~keep).sum())
                examples.extend(f"{name} {b.tolist()}" for b in boxes[~keep][: 3 - len(examples)])
            if name in images:
                info["images listed twice in Images.mat (first kept)"] = info.get(
                    "images listed twice in Images.mat (first kept)", 0) + 1
                continue
            images[name] = boxes[keep]
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise DatasetLayoutError(f"{path}: unexpected structure of Img ({err}); expected (imname, nAppear, box) "
                                 "records whose boxes start with idlocate [x, y, w, h], docs/datasets.md §6") from err
    info["boxes dropped (w <= 0 or h <= 0)"] = dropped
    if examples:
        info["boxes dropped, e.g."] = examples
    return images


def read_train_identities(path: str) -> list:
    """`Train.mat` -> per identity (index = dense label) a list of (image name, int x, y, w, h)."""
    identities = []
    try:
        for cell in np.ravel(read_mat(path, "Train").squeeze()):
            scenes = unwrap(cell) if isinstance(cell, np.ndarray) and cell.dtype == object else cell
            record = np.ravel(scenes)[0]
            identities.append([(text(s[0]), xywh(s[1], f"{path} identity {len(identities)}"))
                               for s in np.ravel(record[2])])
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise DatasetLayoutError(f"{path}: unexpected structure of Train ({err}); expected per identity "
                                 "(idname, nAppear, scene) with scene entries (imname, idlocate, ishard), "
                                 "docs/datasets.md §6") from err
    return identities


def _scenes(folder: str, names, boxes: dict, pids: dict, usable: set, skipped: SkipReport) -> list:
    records = []
    for name in names:
        path = os.path.abspath(os.path.join(folder, SCENE_DIR, name))
        if name not in usable:
            if not os.path.lexists(path):  # a damaged file was already counted by list_image_files
                skipped.add(REASON_MISSING, path)
            continue
        records.append(make_scene(path, xywh_to_corners(boxes[name]), pids[name]))
    return records


def _assign_all(entries, boxes: dict, pids: dict, split: set, counts: dict) -> None:
    """Give each (image name, int x, y, w, h, pid) its pid (first identity wins); count misses."""
    for name, box, pid in entries:
        hits = np.flatnonzero(np.all(boxes[name] == box, axis=1)) if name in split else ()
        if len(hits) == 0:
            counts["not found"] += 1
        elif pids[name][hits[0]] not in (UNLABELED, pid):
            counts["conflict"] += 1
        else:
            pids[name][hits[0]] = pid


def load(root: str, strict: bool | None = None) -> SearchDataset:
    """Load CUHK-SYSU from the unpacked folder or its parent (docs/datasets.md §6).

    Args:
        root: `CUHK-SYSU/` or a folder containing it.
        strict: compare with the published counts: None = only for a full-looking copy.

    Raises:
        DatasetLayoutError (names the missing or unreadable file), DatasetCountError.
    """
    folder = resolve_root(root, CANDIDATES, REQUIRED, LAYOUT)
    info, skipped = {}, SkipReport()
    boxes = read_images(os.path.join(folder, IMAGES), info)
    pids = {name: np.full(len(b), UNLABELED, np.int32) for name, b in boxes.items()}
    pool = [text(n) for n in np.ravel(read_mat(os.path.join(folder, POOL), "pool").squeeze())]
    test_names = list(dict.fromkeys(n for n in pool if n in boxes))
    if len(test_names) != len(pool):
        info["pool.mat names not in Images.mat or listed twice (ignored)"] = len(pool) - len(test_names)
    test_set = set(test_names)
    train_names = sorted(set(boxes) - test_set)
    train_set = set(train_names)

    identities = read_train_identities(os.path.join(folder, TRAIN))
    counts = {"not found": 0, "conflict": 0}
    _assign_all(((name, box, label) for label, entries in enumerate(identities) for name, box in entries),
                boxes, pids, train_set, counts)
    info["train identities (dense labels = index in Train.mat)"] = len(identities)
    info["train identity boxes not found in Images.mat (expected 0)"] = counts["not found"]
    testg50 = read_protocol_file(os.path.join(folder, PROTOCOL_DIR, "TestG50.mat"), 50)
    counts = {"not found": 0, "conflict": counts["conflict"]}
    owner = np.searchsorted(testg50.offsets, testg50.boxed, side="right") - 1
    test_entries = [(n, b, q) for q, (n, b) in enumerate(zip(testg50.query_names, testg50.query_boxes))]
    test_entries += [(str(testg50.names[e]), b, int(q)) for e, b, q in zip(testg50.boxed, testg50.boxes, owner)]
    _assign_all(test_entries, boxes, pids, test_set, counts)
    info["test identity boxes not found in Images.mat (expected 0)"] = counts["not found"]
    if counts["conflict"]:
        info["boxes claimed by two identities (first kept)"] = counts["conflict"]

    usable = {os.path.basename(p) for p in list_image_files(os.path.join(folder, SCENE_DIR), skipped)}
    train = _scenes(folder, train_names, boxes, pids, usable, skipped)
    gallery = _scenes(folder, test_names, boxes, pids, usable, skipped)
    queries, dropped = [], {}
    for q, (name, box) in enumerate(zip(testg50.query_names, testg50.query_boxes)):
        reason = ("query scene not in pool.mat" if name not in test_set else
                  "query scene missing or damaged on disk" if name not in usable else
                  "query box with w <= 0 or h <= 0" if min(box[2], box[3]) <= 0 else None)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        queries.append(SearchQuery(name, xywh_to_corners(box)[0], q, -1, q))
    info.update({f"queries dropped ({k})": v for k, v in dropped.items()})
    info["train boxes (published 55,272)"] = int(sum(len(s.pids) for s in train))
    info["test boxes (published 40,871)"] = int(sum(len(s.pids) for s in gallery))

    sizes = tuple(n for n in GALLERY_SIZES if os.path.isfile(os.path.join(folder, PROTOCOL_DIR, f"TestG{n}.mat")))
    dataset = SearchDataset(name="cuhk_sysu", root=folder, train=train, gallery=gallery, queries=queries,
                            train_id_map={j: j for j in range(len(identities))}, skipped=skipped, info=info,
                            gallery_sizes=sizes + (FULL_SET,),
                            protocol_builder=ProtocolBuilder(folder, tuple(test_names), testg50))
    found = {"train images": len(train), "train ids": len({int(p) for s in train for p in s.pids} - {UNLABELED}),
             "test images": len(gallery), "queries": len(queries)}
    verify_counts("cuhk_sysu", found, EXPECTED_COUNTS, strict)
    return dataset


class ProtocolBuilder:
    """`SearchDataset.protocol_builder` of CUHK-SYSU: reads `TestG<size>.mat` when first asked."""

    def __init__(self, folder: str, scene_names: tuple, testg50: ProtocolFile):
        self.folder, self.scene_names, self.testg50 = folder, scene_names, testg50

    def __call__(self, dataset: SearchDataset, gallery_size: int) -> SearchProtocol:
        if gallery_size in (50, FULL_SET):
            testg = self.testg50
        else:
            path = os.path.join(self.folder, PROTOCOL_DIR, f"TestG{gallery_size}.mat")
            testg = read_protocol_file(path, gallery_size)
            check_same_queries(self.testg50, testg)
        name = "cuhk_sysu full set (-1)" if gallery_size == FULL_SET else f"cuhk_sysu TestG{gallery_size}"
        return build_protocol(name, testg, dataset.queries, self.scene_names, full_set=gallery_size == FULL_SET)


def build_protocol(name: str, testg: ProtocolFile, queries, scene_names: tuple, full_set: bool) -> SearchProtocol:
    """Galleries and positives of `queries` (by `SearchQuery.index`) from a parsed TestG file
    (docs/protocols.md (d)): entries in file order, each scene once, never the query's own scene;
    `full_set` appends every other scene in `scene_names` order (size -1)."""
    index = {n: i for i, n in enumerate(scene_names)}
    ids = np.fromiter((index.get(n, -1) for n in testg.names), np.int64, count=len(testg.names))
    box_row = np.full(len(ids), -1, np.int64)
    box_row[testg.boxed] = np.arange(len(testg.boxed))
    corners = xywh_to_corners(testg.boxes)
    galleries, positive_scenes, positive_boxes = [], [], []
    unknown = own_listed = duplicates = no_positive = 0
    for query in queries:
        start, stop = testg.offsets[query.index], testg.offsets[query.index + 1]
        own = index.get(query.scene, -1)
        segment = ids[start:stop]
        unknown += int(np.sum(segment < 0))
        own_listed += int(np.sum(segment == own))
        keep = np.flatnonzero((segment >= 0) & (segment != own))
        listed = segment[keep]
        first = np.sort(np.unique(listed, return_index=True)[1])
        duplicates += len(listed) - len(first)
        gallery = listed[first]
        boxed = keep[box_row[start + keep] >= 0]
        pos_first = np.sort(np.unique(segment[boxed], return_index=True)[1])
        positive_scenes.append(segment[boxed[pos_first]].astype(np.int32))
        positive_boxes.append(corners[box_row[start + boxed[pos_first]]].reshape(-1, 4))
        no_positive += len(pos_first) == 0
        if full_set:
            rest = np.ones(len(scene_names), bool)
            rest[gallery] = False
            if own >= 0:
                rest[own] = False
            gallery = np.concatenate([gallery, np.flatnonzero(rest)])
        galleries.append(gallery.astype(np.int32))
    info = {"file": testg.path, "queries": len(galleries), "queries without a positive": no_positive,
            "gallery entries not in pool.mat (dropped)": unknown,
            "gallery entries naming the query's own scene (dropped)": own_listed}
    return SearchProtocol(name, tuple(scene_names), tuple(galleries), tuple(positive_scenes),
                          tuple(positive_boxes), duplicates=duplicates, info=info)


# ------------------------------------------------------------------ writer (the inverse of `load`)

_ZERO = np.zeros((1, 1))
_EMPTY = (np.zeros((0, 0)), np.zeros((1, 0)))  # both shapes occur in the real TestG files


def _struct(rows: list, fields: tuple) -> np.ndarray:
    """A 1 x n MATLAB struct array (what loadmat returns for one, before squeeze)."""
    out = np.zeros((1, len(rows)), dtype=[(f, object) for f in fields])
    for k, row in enumerate(rows):
        out[0, k] = row
    return out


def _idlocate(box, position: int, where: str) -> np.ndarray:
    if box is None:  # alternate the two empty shapes so that every written file has both
        return _EMPTY[position % 2]
    if isinstance(box, np.ndarray) and box.size == 0:
        return box.astype(np.float64)
    box = np.asarray(box, np.float64)
    if box.size != 4:
        raise ValueError(f"{where}: expected a box [x, y, w, h], got {box.tolist()}")
    return box.reshape(1, 4)


def save_mat(path: str, variables: dict) -> None:
    import scipy.io

    from reid_keras.io_utils import atomic_write

    atomic_write(path, lambda tmp: scipy.io.savemat(tmp, variables, do_compression=True, oned_as="row"))


def write_annotations(folder: str, images: dict, test_names, train_identities, queries, galleries: dict) -> None:
    """Write `folder/annotation/` as the real CUHK-SYSU files (docs/datasets.md §6), with scipy.

    Args:
        images: image name -> int array [n, 4] of x, y, w, h (every box, w/h <= 0 ones included).
        test_names: the pool image names, in order.
        train_identities: per training identity (index = dense label) a list of (imname, [x, y, w, h]).
        queries: per query (imname, [x, y, w, h]).
        galleries: N -> per query a list of (imname, [x, y, w, h] or None): positives first, then the
            others with an empty idlocate (None alternates the (0, 0) and (1, 0) shapes).
    Every argument is checked before the first file is written. The images themselves go to
    `folder/Image/SSM/` (the caller writes them).
    """
    for size, per_query in galleries.items():
        if len(per_query) != len(queries):
            raise ValueError(f"galleries[{size}] has {len(per_query)} entries, expected one per query ({len(queries)})")
    img = []
    for name, rows in images.items():
        rows = np.asarray(rows, np.float64)
        if rows.size % 4:
            raise ValueError(f"images[{name!r}]: expected an array [n, 4] of x, y, w, h, got shape {rows.shape}")
        boxes = _struct([(r.reshape(1, 4), _ZERO) for r in rows.reshape(-1, 4)], ("idlocate", "ishard"))
        img.append((name, np.array([[float(boxes.size)]]), boxes))
    pool = np.empty((len(test_names), 1), object)
    pool[:, 0] = list(test_names)
    train = np.empty((len(train_identities), 1), object)
    for j, entries in enumerate(train_identities):
        scene = _struct([(n, _idlocate(b, 0, f"train_identities[{j}]"), _ZERO) for n, b in entries],
                        ("imname", "idlocate", "ishard"))
        train[j, 0] = _struct([(f"p{j + 1}", np.array([[float(len(entries))]]), scene)], ("idname", "nAppear", "scene"))
    files = {IMAGES: {"Img": _struct(img, ("imname", "nAppear", "box"))}, POOL: {"pool": pool}, TRAIN: {"Train": train}}
    for size, per_query in galleries.items():
        rows = []
        for q, ((name, box), entries) in enumerate(zip(queries, per_query)):
            query = _struct([(name, _idlocate(box, 0, f"queries[{q}]"), _ZERO, f"p{q + 1}")],
                            ("imname", "idlocate", "ishard", "idname"))
            rows.append((query, _struct([(n, _idlocate(b, k, f"galleries[{size}][{q}]"), _ZERO)
                                         for k, (n, b) in enumerate(entries)], ("imname", "idlocate", "ishard"))))
        files[os.path.join(PROTOCOL_DIR, f"TestG{size}.mat")] = {f"TestG{size}": _struct(rows, ("Query", "Gallery"))}
    for relative, variables in files.items():
        save_mat(os.path.join(folder, relative), variables)
