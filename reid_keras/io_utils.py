"""Atomic writes: a killed run leaves either the old file/folder or the new one, never half of one.

Everything is written to a temporary name in the destination's own folder (same file system, so
the final `os.replace` / `os.rename` is atomic) and renamed into place only when complete.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import shutil
import tempfile
from typing import Callable, Optional


def _parent(path: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    return parent


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _publish_mode(path: str, directory: bool = False) -> None:
    # mkstemp/mkdtemp create 0600/0700 entries; give the final file the usual permissions.
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


# Compound extensions kept whole on temporary files: Keras picks the format from them.
_COMPOUND_SUFFIXES = (".weights.h5",)


def _suffix(path: str) -> str:
    name = os.path.basename(path)
    for suffix in _COMPOUND_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return os.path.splitext(name)[1]


def atomic_write(path: str, write_fn: Callable[[str], object]) -> str:
    """Call `write_fn(tmp)` to write a temporary file, then move it over `path`; returns `path`.

    `tmp` is in `path`'s folder and ends with the same extension (".keras", ".weights.h5",
    ".npz", ".png", ...) because Keras, numpy and matplotlib choose the format from it. The file
    is flushed to disk before the rename. On any exception (including KeyboardInterrupt) the
    temporary file is removed and `path` keeps its old content.
    """
    fd, tmp = tempfile.mkstemp(dir=_parent(path), prefix=f".{os.path.basename(path)}.",
                               suffix=f".tmp{_suffix(path)}")
    os.close(fd)
    try:
        write_fn(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        _publish_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path


def atomic_write_bytes(path: str, data: bytes) -> str:
    """Write `data` to `path` atomically; returns `path`."""
    def write(tmp):
        with open(tmp, "wb") as handle:
            handle.write(data)
    return atomic_write(path, write)


def atomic_write_text(path: str, text: str, encoding: str = "utf-8") -> str:
    """Write `text` to `path` atomically; returns `path`."""
    def write(tmp):
        with open(tmp, "w", encoding=encoding) as handle:
            handle.write(text)
    return atomic_write(path, write)


def atomic_write_json(path: str, obj, indent: Optional[int] = 2, sort_keys: bool = True,
                      default: Optional[Callable] = None, allow_nan: bool = True) -> str:
    """Write `obj` as JSON (plus a final newline) to `path` atomically; returns `path`.

    Tuples become lists. `default` converts values JSON lacks (e.g. `str`); `allow_nan=False`
    raises on NaN / inf instead of writing tokens that strict readers reject.
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default, allow_nan=allow_nan)
    return atomic_write_text(path, text + "\n")


def jsonable(value):
    """`value` with numpy scalars / arrays as Python numbers / lists, tuples as lists, NaN and inf as None."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy arrays and scalars
        return jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


def write_json(path: str, obj, sort_keys: bool = True) -> str:
    """The JSON writer of run files (config.json, metrics.json, state.json, ...), atomically.

    numpy values become numbers, NaN / inf become null (strict JSON readers reject NaN), and what
    JSON lacks (paths, dtypes) is written as its string.
    """
    return atomic_write_json(path, jsonable(obj), sort_keys=sort_keys, default=str, allow_nan=False)


def append_csv_row(path: str, row: dict, fields=()) -> str:
    """Append `row` to the CSV at `path` atomically (rewrite + replace); the header starts with `fields`
    (or the file's own header) and widens for keys it does not have yet."""
    rows, header = [], list(fields)
    if os.path.isfile(path):
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            header = list(reader.fieldnames or fields)
            rows = list(reader)
    header += [k for k in row if k not in header]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows + [row])
    return atomic_write_text(path, buffer.getvalue())


def atomic_save_keras(model, path: str) -> str:
    """`model.save(path)` through a temporary `.keras` file in the same folder; returns `path`.

    Raises:
        ValueError: `path` does not end in `.keras` (Keras 3's native format).
    """
    if not str(path).endswith(".keras"):
        raise ValueError(f"atomic_save_keras: {path!r} must end in .keras")
    return atomic_write(path, model.save)


@contextlib.contextmanager
def atomic_export_dir(path: str):
    """Context manager yielding a fresh temporary folder that becomes `path` on success.

    An existing `path` is replaced only after the new folder is complete (moved aside, the new one
    renamed in, then the old one deleted); on an exception the temporary folder is removed and
    `path` is left as it was.

    Example:
        >>> with atomic_export_dir("runs/x/export") as tmp:
        ...     tf.saved_model.save(module, tmp)
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"export destination {path!r} exists and is not a folder")
    tmp = tempfile.mkdtemp(dir=_parent(path), prefix=f".{os.path.basename(path)}.tmp-")
    try:
        yield tmp
        _publish_mode(tmp, directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.old-")
        os.rmdir(old)
        os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        if old is not None:
            os.rename(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
