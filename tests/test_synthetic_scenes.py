"""Synthetic crowded scenes (issue 13, Deliver 2): determinism, content (people per scene, box heights,
perspective, occlusion, recurring identities), tight boxes, the round trip through the real
CUHK-SYSU and PRW loaders, the registered `synthetic` dataset, the `synth` / `info` commands and the
contact sheet. Scenes are tiny (128 x 192, a handful per split); the content checks run the planner
alone at the default scale, without drawing.
"""
import glob
import os
import re

import cv2
import numpy as np
import pytest
import scipy.io

from reid_keras.data.__main__ import main
from reid_keras.data.datasets import load_dataset
from reid_keras.data.datasets import synthetic as S
from reid_keras.data.datasets import synthetic_scene_layout as L
from reid_keras.data.datasets import synthetic_scenes as SC
from reid_keras.data.datasets.scenes import UNLABELED
from reid_keras.data.datasets.synthetic_attributes import VIEWS

TINY = dict(train_scenes=6, test_scenes=8, size=(128, 192))
PRW_FRAME = re.compile(r"^c([1-6])s(\d)_(\d{6})\.jpg$")
MAT_HEADER = 128  # scipy writes the creation time into the 116-byte text header of every .mat file


def tree_bytes(root):
    """{relative path: bytes} of every file under `root`; .mat files without their dated header."""
    files = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                data = f.read()
            files[os.path.relpath(path, root)] = data[MAT_HEADER:] if path.endswith(".mat") else data
    return files


