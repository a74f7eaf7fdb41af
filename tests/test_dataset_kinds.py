"""A person-search dataset given to a crop model (or to the crop evaluation) is refused by name,
before any run folder or evaluation folder is made."""
import os

from reid_keras.cli import evaluate, train
from tests.scene_trees import make_cuhk_sysu


def test_crop_family_refuses_scene_dataset(tmp_path, capsys, monkeypatch):
    root = make_cuhk_sysu(str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)
    code = train.main(["--model", "resnet50_oim", "--dataset", "cuhk_sysu", "--data-root", root, "--epochs", "1"])
    err = capsys.readouterr().err
    assert code == 2
    assert ("dataset 'cuhk_sysu' holds whole scenes with boxes (a person-search dataset), but model "
            "'resnet50_oim' (family classifier) trains on person crops (a re-ID dataset)") in err
    assert not os.path.exists(tmp_path / "runs")


def test_crop_evaluation_refuses_scene_dataset(tmp_path, capsys):
    root = make_cuhk_sysu(str(tmp_path / "data"))
    model = tmp_path / "m.keras"
    model.write_bytes(b"")
    code = evaluate.main(["--model", str(model), "--dataset", "cuhk_sysu", "--data-root", root,
                          "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "--dataset cuhk_sysu holds whole scenes for person search" in err
    assert "python -m reid_keras.evaluate_search" in err
    assert not os.path.exists(tmp_path / "out")
