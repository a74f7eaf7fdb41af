"""Classic CUHK03 (docs/protocols.md (b)) and CUHK01 (docs/protocols.md (c)) protocols."""
import numpy as np
import pytest

from reid_keras.metrics.protocols import (aggregate_splits, draw_single_shot_gallery, evaluate_cuhk01,
                                          evaluate_cuhk03)
from tests.test_ranking import reference_ranking


def cuhk03_test_set(rng, num_ids=8, per_view=(3, 2)):
    """All test images of a split: each id has per_view[0] images in view 0 and per_view[1] in view 1
    (the last id has none in view 1)."""
    pids, cams = [], []
    for pid in range(1, num_ids + 1):
        for view, count in enumerate(per_view):
            if view == 1 and pid == num_ids:
                continue
            pids += [pid] * count
            cams += [view] * count
    order = rng.permutation(len(pids))
    return np.array(pids)[order], np.array(cams)[order]


def test_single_shot_gallery_one_image_per_id_from_the_other_view():
    rng = np.random.default_rng(0)
    pids, cams = cuhk03_test_set(rng)
    ids, chosen = draw_single_shot_gallery(cams, pids, cams, seed=3, split_index=1, repeat=0)
    np.testing.assert_array_equal(ids, np.arange(1, 9))
    assert chosen.shape == (pids.size, 8)
    for i in range(pids.size):
        for k, pid in enumerate(ids):
            j = chosen[i, k]
            if cams[i] == 0 and pid == 8:       # id 8 has no view-1 image
                assert j == -1
                continue
            assert pids[j] == pid and cams[j] == 1 - cams[i]
    # deterministic per (seed, split, repeat); any of them changes the draw
    again = draw_single_shot_gallery(cams, pids, cams, seed=3, split_index=1, repeat=0)[1]
    np.testing.assert_array_equal(chosen, again)
    for kw in (dict(seed=4, split_index=1, repeat=0), dict(seed=3, split_index=2, repeat=0),
               dict(seed=3, split_index=1, repeat=1)):
        assert not np.array_equal(chosen, draw_single_shot_gallery(cams, pids, cams, **kw)[1])
    # over many repeats every candidate image of the other view gets drawn
    drawn = np.concatenate([draw_single_shot_gallery(cams, pids, cams, 0, 0, t)[1][0] for t in range(60)])
    expected = np.flatnonzero(cams != cams[0])
    np.testing.assert_array_equal(np.unique(drawn[drawn >= 0]), expected)


def test_single_shot_metrics_match_reference_and_ignore_own_view():
    rng = np.random.default_rng(1)
    pids, cams = cuhk03_test_set(rng)
    dist = np.round(rng.random((pids.size, pids.size)) * 6) / 6   # ties
    dist[cams[:, None] == cams[None, :]] = -1.0    # same-view images closest: must never be used
    res = evaluate_cuhk03(dist, pids, pids, cams, cams, repeats=4, seed=2, split_index=5, max_rank=10)
    cmcs, maps = [], []
    for t in range(4):
        ids, chosen = draw_single_shot_gallery(cams, pids, cams, 2, 5, t)
        ranks = []
        for i in range(pids.size):
            gallery = chosen[i][chosen[i] >= 0]
            if pids[i] not in pids[gallery]:
                continue
            gallery = np.sort(gallery)   # ties: lower gallery index first
            order = gallery[np.argsort(dist[i, gallery], kind="stable")]
            ranks.append(1 + int(np.flatnonzero(pids[order] == pids[i])[0]))
        ranks = np.array(ranks)
        cmcs.append([np.mean(ranks <= k) for k in range(1, 11)])
        maps.append(np.mean(1.0 / ranks))
    np.testing.assert_allclose(res["cmc"], np.mean(cmcs, axis=0), atol=1e-12)
    np.testing.assert_allclose(res["cmc_per_repeat"], cmcs, atol=1e-12)
    assert res["mAP"] == pytest.approx(np.mean(maps), abs=1e-12)
    assert res["num_invalid_queries"] == 3          # the view-0 images of id 8
    assert res["num_valid_queries"] == pids.size - 3
    assert (res["mode"], res["repeats"], res["seed"], res["split_index"]) == ("single_shot", 4, 2, 5)
    again = evaluate_cuhk03(dist, pids, pids, cams, cams, repeats=4, seed=2, split_index=5, max_rank=10)
    np.testing.assert_array_equal(again["cmc"], res["cmc"])


