"""PRW person search, docs/datasets.md §7 and docs/protocols.md (d).

`frame_train.mat` / `frame_test.mat` list the frames (names without `.jpg`); each frame's boxes are in
`annotations/<frame>.jpg.mat` under one of three keys (tried in order `box_new`, `anno_file`,
`anno_previous`), rows `[id, x, y, w, h]`: coordinates are clipped at 0, converted to corners and cast
to int; boxes left without area are dropped and counted; id -2 becomes `UNLABELED`. The camera is the
first `c<digit>` of the frame name, minus one.

Training labels come from the data: the dense map over the distinct ids of the training annotations
(1..478, 480..483 and 932 in the real files: 483 labels, so no `pid - 1` table of 482 rows).
Test scenes keep the original ids. Queries are the lines of `query_info.txt` ("pid x y w h frame",
CRLF or LF), in file order. One gallery: every test frame but the query's own (`multi_view=True`: also
without the frames of the query's camera); the positives are the frames whose annotations hold the
query id. `gallery_sizes = (None, 100, -1)` all name that gallery.

    >>> ds = load_dataset("prw", "/data/PRW-v16.04.20", multi_view=True)     # doctest: +SKIP
"""
from __future__ import annotations

import logging
import os
import re

import numpy as np

from reid_keras.data.datasets.base import SkipReport, resolve_root
from reid_keras.data.datasets.common import verify_counts
from reid_keras.data.datasets.cuhk_sysu import MAT_READ_ERRORS, read_mat, text
from reid_keras.data.datasets.scenes import (UNLABELED, SearchDataset, SearchProtocol, SearchQuery,
                                             dense_label_map, make_scene, relabel_scenes)
from reid_keras.data.imagefiles import list_image_files

ANNOTATION_KEYS = ("box_new", "anno_file", "anno_previous")
UNLABELED_ID = -2
CAMERA_RE = re.compile(r"c(\d)")
CANDIDATES = ("PRW-v16.04.20", "PRW", "prw", os.path.join("prw", "PRW-v16.04.20"))
REQUIRED = ("frames", "annotations", "frame_train.mat", "frame_test.mat", "query_info.txt")
LAYOUT = """PRW-v16.04.20/
  frames/c1s1_000151.jpg ...          (11,816 frames, cameras 1-6)
  annotations/c1s1_000151.jpg.mat     (one per frame; key box_new, anno_file or anno_previous)
  frame_train.mat                     (key img_index_train: 5,704 frame names)
  frame_test.mat                      (key img_index_test: 6,112 frame names)
  query_info.txt                      (2,057 lines "pid x y w h frame")"""

# docs/datasets.md §7; module-level so tests can substitute small numbers. "train ids" is the size of
# the dense map built from the training annotations.
EXPECTED_COUNTS = {"train images": 5704, "test images": 6112, "queries": 2057, "query ids": 450, "train ids": 483}
REASON_MISSING = "listed in frame_train.mat / frame_test.mat but missing on disk"
_log = logging.getLogger(__name__)


def camera(name: str) -> int:
    """0-based camera from the first `c<digit>` of the basename; -1 when there is none."""
    match = CAMERA_RE.search(os.path.basename(name))
    return int(match.group(1)) - 1 if match else -1


def to_corners(xywh) -> np.ndarray:
    """docs/datasets.md §7: clip `x, y, w, h` at 0, convert to `x1, y1, x2, y2`, cast to int (float32 out)."""
    xywh = np.clip(np.asarray(xywh, np.float64).reshape(-1, 4), 0, None)
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1).astype(np.int64).astype(np.float32)


def read_frame_list(path: str, key: str) -> list:
    """`frame_train.mat` / `frame_test.mat` -> frame file names (`.jpg` added)."""
    names = [text(n) for n in np.ravel(read_mat(path, key, LAYOUT))]
    return [n if n.endswith(".jpg") else n + ".jpg" for n in names]


