"""Damaged-input corpus (issue 12, "Measure"): every kind of bad image, folder and dataset layout
through the real commands.

A clean tiny Market-1501 tree (32x16 JPEGs, 4 ids) is copied once per kind and damaged; the copy
goes to `python -m reid_keras.data info` and `python -m reid_keras.evaluate` (a tiny siamese model,
16x8 input) as subprocesses, the way users meet them, and each damaged file also to the library's
`reid_keras.data.decoding.check_image_file`. Damaged image files are added to a tree that stays
valid, so the expected outcome is exit 0 with the file counted and named; a layout with nothing
usable left must exit 2 naming the folder. For speed, the evaluate command runs once on a tree
holding every damaged image at the same time and each image's row reads its entry in that run's
metrics.json "skipped".

Columns: outcome = exit code, the first line that names the file (or the first error line) and
whether the skip was counted; clean = no Python traceback, no nameless libjpeg warning
("Corrupt JPEG data: ..."), the damaged file or folder named, and the expected exit code.
Two control rows (a PNG named .jpg, the clean tree) must pass unchanged.

    python experiments/benchmarks/damaged_inputs_corpus.py            # ~2-4 min on 2 shared cores
    python experiments/benchmarks/damaged_inputs_corpus.py --jobs 1   # one command at a time
    python experiments/benchmarks/damaged_inputs_corpus.py --only corrupt_middle,query_only_damaged
"""
from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from machine import describe_machine  # noqa: E402  (experiments/benchmarks/machine.py)

IMAGE_SIZE = (16, 8)
DATASET = "Market-1501-v15.09.15"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ------------------------------------------------------------------------------ the clean tree

