"""The detections file (metrics/detections_file.py), the person-search plots (metrics/search_plots.py)
and `python -m reid_keras.evaluate_search` end to end on a tiny synthetic CUHK-SYSU tree."""
import contextlib
import io
import json
import os

import numpy as np
import pytest

from reid_keras.metrics import search_plots
from reid_keras.metrics.detections_file import (DetectionsFileError, load_detections, load_query_embeddings,
                                                save_detections)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _random_detections(rng, counts=(3, 0, 5), dim=8):
    dets = {}
    for i, n in enumerate(counts):
        xy = rng.uniform(0, 50, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 40, (n, 2))], axis=1)
        dets[f"s{i}.jpg"] = (boxes, rng.uniform(0, 1, n), rng.normal(size=(n, dim)))
    return dets


def _write_npz(path, **arrays):
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return str(path)


def _valid_arrays():
    return dict(names=np.array(["a.jpg", "b.jpg"]), boxes=np.zeros((3, 4), np.float32) + [0, 0, 5, 5],
                scores=np.ones(3, np.float32), embeddings=np.ones((3, 4), np.float32),
                image_index=np.array([1, 0, 1], np.int32), format_version=np.array(1))


# --- the detections file -------------------------------------------------------------------------------

def test_round_trip_keeps_every_image_and_the_layout(tmp_path):
    rng = np.random.default_rng(0)
    dets = _random_detections(rng)
    query = rng.normal(size=(4, 8))
    path = save_detections(str(tmp_path / "dets.npz"), dets, query_embeddings=query, dataset_name="cuhk_sysu")
    assert path == str(tmp_path / "dets.npz") and os.listdir(tmp_path) == ["dets.npz"]  # no temporary left
    loaded, loaded_query, meta = load_detections(path)
    assert list(loaded) == ["s0.jpg", "s1.jpg", "s2.jpg"]
    for name, (boxes, scores, emb) in dets.items():
        got = loaded[name]
        assert [a.dtype for a in got] == [np.float32] * 3
        assert got[0].shape == (len(scores), 4) and got[2].shape == (len(scores), 8)
        np.testing.assert_allclose(got[0], boxes, rtol=1e-6)
        np.testing.assert_allclose(got[1], scores, rtol=1e-6)
        np.testing.assert_allclose(got[2], emb, rtol=1e-6)
    np.testing.assert_allclose(loaded_query, query, rtol=1e-6)
    assert meta == {"format_version": 1, "dataset_name": "cuhk_sysu", "num_images": 3, "num_detections": 8,
                    "embedding_dim": 8, "path": path}
    with np.load(path, allow_pickle=False) as raw:  # the documented arrays, nothing pickled
        assert sorted(raw.files) == ["boxes", "dataset_name", "embeddings", "format_version", "image_index",
                                     "names", "query_embeddings", "scores"]
        assert raw["image_index"].dtype == np.int32 and raw["image_index"].tolist() == [0, 0, 0, 2, 2, 2, 2, 2]
        assert raw["boxes"].dtype == np.float32 and raw["names"].dtype.kind == "U" and int(raw["format_version"]) == 1


def test_a_hand_written_file_groups_rows_by_image_in_row_order(tmp_path):
    arrays = _valid_arrays()
    arrays["scores"] = np.array([0.1, 0.2, 0.3], np.float32)  # rows of b.jpg: 0 and 2, of a.jpg: 1
    loaded, query, meta = load_detections(_write_npz(tmp_path / "d.npz", **arrays))
    assert query is None and meta["dataset_name"] is None
    assert loaded["b.jpg"][1].tolist() == pytest.approx([0.1, 0.3])
    assert loaded["a.jpg"][1].tolist() == pytest.approx([0.2])