@pytest.fixture(scope="module")
def cuhk(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cuhk_scenes"))
    S.write_scenes("cuhk_sysu", out, seed=0, **TINY)
    return os.path.join(out, "CUHK-SYSU")


@pytest.fixture(scope="module")
def prw(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("prw_scenes"))
    S.write_scenes("prw", out, seed=0, **TINY)
    return os.path.join(out, "PRW-v16.04.20")


@pytest.fixture(scope="module")
def default_plans():
    return {layout: L.plan_scenes(layout, seed=0) for layout in ("cuhk_sysu", "prw")}


def test_same_seed_same_bytes_any_workers_other_seed_differs(tmp_path, cuhk, prw):
    again = str(tmp_path / "again")
    S.write_scenes("cuhk_sysu", again, seed=0, workers=2, **TINY)  # two processes draw the same bytes
    S.write_scenes("prw", again, seed=0, **TINY)
    for first in (cuhk, prw):
        expected, got = tree_bytes(first), tree_bytes(os.path.join(again, os.path.basename(first)))
        assert sorted(got) == sorted(expected) and got == expected
    # The .mat contents (not only their bytes past the header) are equal too.
    a = scipy.io.loadmat(os.path.join(cuhk, "annotation", "Images.mat"))["Img"]
    b = scipy.io.loadmat(os.path.join(again, "CUHK-SYSU", "annotation", "Images.mat"))["Img"]
    assert [str(r[0][0]) for r in a[0]] == [str(r[0][0]) for r in b[0]]
    other = str(tmp_path / "other")
    S.write_scenes("cuhk_sysu", other, seed=1, **TINY)
    images = lambda root: {k: v for k, v in tree_bytes(root).items() if k.endswith(".jpg")}  # noqa: E731
    mine, theirs = images(cuhk), images(os.path.join(other, "CUHK-SYSU"))
    assert not set(mine.items()) & set(theirs.items())  # no identical image under the same name


def test_people_per_scene_and_box_heights_at_default_scale(default_plans):
    """Plan only (400 x 600, 750 scenes): 1-12 people, heights ~40-300 px, smaller higher in the frame."""
    for plan in default_plans.values():
        assert plan.size == (400, 600) and len(plan.scenes) == 750
        counts = np.array([len(s.people) for s in plan.scenes])
        assert counts.min() == 1 and counts.max() == 12 and 4.5 < counts.mean() < 6.5
        heights = np.array([p.height for s in plan.scenes for p in s.people])
        assert 35 <= heights.min() < 50 and 280 < heights.max() <= 310
        assert np.percentile(heights, 10) < 80 and np.percentile(heights, 90) > 180  # the range is used
        for cam in {s.cam for s in plan.scenes}:
            people = [p for s in plan.scenes if s.cam == cam for p in s.people]
            feet, height = np.array([p.feet for p in people]), np.array([p.height for p in people])
            assert np.corrcoef(feet, height)[0, 1] > 0.97  # a ground plane: height grows with the feet's row
            assert np.all(feet <= 400) and np.all(feet - height >= 0)


def test_partial_occlusion_keeps_labeled_people_mostly_visible(default_plans):
    plan = default_plans["prw"]
    overlapped = 0
    for scene in plan.scenes:
        boxes = np.array([[p.cx - 0.17 * p.height, p.top, p.cx + 0.17 * p.height, p.feet] for p in scene.people])
        x = np.maximum(0, np.minimum(boxes[:, None, 2], boxes[None, :, 2]) - np.maximum(boxes[:, None, 0],
                                                                                         boxes[None, :, 0]))
        y = np.maximum(0, np.minimum(boxes[:, None, 3], boxes[None, :, 3]) - np.maximum(boxes[:, None, 1],
                                                                                         boxes[None, :, 1]))
        np.fill_diagonal(x, 0)
        overlapped += bool(np.any(x * y > 0))
    assert overlapped > 0.4 * len(plan.scenes)
    occluded = sum(len(s.occluders) > 0 for s in plan.scenes)
    assert 0.2 * len(plan.scenes) < occluded < 0.95 * len(plan.scenes)
    assert {o.kind for s in plan.scenes for o in s.occluders} == {"pole", "barrier"}
    visible = np.array([p.visible for s in plan.scenes for p in s.people if p.identity > 0])
    assert np.mean(visible >= L.MIN_VISIBLE[True]) > 0.99
    assert {p.view for s in plan.scenes for p in s.people} == set(VIEWS)


def test_identities_recur_across_scenes_and_cameras(default_plans):
    for layout, plan in default_plans.items():
        train, test = set(plan.train_ids), set(plan.test_ids)
        assert train and test and not train & test
        assert sorted(train | test) == list(range(1, len(train) + len(test) + 1))
        seen = {}
        for s in plan.scenes:
            ids = [p.identity for p in s.people if p.identity > 0]
            assert len(ids) == len(set(ids))  # nobody twice in one scene
            for i in ids:
                seen.setdefault(i, []).append((s.split, s.cam))
        assert set(seen) == train | test
        for i, visits in seen.items():
            assert {v[0] for v in visits} == {"train" if i in train else "test"}
            assert L.APPEARANCES[0] <= len(visits) <= L.APPEARANCES[1]
        assert np.mean([len({c for _, c in v}) >= 2 for v in seen.values()]) > 0.97
        unlabeled = sum(p.identity == 0 for s in plan.scenes for p in s.people)
        assert 0.3 < unlabeled / sum(len(s.people) for s in plan.scenes) < 0.7
        if layout == "cuhk_sysu":
            assert sorted(plan.galleries) == [50, 100] and len(plan.queries) == len(test)
        else:  # PRW: at most one query per id and camera, one for each camera an id visits
            keys = [(plan.scenes[s].people[j].identity, plan.scenes[s].cam) for s, j in plan.queries]
            assert len(keys) == len(set(keys)) == sum(len({c for _, c in seen[i]}) for i in test)


def test_person_box_is_the_tight_box_of_its_pixels():
    """Drawn on a uniform image (independent of the blank patch used inside): the changed pixels' bounding box."""
    rng = np.random.default_rng(5)
    for k in range(40):
        h, w = 160, 220
        img = np.full((h, w, 3), 7, np.uint8)
        ph = float(rng.uniform(20, 150))
        person = L.PlannedPerson(int(rng.integers(0, 30)), float(rng.uniform(0, w)), float(rng.uniform(-10, h - ph)),
                                 ph, VIEWS[k % 4], 1.0)
        box = SC._draw_person(img, person, np.random.default_rng(k), seed=0)
        rows, cols = np.flatnonzero((img != 7).any(axis=(1, 2))), np.flatnonzero((img != 7).any(axis=(0, 2)))
        assert box.tolist() == [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], k
        if 0.35 * ph < person.cx < w - 0.35 * ph and person.top >= 0:  # whole person: the patch did not cut it
            # the planned height is the box height (small people gain a pixel or two from minimum strokes)
            assert ph - 4 <= box[3] - box[1] <= 1.07 * ph + 1
            assert 0.15 * ph < box[2] - box[0] < 0.5 * ph


def test_cuhk_round_trip(cuhk):
    ds = load_dataset("cuhk_sysu", cuhk, strict=False)
    plan = L.plan_scenes("cuhk_sysu", 0, **TINY)
    assert len(ds.train) == 6 and len(ds.gallery) == 8 and len(ds.queries) == len(plan.test_ids)
    assert ds.gallery_sizes == (50, -1)  # 7 other test scenes: TestG50 holds all of them
    by_name = {s.name: s for s in ds.train + ds.gallery}
    assert set(by_name) == {s.name for s in plan.scenes} and all(re.fullmatch(r"s\d+\.jpg", n) for n in by_name)
    for index in (0, 7, 13):
        _, boxes = SC.render_scene(plan, index)
        record = by_name[plan.scenes[index].name]
        np.testing.assert_array_equal(record.boxes, boxes.astype(np.float32))
        assert cv2.imread(record.path).shape == (128, 192, 3)
    train_pids = np.concatenate([s.pids for s in ds.train])
    assert sorted(set(train_pids.tolist()) - {UNLABELED}) == list(range(len(plan.train_ids)))
    assert ds.info["train identity boxes not found in Images.mat (expected 0)"] == 0
    assert ds.info["test identity boxes not found in Images.mat (expected 0)"] == 0
    protocol = ds.search_protocol(50)
    for q, query in enumerate(ds.queries):
        assert query.pid == q
        gallery = [protocol.scene_names[i] for i in protocol.galleries[q]]
        assert sorted(gallery) == sorted(s.name for s in ds.gallery if s.name != query.scene)
        holders = [s.name for s in ds.gallery if q in s.pids.tolist() and s.name != query.scene]
        assert len(holders) >= 1 and gallery[:len(holders)] == [n for n in gallery if n in holders]
        for i, box in zip(protocol.positive_scenes[q], protocol.positive_boxes[q]):
            scene = ds.scene(protocol.scene_names[i])
            np.testing.assert_array_equal(box, scene.boxes[scene.pids == q][0])
        own = ds.scene(query.scene)
        np.testing.assert_array_equal(query.box, own.boxes[own.pids == q][0])


def test_cuhk_gallery_sizes_follow_the_test_set():
    plan = L.plan_scenes("cuhk_sysu", 3, train_scenes=4, test_scenes=120, size=(96, 128))
    assert sorted(plan.galleries) == [50, 100]
    test_indices = {i for i, s in enumerate(plan.scenes) if s.split == "test"}
    for (s, j), g50, g100 in zip(plan.queries, plan.galleries[50], plan.galleries[100]):
        identity = plan.scenes[s].people[j].identity
        holders = [i for i in sorted(test_indices) if i != s and
                   identity in {p.identity for p in plan.scenes[i].people}]
        assert len(g50) == 50 and len(g100) == 100 and len(set(g100)) == 100 and s not in g100
        assert list(g50[:len(holders)]) == holders and list(g100[:50]) == list(g50)  # positives first, nested
        assert set(g100) <= test_indices


def test_prw_round_trip(prw):
    ds = load_dataset("prw", prw, strict=False)
    plan = L.plan_scenes("prw", 0, **TINY)
    assert len(ds.train) == 6 and len(ds.gallery) == 8 and len(ds.queries) == len(plan.queries)
    for record in ds.train + ds.gallery:
        match = PRW_FRAME.match(record.name)
        assert match and record.camid == int(match.group(1)) - 1
    by_name = {s.name: s for s in ds.train + ds.gallery}
    for index, scene in enumerate(plan.scenes):
        _, boxes = SC.render_scene(plan, index)
        np.testing.assert_array_equal(by_name[scene.name].boxes, boxes.astype(np.float32))
    gallery_ids = {int(p) for s in ds.gallery for p in s.pids} - {UNLABELED}
    assert gallery_ids == set(plan.test_ids)
    keys = set()
    for path in glob.glob(os.path.join(prw, "annotations", "*.jpg.mat")):
        keys |= {k for k in scipy.io.loadmat(path) if not k.startswith("__")}
    assert "box_new" in keys and len(keys) >= 2 and keys <= {"box_new", "anno_file", "anno_previous"}
    with open(os.path.join(prw, "query_info.txt"), "rb") as f:
        lines = f.read().split(b"\r\n")
    assert lines[-1] == b"" and len(lines) - 1 == len(ds.queries)
    assert len({(q.pid, q.camid) for q in ds.queries}) == len(ds.queries)
    for multi_view in (False, True):
        protocol = load_dataset("prw", prw, strict=False, multi_view=multi_view).search_protocol(None)
        assert protocol.info["queries without a positive (invalid)"] == 0
        assert min(protocol.num_positives()) >= 1


def test_registered_dataset_writes_once_and_reloads(tmp_path):
    options = dict(layout="prw", train_scenes=4, test_scenes=4, scene_size=(128, 192))
    ds = load_dataset("synthetic", str(tmp_path), **options)
    folder = tmp_path / "synthetic" / "prw" / "PRW-v16.04.20"
    assert ds.name == "synthetic" and ds.root == str(tmp_path) and ds.options == options
    assert len(ds.train) == 4 and len(ds.gallery) == 4 and str(folder) in ds.info["synthetic"]
    stamp = os.stat(folder / "SYNTHETIC.json").st_mtime_ns
    again = load_dataset("synthetic", ds.root, **ds.options)
    assert os.stat(folder / "SYNTHETIC.json").st_mtime_ns == stamp  # reused, not rewritten
    assert [s.name for s in again.gallery] == [s.name for s in ds.gallery]
    assert len(again.search_protocol(None)) == len(ds.queries)
    text_size = load_dataset("synthetic", str(tmp_path), layout="prw", train_scenes=4, test_scenes=4,
                             scene_size="128x192", multi_view=True)
    assert text_size.search_protocol(None).name == "prw multi_view"
    assert os.stat(folder / "SYNTHETIC.json").st_mtime_ns == stamp
    other = load_dataset("synthetic", str(tmp_path), **{**options, "test_scenes": 5})  # other parameters: rewritten
    assert len(other.gallery) == 5 and sorted(os.listdir(folder.parent)) == ["PRW-v16.04.20"]
    for kwargs, message in [(dict(layout="prw", num_ids=5), "num_ids is for the crop layouts"),
                            (dict(layout="market1501", train_scenes=4), "train_scenes: only for the scene layouts"),
                            (dict(layout="cuhk_sysu", multi_view=True), "multi_view is a prw option"),
                            (dict(layout="prw", scene_size="big"), "scene_size must be"),
                            (dict(layout="viper"), "layout must be one of")]:
        with pytest.raises(ValueError, match=message):
            load_dataset("synthetic", str(tmp_path), **kwargs)


def test_write_scenes_refuses_bad_arguments_and_never_leaves_half_a_set(tmp_path, monkeypatch):
    out = str(tmp_path)
    S.write_scenes("cuhk_sysu", out, train_scenes=2, test_scenes=2, size=(64, 96))
    with pytest.raises(FileExistsError, match="overwrite"):
        S.write_scenes("cuhk_sysu", out, train_scenes=2, test_scenes=2, size=(64, 96))
    os.makedirs(tmp_path / "PRW-v16.04.20" / "frames")  # e.g. a real copy: never replaced
    with pytest.raises(FileExistsError, match="not written by the synthetic generator"):
        S.write_scenes("prw", out, train_scenes=2, test_scenes=2, overwrite=True)
    for kwargs, message in [(dict(layout="viper"), "layout must be one of"),
                            (dict(layout="prw", train_scenes=1), "train_scenes must be an int in 2..100000"),
                            (dict(layout="prw", test_scenes=2.5), "test_scenes must be an int"),
                            (dict(layout="prw", size=(32, 300)), "size must be at least 64 x 64"),
                            (dict(layout="prw", size=400), r"size must be \(height, width\)"),
                            (dict(layout="prw", seed=-1), "seed must be a non-negative int")]:
        with pytest.raises(ValueError, match=message):
            S.write_scenes(out=str(tmp_path / "bad"), **kwargs)

    def dying(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(SC, "render_all", dying)
    before = sorted(os.listdir(tmp_path / "CUHK-SYSU" / "Image" / "SSM"))
    with pytest.raises(KeyboardInterrupt):
        S.write_scenes("cuhk_sysu", out, train_scenes=3, test_scenes=3, size=(64, 96), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["CUHK-SYSU", "PRW-v16.04.20"]  # no temp folder left
    assert sorted(os.listdir(tmp_path / "CUHK-SYSU" / "Image" / "SSM")) == before  # the old set intact


def table_rows(text):
    """{split: (ids, scenes, boxes, unlabeled)} parsed back from `SearchDataset.summary()`."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[0] in ("train", "gallery", "query") and all(p.isdigit() for p in parts[1:]):
            out[parts[0]] = tuple(int(p) for p in parts[1:])
    return out


def test_synth_command_writes_scenes_and_sheet_and_info_reads_them(tmp_path, capsys):
    out = str(tmp_path)
    args = ["synth", "--layout", "cuhk_sysu", "--out", out, "--scenes-train", "4", "--scenes-test", "5",
            "--scene-size", "128x192", "--seed", "2"]
    assert main(args) == 0
    text = capsys.readouterr().out
    sheet = tmp_path / "CUHK-SYSU_contact_sheet.jpg"
    assert f"contact sheet: {sheet}" in text and cv2.imread(str(sheet)) is not None
    plan = L.plan_scenes("cuhk_sysu", 2, 4, 5, (128, 192))
    assert main(["info", "--dataset", "cuhk_sysu", "--data-root", out, "--no-strict"]) == 0
    text = capsys.readouterr().out
    people = {split: [p for s in plan.split(split) for p in s.people] for split in ("train", "test")}
    assert table_rows(text) == {
        "train": (len(plan.train_ids), 4, len(people["train"]), sum(p.identity == 0 for p in people["train"])),
        "gallery": (len(plan.test_ids), 5, len(people["test"]), sum(p.identity == 0 for p in people["test"])),
        "query": (len(plan.test_ids), len({s for s, _ in plan.queries}), len(plan.queries), 0)}
    assert "search gallery sizes: 50, -1" in text and "decode check: 9 image(s) decoded, 0 damaged" in text
    assert main(args) == 2
    assert "already exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    assert main(["synth", "--layout", "prw", "--out", out, "--ids", "5"]) == 2
    assert "--ids only apply to the crop layouts" in capsys.readouterr().err
    assert main(["synth", "--layout", "market1501", "--out", out, "--scenes-test", "5"]) == 2
    assert "--scenes-test only apply to the scene layouts" in capsys.readouterr().err


def test_info_on_the_registered_scene_dataset(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["info", "--dataset", "synthetic", "--dataset-option", "layout=prw", "--dataset-option",
                 "train_scenes=3", "--dataset-option", "test_scenes=3", "--dataset-option", "scene_size=96x128"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("synthetic at data\n") and "prw scenes, 3 train / 3 test of 96x128" in text
    assert table_rows(text)["train"][1] == 3 and "search gallery sizes: all, 100, -1" in text


def test_contact_sheet_draws_labeled_green_and_unlabeled_grey(cuhk, tmp_path):
    ds = load_dataset("cuhk_sysu", cuhk, strict=False)
    path = str(tmp_path / "sheet.png")
    sheet = SC.scene_contact_sheet(path, ds, count=4, columns=2, tile_width=192)
    assert sheet.shape == (2 * (18 + 128 + 4), 2 * (192 + 4), 3)
    np.testing.assert_array_equal(cv2.imread(path), sheet)  # PNG: lossless
    first = sorted(ds.train, key=lambda r: -len(r.pids))[0]
    tile = sheet[18:18 + 128, :192].astype(int)
    is_colour = lambda pixels, colour: np.all(pixels == colour, axis=-1)  # noqa: E731
    for box in first.boxes[first.pids != UNLABELED].astype(int):  # labeled boxes are drawn last, on top
        assert np.all(is_colour(tile[box[1] + 1:box[3] - 1, box[0]], (40, 200, 40))), box
    grey = is_colour(tile, (170, 170, 170))
    assert np.sum(first.pids == UNLABELED) > 0 and grey.any()
    assert not grey[:, :int(first.boxes[:, 0].min())].any()  # grey only on boxes
    missing = ds.train[0]._replace(path=str(tmp_path / "gone.jpg"))
    ds.train[0] = missing
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        SC.scene_contact_sheet(str(tmp_path / "x.jpg"), ds, count=len(ds.train) * 2)