def write_jpeg(path: str, pixels: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(pixels).save(path, quality=95)


def write_clean_tree(root: str, seed: int = 0) -> str:
    """4 ids x 3 cameras; 2 train, 2 gallery images per (id, camera), queries in cameras 1 and 2."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, DATASET)
    for split in ("bounding_box_train", "bounding_box_test", "query"):
        os.makedirs(os.path.join(folder, split), exist_ok=True)
    index = 0
    for pid in range(1, 5):
        colour = rng.integers(30, 225, size=3)
        for cam in (1, 2, 3):
            splits = ["bounding_box_train"] * 2 + ["bounding_box_test"] * 2 + (["query"] if cam < 3 else [])
            for split in splits:
                index += 1
                pixels = np.clip(colour + rng.normal(0, 25, size=(32, 16, 3)), 0, 255).astype(np.uint8)
                write_jpeg(os.path.join(folder, split, f"{pid:04d}_c{cam}s1_{index:06d}_01.jpg"), pixels)
    return folder


def a_jpeg(tree: str) -> str:
    query = os.path.join(tree, "query")
    return os.path.join(query, sorted(os.listdir(query))[0])


# ------------------------------------------------------------------------------ damaged images

def _scan(data: bytes) -> tuple:
    sos = data.index(b"\xff\xda")
    return sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big"), len(data) - 2


def _png_bytes(size=(32, 16), value=90) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((*size, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _encoded(fmt: str) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((32, 16, 3), 120, np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()


def make_image(kind: str, dst: str, source: str) -> None:
    """Write damaged image `kind` at `dst` (a name that parses), from the good JPEG `source`."""
    data = open(source, "rb").read()
    first, end = _scan(data)
    middle = (first + end) // 2
    writers = {
        "zero_bytes": lambda: b"",
        "truncated_jpeg": lambda: data[:len(data) // 2],
        "html_as_jpeg": lambda: b"<html><body>404 Not Found</body></html>\n",
        "corrupt_middle": lambda: data[:middle] + b"\x00" * 32 + data[middle + 32:],
        "cut_then_ffd9": lambda: data[:middle] + b"\xff\xd9",
        "header_only_ffd9": lambda: data[:data.index(b"\xff\xda")] + b"\xff\xd9",
        "garbage_scan": lambda: data[:first] + bytes(range(1, 200)) * 2 + b"\xff\xd9",
        "jpeg_bad_tail": lambda: data + b"\x01\x02\x03",
        "truncated_png": lambda: _png_bytes()[:-20],
        "corrupt_png_idat": lambda: _corrupt_idat(_png_bytes()),
        "tiff_as_jpeg": lambda: b"II*\x00" + b"\x00" * 200,
        "truncated_bmp": lambda: _encoded("BMP")[:-40],
        "truncated_gif": lambda: _encoded("GIF")[:-1],
        "png_named_jpg": lambda: _png_bytes(),
    }
    if kind == "broken_symlink":
        os.symlink(os.path.join(os.path.dirname(dst), "target_that_does_not_exist.jpg"), dst)
    elif kind == "folder_named_jpg":
        os.makedirs(dst)
    elif kind == "unreadable_file":
        shutil.copy(source, dst)
        os.chmod(dst, 0)
    elif kind == "fifo_named_jpg":
        os.mkfifo(dst)
    else:
        with open(dst, "wb") as handle:
            handle.write(writers[kind]())


def _corrupt_idat(png: bytes) -> bytes:
    idat = png.index(b"IDAT") + 4
    return png[:idat + 2] + b"\x00" * 12 + png[idat + 14:]  # data and CRC wrong, IEND intact


# kind -> (file name in query/, description, expected: "skip" or "accepted")
IMAGE_KINDS = {
    "zero_bytes": ("0001_c3s1_000901_01.jpg", "zero-byte .jpg", "skip"),
    "truncated_jpeg": ("0002_c3s1_000902_01.jpg", "JPEG cut in half (no FFD9)", "skip"),
    "html_as_jpeg": ("0003_c3s1_000903_01.jpg", "HTML error page saved as .jpg", "skip"),
    "corrupt_middle": ("0004_c3s1_000904_01.jpg", "JPEG, 32 bytes zeroed mid-scan (header, FFD9 intact)", "skip"),
    "cut_then_ffd9": ("0001_c3s1_000905_01.jpg", "JPEG cut mid-scan, FFD9 appended (decodes half grey)", "skip"),
    "header_only_ffd9": ("0002_c3s1_000906_01.jpg", "JPEG header, no scan, FFD9", "skip"),
    "garbage_scan": ("0003_c3s1_000907_01.jpg", "JPEG header, garbage scan, FFD9", "skip"),
    "jpeg_bad_tail": ("0004_c3s1_000908_01.jpg", "JPEG with bytes after FFD9", "skip"),
    "truncated_png": ("0001_c3s1_000909_01.png", "PNG cut short (no IEND)", "skip"),
    "corrupt_png_idat": ("0002_c3s1_000910_01.png", "PNG with a zeroed IDAT chunk (IEND intact)", "skip"),
    "tiff_as_jpeg": ("0003_c3s1_000911_01.jpg", "TIFF bytes named .jpg (unknown format)", "skip"),
    "truncated_bmp": ("0004_c3s1_000912_01.bmp", "BMP shorter than its header says", "skip"),
    "truncated_gif": ("0001_c3s1_000913_01.gif", "GIF without its trailer", "skip"),
    "broken_symlink": ("0002_c3s1_000914_01.jpg", "symbolic link to nothing", "skip"),
    "folder_named_jpg": ("0003_c3s1_000915_01.jpg", "a folder named like an image", "skip"),
    "unreadable_file": ("0004_c3s1_000916_01.jpg", "file without read permission", "skip"),
    "fifo_named_jpg": ("0001_c3s1_000917_01.jpg", "named pipe called .jpg", "skip"),
    "png_named_jpg": ("0002_c3s1_000918_01.jpg", "control: valid PNG named .jpg", "accepted"),
}
NAME_KINDS = {  # loader-level name problems: (file name, description)
    "bad_name": ("holiday_photo.jpg", "file name without <pid>_c<cam>"),
    "camera_out_of_range": ("0001_c9s1_000920_01.jpg", "camera 9 in a 6-camera dataset"),
    "hidden_appledouble": ("._0001_c1s1_000921_01.jpg", "macOS ._ metadata file"),
    "wrong_extension": ("0001_c1s1_000922_01.txt", "a .txt file in query/"),
}


# ------------------------------------------------------------------------------ damaged layouts

def make_layout(kind: str, base: str, clean: str) -> tuple:
    """Build layout `kind` under `base`; returns (data root, name the message must contain)."""
    tree = os.path.join(base, DATASET)
    if kind == "root_missing":
        return os.path.join(base, "no_such_folder"), "no_such_folder"
    if kind == "root_is_file":
        path = os.path.join(base, "market.zip")
        open(path, "wb").write(b"PK\x03\x04 not unpacked")
        return path, "market.zip"
    shutil.copytree(clean, tree, symlinks=True)
    query, gallery = os.path.join(tree, "query"), os.path.join(tree, "bounding_box_test")
    source = os.path.join(base, "source.jpg")
    shutil.copy(a_jpeg(clean), source)
    if kind == "no_query_folder":
        shutil.rmtree(query)
        return base, "'query'"
    if kind == "empty_query_folder":
        shutil.rmtree(query)
        os.makedirs(query)
        return base, query
    if kind == "query_only_probe_damage":
        for name in os.listdir(query):
            open(os.path.join(query, name), "wb").close()
        return base, query
    if kind == "query_only_decode_damage":
        for name in os.listdir(query):
            make_image("corrupt_middle", os.path.join(query, name), os.path.join(clean, "query", name))
        return base, query
    if kind == "gallery_only_decode_damage":
        for name in os.listdir(gallery):
            make_image("cut_then_ffd9", os.path.join(gallery, name), os.path.join(clean, "bounding_box_test", name))
        return base, gallery
    if kind == "query_is_a_file":
        shutil.rmtree(query)
        open(query, "w").write("not a folder\n")
        return base, "query"
    if kind == "query_symlink_loop":
        shutil.rmtree(query)
        os.symlink(query, query)
        return base, "query"
    if kind == "wrong_dataset_layout":
        shutil.rmtree(tree)
        os.makedirs(os.path.join(base, "CUHK01", "campus"))
        shutil.copy(source, os.path.join(base, "CUHK01", "campus", "0001001.png"))
        return os.path.join(base, "CUHK01"), "bounding_box_train"
    if kind == "unreadable_query_folder":
        os.chmod(query, 0)
        return base, query
    raise ValueError(kind)


LAYOUT_KINDS = {
    "root_missing": "--data-root does not exist",
    "root_is_file": "--data-root is a file (an unpacked zip)",
    "no_query_folder": "dataset folder without query/",
    "empty_query_folder": "empty query/",
    "query_only_probe_damage": "query/ holds only zero-byte files",
    "query_only_decode_damage": "query/ holds only corrupt-middle JPEGs",
    "gallery_only_decode_damage": "bounding_box_test/ holds only cut+FFD9 JPEGs",
    "query_is_a_file": "query is a file, not a folder",
    "query_symlink_loop": "query is a symlink to itself",
    "wrong_dataset_layout": "a CUHK01 folder given as market1501",
    "unreadable_query_folder": "query/ without read permission",
}


# ------------------------------------------------------------------------------ running commands

def build_model(path: str) -> None:
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input(IMAGE_SIZE + (3,))
    x = keras.layers.Rescaling(1.0 / 255)(inp)
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(x)
    embedding = keras.Model(inp, keras.layers.Dense(8)(keras.layers.Flatten()(x)), name="embedding")
    a, b = keras.Input(IMAGE_SIZE + (3,)), keras.Input(IMAGE_SIZE + (3,))
    diff = keras.layers.Subtract()([embedding(a), embedding(b)])
    keras.Model([a, b], keras.layers.Dense(2, activation="softmax")(diff)).save(path)


def run(argv: list, env: dict) -> dict:
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=600)
    return {"code": proc.returncode, "out": proc.stdout, "err": proc.stderr, "seconds": time.time() - started}


def data_info(root: str, env: dict) -> dict:
    return run(["reid_keras.data", "info", "--dataset", "market1501", "--data-root", root], env)


def evaluate(root: str, model: str, out: str, env: dict) -> dict:
    return run(["reid_keras.evaluate", "--model", model, "--dataset", "market1501", "--data-root", root,
                "--out", out, "--no-plots", "--batch-size", "16"], env)


def first_line(text: str, needle: str = "") -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    hit = next((line for line in lines if needle and needle in line), None)
    if hit is None:
        hit = next((line for line in lines if line.startswith("error:")), lines[0] if lines else "")
    return (hit[:110] + "...") if len(hit) > 113 else hit


def judge(result: dict, name: str, expect_code: int) -> tuple:
    """(exit code, message line, clean?) of a command result: clean = expected exit, no traceback,
    no nameless libjpeg warning, `name` in the output."""
    text = result["out"] + result["err"]
    nameless = any(line.startswith(("Corrupt JPEG data", "Premature end of JPEG")) for line in text.splitlines())
    clean = (result["code"] == expect_code and "Traceback" not in text and not nameless and name in text)
    source = result["err"] if result["code"] else result["out"]
    return result["code"], first_line(source, name), clean


def decode_check_speed(folder: str, count: int) -> tuple:
    """Images/s of `find_damaged` on `count` 128x64 JPEGs (Market-1501's size): cold, then cached."""
    from reid_keras.data.decoding import find_damaged

    os.makedirs(folder)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:128, 0:64]
    paths = []
    for i in range(count):
        base = np.stack([(x * (i % 5 + 1)) % 256, (y * 2 + i) % 256, ((x + y) * 3) % 256], -1)
        paths.append(os.path.join(folder, f"{i:06d}.jpg"))
        write_jpeg(paths[-1], np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8))
    cache = os.path.join(folder, "cache")
    find_damaged(paths[:8], use_cache=False)  # TensorFlow's first graph, outside the timing
    rates = []
    for _ in range(2):
        started = time.perf_counter()
        assert find_damaged(paths, cache_dir=cache) == {}
        rates.append(count / (time.perf_counter() - started))
    return tuple(rates)


