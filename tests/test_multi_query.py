"""Market-1501 multi-query (docs/datasets.md §1): pooling, and `evaluate_model` end to end on a tiny
synthetic Market with gt_bbox/, checked against a numpy loop and a plain argsort ranking."""
import os

import numpy as np
import pytest

from reid_keras.metrics import pool_multi_query
from reid_keras.metrics.evaluation import evaluate_model
from reid_keras.metrics.options import EvaluationOptions
from reid_keras.metrics.report import format_table

IMAGE_SIZE = (32, 16)


def loop_pool(q_pids, q_cams, q_feats, p_pids, p_cams, p_feats, method):
    """Per query: the pool rows of its (pid, camera), each normalised, then mean / max, normalised."""
    out, counts = [], []
    for pid, cam, feat in zip(q_pids, q_cams, q_feats):
        rows = [f / np.linalg.norm(f) for f, p, c in zip(p_feats, p_pids, p_cams) if p == pid and c == cam]
        pooled = feat if not rows else (np.mean(rows, axis=0) if method == "mean" else np.max(rows, axis=0))
        out.append(pooled / np.linalg.norm(pooled))
        counts.append(len(rows))
    return np.array(out), np.array(counts)


def pool_case(seed=0):
    rng = np.random.default_rng(seed)
    q_pids = np.array([1, 1, 2, 7, 7, 12, -1])
    q_cams = np.array([0, 3, 12, 2, -1, 1, 0])  # wide camera range: pid * 10 + cam would collide
    p_pids = rng.choice([1, 2, 7, 12, 3, 0, -1], size=60)
    p_cams = rng.choice([-1, 0, 1, 2, 3, 12], size=60)
    p_pids[:3], p_cams[:3] = 7, 2  # at least one group of several rows
    keep = ~((p_pids == 12) & (p_cams == 1))  # query 5 has no pool image
    p_pids, p_cams = p_pids[keep], p_cams[keep]
    q_feats = rng.normal(size=(len(q_pids), 5)) * 3
    p_feats = rng.normal(size=(len(p_pids), 5)) * rng.uniform(0.1, 5, size=(len(p_pids), 1))  # not normalised
    return q_pids, q_cams, q_feats, p_pids, p_cams, p_feats


@pytest.mark.parametrize("method", ["mean", "max"])
def test_pooling_matches_a_loop(method):
    args = pool_case()
    pooled, counts = pool_multi_query(*args, method=method)
    expected, expected_counts = loop_pool(*args, method)
    assert pooled.dtype == np.float32 and pooled.shape == (7, 5)
    np.testing.assert_allclose(pooled, expected, atol=1e-6)
    np.testing.assert_array_equal(counts, expected_counts)
    assert counts[5] == 0 and counts[3] >= 3
    np.testing.assert_allclose(np.linalg.norm(pooled, axis=1), 1.0, atol=1e-6)


def test_query_without_pool_images_keeps_its_own_feature():
    q_pids, q_cams, q_feats, p_pids, p_cams, p_feats = pool_case(1)
    pooled, counts = pool_multi_query(q_pids, q_cams, q_feats, p_pids, p_cams, p_feats)
    np.testing.assert_allclose(pooled[5], q_feats[5] / np.linalg.norm(q_feats[5]), atol=1e-6)
    pooled, counts = pool_multi_query(q_pids, q_cams, q_feats, [], [], np.zeros((0, 5)), method="max")
    np.testing.assert_array_equal(counts, np.zeros(7))
    np.testing.assert_allclose(pooled, q_feats / np.linalg.norm(q_feats, axis=1, keepdims=True), atol=1e-6)


