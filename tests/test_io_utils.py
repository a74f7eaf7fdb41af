"""Atomic writes (reid_keras.io_utils): old file kept on failure, no temp left, extensions kept."""
import json
import os
import pathlib
import stat

import keras
import numpy as np
import pytest

from reid_keras.io_utils import atomic_write, atomic_write_bytes, atomic_write_json, atomic_write_text
from reid_keras.io_utils import write_json


def _expected_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, error):
    target = tmp_path / "best.keras"
    target.write_bytes(b"old model")
    seen = []

    def half_write(tmp):
        seen.append(tmp)
        with open(tmp, "wb") as handle:
            handle.write(b"half a zip")
        raise error

    with pytest.raises(type(error)):
        atomic_write(str(target), half_write)
    assert target.read_bytes() == b"old model"
    assert os.listdir(tmp_path) == ["best.keras"]
    assert len(seen) == 1 and not os.path.exists(seen[0])


def test_failed_first_write_creates_nothing(tmp_path):
    with pytest.raises(ValueError, match="Out of range float"):
        atomic_write_json(str(tmp_path / "new" / "metrics.json"), {"mAP": float("nan")}, allow_nan=False)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("name, suffix", [("state.weights.h5", ".weights.h5"), ("last.keras", ".keras"),
                                          ("features_query.npz", ".npz"), ("cmc.png", ".png"),
                                          ("archive.tar.gz", ".gz"), ("LICENSE", "")])
def test_temp_file_is_hidden_in_same_folder_with_same_extension(tmp_path, name, suffix):
    seen = []

    def write(tmp):
        seen.append(tmp)
        pathlib.Path(tmp).write_text("content")

    assert atomic_write(str(tmp_path / "run" / name), write) == str(tmp_path / "run" / name)
    tmp = seen[0]
    assert os.path.dirname(tmp) == str(tmp_path / "run")
    assert os.path.basename(tmp).startswith(f".{name}.")
    assert tmp.endswith(".tmp" + suffix)
    assert os.listdir(tmp_path / "run") == [name]
    assert (tmp_path / "run" / name).read_text() == "content"
    assert stat.S_IMODE(os.stat(tmp_path / "run" / name).st_mode) == _expected_mode()


def test_formats_chosen_by_extension_work_through_temp_files(tmp_path):
    """Keras refuses weights files not named `*.weights.h5`; np.savez appends `.npz` to other names."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")])
    path = str(tmp_path / "state.weights.h5")
    atomic_write(path, model.save_weights)
    copy = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="dense")])
    copy.load_weights(path)
    for a, b in zip(model.get_weights(), copy.get_weights()):
        np.testing.assert_array_equal(a, b)

    array = np.arange(6, dtype=np.int64).reshape(2, 3)
    atomic_write(str(tmp_path / "a.npz"), lambda tmp: np.savez(tmp, array=array))
    with np.load(tmp_path / "a.npz") as data:
        np.testing.assert_array_equal(data["array"], array)
    assert sorted(os.listdir(tmp_path)) == ["a.npz", "state.weights.h5"]


def test_bytes_and_text_replace_existing_files(tmp_path):
    path = tmp_path / "deep" / "folder" / "x.png"
    atomic_write_bytes(str(path), b"\x89PNG first")
    atomic_write_bytes(str(path), b"\x89PNG second")
    assert path.read_bytes() == b"\x89PNG second"
    atomic_write_text(str(tmp_path / "note.txt"), "caf\u00e9\n")
    assert (tmp_path / "note.txt").read_bytes() == "caf\u00e9\n".encode("utf-8")


def test_json_options(tmp_path):
    path = tmp_path / "a.json"
    atomic_write_json(str(path), {"b": 1, "a": (2, 3)})
    assert path.read_text() == '{\n  "a": [\n    2,\n    3\n  ],\n  "b": 1\n}\n'
    atomic_write_json(str(path), {"b": 1, "a": 2}, indent=1, sort_keys=False)
    assert path.read_text() == '{\n "b": 1,\n "a": 2\n}\n'
    with pytest.raises(TypeError, match="not JSON serializable"):
        atomic_write_json(str(path), {"where": pathlib.Path("/data")})
    assert json.loads(path.read_text()) == {"b": 1, "a": 2}
    atomic_write_json(str(path), {"where": pathlib.Path("/data")}, default=str)
    assert json.loads(path.read_text()) == {"where": "/data"}


def test_training_json_writes_unknown_values_as_strings(tmp_path):
    write_json(str(tmp_path / "metrics.json"), {"dtype": np.dtype("float32"), "loss": 0.5})
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"dtype": "float32", "loss": 0.5}
