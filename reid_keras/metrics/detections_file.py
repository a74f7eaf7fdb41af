"""The detections file: a detector's output on every gallery scene (and optionally the query
embeddings) in one `.npz`, so that any detector, a PyTorch one included, can be scored with
`python -m reid_keras.evaluate_search` (docs/protocols.md (d), (e)).

Layout (numpy `.npz`, no pickled objects; M detections over I images, embedding size D):

| array | shape, dtype | content |
| --- | --- | --- |
| `names` | [I] str | gallery image file names, e.g. `s15533.jpg` (basenames, as the protocol lists them) |
| `boxes` | [M, 4] float32 | `x1, y1, x2, y2` in the image's own pixels |
| `scores` | [M] float32 | detection (person) scores |
| `embeddings` | [M, D] float32 | re-ID embeddings of the detections (normalised by the evaluation if not unit) |
| `image_index` | [M] int32 | row -> index into `names` |
| `query_embeddings` | [Q, D] float32, optional | one embedding per query box, in the dataset's query order |
| `format_version` | scalar int | 1 |
| `dataset_name` | scalar str, optional | what the file was made for (a note, not checked) |

An image listed in `names` without rows had no detection; an image missing from `names` counts the
same (its ground truth still counts, docs/protocols.md (d)). Keep detections down to a low score
(e.g. 0.01): detection AP uses them (docs/protocols.md (e)); the search uses those >= 0.5.

Example (writing the file from PyTorch outputs):
    >>> dets = {"s15533.jpg": (boxes_xyxy, scores, embeddings)}          # doctest: +SKIP
    >>> save_detections("dets.npz", dets, query_embeddings=q, dataset_name="cuhk_sysu")  # doctest: +SKIP
"""
from __future__ import annotations

import os
import zipfile

import numpy as np

from reid_keras.io_utils import atomic_write

FORMAT_VERSION = 1
REQUIRED_ARRAYS = ("names", "boxes", "scores", "embeddings", "image_index", "format_version")


class DetectionsFileError(ValueError):
    """A detections file (or the detections given to `save_detections`) that does not follow the layout."""


def _image_arrays(name, entry, where: str):
    """(boxes [N, 4], scores [N], embeddings [N, D] or None when N == 0 and D is unknown) of one image."""
    try:
        boxes, scores, embeddings = entry
    except (TypeError, ValueError):
        raise DetectionsFileError(f"{where}[{name!r}]: expected a tuple (boxes [N, 4], scores [N], "
                                  f"embeddings [N, D])") from None
    boxes, scores, embeddings = (np.asarray(a, np.float32) for a in (boxes, scores, embeddings))
    n = len(scores.reshape(-1))
    if boxes.size == 0 and n == 0:
        boxes = boxes.reshape(0, 4)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise DetectionsFileError(f"{where}[{name!r}]: boxes have shape {boxes.shape}, expected [N, 4] "
                                  "(x1, y1, x2, y2)")
    if scores.ndim != 1 or len(scores) != len(boxes):
        raise DetectionsFileError(f"{where}[{name!r}]: {len(boxes)} box(es) but scores of shape {scores.shape}, "
                                  f"expected [{len(boxes)}]")
    if len(boxes) == 0 and embeddings.ndim != 2:
        return boxes, scores, None
    if embeddings.ndim != 2 or len(embeddings) != len(boxes):
        raise DetectionsFileError(f"{where}[{name!r}]: {len(boxes)} box(es) but embeddings of shape "
                                  f"{embeddings.shape}, expected [{len(boxes)}, D]")
    return boxes, scores, embeddings


