"""evaluate_ranking (docs/protocols.md (a), (f)) against a literal per-query reference, sklearn and the
Market-1501 devkit AP; chunked / sort-free paths against the full-matrix path; bad input."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from reid_keras.metrics import evaluate_ranking, iter_distance_blocks, pairwise_distance
from reid_keras.metrics.distances import chunk_rows


def reference_ranking(dist, q_pids, g_pids, q_cams, g_cams, max_rank=50):
    """docs/protocols.md (a) step by step, one query at a time, with Python lists."""
    per_q = []
    for i in range(dist.shape[0]):
        order = np.argsort(dist[i], kind="stable")
        kept = [j for j in order
                if not ((g_pids[j] == q_pids[i] and g_cams[j] == q_cams[i]) or g_pids[j] == -1)]
        hit_ranks = [k + 1 for k, j in enumerate(kept) if g_pids[j] == q_pids[i]]
        if not hit_ranks:
            per_q.append(None)
            continue
        n = len(hit_ranks)
        ap = sum((t + 1) / r for t, r in enumerate(hit_ranks)) / n
        trap = sum(((t + 1) / r + (t / (r - 1) if r > 1 else 1.0)) / 2 for t, r in enumerate(hit_ranks)) / n
        cmc = [1.0 if hit_ranks[0] <= k else 0.0 for k in range(1, max_rank + 1)]
        per_q.append({"ap": ap, "trap": trap, "inp": n / hit_ranks[-1], "cmc": cmc, "first": hit_ranks[0]})
    valid = [p for p in per_q if p is not None]
    return {"cmc": np.mean([p["cmc"] for p in valid], axis=0), "mAP": np.mean([p["ap"] for p in valid]),
            "mAP_trap": np.mean([p["trap"] for p in valid]), "mINP": np.mean([p["inp"] for p in valid]),
            "num_invalid": len(per_q) - len(valid), "per_query": per_q}


def devkit_ap(good, junk, index):
    """The Market-1501 devkit compute_AP.m loop, literally (0-based indices)."""
    ngood = len(good)
    old_recall, old_precision, ap, intersect, j, good_now = 0.0, 1.0, 0.0, 0, 0, 0
    for item in index:
        flag = item in good
        if flag:
            good_now += 1
        if item in junk:
            continue
        if flag:
            intersect += 1
        recall, precision = intersect / ngood, intersect / (j + 1)
        ap += (recall - old_recall) * ((old_precision + precision) / 2)
        old_recall, old_precision = recall, precision
        j += 1
        if good_now == ngood:
            break
    return ap


def random_problem(rng, num_q, num_g, num_ids=12, levels=8, junk_ids=True):
    """Quantised distances (many ties), same-camera junk, distractors (pid 0) and pid -1 junk."""
    low = -1 if junk_ids else 1
    q_pids = rng.integers(1, num_ids, num_q)
    g_pids = rng.integers(low, num_ids, num_g)
    q_cams, g_cams = rng.integers(0, 3, num_q), rng.integers(0, 3, num_g)
    dist = np.round(rng.random((num_q, num_g)) * levels) / levels
    return dist, q_pids, g_pids, q_cams, g_cams


@pytest.mark.parametrize("method", ["sort", "sort_free"])
@pytest.mark.parametrize("seed,max_rank", [(0, 50), (1, 5), (2, 50)])
def test_matches_literal_reference(method, seed, max_rank):
    rng = np.random.default_rng(seed)
    dist, qp, gp, qc, gc = random_problem(rng, 40, 60)
    qp[:3] = 99  # ids absent from the gallery: invalid queries
    ref = reference_ranking(dist, qp, gp, qc, gc, max_rank)
    for ap in ("non-interpolated", "trapezoid"):
        res = evaluate_ranking(dist, qp, gp, qc, gc, max_rank=max_rank, ap=ap, method=method)
        np.testing.assert_allclose(res["cmc"], ref["cmc"], rtol=0, atol=1e-12)
        assert res["cmc"].shape == (max_rank,)
        assert res["mAP"] == pytest.approx(ref["mAP"] if ap == "non-interpolated" else ref["mAP_trap"], abs=1e-12)
        assert res["mINP"] == pytest.approx(ref["mINP"], abs=1e-12)
        assert res["num_invalid_queries"] == ref["num_invalid"] >= 3
        assert res["num_valid_queries"] == 40 - ref["num_invalid"]
        first = [p["first"] if p else -1 for p in ref["per_query"]]
        np.testing.assert_array_equal(res["first_hit_rank"], first)
    assert res["ap_variant"] == "mAP (devkit trapezoid)"


def test_distractors_are_negatives_and_junk_is_removed():
    # gallery: distractor (0), same-camera match (junk), pid -1 (junk), other-camera match
    res = evaluate_ranking([[0.1, 0.2, 0.3, 0.4]], [5], [0, 5, -1, 5], [0], [1, 0, 1, 2], max_rank=4)
    np.testing.assert_array_equal(res["cmc"], [0.0, 1.0, 1.0, 1.0])
    assert res["mAP"] == pytest.approx(0.5) and res["mINP"] == pytest.approx(0.5)
    assert res["ap_variant"] == "mAP (non-interpolated)"


def test_ties_go_to_the_lower_gallery_index():
    # all distances equal: stable order is the gallery order
    res = evaluate_ranking(np.zeros((2, 3)), [1, 1], [2, 1, 1], [0, 0], [1, 1, 1], method="sort")
    np.testing.assert_array_equal(res["first_hit_rank"], [2, 2])
    assert res["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    free = evaluate_ranking(np.zeros((2, 3)), [1, 1], [2, 1, 1], [0, 0], [1, 1, 1], method="sort_free")
    assert free["mAP"] == res["mAP"]


def test_saturating_cmc_when_list_is_shorter_than_max_rank():
    # 5 gallery items, 3 are junk for query 0: its list has 2 items, max_rank 50
    dist = np.array([[0.5, 0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3, 0.4, 0.5]])
    res = evaluate_ranking(dist, [1, 2], [1, -1, 1, 2, 1], [0, 1], [1, 0, 0, 0, 2], max_rank=50)
    assert res["cmc"].shape == (50,)
    # query 0: list [item3 (pid 2), item4 (pid 1), item0 (pid 1)] -> first hit rank 2
    # query 1: item3 is pid 2 cam 0, query cam 1 -> hit at rank 3 of [0, 2, 3, 4]
    np.testing.assert_array_equal(res["first_hit_rank"], [2, 3])
    np.testing.assert_allclose(res["cmc"][:4], [0.0, 0.5, 1.0, 1.0])
    assert np.all(res["cmc"][2:] == 1.0)


def test_invalid_queries_are_excluded_and_counted():
    rng = np.random.default_rng(5)
    dist, qp, gp, qc, gc = random_problem(rng, 30, 50)
    qp[0], qp[1] = -1, 77            # a junk query and an id not in the gallery
    gp[gp == qp[2]] = 0              # an id whose gallery images became distractors
    ref = reference_ranking(dist, qp, gp, qc, gc)
    res = evaluate_ranking(dist, qp, gp, qc, gc)
    assert res["num_invalid_queries"] == ref["num_invalid"] >= 3
    assert not res["valid"][:3].any() and np.isnan(res["ap"][:3]).all()
    assert (res["first_hit_rank"][:3] == -1).all()
    assert res["mAP"] == pytest.approx(ref["mAP"], abs=1e-12)  # averaged over valid queries only


def test_no_valid_query_raises():
    with pytest.raises(ValueError, match="no valid query"):
        evaluate_ranking(np.ones((2, 2)), [1, 2], [3, 4], [0, 0], [1, 1])


def test_non_interpolated_ap_equals_sklearn_without_junk():
    rng = np.random.default_rng(3)
    num_q, num_g = 25, 80
    qp, gp = rng.integers(1, 6, num_q), rng.integers(1, 6, num_g)
    qc, gc = np.zeros(num_q, int), rng.integers(1, 4, num_g)   # no same-camera junk
    dist = rng.random((num_q, num_g))                          # continuous: no ties
    res = evaluate_ranking(dist, qp, gp, qc, gc)
    for i in range(num_q):
        expected = average_precision_score(gp == qp[i], -dist[i])
        assert res["ap"][i] == pytest.approx(expected, abs=1e-12)


def test_trapezoid_ap_equals_devkit_loop():
    rng = np.random.default_rng(4)
    dist, qp, gp, qc, gc = random_problem(rng, 30, 70, levels=1000)
    res = evaluate_ranking(dist, qp, gp, qc, gc, ap="trapezoid")
    plain = evaluate_ranking(dist, qp, gp, qc, gc)
    for i in np.flatnonzero(res["valid"]):
        good = set(np.flatnonzero((gp == qp[i]) & (gc != qc[i])).tolist())
        junk = set(np.flatnonzero(((gp == qp[i]) & (gc == qc[i])) | (gp == -1)).tolist())
        index = np.argsort(dist[i], kind="stable").tolist()
        assert res["ap"][i] == pytest.approx(devkit_ap(good, junk, index), abs=1e-12)
    assert res["mAP"] <= plain["mAP"]


def test_sort_free_equals_sort_exactly_on_heavy_ties():
    rng = np.random.default_rng(6)
    dist, qp, gp, qc, gc = random_problem(rng, 80, 120, num_ids=5, levels=3)
    a = evaluate_ranking(dist.astype(np.float32), qp, gp, qc, gc, method="sort")
    b = evaluate_ranking(dist.astype(np.float32), qp, gp, qc, gc, method="sort_free")
    for key in ("cmc", "ap", "inp", "first_hit_rank", "num_hits", "valid"):
        np.testing.assert_array_equal(a[key], b[key])
    assert (a["mAP"], a["mINP"]) == (b["mAP"], b["mINP"])


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_chunked_features_equal_full_matrix_exactly(metric):
    rng = np.random.default_rng(7)
    num_q, num_g = 600, 300
    qp, gp = rng.integers(1, 20, num_q), rng.integers(-1, 20, num_g)
    qc, gc = rng.integers(0, 4, num_q), rng.integers(0, 4, num_g)
    qf = np.round(rng.standard_normal((num_q, 8)), 1).astype(np.float32)  # coarse: tied distances
    gf = np.round(rng.standard_normal((num_g, 8)), 1).astype(np.float32)
    full = pairwise_distance(qf, gf, metric)
    assert chunk_rows(num_g, 0.001) < num_q  # the small budget really chunks
    blocks = np.concatenate([b for _, _, b in iter_distance_blocks(qf, gf, metric, memory_budget_mb=0.001)])
    np.testing.assert_array_equal(blocks, full)
    ref = evaluate_ranking(full, qp, gp, qc, gc, memory_budget_mb=1e6)
    for budget in (0.001, 1.0, 1e6):
        for method in ("sort", "sort_free"):
            res = evaluate_ranking(query_pids=qp, gallery_pids=gp, query_cams=qc, gallery_cams=gc,
                                   query_features=qf, gallery_features=gf, metric=metric,
                                   memory_budget_mb=budget, method=method)
            for key in ("cmc", "ap", "inp", "first_hit_rank", "valid"):
                np.testing.assert_array_equal(res[key], ref[key])
            assert (res["mAP"], res["mINP"]) == (ref["mAP"], ref["mINP"])


def test_pairwise_distance_values():
    q = np.array([[3.0, 4.0], [1.0, 0.0]])
    g = np.array([[0.0, 2.0], [1.0, 0.0]])
    np.testing.assert_allclose(pairwise_distance(q, g, "cosine"), [[0.2, 0.4], [1.0, 0.0]], atol=1e-6)
    np.testing.assert_allclose(pairwise_distance(q, g, "euclidean"), [[13.0, 20.0], [5.0, 0.0]], atol=1e-5)


def test_chunk_rows_follows_the_budget_formula():
    # B = budget / (22 G), rounded down to the 64-row tile of galleries above 65,536 images
    assert chunk_rows(519_732, 1024) == 64
    assert chunk_rows(519_732, 3 * 1024) == 3 * 1024 * 2**20 // (22 * 519_732) // 64 * 64 == 256
    assert chunk_rows(15_913, 1024) == 1024 * 2**20 // (22 * 15_913) // 256 * 256
    with pytest.raises(ValueError, match="memory_budget_mb"):
        chunk_rows(100, 0)


GOOD = dict(query_pids=[1, 2], gallery_pids=[1, 2, 3], query_cams=[0, 0], gallery_cams=[1, 1, 1])


@pytest.mark.parametrize("change,match", [
    (dict(distmat=np.full((2, 3), np.nan)), "distmat contains NaN"),
    (dict(distmat=np.ones(3)), "distmat must be a 2-D"),
    (dict(distmat=np.ones((0, 3)), query_pids=[], query_cams=[]), "no queries"),
    (dict(distmat=np.ones((2, 0)), gallery_pids=[], gallery_cams=[]), "empty gallery"),
    (dict(gallery_pids=[1, 2]), "gallery_pids has 2 entries"),
    (dict(query_cams=[0, 0, 0]), "query_cams has 3 entries"),
    (dict(query_pids=[[1, 2]]), "query_pids must be a 1-D"),
    (dict(ap="interpolated"), "ap must be one of"),
    (dict(method="fast"), "method must be one of"),
    (dict(max_rank=0), "max_rank must be a positive integer"),
    (dict(query_features=np.ones((2, 4)), gallery_features=np.ones((3, 4))), "either distmat or"),
])
def test_bad_distmat_input(change, match):
    kwargs = dict(GOOD, distmat=np.ones((2, 3)))
    kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        evaluate_ranking(**kwargs)


@pytest.mark.parametrize("qf,gf,match", [
    (np.array([[np.nan, 1.0], [1.0, 1.0]]), np.ones((3, 2)), "query_features contains NaN"),
    (np.ones((2, 2)), np.array([[1.0, np.inf], [1.0, 1.0], [1.0, 2.0]]), "gallery_features contains NaN or inf"),
    (np.ones((2, 2)), np.ones((3, 5)), "query_features has feature dimension 2, but gallery_features has 5"),
    (np.ones(2), np.ones((3, 2)), "query_features must be a 2-D"),
    (np.zeros((0, 2)), np.ones((3, 2)), "query_features is empty"),
    (np.ones((2, 2)), np.ones((4, 2)), "gallery_pids has 3 entries but gallery_features has 4"),
    (np.array([[0.0, 0.0], [1.0, 1.0]]), np.ones((3, 2)), "query_features row 0 has zero norm"),
])
def test_bad_feature_input(qf, gf, match):
    with pytest.raises(ValueError, match=match):
        evaluate_ranking(query_features=qf, gallery_features=gf, **GOOD)
