"""Scene streams (data/scene_pipeline.py): the resize rule, boxes that move with resized and mirrored
pixels, padding that can never be matched, (seed, epoch, step) addressing and resume, damaged scenes,
evaluation and query streams that map back to original pixels. Checked against numpy."""
import os

import cv2
import numpy as np
import pytest
import tensorflow as tf

from reid_keras.data import scene_pipeline as sp
from reid_keras.data.datasets.scenes import UNLABELED, SearchDataset, SearchQuery, make_scene
from reid_keras.data.decoding import drop_damaged
from reid_keras.data.preprocessing import CAFFE_MEAN_BGR
from reid_keras.data.samplers import ShuffledBatchSampler

# (height, width), boxes x1y1x2y2 (even numbers: exact at scale 0.5), pids. Scene 3's last box
# reaches past the right edge (x2 = 200 > 192) and is clipped to the image.
SCENES = [
    ((128, 192), [], []),
    ((192, 128), [[10, 20, 50, 120]], [0]),
    ((128, 192), [[4, 8, 40, 100], [60, 10, 100, 126]], [1, UNLABELED]),
    ((128, 192), [[20, 6, 60, 90], [80, 30, 110, 110], [150, 10, 200, 60]], [2, 0, UNLABELED]),
]
MIN_SIDE, MAX_SIDE = 64, 256  # every scene above: scale 0.5
MAX_BOXES = 4


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """The scenes as PNG files, plus their RGB pixels for the numpy references."""
    folder = tmp_path_factory.mktemp("scenes")
    rng = np.random.default_rng(0)
    records, pixels = [], []
    for i, ((h, w), boxes, pids) in enumerate(SCENES):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = os.path.join(folder, f"s{i}.png")
        cv2.imwrite(path, rgb[..., ::-1])
        records.append(make_scene(path, boxes, pids))
        pixels.append(rgb)
    return records, pixels


def caffe(rgb):
    return rgb[..., ::-1].astype(np.float32) - np.array(CAFFE_MEAN_BGR, np.float32)


def half_size(rgb):
    """Bilinear resize by exactly 0.5 (half-pixel centres) = the mean of each 2x2 block."""
    h, w = rgb.shape[:2]
    return rgb.astype(np.float64).reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))


def numpy_boxes(scene, scale, size):
    """Reference boxes in the resized frame: scaled, clipped to the image."""
    h, w = size
    return np.clip(scene.boxes * np.float32(scale), 0, np.array([w, h, w, h], np.float32))


def as_numpy(ds):
    return [{k: v.numpy() for k, v in batch.items()} for batch in ds]


@pytest.fixture(scope="module")
def train_stream(scenes):
    """One training stream (2 epochs + the spare one), materialised twice from the same object."""
    records, _ = scenes
    ds = sp.scene_train_dataset(records, MIN_SIDE, MAX_SIDE, batch_size=2, max_boxes=MAX_BOXES, seed=7, epochs=2)
    return ds, as_numpy(ds), as_numpy(ds)


def test_resize_scale_rule_and_errors():
    assert sp.resize_scale(128, 192, 64, 256) == 0.5
    assert sp.resize_scale(400, 600, 900, 1500) == 900 / 400  # short side -> 900, long 1350 <= 1500
    assert sp.resize_scale(100, 1000, 900, 1500) == 1500 / 1000  # short side would give 9000 px
    assert sp.resize_scale(1000, 100, 900, 1500) == 1.5  # orientation does not matter
    assert sp.resized_shape(100, 1000, 900, 1500) == (150, 1500, 1.5)
    # 161 * (400 / 161) is 399.99999999999994 in float64: the side is rounded, not floored
    assert 161 * sp.resize_scale(161, 250, 400, 1000) < 400
    assert sp.resized_shape(161, 250, 400, 1000)[:2] == (400, 621)
    assert sp.PAPER_SIDES == (900, 1500)
    with pytest.raises(ValueError, match=r"min_side must be a positive int .* got 0"):
        sp.resize_scale(10, 10, 0, 100)
    with pytest.raises(ValueError, match=r"max_side must be an int >= min_side=600 .* got 500"):
        sp.resize_scale(10, 10, 600, 500)
    with pytest.raises(ValueError, match=r"height and width must be >= 1 pixel, got 0 x 10"):
        sp.resize_scale(0, 10, 600, 1000)


