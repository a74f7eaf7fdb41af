"""CUHK-SYSU and PRW loaders on tiny trees in the real formats (docs/datasets.md §6-7).

Expected values are derived from the specs in tests/scene_trees.py with plain loops written here,
never by running the loader's own helpers.
"""
import os
import shutil

import numpy as np
import pytest
import scipy.io

from reid_keras.data import imagefiles
from reid_keras.data.datasets import cuhk_sysu, load_dataset, prw
from reid_keras.data.datasets.base import DatasetCountError, DatasetLayoutError
from reid_keras.data.datasets.scenes import UNLABELED
from tests import scene_trees as trees


def corners(xywh):
    x, y, w, h = xywh
    return [x, y, x + w, y + h]


def names_of(protocol, indices):
    return [protocol.scene_names[i] for i in indices]


@pytest.fixture(scope="module")
def cuhk_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cuhk"))
    trees.make_cuhk_sysu(root)
    return root


@pytest.fixture(scope="module")
def prw_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("prw"))
    trees.make_prw(root)
    return root


# ------------------------------------------------------------------------------------------ CUHK-SYSU

def expected_cuhk_scenes():
    """name -> (corners, pids) by docs/datasets.md §6, from the spec."""
    kept = {n: [b for b in boxes if b[2] > 0 and b[3] > 0] for n, boxes in trees.CUHK_IMAGES.items()}
    pids = {n: [UNLABELED] * len(b) for n, b in kept.items()}
    for label, entries in enumerate(trees.CUHK_TRAIN_IDENTITIES):
        for name, box in entries:
            if name not in trees.CUHK_POOL and box in kept[name]:
                pids[name][kept[name].index(box)] = label
    for q, (name, box) in enumerate(trees.CUHK_QUERIES):
        pids[name][kept[name].index(box)] = q
        for gname, gbox in trees.CUHK_GALLERIES[50][q]:
            if gbox is not None:
                pids[gname][kept[gname].index(gbox)] = q
    return {n: ([corners(b) for b in kept[n]], pids[n]) for n in kept}


def test_cuhk_sysu_scenes_labels_queries_and_counts(cuhk_root):
    ds = load_dataset("cuhk_sysu", cuhk_root)
    assert ds.name == "cuhk_sysu" and ds.root == os.path.join(cuhk_root, "CUHK-SYSU") and ds.options == {}
    expected = expected_cuhk_scenes()
    # train = Img names minus pool, sorted as strings (s10 between s1 and s2); gallery = pool order
    assert [s.name for s in ds.train] == ["s1.jpg", "s10.jpg", "s2.jpg", "s3.jpg"]
    assert [s.name for s in ds.gallery] == trees.CUHK_POOL
    for scene in ds.train + ds.gallery:
        boxes, pids = expected[scene.name]
        assert scene.boxes.dtype == np.float32 and scene.pids.dtype == np.int32
        assert scene.boxes.tolist() == boxes and scene.pids.tolist() == pids, scene.name
        assert scene.camid == -1 and scene.path == os.path.join(ds.root, "Image", "SSM", scene.name)
    assert ds.scene("s9.jpg").pids.tolist() == [UNLABELED, 0]
    assert [(q.scene, q.box.tolist(), q.pid, q.camid, q.index) for q in ds.queries] == [
        (n, corners(b), q, -1, q) for q, (n, b) in enumerate(trees.CUHK_QUERIES)]
    assert ds.train_id_map == {0: 0, 1: 1, 2: 2} and ds.num_train_ids == 3
    assert ds.info["boxes dropped (w <= 0 or h <= 0)"] == 3
    assert ds.info["boxes dropped, e.g."] == ["s1.jpg [20, 10, 0, 12]", "s10.jpg [18, 8, 9, -3]",
                                             "s8.jpg [13, 2, 0, 10]"]
    assert ds.info["train identity boxes not found in Images.mat (expected 0)"] == 1  # s3 [99, 99, 5, 5]
    assert ds.info["test identity boxes not found in Images.mat (expected 0)"] == 0
    assert ds.info["train boxes (published 55,272)"] == 6 and ds.info["test boxes (published 40,871)"] == 10
    assert ds.skipped.total == 0 and ds.gallery_sizes == (50, 100, -1)
    # the folder itself works as root too
    assert [s.name for s in load_dataset("cuhk_sysu", ds.root).gallery] == trees.CUHK_POOL