def read_annotation(path: str):
    """`(ids int64 [n], boxes float32 [n, 4])` of one annotation file, or the reason it is unusable."""
    import scipy.io

    if not os.path.isfile(path):
        return "no annotation file annotations/<frame>.jpg.mat"
    try:
        mat = scipy.io.loadmat(path, variable_names=list(ANNOTATION_KEYS))
    except (*MAT_READ_ERRORS, scipy.io.matlab.MatReadError) as err:
        return f"unreadable annotation file ({err.__class__.__name__})"
    key = next((k for k in ANNOTATION_KEYS if k in mat), None)
    if key is None:
        return f"annotation file without any of the keys {', '.join(ANNOTATION_KEYS)}"
    rows = np.asarray(mat[key])
    if rows.size == 0:
        return np.zeros(0, np.int64), np.zeros((0, 4), np.float32)
    if rows.ndim != 2 or rows.shape[1] != 5 or not np.issubdtype(rows.dtype, np.number):
        return f"annotation array is not rows [id, x, y, w, h] (shape {rows.shape})"
    if not np.all(np.isfinite(rows)):
        return "annotation array holds NaN or infinite values"
    return rows[:, 0].astype(np.int64), to_corners(rows[:, 1:])


def read_frames(folder: str, names: list, skipped: SkipReport, counts: dict) -> dict:
    """frame name -> (original pids int32 with -2 -> UNLABELED, corners float32) for the readable ones."""
    frames = {}
    for name in names:
        path = os.path.join(folder, "annotations", name + ".mat")
        result = read_annotation(path)
        if isinstance(result, str):
            skipped.add(result, path)
            continue
        ids, boxes = result
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        counts["boxes without area after clipping (dropped)"] += int(np.sum(~keep))
        ids, boxes = ids[keep], boxes[keep]
        odd = (ids <= 0) & (ids != UNLABELED_ID)
        counts["boxes with an id other than -2 or a positive id (kept as unlabeled)"] += int(np.sum(odd))
        frames[name] = (np.where(ids > 0, ids, UNLABELED).astype(np.int32), boxes)
    return frames


def read_queries(path: str, info: dict) -> list:
    """`query_info.txt` -> [(line index, pid, x, y, w, h, frame name with .jpg)]; CRLF and LF both work."""
    with open(path, "rb") as handle:
        lines = [line.strip() for line in handle.read().decode("utf-8", "replace").splitlines()]
    entries, bad = [], []
    for number, line in enumerate(line for line in lines if line):
        fields = line.split()
        try:
            if len(fields) != 6:
                raise ValueError
            pid, coords = int(float(fields[0])), [float(v) for v in fields[1:5]]
        except ValueError:
            bad.append(f"query {number}: {line[:60]!r}")
            continue
        frame = fields[5] if fields[5].endswith(".jpg") else fields[5] + ".jpg"
        entries.append((number, pid, *coords, frame))
    if bad:
        info["query_info.txt lines not 'pid x y w h frame' (skipped)"] = len(bad)
        info["query_info.txt bad lines, e.g."] = bad[:3]
    return entries


def _scenes(folder: str, names, frames: dict, usable: set, skipped: SkipReport) -> list:
    records = []
    for name in names:
        if name not in frames:
            continue
        path = os.path.abspath(os.path.join(folder, "frames", name))
        if name not in usable:
            if not os.path.lexists(path):  # a damaged file was already counted by list_image_files
                skipped.add(REASON_MISSING, path)
            continue
        records.append(make_scene(path, frames[name][1], frames[name][0], camera(name)))
    return records


