"""Pair and P x K samplers (numpy only, no files): ratios, cameras, identities, determinism."""
import numpy as np
import pytest

from reid_keras.data.datasets.base import ImageRecord
from reid_keras.data.samplers import PairRatioSchedule, PairSampler, PKSampler, sample_without_replacement


def make_records(layout):
    """layout = [(pid, camid, count), ...] -> records in that order (paths are never opened)."""
    records = []
    for pid, camid, count in layout:
        records += [ImageRecord(f"/x/{len(records) + i}.png", pid, camid) for i in range(count)]
    return records


# 12 ids on two cameras (varying counts), one id on a single camera, one id with a single image.
LAYOUT = [(pid, cam, 1 + (pid + cam) % 3) for pid in range(12) for cam in (0, 1)]
LAYOUT += [(12, 1, 3), (13, 0, 1)]


@pytest.fixture(scope="module")
def records():
    # Shuffle so the sampler cannot rely on records arriving sorted by id.
    recs = make_records(LAYOUT)
    order = np.random.default_rng(3).permutation(len(recs))
    return [recs[i] for i in order]


def test_schedule_values_per_epoch():
    idver = PairRatioSchedule.idver()
    for epoch in range(0, 200, 7):
        assert idver.negatives_per_positive(epoch) == pytest.approx(min(1.01 ** epoch, 4.0), rel=1e-12)
    assert [round(idver.negatives_per_positive(e), 6) for e in range(3)] == [1.0, 1.01, 1.0201]
    # 1.01**139 = 3.987 < 4 <= 1.01**140 = 4.027: the cap takes over at epoch 140 and stays.
    assert idver.negatives_per_positive(139) == pytest.approx(3.98723, abs=1e-5)
    assert idver.negatives_per_positive(140) == 4.0
    assert idver.negatives_per_positive(10 ** 7) == 4.0
    assert PairRatioSchedule.fixed(1.0).negatives_per_positive(55) == 1.0
    assert PairRatioSchedule.fixed(2.5).negatives_per_positive(0) == 2.5


@pytest.mark.parametrize("kwargs, word", [({"start": 0}, "start"), ({"factor": 0.9}, "factor"),
                                          ({"start": 2, "maximum": 1}, "maximum")])
def test_schedule_rejects_bad_values(kwargs, word):
    with pytest.raises(ValueError, match=word):
        PairRatioSchedule(**kwargs)
    with pytest.raises(ValueError, match="epoch"):
        PairRatioSchedule.idver().negatives_per_positive(-1)


@pytest.mark.parametrize("ratio", [1.0, 1.5, 3.0, 4.0])
def test_pair_ratio_over_20000_pairs(records, ratio):
    a, b, same = PairSampler(records).sample(20_000, ratio, np.random.default_rng(0))
    pos, neg = int(same.sum()), int((same == 0).sum())
    assert pos + neg == 20_000
    assert neg / pos == pytest.approx(ratio, rel=2e-3)


def test_epoch_ratio_follows_schedule(records):
    sampler, schedule = PairSampler(records), PairRatioSchedule.idver()
    for epoch in (0, 30, 90, 150):
        _, _, same = sampler.epoch(epoch, 20_000, schedule, seed=1)
        assert (same == 0).sum() / same.sum() == pytest.approx(schedule.negatives_per_positive(epoch), rel=2e-3)


def test_pairs_labels_cameras_and_no_self_pairs(records):
    a, b, same = PairSampler(records, cross_camera=True).sample(20_000, 1.0, np.random.default_rng(5))
    pids = np.array([r.pid for r in records])
    cams = np.array([r.camid for r in records])
    assert np.all(a != b), "self pair"
    np.testing.assert_array_equal(same, (pids[a] == pids[b]).astype(np.int32))
    pos = same == 1
    multi_cam = np.isin(pids[a], np.arange(12))
    assert np.all(cams[a][pos & multi_cam] != cams[b][pos & multi_cam]), "same-camera positive for a 2-camera id"
    single_cam = pos & (pids[a] == 12)
    assert single_cam.sum() > 0 and np.all(cams[a][single_cam] == cams[b][single_cam])
    # The single-image id (13) is never a positive anchor, but serves in negatives.
    assert not np.any(pids[a][pos] == 13)
    assert np.any(np.concatenate([pids[a][~pos], pids[b][~pos]]) == 13)


def test_cross_camera_off_allows_same_camera_positives(records):
    a, b, same = PairSampler(records, cross_camera=False).sample(20_000, 1.0, np.random.default_rng(5))
    cams = np.array([r.camid for r in records])
    pos = same == 1
    assert np.all(a != b)
    assert np.any(cams[a][pos] == cams[b][pos]) and np.any(cams[a][pos] != cams[b][pos])


def test_negative_partners_are_uniform_over_other_ids(records):
    sampler = PairSampler(records, cross_camera=False)
    a, b, same = sampler.sample(40_000, 1e6, np.random.default_rng(2))  # all negatives
    pids = np.array([r.pid for r in records])
    anchors_of_0 = pids[a] == 0
    partners = b[anchors_of_0]
    others = np.flatnonzero(pids != 0)
    counts = np.bincount(partners, minlength=len(records))[others]
    expected = len(partners) / len(others)
    assert set(partners) == set(others)
    assert np.all(np.abs(counts - expected) < 0.35 * expected)