def expected_cuhk_protocol(size):
    """docs/protocols.md (d) from the spec: file order, each scene once, positives with their box."""
    entries = trees.CUHK_GALLERIES[50 if size == -1 else size]
    out = []
    for q, listed in enumerate(entries):
        gallery, positives, boxes, duplicates = [], [], [], 0
        for name, box in listed:
            if name in gallery:
                duplicates += 1
                continue
            gallery.append(name)
            if box is not None:
                positives.append(name)
                boxes.append(corners(box))
        if size == -1:
            own = trees.CUHK_QUERIES[q][0]
            gallery += [n for n in trees.CUHK_POOL if n not in gallery and n != own]
        out.append((gallery, positives, boxes, duplicates))
    return out


@pytest.mark.parametrize("size", [50, 100, -1])
def test_cuhk_sysu_protocols(cuhk_root, size):
    ds = load_dataset("cuhk_sysu", cuhk_root)
    protocol = ds.search_protocol(size)
    expected = expected_cuhk_protocol(size)
    assert protocol.name == ("cuhk_sysu full set (-1)" if size == -1 else f"cuhk_sysu TestG{size}")
    assert list(protocol.scene_names) == trees.CUHK_POOL and len(protocol) == 3
    for q, (gallery, positives, boxes, _) in enumerate(expected):
        assert names_of(protocol, protocol.galleries[q]) == gallery
        assert names_of(protocol, protocol.positive_scenes[q]) == positives
        assert protocol.positive_boxes[q].tolist() == boxes
        assert protocol.galleries[q].dtype == np.int32
    assert protocol.duplicates == sum(e[3] for e in expected) == (0 if size == 100 else 1)
    assert protocol.num_positives().tolist() == [2, 1, 1]
    assert ds.search_protocol(size) is protocol  # built once


def test_cuhk_sysu_files_have_the_real_structure(cuhk_root):
    """Read as the published code reads the real files (loadmat defaults): the writer's output must
    answer the same indexing, and hold both empty-idlocate shapes and the w/h <= 0 boxes."""
    base = os.path.join(cuhk_root, "CUHK-SYSU", "annotation")
    img = scipy.io.loadmat(os.path.join(base, "Images.mat"))["Img"].squeeze()
    listed = {str(name[0]): np.asarray([b[0] for b in boxes[0]]).reshape(-1, 4).tolist() for name, _, boxes in img}
    assert listed == trees.CUHK_IMAGES
    pool = scipy.io.loadmat(os.path.join(base, "pool.mat"))["pool"].squeeze()
    assert [str(a[0]) for a in pool] == trees.CUHK_POOL
    train = scipy.io.loadmat(os.path.join(base, "test", "train_test", "Train.mat"))["Train"].squeeze()
    for item, entries in zip(train, trees.CUHK_TRAIN_IDENTITIES):
        scenes = item[0, 0][2].squeeze()
        assert [(str(n[0]), b.squeeze().astype(int).tolist()) for n, b, _ in scenes] == entries
    protoc = scipy.io.loadmat(os.path.join(base, "test", "train_test", "TestG50.mat"))["TestG50"].squeeze()
    shapes = set()
    for q, (name, box) in enumerate(trees.CUHK_QUERIES):
        assert str(protoc["Query"][q]["imname"][0, 0][0]) == name
        assert protoc["Query"][q]["idlocate"][0, 0][0].astype(int).tolist() == box
        gallery = protoc["Gallery"][q].squeeze()
        assert [str(item[0][0]) for item in gallery] == [n for n, _ in trees.CUHK_GALLERIES[50][q]]
        for item, (_, gbox) in zip(gallery, trees.CUHK_GALLERIES[50][q]):
            if gbox is None:
                shapes.add(item[1].shape)
                assert item[1].size == 0
            else:
                assert item[1][0].astype(int).tolist() == gbox
    assert shapes == {(0, 0), (1, 0)}


