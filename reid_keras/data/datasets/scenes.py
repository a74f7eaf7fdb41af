"""Person-search data: scene records, queries, the gallery of each query, the dataset
(docs/datasets.md §0, §6-7; docs/protocols.md (d)).

A person-search benchmark is whole scene images with their annotated people, not crops:

- `SceneRecord(path, boxes, pids, camid)`: `boxes` float32 `[N, 4]` as `x1, y1, x2, y2` in image
  pixels (files store `x, y, w, h`: `x2 = x + w`, no -1), `pids` int32 `[N]`. Training scenes carry
  dense labels 0..L-1 over the sorted training ids; test scenes the dataset's own test ids
  (CUHK-SYSU: the query's index 0..2,899; PRW: the original id). A person without identity has
  `UNLABELED`, never used as a class index. `camid` is 0-based, -1 when unknown (CUHK-SYSU).
- `SearchQuery(scene, box, pid, camid, index)`: the query person's box in its scene (the file
  name of a test scene); `index` is its line in the protocol file, which fixes the query order.
- `SearchProtocol`: for each query, the gallery scenes in evaluation order and the query person's
  ground-truth boxes among them (docs/protocols.md (d)); `SearchDataset.search_protocol(size)`
  builds it (CUHK-SYSU from `TestG<size>.mat`, PRW from the annotations).

Example:
    >>> ds = load_dataset("cuhk_sysu", "/data/CUHK-SYSU")            # doctest: +SKIP
    >>> protocol = ds.search_protocol(gallery_size=100)               # doctest: +SKIP
    >>> protocol.galleries[0][:3], protocol.positive_boxes[0]         # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable, NamedTuple

import numpy as np

from reid_keras.data.datasets.base import SkipReport

# A person without identity (CUHK-SYSU's unnamed people, PRW's id -2): never a class index,
# never a positive. Test the sentinel, not `pid > 0` (docs/datasets.md §8: that dropped id 0).
UNLABELED = -1


class SceneRecord(NamedTuple):
    """One scene image: absolute `path`, `boxes` [N, 4] x1y1x2y2 float32, `pids` [N] int32, `camid`."""

    path: str
    boxes: np.ndarray
    pids: np.ndarray
    camid: int = -1

    @property
    def name(self) -> str:
        """The file name: what protocols, queries and detection files refer to."""
        return os.path.basename(self.path)


def make_scene(path: str, boxes, pids, camid: int = -1) -> SceneRecord:
    """A `SceneRecord` with checked shapes: `boxes` -> float32 [N, 4], `pids` -> int32 [N].

    Raises:
        ValueError naming `path` when the shapes disagree or a box has x2 <= x1 or y2 <= y1.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4) if np.size(boxes) else np.zeros((0, 4), np.float32)
    pids = np.asarray(pids, np.int32).reshape(-1)
    if len(boxes) != len(pids):
        raise ValueError(f"{path}: {len(boxes)} box(es) but {len(pids)} person id(s)")
    if len(boxes) and not np.all((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])):
        bad = boxes[~((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1]))][0].tolist()
        raise ValueError(f"{path}: box {bad} has no area (need x2 > x1 and y2 > y1)")
    return SceneRecord(str(path), boxes, pids, int(camid))


def xywh_to_corners(xywh) -> np.ndarray:
    """`[x, y, w, h]` rows -> `[x1, y1, x2, y2]` float32 (docs/datasets.md §0: no -1)."""
    xywh = np.asarray(xywh, np.float32).reshape(-1, 4)
    return np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)


class SearchQuery(NamedTuple):
    """The query person: `scene` (file name of a test scene), `box` [4] x1y1x2y2, `pid`, `camid`,
    and `index`, its position in the protocol file (queries stay in that order)."""

    scene: str
    box: np.ndarray
    pid: int
    camid: int = -1
    index: int = 0


@dataclasses.dataclass(frozen=True)
class SearchProtocol:
    """Who is searched where (docs/protocols.md (d)), one entry per query of `SearchDataset.queries`.

    Attributes:
        name: e.g. "cuhk_sysu TestG100", "cuhk_sysu full set (-1)", "prw", "prw multi_view".
        scene_names: every test scene the galleries refer to, by index.
        galleries: per query, int32 indices into `scene_names` in evaluation order (stable-sort
            ties go to the earlier entry), duplicates removed, the query's own scene never included.
        positive_scenes: per query, int32 indices (into `scene_names`) of the gallery scenes that
            show the query person; each is also in the query's gallery.
        positive_boxes: per query, float32 [P, 4] x1y1x2y2 box of the query person in each of them.
        duplicates: gallery entries listed more than once (evaluated and counted once).
        info: what else the builder noticed (e.g. queries without any positive).
    """

    name: str
    scene_names: tuple
    galleries: tuple
    positive_scenes: tuple
    positive_boxes: tuple
    duplicates: int = 0
    info: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        n = len(self.galleries)
        if not len(self.positive_scenes) == len(self.positive_boxes) == n:
            raise ValueError(f"{self.name}: galleries, positive_scenes and positive_boxes need one entry per "
                             f"query, got {n}, {len(self.positive_scenes)}, {len(self.positive_boxes)}")

    def __len__(self) -> int:
        return len(self.galleries)

    def num_positives(self) -> np.ndarray:
        """n_gt per query: ground-truth occurrences of the query person within its gallery."""
        return np.array([len(p) for p in self.positive_scenes], np.int64)