def test_an_image_without_detections_loads_as_empty_arrays_of_the_right_width(tmp_path):
    path = save_detections(str(tmp_path / "d.npz"), {"a.jpg": ([], [], []), "b.jpg": ([[0, 0, 4, 4]], [0.9], [[1, 0]])})
    loaded, _, meta = load_detections(path)
    assert [a.shape for a in loaded["a.jpg"]] == [(0, 4), (0,), (0, 2)] and meta["num_detections"] == 1


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("image_index"), "missing array(s) image_index; a detections file holds names, boxes"),
    (lambda a: a.update(boxes=np.zeros((3, 3), np.float32)), "boxes has shape (3, 3), expected [3, 4]"),
    (lambda a: a.update(embeddings=np.zeros((2, 4), np.float32)), "embeddings has shape (2, 4), expected [3, D]"),
    (lambda a: a.update(image_index=np.array([0, 2, 1], np.int32)),
     "image_index 2 at row 1 is outside 0..1 (names has 2 entries); 1 row(s) out of range"),
    (lambda a: a.update(image_index=np.array([0.0, 1.0, 1.0])), "image_index has dtype float64, expected integers"),
    (lambda a: a.update(format_version=np.array(2)), "format_version 2 is not supported (this reader knows 1)"),
    (lambda a: a.update(names=np.array(["a.jpg", "a.jpg"])), "names lists 'a.jpg' 2 times; each image once"),
    (lambda a: a.update(query_embeddings=np.zeros((5, 3), np.float32)),
     "query_embeddings has shape (5, 3), expected [Q, 4]"),
])
def test_a_bad_file_is_refused_naming_the_file_and_the_array(tmp_path, change, message):
    arrays = _valid_arrays()
    change(arrays)
    path = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DetectionsFileError) as err:
        load_detections(path)
    assert str(err.value).startswith(f"{path}: {message}")


def test_files_that_are_no_detections_file_are_refused(tmp_path):
    missing = str(tmp_path / "none.npz")
    with pytest.raises(DetectionsFileError, match=r"detections file '.*none\.npz' does not exist"):
        load_detections(missing)
    text = tmp_path / "notes.npz"
    text.write_text("not a zip")
    with pytest.raises(DetectionsFileError,
                       match=r"notes\.npz: not a readable \.npz file \(no zip archive\), expected an \.npz"):
        load_detections(str(text))
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(DetectionsFileError, match=r"single\.npy: a single array \(\.npy\), expected an \.npz"):
        load_detections(str(tmp_path / "single.npy"))
    arrays = _valid_arrays()
    arrays["names"] = np.array(["a.jpg", "b.jpg"], dtype=object)
    with open(tmp_path / "pickled.npz", "wb") as handle:
        np.savez(handle, **arrays)
    with pytest.raises(DetectionsFileError, match=r"pickled\.npz: an array holds Python objects .*dtype=str"):
        load_detections(str(tmp_path / "pickled.npz"))


@pytest.mark.parametrize("dets, query, message", [
    ({"a.jpg": ([[0, 0, 1, 1]], [0.5, 0.6], [[1.0]])}, None,
     "detections['a.jpg']: 1 box(es) but scores of shape (2,), expected [1]"),
    ({"a.jpg": ([[0, 0, 1]], [0.5], [[1.0]])}, None,
     "detections['a.jpg']: boxes have shape (1, 3), expected [N, 4] (x1, y1, x2, y2)"),
    ({"a.jpg": ([[0, 0, 1, 1]], [0.5], [[1.0, 0.0]]), "b.jpg": ([[0, 0, 1, 1]], [0.5], [[1.0]])}, None,
     "detections['b.jpg']: embeddings of size 1, but earlier images have size 2"),
    ({"a.jpg": ([[0, 0, 1, 1]], [0.5], [[1.0, 0.0]])}, np.zeros((3, 5)),
     "query_embeddings: shape (3, 5), expected [Q, 2] (D = the detections' embedding size)"),
    ({"a.jpg": ([[0, 0, 1, 1]], [0.5])}, None,
     "detections['a.jpg']: expected a tuple (boxes [N, 4], scores [N], embeddings [N, D])"),
])
def test_save_refuses_detections_that_do_not_fit_naming_the_image(tmp_path, dets, query, message):
    with pytest.raises(DetectionsFileError) as err:
        save_detections(str(tmp_path / "d.npz"), dets, query_embeddings=query)
    assert str(err.value) == message
    assert os.listdir(tmp_path) == []  # nothing written, no temporary left


def test_save_keeps_the_old_file_when_the_new_detections_are_refused(tmp_path):
    path = save_detections(str(tmp_path / "d.npz"), {"a.jpg": ([[0, 0, 1, 1]], [0.5], [[1.0]])})
    before = open(path, "rb").read()
    with pytest.raises(DetectionsFileError):
        save_detections(path, {"a.jpg": ([[0, 0, 1, 1]], [0.5, 0.2], [[1.0]])})
    assert open(path, "rb").read() == before
    with pytest.raises(DetectionsFileError, match=r"path '.*d\.txt' must end in \.npz"):
        save_detections(str(tmp_path / "d.txt"), {})