def test_multi_shot_uses_the_whole_other_view():
    rng = np.random.default_rng(2)
    pids, cams = cuhk03_test_set(rng)
    feats = rng.standard_normal((pids.size, 6))
    res = evaluate_cuhk03(query_features=feats, gallery_features=feats, query_pids=pids, gallery_pids=pids,
                          query_cams=cams, gallery_cams=cams, mode="multi_shot", max_rank=10)
    from reid_keras.metrics import pairwise_distance
    dist = pairwise_distance(feats, feats)
    # reference: per view, gallery = the other view's images, then protocol (a)
    per_q = [None] * pids.size
    for view in (0, 1):
        rows, cols = np.flatnonzero(cams == view), np.flatnonzero(cams != view)
        ref = reference_ranking(dist[np.ix_(rows, cols)], pids[rows], pids[cols], cams[rows], cams[cols], 10)
        for r, p in zip(rows, ref["per_query"]):
            per_q[r] = p
    valid = [p for p in per_q if p is not None]
    assert res["mAP"] == pytest.approx(np.mean([p["ap"] for p in valid]), abs=1e-12)
    np.testing.assert_allclose(res["cmc"], np.mean([p["cmc"] for p in valid], axis=0), atol=1e-12)
    assert res["num_invalid_queries"] == 3


def test_aggregate_splits_mean_and_std():
    results = [{"cmc": np.array([0.5, 0.7, 0.9]), "mAP": 0.4}, {"cmc": np.array([0.7, 0.9, 1.0]), "mAP": 0.6}]
    agg = aggregate_splits(results, ranks=(1, 3))
    assert agg["num_splits"] == 2
    assert agg["rank-1"] == pytest.approx((0.6, np.std([0.5, 0.7], ddof=1)))
    assert agg["mAP"] == pytest.approx((0.5, np.std([0.4, 0.6], ddof=1)))


def test_cuhk03_bad_input():
    pids, cams = np.array([1, 1]), np.array([0, 2])
    with pytest.raises(ValueError, match="gallery_cams must be the CUHK03 view"):
        evaluate_cuhk03(np.ones((2, 2)), pids, pids, np.array([0, 1]), cams)
    with pytest.raises(ValueError, match="mode must be one of"):
        evaluate_cuhk03(np.ones((2, 2)), pids, pids, cams, cams, mode="both")
    with pytest.raises(ValueError, match="no valid query"):
        evaluate_cuhk03(np.ones((2, 2)), pids, pids, np.array([0, 0]), np.array([0, 0]))
    with pytest.raises(ValueError, match="distmat must be numeric and finite"):
        evaluate_cuhk03(np.full((2, 2), np.nan), pids, pids, np.array([0, 1]), np.array([0, 1]))


def cuhk01_set(num_ids=15):
    pids = np.repeat(np.arange(10, 10 + num_ids), 2)
    return pids, pids.copy()


def reference_cuhk01(sim, pids_a, pids_b, trials, seed, ranks, direction="A->B"):
    ids = np.unique(pids_a)
    per_trial = []
    for t in range(trials):
        rng = np.random.default_rng(seed + t)
        a_imgs = [np.flatnonzero(pids_a == i) for i in ids]
        b_imgs = [np.flatnonzero(pids_b == i) for i in ids]
        sel_a = [imgs[rng.integers(0, len(imgs))] for imgs in a_imgs]
        sel_b = [imgs[rng.integers(0, len(imgs))] for imgs in b_imgs]
        s = sim[np.ix_(sel_a, sel_b)]
        if direction == "B->A":
            s = s.T
        match = []
        for q in range(ids.size):
            order = np.argsort(-s[q], kind="stable")
            match.append(1 + int(np.flatnonzero(order == q)[0]))
        per_trial.append([100.0 * np.mean(np.array(match) <= k) for k in ranks])
    return np.array(per_trial)