def test_cross_camera_negatives_are_uniform_over_other_ids_in_other_cameras(records):
    # Positives cross cameras, so negatives must too: else "camera changed" predicts "same person".
    a, b, same = PairSampler(records, cross_camera=True).sample(300_000, 1e6, np.random.default_rng(4))
    pids = np.array([r.pid for r in records])
    cams = np.array([r.camid for r in records])
    assert np.all(same == 0) and np.all(pids[a] != pids[b])
    assert np.all(cams[a] != cams[b])
    anchor_cam = cams[a[0]]
    sel = (pids[a] == 0) & (cams[a] == anchor_cam)
    allowed = np.flatnonzero((pids != 0) & (cams != anchor_cam))
    counts = np.bincount(b[sel], minlength=len(records))[allowed]
    assert set(b[sel]) == set(allowed)
    assert np.all(np.abs(counts - counts.mean()) < 0.35 * counts.mean())


def test_summary_reports_single_image_and_single_camera_ids(records):
    sampler = PairSampler(records)
    assert sampler.num_single_image_ids == 1 and sampler.num_single_camera_ids == 1
    assert "1 id(s) with a single image excluded" in sampler.summary()


def test_pair_sampler_rejects_unusable_records():
    with pytest.raises(ValueError, match="at least 2 identities"):
        PairSampler(make_records([(0, 0, 3)]))
    with pytest.raises(ValueError, match="no identity has two images"):
        PairSampler(make_records([(0, 0, 1), (1, 0, 1)]))
    with pytest.raises(ValueError, match="empty"):
        PairSampler([])


def test_no_identity_leakage_from_unseen_records():
    train = make_records([(pid, cam, 2) for pid in range(5) for cam in (0, 1)])
    test = [ImageRecord(f"/test/{i}.png", 100 + i // 2, i % 2) for i in range(10)]
    a, b, _ = PairSampler(train).sample(5_000, 2.0, np.random.default_rng(0))
    assert max(a.max(), b.max()) < len(train)
    used = {train[i].pid for i in np.concatenate([a, b])}
    assert used == {0, 1, 2, 3, 4} and not used & {r.pid for r in test}


def test_pair_sampling_is_deterministic_by_seed_and_epoch(records):
    sampler, schedule = PairSampler(records), PairRatioSchedule.idver()
    first = sampler.epoch(3, 500, schedule, seed=11)
    again = PairSampler(records).epoch(3, 500, schedule, seed=11)
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(first[0], sampler.epoch(3, 500, schedule, seed=12)[0])
    assert not np.array_equal(first[0], sampler.epoch(4, 500, schedule, seed=11)[0])


def test_sample_without_replacement_is_distinct_and_uniform():
    rng = np.random.default_rng(0)
    draws = sample_without_replacement(rng, np.full(30_000, 5), 2)
    assert np.all(draws[:, 0] != draws[:, 1]) and draws.min() == 0 and draws.max() == 4
    freq = np.bincount(draws.ravel(), minlength=5) / draws.size
    np.testing.assert_allclose(freq, 0.2, atol=0.01)
    ragged = sample_without_replacement(rng, np.array([3, 10, 4]), 3)
    assert all(len(set(row)) == 3 and row.max() < n for row, n in zip(ragged, [3, 10, 4]))
    with pytest.raises(ValueError, match="distinct"):
        sample_without_replacement(rng, np.array([2]), 3)


def test_pk_batches_have_p_distinct_ids_k_images_each(records):
    sampler = PKSampler(records, P=4, K=3)
    batches = sampler.sample(200, np.random.default_rng(0))
    pids = np.array([r.pid for r in records])
    counts = np.bincount(pids)
    assert batches.shape == (200, 12)
    for batch in batches:
        groups = pids[batch].reshape(4, 3)
        assert np.all(groups == groups[:, :1]), "K consecutive images of one id"
        assert len(set(groups[:, 0])) == 4
        for pid, idx in zip(groups[:, 0], batch.reshape(4, 3)):
            # Enough images: K distinct ones; too few: with replacement (repeats are unavoidable).
            if counts[pid] >= 3:
                assert len(set(idx)) == 3
            else:
                assert len(set(idx)) <= counts[pid] < 3
    small = {pid for pid in range(len(counts)) if counts[pid] < 3}
    assert sampler.num_small_ids == len(small) and small & set(pids[batches.ravel()])


def test_pk_drop_small_ids_and_errors(records):
    pids = np.array([r.pid for r in records])
    counts = np.bincount(pids)
    sampler = PKSampler(records, P=4, K=3, drop_small_ids=True)
    used = set(pids[sampler.sample(100, np.random.default_rng(1)).ravel()])
    assert used == {pid for pid in range(len(counts)) if counts[pid] >= 3}
    assert "dropped" in sampler.summary()
    with pytest.raises(ValueError, match="P=20 identities per batch, but only 14"):
        PKSampler(records, P=20, K=2)
    with pytest.raises(ValueError, match="P and K"):
        PKSampler(records, P=0, K=2)


def test_pk_determinism(records):
    s = PKSampler(records, P=3, K=2)
    np.testing.assert_array_equal(s.epoch(2, 10, seed=4), PKSampler(records, P=3, K=2).epoch(2, 10, seed=4))
    assert not np.array_equal(s.epoch(2, 10, seed=4), s.epoch(2, 10, seed=5))