def test_train_batches_resize_boxes_pixels_and_padding_against_numpy(scenes, train_stream):
    records, pixels = scenes
    _, batches, _ = train_stream
    assert len(batches) == 3 * 2  # epochs 0, 1 and the spare epoch 2; 4 scenes / batch 2
    flips = []
    for b in batches:
        assert b["images"].shape[0] == 2 and b["boxes"].shape == (2, MAX_BOXES, 4)
        # the canvas: the batch's largest resized scene, rounded up to a multiple of 32
        want_hw = [-(-m // 32) * 32 for m in b["image_shape"].max(axis=0)]
        assert list(b["images"].shape[1:3]) == want_hw
        for j, i in enumerate(b["index"]):
            scene, (h, w) = records[i], SCENES[i][0]
            nh, nw, scale = sp.resized_shape(h, w, MIN_SIDE, MAX_SIDE)
            assert tuple(b["image_shape"][j]) == (nh, nw) and b["scale"][j] == np.float32(scale)
            ref = caffe(half_size(pixels[i]))
            ref_boxes = numpy_boxes(scene, scale, (nh, nw))
            if b["flipped"][j]:  # numpy mirror of image and boxes
                ref = ref[:, ::-1]
                ref_boxes = np.stack([nw - ref_boxes[:, 2], ref_boxes[:, 1], nw - ref_boxes[:, 0], ref_boxes[:, 3]], 1)
            np.testing.assert_allclose(b["images"][j, :nh, :nw], ref, atol=1e-3)
            assert not b["images"][j, nh:].any() and not b["images"][j, :, nw:].any()  # zero padding
            n = len(scene.pids)
            np.testing.assert_allclose(b["boxes"][j, :n], ref_boxes, atol=1e-5)
            np.testing.assert_array_equal(b["pids"][j, :n], scene.pids)
            np.testing.assert_array_equal(b["box_mask"][j], np.arange(MAX_BOXES) < n)
            # padding rows: all-zero boxes, masked, and a pid no person has
            assert not b["boxes"][j, n:].any()
            assert np.all(b["pids"][j, n:] == sp.PADDING) and sp.PADDING not in (UNLABELED, *range(MAX_BOXES))
            flips.append(bool(b["flipped"][j]))
    assert any(flips) and not all(flips)
    # clipping: scene 3's third box (x2 = 200 px in a 192-px image) ends at the resized width
    assert numpy_boxes(records[3], 0.5, (64, 96))[2, 2] == 96


def test_flip_moves_each_box_with_its_pixels(scenes, train_stream):
    records, pixels = scenes
    _, batches, _ = train_stream
    checked = 0
    for b in batches:
        for j, i in enumerate(b["index"]):
            if not b["flipped"][j]:
                continue
            unflipped = caffe(half_size(pixels[i]))
            for k, box in enumerate(numpy_boxes(records[i], 0.5, b["image_shape"][j])):
                x1, y1, x2, y2 = b["boxes"][j, k].astype(int)
                ox1, oy1, ox2, oy2 = box.astype(int)
                np.testing.assert_allclose(b["images"][j, y1:y2, x1:x2], unflipped[oy1:oy2, ox1:ox2][:, ::-1],
                                           atol=1e-3)
                checked += 1
    assert checked >= 2


def test_same_seed_same_batches_and_resume_equals_the_tail(scenes, train_stream):
    records, _ = scenes
    _, first, second = train_stream
    for a, b in zip(first, second, strict=True):  # iterating the same stream again: identical
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # every epoch is one pass over the scenes, in the seeded sampler's order
    order = ShuffledBatchSampler(len(records), 2)
    for e in range(3):
        np.testing.assert_array_equal(np.stack([b["index"] for b in first[2 * e:2 * e + 2]]),
                                      order.epoch(e, 2, seed=7))
    assert sorted(np.concatenate([b["index"] for b in first[:2]])) == [0, 1, 2, 3]
    resumed = as_numpy(sp.scene_train_dataset(records, MIN_SIDE, MAX_SIDE, batch_size=2, max_boxes=MAX_BOXES,
                                              seed=7, epochs=2, initial_epoch=1, initial_step=1))
    assert len(resumed) == len(first) - 3
    for a, b in zip(first[3:], resumed, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_fixed_canvas_gives_static_shapes_and_a_too_small_one_names_the_scene(scenes):
    records, _ = scenes
    # scale 0.625 (long side 192 -> 120): 80 x 120 and 120 x 80 scenes
    ds = sp.scene_train_dataset(records, 100, 120, batch_size=2, max_boxes=MAX_BOXES, pad_to=(120, 120), flip=False)
    assert ds.element_spec["images"].shape == (2, 120, 120, 3)
    assert ds.element_spec["boxes"].shape == (2, MAX_BOXES, 4)
    batch = next(iter(ds))
    for j, i in enumerate(batch["index"].numpy()):
        (h, w) = SCENES[i][0]
        nh, nw, scale = sp.resized_shape(h, w, 100, 120)
        assert scale == 0.625 and tuple(batch["image_shape"][j].numpy()) == (nh, nw)
        n = len(records[i].pids)
        np.testing.assert_allclose(batch["boxes"][j, :n].numpy(), numpy_boxes(records[i], scale, (nh, nw)), atol=1e-5)
        assert not batch["images"][j, nh:].numpy().any() and not batch["images"][j, :, nw:].numpy().any()
    small = sp.scene_eval_dataset(records, 100, 120, pad_to=(100, 100))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?s)pad_to.*smaller than the resized scene.*s0\.png"):
        next(iter(small))


def test_stream_rounds_sides_like_resized_shape(tmp_path):
    path = str(tmp_path / "odd.png")
    cv2.imwrite(path, np.full((161, 250, 3), 90, np.uint8))
    batch = next(iter(sp.scene_eval_dataset([make_scene(path, [[0, 0, 161, 161]], [0])], 400, 1000)))
    assert tuple(batch["image_shape"][0].numpy()) == sp.resized_shape(161, 250, 400, 1000)[:2] == (400, 621)
    assert batch["images"].shape == (1, 416, 640, 3)  # rounded up to multiples of 32
    np.testing.assert_allclose(batch["boxes"][0, 0].numpy(), [0, 0, 400, 400], atol=1e-3)


def test_bad_scenes_are_refused_before_any_graph_is_built(scenes):
    records, _ = scenes
    crowded = make_scene(records[0].path, [[0, 0, 10, 10]] * 5, [UNLABELED] * 5)
    with pytest.raises(ValueError, match=rf"scene {records[0].path} has 5 people but max_boxes=4 \(1 scene"):
        sp.scene_train_dataset(records + [crowded], MIN_SIDE, MAX_SIDE, batch_size=2, max_boxes=4)
    raw_prw = make_scene(records[0].path, [[0, 0, 10, 10]], [-2])
    with pytest.raises(ValueError, match=r"person id -2 is not a label \(>= 0\) nor UNLABELED \(-1\)"):
        sp.scene_eval_dataset([raw_prw], MIN_SIDE, MAX_SIDE)
    with pytest.raises(ValueError, match="scenes is empty"):
        sp.scene_train_dataset([], MIN_SIDE, MAX_SIDE, batch_size=2, max_boxes=4)
    with pytest.raises(ValueError, match="max_boxes must be a positive int, got 0"):
        sp.scene_train_dataset(records, MIN_SIDE, MAX_SIDE, batch_size=2, max_boxes=0)
    with pytest.raises(ValueError, match=r"batch_size must be an int in \[1, 4\] \(the number of scenes\), got 5"):
        sp.scene_train_dataset(records, MIN_SIDE, MAX_SIDE, batch_size=5, max_boxes=4)
    with pytest.raises(ValueError, match="max_side must be an int >= min_side=64"):
        sp.scene_train_dataset(records, MIN_SIDE, 32, batch_size=2, max_boxes=4)


def test_damaged_scene_is_counted_by_drop_damaged_and_never_ends_the_stream(scenes, tmp_path):
    records, pixels = scenes
    path = str(tmp_path / "truncated.jpg")
    cv2.imwrite(path, pixels[0][..., ::-1])
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    damaged = make_scene(path, [[0, 0, 20, 40]], [3])
    all_scenes = records + [damaged]
    dataset = SearchDataset(name="tiny", root=str(tmp_path.parent), train=all_scenes, gallery=[], queries=[])
    cleaned, report = drop_damaged(dataset)
    assert report.total == 1 and report.examples and path in next(iter(report.examples.values()))
    assert cleaned.skipped.total == 1 and [s.path for s in cleaned.train] == [s.path for s in records]
    # unchecked, the damaged scene is dropped in the graph and its whole batch with it
    seed = 1
    order = np.concatenate([ShuffledBatchSampler(5, 2).epoch(e, 2, seed) for e in range(2)])
    hit = np.any(order == 4, axis=1)
    assert hit.any() and not hit.all()  # this seed puts the damaged scene in some batches only
    got = as_numpy(sp.scene_train_dataset(all_scenes, MIN_SIDE, MAX_SIDE, batch_size=2, max_boxes=MAX_BOXES,
                                          seed=seed, epochs=1))
    np.testing.assert_array_equal(np.stack([b["index"] for b in got]), order[~hit])


def test_eval_stream_keeps_order_and_maps_boxes_back_to_original_pixels(scenes):
    records, pixels = scenes
    batches = as_numpy(sp.scene_eval_dataset(records, MIN_SIDE, MAX_SIDE, batch_size=3))
    assert [list(b["index"]) for b in batches] == [[0, 1, 2], [3]]  # the last batch is kept
    assert "flipped" not in batches[0]
    assert batches[0]["boxes"].shape == (3, 2, 4) and batches[1]["boxes"].shape == (1, 3, 4)  # per-batch M
    for b in batches:
        original = sp.to_original_pixels(b["boxes"], b["scale"])
        for j, i in enumerate(b["index"]):
            (h, w), n = SCENES[i][0], len(records[i].pids)
            want = np.clip(records[i].boxes, 0, [w, h, w, h])
            np.testing.assert_allclose(original[j, :n], want, atol=1e-4)
            assert np.all(b["pids"][j, n:] == sp.PADDING) and not b["box_mask"][j, n:].any()
            assert b["box_mask"][j, :n].all()
            nh, nw = b["image_shape"][j]
            np.testing.assert_allclose(b["images"][j, :nh, :nw], caffe(half_size(pixels[i])), atol=1e-3)


def test_query_stream_gives_each_query_box_in_query_order(scenes):
    records, pixels = scenes
    queries = [SearchQuery(scene=records[3].name, box=records[3].boxes[1], pid=5, index=0),
               SearchQuery(scene=records[1].name, box=records[1].boxes[0], pid=6, index=1),
               SearchQuery(scene=records[3].name, box=records[3].boxes[0], pid=7, index=2)]
    dataset = SearchDataset(name="tiny", root="", train=[], gallery=records, queries=queries)
    batches = as_numpy(sp.query_dataset(dataset, MIN_SIDE, MAX_SIDE, batch_size=2))
    assert [list(b["index"]) for b in batches] == [[0, 1], [2]]
    for b in batches:
        for j, q in enumerate(b["index"]):
            query = queries[q]
            np.testing.assert_allclose(b["query_box"][j], query.box * 0.5, atol=1e-5)
            np.testing.assert_allclose(sp.to_original_pixels(b["query_box"], b["scale"])[j], query.box, atol=1e-4)
            i = [r.name for r in records].index(query.scene)
            nh, nw = b["image_shape"][j]
            np.testing.assert_allclose(b["images"][j, :nh, :nw], caffe(half_size(pixels[i])), atol=1e-3)
    lost = SearchDataset(name="tiny", root="", train=[], gallery=records[:3], queries=queries)
    with pytest.raises(ValueError, match=r"tiny: query 0 \(pid 5\) is in scene 's3.png', which is not a gallery"):
        sp.query_dataset(lost, MIN_SIDE, MAX_SIDE)
