"""Diagnostics behind the plots (EER, camera pairs, ranked lists, gallery size) and the plots / CLI."""
import numpy as np
import pytest

from reid_keras import visualize
from reid_keras.metrics import diagnostics, plots
from reid_keras.metrics.features import FeatureSet, save_features
from tests.eval_helpers import reference_ranking

PNG = b"\x89PNG\r\n\x1a\n"


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def problem():
    """6 ids x 3 cameras; queries in cameras 0-1, gallery in 0-2 plus junk and distractors."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(7, 16))
    q_pids, q_cams, g_pids, g_cams = [], [], [], []
    for pid in range(1, 7):
        for cam in (0, 1):
            q_pids.append(pid), q_cams.append(cam)
        for cam in (0, 1, 2):
            for _ in range(2):
                g_pids.append(pid), g_cams.append(cam)
    g_pids += [-1, 0, 0, 0]
    g_cams += [0, 2, 1, 0]
    q_pids, q_cams, g_pids, g_cams = map(np.array, (q_pids, q_cams, g_pids, g_cams))
    qf = _unit(centres[q_pids] + rng.normal(scale=1.2, size=(len(q_pids), 16)))
    gf = _unit(centres[np.maximum(g_pids, 0)] + rng.normal(scale=1.2, size=(len(g_pids), 16)))
    return FeatureSet(qf, q_pids, q_cams, np.array([f"q{i}.jpg" for i in range(len(qf))])), \
        FeatureSet(gf, g_pids, g_cams, np.array([f"g{i}.jpg" for i in range(len(gf))]))


def _brute_eer(pos, neg):
    best = None
    for t in np.unique(np.concatenate([pos, neg])):
        far = np.mean(neg <= t)
        frr = np.mean(pos > t)
        if best is None or abs(far - frr) < best[0]:
            best = (abs(far - frr), t, (far + frr) / 2)
    return best[1], best[2]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_eer_threshold_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    pos = np.round(rng.normal(0.4, 0.15, size=57), 2)  # rounding makes ties across both sets
    neg = np.round(rng.normal(0.8, 0.15, size=203), 2)
    got = diagnostics.eer_threshold(pos, neg)
    threshold, eer = _brute_eer(pos, neg)
    assert got["threshold"] == pytest.approx(threshold)
    assert got["eer"] == pytest.approx(eer)
    assert got["num_positive_pairs"] == 57 and got["num_negative_pairs"] == 203


def test_eer_separable_and_empty():
    got = diagnostics.eer_threshold([0.1, 0.2, 0.3], [0.5, 0.9])
    assert got["eer"] == 0.0 and got["threshold"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="0 negative"):
        diagnostics.eer_threshold([0.1], [])


def test_pair_sampling_enumerates_positives(problem):
    query, gallery = problem
    pos, neg = diagnostics.sample_pair_distances(query.features, gallery.features, query.pids, gallery.pids,
                                                 query.camids, gallery.camids, max_pairs=500, seed=0)
    expected = sorted(1.0 - float(query.features[i] @ gallery.features[j])
                      for i in range(len(query)) for j in range(len(gallery))
                      if query.pids[i] == gallery.pids[j] and query.camids[i] != gallery.camids[j])
    np.testing.assert_allclose(sorted(pos), expected, atol=1e-5)
    assert len(neg) == 500
    every_negative = {round(1.0 - float(query.features[i] @ gallery.features[j]), 5)
                      for i in range(len(query)) for j in range(len(gallery))
                      if query.pids[i] != gallery.pids[j] and gallery.pids[j] != -1}
    assert {round(float(d), 5) for d in neg} <= every_negative


def test_camera_heatmap_values_match_restricted_evaluation(problem):
    from reid_keras.metrics import evaluate_ranking

    query, gallery = problem
    matrix = diagnostics.cross_camera_matrix(query.pids, gallery.pids, query.camids, gallery.camids,
                                             query_features=query.features, gallery_features=gallery.features)
    assert matrix["query_cameras"] == [0, 1] and matrix["gallery_cameras"] == [0, 1, 2]
    assert np.isnan(matrix["mAP"][0, 0]) and np.isnan(matrix["mAP"][1, 1])
    cells = []
    for a, qc in enumerate([0, 1]):
        for b, gc in enumerate([0, 1, 2]):
            if qc == gc:
                continue
            qm, gm = query.camids == qc, gallery.camids == gc
            ref = reference_ranking(query_features=query.features[qm], gallery_features=gallery.features[gm],
                                    query_pids=query.pids[qm], gallery_pids=gallery.pids[gm],
                                    query_cams=query.camids[qm], gallery_cams=gallery.camids[gm], max_rank=1)
            api = evaluate_ranking(query_features=query.features[qm], gallery_features=gallery.features[gm],
                                   query_pids=query.pids[qm], gallery_pids=gallery.pids[gm],
                                   query_cams=query.camids[qm], gallery_cams=gallery.camids[gm], max_rank=1)
            assert matrix["mAP"][a, b] == pytest.approx(ref["mAP"]) == pytest.approx(api["mAP"])
            assert matrix["rank1"][a, b] == pytest.approx(ref["cmc"][0])
            assert matrix["num_valid_queries"][a, b] == 6
            cells.append(ref["mAP"])
    assert matrix["cross_camera_mAP"] == pytest.approx(np.mean(cells))
    # A precomputed distance matrix (e.g. re-ranked) gives the same cells when it is the cosine one.
    dist = 1.0 - query.features @ gallery.features.T
    again = diagnostics.cross_camera_matrix(query.pids, gallery.pids, query.camids, gallery.camids, distmat=dist)
    np.testing.assert_allclose(again["mAP"], matrix["mAP"], atol=1e-6)


def test_ranked_list_drops_junk_and_keeps_stable_order(problem):
    query, gallery = problem
    dist = np.round(1.0 - query.features @ gallery.features.T, 1)  # many ties
    top = diagnostics.ranked_list(0, query.pids, gallery.pids, query.camids, gallery.camids, k=10, distance_row=dist[0])
    pid, cam = query.pids[0], query.camids[0]
    kept = [j for j in np.argsort(dist[0], kind="stable")
            if not ((gallery.pids[j] == pid and gallery.camids[j] == cam) or gallery.pids[j] == -1)]
    assert top["index"].tolist() == kept[:10]
    assert top["match"].tolist() == [gallery.pids[j] == query.pids[0] for j in kept[:10]]
    picked = diagnostics.pick_queries(query.pids, gallery.pids, query.camids, gallery.camids, count=4, seed=1)
    assert len(picked) == 4 and len(set(picked.tolist())) == 4


@pytest.mark.parametrize("available, expected", [
    (500_000, [0, 100_000, 200_000, 500_000]), (250_000, [0, 100_000, 200_000, 250_000]),
    (10, [0, 2, 4, 10]), (0, [0])])
def test_distractor_tiers(available, expected):
    assert diagnostics.distractor_tiers(available) == expected


def test_gallery_size_curve_matches_direct_evaluation(problem):
    query, gallery = problem
    extra = _unit(np.random.default_rng(9).normal(size=(12, 16)))
    rows = diagnostics.gallery_size_curve(query, gallery, extra, [0, 5, 12], seed=4)
    order = np.random.default_rng(4).permutation(12)
    assert [r["gallery_size"] for r in rows] == [len(gallery), len(gallery) + 5, len(gallery) + 12]
    for row in rows:
        n = row["distractors"]
        ref = reference_ranking(query_features=query.features,
                                gallery_features=np.concatenate([gallery.features, extra[order[:n]]]),
                                query_pids=query.pids, gallery_pids=np.concatenate([gallery.pids, np.zeros(n, int)]),
                                query_cams=query.camids,
                                gallery_cams=np.concatenate([gallery.camids, -np.ones(n, int)]))
        assert row["mAP"] == pytest.approx(ref["mAP"]) and row["rank1"] == pytest.approx(ref["cmc"][0])
    assert rows[-1]["mAP"] <= rows[0]["mAP"]
    with pytest.raises(ValueError, match=r"tier\(s\) \[13\] outside 0..12"):
        diagnostics.gallery_size_curve(query, gallery, extra, [13])


def _is_png(path):
    with open(path, "rb") as handle:
        data = handle.read()
    return data[:8] == PNG and len(data) > 2000


def test_plot_functions_write_pngs(problem, tmp_path):
    query, gallery = problem
    rng = np.random.default_rng(0)
    cmc = np.cumsum(rng.random(20))
    cmc = cmc / cmc[-1]
    curves = {"baseline": cmc, "re-ranked": np.minimum(cmc + 0.05, 1)}
    assert _is_png(plots.plot_cmc(curves, str(tmp_path / "cmc.png")))
    images = [rng.integers(0, 255, size=(32, 16, 3), dtype=np.uint8) for _ in range(4)]
    rows = [{"query": images[0], "query_label": "id 1 c1", "gallery": images[1:], "match": [True, False, True],
             "labels": ["0.10", "0.20", "0.30"]}]
    assert _is_png(plots.plot_ranked_lists(rows, str(tmp_path / "sub" / "ranked.png")))
    matrix = diagnostics.cross_camera_matrix(query.pids, gallery.pids, query.camids, gallery.camids,
                                             query_features=query.features, gallery_features=gallery.features)
    assert _is_png(plots.plot_camera_heatmap(matrix, str(tmp_path / "heat.png")))
    assert _is_png(plots.plot_distance_histograms(rng.normal(0.3, 0.1, 50), rng.normal(0.8, 0.1, 200),
                                                  str(tmp_path / "hist.png"), threshold=0.55, eer=0.04))
    feats = np.concatenate([query.features, gallery.features])
    pids = np.concatenate([query.pids, gallery.pids])
    assert _is_png(plots.plot_tsne(feats, pids, str(tmp_path / "tsne.png"), max_points=40))
    curve = [{"distractors": 0, "gallery_size": 40, "mAP": 0.5, "rank1": 0.7},
             {"distractors": 10, "gallery_size": 50, "mAP": 0.4, "rank1": 0.6}]
    assert _is_png(plots.plot_gallery_size_curve(curve, str(tmp_path / "size.png")))
    assert not [p for p in tmp_path.rglob(".*.tmp")]  # temp files were renamed


def test_tsne_selection_skips_distractors_and_is_seeded():
    pids = np.repeat(np.arange(-1, 40), 5)
    a = plots.select_for_tsne(pids, max_ids=10, max_points=30, seed=5)
    assert len(a) == 30 and (pids[a] > 0).all() and len(np.unique(pids[a])) <= 10
    np.testing.assert_array_equal(a, plots.select_for_tsne(pids, max_ids=10, max_points=30, seed=5))


def test_visualize_cli(problem, tmp_path, capsys):
    query, gallery = problem
    q, g = str(tmp_path / "q.npz"), str(tmp_path / "g.npz")
    save_features(q, query), save_features(g, gallery)
    assert visualize.main(["tsne", "--features", q, g, "--out", str(tmp_path / "t.png"), "--max-points", "40"]) == 0
    assert visualize.main(["heatmap", "--query", q, "--gallery", g, "--out", str(tmp_path / "h.png")]) == 0
    assert _is_png(str(tmp_path / "t.png")) and _is_png(str(tmp_path / "h.png"))
    assert visualize.main(["heatmap", "--query", str(tmp_path / "missing.npz"), "--gallery", g,
                           "--out", str(tmp_path / "x.png")]) == 2
    assert "missing.npz" in capsys.readouterr().err
