"""Synthetic pedestrian datasets: determinism, exact layouts, splits, attributes, camera effects.

File names are checked with regexes written here from docs/datasets.md, independent of the generator.
"""
import collections
import dataclasses
import glob
import hashlib
import json
import os
import re

import cv2
import numpy as np
import pytest

from reid_keras.data.datasets import synthetic as S
from reid_keras.data.datasets import synthetic_attributes as A
from reid_keras.data.datasets import synthetic_render as R

MARKET_RE = re.compile(r"^(\d{4}|-1)_c(\d)s([1-6])_(\d{6})_(\d{2})\.jpg$")
DUKE_RE = re.compile(r"^(\d{4})_c(\d)_f(\d{7})\.jpg$")
CUHK01_RE = re.compile(r"^(\d{4})(\d{3})\.png$")


def parse_folder(folder, regex):
    """{basename: match groups} of every file in `folder`; fails on any other name."""
    out = {}
    for name in sorted(os.listdir(folder)):
        match = regex.match(name)
        assert match, f"unexpected file name {name} in {folder}"
        out[name] = match.groups()
    return out


def tree_bytes(root):
    files = {}
    for path in sorted(glob.glob(os.path.join(root, "**", "*"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                files[os.path.relpath(path, root)] = f.read()
    return files


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    out = tmp_path_factory.mktemp("market")
    summary = S.write_dataset("market1501", str(out), num_ids=30, seed=0)
    return os.path.join(out, "Market-1501-v15.09.15"), summary


@pytest.fixture(scope="module")
def duke(tmp_path_factory):
    out = tmp_path_factory.mktemp("duke")
    S.write_dataset("dukemtmc", str(out), num_ids=28, seed=0)
    return os.path.join(out, "DukeMTMC-reID")


@pytest.fixture(scope="module")
def cuhk01(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuhk01")
    S.write_dataset("cuhk01", str(out), num_ids=12, seed=0)
    return os.path.join(out, "CUHK01")


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path, market):
    S.write_dataset("market1501", str(tmp_path / "a"), num_ids=30, seed=0, workers=2)
    again = tree_bytes(str(tmp_path / "a" / "Market-1501-v15.09.15"))
    first = tree_bytes(market[0])
    assert len(first) > 100 and again == first  # also across worker counts
    S.write_dataset("market1501", str(tmp_path / "b"), num_ids=30, seed=1)
    other = tree_bytes(str(tmp_path / "b" / "Market-1501-v15.09.15"))
    assert set(other) != set(first)
    item = S.plan_dataset("market1501", 30, seed=0)[0]
    assert not np.array_equal(S.render_planned(item, "market1501", 0), S.render_planned(item, "market1501", 1))


def test_market_layout_names_and_splits(market):
    root, summary = market
    assert sorted(os.listdir(root)) == ["SYNTHETIC.json", "bounding_box_test", "bounding_box_train", "gt_bbox",
                                        "query"]
    train = parse_folder(os.path.join(root, "bounding_box_train"), MARKET_RE)
    gallery = parse_folder(os.path.join(root, "bounding_box_test"), MARKET_RE)
    query = parse_folder(os.path.join(root, "query"), MARKET_RE)
    train_ids = {int(g[0]) for g in train.values()}
    test_ids = {int(g[0]) for g in query.values()}
    assert len(train_ids) == 15 and len(test_ids) == 15 and not train_ids & test_ids
    assert train_ids | test_ids == set(range(1, 31))
    assert all(1 <= int(g[1]) <= 6 for f in (train, gallery, query) for g in f.values())
    # Hand-drawn queries are box 00, detections 01-08; at most one query per (id, camera).
    assert all(g[4] == "00" for g in query.values())
    assert all(g[4] != "00" for f in (train, gallery) for g in f.values())
    pairs = collections.Counter((g[0], g[1]) for g in query.values())
    assert max(pairs.values()) == 1
    # Every query has a gallery image of its id in another camera, and every test id has >= 2 cameras.
    gal_cams = collections.defaultdict(set)
    for g in gallery.values():
        gal_cams[int(g[0])].add(g[1])
    for g in query.values():
        assert gal_cams[int(g[0])] - {g[1]}, f"query {g} has no cross-camera match"
    junk = [g for g in gallery.values() if g[0] == "-1"]
    distractors = [g for g in gallery.values() if g[0] == "0000"]
    assert junk and distractors
    assert {int(g[0]) for g in gallery.values()} - {-1, 0} == test_ids
    for split, count in (("bounding_box_train", len(train)), ("query", len(query))):
        assert re.search(rf"^{split}\s+\d+\s+{count}$", summary, re.M), summary
    assert re.search(rf"junk -1\)\s+1\s+{len(junk)}$", summary, re.M)
    gt_bbox = parse_folder(os.path.join(root, "gt_bbox"), MARKET_RE)
    manifest = json.load(open(os.path.join(root, "SYNTHETIC.json")))
    assert manifest["images"] == len(train) + len(gallery) + len(query) + len(gt_bbox)
    assert manifest["counts"]["gt_bbox"] == [len(test_ids), len(gt_bbox)] and manifest["generator_version"] == 2
    assert re.search(rf"^gt_bbox\s+{len(test_ids)}\s+{len(gt_bbox)}$", summary, re.M), summary
    assert "images/s" in summary


# Plans of generator version 1 (before gt_bbox/): sha256 of one line per image, see _plan_digest.
V1_PLAN_DIGESTS = {
    ("market1501", 30): (284, "2674add38b3339d7a4d6ebfe008b8932d94d8fadbbf9f944fd59160afd50783d"),
    ("market1501", 300): (3193, "f7d5f7644fa7c5926675b5d99053e227318a968364dddc07eb32c5f11aa27d79"),
    ("dukemtmc", 28): (377, "3d74e03640c697186917f75f6963bfa251c29c514ea314839ee0c51577718326"),
}


def _plan_digest(plan):
    text = "\n".join(f"{p.relpath} {p.pid} {p.cam} {p.identity} {p.box} {p.index} {p.views}" for p in plan)
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize("layout, num_ids", sorted(V1_PLAN_DIGESTS))
def test_gt_bbox_leaves_every_other_planned_image_unchanged(layout, num_ids):
    """gt_bbox items come last: the images before them are exactly the version-1 plan (names,
    identities, image indices, hence pixels), so measured learning-check numbers stay valid."""
    plan = S.plan_dataset(layout, num_ids, seed=0)
    count, digest = V1_PLAN_DIGESTS[(layout, num_ids)]
    assert len(plan) >= count and _plan_digest(plan[:count]) == digest
    assert all(p.relpath.startswith("gt_bbox/") for p in plan[count:])
    assert (len(plan) > count) == (layout == "market1501")  # only Market has gt_bbox
    assert len({p.relpath for p in plan}) == len(plan)


def test_market_gt_bbox_holds_the_queries_and_more_boxes_of_test_ids(market):
    root = market[0]
    query = parse_folder(os.path.join(root, "query"), MARKET_RE)
    gt_bbox = parse_folder(os.path.join(root, "gt_bbox"), MARKET_RE)
    train_ids = {int(g[0]) for g in parse_folder(os.path.join(root, "bounding_box_train"), MARKET_RE).values()}
    assert set(query) <= set(gt_bbox)
    for name in query:  # the real query/ images are copies of gt_bbox images
        with open(os.path.join(root, "query", name), "rb") as a, open(os.path.join(root, "gt_bbox", name), "rb") as b:
            assert a.read() == b.read(), name
    assert all(g[4] == "00" for g in gt_bbox.values())  # hand-drawn
    per_pair = collections.Counter((g[0], g[1]) for g in gt_bbox.values())
    assert set(per_pair) == {(g[0], g[1]) for g in query.values()}  # test ids and their query cameras only
    assert not {int(g[0]) for g in gt_bbox.values()} & train_ids
    assert set(per_pair.values()) <= {1, 2, 3} and max(per_pair.values()) > 1
    extra = sorted(set(gt_bbox) - set(query))
    with open(os.path.join(root, "gt_bbox", extra[0]), "rb") as handle:
        data = handle.read()
    twin = [n for n in query if query[n][:2] == gt_bbox[extra[0]][:2]]
    with open(os.path.join(root, "query", twin[0]), "rb") as handle:
        assert handle.read() != data  # another box of the same person and camera, drawn anew


def test_market_images_are_native_size(market):
    for path in sorted(glob.glob(os.path.join(market[0], "*", "*.jpg")))[::40]:
        img = cv2.imread(path)
        assert img is not None and img.shape == (128, 64, 3), path


def test_duke_layout_and_one_camera_gallery_ids(duke):
    train = parse_folder(os.path.join(duke, "bounding_box_train"), DUKE_RE)
    gallery = parse_folder(os.path.join(duke, "bounding_box_test"), DUKE_RE)
    query = parse_folder(os.path.join(duke, "query"), DUKE_RE)
    assert all(1 <= int(g[1]) <= 8 for f in (train, gallery, query) for g in f.values())
    query_ids = {int(g[0]) for g in query.values()}
    extra = {int(g[0]) for g in gallery.values()} - query_ids
    assert len(extra) == round(28 * 408 / 1404) == 8
    assert not extra & {int(g[0]) for g in train.values()}
    for pid in extra:
        assert len({g[1] for g in gallery.values() if int(g[0]) == pid}) == 1
    assert not any(g[0] in ("0000", "-1") for g in gallery.values())


def test_cuhk01_layout(cuhk01):
    names = parse_folder(os.path.join(cuhk01, "campus"), CUHK01_RE)
    assert len(names) == 48
    by_id = collections.defaultdict(list)
    for pid, img in names.values():
        by_id[int(pid)].append(int(img))
    assert sorted(by_id) == list(range(1, 13)) and all(sorted(v) == [1, 2, 3, 4] for v in by_id.values())
    img = cv2.imread(os.path.join(cuhk01, "campus", "0003004.png"))
    assert img.shape == (160, 60, 3)


def test_loaders_read_synthetic_output(market, duke, cuhk01):
    datasets = pytest.importorskip("reid_keras.data.datasets")
    if not hasattr(datasets, "load_dataset"):
        pytest.skip("loaders not available")
    root = market[0]
    ds = datasets.load_dataset("market1501", os.path.dirname(root))
    n = {s: len(os.listdir(os.path.join(root, s))) for s in ("bounding_box_train", "bounding_box_test", "query")}
    junk = len(glob.glob(os.path.join(root, "bounding_box_test", "-1_*")))
    assert (len(ds.train), len(ds.query), len(ds.gallery)) == (n["bounding_box_train"], n["query"],
                                                                 n["bounding_box_test"] - junk)
    assert ds.num_train_ids == 15 and ds.skipped.total == 0
    assert len(ds.protocol("multi_query").records) == len(os.listdir(os.path.join(root, "gt_bbox")))  # all of a query's id and camera
    assert ds.info["queries with no gt_bbox image of their id and camera"] == 0
    duke_ds = datasets.load_dataset("dukemtmc", duke)
    assert len(duke_ds.query) == len(os.listdir(os.path.join(duke, "query"))) and duke_ds.protocol("multi_query") is None
    assert {r.camid for r in duke_ds.gallery} <= set(range(8))
    cuhk = datasets.load_dataset("cuhk01", cuhk01, split_file=os.path.join(os.path.dirname(cuhk01), "splits.json"))
    assert len(cuhk.train) + len(cuhk.query) + len(cuhk.gallery) == 48


def test_colour_groups_share_colours_and_differ_otherwise():
    for seed in (0, 5):
        groups = collections.defaultdict(list)
        for pid in range(1, 61):
            groups[(pid - 1) // A.GROUP_SIZE].append(A.identity_attributes(seed, pid))
        for members in groups.values():
            assert len({(m.upper, m.lower, m.accent) for m in members}) == 1
            combos = {(m.pattern, m.lower_type, m.bag, m.head, m.sleeves) for m in members}
            assert len(combos) == len(members) == A.GROUP_SIZE
            assert len({(m.height, m.width) for m in members}) == len(members)
        # Ten groups draw from a 17-colour palette: upper colours repeat across groups too.
        uppers = [g[0].upper for g in groups.values()]
        assert len(set(uppers)) < len(uppers)
    assert A.identity_attributes(0, 7) == A.identity_attributes(0, 7)
    with pytest.raises(ValueError, match="pid must be >= 1"):
        A.identity_attributes(0, 0)


def test_cameras_differ_in_mean_colour():
    ident = A.identity_attributes(0, 1)
    means = []
    for cam in range(1, 7):
        camera = A.camera_style(0, cam)
        imgs = [R.render_identity_image(ident, camera, np.random.default_rng([cam, k])) for k in range(12)]
        means.append(np.mean(imgs, axis=(0, 1, 2)))
    means = np.array(means)
    dists = np.linalg.norm(means[:, None] - means[None], axis=-1)[np.triu_indices(6, 1)]
    assert dists.min() > 3.0, dists
    styles = [A.camera_style(0, c) for c in range(1, 7)]
    assert len({s.gain for s in styles}) == 6 and len({s.view_probs for s in styles}) == 6


def test_logo_shows_only_from_the_front():
    base = A.identity_attributes(0, 1)
    ident = dataclasses.replace(base, pattern="logo", logo="square", accent=(0, 0, 255), upper=(200, 200, 200),
                                bag="none", hat=(0, 0, 0), bag_colour=(0, 0, 0), shoes=(0, 0, 0))
    camera = dataclasses.replace(A.camera_style(0, 1), gain=(1.0, 1.0, 1.0), offset=0.0, gamma=1.0,
                                 noise=0.0, blur=0.0, occlusion=0.0, wall=(200, 200, 200), background="plain")
    red = {}
    for view in ("front", "back", "left"):
        img = R.render_identity_image(ident, camera, np.random.default_rng(3), views=(view,), box="query")
        b, g, r = (img[20:70, 16:48, i].astype(int) for i in range(3))  # the chest (clutter can be red)
        red[view] = int(((r > 150) & (g < 60) & (b < 60)).sum())
    assert red["front"] > 10 and red["back"] == 0 and red["left"] == 0, red


def test_render_sizes_and_bad_box():
    camera = A.camera_style(0, 1)
    img = R.render_identity_image(A.identity_attributes(0, 2), camera, np.random.default_rng(0), (160, 60))
    assert img.shape == (160, 60, 3) and img.dtype == np.uint8
    empty = R.render_identity_image(None, camera, np.random.default_rng(0), box="distractor")
    assert empty.shape == (128, 64, 3)
    with pytest.raises(ValueError, match="box must be"):
        R.render_identity_image(None, camera, np.random.default_rng(0), box="crop")


def _hist(img):
    h = cv2.calcHist([np.ascontiguousarray(img)], [0, 1, 2], None, [8, 8, 8], [0, 256] * 3).ravel()
    return h / h.sum()


def test_colour_histogram_alone_is_not_enough_but_above_chance():
    """Nearest neighbour on 8x8x8 colour histograms of the person (centre crop), other cameras only.

    Measured (seed 0, 40 test ids): rank-1 0.556, chance 0.025; on whole images with the Market
    protocol (same camera allowed, only same id + camera removed) it is 0.00: backgrounds dominate.
    """
    plan = S.plan_dataset("market1501", 80, seed=0)
    query = [p for p in plan if p.relpath.startswith("query/")]
    gallery = [p for p in plan if p.relpath.startswith("bounding_box_test/") and p.pid > 0]
    feats = {p.index: _hist(S.render_planned(p, "market1501", 0)[12:120, 18:46]) for p in query + gallery}
    qf, gf = np.array([feats[p.index] for p in query]), np.array([feats[p.index] for p in gallery])
    dist = np.abs(qf[:, None] - gf[None]).sum(-1)
    qc, gc = np.array([p.cam for p in query]), np.array([p.cam for p in gallery])
    dist[qc[:, None] == gc[None]] = np.inf
    gp = np.array([p.pid for p in gallery])
    rank1 = float(np.mean(gp[dist.argmin(1)] == np.array([p.pid for p in query])))
    chance = 1 / len({p.pid for p in query})
    print(f"colour-histogram rank-1 {rank1:.3f} (chance {chance:.3f})")
    assert 5 * chance < rank1 < 0.75


def test_existing_target_and_bad_arguments(tmp_path):
    out = str(tmp_path)
    S.write_dataset("cuhk01", out, num_ids=3)
    with pytest.raises(FileExistsError, match="overwrite"):
        S.write_dataset("cuhk01", out, num_ids=3)
    S.write_dataset("cuhk01", out, num_ids=4, overwrite=True)
    assert len(os.listdir(os.path.join(out, "CUHK01", "campus"))) == 16
    os.makedirs(os.path.join(out, "DukeMTMC-reID", "query"))  # e.g. a real copy: never deleted
    with pytest.raises(FileExistsError, match="not written by the synthetic generator"):
        S.write_dataset("dukemtmc", out, num_ids=4, overwrite=True)
    for kwargs, message in [(dict(layout="viper"), "layout must be one of"),
                            (dict(layout="cuhk01", num_cams=3), "exactly 2 cameras"),
                            (dict(layout="market1501", num_cams=10), "num_cams must be 2..9"),
                            (dict(layout="market1501", images_per_id_cam=(0, 2)), "images_per_id_cam"),
                            (dict(layout="market1501", num_ids=1), "num_ids must be"),
                            (dict(layout="market1501", seed=-1), "seed must be a non-negative int")]:
        with pytest.raises(ValueError, match=message):
            S.write_dataset(out=out, **kwargs)


def test_ensure_synthetic_reuses_rewrites_and_cleans_up(tmp_path, monkeypatch):
    data = str(tmp_path)
    root = S.ensure_synthetic(data, "market1501", num_ids=4)
    assert root == os.path.join(data, "synthetic", "market1501", "Market-1501-v15.09.15")
    stamp = os.stat(os.path.join(root, "SYNTHETIC.json")).st_mtime_ns
    assert S.ensure_synthetic(data, "market1501", num_ids=4) == root
    assert os.stat(os.path.join(root, "SYNTHETIC.json")).st_mtime_ns == stamp  # reused
    S.ensure_synthetic(data, "market1501", num_ids=6)
    assert json.load(open(os.path.join(root, "SYNTHETIC.json")))["num_ids"] == 6
    query_ids = {n[:4] for n in os.listdir(os.path.join(root, "query"))}
    assert len(query_ids) == 3
    # A write killed half-way leaves neither a dataset under the real name nor its temp folder.
    calls = []

    def dying(args):
        calls.append(args)
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "_render_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        S.ensure_synthetic(data, "dukemtmc", num_ids=4)
    assert calls and os.listdir(os.path.join(data, "synthetic", "dukemtmc")) == []
    # A temp folder of a dead writer (pid that cannot exist) is removed by the next write.
    monkeypatch.undo()
    stale = os.path.join(data, "synthetic", "dukemtmc", ".DukeMTMC-reID.partial-999999999-1")
    os.makedirs(stale)
    S.ensure_synthetic(data, "dukemtmc", num_ids=4)
    assert sorted(os.listdir(os.path.join(data, "synthetic", "dukemtmc"))) == ["DukeMTMC-reID"]


def test_contact_sheet(tmp_path):
    path = str(tmp_path / "sheet.png")
    sheet = S.contact_sheet(path, pids=(1, 2), num_cams=3, per_cam=1)
    assert sheet.shape == (18 + 2 * 130, 150 + 3 * 66, 3)
    assert cv2.imread(path).shape == sheet.shape
