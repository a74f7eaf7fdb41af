"""Query-gallery distances computed in bounded memory (docs/protocols.md "Common rules" and (f)).

Two metrics, both "smaller is closer":

- ``"cosine"``: ``1 - cos(q, g)``; query rows are L2-normalised, the gallery is scaled by its
  inverse norms after the matrix product, so the (possibly huge) gallery is never copied.
- ``"euclidean"``: squared Euclidean distance of the features as given,
  ``|q|^2 + |g|^2 - 2 q.g``, clipped at 0.

Distances are float32 and come from one float32 matrix product per tile of `row_tile(G)` query
rows. BLAS picks different kernels for different matrix shapes (a 1-row product even takes the
matrix-vector path; OpenBLAS gave last-bit differences for 2- and 3-row blocks here), so the same
entry computed inside blocks of different heights can differ in the last bit. Always multiplying
the same tiles, aligned to the global query index, makes every entry bitwise identical whatever
block size a memory budget produces; that is what lets the chunked evaluation reproduce the
full-matrix evaluation exactly. Each product re-packs the whole gallery, so short tiles cost time
(64-row tiles took about twice as long as one big product at Market-1501 size, 256-row tiles about
the same); tiles are 256 rows unless the gallery is large, where 64-row tiles keep the smallest
chunk at 0.73 GB by the 22-bytes-per-entry rule of docs/protocols.md (f) for G = 519,732.
"""
from __future__ import annotations

import numpy as np

METRICS = ("cosine", "euclidean")
BYTES_PER_ENTRY = 22  # docs/protocols.md (f): float32 dist + int64 order + int64 ids + two bool masks


def check_features(features, name: str, dim: int | None = None,
                   dim_name: str = "the query features") -> np.ndarray:
    """Validate a 2-D finite feature matrix and return it as C-contiguous float32.

    Raises ValueError naming `name` for a wrong rank, zero rows, a dimension other than `dim`,
    or NaN / inf values.
    """
    arr = np.asarray(features)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (num_images, feature_dim), got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows): need at least one image")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has feature dimension 0")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"{name} has feature dimension {arr.shape[1]}, but {dim_name} "
                         f"has {dim}: both must come from the same model")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    step = max(1, 2**24 // arr.shape[1])  # checked in slices: no full-size boolean temporary
    for a in range(0, arr.shape[0], step):
        finite = np.isfinite(arr[a:a + step]).all(axis=1)
        if not finite.all():
            bad = a + int(np.flatnonzero(~finite)[0])
            raise ValueError(f"{name} contains NaN or inf (first bad row: {bad}); "
                             "check the model output before evaluating")
    return arr


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return metric


def row_tile(num_gallery: int) -> int:
    """Query rows per matrix product: 256, or 64 for galleries above 65,536 images."""
    return 256 if num_gallery <= 65536 else 64


def chunk_rows(num_gallery: int, memory_budget_mb: float,
               bytes_per_entry: int = BYTES_PER_ENTRY) -> int:
    """Queries per chunk, B = budget / (bytes_per_entry * G) (docs/protocols.md (f)).

    The budget is in MiB. B is rounded down to a multiple of `row_tile(G)` (see the module
    docstring) and is at least one tile, so a budget below `row_tile(G) * 22 * G` bytes is
    exceeded by that floor (64 rows = 0.73 GB at G = 519,732).
    """
    if (isinstance(memory_budget_mb, bool) or not isinstance(memory_budget_mb, (int, float, np.number))
            or not np.isfinite(memory_budget_mb) or memory_budget_mb <= 0):
        raise ValueError(f"memory_budget_mb must be a positive number, got {memory_budget_mb!r}")
    tile = row_tile(num_gallery)
    rows = int(memory_budget_mb * 2**20 // (bytes_per_entry * max(int(num_gallery), 1)))
    return max(tile, rows // tile * tile)


def _row_norms(x: np.ndarray, name: str) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise ValueError(f"{name} row {int(zero[0])} has zero norm: cosine distance is undefined "
                         "(use metric='euclidean' or drop the image)")
    return norms


class GalleryIndex:
    """Gallery features plus the per-row statistics one metric needs; holds no copy of them.

    Args:
        gallery_features: (G, D) float array (validated, converted to float32 if needed).
        metric: "cosine" or "euclidean".
    """

    def __init__(self, gallery_features, metric: str = "cosine", dim: int | None = None):
        self.metric = check_metric(metric)
        self.features = check_features(gallery_features, "gallery_features", dim)
        if metric == "cosine":
            self.aux = (1.0 / _row_norms(self.features, "gallery_features")).astype(np.float32)
        else:
            self.aux = np.einsum("ij,ij->i", self.features, self.features).astype(np.float32)

    def __len__(self) -> int:
        return self.features.shape[0]

    def prepare_queries(self, query_features) -> tuple[np.ndarray, np.ndarray | None]:
        """Validated queries (normalised for cosine) and their squared norms (euclidean)."""
        q = check_features(query_features, "query_features", self.features.shape[1], "gallery_features")
        if self.metric == "cosine":
            return (q / _row_norms(q, "query_features")[:, None]).astype(np.float32), None
        return q, np.einsum("ij,ij->i", q, q).astype(np.float32)

    def block(self, queries: np.ndarray, q_aux: np.ndarray | None, start: int, stop: int) -> np.ndarray:
        """Distances of prepared query rows [start, stop) to the whole gallery, (stop-start, G).

        `start` must be a multiple of `row_tile(G)`.
        """
        tile = row_tile(len(self))
        if start % tile:
            raise ValueError(f"block start {start} is not a multiple of the row tile {tile}")
        out = np.empty((stop - start, len(self)), dtype=np.float32)
        g_t = self.features.T
        for a in range(start, stop, tile):
            b = min(a + tile, stop)
            np.matmul(queries[a:b], g_t, out=out[a - start:b - start])
        if self.metric == "cosine":
            out *= self.aux[None, :]
            np.subtract(np.float32(1.0), out, out=out)
        else:
            out *= np.float32(-2.0)
            out += q_aux[start:stop, None]
            out += self.aux[None, :]
            np.maximum(out, np.float32(0.0), out=out)
        return out


def iter_distance_blocks(query_features, gallery_features, metric: str = "cosine",
                         memory_budget_mb: float = 1024):
    """Yield (start, stop, distances) over chunks of queries; the Q x G matrix is never built."""
    index = GalleryIndex(gallery_features, metric)
    queries, q_aux = index.prepare_queries(query_features)
    rows = chunk_rows(len(index), memory_budget_mb)
    for start in range(0, queries.shape[0], rows):
        stop = min(start + rows, queries.shape[0])
        yield start, stop, index.block(queries, q_aux, start, stop)


def pairwise_distance(query_features, gallery_features, metric: str = "cosine") -> np.ndarray:
    """Full (Q, G) float32 distance matrix, bitwise equal to the blocks of `iter_distance_blocks`.

    Example:
        >>> d = pairwise_distance(np.eye(2), np.eye(2))
        >>> d.tolist()
        [[0.0, 1.0], [1.0, 0.0]]
    """
    index = GalleryIndex(gallery_features, metric)
    queries, q_aux = index.prepare_queries(query_features)
    return index.block(queries, q_aux, 0, queries.shape[0])
