"""Image bytes -> pixels, the one decoder every stream and command uses, and the checks that find
damaged image files before they reach a stream.

`decode_image` runs inside tf.data graphs. The checks name what would otherwise drop out of an
epoch unnamed, end an evaluation, or decode to wrong pixels:

- `check_image_file(path)`: why one file is not a usable image, or None;
- `find_damaged(paths)`: the same for many files, batched, remembered per file (size + mtime);
- `drop_damaged(dataset)`: the dataset without its damaged records, and their `SkipReport`;
- `validate_records(records)`: the older coarse pass (missing / empty / not decodable).

A file is damaged when the cheap probe rejects it (`imagefiles.probe_image_file`: empty, not an
image, no end marker), when TensorFlow cannot decode it, or, for a JPEG, when libjpeg decodes it
only with a "corrupt data" warning. That last case is the silent one: a JPEG whose entropy-coded
data is damaged (bytes overwritten, or cut and re-terminated with FFD9) decodes "successfully",
the missing part grey, while libjpeg prints `Corrupt JPEG data: premature end of data segment`
to the process's stderr without a file name; TensorFlow, OpenCV and Pillow all return the pixels
and expose no warning count. So each JPEG is decoded once more by OpenCV (the same libjpeg-turbo)
at 1/8 scale, which still entropy-decodes every coefficient, where those warnings arise, while
file descriptor 2 points at a temporary file; a warning written during that decode marks the
file. Corruption that libjpeg itself does not notice (e.g. overwritten bytes that still form
valid Huffman codes) changes pixels without any signal and cannot be found this way.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
import tempfile
import threading

import numpy as np
import tensorflow as tf

from reid_keras.data import imagefiles
from reid_keras.data.datasets.base import DatasetLayoutError, ImageRecord, SkipReport

AUTOTUNE = tf.data.AUTOTUNE
_PNG = b"\x89PNG\r\n\x1a\n"
# Formats tf.io.decode_image reads, by leading bytes: JPEG, PNG, GIF, BMP, WebP (RIFF).
_MAGICS = (b"\xff\xd8\xff", _PNG, b"GIF8", b"BM", b"RIFF")

REASON_MISSING = imagefiles.REASON_MISSING
REASON_EMPTY = imagefiles.REASON_EMPTY
REASON_NOT_DECODABLE = "not decodable (truncated, corrupt or not an image)"
REASON_CORRUPT_JPEG = "corrupt JPEG data (decodes only with the libjpeg warning: {})"
# libjpeg warnings that mean the pixels are wrong (jerror.h JWRN_*: HIT_MARKER, EXTRANEOUS_DATA,
# HUFF_BAD_CODE, ARITH_BAD_CODE, MUST_RESYNC, JPEG_EOF, NOT_SEQUENTIAL). Its other warnings (an
# unknown JFIF version, a bad ICC profile marker) leave the pixels intact and are passed on.
_JPEG_DAMAGE = ("Corrupt JPEG data", "Premature end of JPEG file", "Invalid SOS parameters")
_JPEG_HARMLESS = ("bad ICC marker",)
# Bump when the check changes what it reports: cached verdicts of an older check are redone.
CHECK_VERSION = 1


def decode_image(contents, path=""):
    """Encoded bytes -> (h, w, 3) float32 RGB in [0, 255].

    Gray is repeated to RGB; alpha is dropped (as PIL's `convert("RGB")` does). 16-bit PNGs are
    scaled by 255/65535: TensorFlow's own uint8 path truncates them (`v >> 8`, so 65280 -> 255
    and 255 -> 0), hence PNGs are decoded as uint16 (8-bit ones arrive as v * 257) and divided by 257.
    """
    head = tf.strings.substr(contents, 0, 4)
    known = tf.reduce_any(tf.stack([tf.strings.substr(contents, 0, len(m)) == m for m in _MAGICS]))
    tf.debugging.Assert(known, ["not a decodable image (empty file or unknown format):", path, head])
    is_png = tf.strings.substr(contents, 0, len(_PNG)) == _PNG

    def png():
        return tf.cast(tf.io.decode_png(contents, channels=3, dtype=tf.uint16), tf.float32) / 257.0

    def other():
        return tf.cast(tf.io.decode_image(contents, channels=3, expand_animations=False), tf.float32)

    return tf.ensure_shape(tf.cond(is_png, png, other), [None, None, 3])


# ------------------------------------------------------------------------------ strict JPEG check

_CAPTURE_LOCK = threading.Lock()


class _StderrCapture:
    """Point file descriptor 2 (libjpeg's stderr) at a temporary file; `take()` returns what was
    written since the last call. On exit fd 2 is restored and `passed_on` lines are written to it.

    Process-wide while active: output of other threads lands here too and is passed on at exit.
    """

    def __enter__(self):
        _CAPTURE_LOCK.acquire()
        try:
            sys.stderr.flush()
            # Append mode: writes through fd 2 always go to the end, whatever position we read from.
            self.file = tempfile.TemporaryFile(mode="a+b")
            self.saved = os.dup(2)
            os.dup2(self.file.fileno(), 2)
        except BaseException:
            _CAPTURE_LOCK.release()
            raise
        self.read_to, self.passed_on = 0, []
        return self

    def take(self) -> str:
        size = os.fstat(self.file.fileno()).st_size
        if size <= self.read_to:
            return ""
        self.file.seek(self.read_to)
        data = self.file.read(size - self.read_to)
        self.read_to = size
        return data.decode("utf-8", "replace")

    def __exit__(self, *exc):
        try:
            sys.stderr.flush()
            os.dup2(self.saved, 2)
            os.close(self.saved)
            self.passed_on.extend(self.take().splitlines())
            self.file.close()
            if self.passed_on:
                os.write(2, ("\n".join(self.passed_on) + "\n").encode("utf-8", "replace"))
        finally:
            _CAPTURE_LOCK.release()


def _jpeg_damage(text: str) -> str | None:
    """The first libjpeg warning in `text` that means damaged pixels, numbers replaced by N."""
    for line in text.splitlines():
        if any(m in line for m in _JPEG_DAMAGE) and not any(m in line for m in _JPEG_HARMLESS):
            return re.sub(r"\b\d+\b", "N", line.strip())
    return None


def _strict_jpeg(path: str, capture: _StderrCapture) -> str | None:
    """Decode the JPEG `path` with OpenCV (libjpeg-turbo) while `capture` holds fd 2; a reason or None."""
    import cv2  # only for this check; the pipelines decode with TensorFlow

    data = np.fromfile(path, dtype=np.uint8)
    capture.passed_on.extend(capture.take().splitlines())
    image = cv2.imdecode(data, cv2.IMREAD_REDUCED_GRAYSCALE_8)
    text = capture.take()
    if image is None:
        return REASON_NOT_DECODABLE
    damage = _jpeg_damage(text)
    if damage is not None:
        return REASON_CORRUPT_JPEG.format(damage.replace("Corrupt JPEG data: ", ""))
    capture.passed_on.extend(f"note: while checking {path}: {line}" for line in text.splitlines() if line.strip())
    return None


def _is_jpeg(path: str) -> bool:
    with open(path, "rb") as handle:
        return handle.read(3) == b"\xff\xd8\xff"


def _tf_undecodable(paths: list, batch_size: int = 256) -> set:
    """Indices of `paths` that `decode_image` (the pipelines' decoder) fails on, decoded in parallel."""
    if not paths:
        return set()
    constant = tf.constant(paths)
    ds = tf.data.Dataset.range(len(paths)).map(
        lambda i: (tf.shape(decode_image(tf.io.read_file(constant[i]), constant[i]))[0], i),
        num_parallel_calls=AUTOTUNE)
    decoded = set()
    for _, idx in ds.ignore_errors().batch(batch_size):
        decoded.update(int(j) for j in idx.numpy())
    return set(range(len(paths))) - decoded


def _check_all(paths: list, batch_size: int) -> dict:
    """{path: reason} for the damaged ones among `paths` (no cache)."""
    reasons, jpegs, others = {}, [], []
    for path in paths:
        reason = imagefiles.path_problem(path) or imagefiles.probe_image_file(path)
        if reason is not None:
            reasons[path] = reason
        else:
            try:
                (jpegs if _is_jpeg(path) else others).append(path)
            except OSError as err:
                reasons[path] = f"{imagefiles.REASON_UNREADABLE} ({err.__class__.__name__})"
    if jpegs:
        with _StderrCapture() as capture:
            for path in jpegs:
                try:
                    reason = _strict_jpeg(path, capture)
                except OSError as err:
                    reason = f"{imagefiles.REASON_UNREADABLE} ({err.__class__.__name__})"
                if reason is not None:
                    reasons[path] = reason
    survivors = [p for p in jpegs if p not in reasons] + others
    for i in _tf_undecodable(survivors, batch_size):
        reasons[survivors[i]] = REASON_NOT_DECODABLE
    return reasons


def check_image_file(path: str) -> str | None:
    """Why the file at `path` is not a usable image, or None when it is.

    Reasons: the probe's (`imagefiles`: missing, empty, not an image, truncated, ...), not decodable
    by TensorFlow, or a JPEG libjpeg decodes only with a corrupt-data warning (`REASON_CORRUPT_JPEG`).
    """
    return _check_all([os.fspath(path)], batch_size=1).get(os.fspath(path))


# ------------------------------------------------------------------------------ many files, cached

def default_cache_dir() -> str:
    """Where verdicts are remembered: $REID_KERAS_CACHE, else $XDG_CACHE_HOME/reid_keras, else
    ~/.cache/reid_keras (each with an `image_checks` subfolder)."""
    base = os.environ.get("REID_KERAS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "reid_keras")
    return os.path.join(base, "image_checks")


def _stamp(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _library_versions() -> str:
    import cv2

    return f"{CHECK_VERSION}/tf {tf.__version__}/cv2 {cv2.__version__}"


def _cache_path(cache_dir: str, scope: str) -> str:
    digest = hashlib.sha1(os.path.abspath(scope).encode("utf-8")).hexdigest()[:16]
    return os.path.join(cache_dir, f"{digest}.json")


def _read_cache(path: str, versions: str) -> dict:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return {}  # none yet, or damaged: checked again
    return data.get("files", {}) if data.get("versions") == versions else {}


def find_damaged(paths, batch_size: int = 256, cache_dir: str | None = None, use_cache: bool = True,
                 scope: str | None = None) -> dict:
    """`{path: reason}` for the damaged files among `paths` (`check_image_file`'s reasons), in bulk.

    JPEGs are checked one after another (the libjpeg warning is read per file), then every file that
    passed is decoded by TensorFlow in parallel. Each verdict is remembered with the file's size and
    modification time in `cache_dir` (default `default_cache_dir()`), one file per `scope` folder
    (default: the common folder of `paths`), so checking an unchanged dataset again takes a stat
    per file. `use_cache=False` checks everything and writes nothing.
    """
    from reid_keras.io_utils import atomic_write_json

    paths = list(dict.fromkeys(os.fspath(p) for p in paths))
    if not paths:
        return {}
    if not use_cache:
        return _check_all(paths, batch_size)
    scope = scope or os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    cache_file = _cache_path(cache_dir or default_cache_dir(), scope)
    versions = _library_versions()
    cached = _read_cache(cache_file, versions)
    stamps = {p: _stamp(p) for p in paths}
    reasons, todo = {}, []
    for p in paths:
        entry = cached.get(os.path.abspath(p))
        if stamps[p] is not None and entry is not None and entry[:2] == stamps[p]:
            if entry[2] is not None:
                reasons[p] = entry[2]
        else:
            todo.append(p)
    if not todo:
        return reasons
    found = _check_all(todo, batch_size)
    reasons.update(found)
    fresh = _read_cache(cache_file, versions)  # another process may have added entries meanwhile
    fresh.update({os.path.abspath(p): [*stamps[p], found.get(p)] for p in todo if stamps[p] is not None})
    try:
        os.makedirs(os.path.dirname(cache_file), exist_ok=True)
        atomic_write_json(cache_file, {"scope": os.path.abspath(scope), "versions": versions, "files": fresh},
                          indent=None)
    except OSError:
        pass  # a cache that cannot be written costs time on the next check, nothing else
    return reasons


def _split_folder(records, damaged: dict) -> str:
    paths = [r.path for r in records] or list(damaged)
    folders = sorted({os.path.dirname(os.path.abspath(p)) for p in paths})
    return folders[0] if len(folders) == 1 else ", ".join(folders[:3]) + (" ..." if len(folders) > 3 else "")


def drop_damaged(dataset, splits=("train", "query", "gallery"), batch_size: int = 256,
                 cache_dir: str | None = None, use_cache: bool = True):
    """Return `(dataset without its damaged records, SkipReport of them)`; `dataset` is unchanged.

    Checks every record of `splits` and of the dataset's evaluation protocols (`find_damaged`),
    removes the damaged ones (training labels are kept as they are: an identity whose images are
    all damaged simply has none), adds them to the returned dataset's `skipped` report and its
    `info`. Call it once on a loaded dataset before training or evaluating on it.

    Raises:
        DatasetLayoutError: a split of `splits` that had records has none left, naming its folder.
    """
    # Person-search datasets name their image splits (train scenes, gallery scenes).
    splits = getattr(dataset, "image_splits", splits)
    records = [r for split in splits for r in getattr(dataset, split)]
    records += [r for p in getattr(dataset, "protocols", ()) for r in p.records if hasattr(r, "path")]
    damaged = find_damaged([r.path for r in records], batch_size=batch_size, cache_dir=cache_dir,
                           use_cache=use_cache, scope=getattr(dataset, "root", None))
    report = skip_report(damaged)
    changes = {}
    for split in splits:
        before = getattr(dataset, split)
        kept = [r for r in before if r.path not in damaged]
        if before and not kept:
            lost = {r.path: damaged[r.path] for r in before}
            raise DatasetLayoutError(
                f"{dataset.name}: no usable image left in the {split} split ({_split_folder(before, lost)}): all "
                f"{len(before)} image(s) are damaged\n{skip_report(lost)}")
        changes[split] = kept
    protocols = tuple(dataclasses.replace(p, records=tuple(r for r in p.records if getattr(r, "path", None)
                                                           not in damaged)) for p in dataset.protocols)
    # Scenes (person search): the queries of a damaged scene go too (`SearchDataset.without_paths`).
    base = dataset.without_paths(damaged) if hasattr(dataset, "without_paths") else \
        dataclasses.replace(dataset, **changes)
    info = dict(base.info)
    if damaged:
        info["damaged images dropped (full decode check)"] = len(damaged)
    cleaned = dataclasses.replace(base, protocols=protocols, info=info, skipped=dataset.skipped.merge(report))
    return cleaned, report


def skip_report(damaged: dict) -> SkipReport:
    """A `SkipReport` of `{path: reason}` (paths in sorted order, so the examples are stable)."""
    report = SkipReport()
    for path in sorted(damaged):
        report.add(damaged[path], path)
    return report


# ------------------------------------------------------------------------------ coarse record check

def _records(records) -> list:
    records = [ImageRecord(str(r[0]), int(r[1]), int(r[2])) for r in records]
    if not records:
        raise ValueError("records is empty: nothing to check")
    return records


def validate_records(records, batch_size: int = 256) -> tuple[list, SkipReport]:
    """Fully decode every record once; return the decodable records and a SkipReport of the rest.

    Reasons: "missing file", "empty file (0 bytes)", `REASON_NOT_DECODABLE` (TensorFlow's decoder
    fails) and `REASON_CORRUPT_JPEG` (decodes only with a libjpeg corrupt-data warning). For the
    probe's finer reasons and a cache use `find_damaged` / `drop_damaged`.
    """
    records = _records(records)
    report = SkipReport()
    candidates = []
    for i, r in enumerate(records):
        if not os.path.isfile(r.path):
            report.add(REASON_MISSING, r.path)
        elif os.path.getsize(r.path) == 0:
            report.add(REASON_EMPTY, r.path)
        else:
            candidates.append(i)
    failed = {candidates[j] for j in _tf_undecodable([records[i].path for i in candidates], batch_size)}
    jpegs = [i for i in candidates if i not in failed and _is_jpeg(records[i].path)]
    corrupt = {}
    if jpegs:
        with _StderrCapture() as capture:
            for i in jpegs:
                reason = _strict_jpeg(records[i].path, capture)
                if reason is not None:
                    corrupt[i] = reason
    good = []
    for i, r in enumerate(records):
        if i in failed:
            report.add(REASON_NOT_DECODABLE, r.path)
        elif i in corrupt:
            report.add(corrupt[i], r.path)
        elif i in candidates:
            good.append(r)
    return good, report
