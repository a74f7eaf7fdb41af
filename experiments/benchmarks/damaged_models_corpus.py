"""Damaged-model corpus (issue 12, "Measure"): every kind of broken model through the real commands.

A tiny siamese model (16x8 input, one conv, one dense "embedding", 2-way softmax head) is saved as a
run's `last.keras` and exported once; then each kind of damage is applied to a fresh copy and the
copy is given to `python -m reid_keras.match`, `python -m reid_keras.export` and / or
`python -m reid_keras.evaluate` (on a small synthetic Market-1501 tree) as subprocesses. The table
shows each outcome: exit code, the first line of the message, and "clean" = a non-zero exit, no
Python traceback, and the damaged path named in the message. Three control rows run the intact
model and must exit 0.

    python experiments/benchmarks/damaged_models_corpus.py            # the whole corpus (~3-4 min on 2 cores)
    python experiments/benchmarks/damaged_models_corpus.py --jobs 1   # one command at a time
    python experiments/benchmarks/damaged_models_corpus.py --only keras_truncated_half,sm_nan_weights
"""
from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

import numpy as np

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from machine import describe_machine  # noqa: E402  (experiments/benchmarks/machine.py)

IMAGE_SIZE = (16, 8)
SHARD = "variables/variables.data-00000-of-00001"
TF_NOISE = ("WARNING: All log messages", "I0000", "W0000", "E0000", "WARNING:absl")


def tiny_siamese(seed: int = 0, units: int = 8):
    """The smallest model of the siamese family's shape: an "embedding" sub-model shared by two inputs."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input(IMAGE_SIZE + (3,))
    x = keras.layers.Rescaling(1.0 / 255)(inp)
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(x)
    x = keras.layers.Flatten()(x)
    embedding = keras.Model(inp, keras.layers.Dense(units)(x), name="embedding")
    a, b = keras.Input(IMAGE_SIZE + (3,)), keras.Input(IMAGE_SIZE + (3,))
    diff = keras.layers.Subtract()([embedding(a), embedding(b)])
    return keras.Model([a, b], keras.layers.Dense(2, activation="softmax")(diff), name="siamese")


def build_sources(root: str) -> dict:
    """The intact run folder and export, a model of another architecture (same layer names, other shapes),
    and the test data (two images, a synthetic Market-1501 tree)."""
    import keras
    import tensorflow as tf

    from reid_keras.data.datasets.synthetic import write_dataset
    from reid_keras.io_utils import atomic_save_keras
    from reid_keras.models.saved_model import export_model

    run = os.path.join(root, "run")
    os.makedirs(run)
    model = tiny_siamese()
    atomic_save_keras(model, os.path.join(run, "last.keras"))
    with open(os.path.join(run, "config.json"), "w", encoding="utf-8") as handle:
        json.dump({"family": "siamese", "preprocessing": "none"}, handle)
    export_model(model, os.path.join(run, "export"), preprocessing="none", verifier=model)
    keras.backend.clear_session()
    other = tiny_siamese(seed=1, units=4)  # same layer names, other shapes
    other.save(os.path.join(root, "other.keras"))
    other.save_weights(os.path.join(root, "other.weights.h5"))
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png"):
        tf.io.write_file(os.path.join(root, name), tf.io.encode_png(rng.integers(0, 256, (40, 20, 3), np.uint8)))
    tf.io.write_file(os.path.join(root, "photo.jpg"), tf.io.encode_jpeg(rng.integers(0, 256, (40, 20, 3), np.uint8)))
    write_dataset("market1501", os.path.join(root, "data"), num_ids=8, seed=0)
    return {"run": run, "keras": os.path.join(run, "last.keras"), "export": os.path.join(run, "export"),
            "other": os.path.join(root, "other.keras"), "weights_h5": os.path.join(root, "other.weights.h5"),
            "jpeg": os.path.join(root, "photo.jpg"), "data": os.path.join(root, "data"),
            "images": [os.path.join(root, "a.png"), os.path.join(root, "b.png")]}


# ---- damage: each takes (intact model, case folder) and returns the damaged model's path ---------------


def _truncate(path, keep):
    with open(path, "r+b") as handle:
        handle.truncate(keep)


def _flip_byte(path, offset):
    data = bytearray(open(path, "rb").read())
    data[offset % len(data)] ^= 0x40
    open(path, "wb").write(bytes(data))


def _rezip(src, dst, drop=None, replace=None):
    with zipfile.ZipFile(src) as old:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as new:
            for name in old.namelist():
                if name != drop:
                    new.writestr(name, (replace or {}).get(name, old.read(name)))
    open(dst, "wb").write(buffer.getvalue())


def _nan_export(src, dst, value=float("nan")):
    """An export written before export refused it: one variable set to `value`, the folder re-saved."""
    import tensorflow as tf

    loaded = tf.saved_model.load(src)
    variable = loaded.model_variables[2]  # the embedding's dense kernel
    variable.assign(tf.fill(variable.shape, value))
    tf.saved_model.save(loaded, dst, signatures={"embed": loaded.signatures["embed"],
                                                  "verify": loaded.signatures["verify"]})
    shutil.copy(os.path.join(src, "reid_keras_export.json"), dst)


def _edit_keras(src, dst, value):
    """`src` with one (value NaN) or every (value finite) entry of the embedding's dense kernel set to `value`."""
    import keras

    from reid_keras.families import register_serializables

    register_serializables()
    model = keras.saving.load_model(src, compile=False)
    kernel = model.get_layer("embedding").layers[-1].kernel
    values = kernel.numpy()
    if np.isnan(value):
        values[3, 1] = value
    else:
        values[:] = value
    kernel.assign(values)
    model.save(dst)