def test_pooling_errors_name_the_argument():
    q_pids, q_cams, q_feats, p_pids, p_cams, p_feats = pool_case()
    with pytest.raises(ValueError, match="method must be one of mean, max, got 'median'"):
        pool_multi_query(q_pids, q_cams, q_feats, p_pids, p_cams, p_feats, method="median")
    with pytest.raises(ValueError, match=r"query_features must be a 2-D .* shape \(35,\)"):
        pool_multi_query(q_pids, q_cams, q_feats.ravel(), p_pids, p_cams, p_feats)
    with pytest.raises(ValueError, match="pool_features have dimension 4 but query_features have 5"):
        pool_multi_query(q_pids, q_cams, q_feats, p_pids, p_cams, p_feats[:, :4])
    with pytest.raises(ValueError, match="pool_cams has 3 entries but pool_features has"):
        pool_multi_query(q_pids, q_cams, q_feats, p_pids, p_cams[:3], p_feats)
    with pytest.raises(ValueError, match="query_pids has 6 entries"):
        pool_multi_query(q_pids[:6], q_cams, q_feats, p_pids, p_cams, p_feats)
    bad = p_feats.copy()
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="pool_features holds NaN"):
        pool_multi_query(q_pids, q_cams, q_feats, p_pids, p_cams, bad)


# ---------------------------------------------------------------------------------------- end to end

def grid_colours(images):
    """A cheap deterministic embedding: mean colour of 4 x 2 cells (not flip invariant)."""
    x = np.asarray(images, dtype=np.float32)
    n, h, w, _ = x.shape
    return x.reshape(n, 4, h // 4, 2, w // 2, 3).mean(axis=(2, 4)).reshape(n, -1) - 110.0


def plain_ranking(qf, q_pids, q_cams, gf, g_pids, g_cams, ranks=(1, 5, 10, 20)):
    """docs/protocols.md (a) with a full argsort per query: junk = same id and camera, or id -1."""
    dist = 1.0 - qf.astype(np.float64) @ gf.astype(np.float64).T
    aps, cmc = [], []
    for i in range(len(qf)):
        order = np.argsort(dist[i], kind="stable")
        junk = ((g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i])) | (g_pids[order] == -1)
        hits = np.flatnonzero(g_pids[order][~junk] == q_pids[i]) + 1
        if not len(hits):
            continue
        aps.append(np.mean(np.arange(1, len(hits) + 1) / hits))
        cmc.append([hits[0] <= k for k in ranks])
    table = {f"rank-{k}": float(v) for k, v in zip(ranks, np.mean(cmc, axis=0))}
    table["mAP"] = float(np.mean(aps))
    return table


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    from reid_keras.data.datasets import load_dataset
    from reid_keras.data.datasets.synthetic import write_dataset
    from reid_keras.models.loading import EmbeddingModel

    base = tmp_path_factory.mktemp("mq")
    write_dataset("market1501", str(base), num_ids=12)
    root = base / "Market-1501-v15.09.15"
    # One query's (id, camera) loses its gt_bbox boxes: that query keeps its own feature.
    query_names = sorted(os.listdir(root / "query"))
    gone = [n for n in os.listdir(root / "gt_bbox") if n[:7] == query_names[0][:7]]
    for name in gone:
        os.remove(root / "gt_bbox" / name)
    source = base / "model.keras"
    source.write_bytes(b"stand-in: the cache key needs a file")
    model = EmbeddingModel(embed_fn=grid_colours, image_size=IMAGE_SIZE, preprocessing=None,
                           source=str(source), kind="keras")
    dataset = load_dataset("market1501", str(base))
    return {"base": base, "root": root, "model": model, "dataset": dataset, "removed": len(gone)}


def _run(market, out, multi_query="mean"):
    options = EvaluationOptions(plots=False, batch_size=32, multi_query=multi_query)
    return evaluate_model(market["model"], market["dataset"], out, options, IMAGE_SIZE)


def _pool(dataset):
    return list(dataset.protocol("multi_query").records)


