"""Index samplers for siamese pairs and P x K identity batches (numpy, vectorised, seeded).

Samplers return *indices into the records they were given*, never images: the tf.data streams in
`pipelines.py` turn indices into decoded images on the fly, so an epoch holds only integers in
memory (the EfficientNet siamese release augments offline and keeps every pair in RAM; we do not).

Every draw comes from `numpy.random.default_rng([seed, epoch])`, so epoch `e` of a run is the same
whether the run started at epoch 0 or was resumed at `e`.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class PairRatioSchedule:
    """Negatives per positive pair as a function of the (0-based) epoch: `min(start * factor**e, maximum)`.

    Presets: `fixed(1.0)` balances positives and negatives (EfficientNet siamese paper §B);
    `idver()` starts at 1:1 and multiplies by 1.01 every epoch until 1:4 (identification +
    verification paper, "Input preparation").
    """

    start: float = 1.0
    factor: float = 1.0
    maximum: float = 1.0

    def __post_init__(self):
        if not (self.start > 0 and math.isfinite(self.start)):
            raise ValueError(f"PairRatioSchedule.start must be a positive number, got {self.start!r}")
        if not (self.factor >= 1.0 and math.isfinite(self.factor)):
            raise ValueError(f"PairRatioSchedule.factor must be >= 1 (a growing ratio), got {self.factor!r}")
        if not self.maximum >= self.start:
            raise ValueError(f"PairRatioSchedule.maximum ({self.maximum!r}) must be >= start ({self.start!r})")

    @classmethod
    def fixed(cls, negatives_per_positive: float = 1.0) -> "PairRatioSchedule":
        """The same ratio every epoch (1.0 = balanced, EfficientNet siamese paper §B)."""
        return cls(start=negatives_per_positive, factor=1.0, maximum=negatives_per_positive)

    @classmethod
    def idver(cls) -> "PairRatioSchedule":
        """1:1 growing x1.01 per epoch, capped at 1:4 (identification+verification paper)."""
        return cls(start=1.0, factor=1.01, maximum=4.0)

    def negatives_per_positive(self, epoch: int) -> float:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        # Past the cap the power would overflow for huge epochs; the cap is reached long before.
        if self.factor > 1.0 and epoch > math.log(self.maximum / self.start) / math.log(self.factor) + 1:
            return float(self.maximum)
        return float(min(self.start * self.factor ** epoch, self.maximum))


def _as_arrays(records) -> tuple[np.ndarray, np.ndarray]:
    records = list(records)
    if not records:
        raise ValueError("records is empty: a sampler needs at least two identities")
    pids = np.asarray([int(r[1]) for r in records], dtype=np.int64)
    camids = np.asarray([int(r[2]) for r in records], dtype=np.int64)
    return pids, camids


def _draw_excluding(rng, lo, hi, block_lo, block_hi) -> np.ndarray:
    """Uniform integers in [lo, hi) minus the contiguous block [block_lo, block_hi), per element."""
    r = rng.integers(0, (hi - lo) - (block_hi - block_lo))
    idx = lo + r
    return idx + (idx >= block_lo) * (block_hi - block_lo)


def _cover(rng, pool: np.ndarray, n: int) -> np.ndarray:
    """`n` items from `pool`: whole shuffled passes over it, so every item is used about equally."""
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    passes = -(-n // len(pool))
    return np.concatenate([rng.permutation(pool) for _ in range(passes)])[:n]


def sample_without_replacement(rng, n: np.ndarray, k: int) -> np.ndarray:
    """Per row, `k` distinct uniform integers in [0, n[row]) (requires n >= k), shape (rows, k).

    Sequential draws shifted past the values already taken (visited in ascending order), so the
    memory is O(rows * k) however large n is.
    """
    n = np.asarray(n, dtype=np.int64)
    if np.any(n < k):
        raise ValueError(f"cannot draw {k} distinct values from a range of {int(n.min())}")
    taken = np.empty((len(n), 0), dtype=np.int64)
    for j in range(k):
        r = rng.integers(0, n - j)
        for col in np.sort(taken, axis=1).T:
            r = r + (r >= col)
        taken = np.concatenate([taken, r[:, None]], axis=1)
    return taken


class _IdentityIndex:
    """Records sorted by (pid, camid) with, per sorted position, the bounds of its id and camera blocks."""

    def __init__(self, records):
        pids, camids = _as_arrays(records)
        self.order = np.lexsort((camids, pids))  # sorted position -> record index
        self.pids = pids[self.order]
        self.camids = camids[self.order]
        n = len(self.pids)
        id_change = np.r_[True, self.pids[1:] != self.pids[:-1]]
        cam_change = id_change | np.r_[True, self.camids[1:] != self.camids[:-1]]
        self.id_starts = np.flatnonzero(id_change)
        self.id_counts = np.diff(np.r_[self.id_starts, n])
        id_of = np.cumsum(id_change) - 1
        cam_starts = np.flatnonzero(cam_change)
        cam_of = np.cumsum(cam_change) - 1
        self.id_lo = self.id_starts[id_of]
        self.id_hi = self.id_lo + self.id_counts[id_of]
        self.cam_lo = cam_starts[cam_of]
        self.cam_hi = np.r_[cam_starts[1:], n][cam_of]

    @property
    def num_ids(self) -> int:
        return len(self.id_starts)


class PairSampler:
    """Positive / negative index pairs for siamese training.

    Positives: same id, never the same image; from another camera whenever the id was seen by
    another camera (`cross_camera=True`), else from the same camera. Ids with a single image cannot
    form a positive and are never positive anchors (they still serve in negatives); their number is
    in `num_single_image_ids` and `summary()`. Negatives: uniform over the images of other ids; with
    `cross_camera=True` also from another camera than the anchor's (falling back to any camera only
    when no other-id image exists there). Otherwise a camera change would mark positives, and a
    network learns the shortcut "same background, so different person" instead of appearance.
    An unknown camera (camid -1) counts as one more camera.
    """

    def __init__(self, records, cross_camera: bool = True):
        self.index = _IdentityIndex(records)
        ix = self.index
        if ix.num_ids < 2:
            raise ValueError(f"pair sampling needs at least 2 identities, the records have {ix.num_ids}")
        self.cross_camera = bool(cross_camera)
        self.num_single_image_ids = int(np.sum(ix.id_counts == 1))
        self._pos_anchors = np.flatnonzero(ix.id_hi - ix.id_lo >= 2)
        if len(self._pos_anchors) == 0:
            raise ValueError("no identity has two images: no positive pair can be formed")
        other_cam = (ix.id_hi - ix.id_lo) - (ix.cam_hi - ix.cam_lo) > 0
        self._use_cam_block = other_cam if self.cross_camera else np.zeros_like(other_cam)
        single_cam_ids = (ix.id_counts >= 2) & ~np.add.reduceat(other_cam, ix.id_starts).astype(bool)
        self.num_single_camera_ids = int(np.sum(single_cam_ids))
        # Camera-sorted view of the sorted positions, with each position's camera block in it.
        self._by_cam = np.argsort(ix.camids, kind="stable")
        cams_sorted = ix.camids[self._by_cam]
        self._cam_block_lo = np.searchsorted(cams_sorted, ix.camids, side="left")
        self._cam_block_hi = np.searchsorted(cams_sorted, ix.camids, side="right")

    def summary(self) -> str:
        return (f"pairs from {len(self.index.pids)} images of {self.index.num_ids} ids; "
                f"{self.num_single_image_ids} id(s) with a single image excluded from positive anchors; "
                f"{self.num_single_camera_ids} id(s) seen by one camera use same-camera positives")

    def sample(self, num_pairs: int, negatives_per_positive: float, rng) -> tuple:
        """`num_pairs` pairs in random order: `(a, b, same)` int arrays, a/b index the records.

        Exactly `round(num_pairs / (1 + ratio))` pairs are positive, so the ratio holds per epoch
        rather than only in expectation.
        """
        if num_pairs < 1:
            raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
        if not negatives_per_positive >= 0:
            raise ValueError(f"negatives_per_positive must be >= 0, got {negatives_per_positive}")
        ix = self.index
        n_pos = int(round(num_pairs / (1.0 + negatives_per_positive)))
        pos_a = _cover(rng, self._pos_anchors, n_pos)
        cam = self._use_cam_block[pos_a]
        pos_b = _draw_excluding(rng, ix.id_lo[pos_a], ix.id_hi[pos_a],
                                np.where(cam, ix.cam_lo[pos_a], pos_a), np.where(cam, ix.cam_hi[pos_a], pos_a + 1))
        neg_a = _cover(rng, np.arange(len(ix.pids)), num_pairs - n_pos)
        neg_b = self._negatives(neg_a, rng)
        a = np.concatenate([pos_a, neg_a])
        b = np.concatenate([pos_b, neg_b])
        same = np.concatenate([np.ones(n_pos, np.int32), np.zeros(num_pairs - n_pos, np.int32)])
        perm = rng.permutation(num_pairs)
        return ix.order[a[perm]], ix.order[b[perm]], same[perm]

    def _negatives(self, anchors: np.ndarray, rng, rounds: int = 8) -> np.ndarray:
        """A partner of another id for each anchor; from another camera too when `cross_camera`."""
        ix = self.index
        any_camera = _draw_excluding(rng, 0, len(ix.pids), ix.id_lo[anchors], ix.id_hi[anchors])
        if not self.cross_camera:
            return any_camera
        out = np.full(len(anchors), -1)
        todo = np.flatnonzero(self._cam_block_hi[anchors] - self._cam_block_lo[anchors] < len(ix.pids))
        for _ in range(rounds):  # rejection of same-id draws; they are rare, so few rounds suffice
            if len(todo) == 0:
                break
            a = anchors[todo]
            drawn = self._by_cam[_draw_excluding(rng, 0, len(ix.pids), self._cam_block_lo[a], self._cam_block_hi[a])]
            ok = ix.pids[drawn] != ix.pids[a]
            out[todo[ok]] = drawn[ok]
            todo = todo[~ok]
        return np.where(out >= 0, out, any_camera)

    def epoch(self, epoch: int, num_pairs: int, schedule: PairRatioSchedule, seed: int) -> tuple:
        """The pairs of one epoch, with the ratio `schedule.negatives_per_positive(epoch)`."""
        rng = np.random.default_rng([int(seed), int(epoch)])
        return self.sample(num_pairs, schedule.negatives_per_positive(epoch), rng)


class PKSampler:
    """Batches of P distinct identities x K images each (Hermans et al., "In Defense of the Triplet Loss").

    Each batch draws P ids uniformly without replacement, then K images of each id without
    replacement. Ids with fewer than K images are sampled *with replacement* (their images repeat
    within the batch) unless `drop_small_ids=True`, which leaves them out; `num_small_ids` counts them.
    """

    def __init__(self, records, P: int, K: int, drop_small_ids: bool = False):
        if int(P) < 1 or int(K) < 1:
            raise ValueError(f"P and K must be >= 1, got P={P}, K={K}")
        self.P, self.K = int(P), int(K)
        self.index = _IdentityIndex(records)
        small = self.index.id_counts < self.K
        self.num_small_ids = int(np.sum(small))
        self.drop_small_ids = bool(drop_small_ids)
        self._ids = np.flatnonzero(~small) if self.drop_small_ids else np.arange(self.index.num_ids)
        if len(self._ids) < self.P:
            what = f"with at least K={self.K} images" if self.drop_small_ids else "in the records"
            raise ValueError(f"P={self.P} identities per batch, but only {len(self._ids)} identities {what}")

    @property
    def batch_size(self) -> int:
        return self.P * self.K

    def default_batches_per_epoch(self) -> int:
        return max(1, len(self.index.pids) // self.batch_size)

    def summary(self) -> str:
        policy = "dropped" if self.drop_small_ids else "sampled with replacement"
        return (f"P={self.P} x K={self.K} from {len(self._ids)} of {self.index.num_ids} ids; "
                f"{self.num_small_ids} id(s) with fewer than K images {policy}")

    def sample(self, num_batches: int, rng) -> np.ndarray:
        """Record indices, shape (num_batches, P*K): K consecutive entries per identity."""
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        ix = self.index
        chosen = self._ids[sample_without_replacement(rng, np.full(num_batches, len(self._ids)), self.P)]
        chosen = chosen.reshape(-1)
        counts = ix.id_counts[chosen]
        enough = counts >= self.K
        local = np.empty((len(chosen), self.K), dtype=np.int64)
        if enough.any():
            local[enough] = sample_without_replacement(rng, counts[enough], self.K)
        if (~enough).any():
            local[~enough] = rng.integers(0, counts[~enough][:, None], size=(int((~enough).sum()), self.K))
        positions = ix.id_starts[chosen][:, None] + local
        return ix.order[positions].reshape(num_batches, self.batch_size)

    def epoch(self, epoch: int, num_batches: int, seed: int) -> np.ndarray:
        return self.sample(num_batches, np.random.default_rng([int(seed), int(epoch)]))


class ShuffledBatchSampler:
    """Batches of `batch_size` records in shuffled passes, addressable by (epoch, step).

    Pass `p` is the permutation `default_rng([seed, p])` of all records cut into `len // batch_size`
    batches (the remainder is left out of that pass). Training epochs need not align with passes:
    batch `t` of epoch `e` (with `num_batches` per epoch) is overall batch `e * num_batches + t`,
    so any epoch (or a resumed part of one) is drawn without replaying the ones before it.
    """

    def __init__(self, num_records: int, batch_size: int):
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if int(num_records) < int(batch_size):
            raise ValueError(f"{num_records} records are less than one batch of {batch_size}")
        self.num_records, self.batch_size = int(num_records), int(batch_size)
        self.batches_per_pass = self.num_records // self.batch_size

    def epoch(self, epoch: int, num_batches: int, seed: int) -> np.ndarray:
        """Record indices of epoch `epoch`, shape (num_batches, batch_size)."""
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        first = int(epoch) * int(num_batches)
        overall = np.arange(first, first + int(num_batches))
        passes = overall // self.batches_per_pass
        out = np.empty((len(overall), self.batch_size), dtype=np.int64)
        for p in np.unique(passes):
            order = np.random.default_rng([int(seed), int(p)]).permutation(self.num_records)
            rows = np.flatnonzero(passes == p)
            within = overall[rows] % self.batches_per_pass
            starts = within[:, None] * self.batch_size + np.arange(self.batch_size)
            out[rows] = order[starts]
        return out