def test_cuhk_sysu_missing_and_damaged_images_are_counted_skips(tmp_path):
    folder = trees.make_cuhk_sysu(str(tmp_path), missing=("s10.jpg", "s7.jpg"))
    with open(os.path.join(folder, "Image", "SSM", "s6.jpg"), "r+b") as handle:
        handle.truncate(100)  # a download cut short
    ds = load_dataset("cuhk_sysu", str(tmp_path))
    assert [s.name for s in ds.train] == ["s1.jpg", "s2.jpg", "s3.jpg"]
    assert [s.name for s in ds.gallery] == ["s11.jpg", "s5.jpg", "s8.jpg", "s9.jpg"]
    assert ds.skipped.counts == {cuhk_sysu.REASON_MISSING: 2, imagefiles.REASON_JPEG_TRUNCATED: 1}
    assert ds.skipped.examples[cuhk_sysu.REASON_MISSING] == [os.path.join(folder, "Image", "SSM", n)
                                                            for n in ("s10.jpg", "s7.jpg")]
    # queries whose scene is gone (s6 damaged, s7 missing) are dropped and counted; the rest keep their index
    assert [(q.scene, q.index, q.pid) for q in ds.queries] == [("s5.jpg", 0, 0)]
    assert ds.info["queries dropped (query scene missing or damaged on disk)"] == 2
    protocol = ds.search_protocol(50)
    # the protocol still lists the lost scenes: their ground truth counts (docs/protocols.md (d))
    assert len(protocol) == 1 and names_of(protocol, protocol.galleries[0]) == ["s6.jpg", "s9.jpg", "s7.jpg",
                                                                                 "s8.jpg"]
    assert names_of(protocol, protocol.positive_scenes[0]) == ["s6.jpg", "s9.jpg"]


def test_cuhk_sysu_layout_errors_name_the_file(tmp_path):
    folder = trees.make_cuhk_sysu(str(tmp_path))
    pool = os.path.join(folder, "annotation", "pool.mat")
    os.rename(pool, pool + ".bak")
    with pytest.raises(DatasetLayoutError, match=r"no folder or file 'annotation/pool.mat' under .*CUHK-SYSU: "
                                                 r"expected the layout\nCUHK-SYSU/\n  Image/SSM"):
        load_dataset("cuhk_sysu", str(tmp_path))
    with open(pool, "w") as handle:
        handle.write("<html>not found</html>")
    with pytest.raises(DatasetLayoutError, match=r"cannot read .*annotation/pool.mat as a MATLAB file"):
        load_dataset("cuhk_sysu", str(tmp_path))
    scipy.io.savemat(pool, {"gallery": np.zeros(3)})
    with pytest.raises(DatasetLayoutError, match=r"pool.mat has no variable 'pool' \(found: gallery\)"):
        load_dataset("cuhk_sysu", str(tmp_path))
    os.replace(pool + ".bak", pool)
    with pytest.raises(DatasetLayoutError, match=r"dataset root .*nowhere' does not exist"):
        load_dataset("cuhk_sysu", str(tmp_path / "nowhere"))

    # a TestG file whose queries are in another order is refused when first used, naming it
    protocol_dir = os.path.join(folder, "annotation", "test", "train_test")
    os.remove(os.path.join(protocol_dir, "TestG100.mat"))
    assert load_dataset("cuhk_sysu", folder).gallery_sizes == (50, -1)
    swapped = [trees.CUHK_QUERIES[1], trees.CUHK_QUERIES[0], trees.CUHK_QUERIES[2]]
    cuhk_sysu.write_annotations(str(tmp_path / "other"), {}, [], [], swapped, {500: trees.CUHK_GALLERIES[50]})
    shutil.copy(str(tmp_path / "other" / "annotation" / "test" / "train_test" / "TestG500.mat"), protocol_dir)
    ds = load_dataset("cuhk_sysu", folder)
    with pytest.raises(DatasetLayoutError, match=r"TestG500.mat: query 0 is s6.jpg \[1, 4, 9, 25\] but .*TestG50.mat "
                                                 r"has s5.jpg \[2, 2, 10, 30\] there: the queries must be in the same"):
        ds.search_protocol(500)
    with pytest.raises(ValueError, match=r"gallery_size=100 is not a gallery of cuhk_sysu; accepted: 50, 500, -1"):
        ds.search_protocol(100)
    # a query without a box is a broken file, named, not a numpy error
    broken = [(trees.CUHK_QUERIES[0][0], np.zeros((1, 0)))] + trees.CUHK_QUERIES[1:]
    cuhk_sysu.write_annotations(str(tmp_path / "other"), {}, [], [], broken, {1000: trees.CUHK_GALLERIES[50]})
    shutil.copy(str(tmp_path / "other" / "annotation" / "test" / "train_test" / "TestG1000.mat"), protocol_dir)
    with pytest.raises(DatasetLayoutError, match=r"TestG1000.mat: unexpected structure of TestG1000 \(.*TestG1000.mat "
                                                 r"query 0: idlocate has 0 values, expected \[x, y, w, h\]\)"):
        load_dataset("cuhk_sysu", folder).search_protocol(1000)


