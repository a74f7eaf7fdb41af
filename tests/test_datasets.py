"""The benchmark loaders on tiny trees in each real on-disk layout (docs/datasets.md §0-5)."""
import json
import os
import re
import shutil

import cv2
import numpy as np
import pytest

from reid_keras.data import imagefiles
from reid_keras.data.datasets import DATASET_NAMES, cuhk01, cuhk03, load_dataset, market1501, msmt17
from reid_keras.data.datasets.base import DatasetCountError, DatasetLayoutError
from tests.fixtures import layouts


def rows(records):
    """Sorted (basename, pid, camid) rows of records."""
    return sorted((os.path.basename(r.path), r.pid, r.camid) for r in records)


def dense(original_pids):
    """Independent relabelling: position in the sorted distinct ids."""
    order = sorted(set(original_pids))
    return [order.index(p) for p in original_pids]


# ------------------------------------------------------------------------------ imagefiles

def _encoded(ext, array):
    ok, data = cv2.imencode(ext, array)
    assert ok
    return data.tobytes()


@pytest.mark.parametrize("name,make", [
    ("rgb.jpg", lambda: _encoded(".jpg", layouts.image(8, 4, 1))),
    ("gray.png", lambda: _encoded(".png", layouts.image(8, 4, 1, channels=1))),
    ("rgba.png", lambda: _encoded(".png", layouts.image(8, 4, 1, channels=4))),
    ("deep.png", lambda: _encoded(".png", layouts.image(8, 4, 1).astype(np.uint16) * 257)),
    ("one.jpg", lambda: _encoded(".jpg", np.zeros((1, 1, 3), np.uint8))),
    ("img.bmp", lambda: _encoded(".bmp", layouts.image(8, 4, 1))),
    ("padded.jpg", lambda: _encoded(".jpg", layouts.image(8, 4, 1)) + b"\x00" * 700),
    ("anim.gif", lambda: b"GIF89a" + b"\x01\x00\x01\x00\x00\x00\x00" + b"\x3b"),
])
def test_probe_accepts_valid_images(tmp_path, name, make):
    path = tmp_path / name
    path.write_bytes(make())
    assert imagefiles.probe_image_file(str(path)) is None


