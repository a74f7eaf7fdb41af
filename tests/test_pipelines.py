"""tf.data streams: decoding odd files, normalisation, corrupt-file skipping, pair / PK wiring, augmentation."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from reid_keras.training.distribute import mirrored_strategy
from PIL import Image

from reid_keras.data.augment import AugmentConfig, augment_image
from reid_keras.data.pipelines import (decode_image, image_dataset, pair_dataset, pk_dataset, preprocessing_for,
                                       validate_records)
from reid_keras.data.datasets.base import ImageRecord
from reid_keras.data.samplers import PairRatioSchedule
from tests.fixtures.tiny_images import decode_record_index, write_odd_files, write_reid_set

SIZE = (16, 8)
# 8 two-camera ids, one single-camera id (8), one single-image id (9).
LAYOUT = [(pid, cam, 2) for pid in range(8) for cam in (0, 1)] + [(8, 0, 3), (9, 1, 1)]


@pytest.fixture(scope="module")
def odd(tmp_path_factory):
    return write_odd_files(tmp_path_factory.mktemp("odd"))


@pytest.fixture(scope="module")
def reid(tmp_path_factory):
    return write_reid_set(tmp_path_factory.mktemp("reid"), LAYOUT, size=SIZE)


def decode(path):
    return decode_image(tf.io.read_file(str(path)), str(path)).numpy()


@pytest.mark.parametrize("name", ["rgb_png", "gray_png", "rgba_png", "gray16_png", "rgb16_png", "one_by_one"])
def test_decode_matches_independent_reference(odd, name):
    got = decode(odd[name])
    want = odd["expected"][name]
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_tensorflow_uint8_path_truncates_16_bit_pngs(odd):
    # Why decode_image goes through uint16 for PNGs: TF's uint8 output is v >> 8, not v / 257.
    raw = tf.io.decode_image(tf.io.read_file(odd["gray16_png"]), channels=3, expand_animations=False).numpy()
    np.testing.assert_array_equal(raw[..., 0], [[0, 0, 1, 1], [127, 128, 255, 255]])
    ours = decode(odd["gray16_png"])[..., 0]
    want = np.array([[0, 255, 256, 257], [32767, 32768, 65280, 65535]]) / 257
    np.testing.assert_allclose(ours, want, atol=1e-4)


def test_decode_jpeg_agrees_with_pil(odd):
    got = decode(odd["rgb_jpg"])
    pil = np.asarray(Image.open(odd["rgb_jpg"]).convert("RGB"), np.float32)
    assert got.shape == pil.shape
    assert np.abs(got - pil).mean() < 1.5  # different IDCTs, same image


@pytest.mark.parametrize("name", ["zero_bytes", "text_file"])
def test_decode_error_names_the_file(odd, name):
    with pytest.raises(tf.errors.InvalidArgumentError, match="not a decodable image") as err:
        decode(odd[name])
    assert odd[name] in str(err.value)


def test_one_by_one_image_resizes_to_a_constant(odd):
    images, = list(image_dataset([ImageRecord(odd["one_by_one"], 0, 0)], SIZE, 4, preprocess="none",
                                 with_labels=False))
    assert images.shape == (1, *SIZE, 3)
    np.testing.assert_allclose(images.numpy().reshape(-1, 3), np.tile([200, 100, 50], (SIZE[0] * SIZE[1], 1)),
                               atol=1e-3)


@pytest.mark.parametrize("name", ["resnet50", "vgg16"])
def test_caffe_preprocessing_matches_keras_applications(name):
    x = np.random.default_rng(0).uniform(0, 255, (2, 5, 4, 3)).astype(np.float32)
    reference = {"resnet50": keras.applications.resnet50, "vgg16": keras.applications.vgg16}[name]
    want = reference.preprocess_input(x.copy())
    prep = preprocessing_for(name)
    got = prep(tf.constant(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    lo, hi = prep.value_range
    assert lo <= want.min() and want.max() <= hi


def test_other_preprocessing_modes():
    x = tf.constant([[[0.0, 127.5, 255.0]]])
    np.testing.assert_allclose(preprocessing_for("efficientnet")(x), x)
    np.testing.assert_allclose(preprocessing_for("EfficientNetB3")(x), x)
    np.testing.assert_allclose(preprocessing_for("none")(x), x)
    np.testing.assert_allclose(preprocessing_for("unit")(x), [[[0.0, 0.5, 1.0]]])
    with pytest.raises(ValueError, match="unknown preprocessing 'mobilenet'"):
        preprocessing_for("mobilenet")


def test_image_stream_order_labels_and_meta(reid):
    batches = list(image_dataset(reid, SIZE, 7, preprocess="none", with_meta=True))
    assert [b[0].shape[0] for b in batches] == [7] * 5 + [1]  # 36 images
    images = np.concatenate([b[0].numpy() for b in batches])
    assert [decode_record_index(x) for x in images] == list(range(len(reid)))
    meta = {k: np.concatenate([b[1][k].numpy() for b in batches]) for k in ("pid", "camid", "index")}
    np.testing.assert_array_equal(meta["pid"], [r.pid for r in reid])
    np.testing.assert_array_equal(meta["camid"], [r.camid for r in reid])
    np.testing.assert_array_equal(meta["index"], np.arange(len(reid)))
    x, y = next(iter(image_dataset(reid, SIZE, 5, preprocess="none", drop_remainder=True)))
    np.testing.assert_array_equal(y, [r.pid for r in reid[:5]])


def test_shuffle_is_seeded_and_reshuffles_each_epoch(reid):
    def orders(seed):
        ds = image_dataset(reid, SIZE, 64, preprocess="none", shuffle=True, seed=seed)
        return [[decode_record_index(x) for x in next(iter(ds))[0].numpy()] for _ in range(2)]

    first, again, other = orders(1), orders(1), orders(2)
    assert first == again and first != other
    assert first[0] != first[1] and sorted(first[0]) == list(range(len(reid)))


def test_corrupt_files_are_skipped_without_ending_the_epoch(reid, odd):
    bad = [odd[k] for k in ("truncated_jpg", "corrupt_jpg", "zero_bytes", "text_file")]
    records = []
    for i, r in enumerate(reid[:8]):
        records.append(r)
        if i % 2 == 1:
            records.append(ImageRecord(bad[i // 2], r.pid, r.camid))
    got = []
    for images, meta in image_dataset(records, SIZE, 3, preprocess="none", with_meta=True):
        got += list(meta["index"].numpy())
    assert got == [i for i, r in enumerate(records) if r.path not in bad]
    good, report = validate_records(records + [ImageRecord("/no/such/file.png", 0, 0)])
    assert good == reid[:8]
    assert report.total == 5 and report.counts == {
        "missing file": 1, "empty file (0 bytes)": 1,
        "not decodable (truncated, corrupt or not an image)": 3}
    # Pairs touching a bad file are dropped; the stream still delivers full batches.
    ds = pair_dataset(records, SIZE, 4, pairs_per_epoch=40, preprocess="none", epochs=2)
    assert sum(1 for _ in ds) >= 10


def pair_indices(ds, steps):
    """Decode (a, b, same) record indices from a pair stream built with preprocess='none'."""
    a, b, same = [], [], []
    for (xa, xb), label in ds.take(steps):
        a += [decode_record_index(x) for x in xa.numpy()]
        b += [decode_record_index(x) for x in xb.numpy()]
        same += list(label.numpy())
    return np.array(a), np.array(b), np.array(same)


def test_pair_stream_follows_schedule_cameras_and_resume(reid):
    schedule = PairRatioSchedule(start=1.0, factor=2.0, maximum=4.0)  # 1, 2, 4 negatives per positive
    ds = pair_dataset(reid, SIZE, 6, pairs_per_epoch=60, schedule=schedule, preprocess="none", epochs=3, seed=3)
    a, b, same = pair_indices(ds, 30)
    pids = np.array([r.pid for r in reid])
    cams = np.array([r.camid for r in reid])
    np.testing.assert_array_equal(same, pids[a] == pids[b])
    assert np.all(a != b)
    pos = same == 1
    two_cam = pids[a] < 8
    assert np.all(cams[a][pos & two_cam] != cams[b][pos & two_cam])
    assert [int(same[e * 60:(e + 1) * 60].sum()) for e in range(3)] == [30, 20, 12]
    resumed = pair_dataset(reid, SIZE, 6, pairs_per_epoch=60, schedule=schedule, preprocess="none", epochs=3,
                           seed=3, initial_epoch=1)
    ra, rb, rsame = pair_indices(resumed, 20)
    np.testing.assert_array_equal(ra, a[60:])
    np.testing.assert_array_equal(rsame, same[60:])


def test_pair_stream_uses_only_given_records(reid):
    train = [r for r in reid if r.pid < 5]
    ds = pair_dataset(train, SIZE, 8, pairs_per_epoch=80, preprocess="none", with_ids=True)
    seen_pids = set()
    for (xa, xb), labels in ds.take(10):
        idx = [decode_record_index(x) for x in np.concatenate([xa.numpy(), xb.numpy()])]
        seen_pids |= {reid[i].pid for i in idx}
        np.testing.assert_array_equal(labels["pid_a"], [reid[decode_record_index(x)].pid for x in xa.numpy()])
        np.testing.assert_array_equal(labels["same"], labels["pid_a"].numpy() == labels["pid_b"].numpy())
    assert seen_pids == {0, 1, 2, 3, 4}


def test_pk_stream_batches(reid):
    ds = pk_dataset(reid, P=3, K=3, image_size=SIZE, preprocess="none", epochs=2, batches_per_epoch=4, seed=1)
    batches = list(ds)
    assert len(batches) == 12  # 2 epochs + 1 spare
    pid_by_index = np.array([r.pid for r in reid])
    for images, pids in batches:
        assert images.shape == (9, *SIZE, 3)
        groups = pids.numpy().reshape(3, 3)
        assert np.all(groups == groups[:, :1]) and len(set(groups[:, 0])) == 3
        np.testing.assert_array_equal(pid_by_index[[decode_record_index(x) for x in images.numpy()]], pids)
    again = [p.numpy() for _, p in pk_dataset(reid, 3, 3, SIZE, preprocess="none", epochs=2, batches_per_epoch=4,
                                                seed=1)]
    np.testing.assert_array_equal(again, [p.numpy() for _, p in batches])


@pytest.mark.parametrize("config", [AugmentConfig.efficientnet_paper(), AugmentConfig.strong(),
                                    AugmentConfig.idver_paper(crop=(20, 12)),
                                    AugmentConfig(zoom=0.3, height_shift=0.3, fill_mode="reflect")])
@pytest.mark.parametrize("preprocess", ["efficientnet", "resnet50"])
def test_augmented_streams_keep_shape_and_range(reid, odd, config, preprocess):
    records = reid[:6] + [ImageRecord(odd[k], 0, 0) for k in ("rgb_png", "rgb16_png", "one_by_one", "rgb_jpg")]
    x, _ = next(iter(image_dataset(records, SIZE, 10, preprocess=preprocess, augment=config, shuffle=True)))
    lo, hi = preprocessing_for(preprocess).value_range
    assert x.shape == (10, *SIZE, 3) and x.dtype == tf.float32
    assert lo - 1e-3 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= hi + 1e-3


def test_augmentation_is_deterministic_by_seed(reid):
    def first_batch(seed):
        ds = image_dataset(reid, SIZE, 8, preprocess="none", augment=AugmentConfig.strong(), seed=seed)
        it = iter(ds)
        return next(it)[0].numpy(), next(iter(ds))[0].numpy()

    (a1, a2), (b1, _), (c1, _) = first_batch(5), first_batch(5), first_batch(6)
    np.testing.assert_array_equal(a1, b1)
    assert not np.array_equal(a1, c1)
    assert not np.array_equal(a1, a2), "a new iteration (epoch) draws new augmentations"


def gradient_image(h=16, w=8):
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    return tf.constant(np.stack([x * 30, y * 15, x * y], -1))


def test_flip_is_a_mirror_or_identity():
    image = gradient_image()
    outs = [augment_image(image, tf.constant([0, s]), AugmentConfig(flip=True), SIZE).numpy() for s in range(12)]
    flipped = [np.array_equal(o, image.numpy()[:, ::-1]) for o in outs]
    same = [np.array_equal(o, image.numpy()) for o in outs]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)


def test_random_crop_is_a_window_of_the_resized_image():
    image = gradient_image(20, 12)
    out = augment_image(image, tf.constant([1, 2]), AugmentConfig(crop=(20, 12)), SIZE).numpy()
    windows = [(t, l) for t in range(5) for l in range(5)
               if np.array_equal(out, image.numpy()[t:t + 16, l:l + 8])]
    assert len(windows) == 1
    with pytest.raises(ValueError, match="smaller than image_size"):
        AugmentConfig(crop=(10, 8)).decode_size(SIZE)


def test_random_erasing_replaces_one_rectangle():
    image = tf.fill([32, 16, 3], -1.0)  # a value the uniform 0..255 fill never produces
    config = AugmentConfig(erasing_prob=1.0)
    for s in range(5):
        out = augment_image(image, tf.constant([3, s]), config, (32, 16)).numpy()
        erased = np.any(out != -1.0, axis=-1)
        rows, cols = np.flatnonzero(erased.any(1)), np.flatnonzero(erased.any(0))
        assert erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        assert 0.02 * 512 * 0.7 <= erased.sum() <= 0.4 * 512 * 1.3
        assert out[erased].min() >= 0.0 and out[erased].max() <= 255.0
    untouched = augment_image(image, tf.constant([3, 0]), AugmentConfig(erasing_prob=0.0, flip=True), (32, 16))
    assert np.all(untouched.numpy() == -1.0)


def test_ten_erasing_attempts_almost_always_find_a_box():
    # Independent Monte-Carlo of Zhong et al.'s box draw: how often do 10 attempts all miss?
    rng = np.random.default_rng(0)
    h, w = 160, 80
    area = rng.uniform(0.02, 0.4, (50_000, 10)) * h * w
    aspect = rng.uniform(0.3, 1 / 0.3, (50_000, 10))
    fits = (np.round(np.sqrt(area * aspect)) < h) & (np.round(np.sqrt(area / aspect)) < w)
    assert (~fits.any(1)).mean() < 1e-4


def test_augment_config_validation():
    with pytest.raises(ValueError, match="zoom"):
        AugmentConfig(zoom=1.5)
    with pytest.raises(ValueError, match="crop"):
        AugmentConfig(crop=(0, 5))
    with pytest.raises(ValueError, match="fill_mode"):
        AugmentConfig(fill_mode="mirror")
    with pytest.raises(TypeError, match="AugmentConfig"):
        image_dataset([ImageRecord("x.png", 0, 0)], SIZE, 2, augment={"flip": True})
    with pytest.raises(ValueError, match="records is empty"):
        image_dataset([], SIZE, 2)
    with pytest.raises(ValueError, match="less than one batch"):
        pair_dataset([ImageRecord("a.png", 0, 0), ImageRecord("b.png", 1, 0)], SIZE, 8, pairs_per_epoch=4)


def test_pk_batch_with_a_bad_file_is_dropped_whole(reid, odd):
    records = reid[:16] + [ImageRecord(odd["text_file"], 0, 0)]
    batches = list(pk_dataset(records, P=2, K=2, image_size=SIZE, preprocess="none", batches_per_epoch=10))
    assert 0 < len(batches) < 20  # some of the 20 (1 epoch + 1 spare) batches held the text file
    for images, pids in batches:
        assert images.shape == (4, *SIZE, 3)
        assert pids[0] == pids[1] and pids[2] == pids[3] and pids[0] != pids[2]


class PositiveCount(keras.metrics.Metric):
    """Sums y_true over an epoch: the number of positive pairs fit() consumed."""

    def __init__(self, **kwargs):
        super().__init__(name="positives", **kwargs)
        self.total = self.add_variable(shape=(), initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.total.assign_add(keras.ops.sum(keras.ops.cast(y_true, "float32")))

    def result(self):
        return self.total


def test_keras_fit_sees_the_schedule_epoch_by_epoch(reid):
    # The documented contract: with steps_per_epoch, fit's epoch e consumes the sampler's epoch e.
    schedule = PairRatioSchedule(start=1.0, factor=2.0, maximum=4.0)
    ds = pair_dataset(reid, SIZE, 6, pairs_per_epoch=60, schedule=schedule, preprocess="unit", epochs=4,
                      initial_epoch=1)
    a, b = keras.Input((*SIZE, 3)), keras.Input((*SIZE, 3))
    out = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(keras.layers.Subtract()([a, b])))
    model = keras.Model([a, b], out)
    model.compile("sgd", "sparse_categorical_crossentropy", metrics=[PositiveCount()])
    history = model.fit(ds, epochs=4, initial_epoch=1, steps_per_epoch=10, shuffle=False, verbose=0)
    assert history.history["positives"] == [20.0, 12.0, 12.0]  # 1:2, 1:4, 1:4 (capped)


def test_pair_stream_distributes_over_two_devices(reid):
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < 2:
        pytest.skip("needs the two logical CPU devices set up in conftest.py")
    strategy = mirrored_strategy([d.name for d in devices[:2]])
    ds = pair_dataset(reid, SIZE, 8, pairs_per_epoch=16, preprocess="none", augment=AugmentConfig.strong())
    (xa, xb), same = next(iter(strategy.experimental_distribute_dataset(ds)))
    local = strategy.experimental_local_results(same)
    assert len(local) == 2 and sum(int(t.shape[0]) for t in local) == 8
