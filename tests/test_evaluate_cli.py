"""`python -m reid_keras.evaluate` end to end on a tiny Market-1501 tree with a tiny saved model."""
import contextlib
import csv
import io
import json
import os

import numpy as np
import pytest

from reid_keras import evaluate
from reid_keras.metrics import diagnostics
from reid_keras.metrics.features import extract_features, load_features
from tests.eval_helpers import (build_tiny_models, reference_ranking, write_distractor_folder,
                                 write_market_tree)

PLOTS = ("cmc", "ranked_lists", "camera_heatmap", "distance_histograms", "tsne", "gallery_size")


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = evaluate.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("eval")
    root = write_market_tree(str(base / "Market-1501-v15.09.15"))
    distractors = write_distractor_folder(str(base / "distractors"), count=10)
    _, siamese = build_tiny_models()
    model = str(base / "model.keras")
    siamese.save(model)
    out = str(base / "out")
    argv = ["--model", model, "--dataset", "market1501", "--data-root", str(base), "--out", out,
            "--distractors", distractors, "--batch-size", "8", "--tsne-points", "60", "--seed", "3"]
    code, stdout, stderr = _run(argv)
    return {"base": base, "root": root, "model": model, "out": out, "argv": argv, "code": code,
            "stdout": stdout, "stderr": stderr}


def _metrics(out):
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as handle:
        return json.load(handle)


def test_run_succeeds_and_prints_table(setup):
    assert setup["code"] == 0, setup["stderr"]
    text = setup["stdout"]
    assert "rank-1" in text and "rank-20" in text and "mAP (non-interpolated)" in text and "mINP" in text
    assert "same-person threshold" in text and "cross-camera average" in text


def test_metrics_match_direct_evaluation(setup):
    from reid_keras.data.datasets import load_dataset
    from reid_keras.metrics import evaluate_ranking
    from reid_keras.models.loading import load_embedding_model

    m = _metrics(setup["out"])
    for key in ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP", "cmc", "num_valid_queries",
                "num_invalid_queries", "ap_variant", "same_person_threshold", "cross_camera",
                "gallery_size_curve", "plots", "num_query", "num_gallery", "model", "dataset"):
        assert key in m, key
    dataset = load_dataset("market1501", setup["root"])
    assert m["num_query"] == len(dataset.query) == 12 and m["num_gallery"] == len(dataset.gallery) == 38
    # Fresh features (no cache) through the public API, then the metric API directly.
    model = load_embedding_model(setup["model"])
    qf = extract_features(model, dataset.query, batch_size=5, verbose=False)
    gf = extract_features(model, dataset.gallery, batch_size=5, verbose=False)
    cached = load_features(os.path.join(setup["out"], "features_gallery.npz"))
    np.testing.assert_allclose(cached.features, gf.features, atol=1e-5)
    direct = evaluate_ranking(query_features=qf.features, gallery_features=gf.features, query_pids=qf.pids,
                              gallery_pids=gf.pids, query_cams=qf.camids, gallery_cams=gf.camids, max_rank=50)
    ref = reference_ranking(query_features=qf.features, gallery_features=gf.features, query_pids=qf.pids,
                            gallery_pids=gf.pids, query_cams=qf.camids, gallery_cams=gf.camids, max_rank=50)
    for k in (1, 5, 10, 20):
        assert m[f"rank{k}"] == pytest.approx(direct["cmc"][k - 1], abs=1e-6) == pytest.approx(ref["cmc"][k - 1])
    assert m["mAP"] == pytest.approx(direct["mAP"], abs=1e-6) and m["mAP"] == pytest.approx(ref["mAP"], abs=1e-6)
    assert m["mINP"] == pytest.approx(direct["mINP"], abs=1e-6)
    assert m["num_valid_queries"] == 12 and m["num_invalid_queries"] == 0

    pos, neg = diagnostics.sample_pair_distances(qf.features, gf.features, qf.pids, gf.pids, qf.camids, gf.camids,
                                                 seed=3)
    eer = diagnostics.eer_threshold(pos, neg)
    assert m["same_person_threshold"]["threshold"] == pytest.approx(eer["threshold"], abs=1e-5)
    assert m["same_person_threshold"]["num_positive_pairs"] == 12 * 4  # other-camera gallery images per query
    cams = diagnostics.cross_camera_matrix(qf.pids, gf.pids, qf.camids, gf.camids, query_features=qf.features,
                                           gallery_features=gf.features)
    np.testing.assert_allclose(np.array(m["cross_camera"]["mAP"], dtype=float), cams["mAP"], atol=1e-5)
    assert m["cross_camera"]["mAP"][0][0] is None  # same camera: JSON null, not NaN