def test_cuhk_sysu_count_check(cuhk_root, monkeypatch):
    assert load_dataset("cuhk_sysu", cuhk_root).queries  # strict=None: a tiny copy is not checked
    small = {"train images": 4, "train ids": 3, "test images": 6, "queries": 3}
    monkeypatch.setattr(cuhk_sysu, "EXPECTED_COUNTS", small)
    assert len(load_dataset("cuhk_sysu", cuhk_root, strict=True).gallery) == 6
    monkeypatch.setattr(cuhk_sysu, "EXPECTED_COUNTS", {**small, "queries": 2900})
    with pytest.raises(DatasetCountError, match=r"cuhk_sysu: counts differ .*\n  queries: expected 2900, found 3"):
        load_dataset("cuhk_sysu", cuhk_root, strict=True)
    with pytest.raises(DatasetCountError):  # strict=None: the copy has >= half of the published images
        load_dataset("cuhk_sysu", cuhk_root)
    assert len(load_dataset("cuhk_sysu", cuhk_root, strict=False).queries) == 3


def test_cuhk_sysu_writer_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"galleries\[50\] has 2 entries, expected one per query \(3\)"):
        cuhk_sysu.write_annotations(str(tmp_path), {"s1.jpg": [[1, 2, 3, 4]]}, ["s1.jpg"], [], trees.CUHK_QUERIES,
                                    {50: [[], []]})
    assert not os.path.exists(tmp_path / "annotation")  # checked before the first file is written
    with pytest.raises(ValueError, match=r"images\['s1.jpg'\]: expected an array \[n, 4\] of x, y, w, h, got shape"):
        cuhk_sysu.write_annotations(str(tmp_path), {"s1.jpg": [1, 2, 3]}, [], [], [], {})
    with pytest.raises(ValueError, match=r"galleries\[50\]\[0\]: expected a box \[x, y, w, h\], got \[1.0, 2.0\]"):
        cuhk_sysu.write_annotations(str(tmp_path), {}, [], [], trees.CUHK_QUERIES[:1], {50: [[("s1.jpg", [1, 2])]]})


# ------------------------------------------------------------------------------------------------ PRW

def expected_prw_frames(frames):
    """name -> (corners, original ids with -2 -> UNLABELED) by docs/datasets.md §7, zero-area dropped."""
    out = {}
    for name, (rows, _) in frames.items():
        kept = [(int(r[0]), trees.prw_corners(r)) for r in rows]
        kept = [(pid, c) for pid, c in kept if c[2] > c[0] and c[3] > c[1]]
        out[name] = ([c for _, c in kept], [UNLABELED if pid == -2 else pid for pid, _ in kept])
    return out