def save_detections(path: str, detections: dict, query_embeddings=None, dataset_name: str | None = None) -> str:
    """Write `detections` (image file name -> (boxes [N, 4] x1y1x2y2, scores [N], embeddings [N, D]))
    and optionally `query_embeddings` [Q, D] to the `.npz` at `path`, atomically; returns `path`.

    Raises:
        DetectionsFileError naming the argument (and the image) whose arrays do not fit the layout.
    """
    if not str(path).endswith(".npz"):
        raise DetectionsFileError(f"save_detections: path {path!r} must end in .npz")
    if not isinstance(detections, dict):
        raise DetectionsFileError(f"detections: expected a dict image name -> (boxes, scores, embeddings), "
                                  f"got {type(detections).__name__}")
    names, per_image, dim = [], [], None
    for name, entry in detections.items():
        if not isinstance(name, str) or not name:
            raise DetectionsFileError(f"detections: image names must be non-empty strings, got {name!r}")
        boxes, scores, embeddings = _image_arrays(name, entry, "detections")
        if embeddings is not None:
            if dim is not None and embeddings.shape[1] != dim:
                raise DetectionsFileError(f"detections[{name!r}]: embeddings of size {embeddings.shape[1]}, "
                                          f"but earlier images have size {dim}")
            dim = embeddings.shape[1]
        names.append(name)
        per_image.append((boxes, scores, embeddings))
    arrays = {}
    if query_embeddings is not None:
        query = np.asarray(query_embeddings, np.float32)
        if query.ndim != 2 or (dim is not None and query.shape[1] != dim):
            raise DetectionsFileError(f"query_embeddings: shape {query.shape}, expected [Q, "
                                      f"{dim if dim is not None else 'D'}] (D = the detections' embedding size)")
        dim = query.shape[1] if dim is None else dim
        arrays["query_embeddings"] = query
    dim = 0 if dim is None else dim
    counts = np.array([len(s) for _, s, _ in per_image], np.int64)
    arrays.update(
        names=np.array(names, dtype=str).reshape(-1),
        boxes=np.concatenate([b for b, _, _ in per_image] + [np.zeros((0, 4), np.float32)]),
        scores=np.concatenate([s for _, s, _ in per_image] + [np.zeros(0, np.float32)]),
        embeddings=np.concatenate([e for _, _, e in per_image if e is not None] + [np.zeros((0, dim), np.float32)]),
        image_index=np.repeat(np.arange(len(names), dtype=np.int32), counts),
        format_version=np.array(FORMAT_VERSION, np.int64))
    if dataset_name is not None:
        arrays["dataset_name"] = np.array(str(dataset_name))

    def write(tmp):
        with open(tmp, "wb") as handle:  # a file object: numpy adds no second ".npz"
            np.savez(handle, **arrays)

    return atomic_write(str(path), write)


def _open(path: str) -> dict:
    if not os.path.isfile(path):
        raise DetectionsFileError(f"detections file {path!r} does not exist")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as handle:
            npy = handle.read(6) == b"\x93NUMPY"
        what = "a single array (.npy)" if npy else "not a readable .npz file (no zip archive)"
        raise DetectionsFileError(f"{path}: {what}, expected an .npz holding {', '.join(REQUIRED_ARRAYS)}")
    try:
        with np.load(path, allow_pickle=False) as loaded:
            return {key: loaded[key] for key in loaded.files}
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        raise DetectionsFileError(f"{path}: not a readable .npz file ({err})") from None
    except ValueError as err:  # pickled object arrays
        raise DetectionsFileError(f"{path}: an array holds Python objects ({err}); store names as a numpy "
                                  "string array (np.array(names, dtype=str))") from None