def load(root: str, strict: bool | None = None, multi_view: bool = False) -> SearchDataset:
    """Load PRW from the unpacked folder or its parent (docs/datasets.md §7).

    Args:
        root: `PRW-v16.04.20/` or a folder containing it.
        strict: compare with the published counts: None = only for a full-looking copy.
        multi_view: the galleries leave out the frames of the query's camera (docs/protocols.md (d)).

    Raises:
        DatasetLayoutError (names the missing or unreadable file), DatasetCountError.
    """
    if not isinstance(multi_view, bool):
        raise ValueError(f"prw: multi_view must be True or False, got {multi_view!r}")
    folder = resolve_root(root, CANDIDATES, REQUIRED, LAYOUT)
    info, skipped = {}, SkipReport()
    counts = {"boxes without area after clipping (dropped)": 0,
              "boxes with an id other than -2 or a positive id (kept as unlabeled)": 0}
    train_names = read_frame_list(os.path.join(folder, "frame_train.mat"), "img_index_train")
    test_names = read_frame_list(os.path.join(folder, "frame_test.mat"), "img_index_test")
    train_frames = read_frames(folder, train_names, skipped, counts)
    test_frames = read_frames(folder, test_names, skipped, counts)
    info.update(counts)
    usable = {os.path.basename(p) for p in list_image_files(os.path.join(folder, "frames"), skipped)}

    id_map = dense_label_map(np.concatenate([p for p, _ in train_frames.values()] or [np.zeros(0, np.int32)]))
    info["train ids (dense label map size)"] = len(id_map)
    _log.info("prw: %d training identities in the dense label map", len(id_map))
    train = relabel_scenes(_scenes(folder, train_names, train_frames, usable, skipped), id_map)
    gallery = _scenes(folder, test_names, test_frames, usable, skipped)
    all_pids = [p for frames in (train_frames, test_frames) for p, _ in frames.values()]
    info["boxes with an id (published 34,304)"] = int(sum(np.sum(p != UNLABELED) for p in all_pids))

    queries, dropped, unmatched = [], {}, 0
    for number, pid, x, y, w, h, frame in read_queries(os.path.join(folder, "query_info.txt"), info):
        box = to_corners([x, y, w, h])[0]
        reason = ("query frame not in frame_test.mat or without annotations" if frame not in test_frames else
                  "query frame missing or damaged on disk" if frame not in usable else
                  "query box without area" if box[2] <= box[0] or box[3] <= box[1] else None)
        if reason:
            dropped[reason] = dropped.get(reason, 0) + 1
            continue
        pids, boxes = test_frames[frame]
        unmatched += not np.any((pids == pid) & np.all(boxes == box, axis=1))
        queries.append(SearchQuery(frame, box, pid, camera(frame), number))
    info.update({f"queries dropped ({k})": v for k, v in dropped.items()})
    info["queries whose box is not among their frame's annotations (kept)"] = unmatched

    scene_names = tuple(n for n in test_names if n in test_frames)
    dataset = SearchDataset(name="prw", root=folder, train=train, gallery=gallery, queries=queries,
                            train_id_map=id_map, skipped=skipped, info=info, gallery_sizes=(None, 100, -1),
                            protocol_builder=ProtocolBuilder(scene_names, [test_frames[n] for n in scene_names],
                                                             multi_view))
    found = {"train images": len(train), "test images": len(gallery), "queries": len(queries),
             "query ids": len({q.pid for q in queries}), "train ids": len(id_map)}
    verify_counts("prw", found, EXPECTED_COUNTS, strict)
    return dataset


class ProtocolBuilder:
    """`SearchDataset.protocol_builder` of PRW (docs/protocols.md (d)): one gallery for every size."""

    def __init__(self, scene_names: tuple, annotations: list, multi_view: bool):
        self.scene_names, self.multi_view = scene_names, multi_view
        self.cameras = np.array([camera(n) for n in scene_names], np.int64)
        sizes = [len(p) for p, _ in annotations]
        self.box_scene = np.repeat(np.arange(len(scene_names)), sizes)
        self.box_pid = np.concatenate([p for p, _ in annotations] or [np.zeros(0, np.int32)])
        self.boxes = np.concatenate([b for _, b in annotations] or [np.zeros((0, 4), np.float32)])

    def __call__(self, dataset: SearchDataset, gallery_size) -> SearchProtocol:
        index = {n: i for i, n in enumerate(self.scene_names)}
        order = np.argsort(self.box_pid, kind="stable")  # boxes of each id, in scene order
        ids, starts = np.unique(self.box_pid[order], return_index=True)
        by_pid = dict(zip(ids.tolist(), np.split(order, starts[1:])))
        galleries, positive_scenes, positive_boxes = [], [], []
        repeated = no_positive = 0
        for query in dataset.queries:
            allowed = np.ones(len(self.scene_names), bool)
            allowed[index[query.scene]] = False
            if self.multi_view:
                allowed &= self.cameras != query.camid
            galleries.append(np.flatnonzero(allowed).astype(np.int32))
            hits = by_pid.get(query.pid, np.zeros(0, np.int64)) if query.pid != UNLABELED else np.zeros(0, np.int64)
            hits = hits[allowed[self.box_scene[hits]]]
            scenes, first = np.unique(self.box_scene[hits], return_index=True)
            repeated += len(hits) - len(first)
            positive_scenes.append(scenes.astype(np.int32))
            positive_boxes.append(self.boxes[hits[first]].reshape(-1, 4))
            no_positive += len(first) == 0
        info = {"gallery": "every test frame but the query's own" + (" and its camera's" if self.multi_view else ""),
                "gallery_size": f"{gallery_size!r} (PRW has one gallery: None, 100 and -1 all name it)",
                "multi_view": self.multi_view, "queries": len(galleries),
                "queries without a positive (invalid)": no_positive,
                "positive frames holding the query id twice (first box used)": repeated}
        return SearchProtocol("prw multi_view" if self.multi_view else "prw", self.scene_names, tuple(galleries),
                              tuple(positive_scenes), tuple(positive_boxes), info=info)