def test_prw_scenes_dense_labels_and_queries(prw_root):
    ds = load_dataset("prw", prw_root)
    assert ds.name == "prw" and ds.options == {} and ds.gallery_sizes == (None, 100, -1)
    two_keys, contents = trees.PRW_TWO_KEYS
    train_spec = {**trees.PRW_TRAIN_FRAMES, two_keys: (contents["anno_file"], "anno_file")}
    expected = {**expected_prw_frames(train_spec), **expected_prw_frames(trees.PRW_TEST_FRAMES)}
    # every training id, sorted -> 0..482 (932 -> 482; a pid - 1 table of 482 rows would overflow)
    assert ds.train_id_map == {pid: k for k, pid in enumerate(trees.PRW_ALL_TRAIN_IDS)}
    assert ds.info["train ids (dense label map size)"] == 483 and ds.train_id_map[932] == 482
    assert [s.name for s in ds.train] == list(train_spec)
    for scene in ds.train:
        boxes, pids = expected[scene.name]
        assert scene.boxes.tolist() == boxes, scene.name
        assert scene.pids.tolist() == [UNLABELED if p == UNLABELED else ds.train_id_map[p] for p in pids]
        assert scene.camid == int(scene.name[1]) - 1
    assert ds.train[3].pids.tolist() == [ds.train_id_map[2]]  # anno_file before anno_previous
    assert ds.train[0].boxes.tolist()[2] == [0, 4, 10, 32]  # x = -3.5 clipped before the corners
    assert ds.info["boxes without area after clipping (dropped)"] == 1
    assert [s.name for s in ds.gallery] == list(trees.PRW_TEST_FRAMES)
    for scene in ds.gallery:
        assert (scene.boxes.tolist(), scene.pids.tolist()) == expected[scene.name]
    assert [(q.scene, q.box.tolist(), q.pid, q.camid, q.index) for q in ds.queries] == [
        (f + ".jpg", trees.prw_corners([p, x, y, w, h]), p, int(f[1]) - 1, k)
        for k, (p, x, y, w, h, f) in enumerate(trees.PRW_QUERIES)]
    assert ds.info["queries whose box is not among their frame's annotations (kept)"] == 1
    assert ds.skipped.total == 0


def expected_prw_protocol(multi_view):
    frames = expected_prw_frames(trees.PRW_TEST_FRAMES)
    out = []
    for pid, *_, frame in trees.PRW_QUERIES:
        cam = frame[1]
        gallery = [n for n in frames if n != frame + ".jpg" and not (multi_view and n[1] == cam)]
        positives = [(n, frames[n][0][frames[n][1].index(pid)]) for n in gallery if pid in frames[n][1]]
        out.append((gallery, [n for n, _ in positives], [b for _, b in positives]))
    return out


@pytest.mark.parametrize("multi_view", [False, True])
def test_prw_protocol_single_and_multi_view(prw_root, multi_view):
    ds = load_dataset("prw", prw_root, multi_view=multi_view)
    assert ds.options == {"multi_view": multi_view}
    protocol = ds.search_protocol(100)
    assert protocol.name == ("prw multi_view" if multi_view else "prw")
    same = [[g.tolist() for g in ds.search_protocol(size).galleries] for size in (None, 100, -1)]
    assert same[0] == same[1] == same[2]
    assert list(protocol.scene_names) == list(trees.PRW_TEST_FRAMES)
    for q, (gallery, positives, boxes) in enumerate(expected_prw_protocol(multi_view)):
        assert names_of(protocol, protocol.galleries[q]) == gallery
        assert names_of(protocol, protocol.positive_scenes[q]) == positives
        assert protocol.positive_boxes[q].tolist() == boxes
    assert protocol.info["queries without a positive (invalid)"] == 1  # id 9
    if multi_view:  # query 1 (id 7, camera 2) loses its same-camera positive c2s2_001201
        assert names_of(protocol, protocol.positive_scenes[1]) == ["c3s1_001301.jpg"]
    with pytest.raises(ValueError, match=r"gallery_size=50 is not a gallery of prw; accepted: all, 100, -1"):
        ds.search_protocol(50)


def test_prw_query_file_crlf_lf_and_bad_lines(tmp_path):
    folder = trees.make_prw(str(tmp_path))
    path = os.path.join(folder, "query_info.txt")
    raw = open(path, "rb").read()
    assert raw.count(b"\r\n") == len(trees.PRW_QUERIES) and raw.startswith(b"5 2 3 10 30 c1s1_001051\r\n")
    crlf = [(q.scene, q.box.tolist(), q.pid) for q in load_dataset("prw", folder).queries]
    with open(path, "wb") as handle:  # LF, blank lines, a trailing space and a malformed line
        handle.write(raw.replace(b"\r\n", b" \n\n") + b"7 1 2 c2s2_001201\n")
    ds = load_dataset("prw", folder)
    assert [(q.scene, q.box.tolist(), q.pid) for q in ds.queries] == crlf
    assert ds.info["query_info.txt lines not 'pid x y w h frame' (skipped)"] == 1
    assert ds.info["query_info.txt bad lines, e.g."] == ["query 4: '7 1 2 c2s2_001201'"]