@pytest.mark.parametrize("direction", ["A->B", "B->A"])
def test_cuhk01_trials_mean_std_against_reference(direction):
    rng = np.random.default_rng(3)
    pa, pb = cuhk01_set()
    sim = np.round(rng.random((pa.size, pb.size)) * 5) / 5 + 0.5 * (pa[:, None] == pb[None, :])
    ranks = (1, 2, 5)
    res = evaluate_cuhk01(sim, pa, pb, trials=6, seed=11, ranks=ranks, direction=direction)
    ref = reference_cuhk01(sim, pa, pb, 6, 11, ranks, direction)
    np.testing.assert_allclose(res["per_trial"], ref, atol=1e-12)
    np.testing.assert_allclose(res["mean"], ref.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(res["std"], ref.std(axis=0, ddof=1), atol=1e-12)
    assert res["std"].max() > 0      # trials differ
    assert (res["trials"], res["seed"], res["direction"], res["num_ids"]) == (6, 11, direction, 15)
    assert res["table"]["rank-1"] == pytest.approx((ref.mean(axis=0)[0], ref.std(axis=0, ddof=1)[0]))


def test_cuhk01_score_fn_and_features_agree_with_similarity():
    rng = np.random.default_rng(4)
    pa, pb = cuhk01_set()
    fa, fb = rng.standard_normal((pa.size, 5)), rng.standard_normal((pb.size, 5))
    na, nb = fa / np.linalg.norm(fa, axis=1, keepdims=True), fb / np.linalg.norm(fb, axis=1, keepdims=True)
    sim = na @ nb.T
    by_sim = evaluate_cuhk01(sim, pa, pb, trials=3, seed=0)
    by_feat = evaluate_cuhk01(None, pa, pb, features_a=fa, features_b=fb, trials=3, seed=0)
    np.testing.assert_allclose(by_feat["per_trial"], by_sim["per_trial"])
    calls = []

    def score_fn(ia, ib):
        calls.append(len(ia))
        return sim[ia, ib]

    by_fn = evaluate_cuhk01(None, pa, pb, score_fn=score_fn, trials=1, seed=0, batch_size=64)
    np.testing.assert_array_equal(by_fn["per_trial"], evaluate_cuhk01(sim, pa, pb, trials=1, seed=0)["per_trial"])
    assert sum(calls) == 15 * 15 and max(calls) <= 64   # only the pairs of the one trial, batched
    assert np.isnan(by_fn["std"]).all()                   # ddof=1 is undefined for one trial


def test_cuhk01_bad_input():
    pa, pb = cuhk01_set()
    with pytest.raises(ValueError, match="similarity has shape"):
        evaluate_cuhk01(np.ones((3, 3)), pa, pb)
    with pytest.raises(ValueError, match="same test ids"):
        evaluate_cuhk01(np.ones((pa.size, pb.size - 2)), pa, pb[:-2] + 100)
    with pytest.raises(ValueError, match="exactly one of"):
        evaluate_cuhk01(None, pa, pb)
    with pytest.raises(ValueError, match="score_fn returned 1 scores"):
        evaluate_cuhk01(None, pa, pb, score_fn=lambda ia, ib: np.ones(1))
    with pytest.raises(ValueError, match="direction"):
        evaluate_cuhk01(np.ones((pa.size, pb.size)), pa, pb, direction="A-B")
    with pytest.raises(ValueError, match="features_b has feature dimension"):
        evaluate_cuhk01(None, pa, pb, features_a=np.ones((pa.size, 3)), features_b=np.ones((pb.size, 4)))


def test_evaluate_cli_reports_cuhk03_single_and_multi_shot():
    """The classic CUHK03 protocol in metrics.json carries both the single-shot (idver Table IV) and
    the multi-shot (Table V) numbers, equal to evaluate_cuhk03 in each mode."""
    from reid_keras.data.datasets.base import EvaluationProtocol
    from reid_keras.metrics.dataset_protocols import ProtocolInputs, cuhk03_classic
    from reid_keras.metrics.features import FeatureSet
    from reid_keras.metrics.options import EvaluationOptions

    rng = np.random.default_rng(4)
    pids, cams = cuhk03_test_set(rng)
    feats = rng.normal(size=(len(pids), 6)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    split = FeatureSet(features=feats, pids=pids, camids=cams, paths=np.array([]))
    protocol = EvaluationProtocol("cuhk03_classic", {"split_index": 2})
    paper = cuhk03_classic(protocol, ProtocolInputs(split, split, EvaluationOptions(seed=1, max_rank=10), None))
    for mode, table in (("single_shot", paper["mean_std"]), ("multi_shot", paper["multi_shot"]["mean_std"])):
        direct = evaluate_cuhk03(query_features=feats, gallery_features=feats, query_pids=pids, gallery_pids=pids,
                                 query_cams=cams, gallery_cams=cams, mode=mode, repeats=10, seed=1, split_index=2,
                                 max_rank=10)
        assert table["rank-1"][0] == pytest.approx(float(direct["cmc"][0]))
        assert table["mAP"][0] == pytest.approx(float(direct["mAP"]))
    assert "multi-shot" in paper["multi_shot"]["name"] and paper["split_index"] == 2