@pytest.fixture(scope="module")
def features(market):
    from reid_keras.metrics.features import extract_features

    ds = market["dataset"]
    records = {"query": ds.query, "gallery": ds.gallery, "multi_query": _pool(ds)}
    return {split: extract_features(market["model"], records[split], batch_size=16, image_size=IMAGE_SIZE,
                                    verbose=False) for split in ("query", "gallery", "multi_query")}


@pytest.mark.parametrize("method", ["mean", "max"])
def test_evaluate_reports_multi_query(market, features, tmp_path_factory, method):
    ds = market["dataset"]
    out = str(tmp_path_factory.mktemp(f"out_{method}"))
    metrics = _run(market, out, method)
    mq = metrics["multi_query"]
    assert sorted(mq) == ["mean_std", "name", "pool_images", "pooling", "queries_without_pool_images"]
    assert mq["name"] == (f"Market-1501 multi-query (docs/datasets.md §1), {method} pooling of gt_bbox features "
                          "per query id and camera")
    assert mq["pooling"] == method and mq["pool_images"] == len(_pool(ds))
    assert len(os.listdir(market["root"] / "gt_bbox")) == len(_pool(ds)) and market["removed"] >= 1
    assert mq["queries_without_pool_images"] == 1

    q, g, pool = features["query"], features["gallery"], features["multi_query"]
    pooled = []
    for i in range(len(q)):  # mean / max of the gt_bbox boxes of the query's id and camera, by hand
        rows = pool.features[(pool.pids == q.pids[i]) & (pool.camids == q.camids[i])]
        vec = q.features[i] if not len(rows) else (rows.mean(0) if method == "mean" else rows.max(0))
        pooled.append(vec / np.linalg.norm(vec))
    expected = plain_ranking(np.array(pooled), q.pids, q.camids, g.features, g.pids, g.camids)
    assert list(mq["mean_std"]) == ["rank-1", "rank-5", "rank-10", "rank-20", "mAP"]
    for key, value in expected.items():
        assert mq["mean_std"][key][0] == pytest.approx(value, abs=1e-6), key
        assert mq["mean_std"][key][1] is None
    # Single-query numbers are untouched by the multi-query step.
    single = plain_ranking(q.features, q.pids, q.camids, g.features, g.pids, g.camids)
    assert metrics["rank1"] == pytest.approx(single["rank-1"], abs=1e-6)
    assert metrics["mAP"] == pytest.approx(single["mAP"], abs=1e-6)
    assert mq["mean_std"]["mAP"][0] != pytest.approx(single["mAP"], abs=1e-4)  # pooling changed something

    cache = os.path.join(out, "features_multi_query.npz")
    stamp = os.stat(cache).st_mtime_ns
    again = _run(market, out, method)
    assert os.stat(cache).st_mtime_ns == stamp and again["multi_query"] == mq  # reused
    import json

    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as handle:
        assert json.load(handle)["multi_query"] == mq
    text = format_table(metrics)
    line = [t for t in text.splitlines() if t.startswith("Market-1501 multi-query")]
    assert len(line) == 1 and f"rank-1 {100 * expected['rank-1']:.2f}" in line[0]


def test_multi_query_off_and_datasets_without_gt_bbox(market, tmp_path):
    metrics = _run(market, str(tmp_path / "off"), "off")
    assert "multi_query" not in metrics and "rank1" in metrics
    assert not os.path.exists(tmp_path / "off" / "features_multi_query.npz")
    assert "multi-query" not in format_table(metrics)
    import dataclasses

    plain = dict(market, dataset=dataclasses.replace(market["dataset"], protocols=()))  # e.g. no gt_bbox/
    assert "multi_query" not in _run(plain, str(tmp_path / "none"))
    from reid_keras.cli.evaluate import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "m", "--dataset", "d", "--data-root", "r", "--multi-query", "median"])
    with pytest.raises(ValueError, match="EvaluationOptions.multi_query must be one of mean, max, off, got 'median'"):
        EvaluationOptions(multi_query="median")