def test_query_embeddings_load_from_npy_npz_or_a_detections_file(tmp_path):
    q = np.arange(6, dtype=np.float64).reshape(3, 2)
    np.save(tmp_path / "q.npy", q)
    np.savez(tmp_path / "one.npz", anything=q)
    np.savez(tmp_path / "two.npz", a=q, b=q)
    save_detections(str(tmp_path / "dets.npz"), {"a.jpg": ([], [], [])}, query_embeddings=q)
    for name in ("q.npy", "one.npz", "dets.npz"):
        got = load_query_embeddings(str(tmp_path / name))
        assert got.dtype == np.float32 and got.tolist() == q.tolist()
    with pytest.raises(DetectionsFileError, match=r"two\.npz: no array named query_embeddings \(found a, b\)"):
        load_query_embeddings(str(tmp_path / "two.npz"))
    np.save(tmp_path / "flat.npy", np.zeros(3))
    with pytest.raises(DetectionsFileError, match=r"flat\.npy: query embeddings have shape \(3,\) .*expected \[Q, D\]"):
        load_query_embeddings(str(tmp_path / "flat.npy"))


# --- plots on hand-made inputs --------------------------------------------------------------------------

def _png(path):
    with open(path, "rb") as handle:
        return handle.read(8) == PNG_SIGNATURE and os.path.getsize(path) > 1000


def _has_colour(path, rgb, tolerance=12, min_pixels=20):
    from PIL import Image

    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB")).astype(int)
    return int(np.sum(np.all(np.abs(pixels - rgb) <= tolerance, axis=-1))) >= min_pixels


GREEN, RED, GOLD = (44, 160, 44), (214, 39, 40), (255, 215, 0)  # tab:green, tab:red, gold


def test_results_figure_draws_correct_matches_green_and_wrong_ones_red(tmp_path):
    from PIL import Image

    scene = str(tmp_path / "s1.jpg")
    Image.fromarray(np.full((120, 180, 3), 90, np.uint8)).save(scene)
    match = {"image": scene, "box": [10, 10, 60, 100], "similarity": 0.9}
    only_right = search_plots.plot_search_results(
        [{"query_image": scene, "query_box": [100, 10, 140, 100], "matches": [dict(match, is_match=True)]}],
        str(tmp_path / "right.png"))
    only_wrong = search_plots.plot_search_results(
        [{"query_image": scene, "query_box": [100, 10, 140, 100],
          "matches": [dict(match, is_match=False, truth=[100, 10, 140, 100])]}], str(tmp_path / "wrong.png"))
    assert _png(only_right) and _png(only_wrong)
    assert _has_colour(only_right, GREEN) and not _has_colour(only_right, RED)
    assert _has_colour(only_wrong, RED) and not _has_colour(only_wrong, GREEN) and _has_colour(only_wrong, GOLD)


def test_results_figure_survives_missing_images_and_queries_without_matches(tmp_path):
    rows = [{"query_image": str(tmp_path / "gone.jpg"), "query_box": [0, 0, 5, 5], "query_label": "q",
             "matches": [{"image": str(tmp_path / "gone2.jpg"), "box": [0, 0, 5, 5], "similarity": 0.1,
                          "is_match": False}]},
            {"query_image": str(tmp_path / "gone.jpg"), "query_box": [0, 0, 5, 5], "matches": []}]
    assert _png(search_plots.plot_search_results(rows, str(tmp_path / "r.png")))
    with pytest.raises(ValueError, match="at least one query row"):
        search_plots.plot_search_results([], str(tmp_path / "none.png"))


