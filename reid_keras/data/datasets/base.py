"""Records, splits and layout checks shared by every dataset loader (docs/datasets.md §0).

A re-ID dataset is three lists of `ImageRecord(path, pid, camid)`:

- `train`: `pid` is the dense label 0..N-1 over the *sorted* distinct training ids
  (`ReidDataset.train_id_map` maps original id -> dense label);
- `query` / `gallery`: `pid` is the original id, unchanged; distractors have pid 0, Market junk
  (-1) is dropped when loading;
- `protocols`: the evaluation protocols the dataset supports beyond docs/protocols.md (a), each an
  `EvaluationProtocol` with what it needs (run by `reid_keras.metrics.dataset_protocols`), e.g.
  Market-1501's `multi_query` (docs/datasets.md §1) holds the hand-drawn `gt_bbox/` boxes whose
  (original pid, camid) is that of some query.

`camid` is 0-based (camera number in the file name - 1); -1 when unknown (500k distractors).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterable, NamedTuple


class ImageRecord(NamedTuple):
    """One cropped person image: absolute `path`, identity `pid`, 0-based camera `camid`."""

    path: str
    pid: int
    camid: int


class DatasetLayoutError(FileNotFoundError):
    """The folder on disk does not look like the dataset it was loaded as.

    The message names the missing folder or file and the expected layout.
    """


class DatasetCountError(ValueError):
    """A complete copy of a benchmark whose counts differ from the published ones."""


@dataclasses.dataclass
class SkipReport:
    """Files left out, counted by reason and by folder, with a few example paths per reason.

    Loaders fill it while scanning (`imagefiles.list_image_files`), the decode check
    (`decoding.drop_damaged`) adds the files that only a full decode finds; `as_dict` is what
    metrics.json and config.json record, `str()` what the console shows.
    """

    counts: dict = dataclasses.field(default_factory=dict)
    examples: dict = dataclasses.field(default_factory=dict)
    max_examples: int = 3
    folders: dict = dataclasses.field(default_factory=dict)

    def add(self, reason: str, path: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < self.max_examples:
            shown.append(path)
        folder = os.path.dirname(os.path.abspath(path))
        self.folders[folder] = self.folders.get(folder, 0) + 1

    def merge(self, other: "SkipReport") -> "SkipReport":
        """A new report holding the skips of both (examples capped at `max_examples` per reason)."""
        merged = SkipReport(dict(self.counts), {k: list(v) for k, v in self.examples.items()},
                            self.max_examples, dict(self.folders))
        for reason, count in other.counts.items():
            merged.counts[reason] = merged.counts.get(reason, 0) + count
            shown = merged.examples.setdefault(reason, [])
            shown.extend(p for p in other.examples.get(reason, []) if p not in shown)
            del shown[self.max_examples:]
        for folder, count in other.folders.items():
            merged.folders[folder] = merged.folders.get(folder, 0) + count
        return merged

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict:
        """`{"total", "by_reason", "by_folder", "examples"}`, sorted, ready for a JSON file."""
        return {"total": self.total, "by_reason": dict(sorted(self.counts.items())),
                "by_folder": dict(sorted(self.folders.items())),
                "examples": {k: list(v) for k, v in sorted(self.examples.items())}}

    def __str__(self) -> str:
        if not self.counts:
            return "skipped: none"
        lines = [f"skipped {self.total} file(s):"]
        for reason in sorted(self.counts):
            lines.append(f"  {self.counts[reason]:>6}  {reason}  (e.g. {', '.join(self.examples[reason])})")
        if self.folders:
            lines.append("  per folder: " + ", ".join(f"{folder} {n}" for folder, n in sorted(self.folders.items())))
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class EvaluationProtocol:
    """An evaluation protocol a dataset supports: its `name` (a key of
    `reid_keras.metrics.dataset_protocols.DATASET_PROTOCOLS`), its `options` and the extra image
    `records` it needs (e.g. the multi-query boxes)."""

    name: str
    options: dict = dataclasses.field(default_factory=dict)
    records: tuple = ()


@dataclasses.dataclass
class ReidDataset:
    """A loaded re-ID benchmark: train / query / gallery records plus what the loader saw."""

    name: str
    root: str
    train: list
    query: list
    gallery: list
    train_id_map: dict = dataclasses.field(default_factory=dict)
    skipped: SkipReport = dataclasses.field(default_factory=SkipReport)
    info: dict = dataclasses.field(default_factory=dict)
    # The keyword options it was loaded with (`load_dataset` fills it): name + root + options reload it.
    options: dict = dataclasses.field(default_factory=dict)
    protocols: tuple = ()

    # What the dataset holds: person crops (re-ID); `SearchDataset.kind` is "scenes". Families say
    # which kind they train on (`Family.data`).
    kind = "crops"

    def protocol(self, name: str):
        """The declared `EvaluationProtocol` called `name`, or None."""
        return next((p for p in self.protocols if p.name == name), None)

    @property
    def num_train_ids(self) -> int:
        return len(self.train_id_map) if self.train_id_map else len({r.pid for r in self.train})

    def split_stats(self) -> list:
        """Rows `(split, ids, images, cameras)` for train, query and gallery."""
        rows = []
        for split in ("train", "query", "gallery"):
            records = getattr(self, split)
            rows.append((split, len({r.pid for r in records}), len(records),
                         len({r.camid for r in records})))
        return rows

    def summary(self) -> str:
        """A printable table of ids / images / cameras per split, then the skip report."""
        lines = [f"{self.name} at {self.root}", f"{'split':<8} {'ids':>7} {'images':>8} {'cameras':>8}"]
        for split, ids, images, cams in self.split_stats():
            lines.append(f"{split:<8} {ids:>7} {images:>8} {cams:>8}")
        for key, value in self.info.items():
            lines.append(f"{key}: {value}")
        lines.append(str(self.skipped))
        return "\n".join(lines)


def relabel(records: Iterable[ImageRecord]) -> tuple[list, dict]:
    """Dense labels 0..N-1 over the sorted distinct pids (never `pid - 1`, never set order)."""
    records = list(records)
    id_map = {pid: label for label, pid in enumerate(sorted({r.pid for r in records}))}
    return [ImageRecord(r.path, id_map[r.pid], r.camid) for r in records], id_map


def resolve_root(root: str, candidates: Iterable[str], required: Iterable[str], layout: str) -> str:
    """Return the dataset folder given the unpacked folder itself or its parent.

    Args:
        root: what the user passed.
        candidates: names the unpacked folder usually has (e.g. `Market-1501-v15.09.15`).
        required: entries that must exist inside the dataset folder.
        layout: a short drawing of the expected layout, quoted in the error.

    Raises:
        DatasetLayoutError naming the missing root or the first missing entry.
    """
    required = list(required)
    if not os.path.isdir(root):
        raise DatasetLayoutError(f"dataset root {root!r} does not exist or is not a folder; expected:\n{layout}")
    options = [root] + [os.path.join(root, c) for c in candidates]
    for option in options:
        if all(os.path.exists(os.path.join(option, r)) for r in required):
            return option
    # Report against the most plausible folder: a named candidate if present, else the root.
    best = next((o for o in options[1:] if os.path.isdir(o)), root)
    missing = [r for r in required if not os.path.exists(os.path.join(best, r))]
    raise DatasetLayoutError(
        f"no {'folder or file'} {missing[0]!r} under {best}: expected the layout\n{layout}\n"
        "(pass the unpacked folder or its parent; see data/README.md)")


def check_counts(name: str, found: dict, expected: dict, strict: bool) -> None:
    """Compare split counts with the published ones (docs/datasets.md tables).

    Only called when the loader judges the copy to be complete; `strict=False` (custom subsets)
    turns the error into a no-op.
    """
    if not strict:
        return
    wrong = {k: (expected[k], found.get(k)) for k in expected if found.get(k) != expected[k]}
    if wrong:
        rows = "\n".join(f"  {k}: expected {e}, found {f}" for k, (e, f) in wrong.items())
        raise DatasetCountError(
            f"{name}: counts differ from the published ones:\n{rows}\n"
            "Is the copy incomplete or modified? Pass strict=False (--no-strict) for a custom subset.")