def _check(path: str, data: dict) -> None:
    missing = [key for key in REQUIRED_ARRAYS if key not in data]
    if missing:
        raise DetectionsFileError(f"{path}: missing array(s) {', '.join(missing)}; a detections file holds "
                                  f"{', '.join(REQUIRED_ARRAYS)} (see reid_keras/metrics/detections_file.py)")
    version = data["format_version"]
    if version.shape != () or not np.issubdtype(version.dtype, np.integer) or int(version) != FORMAT_VERSION:
        raise DetectionsFileError(f"{path}: format_version {version.tolist()!r} is not supported "
                                  f"(this reader knows {FORMAT_VERSION})")
    names, boxes, scores, embeddings, index = (data[k] for k in ("names", "boxes", "scores", "embeddings",
                                                                  "image_index"))
    if names.ndim != 1 or names.dtype.kind not in "US":
        raise DetectionsFileError(f"{path}: names has shape {names.shape} and dtype {names.dtype}, expected a "
                                  "1-d string array [I]")
    m = len(scores) if scores.ndim == 1 else None
    expected = {"scores": (scores, "[M]", scores.ndim == 1),
                "boxes": (boxes, f"[{m}, 4]", boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes) == m),
                "embeddings": (embeddings, f"[{m}, D]", embeddings.ndim == 2 and len(embeddings) == m),
                "image_index": (index, f"[{m}]", index.ndim == 1 and len(index) == m)}
    for key, (array, shape, ok) in expected.items():
        if not ok:
            raise DetectionsFileError(f"{path}: {key} has shape {array.shape}, expected {shape} "
                                      "(M = the number of detections, the length of scores)")
        if array.dtype.kind not in "fiu":
            raise DetectionsFileError(f"{path}: {key} has dtype {array.dtype}, expected numbers")
    if index.dtype.kind not in "iu":
        raise DetectionsFileError(f"{path}: image_index has dtype {index.dtype}, expected integers")
    bad = np.flatnonzero((index < 0) | (index >= len(names)))
    if len(bad):
        raise DetectionsFileError(f"{path}: image_index {int(index[bad[0]])} at row {int(bad[0])} is outside "
                                  f"0..{len(names) - 1} (names has {len(names)} entries); {len(bad)} row(s) out "
                                  "of range")
    unique, counts = np.unique(names, return_counts=True)
    if len(unique) != len(names):
        raise DetectionsFileError(f"{path}: names lists {str(unique[counts > 1][0])!r} {int(counts.max())} times; "
                                  "each image once")
    if "query_embeddings" in data:
        query = data["query_embeddings"]
        dim = embeddings.shape[1] if m else None
        if query.ndim != 2 or query.dtype.kind not in "fiu" or (dim is not None and query.shape[1] != dim):
            raise DetectionsFileError(f"{path}: query_embeddings has shape {query.shape}, expected [Q, "
                                      f"{dim if dim is not None else 'D'}] (D = the size of embeddings)")


def load_detections(path: str):
    """Read a detections file written by `save_detections` (or by hand in its layout).

    Returns:
        (detections, query_embeddings, meta): `detections` maps each name to (boxes [N, 4], scores [N],
        embeddings [N, D]) float32 in file row order (images without rows get empty arrays);
        `query_embeddings` [Q, D] float32 or None; `meta` has format_version, dataset_name (or None),
        num_images, num_detections, embedding_dim and path.

    Raises:
        DetectionsFileError naming the file and the array: missing file or array, shapes that disagree,
        image_index out of range, repeated names, unknown format_version.
    """
    path = str(path)
    data = _open(path)
    _check(path, data)
    names = [str(n) for n in data["names"]]
    boxes = data["boxes"].astype(np.float32, copy=False)
    scores = data["scores"].astype(np.float32, copy=False)
    embeddings = data["embeddings"].astype(np.float32, copy=False)
    index = data["image_index"].astype(np.int64, copy=False)
    order = np.argsort(index, kind="stable")  # group rows by image, keeping each image's row order
    bounds = np.searchsorted(index[order], np.arange(len(names) + 1))
    detections = {}
    for i, name in enumerate(names):
        rows = order[bounds[i]:bounds[i + 1]]
        detections[name] = (boxes[rows], scores[rows], embeddings[rows])
    query = data.get("query_embeddings")
    dataset_name = data.get("dataset_name")
    meta = {"format_version": int(data["format_version"]),
            "dataset_name": None if dataset_name is None else str(dataset_name),
            "num_images": len(names), "num_detections": int(len(scores)),
            "embedding_dim": int(embeddings.shape[1]), "path": path}
    return detections, (None if query is None else query.astype(np.float32, copy=False)), meta


def load_query_embeddings(path: str) -> np.ndarray:
    """Query embeddings [Q, D] float32 from a `.npy` array or an `.npz` holding `query_embeddings` (a
    detections file qualifies) or exactly one array.

    Raises:
        DetectionsFileError naming the file: missing, unreadable, no such array, not 2-d numbers.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise DetectionsFileError(f"query embeddings file {path!r} does not exist")
    try:
        loaded = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        raise DetectionsFileError(f"{path}: not a readable .npy / .npz file ({err})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.files)
            if "query_embeddings" in keys:
                array = loaded["query_embeddings"]
            elif len(keys) == 1:
                array = loaded[keys[0]]
            else:
                raise DetectionsFileError(f"{path}: no array named query_embeddings "
                                          f"(found {', '.join(keys) or 'none'})")
    else:
        array = loaded
    if array.ndim != 2 or array.dtype.kind not in "fiu":
        raise DetectionsFileError(f"{path}: query embeddings have shape {array.shape} and dtype {array.dtype}, "
                                  "expected [Q, D] numbers")
    return array.astype(np.float32, copy=False)