def test_probe_rejects_broken_files(tmp_path):
    jpg = _encoded(".jpg", layouts.image(8, 4, 1))
    png = _encoded(".png", layouts.image(8, 4, 1))
    bmp = _encoded(".bmp", layouts.image(8, 4, 1))
    cases = {
        "zero.jpg": (b"", imagefiles.REASON_EMPTY),
        "text.jpg": (b"<html>not found</html>", imagefiles.REASON_NOT_IMAGE),
        "cut.jpg": (jpg[: len(jpg) // 2], imagefiles.REASON_JPEG_TRUNCATED),
        "garbage_tail.jpg": (jpg + b"\x01\x02", imagefiles.REASON_JPEG_TRUNCATED),
        "cut.png": (png[:-12], imagefiles.REASON_PNG_TRUNCATED),
        "cut.bmp": (bmp[:-10], imagefiles.REASON_BMP_TRUNCATED),
        "cut.gif": (b"GIF89a\x01\x00\x01\x00\x00\x00\x00\x2c", imagefiles.REASON_GIF_TRUNCATED),
    }
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        assert imagefiles.probe_image_file(str(tmp_path / name)) == reason, name
    assert imagefiles.probe_image_file(str(tmp_path)).startswith(imagefiles.REASON_UNREADABLE)


# ------------------------------------------------------------------------------ Market-1501

def test_market_records_relabel_junk_and_distractors(tmp_path):
    _, manifest = layouts.make_market(str(tmp_path))
    ds = load_dataset("market1501", str(tmp_path))
    train_src = manifest["bounding_box_train"]
    expected_train = sorted(zip([n for n, _, _ in train_src], dense([p for _, p, _ in train_src]),
                                [c for _, _, c in train_src]))
    assert rows(ds.train) == expected_train
    assert ds.train_id_map == {2: 0, 3: 1, 7: 2, 11: 3}
    assert rows(ds.query) == [r for r in manifest["query"] if r[1] > 0]
    assert rows(ds.gallery) == [r for r in manifest["bounding_box_test"] if r[1] != -1]
    assert sum(r.pid == 0 for r in ds.gallery) == 2 and all(r.pid != -1 for r in ds.gallery)
    assert ds.info["gallery junk dropped"] == 3 and ds.info["gallery distractors (pid 0)"] == 2
    assert all(os.path.isabs(r.path) and os.path.isfile(r.path) for r in ds.train + ds.query + ds.gallery)
    assert ds.skipped.total == 0


def test_market_root_forms_and_basename_parsing(tmp_path):
    # The dataset folder itself is named like a Market file: a full-path regex would read pid 1, cam 2.
    folder, manifest = layouts.make_market(str(tmp_path), name="exp1_c2")
    ds = load_dataset("market1501", folder)
    assert rows(ds.query) == manifest["query"]
    # torchreid's layout market1501/Market-1501-v15.09.15, given the outer folder
    layouts.make_market(str(tmp_path / "market1501"))
    assert rows(load_dataset("market1501", str(tmp_path)).query) == manifest["query"]
    assert rows(load_dataset("market1501", str(tmp_path / "market1501")).query) == manifest["query"]


def test_market_skips_broken_and_odd_files_but_keeps_unusual_images(tmp_path):
    folder, manifest = layouts.make_market(str(tmp_path))
    train = os.path.join(folder, "bounding_box_train")
    expected = layouts.write_broken_files(train, "0002_c1s1_009999")
    (tmp_path / "Market-1501-v15.09.15" / "bounding_box_train" / "Thumbs.db").write_bytes(b"\x00" * 10)
    layouts.write_image(os.path.join(train, "badname.jpg"))
    layouts.write_image(os.path.join(train, "0003_c9s1_000001_01.jpg"))  # camera 9 in Market
    for name, channels in [("0002_c1s1_000100_01.png", 1), ("0002_c2s1_000100_01.png", 4)]:
        layouts.write_image(os.path.join(train, name), channels=channels)
    layouts.write_image(os.path.join(train, "0002_c3s1_000100_01.jpg"), shape=(1, 1))
    ds = load_dataset("market1501", str(tmp_path))
    expected.update({imagefiles.REASON_EXTENSION: 1, "camera number outside 1-6": 1,
                     market1501._BAD_NAME: 1})
    assert ds.skipped.counts == expected
    assert len(ds.train) == len(manifest["bounding_box_train"]) + 3  # gray, RGBA, 1x1 kept
    text = ds.summary()
    assert "skipped 6 file(s)" in text and imagefiles.REASON_JPEG_TRUNCATED in text and "badname.jpg" in text


def test_market_layout_errors_name_the_folder(tmp_path):
    with pytest.raises(DatasetLayoutError, match=re.escape(str(tmp_path / "nowhere"))):
        load_dataset("market1501", str(tmp_path / "nowhere"))
    folder, _ = layouts.make_market(str(tmp_path))
    shutil.rmtree(os.path.join(folder, "query"))
    with pytest.raises(DatasetLayoutError, match="'query'"):
        load_dataset("market1501", str(tmp_path))
    os.makedirs(os.path.join(folder, "query"))
    with pytest.raises(DatasetLayoutError, match=r"query'? holds no usable image"):
        load_dataset("market1501", folder)
    layouts.write_broken_files(os.path.join(folder, "query"), "0001_c1s1_000001")
    with pytest.raises(DatasetLayoutError, match="3 file\\(s\\) skipped"):
        load_dataset("market1501", folder)


def test_market_500k_distractor_folder(tmp_path):
    layouts.make_market(str(tmp_path))
    extra = layouts.make_distractor_folder(str(tmp_path / "distractors"), count=5)
    layouts.write_broken_files(str(tmp_path / "distractors" / "part2"), "x")
    ds = load_dataset("market1501", str(tmp_path), distractors_dir=str(tmp_path / "distractors"))
    tail = ds.gallery[-5:]
    assert sorted(r.path for r in tail) == extra
    assert {(r.pid, r.camid) for r in tail} == {(0, -1)}  # names say otherwise: never parsed
    assert ds.info["500k distractors added (pid 0, camid -1)"] == 5 and ds.skipped.total == 3
    with pytest.raises(DatasetLayoutError, match="missing_dir"):
        load_dataset("market1501", str(tmp_path), distractors_dir=str(tmp_path / "missing_dir"))


def test_market_count_check(tmp_path, monkeypatch):
    layouts.make_market(str(tmp_path))
    load_dataset("market1501", str(tmp_path))  # far below the published counts: not checked
    with pytest.raises(DatasetCountError, match="train images: expected 12936, found 9"):
        load_dataset("market1501", str(tmp_path), strict=True)
    exact = {"train images": 9, "train ids": 4, "query images": 4, "query ids": 3,
             "gallery images": 9, "gallery ids": 4, "gallery junk dropped": 3}
    monkeypatch.setattr(market1501, "EXPECTED_COUNTS", dict(exact))
    load_dataset("market1501", str(tmp_path), strict=True)
    monkeypatch.setattr(market1501, "EXPECTED_COUNTS", dict(exact, **{"train images": 12, "query ids": 4}))
    with pytest.raises(DatasetCountError) as err:  # 9 >= 50 % of 12: looks complete, so checked
        load_dataset("market1501", str(tmp_path))
    assert "train images: expected 12, found 9" in str(err.value) and "query ids: expected 4, found 3" in str(err.value)
    assert "gallery images" not in str(err.value)
    assert len(load_dataset("market1501", str(tmp_path), strict=False).train) == 9
    monkeypatch.setattr(market1501, "EXPECTED_500K", {"500k distractor images": 8})
    layouts.make_distractor_folder(str(tmp_path / "d"), count=5)
    monkeypatch.setattr(market1501, "EXPECTED_COUNTS", dict(exact))
    with pytest.raises(DatasetCountError, match="500k distractor images: expected 8, found 5"):
        load_dataset("market1501", str(tmp_path), distractors_dir=str(tmp_path / "d"))


def test_market_gt_bbox_becomes_multi_query_records(tmp_path):
    """docs/datasets.md §1 multi-query: gt_bbox boxes of the queries' (id, camera) pairs, nothing else."""
    folder, _ = layouts.make_market(str(tmp_path))  # queries: (1, c4), (1, c5), (5, c1), (9, c2)
    gt = os.path.join(folder, "gt_bbox")
    names = {"0001_c4s1_000100_00.jpg": True, "0001_c4s1_000101_00.jpg": True, "0001_c5s2_000102_00.jpg": True,
             "0005_c1s1_000104_00.jpg": True,
             "0001_c1s1_000103_00.jpg": False,   # query id, but no query from camera 1
             "0002_c1s1_000105_00.jpg": False,   # a training id
             "-1_c4s1_000106_00.jpg": False,     # junk
             "0000_c2s1_000107_00.jpg": False}   # distractor
    for k, name in enumerate(names):
        layouts.write_image(os.path.join(gt, name), seed=500 + k)
    layouts.write_image(os.path.join(gt, "notaname.jpg"))
    layouts.write_image(os.path.join(gt, "0009_c7s1_000108_00.jpg"))  # camera 7 in Market
    ds = load_dataset("market1501", str(tmp_path))
    expected = sorted((n, int(n.split("_")[0]), int(n.split("_")[1][1]) - 1) for n, keep in names.items() if keep)
    multi_query = ds.protocol("multi_query").records
    assert rows(multi_query) == expected
    assert all(os.path.isabs(r.path) and os.path.dirname(r.path) == gt for r in multi_query)
    assert ds.info["gt_bbox images read"] == 8
    assert ds.info["gt_bbox images kept for multi-query (query ids and cameras)"] == 4
    assert ds.info["queries with no gt_bbox image of their id and camera"] == 1  # (9, c2)
    assert ds.skipped.counts == {market1501._BAD_NAME: 1, "camera number outside 1-6": 1}
    assert "gt_bbox images read: 8" in ds.summary()
    # The split table and the count check ignore gt_bbox.
    assert [r[0] for r in ds.split_stats()] == ["train", "query", "gallery"] and len(ds.query) == 4

    shutil.rmtree(gt)
    os.makedirs(gt)  # present but empty: still no error, the protocol is just off
    empty = load_dataset("market1501", str(tmp_path))
    assert empty.protocol("multi_query") is None and "no usable images" in empty.info["gt_bbox"]


def test_market_without_gt_bbox_has_no_multi_query(tmp_path):
    layouts.make_market(str(tmp_path))
    ds = load_dataset("market1501", str(tmp_path))
    assert ds.protocol("multi_query") is None and ds.skipped.total == 0
    assert [k for k in ds.info if "gt_bbox" in k] == ["gt_bbox"] and "no gt_bbox/ folder" in ds.info["gt_bbox"]


# ------------------------------------------------------------------------------ DukeMTMC-reID

def test_dukemtmc(tmp_path):
    _, manifest = layouts.make_duke(str(tmp_path))
    ds = load_dataset("dukemtmc", str(tmp_path))
    train_src = manifest["bounding_box_train"]
    assert [r[1] for r in rows(ds.train)] == dense([p for _, p, _ in train_src])
    assert rows(ds.query) == manifest["query"] and rows(ds.gallery) == manifest["bounding_box_test"]
    assert max(r.camid for r in ds.train) == 7  # camera 8
    assert 40 in {r.pid for r in ds.gallery} - {r.pid for r in ds.query}  # single-camera id kept
    assert ds.protocols == () and not [k for k in ds.info if "gt_bbox" in k]  # Market only
    with pytest.raises(DatasetLayoutError, match="bounding_box_train"):
        load_dataset("dukemtmc", str(tmp_path / "DukeMTMC-reID" / "query"))


# ------------------------------------------------------------------------------ MSMT17

def test_msmt17_lists_offset_and_val_flag(tmp_path):
    _, manifest = layouts.make_msmt17(str(tmp_path))
    ds = load_dataset("msmt17", str(tmp_path))
    offset = 1 + max(p for n in ("list_train.txt", "list_val.txt") for _, p, _ in manifest[n])
    assert offset == 5 and ds.info["test id offset"] == 5
    assert rows(ds.query) == sorted((n, p + 5, c) for n, p, c in manifest["list_query.txt"])
    assert rows(ds.gallery) == sorted((n, p + 5, c) for n, p, c in manifest["list_gallery.txt"])
    assert not {r.pid for r in ds.query} & set(ds.train_id_map)  # no collision with training ids
    assert rows(ds.train) == sorted(manifest["list_train.txt"])  # labels 0..3 are already dense
    assert ds.info["list_val used for training"] is False and 14 in {r.camid for r in ds.train}
    both = load_dataset("msmt17", str(tmp_path), use_val=True)
    assert both.info["list_val used for training"] is True
    assert rows(both.train) == sorted(manifest["list_train.txt"] + manifest["list_val.txt"])
    assert "list_val used for training: True" in both.summary()


def test_msmt17_v2_bad_lines_and_missing_files(tmp_path, monkeypatch):
    folder, manifest = layouts.make_msmt17(str(tmp_path), version="V2")
    with open(os.path.join(folder, "list_query.txt"), "a") as handle:
        handle.write("garbage\n0009/0009_000_01_x_0_0.jpg 9\n0001/0001_000_00_x_0_0.jpg 1\n\n")
    ds = load_dataset("msmt17", folder)
    assert ds.info["version"] == "V2" and len(ds.query) == len(manifest["list_query.txt"])
    assert ds.skipped.counts == {msmt17._BAD_LINE: 1, "listed image missing on disk": 1,
                                 "camera number outside 1-15": 1}
    monkeypatch.setattr(msmt17, "EXPECTED_COUNTS", dict(msmt17.EXPECTED_COUNTS, **{"train+val list images": 10}))
    with pytest.raises(DatasetCountError, match="train\\+val list images: expected 10, found 9"):
        load_dataset("msmt17", folder)
    os.remove(os.path.join(folder, "list_gallery.txt"))
    with pytest.raises(DatasetLayoutError, match="list_gallery.txt"):
        load_dataset("msmt17", str(tmp_path))
    folder, _ = layouts.make_msmt17(str(tmp_path / "v1"))
    shutil.rmtree(os.path.join(folder, "test"))
    with pytest.raises(DatasetLayoutError, match="'train/' and 'test/'"):
        load_dataset("msmt17", folder)


# ------------------------------------------------------------------------------ CUHK01

def test_cuhk01_paper871_rule_on_the_full_id_list():
    (split,) = cuhk01.make_splits(list(range(971, 0, -1)), "paper871", seed=0)
    assert split["train"] == list(range(1, 872)) and split["test"] == list(range(872, 972))
    for name, n_test in (("random100", 100), ("half", 486)):
        splits = cuhk01.make_splits(list(range(1, 972)), name, seed=3)
        assert len(splits) == 10 and all(len(s["test"]) == n_test for s in splits)
        assert all(sorted(s["train"] + s["test"]) == list(range(1, 972)) for s in splits)
        assert splits == cuhk01.make_splits(list(range(1, 972)), name, seed=3)
        assert splits[0] != splits[1] and splits != cuhk01.make_splits(list(range(1, 972)), name, seed=4)


def test_cuhk01_paper871_views(tmp_path):
    folder, ids = layouts.make_cuhk01(str(tmp_path), num_ids=12)
    ds = load_dataset("cuhk01", str(tmp_path))
    assert {r.pid for r in ds.query} == set(range(7, 13)) and ds.train_id_map == {i: i - 1 for i in range(1, 7)}
    for r in ds.query + ds.gallery + ds.train:
        img = int(os.path.basename(r.path)[4:7])
        assert r.camid == (img - 1) // 2
    assert {r.camid for r in ds.query} == {0} and {r.camid for r in ds.gallery} == {1}
    assert len(ds.query) == len(ds.gallery) == 12 and len(ds.train) == 24
    assert not [f for f in os.listdir(folder) if f.endswith(".json")]  # deterministic: no split file
    flipped = load_dataset("cuhk01", folder, direction="B->A")
    assert rows(flipped.query) == rows(ds.gallery)
    assert ds.protocol("cuhk01_trials").options == {"direction": "A->B"}  # docs/protocols.md (c) trials
    assert flipped.protocol("cuhk01_trials").options == flipped.options == {"direction": "B->A"}


def test_cuhk01_half_split_file_written_once_and_reused(tmp_path):
    folder, ids = layouts.make_cuhk01(str(tmp_path), num_ids=13)
    first = load_dataset("cuhk01", folder, split="half", seed=7, split_index=2)
    path = first.info["split_file"]
    assert path == os.path.join(folder, "cuhk01_splits_half_seed7.json") and first.info["seed"] == 7
    stored = json.load(open(path))
    assert stored["seed"] == 7 and stored["split"] == "half" and len(stored["splits"]) == 10
    test_ids = set(stored["splits"][2]["test"])
    assert len(test_ids) == 7 and {r.pid for r in first.query} == test_ids
    assert set(first.train_id_map) == set(ids) - test_ids
    assert rows(load_dataset("cuhk01", folder, split="half", seed=7, split_index=2).query) == rows(first.query)
    # The file is the source of truth: edit it and the loader follows it.
    stored["splits"][2] = {"train": ids[3:], "test": ids[:3]}
    with open(path, "w") as handle:
        json.dump(stored, handle)
    assert {r.pid for r in load_dataset("cuhk01", folder, split="half", seed=7, split_index=2).query} == {1, 2, 3}
    # A cache folder given by the caller receives the file instead of the data folder.
    cache = tmp_path / "cache"
    cache.mkdir()
    other = load_dataset("cuhk01", folder, split="random100", seed=1, split_file=str(cache))
    assert other.info["split_file"] == str(cache / "cuhk01_splits_random100_seed1.json")
    assert os.listdir(cache) == ["cuhk01_splits_random100_seed1.json"]  # no temp file left
    for k in range(1, 5):  # identity 13 disappears: the stored split no longer fits
        os.remove(os.path.join(folder, "campus", f"0013{k:03d}.png"))
    with pytest.raises(DatasetLayoutError, match="drawn for 13 ids, but 12"):
        load_dataset("cuhk01", folder, split="half", seed=7)


def test_cuhk01_options_and_counts(tmp_path, monkeypatch):
    folder, _ = layouts.make_cuhk01(str(tmp_path), num_ids=4)
    with pytest.raises(ValueError, match="unknown split 'tenth'"):
        load_dataset("cuhk01", folder, split="tenth")
    with pytest.raises(ValueError, match="split_index 1 out of range"):
        load_dataset("cuhk01", folder, split_index=1)
    monkeypatch.setattr(cuhk01, "EXPECTED_COUNTS", {"all images": 20, "all ids": 5})
    with pytest.raises(DatasetCountError, match="all images: expected 20, found 16"):
        load_dataset("cuhk01", folder)
    (tmp_path / "empty" / "campus").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="campus'? holds no usable image"):
        load_dataset("cuhk01", str(tmp_path / "empty"))


# ------------------------------------------------------------------------------ CUHK03

@pytest.fixture(scope="module")
def cuhk03_tree(tmp_path_factory):
    base = layouts.make_cuhk03(str(tmp_path_factory.mktemp("c3")))
    manifests = {b: layouts.make_cuhk03_new_config(base, b) for b in ("labeled", "detected")}
    return base, manifests


@pytest.mark.parametrize("box_type", ["labeled", "detected"])
def test_cuhk03_classic_decodes_with_transpose(cuhk03_tree, tmp_path, box_type):
    base, _ = cuhk03_tree
    ds = load_dataset("cuhk03", base, box_type=box_type, cache_dir=str(tmp_path / "cache"))
    slots = layouts.cuhk03_slots(box_type)
    assert sorted(os.path.basename(r.path) for r in ds.train + ds.query) == sorted(
        cuhk03.image_name(*s) for s in slots)
    for pair, person, slot in slots[:12] + slots[-3:]:
        png = cv2.imread(str(tmp_path / "cache" / cuhk03.image_name(pair, person, slot)), cv2.IMREAD_UNCHANGED)
        assert png.shape == layouts.CUHK03_SHAPE[box_type] + (3,)
        np.testing.assert_array_equal(png[:, :, ::-1], layouts.cuhk03_image(box_type, pair, person, slot))
    test_ids = {p * 1000 + q for p, q in layouts.CUHK03_TESTSETS[0]}
    assert {r.pid for r in ds.query} == test_ids and rows(ds.query) == rows(ds.gallery)
    all_ids = {p * 1000 + q for p, q, _ in slots}
    assert ds.train_id_map == {pid: k for k, pid in enumerate(sorted(all_ids - test_ids))}
    for r in ds.query:
        assert r.camid == int(os.path.basename(r.path).split("_")[2]) - 1
    assert len(ds.query) == sum(1 for p, q, _ in slots if p * 1000 + q in test_ids)
    index = json.load(open(tmp_path / "cache" / "index.json"))
    assert index["empty slots"] == len(layouts.CUHK03_EMPTY) and len(index["testsets"]) == 20


def test_cuhk03_cache_reuse_split_index_and_errors(cuhk03_tree, tmp_path, monkeypatch):
    base, _ = cuhk03_tree
    root = tmp_path / "copy"
    shutil.copytree(base, root)
    first = load_dataset("cuhk03", str(root), split_index=1)
    cache = root / "cuhk03_release" / "images_labeled"
    assert first.info["cache_dir"] == str(cache)
    assert {r.pid for r in first.query} == {p * 1000 + q for p, q in layouts.CUHK03_TESTSETS[1]}
    assert [(p.name, p.options) for p in first.protocols] == [("cuhk03_classic", {"split_index": 1})]
    # Decoded once: with the .mat file now garbage, the cache still serves every image.
    (root / "cuhk03_release" / "cuhk-03.mat").write_bytes(b"not hdf5")
    again = load_dataset("cuhk03", str(root / "cuhk03_release"), split_index=1)
    assert rows(again.train) == rows(first.train)
    with pytest.raises(DatasetLayoutError, match="not a MATLAB v7.3"):
        load_dataset("cuhk03", str(root), box_type="detected")
    with pytest.raises(ValueError, match="split_index must be 0..19"):
        load_dataset("cuhk03", str(root), split_index=20)
    os.remove(root / "cuhk03_release" / "cuhk-03.mat")
    with pytest.raises(DatasetLayoutError, match="cuhk-03.mat"):
        load_dataset("cuhk03", str(root))
    monkeypatch.setattr(cuhk03, "EXPECTED_CLASSIC", {"labeled": dict(cuhk03.EXPECTED_CLASSIC["labeled"],
                                                                     **{"all images": 80})})
    shutil.copytree(base, tmp_path / "again")
    with pytest.raises(DatasetCountError, match="all images: expected 80, found 67"):
        load_dataset("cuhk03", str(tmp_path / "again"), cache_dir=str(tmp_path / "c2"))


def test_cuhk03_new_protocol(cuhk03_tree, tmp_path):
    base, manifests = cuhk03_tree
    for box_type in ("labeled", "detected"):
        ds = load_dataset("cuhk03", os.path.join(base, "cuhk03_release"), box_type=box_type, protocol="new",
                          cache_dir=str(tmp_path / box_type))
        manifest = manifests[box_type]
        assert rows(ds.query) == manifest["query"] and rows(ds.gallery) == manifest["gallery"]
        train_src = manifest["train"]
        assert [r[1] for r in rows(ds.train)] == dense([p for _, p, _ in train_src])
        assert ds.info["protocol"] == "new (767/700)" and ds.info["box_type"] == box_type
        assert ds.protocols == ()  # the new protocol is docs/protocols.md (a) only
    bare = tmp_path / "bare"
    shutil.copytree(os.path.join(base, "cuhk03_release"), bare / "cuhk03_release",
                    ignore=shutil.ignore_patterns("images_*"))
    with pytest.raises(DatasetLayoutError, match="cuhk03_new_protocol_config_labeled.mat"):
        load_dataset("cuhk03", str(bare), protocol="new")


def test_cuhk03_image_folder_release(tmp_path):
    spec = {"bounding_box_train": [(1, 1), (1, 2), (4, 1)], "bounding_box_test": [(7, 1), (7, 2)],
            "query": [(7, 1)]}
    layouts.make_market_style(str(tmp_path / "cuhk03-np" / "detected"), spec)
    ds = load_dataset("cuhk03", str(tmp_path), box_type="detected", protocol="new")
    assert ds.train_id_map == {1: 0, 4: 1} and [r.pid for r in ds.query] == [7]
    assert ds.info["source"] == "image-folder release"
    direct = load_dataset("cuhk03", str(tmp_path / "cuhk03-np" / "detected"), box_type="detected", protocol="new")
    assert rows(direct.gallery) == rows(ds.gallery)
    with pytest.raises(DatasetLayoutError, match="cuhk-03.mat"):  # classic needs the .mat file
        load_dataset("cuhk03", str(tmp_path), box_type="detected")


def test_cuhk03_unwritable_cache_is_a_clear_error(cuhk03_tree, tmp_path):
    base, _ = cuhk03_tree
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DatasetLayoutError, match="cannot write decoded images to .*pass cache_dir="):
        load_dataset("cuhk03", base, cache_dir=str(blocker / "sub"))