def test_gallery_size_curve_tiers(setup):
    curve = _metrics(setup["out"])["gallery_size_curve"]
    m = _metrics(setup["out"])
    assert [r["distractors"] for r in curve] == [0, 2, 4, 10]
    assert [r["gallery_size"] for r in curve] == [38, 40, 42, 48]
    assert curve[0]["mAP"] == pytest.approx(m["mAP"], abs=1e-6) and curve[0]["rank1"] == pytest.approx(m["rank1"])


def test_plots_written(setup):
    plots = _metrics(setup["out"])["plots"]
    assert sorted(plots) == sorted(PLOTS)
    for name in plots.values():
        path = os.path.join(setup["out"], name)
        with open(path, "rb") as handle:
            data = handle.read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name


def test_rerun_reuses_cache_and_appends_csv(setup):
    out = setup["out"]
    cache = os.path.join(out, "features_query.npz")
    stamp = os.stat(cache).st_mtime_ns
    shared_csv = str(setup["base"] / "all_results.csv")
    argv = setup["argv"][:10] + ["--no-plots", "--query-expansion", "--rerank", "--results-csv", shared_csv]
    code, stdout, stderr = _run(argv)
    assert code == 0, stderr
    assert os.stat(cache).st_mtime_ns == stamp  # features came from the cache
    m = _metrics(out)
    assert list(m["variants"]) == ["baseline", "query expansion + re-ranking"]
    assert m["variant"] == "query expansion + re-ranking" and "plots" not in m

    from reid_keras.metrics import evaluate_ranking, query_expansion, rerank_k_reciprocal

    q, g = load_features(cache), load_features(os.path.join(out, "features_gallery.npz"))
    dist = rerank_k_reciprocal(query_expansion(q.features, g.features), g.features, k1=20, k2=6, lambda_value=0.3)
    direct = evaluate_ranking(distmat=dist, query_pids=q.pids, gallery_pids=g.pids, query_cams=q.camids,
                              gallery_cams=g.camids)
    assert m["mAP"] == pytest.approx(direct["mAP"], abs=1e-6)
    assert "query expansion + re-ranking" in stdout

    code, _, _ = _run(argv[:10] + ["--no-plots", "--results-csv", shared_csv])
    assert code == 0
    with open(shared_csv, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["variant"] for r in rows] == ["query expansion + re-ranking", "baseline"]
    assert float(rows[1]["mAP"]) == pytest.approx(_metrics(out)["mAP"], abs=1e-6)
    with open(os.path.join(out, "results.csv"), newline="", encoding="utf-8") as handle:
        assert len(list(csv.DictReader(handle))) == 1  # the first run's default CSV