def test_gallery_size_curve_and_detection_curve_are_written(tmp_path):
    rows = [{"gallery_size": s, "mean_gallery": m, "mAP": a, "top1": t}
            for s, m, a, t in ((100, 100, 0.7, 0.8), (50, 50, 0.8, 0.85), (-1, 6977.0, 0.5, 0.6))]
    assert _png(search_plots.plot_gallery_size_curve(rows, str(tmp_path / "g.png")))
    with pytest.raises(ValueError, match="at least two gallery sizes, got 1"):
        search_plots.plot_gallery_size_curve(rows[:1], str(tmp_path / "g1.png"))
    assert search_plots.gallery_size_label(-1, 6977.0) == "all (6,977)"
    assert search_plots.gallery_size_label(4000) == "4,000"
    recall = np.linspace(0, 0.9, 40)
    path = search_plots.plot_detection_pr(1 - recall / 2, recall, str(tmp_path / "pr.png"), ap=0.7,
                                          recall_at_threshold=0.8, operating_precision=0.6)
    assert _png(path)
    with pytest.raises(ValueError, match=r"precision \(3,\) and recall \(2,\) must have the same length"):
        search_plots.plot_detection_pr([1, 1, 1], [0, 1], str(tmp_path / "bad.png"), ap=0, recall_at_threshold=0)


def test_pick_search_queries_is_seeded_and_takes_valid_queries_only():
    valid = np.array([True, False, True, True, False, True, True])
    picked = search_plots.pick_search_queries(valid, 3, seed=1)
    assert picked == sorted(picked) and len(picked) == 3 and all(valid[i] for i in picked)
    assert picked == search_plots.pick_search_queries(valid, 3, seed=1)
    assert search_plots.pick_search_queries(valid, 10) == [0, 2, 3, 5, 6]


# --- the command, end to end on the tiny trees of tests/scene_trees.py ------------------------------------

def _run(argv):
    from reid_keras.cli.evaluate_search import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _detections_for(dataset, seed=0, dim=16):
    """Detections near the annotated boxes (scores 0.3..1, so some fall under 0.5), one false alarm per
    scene, embeddings = the person's identity vector + noise; query embeddings from the same vectors."""
    rng = np.random.default_rng(seed)
    pids = {int(p) for s in dataset.gallery for p in s.pids} | {int(q.pid) for q in dataset.queries}
    identity = {p: rng.normal(size=dim) for p in sorted(pids)}
    dets = {}
    for scene in dataset.gallery:
        n = len(scene.boxes)
        boxes = scene.boxes + rng.uniform(-1, 1, (n, 4)).astype(np.float32)
        false_alarm = np.array([[0, 0, 6, 12]], np.float32) + rng.uniform(0, 10)
        emb = np.stack([identity[int(p)] for p in scene.pids] + [rng.normal(size=dim)])
        emb += rng.normal(0, 0.8, (n + 1, dim))
        dets[scene.name] = (np.concatenate([boxes, false_alarm]), rng.uniform(0.3, 1.0, n + 1), emb)
    query = np.stack([identity[int(q.pid)] for q in dataset.queries]) + rng.normal(0, 0.8, (len(dataset.queries), dim))
    return dets, query


@pytest.fixture(scope="module")
def cuhk(tmp_path_factory):
    from reid_keras.data.datasets import load_dataset
    from tests.scene_trees import make_cuhk_sysu

    base = tmp_path_factory.mktemp("search_cli")
    make_cuhk_sysu(str(base))
    dataset = load_dataset("cuhk_sysu", str(base))
    dets, query = _detections_for(dataset)
    path = save_detections(str(base / "dets.npz"), dets, query_embeddings=query, dataset_name="cuhk_sysu")
    out = str(base / "out")
    code, stdout, stderr = _run(["--dataset", "cuhk_sysu", "--data-root", str(base), "--detections", path,
                                 "--gallery-size", "all", "--out", out, "--top-k-figure", "3"])
    return {"base": base, "dataset": dataset, "dets": path, "query": query, "out": out, "code": code,
            "stdout": stdout, "stderr": stderr}


def _metrics(out):
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as handle:
        return json.load(handle)


def _table_rows(stdout):
    """{gallery size: [mAP, top-1, top-5, top-10, valid, invalid]} from the printed table."""
    rows = {}
    for line in stdout.splitlines():
        parts = line.split()
        if parts and parts[0].lstrip("-").isdigit() and len(parts) >= 7:
            rows[int(parts[0])] = [float(v) for v in parts[-6:]]
    return rows


