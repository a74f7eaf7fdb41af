"""`python -m reid_keras.data info`: per-split table, options, and exit code 2 on layout errors."""
import os
import subprocess
import sys

import pytest

from reid_keras.data.__main__ import main
from tests.fixtures import layouts


def table_rows(text):
    """{split: (ids, images, cameras)} parsed back from the printed table."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 4 and parts[0] in ("train", "query", "gallery") and all(p.isdigit() for p in parts[1:]):
            out[parts[0]] = tuple(int(p) for p in parts[1:])
    return out


def test_info_prints_split_table(tmp_path, capsys):
    _, manifest = layouts.make_market(str(tmp_path))
    assert main(["info", "--dataset", "market1501", "--data-root", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    train = manifest["bounding_box_train"]
    gallery = [r for r in manifest["bounding_box_test"] if r[1] != -1]
    assert table_rows(text) == {
        "train": (len({p for _, p, _ in train}), len(train), len({c for _, _, c in train})),
        "query": (3, 4, 4),
        "gallery": (len({p for _, p, _ in gallery}), len(gallery), len({c for _, _, c in gallery})),
    }
    assert "gallery junk dropped: 3" in text and "skipped: none" in text


def test_info_passes_loader_options(tmp_path, capsys):
    layouts.make_cuhk01(str(tmp_path), num_ids=10)
    code = main(["info", "--dataset", "cuhk01", "--data-root", str(tmp_path), "--dataset-option", "split=half",
                 "--dataset-option", "seed=3", "--dataset-option", f"split_file={tmp_path}"])
    text = capsys.readouterr().out
    assert code == 0 and "split: half" in text and "seed: 3" in text
    assert os.path.isfile(tmp_path / "cuhk01_splits_half_seed3.json")
    assert table_rows(text)["query"] == (5, 10, 1)


def test_info_errors_exit_2_without_traceback(tmp_path, capsys):
    assert main(["info", "--dataset", "nosuch", "--data-root", str(tmp_path)]) == 2
    assert "known datasets: market1501" in capsys.readouterr().err
    assert main(["info", "--dataset", "cuhk01", "--data-root", str(tmp_path), "--dataset-option", "oops"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    # One real process run: the exit status and stderr a shell user sees.
    os.makedirs(tmp_path / "Market-1501-v15.09.15" / "bounding_box_train")
    proc = subprocess.run([sys.executable, "-m", "reid_keras.data", "info", "--dataset", "market1501",
                           "--data-root", str(tmp_path)], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "'bounding_box_test'" in proc.stderr
    assert str(tmp_path / "Market-1501-v15.09.15") in proc.stderr


def test_old_root_and_option_spellings_still_work(tmp_path, capsys):
    """`--root` / `--option` (before --data-root / --dataset-option) are hidden aliases with a note."""
    layouts.make_cuhk01(str(tmp_path), num_ids=10)
    new = ["info", "--dataset", "cuhk01", "--data-root", str(tmp_path), "--dataset-option", "split=half",
           "--dataset-option", f"split_file={tmp_path}"]
    assert main(new) == 0
    expected = capsys.readouterr()
    assert main(["info", "--dataset", "cuhk01", "--root", str(tmp_path), "--option", "split=half",
                 "--option", f"split_file={tmp_path}"]) == 0
    got = capsys.readouterr()
    assert got.out == expected.out and "split: half" in got.out
    assert "--root is deprecated" in got.err and "use --data-root" in got.err
    assert "--option is deprecated" in got.err and "use --dataset-option" in got.err
    assert "deprecated" not in expected.err
    with pytest.raises(SystemExit):
        main(["info", "--help"])
    help_text = capsys.readouterr().out
    assert "--data-root" in help_text and "--root" not in help_text and "--option" not in help_text  # hidden


def test_synthetic_info_defaults_to_data_folder(tmp_path, capsys, monkeypatch):
    """`synthetic` needs no --data-root (it is written under data/); the other datasets do."""
    monkeypatch.chdir(tmp_path)
    assert main(["info", "--dataset", "synthetic", "--dataset-option", "num_ids=6"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("synthetic at data\n") and "gt_bbox images kept for multi-query" in text
    assert os.path.isdir(tmp_path / "data" / "synthetic" / "market1501" / "Market-1501-v15.09.15")
    assert main(["info", "--dataset", "market1501"]) == 2
    assert "data_root is required for dataset market1501" in capsys.readouterr().err