# ------------------------------------------------------------------------------ the corpus

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="commands run at the same time (default: 2)")
    parser.add_argument("--only", default="", help="comma-separated kinds to run (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--speed-images", type=int, default=3000,
                        help="Market-sized JPEGs for the decode-check speed line (0: no speed line)")
    args = parser.parse_args(argv)
    only = set(filter(None, args.only.split(",")))
    wanted = lambda kind: not only or kind in only  # noqa: E731

    import cv2
    import tensorflow as tf

    from reid_keras.data.decoding import check_image_file

    started = time.time()
    work = tempfile.mkdtemp(prefix="damaged_inputs_")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               REID_KERAS_CACHE=os.path.join(work, "cache"))
    clean = write_clean_tree(os.path.join(work, "clean"))
    model = os.path.join(work, "model.keras")
    build_model(model)
    rows, jobs = [], []

    def row(kind, description, command, code, message, counted, clean_):
        rows.append((kind, description, command, code, message, counted, "yes" if clean_ else "NO"))

    # Every damaged image and odd name in one tree (for `data info` and `evaluate`), each also alone
    # through the library; every damaged layout in a tree of its own, through both commands.
    image_kinds = [k for k in IMAGE_KINDS if wanted(k)]
    if IS_ROOT and "unreadable_file" in image_kinds:
        image_kinds.remove("unreadable_file")
        row("unreadable_file", IMAGE_KINDS["unreadable_file"][1], "all", "-",
            "not run: this process runs as root, which reads any file", "-", True)
    name_kinds = [k for k in NAME_KINDS if wanted(k)]
    together = os.path.join(work, "together")
    shutil.copytree(clean, os.path.join(together, DATASET), symlinks=True)
    source = a_jpeg(clean)
    for kind in image_kinds + name_kinds:
        dst = os.path.join(together, DATASET, "query", (IMAGE_KINDS.get(kind) or NAME_KINDS[kind])[0])
        if kind in IMAGE_KINDS:
            make_image(kind, dst, source)
        else:
            shutil.copy(source, dst)
    if image_kinds or name_kinds:
        jobs += [("info", "together", together, ""), ("evaluate", "together", together, "")]
    for kind in (k for k in LAYOUT_KINDS if wanted(k)):
        if kind == "unreadable_query_folder" and IS_ROOT:
            row(kind, LAYOUT_KINDS[kind], "all", "-", "not run: this process runs as root, which reads any folder",
                "-", True)
            continue
        base = os.path.join(work, kind)
        os.makedirs(base)
        root, name = make_layout(kind, base, clean)
        jobs += [("info", kind, root, name), ("evaluate", kind, root, name)]
    jobs.append(("evaluate", "control_clean_tree", os.path.dirname(clean), ""))

    def launch(job):
        command, kind, root, _ = job
        if command == "info":
            return job, data_info(root, env)
        return job, evaluate(root, model, os.path.join(work, f"eval_{kind}"), env)

    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
        results = dict(((j[0], j[1]), r) for j, r in pool.map(launch, jobs))

    info_cmd, eval_cmd, lib_cmd = "data info", "evaluate", "check_image_file"
    info_result, eval_result = results.get(("info", "together")), results.get(("evaluate", "together"))
    skipped = {}
    if eval_result is not None and eval_result["code"] == 0:
        with open(os.path.join(work, "eval_together", "metrics.json"), encoding="utf-8") as handle:
            skipped = json.load(handle)["skipped"]
    listed = {os.path.basename(p): reason for reason, paths in skipped.get("examples", {}).items() for p in paths}
    for kind in image_kinds + name_kinds:
        name, description = (IMAGE_KINDS[kind][:2] if kind in IMAGE_KINDS else NAME_KINDS[kind])
        accepted = kind in IMAGE_KINDS and IMAGE_KINDS[kind][2] == "accepted"
        info_text = info_result["out"] + info_result["err"]
        eval_text = eval_result["out"] + eval_result["err"]
        if accepted:  # in the tree's query count, in no skip line
            row(kind, description, info_cmd, info_result["code"], first_line(info_result["out"], "query "),
                "no (accepted)", info_result["code"] == 0 and name not in info_text)
            row(kind, description, eval_cmd, eval_result["code"], "not in metrics.json skipped (decoded)",
                "no (accepted)", eval_result["code"] == 0 and name not in listed and name not in eval_text)
        else:
            code, message, ok = judge(info_result, name, 0)
            row(kind, description, info_cmd, code, message.split("  (e.g.")[0].strip(), "yes" if ok else "NO", ok)
            ok = eval_result["code"] == 0 and name in listed and "Traceback" not in eval_text and name in eval_text
            row(kind, description, eval_cmd, eval_result["code"],
                f"metrics.json skipped: {listed.get(name, 'NOT LISTED')}"[:113], "yes" if name in listed else "NO", ok)
        if kind in IMAGE_KINDS:
            reason = check_image_file(os.path.join(together, DATASET, "query", name))
            ok = (reason is None) if accepted else (reason is not None)
            row(kind, description, lib_cmd, "-", str(reason), "no (accepted)" if accepted else
                ("yes" if reason else "NO"), ok)
    for kind in (k for k in LAYOUT_KINDS if wanted(k)):
        for command in ("info", "evaluate"):
            if (command, kind) not in results:
                continue
            name = next(j[3] for j in jobs if j[0] == command and j[1] == kind)
            code, message, ok = judge(results[(command, kind)], name, 2)
            row(kind, LAYOUT_KINDS[kind], info_cmd if command == "info" else eval_cmd, code, message,
                "error (nothing usable)", ok)
    control = results[("evaluate", "control_clean_tree")]
    row("control_clean_tree", "control: the clean tree", eval_cmd, control["code"], first_line(control["out"],
        "queries"), "skipped: none", control["code"] == 0 and "skipped" not in control["out"])
    if eval_result is not None:
        for command, result in ((info_cmd, info_result), (eval_cmd, eval_result)):
            text = result["out"] + result["err"]
            counted = next((line.strip() for line in result["out"].splitlines() if line.startswith("skipped ")), "")
            row("together", "every damaged image and name above, in one query/", command, result["code"],
                first_line(result["out"], "query" if command == info_cmd else "queries"), counted[:60],
                result["code"] == 0 and "Traceback" not in text)
    speed = decode_check_speed(os.path.join(work, "speed"), args.speed_images) if args.speed_images else None

    print(describe_machine(tensorflow=tf.__version__, opencv=cv2.__version__))
    controls = {"png_named_jpg", "control_clean_tree", "together"}
    kinds = {r[0] for r in rows} - controls
    not_run = {r[0] for r in rows if r[2] == "all"}
    print(f"\n{len(kinds)} kinds of damaged input ({len(kinds - not_run)} run, {len(not_run)} not run), "
          f"{len(controls & {r[0] for r in rows})} controls, {len(rows)} rows, "
          f"{sum(r[6] == 'yes' for r in rows)} clean; {time.time() - started:.0f} s\n")
    print("| kind | what | command | exit | message (first line naming the file, or the error) | skip counted? "
          "| clean |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kind, description, command, code, message, counted, ok in rows:
        message = message.replace(work, "$WORK").replace("|", "\\|")
        print(f"| {kind} | {description} | {command} | {code} | {message} | {counted} | {ok} |")
    if speed:
        print(f"\ndecode check (`find_damaged`, probe + strict JPEG + TensorFlow decode) of {args.speed_images} "
              f"128x64 JPEGs: {speed[0]:.0f} images/s with no cache, {speed[1]:.0f} images/s again with the cache "
              f"(a 36k-image Market-1501: {36036 / speed[0]:.0f} s, then {36036 / speed[1]:.1f} s)")
    if args.keep:
        print(f"\nwork folder kept: {work}")
    else:
        for dirpath, dirnames, _ in os.walk(work):  # chmod 0 folders would stop rmtree
            for d in dirnames:
                try:
                    os.chmod(os.path.join(dirpath, d), 0o755)
                except OSError:
                    pass
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r[6] == "yes" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