def test_all_gallery_sizes_equal_a_direct_evaluation(cuhk):
    from reid_keras.metrics.search import evaluate_search

    assert cuhk["code"] == 0, cuhk["stderr"]
    m = _metrics(cuhk["out"])
    dets, query, _ = load_detections(cuhk["dets"])
    assert m["gallery_sizes"] == [50, 100, -1] and [r["gallery_size"] for r in m["search"]] == [50, 100, -1]
    table = _table_rows(cuhk["stdout"])
    assert sorted(table) == [-1, 50, 100]
    for row in m["search"]:
        direct = evaluate_search(dets, query, cuhk["dataset"], gallery_size=row["gallery_size"], score_threshold=0.5)
        assert row["protocol"] == direct["protocol"]
        for key in ("mAP", "top1", "top5", "top10", "num_valid_queries", "num_invalid_queries", "duplicates"):
            assert row[key] == direct[key], key
        assert table[row["gallery_size"]] == [round(100 * direct[k], 2) for k in ("mAP", "top1", "top5", "top10")] + [
            direct["num_valid_queries"], direct["num_invalid_queries"]]
        protocol = cuhk["dataset"].search_protocol(row["gallery_size"])
        assert row["mean_gallery"] == pytest.approx(np.mean([len(g) for g in protocol.galleries]))
    # the headline numbers are gallery 100's, the usual table
    head = next(r for r in m["search"] if r["gallery_size"] == 100)
    assert m["gallery_size"] == 100 and m["mAP"] == head["mAP"] and m["top1"] == head["top1"]
    assert 0 < m["mAP"] < 1  # a real problem: neither all right nor all wrong
    assert m["num_queries"] == 3 and m["num_gallery_scenes"] == 6 and m["score_threshold"] == 0.5
    assert m["ap_variant"].startswith("non-interpolated") and m["detection_images"] == 6
    # TestG50 lists s7.jpg twice for query 0 (scene_trees): evaluated once, reported
    assert "gallery 50: " in " ".join(m["warnings"]) and m["search"][0]["duplicates"] == 1


def test_detection_numbers_equal_a_direct_evaluation(cuhk):
    from reid_keras.metrics.detection import evaluate_detection

    m = _metrics(cuhk["out"])
    dets, _, _ = load_detections(cuhk["dets"])
    direct = evaluate_detection(dets, cuhk["dataset"], score_threshold=0.5, matching="mutual_best")
    for key in ("ap", "recall", "recall_labeled", "num_boxes", "num_labeled_boxes", "matching"):
        assert m["detection"][key] == direct[key], key
    assert 0 < direct["recall"] < 1  # some boxes scored under 0.5
    assert (f"AP {100 * direct['ap']:.2f}% (scores >= 0.01), recall {100 * direct['recall']:.2f}% at score >= 0.5 "
            f"(labeled people {100 * direct['recall_labeled']:.2f}%)") in cuhk["stdout"]


