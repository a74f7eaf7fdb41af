"""Every Colab notebook runs top to bottom in smoke mode (synthetic data, weights none, few steps).

The notebooks read `REID_KERAS_SMOKE=1` in their parameter cell and shrink the run; they also
skip the install cell's `pip install` then, because the package under test is already installed.
"""
import json
import os
import pathlib
import sys

import pytest

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parents[1] / "colab"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks under {NOTEBOOK_DIR}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(path, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(str(path), as_version=4)
    monkeypatch.setenv("REID_KERAS_SMOKE", "1")
    monkeypatch.setenv("REID_KERAS_WORKDIR", str(tmp_path))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors, json.dumps(errors[:1], indent=1)[:2000]
    # Every smoke run ends by printing a line starting with SMOKE-OK and the run folder.
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "SMOKE-OK" in text, text[-2000:]
    run_dir = text.split("SMOKE-OK", 1)[1].split()[0]
    assert os.path.isdir(run_dir), run_dir