def test_prw_missing_files_and_errors(tmp_path, monkeypatch):
    folder = trees.make_prw(str(tmp_path), missing=("c2s1_000201.jpg", "c1s1_001051.jpg"))
    os.remove(os.path.join(folder, "annotations", "c2s2_001201.jpg.mat"))
    scipy.io.savemat(os.path.join(folder, "annotations", "c3s2_000301.jpg.mat"), {"boxes": np.zeros((1, 5))})
    ds = load_dataset("prw", str(tmp_path))
    assert ds.skipped.counts == {"no annotation file annotations/<frame>.jpg.mat": 1,
                                 "annotation file without any of the keys box_new, anno_file, anno_previous": 1,
                                 prw.REASON_MISSING: 2}
    assert [s.name for s in ds.train] == ["c1s1_000151.jpg", "c1s2_000401.jpg"]
    assert [s.name for s in ds.gallery] == ["c2s1_001101.jpg", "c3s1_001301.jpg"]
    assert ds.train_id_map == {1: 0, 2: 1, 478: 2, 480: 3, 932: 4}  # from the annotations that were read
    assert ds.info["queries dropped (query frame missing or damaged on disk)"] == 1
    assert ds.info["queries dropped (query frame not in frame_test.mat or without annotations)"] == 1
    protocol = ds.search_protocol(None)
    assert list(protocol.scene_names) == ["c1s1_001051.jpg", "c2s1_001101.jpg", "c3s1_001301.jpg"]
    assert [q.index for q in ds.queries] == [1, 2]

    os.remove(os.path.join(folder, "frame_test.mat"))
    with pytest.raises(DatasetLayoutError, match=r"no folder or file 'frame_test.mat' under .*PRW-v16.04.20: "
                                                 r"expected the layout\nPRW-v16.04.20/"):
        load_dataset("prw", str(tmp_path))
    with pytest.raises(ValueError, match=r"unknown option\(s\) gallery; accepted: multi_view"):
        load_dataset("prw", str(tmp_path), gallery="all")


def test_prw_count_check(prw_root, monkeypatch):
    small = {"train images": 4, "test images": 4, "queries": 4, "query ids": 3, "train ids": 483}
    monkeypatch.setattr(prw, "EXPECTED_COUNTS", small)
    assert len(load_dataset("prw", prw_root, strict=True).queries) == 4
    monkeypatch.setattr(prw, "EXPECTED_COUNTS", {**small, "train ids": 482})
    with pytest.raises(DatasetCountError, match=r"prw: counts differ .*\n  train ids: expected 482, found 483"):
        load_dataset("prw", prw_root)
    assert load_dataset("prw", prw_root, strict=False).num_train_ids == 483


def test_prw_writer_and_its_files(tmp_path):
    prw.write_annotations(str(tmp_path), {"c1s1_000001.jpg": [[4, -1, 2, 5, 6]]}, ["c1s1_000001.jpg"], [],
                          [(4, 1.5, 2, 5, 6, "c1s1_000001")], key="anno_previous")
    mat = scipy.io.loadmat(str(tmp_path / "annotations" / "c1s1_000001.jpg.mat"))
    assert mat["anno_previous"].tolist() == [[4, -1, 2, 5, 6]] and "box_new" not in mat
    names = scipy.io.loadmat(str(tmp_path / "frame_train.mat"))["img_index_train"]
    assert [img[0][0] for img in names] == ["c1s1_000001"]  # stored without the extension
    assert scipy.io.loadmat(str(tmp_path / "ID_train.mat"))["ID_train"].tolist() == [[4]]
    assert open(tmp_path / "query_info.txt", "rb").read() == b"4 1.5 2 5 6 c1s1_000001\r\n"
    with pytest.raises(ValueError, match=r"frames\['a.jpg'\]: expected rows \[id, x, y, w, h\], got shape \(4,\)"):
        prw.write_annotations(str(tmp_path), {"a.jpg": [1, 2, 3, 4]}, [], [], [])
    with pytest.raises(ValueError, match=r"key for 'b.jpg': 'boxes' is not one of box_new, anno_file, anno_previous"):
        prw.write_annotations(str(tmp_path / "new"), {"a.jpg": [[1, 2, 3, 4, 5]], "b.jpg": [[1, 2, 3, 4, 5]]}, [], [],
                              [], key={"b.jpg": "boxes"})
    assert not os.path.exists(tmp_path / "new")  # checked before the first file is written
