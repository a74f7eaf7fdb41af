"""Experiment files: parsing, the train arguments they produce, the results table, a smoke run."""
import pytest

from reid_keras import experiment

SPEC = """
title = "T"
dataset = "cuhk01"
recipe = "paper"
weights = "imagenet"
dataset_options = { split = "paper871" }
metrics = ["rank1", "rank5"]

[[runs]]
model = "siamese_b0"
paper = { rank1 = 70.1, rank5 = 95.2 }

[[runs]]
model = "siamese_b5"
flags = { lr = 0.001 }
"""


def test_spec_to_train_arguments_and_table(tmp_path):
    path = tmp_path / "e.toml"
    path.write_text(SPEC)
    spec = experiment.load_experiment(str(path))
    argv = experiment.train_argv(spec, spec["runs"][1], "/d", "runs", smoke=False)
    assert argv == ["--model", "siamese_b5", "--dataset", "cuhk01", "--output", "runs", "--name", "siamese_b5",
                    "--preset", "paper", "--data-root", "/d", "--weights", "imagenet",
                    "--dataset-option", "split=paper871", "--lr", "0.001"]
    table = experiment.results_table(spec, [(spec["runs"][0], {"rank1": 61.25, "rank5": 90.0}),
                                            (spec["runs"][1], None)])
    assert "| siamese_b0 | paper | 70.1 | 95.2 |" in table
    assert "| siamese_b0 | ours | 61.2 | 90.0 |" in table or "| siamese_b0 | ours | 61.3 | 90.0 |" in table
    assert "| siamese_b5 | paper | – | – |" in table and "| siamese_b5 | ours | not run | not run |" in table
    cuhk01 = {"cuhk01_protocol": {"mean_std_percent": {"rank-1": [70.0, 2.0], "rank-5": [95.0, 1.0]}}}
    assert experiment.our_numbers(cuhk01) == {"rank1": 70.0, "rank5": 95.0}
    # Classic CUHK03: the paper protocol's numbers, not PROTOCOLS.md (a)'s; only metrics, never seeds.
    cuhk03 = {"embedding_cosine": {"rank1": 0.5, "mAP": 0.4, "seed": 3, "num_invalid_queries": 2,
                                   "dataset_protocol": {"mean_std": {"rank-1": [0.7, None], "mAP": [0.6, None]}}}}
    assert experiment.our_numbers(cuhk03) == {"rank1": 70.0, "mAP": 60.0}
    market = {"embedding_cosine": {"rank1": 0.5, "mAP": 0.25, "mINP": 0.1, "seed": 3, "num_invalid_queries": 2}}
    assert experiment.our_numbers(market) == {"rank1": 50.0, "mAP": 25.0, "mINP": 10.0}
    # Runs of one preset are told apart by their names, in the table and in --only.
    named = {"title": "t", "metrics": ["rank1"], "runs": [{"model": "resnet50_oim", "name": "oim_d128"},
                                                        {"model": "resnet50_oim", "name": "oim_d256"}]}
    table = experiment.results_table(named, [(named["runs"][0], {"rank1": 1.0}), (named["runs"][1], None)])
    assert "| oim_d128 | ours | 1.0 |" in table and "| oim_d256 | ours | not run |" in table


def test_bad_experiment_files_name_the_problem(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("title = 'x'\ndataset = 'cuhk01'\nmetrics = []\n[[runs]]\nname = 'a'\n")
    assert experiment.main([str(bad)]) == 2
    assert "has no 'model'" in capsys.readouterr().err
    assert experiment.main([str(tmp_path / "missing.toml")]) == 2
    assert "no experiment file" in capsys.readouterr().err


@pytest.mark.slow
def test_smoke_run_writes_results_table(tmp_path, monkeypatch):
    path = tmp_path / "e.toml"
    path.write_text(SPEC)
    monkeypatch.chdir(tmp_path)
    assert experiment.main([str(path), "--smoke", "--only", "siamese_b0", "--output", str(tmp_path / "runs"),
                            "--data-root", str(tmp_path / "data")]) == 0
    table = (tmp_path / "experiments" / "results" / "e_smoke.md").read_text()
    assert "| siamese_b0 | ours |" in table and "not run" in table  # b5 skipped by --only
    ours = [line for line in table.splitlines() if line.startswith("| siamese_b0 | ours |")][0]
    assert all(0.0 <= float(v) <= 100.0 for v in ours.strip("| ").split(" | ")[2:])