def _rename_layer_class(src, dst, module, class_name, registered_name):
    """`src` whose config.json names another class for its Subtract layer."""
    config = json.loads(zipfile.ZipFile(src).read("config.json"))
    layer = next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Subtract")
    layer.update(module=module, class_name=class_name, registered_name=registered_name)
    _rezip(src, dst, replace={"config.json": json.dumps(config).encode()})


def export_case(fn):
    """Damage: a copy of the export folder as case/export, then `fn(copy)`."""
    def damage(src, case):
        path = os.path.join(case, "export")
        shutil.copytree(src, path)
        fn(path)
        return path
    return damage


def keras_case(fn):
    """Damage: `fn(src, case/last.keras)` writes the damaged model inside a copy of its run folder (so
    export still finds the family in config.json)."""
    def damage(src, case):
        os.makedirs(case)
        shutil.copy(os.path.join(os.path.dirname(src), "config.json"), case)
        path = os.path.join(case, "last.keras")
        fn(src, path)
        return path
    return damage


def corpus(s: dict) -> list:
    """(kind, model path, damage(src, case folder) -> damaged path or None, commands)."""
    def in_shard(fn):
        return export_case(lambda d: fn(os.path.join(d, SHARD)))

    def copied(fn):
        return keras_case(lambda a, b: (shutil.copy(a, b), fn(b)))

    def new_folder(src, case):
        os.makedirs(case)
        return case

    def image_folder(src, case):
        os.makedirs(case)
        for path in s["images"]:
            shutil.copy(path, case)
        return case

    size = os.path.getsize(s["keras"])
    other_weights = zipfile.ZipFile(s["other"]).read("model.weights.h5")
    sm, kf, every = ("match", "evaluate"), ("export", "evaluate"), ("match", "export", "evaluate")
    index = lambda d: os.path.join(d, "variables", "variables.index")  # noqa: E731
    graph = lambda d: os.path.join(d, "saved_model.pb")  # noqa: E731
    return [
        ("control: intact export", s["export"], None, sm),
        ("control: intact .keras", s["keras"], None, kf),
        ("export: variables.data shard deleted", s["export"], export_case(lambda d: os.remove(os.path.join(d, SHARD))),
         sm),
        ("export: variables.index deleted", s["export"], export_case(lambda d: os.remove(index(d))), sm),
        ("export: variables/ deleted", s["export"],
         export_case(lambda d: shutil.rmtree(os.path.join(d, "variables"))), sm),
        ("export: data shard truncated to half", s["export"], in_shard(lambda p: _truncate(p, os.path.getsize(p) // 2)),
         sm),
        ("export: data shard empty (0 bytes)", s["export"], in_shard(lambda p: _truncate(p, 0)), sm),
        ("export: data shard, one byte flipped", s["export"], in_shard(lambda p: _flip_byte(p, 1500)), sm),
        ("export: variables.index garbage", s["export"],
         export_case(lambda d: open(index(d), "wb").write(b"x" * 600)), sm),
        ("export: saved_model.pb garbage", s["export"], export_case(lambda d: open(graph(d), "wb").write(b"junk" * 90)),
         sm),
        ("export: saved_model.pb truncated", s["export"], export_case(lambda d: _truncate(graph(d), 20000)), sm),
        ("export: saved_model.pb deleted", s["export"], export_case(lambda d: os.remove(graph(d))), sm),
        ("export: reid_keras_export.json garbage", s["export"],
         export_case(lambda d: open(os.path.join(d, "reid_keras_export.json"), "w").write("{oops")), ("match",)),
        ("export: NaN weights (an old export)", s["export"],
         lambda src, case: (_nan_export(src, case), case)[1], sm),
        ("export: finite weights, outputs overflow", s["export"],
         lambda src, case: (_nan_export(src, case, 3e38), case)[1], sm),
        (".keras: truncated to half", s["keras"], copied(lambda p: _truncate(p, size // 2)), kf),
        (".keras: last 10 bytes cut", s["keras"], copied(lambda p: _truncate(p, size - 10)), kf),
        (".keras: empty (0 bytes)", s["keras"], keras_case(lambda a, b: open(b, "wb").close()), kf),
        (".keras: a text file", s["keras"], keras_case(lambda a, b: open(b, "w").write("not a model\n")), kf),
        (".keras: no config.json inside", s["keras"], keras_case(lambda a, b: _rezip(a, b, drop="config.json")), kf),
        (".keras: no model.weights.h5 inside", s["keras"],
         keras_case(lambda a, b: _rezip(a, b, drop="model.weights.h5")), kf),
        (".keras: config.json not JSON", s["keras"],
         keras_case(lambda a, b: _rezip(a, b, replace={"config.json": b"{oops"})), kf),
        (".keras: one byte flipped (CRC)", s["keras"], copied(lambda p: _flip_byte(p, size // 2)), kf),
        (".keras: weights of another architecture", s["keras"],
         keras_case(lambda a, b: _rezip(a, b, replace={"model.weights.h5": other_weights})), kf),
        (".keras: a layer class that is not registered", s["keras"], keras_case(
            lambda a, b: _rename_layer_class(a, b, "reid_keras.models.layers", "Gone", "reid_keras>Gone")), kf),
        (".keras: a layer class Keras lacks", s["keras"],
         keras_case(lambda a, b: _rename_layer_class(a, b, "keras.layers", "NoSuchLayer", None)), kf),
        (".keras: one NaN weight", s["keras"], keras_case(lambda a, b: _edit_keras(a, b, float("nan"))), kf),
        (".keras: finite weights, outputs overflow", s["keras"], keras_case(lambda a, b: _edit_keras(a, b, 3e38)), kf),
        (".weights.h5 file given as model", s["weights_h5"], None, every),
        ("JPEG image given as model", s["jpeg"], None, every),
        ("path does not exist", os.path.join(os.path.dirname(s["run"]), "no_such_model"), None, every),
        ("empty folder", s["run"], new_folder, every),
        ("run folder given as model", s["run"], None, every),
        ("folder of images given as model", s["run"], image_folder, ("match", "evaluate")),
        (".keras file given to match", s["keras"], None, ("match",)),
        ("export folder given to export", s["export"], None, ("export",)),
        ("saved_model.pb file given as model", os.path.join(s["export"], "saved_model.pb"), None, ("match",)),
    ]


def command(name: str, model: str, s: dict, out: str) -> list:
    if name == "match":
        return [sys.executable, "-m", "reid_keras.match", *s["images"], "--model", model]
    if name == "export":
        return [sys.executable, "-m", "reid_keras.export", "--model", model, "--out", out]
    return [sys.executable, "-m", "reid_keras.evaluate", "--model", model, "--dataset", "market1501",
            "--data-root", s["data"], "--out", out, "--no-plots", "--batch-size", "32"]


def message_line(stderr: str, stdout: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip() and not line.startswith(TF_NOISE)]
    for line in lines:
        if "error:" in line or line.startswith(("Traceback", "note:")):
            return line
    if lines:
        return lines[-1]
    out = [line.strip() for line in stdout.splitlines() if line.strip()]
    return out[-1] if out else ""


def run_one(job) -> dict:
    kind, model, name, argv, control = job
    start = time.time()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    line = message_line(done.stderr, done.stdout)
    text = done.stderr
    if control:
        clean = "yes (control)" if done.returncode == 0 else "NO: the intact model failed"
    else:
        traceback = "Traceback" in text
        names = model in text
        clean = "yes" if done.returncode != 0 and not traceback and names else \
            "NO: " + ", ".join(w for w, bad in (("exit 0", done.returncode == 0), ("traceback", traceback),
                                                ("path not named", not names)) if bad)
    return {"kind": kind, "command": name, "code": done.returncode, "line": line, "clean": clean,
            "control": control, "seconds": time.time() - start}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="commands run at once (default: %(default)s)")
    parser.add_argument("--only", default="", help="comma-separated substrings of the kinds to run")
    parser.add_argument("--keep", default=None, help="build the corpus in this folder and keep it")
    args = parser.parse_args(argv)
    import keras
    import tensorflow as tf

    start = time.time()
    root = args.keep or tempfile.mkdtemp(prefix="damaged_models_")
    os.makedirs(root, exist_ok=True)
    try:
        sources = build_sources(root)
        jobs = []
        for index, (kind, src, damage, commands) in enumerate(corpus(sources)):
            if args.only and not any(part in kind for part in args.only.split(",")):
                continue
            model = damage(src, os.path.join(root, f"case{index:02d}")) if damage is not None else src
            for name in commands:
                out = os.path.join(root, f"out{index:02d}_{name}")
                jobs.append((kind, model, name, command(name, model, sources, out), kind.startswith("control")))
        built = time.time() - start
        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            rows = list(pool.map(run_one, jobs))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(describe_machine(tensorflow=tf.__version__, keras=keras.__version__))
    print(f"corpus built in {built:.0f} s; {len(rows)} commands in {time.time() - start - built:.0f} s "
          f"({args.jobs} at a time)\n")
    print("| kind | command | exit code | first line of message | clean (no traceback, names the path) |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        line = row["line"].replace("|", "\\|").replace(root, "…")
        line = line if len(line) <= 240 else line[:237] + "..."
        print(f"| {row['kind']} | {row['command']} | {row['code']} | {line} | {row['clean']} |")
    damaged = [r for r in rows if not r["control"]]
    bad = [r for r in rows if r["clean"].startswith("NO")]
    print(f"\n{len({r['kind'] for r in damaged})} kinds of damaged model, {len(damaged)} runs, "
          f"{sum(r['clean'] == 'yes' for r in damaged)} clean; controls exiting 0: "
          f"{sum(r['code'] == 0 for r in rows if r['control'])}/{len(rows) - len(damaged)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