@pytest.mark.parametrize("change, message", [
    ({"--model": "missing.keras"}, "does not exist"),
    ({"--data-root": "no_such_dir"}, "does not exist or is not a folder"),
    ({"--dataset": "market9999"}, "known datasets"),
    ({"--dataset-option": "oops"}, "expected key=value"),
    ({"--dataset-option": "colour=1"}, "unknown option"),
    ({"--distractors": "nowhere"}, "is not a folder"),
    ({"--image-size": "32x16"}, "differs from the input size 16x8"),
])
def test_bad_input_exits_2_without_traceback(setup, tmp_path, change, message):
    argv = ["--model", setup["model"], "--dataset", "market1501", "--data-root", str(setup["base"]),
            "--out", str(tmp_path / "o"), "--no-plots"]
    for flag, value in change.items():
        value = str(tmp_path / value) if flag in ("--model", "--data-root", "--distractors") else value
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    code, _, stderr = _run(argv)
    assert code == 2
    assert message in stderr and "Traceback" not in stderr
    assert not os.path.exists(tmp_path / "o" / "metrics.json")


def test_no_valid_query_exits_2(setup, tmp_path):
    """A gallery without any true match (every query invalid) is a data error, not a crash."""
    root = write_market_tree(str(tmp_path / "m"), num_ids=3, cams=(1, 2))
    for name in os.listdir(os.path.join(root, "bounding_box_test")):
        if not name.startswith(("0000", "-1")):
            os.remove(os.path.join(root, "bounding_box_test", name))
    code, _, stderr = _run(["--model", setup["model"], "--dataset", "market1501", "--data-root", root,
                            "--out", str(tmp_path / "o"), "--no-plots"])
    assert code == 2 and "no valid query" in stderr and "Traceback" not in stderr


def test_broken_model_file_exits_2(setup, tmp_path):
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"garbage")
    code, _, stderr = _run(["--model", str(bad), "--dataset", "market1501", "--data-root", str(setup["base"])])
    assert code == 2 and "could not load" in stderr and "bad.keras" in stderr


def test_cuhk01_adds_its_paper_protocol(setup, tmp_path):
    """CUHK01 also reports docs/protocols.md (c), equal to evaluate_cuhk01 on the same features."""
    from reid_keras.data.datasets import synthetic
    from reid_keras.metrics.protocols import evaluate_cuhk01

    synthetic.write_dataset(layout="cuhk01", out=str(tmp_path / "data"), num_ids=8, seed=0)
    out = str(tmp_path / "out")
    code, stdout, stderr = _run(["--model", setup["model"], "--dataset", "cuhk01", "--data-root",
                                 str(tmp_path / "data"), "--out", out, "--no-plots", "--seed", "2"])
    assert code == 0, stderr
    paper = _metrics(out)["dataset_protocol"]
    a = load_features(os.path.join(out, "features_query.npz"))
    b = load_features(os.path.join(out, "features_gallery.npz"))
    assert set(a.camids.tolist()) == {0} and set(b.camids.tolist()) == {1}
    direct = evaluate_cuhk01(features_a=a.features, pids_a=a.pids, features_b=b.features, pids_b=b.pids,
                             trials=10, seed=2)
    for key, (mean, std) in direct["table"].items():
        assert paper["mean_std"][key][0] == pytest.approx(mean / 100)
    assert "CUHK01 paper protocol" in stdout and "rank-15" in stdout


def test_unknown_dataset_lists_the_registered_ones_once(setup, tmp_path):
    from reid_keras.data.datasets import DATASET_NAMES

    code, _, stderr = _run(["--model", setup["model"], "--dataset", "market9999", "--data-root", str(setup["base"]),
                            "--out", str(tmp_path / "o")])
    assert code == 2 and "Traceback" not in stderr
    assert stderr.count("known datasets") == 1 and stderr.count("market1501") == 1
    assert f"known datasets: {', '.join(DATASET_NAMES)}" in stderr and "synthetic" in DATASET_NAMES


def test_missing_data_root_names_the_flag(setup, tmp_path):
    code, _, stderr = _run(["--model", setup["model"], "--dataset", "cuhk03", "--out", str(tmp_path / "o")])
    assert code == 2 and "Traceback" not in stderr
    assert "--data-root is required for --dataset cuhk03" in stderr
    assert not os.path.exists(tmp_path / "o")
