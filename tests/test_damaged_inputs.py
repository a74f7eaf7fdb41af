"""Damaged image files are counted, named skips everywhere (issue 12, item 1): the strict file check,
the cached bulk check, `drop_damaged`, `data info`, the evaluation library and the evaluate command.

The damaged files are ADDED to a clean tiny Market-1501 tree under names that parse, so a correct
evaluation of the damaged tree equals the evaluation of the clean copy, image for image.
"""
import contextlib
import io
import json
import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf

from reid_keras.data import decoding, imagefiles
from reid_keras.data.datasets import load_dataset
from reid_keras.data.datasets.base import DatasetLayoutError, ImageRecord, SkipReport
from reid_keras.metrics.evaluation import evaluate_model
from reid_keras.metrics.features import NoDecodableImages, extract_features
from reid_keras.metrics.options import EvaluationError, EvaluationOptions
from tests.eval_helpers import IMAGE_SIZE, build_tiny_models, write_market_tree

CORRUPT = decoding.REASON_CORRUPT_JPEG.split("(")[0]  # "corrupt JPEG data "
HIT_MARKER = decoding.REASON_CORRUPT_JPEG.format("premature end of data segment")


# ------------------------------------------------------------------------------ damaged file makers

def _entropy_span(data: bytes) -> tuple:
    """(first, end) byte offsets of a baseline JPEG's entropy-coded data: after SOS, before EOI."""
    sos = data.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big"), len(data) - 2


def corrupt_middle(src: str, dst: str) -> str:
    """32 zero bytes over the middle of the scan: header and FFD9 trailer intact."""
    data = open(src, "rb").read()
    first, end = _entropy_span(data)
    middle = (first + end) // 2
    open(dst, "wb").write(data[:middle] + b"\x00" * 32 + data[middle + 32:])
    return dst


def cut_then_eoi(src: str, dst: str) -> str:
    """Half the scan, then an FFD9 appended (a download cut short and "repaired")."""
    data = open(src, "rb").read()
    first, end = _entropy_span(data)
    open(dst, "wb").write(data[:(first + end) // 2] + b"\xff\xd9")
    return dst


def header_only(src: str, dst: str) -> str:
    """The real header up to the scan, then FFD9: magic and trailer right, no image data."""
    data = open(src, "rb").read()
    open(dst, "wb").write(data[:data.index(b"\xff\xda")] + b"\xff\xd9")
    return dst


def garbage_scan(src: str, dst: str) -> str:
    """The real header, then 0xFF-free bytes instead of the scan, then FFD9."""
    data = open(src, "rb").read()
    first, _ = _entropy_span(data)
    open(dst, "wb").write(data[:first] + bytes(range(1, 200)) * 2 + b"\xff\xd9")
    return dst


def truncated_png(dst: str) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 16, 3), 90, np.uint8)).save(buffer, format="PNG")
    open(dst, "wb").write(buffer.getvalue()[:-20])
    return dst


# ------------------------------------------------------------------------------ the tree

QUERY_DAMAGE = {  # name in query/ -> (maker, expected reason or its start)
    "0001_c3s1_000901_01.jpg": ("corrupt_middle", CORRUPT),
    "0002_c3s1_000902_01.jpg": ("zero", imagefiles.REASON_EMPTY),
    "0003_c3s1_000903_01.jpg": ("truncated", imagefiles.REASON_JPEG_TRUNCATED),
    "0004_c3s1_000904_01.jpg": ("broken_link", imagefiles.REASON_BROKEN_LINK),
}
GALLERY_DAMAGE = {
    "0001_c2s1_000911_01.jpg": ("cut_then_eoi", HIT_MARKER),
    "0002_c2s1_000912_01.jpg": ("text", imagefiles.REASON_NOT_IMAGE),
    "0003_c2s1_000913_01.jpg": ("header_only", decoding.REASON_NOT_DECODABLE),
    "0004_c2s1_000914_01.png": ("truncated_png", imagefiles.REASON_PNG_TRUNCATED),
    "0005_c2s1_000915_01.jpg": ("folder", imagefiles.REASON_FOLDER),
    "0006_c2s1_000916_01.jpg": ("tiff", imagefiles.REASON_NOT_IMAGE),
    "0006_c3s1_000917_01.jpg": ("garbage_scan", CORRUPT),
}
# What the loader's probe finds; the rest only a full decode finds.
PROBE_KINDS = {"zero", "truncated", "broken_link", "text", "truncated_png", "folder", "tiff"}
DECODE_ONLY = sorted(n for n, (k, _) in {**QUERY_DAMAGE, **GALLERY_DAMAGE}.items() if k not in PROBE_KINDS)