@dataclasses.dataclass
class SearchDataset:
    """A loaded person-search benchmark (docs/datasets.md §6-7).

    `train` and `gallery` are `SceneRecord`s (the gallery is every test scene), `queries` the
    `SearchQuery`s in protocol-file order; `search_protocol(gallery_size)` the gallery of each query.
    `skipped`, `info`, `options` and `protocols` mean what they mean on `ReidDataset`.
    """

    name: str
    root: str
    train: list
    gallery: list
    queries: list
    train_id_map: dict = dataclasses.field(default_factory=dict)
    skipped: SkipReport = dataclasses.field(default_factory=SkipReport)
    info: dict = dataclasses.field(default_factory=dict)
    options: dict = dataclasses.field(default_factory=dict)
    protocols: tuple = ()
    # gallery sizes `search_protocol` accepts (CUHK-SYSU: 50 ... 4000 and -1; PRW: None = its one gallery)
    gallery_sizes: tuple = (None,)
    # (dataset, gallery_size) -> SearchProtocol; set by the loader
    protocol_builder: Callable | None = dataclasses.field(default=None, repr=False)
    _protocol_cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    # Splits of image records (read by `decoding.drop_damaged`).
    image_splits = ("train", "gallery")
    kind = "scenes"  # whole scenes with boxes (a ReidDataset's kind is "crops")

    @property
    def num_train_ids(self) -> int:
        return len(self.train_id_map)

    def scene(self, name: str) -> SceneRecord:
        """The test scene called `name`. Raises KeyError naming it."""
        index = self._scene_index()
        if name not in index:
            raise KeyError(f"{self.name}: no test scene named {name!r}")
        return self.gallery[index[name]]

    def _scene_index(self) -> dict:
        key = ("scene index", len(self.gallery))
        if key not in self._protocol_cache:
            self._protocol_cache[key] = {r.name: i for i, r in enumerate(self.gallery)}
        return self._protocol_cache[key]

    def search_protocol(self, gallery_size=None) -> SearchProtocol:
        """The gallery of every query for `gallery_size` (one of `gallery_sizes`), built once.

        Raises:
            ValueError naming `gallery_size` and the accepted values.
        """
        if self.protocol_builder is None:
            raise ValueError(f"{self.name}: this dataset declares no search protocol")
        if gallery_size not in self.gallery_sizes:
            accepted = ", ".join("all" if s is None else str(s) for s in self.gallery_sizes)
            raise ValueError(f"gallery_size={gallery_size!r} is not a gallery of {self.name}; accepted: {accepted}")
        key = ("protocol", gallery_size, tuple(q.index for q in self.queries))
        if key not in self._protocol_cache:
            self._protocol_cache[key] = self.protocol_builder(self, gallery_size)
        return self._protocol_cache[key]

    def distinct_gallery_sizes(self, sizes=None) -> list:
        """`sizes` (default: every size offered but None) without those naming the same gallery as an
        earlier one (PRW's 100 and -1 are its one gallery), in order."""
        sizes = [s for s in self.gallery_sizes if s is not None] if sizes is None else list(sizes)
        distinct, names = [], set()
        for size in sizes:
            name = self.search_protocol(size).name
            if name not in names:
                names.add(name)
                distinct.append(size)
        return distinct

    def without_paths(self, paths) -> "SearchDataset":
        """A copy without the scenes whose path is in `paths` (damaged images) and without the
        queries whose scene is one of them (counted in `info`). Protocols still list the dropped
        gallery scenes: they have no detections, and their ground truth still counts (docs/protocols.md (d))."""
        paths = set(paths)
        train = [s for s in self.train if s.path not in paths]
        gallery = [s for s in self.gallery if s.path not in paths]
        dropped_names = {os.path.basename(p) for p in paths}
        queries = [q for q in self.queries if q.scene not in dropped_names]
        info = dict(self.info)
        if len(queries) != len(self.queries):
            info["queries dropped (damaged query scene)"] = len(self.queries) - len(queries)
        return dataclasses.replace(self, train=train, gallery=gallery, queries=queries, info=info,
                                   _protocol_cache={})

    def split_stats(self) -> list:
        """Rows `(split, ids, scenes, boxes, unlabeled boxes)` for train, gallery and the queries."""
        rows = []
        for split, scenes in (("train", self.train), ("gallery", self.gallery)):
            pids = np.concatenate([s.pids for s in scenes]) if scenes else np.zeros(0, np.int32)
            rows.append((split, len(set(pids[pids != UNLABELED].tolist())), len(scenes), len(pids),
                         int(np.sum(pids == UNLABELED))))
        rows.append(("query", len({q.pid for q in self.queries}), len({q.scene for q in self.queries}),
                     len(self.queries), 0))
        return rows

    def summary(self) -> str:
        """A printable table of ids / scenes / boxes per split, then `info` and the skip report."""
        lines = [f"{self.name} at {self.root}",
                 f"{'split':<8} {'ids':>7} {'scenes':>8} {'boxes':>8} {'unlabeled':>10}"]
        for split, ids, scenes, boxes, unlabeled in self.split_stats():
            lines.append(f"{split:<8} {ids:>7} {scenes:>8} {boxes:>8} {unlabeled:>10}")
        for key, value in self.info.items():
            lines.append(f"{key}: {value}")
        lines.append(str(self.skipped))
        return "\n".join(lines)


def dense_label_map(pids) -> dict:
    """Original training id -> dense label 0..L-1 over the sorted distinct ids, `UNLABELED` excluded
    (docs/datasets.md §0: never `pid - 1`, never set order)."""
    ids = sorted({int(p) for p in pids if int(p) != UNLABELED})
    return {pid: label for label, pid in enumerate(ids)}


def relabel_scenes(scenes, id_map: dict) -> list:
    """`scenes` with each labeled pid replaced by `id_map[pid]`; `UNLABELED` stays."""
    out = []
    for s in scenes:
        pids = np.array([id_map[int(p)] if int(p) != UNLABELED else UNLABELED for p in s.pids], np.int32)
        out.append(s._replace(pids=pids))
    return out
