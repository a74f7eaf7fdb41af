"""Cheap validity checks for image files found on disk (issue 2, item 5; docs/datasets.md §0).

`probe_image_file` reads the first and last few bytes of a file, never decodes it, so a loader can
check every file of the Market-1501 500k distractor folder in seconds. It catches what breaks a
training run hours later: empty files, files that are not images at all (an HTML error page saved
as `.jpg`) and downloads cut short. Unusual but valid images (grayscale, RGBA, 16-bit PNG, 1x1)
pass: decoding them is the pipeline's job.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a runtime import would make imagefiles <-> datasets circular
    from reid_keras.data.datasets.base import SkipReport

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")

# How much of the end of a file is read. Some writers pad a JPEG after its EOI marker with zeros
# up to a block boundary; 4 KiB covers the usual padding while keeping the probe at two reads.
_TAIL_BYTES = 4096
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"  # chunk type + CRC of the (always empty) IEND chunk

REASON_EMPTY = "empty file (0 bytes)"
REASON_NOT_IMAGE = "not an image (unknown magic bytes)"
REASON_JPEG_TRUNCATED = "truncated JPEG (no EOI marker FFD9 at the end)"
REASON_PNG_TRUNCATED = "truncated PNG (no IEND chunk at the end)"
REASON_BMP_TRUNCATED = "truncated BMP (shorter than its header says)"
REASON_GIF_TRUNCATED = "truncated GIF (no trailer byte 3B at the end)"
REASON_UNREADABLE = "unreadable file"
REASON_EXTENSION = "not an image file name (extension)"
REASON_MISSING = "missing file"
REASON_BROKEN_LINK = "broken symbolic link (its target does not exist)"
REASON_FOLDER = "a folder named like an image file"
REASON_NOT_REGULAR = "not a regular file (device, pipe or socket)"


def path_problem(path: str) -> str | None:
    """Why `path` is not a regular file (missing, broken link, folder, pipe...), or None."""
    if os.path.isfile(path):
        return None
    if os.path.islink(path) and not os.path.exists(path):
        return REASON_BROKEN_LINK
    if not os.path.lexists(path):
        return REASON_MISSING
    return REASON_FOLDER if os.path.isdir(path) else REASON_NOT_REGULAR


def image_kind(head: bytes) -> str | None:
    """`'jpeg'`, `'png'`, `'bmp'`, `'gif'` from a file's first bytes, or None."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head.startswith(b"BM") and len(head) >= 6:
        return "bmp"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    return None


def probe_image_file(path: str) -> str | None:
    """Return why `path` is not a usable image file, or None if it looks complete.

    Checks, without decoding: size 0; magic bytes of JPEG / PNG / BMP / GIF; a JPEG must end with
    the EOI marker FFD9 (trailing zero padding allowed); a PNG must end with its IEND chunk; a
    BMP must be at least as long as its header's file size; a GIF must end with its trailer.
    """
    try:
        with open(path, "rb", buffering=0) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                return REASON_EMPTY
            head = handle.read(16)
            kind = image_kind(head)
            if kind is None:
                return REASON_NOT_IMAGE
            if kind == "bmp":
                declared = int.from_bytes(head[2:6], "little")
                return REASON_BMP_TRUNCATED if size < declared else None
            if size > len(head):
                handle.seek(max(0, size - _TAIL_BYTES))
                tail = handle.read()
            else:
                tail = head
    except OSError as err:
        return f"{REASON_UNREADABLE} ({err.__class__.__name__})"
    # Zero padding after the end marker is harmless for every decoder we use.
    tail = tail.rstrip(b"\x00")
    if kind == "jpeg":
        return None if tail.endswith(b"\xff\xd9") else REASON_JPEG_TRUNCATED
    if kind == "png":
        return None if tail.endswith(_PNG_IEND) else REASON_PNG_TRUNCATED
    return None if tail.endswith(b"\x3b") else REASON_GIF_TRUNCATED


def has_image_extension(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def list_image_files(folder: str, skipped: "SkipReport", recursive: bool = False) -> list:
    """Sorted absolute paths of the usable image files in `folder`.

    Files with another extension and files failing `probe_image_file` are added to `skipped` with
    their reason. Hidden files (`.DS_Store`, `._x.jpg` from macOS archives) count as skips too, so
    the summary shows them, and so do broken symbolic links, pipes and (without `recursive`)
    folders named like images; other subfolders are not read. The order is sorted by relative
    path, hence the same on every machine.
    """
    paths = []
    if recursive:
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            paths.extend(os.path.join(dirpath, f) for f in filenames)
    else:
        with os.scandir(folder) as entries:
            paths = [e.path for e in entries if not e.is_dir() or has_image_extension(e.name)]
    paths.sort()
    kept = []
    for path in paths:
        name = os.path.basename(path)
        reason = path_problem(path)
        if reason is not None:
            skipped.add(reason, path)
            continue
        if not has_image_extension(name):
            skipped.add(REASON_EXTENSION, path)
            continue
        reason = probe_image_file(path)
        if reason is not None:
            skipped.add(reason, path)
            continue
        kept.append(os.path.abspath(path))
    return kept