def add_damage(folder: str, damage: dict, source: str) -> None:
    for name, (kind, _) in damage.items():
        dst = os.path.join(folder, name)
        if kind == "corrupt_middle":
            corrupt_middle(source, dst)
        elif kind == "cut_then_eoi":
            cut_then_eoi(source, dst)
        elif kind == "header_only":
            header_only(source, dst)
        elif kind == "garbage_scan":
            garbage_scan(source, dst)
        elif kind == "zero":
            open(dst, "wb").close()
        elif kind == "truncated":
            data = open(source, "rb").read()
            open(dst, "wb").write(data[:len(data) // 2])
        elif kind == "broken_link":
            os.symlink(os.path.join(folder, "no_such_target.jpg"), dst)
        elif kind == "text":
            open(dst, "w").write("<html>404 not found</html>\n")
        elif kind == "truncated_png":
            truncated_png(dst)
        elif kind == "folder":
            os.makedirs(dst)
        elif kind == "tiff":
            open(dst, "wb").write(b"II*\x00" + b"\x00" * 100)


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
    base = tmp_path_factory.mktemp("damaged")
    clean = write_market_tree(str(base / "clean" / "Market-1501-v15.09.15"))
    damaged = str(base / "damaged" / "Market-1501-v15.09.15")
    shutil.copytree(clean, damaged)
    source = os.path.join(damaged, "query", sorted(os.listdir(os.path.join(damaged, "query")))[0])
    add_damage(os.path.join(damaged, "query"), QUERY_DAMAGE, source)
    add_damage(os.path.join(damaged, "bounding_box_test"), GALLERY_DAMAGE, source)
    _, siamese = build_tiny_models()
    model = str(base / "model.keras")
    siamese.save(model)
    return {"base": base, "clean": clean, "damaged": damaged, "source": source, "model": model}


@pytest.fixture(autouse=True)
def private_cache(tmp_path_factory, monkeypatch):
    """Verdicts are remembered under $REID_KERAS_CACHE: a folder of this test session, not ~/.cache."""
    monkeypatch.setenv("REID_KERAS_CACHE", str(tmp_path_factory.getbasetemp() / "reid_cache"))


def expected_reason(reason: str, got: str) -> bool:
    return got == reason or (reason == CORRUPT and got.startswith(CORRUPT))


# ------------------------------------------------------------------------------ one file

def test_silent_jpeg_damage_decodes_in_tensorflow_but_is_reported(trees, tmp_path, capfd):
    source = trees["source"]
    original = tf.io.decode_jpeg(open(source, "rb").read()).numpy().astype(int)
    for make in (corrupt_middle, cut_then_eoi):
        path = make(source, str(tmp_path / f"{make.__name__}.jpg"))
        assert imagefiles.probe_image_file(path) is None  # header and trailer look fine
        pixels = tf.io.decode_jpeg(open(path, "rb").read()).numpy().astype(int)  # TF: no error...
        assert pixels.shape == original.shape and np.abs(pixels - original).mean() > 5  # ...wrong pixels
        nameless = capfd.readouterr().err  # ...and libjpeg's warning, which names no file
        assert "Corrupt JPEG data" in nameless and path not in nameless
        reason = decoding.check_image_file(path)
        assert reason.startswith(CORRUPT), reason
        if make is cut_then_eoi:
            assert reason == HIT_MARKER
        # libjpeg's line went to the check, not to the user's stderr; stderr works again afterwards.
        os.write(2, b"after the check\n")
        err = capfd.readouterr().err
        assert "Corrupt JPEG data" not in err and "after the check" in err


def test_check_image_file_reasons(trees, tmp_path):
    folder = str(tmp_path)
    add_damage(folder, {**QUERY_DAMAGE, **GALLERY_DAMAGE}, trees["source"])
    for name, (kind, reason) in {**QUERY_DAMAGE, **GALLERY_DAMAGE}.items():
        got = decoding.check_image_file(os.path.join(folder, name))
        assert expected_reason(reason, got), (kind, got)
    assert decoding.check_image_file(str(tmp_path / "absent.jpg")) == imagefiles.REASON_MISSING
    assert decoding.check_image_file(trees["source"]) is None
    png = str(tmp_path / "fine.png")
    tf.io.write_file(png, tf.io.encode_png(tf.fill([6, 4, 3], tf.constant(7, tf.uint8))))
    assert decoding.check_image_file(png) is None


def test_validate_records_names_libjpeg_damage(trees, tmp_path):
    bad = corrupt_middle(trees["source"], str(tmp_path / "bad.jpg"))
    good, report = decoding.validate_records([ImageRecord(trees["source"], 1, 0), ImageRecord(bad, 1, 1)])
    assert good == [ImageRecord(trees["source"], 1, 0)]
    assert report.total == 1 and list(report.counts)[0].startswith(CORRUPT)
    assert report.examples[list(report.counts)[0]] == [bad]


def test_find_damaged_remembers_verdicts_until_a_file_changes(trees, tmp_path, monkeypatch):
    paths = [shutil.copy(trees["source"], str(tmp_path / f"{i}.jpg")) for i in range(3)]
    corrupt_middle(trees["source"], paths[1])
    cache = str(tmp_path / "cache")
    first = decoding.find_damaged(paths, cache_dir=cache)
    assert list(first) == [paths[1]] and first[paths[1]].startswith(CORRUPT)
    assert len(os.listdir(cache)) == 1

    checked = []
    real = decoding._check_all
    monkeypatch.setattr(decoding, "_check_all", lambda todo, size: checked.append(list(todo)) or real(todo, size))
    assert decoding.find_damaged(paths, cache_dir=cache) == first and checked == []  # nothing decoded again
    cut_then_eoi(trees["source"], paths[2])  # a changed file (other size) is checked again, alone
    again = decoding.find_damaged(paths, cache_dir=cache)
    assert checked == [[paths[2]]] and again == {paths[1]: first[paths[1]], paths[2]: HIT_MARKER}
    assert decoding.find_damaged(paths, use_cache=False) == again


# ------------------------------------------------------------------------------ datasets

def test_loader_counts_probe_damage_and_drop_damaged_the_rest(trees):
    dataset = load_dataset("market1501", trees["damaged"])
    clean = load_dataset("market1501", trees["clean"])
    probe = {n: r for n, (k, r) in {**QUERY_DAMAGE, **GALLERY_DAMAGE}.items() if k in PROBE_KINDS}
    assert dataset.skipped.total == len(probe)
    assert sum(dataset.skipped.counts.values()) == len(probe)
    for reason in set(probe.values()):
        assert dataset.skipped.counts[reason] == sum(r == reason for r in probe.values())
    assert len(dataset.query) == len(clean.query) + 1 and len(dataset.gallery) == len(clean.gallery) + 3

    cleaned, report = decoding.drop_damaged(dataset)
    assert report.total == len(DECODE_ONLY) == 4
    assert report.counts[HIT_MARKER] == 1 and report.counts[decoding.REASON_NOT_DECODABLE] == 1
    assert sum(n for r, n in report.counts.items() if r.startswith(CORRUPT)) == 3
    assert {os.path.basename(p) for paths in report.examples.values() for p in paths} == set(DECODE_ONLY)
    strip = lambda records: sorted((os.path.basename(r.path), r.pid, r.camid) for r in records)  # noqa: E731
    for split in ("train", "query", "gallery"):
        assert strip(getattr(cleaned, split)) == strip(getattr(clean, split)), split
    assert cleaned.train_id_map == clean.train_id_map
    assert cleaned.skipped.total == len(probe) + 4 and dataset.skipped.total == len(probe)  # input unchanged
    assert cleaned.info["damaged images dropped (full decode check)"] == 4
    folders = {os.path.basename(f): n for f, n in cleaned.skipped.folders.items()}
    assert folders == {"query": len(QUERY_DAMAGE), "bounding_box_test": len(GALLERY_DAMAGE)}
    text = cleaned.summary()
    assert f"skipped {len(probe) + 4} file(s)" in text and "0001_c3s1_000901_01.jpg" in text


def test_nothing_valid_left_names_the_split_and_folder(trees, tmp_path):
    root = str(tmp_path / "Market-1501-v15.09.15")
    shutil.copytree(trees["clean"], root)
    query = os.path.join(root, "query")
    for name in os.listdir(query):  # every query decodes only with a libjpeg warning
        corrupt_middle(os.path.join(query, name), os.path.join(query, name))
    dataset = load_dataset("market1501", root)
    with pytest.raises(DatasetLayoutError, match=re.escape(f"no usable image left in the query split ({query})")):
        decoding.drop_damaged(dataset)
    with pytest.raises(EvaluationError, match=re.escape(f"query split ({query}): all 12 image(s) are damaged")):
        evaluate_model(_stand_in(str(tmp_path)), dataset, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_data_info_counts_and_names_damaged_files(trees, capsys):
    from reid_keras.cli.data import main

    assert main(["info", "--dataset", "market1501", "--data-root", trees["damaged"]]) == 0
    out = capsys.readouterr().out
    total = len(QUERY_DAMAGE) + len(GALLERY_DAMAGE)
    assert f"skipped {total} file(s)" in out and "decode check:" in out and "4 damaged" in out
    assert "0001_c3s1_000901_01.jpg" in out and HIT_MARKER in out
    assert re.search(r"query\s+6\s+12\s", out)  # the clean tree's 12 queries: the damaged ones are out
    assert main(["info", "--dataset", "market1501", "--data-root", trees["damaged"], "--no-decode-check"]) == 0
    quick = capsys.readouterr().out
    assert f"skipped {total - 4} file(s)" in quick and re.search(r"query\s+6\s+13\s", quick)


# ------------------------------------------------------------------------------ evaluation

def _stand_in(folder):
    from reid_keras.models.loading import EmbeddingModel

    source = os.path.join(folder, "stand_in.keras")
    with open(source, "wb") as handle:
        handle.write(b"stand-in: the feature cache key needs a file")

    def mean_colours(images):  # mean colour of 4 x 2 cells
        x = np.asarray(images, dtype=np.float32)
        n, h, w, _ = x.shape
        return x.reshape(n, 4, h // 4, 2, w // 2, 3).mean(axis=(2, 4)).reshape(n, -1) - 110.0

    return EmbeddingModel(embed_fn=mean_colours, image_size=IMAGE_SIZE, preprocessing=None, source=source,
                          kind="keras")


def test_evaluate_model_skips_damaged_and_equals_the_clean_tree(trees, tmp_path, capsys):
    model = _stand_in(str(tmp_path))
    options = EvaluationOptions(plots=False, batch_size=8)
    clean = evaluate_model(model, load_dataset("market1501", trees["clean"]), str(tmp_path / "clean"), options)
    capsys.readouterr()
    got = evaluate_model(model, load_dataset("market1501", trees["damaged"]), str(tmp_path / "damaged"), options)
    out = capsys.readouterr().out
    for key in ("rank1", "rank5", "mAP", "mINP", "num_query", "num_gallery", "num_valid_queries"):
        assert got[key] == clean[key], key
    assert clean["skipped"]["total"] == 0
    skipped = json.load(open(tmp_path / "damaged" / "metrics.json"))["skipped"]
    assert skipped == got["skipped"] and skipped["total"] == len(QUERY_DAMAGE) + len(GALLERY_DAMAGE)
    for name, (kind, reason) in {**QUERY_DAMAGE, **GALLERY_DAMAGE}.items():
        matching = [r for r in skipped["by_reason"] if expected_reason(reason, r)]
        assert matching, (kind, skipped["by_reason"])
    shown = {os.path.basename(p) for paths in skipped["examples"].values() for p in paths}
    assert {"0001_c3s1_000901_01.jpg", "0001_c2s1_000911_01.jpg"} <= shown
    assert {os.path.basename(f): n for f, n in skipped["by_folder"].items()} == {
        "query": len(QUERY_DAMAGE), "bounding_box_test": len(GALLERY_DAMAGE)}
    assert f"skipped {skipped['total']} file(s)" in out and "0001_c3s1_000901_01.jpg" in out


def test_images_tensorflow_drops_late_are_counted_too(trees, tmp_path):
    """A file that passes the checks but fails in the feature pipeline (here: removed in between)."""
    model = _stand_in(str(tmp_path))
    records = load_dataset("market1501", trees["clean"]).query[:4]
    gone = str(tmp_path / "gone.jpg")
    shutil.copy(records[0].path, gone)
    records = [ImageRecord(gone, records[0].pid, records[0].camid)] + records[1:]
    os.remove(gone)
    features = extract_features(model, records, batch_size=2, verbose=False)
    assert features.meta["skipped"] == [gone] and len(features) == 3
    with pytest.raises(NoDecodableImages, match=re.escape(gone)):
        extract_features(model, records[:1], verbose=False)


def test_skip_report_merge_and_dict():
    a, b = SkipReport(max_examples=2), SkipReport()
    for path in ("/d/q/1.jpg", "/d/q/2.jpg", "/d/q/3.jpg"):
        a.add("empty", path)
    b.add("empty", "/d/g/4.jpg")
    b.add("text", "/d/g/5.jpg")
    merged = a.merge(b)
    assert merged.as_dict() == {"total": 5, "by_reason": {"empty": 4, "text": 1},
                                "by_folder": {"/d/g": 2, "/d/q": 3},
                                "examples": {"empty": ["/d/q/1.jpg", "/d/q/2.jpg"], "text": ["/d/g/5.jpg"]}}
    assert a.total == 3 and b.total == 2  # inputs unchanged


# ------------------------------------------------------------------------------ the evaluate command

def _evaluate(argv):
    from reid_keras import evaluate

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = evaluate.main(argv)
    return code, out.getvalue(), err.getvalue()


def test_evaluate_command_reports_skips_end_to_end(trees, tmp_path):
    out = str(tmp_path / "eval")
    code, stdout, stderr = _evaluate(["--model", trees["model"], "--dataset", "market1501", "--data-root",
                                      trees["damaged"], "--out", out, "--no-plots", "--batch-size", "8"])
    assert code == 0, stderr
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    total = len(QUERY_DAMAGE) + len(GALLERY_DAMAGE)
    assert metrics["num_query"] == 12 and metrics["num_gallery"] == 38 and metrics["skipped"]["total"] == total
    assert 0 <= metrics["mAP"] <= 1
    assert f"skipped {total} file(s)" in stdout and "0001_c3s1_000901_01.jpg" in stdout
    assert "Traceback" not in stderr and "Corrupt JPEG data" not in stderr


def test_evaluate_command_no_valid_gallery_exits_2_naming_the_folder(trees, tmp_path):
    root = str(tmp_path / "Market-1501-v15.09.15")
    shutil.copytree(trees["clean"], root)
    gallery = os.path.join(root, "bounding_box_test")
    for name in os.listdir(gallery):
        cut_then_eoi(os.path.join(gallery, name), os.path.join(gallery, name))
    code, _, stderr = _evaluate(["--model", trees["model"], "--dataset", "market1501", "--data-root", root,
                                 "--out", str(tmp_path / "o"), "--no-plots"])
    assert code == 2 and "Traceback" not in stderr
    assert f"no usable image left in the gallery split ({gallery})" in stderr and HIT_MARKER in stderr
    assert not os.path.exists(tmp_path / "o" / "metrics.json")


# ------------------------------------------------------------------------------ a training run

@pytest.mark.slow
def test_training_run_evaluates_and_records_skips_despite_damaged_query_and_gallery(trees, tmp_path):
    """Issue 12 item 1: a damaged query / gallery image must not throw a finished run away."""
    from reid_keras.cli import train

    code = train.main(["--model", "siamese_b0", "--dataset", "market1501", "--data-root", trees["damaged"],
                       "--epochs", "0", "--id-warmup-steps", "0", "--weights", "none", "--image-size", "64x32",
                       "--output", str(tmp_path / "runs"), "--name", "r", "--no-export", "--no-plots"])
    assert code == 0
    metrics = json.load(open(tmp_path / "runs" / "r" / "metrics.json"))
    cosine = metrics["embedding_cosine"]
    assert cosine["num_query"] == 12 and cosine["num_gallery"] == 38
    assert cosine["skipped"]["total"] == len(QUERY_DAMAGE) + len(GALLERY_DAMAGE)
    assert metrics["verification_head"]["num_valid_queries"] == cosine["num_valid_queries"]
    # The run's own report counts every split's skips (train included) and names the corrupt-middle query.
    assert metrics["skipped"]["total"] >= cosine["skipped"]["total"]
    assert any("0001_c3s1_000901_01.jpg" in name for names in metrics["skipped"]["examples"].values()
               for name in names)