def test_per_query_file_and_plots_are_written(cuhk):
    from reid_keras.metrics.search import evaluate_search

    m = _metrics(cuhk["out"])
    assert m["plots"] == {"gallery_size": "gallery_size.png", "detection_pr": "detection_pr.png",
                          "search_results": "search_results.png"}
    for name in m["plots"].values():
        assert _png(os.path.join(cuhk["out"], name)), name
    dets, query, _ = load_detections(cuhk["dets"])
    direct = evaluate_search(dets, query, cuhk["dataset"], gallery_size=100)
    with open(os.path.join(cuhk["out"], "per_query.csv"), encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    assert lines[0] == "query,scene,pid,valid,ap,n_gt,n_tp,first_hit_rank" and len(lines) == 1 + 3
    for i, line in enumerate(lines[1:]):
        fields = line.split(",")
        q = cuhk["dataset"].queries[i]
        assert fields[:3] == [str(q.index), q.scene, str(q.pid)]
        assert float(fields[4]) == pytest.approx(direct["per_query_ap"][i], abs=1e-6)
        assert int(fields[5]) == direct["per_query"]["n_gt"][i] and int(fields[6]) == direct["per_query"]["n_tp"][i]
    assert cuhk["stdout"].strip().endswith(f"wrote {os.path.join(cuhk['out'], 'metrics.json')}")
    assert os.path.basename(cuhk["out"]) == "out" and not [f for f in os.listdir(cuhk["out"]) if ".tmp" in f]


def test_one_size_voc_matching_and_no_plots(cuhk, tmp_path):
    from reid_keras.metrics.detection import evaluate_detection

    out = str(tmp_path / "one")
    code, stdout, stderr = _run(["--dataset", "cuhk_sysu", "--data-root", str(cuhk["base"]), "--detections",
                                 cuhk["dets"], "--gallery-size", "50", "--matching", "voc", "--score-threshold",
                                 "0.6", "--out", out, "--no-plots"])
    assert code == 0, stderr
    m = _metrics(out)
    dets, _, _ = load_detections(cuhk["dets"])
    direct = evaluate_detection(dets, cuhk["dataset"], score_threshold=0.6, matching="voc")
    assert m["gallery_sizes"] == [50] and m["gallery_size"] == 50 and "plots" not in m
    assert m["detection"]["matching"] == "voc" and m["detection"]["ap"] == direct["ap"]
    assert m["detection"]["recall"] == direct["recall"] and m["score_threshold"] == 0.6
    assert sorted(os.listdir(out)) == ["metrics.json", "per_query.csv"]


def test_prw_counts_a_query_without_positive_as_invalid(tmp_path):
    from reid_keras.data.datasets import load_dataset
    from reid_keras.metrics.search import evaluate_search
    from tests.scene_trees import make_prw

    make_prw(str(tmp_path))
    dataset = load_dataset("prw", str(tmp_path))
    dets, query = _detections_for(dataset, seed=1)
    path = save_detections(str(tmp_path / "dets.npz"), dets)
    np.save(tmp_path / "query.npy", query)
    out = str(tmp_path / "out")
    code, stdout, stderr = _run(["--dataset", "prw", "--data-root", str(tmp_path), "--detections", path,
                                 "--query-embeddings", str(tmp_path / "query.npy"), "--gallery-size", "all",
                                 "--out", out, "--no-plots"])
    assert code == 0, stderr
    m = _metrics(out)
    direct = evaluate_search(dets, query, dataset, gallery_size=100)
    # PRW's sizes 100 and -1 name one gallery: evaluated once
    assert m["gallery_sizes"] == [100] and m["protocol"] == "prw" and m["query_embeddings"].endswith("query.npy")
    assert m["num_invalid_queries"] == direct["num_invalid_queries"] >= 1  # id 9 appears in no other frame
    assert m["mAP"] == pytest.approx(direct["mAP"]) and _table_rows(stdout)[100][-1] == m["num_invalid_queries"]


def _error(argv):
    code, stdout, stderr = _run(argv)
    assert code == 2 and stdout == "" and "Traceback" not in stderr, (code, stdout, stderr)
    assert stderr.startswith("error: ")
    return stderr.strip()


def test_errors_name_the_flag_and_exit_2(cuhk, tmp_path):
    base, dets = str(cuhk["base"]), cuhk["dets"]
    common = ["--dataset", "cuhk_sysu", "--data-root", base, "--out", str(tmp_path / "o"), "--no-plots"]
    missing = str(tmp_path / "none.npz")
    assert _error(common + ["--detections", missing]) == (
        f"error: --detections: detections file '{missing}' does not exist")
    assert _error(common + ["--detections", dets, "--gallery-size", "500"]) == (
        "error: --gallery-size 500: cuhk_sysu has no such gallery; accepted: 50, 100, -1 or all")
    # wrong query count, in the file and in --query-embeddings
    loaded, query, _ = load_detections(dets)
    short = save_detections(str(tmp_path / "short.npz"), loaded, query_embeddings=query[:2])
    assert _error(common + ["--detections", short]) == (
        f"error: the query_embeddings array of --detections {short} has 2 rows, but cuhk_sysu has 3 queries "
        "(one embedding per query box, in the dataset's query order)")
    np.save(tmp_path / "q4.npy", np.ones((4, query.shape[1])))
    assert _error(common + ["--detections", dets, "--query-embeddings", str(tmp_path / "q4.npy")]).startswith(
        f"error: --query-embeddings {tmp_path / 'q4.npy'} has 4 rows, but cuhk_sysu has 3 queries")
    np.save(tmp_path / "q_dim.npy", np.ones((3, 5)))
    assert _error(common + ["--detections", dets, "--query-embeddings", str(tmp_path / "q_dim.npy")]) == (
        f"error: --query-embeddings {tmp_path / 'q_dim.npy'}: embeddings of size 5, but --detections {dets} has "
        f"size {query.shape[1]}")
    no_query = save_detections(str(tmp_path / "noq.npz"), loaded)
    assert _error(common + ["--detections", no_query]) == (
        f"error: --detections {no_query} holds no query_embeddings array: pass --query-embeddings FILE (one "
        "embedding per query box, in the dataset's query order)")
    assert not os.path.exists(tmp_path / "o")  # nothing written for a refused run


def test_errors_for_datasets_and_bad_embeddings(cuhk, tmp_path):
    dets = cuhk["dets"]
    assert _error(["--dataset", "nope", "--data-root", str(tmp_path), "--detections", dets]).startswith(
        "error: unknown dataset 'nope'; known datasets: ")
    assert _error(["--dataset", "synthetic", "--detections", dets]) == (
        "error: --dataset synthetic: person search needs --dataset-option layout=cuhk_sysu or layout=prw (the other "
        "layouts are cropped people)")
    assert _error(["--dataset", "cuhk_sysu", "--data-root", str(tmp_path), "--detections", dets]).startswith(
        f"error: no folder or file 'Image/SSM' under {tmp_path}")
    loaded, query, _ = load_detections(dets)
    name = sorted(loaded)[0]
    boxes, scores, emb = loaded[name]
    emb = emb.copy()
    emb[0, 0] = np.nan
    nan_file = save_detections(str(tmp_path / "nan.npz"), {**loaded, name: (boxes, scores, emb)},
                               query_embeddings=query)
    message = _error(["--dataset", "cuhk_sysu", "--data-root", str(cuhk["base"]), "--detections", nan_file,
                      "--out", str(tmp_path / "o")])
    assert message.startswith(f"error: --detections {nan_file}: ") and name in message


def test_bad_flag_values_are_refused_by_the_parser(capsys):
    from reid_keras.cli.evaluate_search import build_parser

    for argv, text in ((["--gallery-size", "many"], "expected a gallery size such as 50, 100"),
                       (["--score-threshold", "nan"], "expected a finite number, got 'nan'"),
                       (["--matching", "greedy"], "invalid choice: 'greedy'")):
        with pytest.raises(SystemExit) as exit_info:
            build_parser().parse_args(["--dataset", "cuhk_sysu", "--detections", "d.npz", *argv])
        assert exit_info.value.code == 2 and text in capsys.readouterr().err


def test_default_output_folder(tmp_path):
    from reid_keras.cli.evaluate_search import default_output

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert default_output(str(run / "dets.npz"), "prw") == str(run / "eval_search_prw")
    assert default_output(str(tmp_path / "dets.npz"), "prw") == os.path.join("runs", "eval_search", "dets-prw")


def test_python_m_entry_point(cuhk, tmp_path):
    import subprocess
    import sys

    out = str(tmp_path / "sub")
    result = subprocess.run([sys.executable, "-m", "reid_keras.evaluate_search", "--dataset", "cuhk_sysu",
                             "--data-root", str(cuhk["base"]), "--detections", cuhk["dets"], "--out", out,
                             "--no-plots"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert _metrics(out)["mAP"] == _metrics(cuhk["out"])["mAP"]  # gallery 100 in both
    bad = subprocess.run([sys.executable, "-m", "reid_keras.evaluate_search", "--dataset", "cuhk_sysu",
                          "--data-root", str(cuhk["base"]), "--detections", str(tmp_path / "x.npz")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --detections: ") and "Traceback" not in bad.stderr


def test_boxes_past_the_image_edge_are_counted_from_the_image_sizes(cuhk, tmp_path):
    dataset = cuhk["dataset"]  # scene_trees scenes are 32 x 48 (W x H)
    dets = {s.name: (s.boxes, np.ones(len(s.boxes)), np.eye(len(s.boxes), 8)) for s in dataset.gallery}
    name = dataset.gallery[0].name
    boxes, scores, emb = dets[name]
    dets[name] = (np.concatenate([boxes, [[10, 10, 100, 40]]]), np.append(scores, 0.9), np.vstack([emb, np.eye(8)[7]]))
    path = save_detections(str(tmp_path / "d.npz"), dets, query_embeddings=np.eye(3, 8))
    code, stdout, stderr = _run(["--dataset", "cuhk_sysu", "--data-root", str(cuhk["base"]), "--detections", path,
                                 "--out", str(tmp_path / "o"), "--top-k-figure", "0"])
    assert code == 0, stderr
    assert "warning: 1 detection box(es) reach outside the image" in stdout and "detection: 1 detection" not in stdout
    m = _metrics(str(tmp_path / "o"))
    assert "1 detection box(es) reach outside the image" in m["warnings"]
    # one gallery size, no results figure asked for: the detection curve only
    assert m["plots"] == {"detection_pr": "detection_pr.png"}
    assert not os.path.exists(tmp_path / "o" / "search_results.png")


def test_synthetic_scenes_with_ground_truth_boxes_and_identity_embeddings_score_perfectly(tmp_path):
    """Ground-truth boxes (score 1) with one-hot identity embeddings: every query finds all its
    occurrences first, so mAP = top-1 = 1, and detection AP = recall = 1 (an independent expectation)."""
    from reid_keras.data.datasets import load_dataset
    from reid_keras.data.datasets.scenes import UNLABELED
    from reid_keras.metrics.search import evaluate_search, ground_truth_detections

    options = ["layout=cuhk_sysu", "train_scenes=2", "test_scenes=6", "scene_size=(96, 64)"]
    dataset = load_dataset("synthetic", str(tmp_path), layout="cuhk_sysu", train_scenes=2, test_scenes=6,
                           scene_size=(96, 64))
    num_q, rng = len(dataset.queries), np.random.default_rng(0)
    dim = num_q + 8

    def embed(pid):  # labeled: e_pid; unlabeled: a random vector orthogonal to every e_pid
        return np.eye(dim)[pid] if pid != UNLABELED else np.concatenate([np.zeros(num_q), rng.normal(size=8)])

    dets = ground_truth_detections(dataset, {s.name: np.stack([embed(int(p)) for p in s.pids])
                                             for s in dataset.gallery if len(s.pids)})
    query = np.stack([embed(int(q.pid)) for q in dataset.queries])
    path = save_detections(str(tmp_path / "gt.npz"), dets, query_embeddings=query, dataset_name="synthetic")
    out = str(tmp_path / "out")
    code, stdout, stderr = _run(["--dataset", "synthetic", "--data-root", str(tmp_path),
                                 *[a for o in options for a in ("--dataset-option", o)], "--detections", path,
                                 "--gallery-size", "all", "--out", out, "--top-k-figure", "2"])
    assert code == 0, stderr
    m = _metrics(out)
    assert m["dataset"] == "synthetic" and m["gallery_sizes"] == [s for s in dataset.gallery_sizes if s is not None]
    for row in m["search"]:
        assert (row["mAP"], row["top1"], row["num_invalid_queries"]) == (1.0, 1.0, 0), row
        direct = evaluate_search(dets, query, dataset, gallery_size=row["gallery_size"])
        assert row["mAP"] == direct["mAP"] and row["top10"] == direct["top10"]
    assert (m["detection"]["ap"], m["detection"]["recall"], m["detection"]["recall_labeled"]) == (1.0, 1.0, 1.0)
    assert all(_table_rows(stdout)[s][:4] == [100.0] * 4 for s in m["gallery_sizes"])
    assert all(_png(os.path.join(out, name)) for name in m["plots"].values()) and "search_results" in m["plots"]


def test_result_rows_mark_the_truth_only_where_no_better_match_found_the_person(cuhk):
    dataset = cuhk["dataset"]
    protocol = dataset.search_protocol(100)
    positive = protocol.scene_names[int(protocol.positive_scenes[0][0])]
    truth = protocol.positive_boxes[0][0]
    other = next(n for n in protocol.scene_names if n not in
                 {protocol.scene_names[int(s)] for s in protocol.positive_scenes[0]} | {dataset.queries[0].scene})
    wrong = np.array([0, 0, 4, 9], np.float32)
    top = [(positive, wrong, 0.9, False), (positive, truth, 0.8, True), (positive, wrong, 0.7, False),
           (other, wrong, 0.6, False)]
    result = {"gallery_size": 100, "top_matches": [top], "per_query": {"ap": np.array([0.25])}}
    (row,) = search_plots.search_result_rows(dataset, result, [0])
    assert row["query_image"] == dataset.scene(dataset.queries[0].scene).path
    assert row["query_label"] == f"query 0 (id {dataset.queries[0].pid})\nAP 25.0%"
    assert [m["image"] for m in row["matches"]] == [dataset.scene(n).path for n in (positive,) * 3 + (other,)]
    assert [m["is_match"] for m in row["matches"]] == [False, True, False, False]
    np.testing.assert_array_equal(row["matches"][0]["truth"], truth)  # missed here: show where they were
    assert row["matches"][2]["truth"] is None and row["matches"][3]["truth"] is None  # found above / not there