# ------------------------------------------------------------------------------ registry

def test_load_dataset_names_and_options(tmp_path):
    assert DATASET_NAMES == ("market1501", "dukemtmc", "msmt17", "cuhk01", "cuhk03", "cuhk_sysu", "prw", "synthetic")
    with pytest.raises(ValueError, match="known datasets: market1501, dukemtmc"):
        load_dataset("viper", str(tmp_path))
    with pytest.raises(ValueError, match="unknown option\\(s\\) box_type"):
        load_dataset("market1501", str(tmp_path), box_type="labeled")


def test_default_root_and_the_missing_root_error(tmp_path, monkeypatch):
    from reid_keras.data.datasets import default_root

    assert default_root("synthetic") == "data" and default_root("market1501") is None
    with pytest.raises(ValueError, match=r"^data_root is required for dataset cuhk01: the folder where cuhk01 is "
                                         r"unpacked \(see data/README.md\)$"):
        load_dataset("cuhk01")
    with pytest.raises(ValueError, match="known datasets: market1501"):
        default_root("viper")
    monkeypatch.chdir(tmp_path)
    assert load_dataset("synthetic", num_ids=4).root == "data" and os.path.isdir(tmp_path / "data" / "synthetic")


def test_synthetic_is_the_trainers_synthetic_set_and_reloads_from_its_options(tmp_path):
    """load_dataset("synthetic") = ensure_synthetic + the Market loader (the trainer's old path), renamed."""
    from reid_keras.data.datasets.synthetic import ensure_synthetic

    data = str(tmp_path / "data")
    ds = load_dataset("synthetic", data, num_ids=12)
    old = load_dataset("market1501", ensure_synthetic(data, layout="market1501", num_ids=12, seed=0), strict=False)
    for split in ("train", "query", "gallery"):
        assert getattr(ds, split) == getattr(old, split), split  # same files, labels and order
    assert ds.train_id_map == old.train_id_map and ds.protocols == old.protocols
    assert (ds.name, ds.root, ds.options) == ("synthetic", data, {"num_ids": 12})
    assert len(ds.protocol("multi_query").records) > 0
    again = load_dataset(ds.name, ds.root, **ds.options)
    assert again.query == ds.query and again.protocols == ds.protocols
    cuhk = load_dataset("synthetic", data, num_ids=6, layout="cuhk01", seed=1)
    assert [p.name for p in cuhk.protocols] == ["cuhk01_trials"] and cuhk.options == {"num_ids": 6, "layout": "cuhk01",
                                                                                         "seed": 1}
    assert os.path.isdir(tmp_path / "data" / "synthetic" / "cuhk01" / "CUHK01")