# ------------------------------------------------------------------ writer (the inverse of `load`)

def write_annotations(folder: str, frames: dict, train_frames, test_frames, queries, key="box_new") -> None:
    """Write the PRW annotation files under `folder` (docs/datasets.md §7), with scipy.

    Args:
        frames: frame name with `.jpg` -> float array [n, 5] of rows `[id, x, y, w, h]` (id -2: unlabeled);
            written to `annotations/<frame>.jpg.mat`.
        train_frames, test_frames: frame names (with or without `.jpg`) for `frame_train.mat` /
            `frame_test.mat` (stored without the extension, as in the real files).
        queries: (pid, x, y, w, h, frame name without extension), written to `query_info.txt` with CRLF.
        key: the annotation array's key, or a dict frame -> key (default `box_new`).
    `ID_train.mat` / `ID_test.mat` (keys `ID_train`, `ID_test`; not read by the loader) list the ids.
    Every argument is checked before the first file is written. The frames themselves go to
    `folder/frames/` (the caller writes them).
    """
    from reid_keras.data.datasets.cuhk_sysu import save_mat
    from reid_keras.io_utils import atomic_write_bytes

    files = {}
    for name, rows in frames.items():
        rows = np.asarray(rows, np.float64)
        if rows.size % 5:
            raise ValueError(f"frames[{name!r}]: expected rows [id, x, y, w, h], got shape {rows.shape}")
        frame_key = key.get(name, "box_new") if isinstance(key, dict) else key
        if frame_key not in ANNOTATION_KEYS:
            raise ValueError(f"key for {name!r}: {frame_key!r} is not one of {', '.join(ANNOTATION_KEYS)}")
        files[os.path.join("annotations", name + ".mat")] = {frame_key: rows.reshape(-1, 5)}
    for split, names in (("train", train_frames), ("test", test_frames)):
        cells = np.empty((len(names), 1), object)
        cells[:, 0] = [name[:-4] if name.endswith(".jpg") else name for name in names]
        rows = [files.get(os.path.join("annotations", f"{n}.jpg.mat"), {}) for n in cells[:, 0]]
        ids = sorted({int(pid) for r in rows for array in r.values() for pid in array[:, 0] if pid > 0})
        files[f"frame_{split}.mat"] = {f"img_index_{split}": cells}
        files[f"ID_{split}.mat"] = {f"ID_{split}": np.array(ids, np.float64)}
    for k, query in enumerate(queries):
        if len(query) != 6:
            raise ValueError(f"queries[{k}]: expected (pid, x, y, w, h, frame), got {query!r}")
    lines = "".join(f"{int(pid)} {x:g} {y:g} {w:g} {h:g} {frame}\r\n" for pid, x, y, w, h, frame in queries)
    for relative, variables in files.items():
        save_mat(os.path.join(folder, relative), variables)
    atomic_write_bytes(os.path.join(folder, "query_info.txt"), lines.encode("utf-8"))
