"""Experiment files: parsing, the train arguments they produce, the results table, a smoke run."""
import json
import statistics

import keras
import numpy as np
import pytest

from reid_keras import paper_tables
from reid_keras.cli import experiment

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
    spec = paper_tables.load_experiment(str(path))
    argv = experiment.train_argv(spec, spec["runs"][1], "/d", "runs", smoke=False)
    assert argv == ["--model", "siamese_b5", "--dataset", "cuhk01", "--output", "runs", "--name", "siamese_b5",
                    "--preset", "paper", "--data-root", "/d", "--weights", "imagenet",
                    "--dataset-option", "split=paper871", "--lr", "0.001"]
    table = paper_tables.results_table(spec, [(spec["runs"][0], [{None: {"rank1": 61.25, "rank5": 90.0}}]),
                                            (spec["runs"][1], [])])
    assert "| siamese_b0 | paper | 70.1 | 95.2 |" in table
    assert "| siamese_b0 | ours | 61.2 | 90.0 |" in table or "| siamese_b0 | ours | 61.3 | 90.0 |" in table
    assert "| siamese_b5 | paper | – | – |" in table and "| siamese_b5 | ours | not run | not run |" in table
    cuhk01 = {"cuhk01_protocol": {"mean_std_percent": {"rank-1": [70.0, 2.0], "rank-5": [95.0, 1.0]}}}
    assert paper_tables.our_numbers(cuhk01) == {"rank1": 70.0, "rank5": 95.0}
    # Classic CUHK03: the paper protocol's numbers, not docs/protocols.md (a)'s; only metrics, never seeds.
    cuhk03 = {"embedding_cosine": {"rank1": 0.5, "mAP": 0.4, "seed": 3, "num_invalid_queries": 2,
                                   "dataset_protocol": {"mean_std": {"rank-1": [0.7, None], "mAP": [0.6, None]}}}}
    assert paper_tables.our_numbers(cuhk03) == {"rank1": 70.0, "mAP": 60.0}
    market = {"embedding_cosine": {"rank1": 0.5, "mAP": 0.25, "mINP": 0.1, "seed": 3, "num_invalid_queries": 2}}
    assert paper_tables.our_numbers(market) == {"rank1": 50.0, "mAP": 25.0, "mINP": 10.0}
    # Runs of one preset are told apart by their names, in the table and in --only.
    named = {"title": "t", "metrics": ["rank1"], "runs": [{"model": "resnet50_oim", "name": "oim_d128"},
                                                        {"model": "resnet50_oim", "name": "oim_d256"}]}
    table = paper_tables.results_table(named, [(named["runs"][0], [{None: {"rank1": 1.0}}]), (named["runs"][1], [])])
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
    """One real training through the runner, with the multi-query column group and the gallery curve:
    the curve's +0 tier re-evaluates the run's own model, so it must equal the run's headline numbers."""
    path = tmp_path / "e.toml"
    path.write_text(SPEC.replace('metrics = ["rank1", "rank5"]', 'metrics = ["rank1", "mAP"]\n'
                                 'protocols = ["single_query", "multi_query"]\ngallery_curve = true'))
    distractors = tmp_path / "distractors"
    distractors.mkdir()
    for i in range(5):
        keras.utils.save_img(str(distractors / f"d{i}.jpg"), np.random.default_rng(i).integers(0, 255, (64, 32, 3)))
    monkeypatch.chdir(tmp_path)
    assert experiment.main([str(path), "--smoke", "--only", "siamese_b0", "--output", str(tmp_path / "runs"),
                            "--data-root", str(tmp_path / "data"), "--distractors", str(distractors)]) == 0
    lines = (tmp_path / "experiments" / "results" / "e_smoke.md").read_text().splitlines()
    assert "| siamese_b5 | ours | not run | not run | not run | not run |" in lines  # skipped by --only
    ours = [line for line in lines if line.startswith("| siamese_b0 | ours |")]
    assert len(ours) == 2  # the results row and the gallery-curve row
    cells = [float(v) for v in ours[0].strip("| ").split(" | ")[2:]]
    assert len(cells) == 4 and all(0.0 <= v <= 100.0 for v in cells)  # single query and multi-query
    metrics = json.loads((tmp_path / "runs" / "siamese_b0" / "metrics.json").read_text())["embedding_cosine"]
    assert metrics["multi_query"]["pool_images"] > 0
    curve = json.loads((tmp_path / "runs" / "siamese_b0" / "eval_distractors" / "metrics.json").read_text())
    tiers = curve["gallery_size_curve"]
    assert [t["distractors"] for t in tiers][-1] == 5 and tiers[0]["distractors"] == 0
    assert tiers[0]["rank1"] == pytest.approx(metrics["rank1"], abs=1e-6)
    assert tiers[0]["mAP"] == pytest.approx(metrics["mAP"], abs=1e-6)
    assert ours[1].split(" | ")[2] == f"{100 * metrics['rank1']:.1f} / {100 * metrics['mAP']:.1f}"


SPLITS_SPEC = """
title = "CUHK03"
dataset = "cuhk03"
dataset_options = { protocol = "classic" }
splits = 3
protocols = ["single_shot", "multi_shot"]
metrics = ["rank1", "mAP"]

[[runs]]
model = "resnet50_idver"
name = "r"
paper = { rank1 = 83.4, mAP = 86.4 }
paper_multi_shot = { rank1 = 88.3, mAP = 85.0 }

[[runs]]
model = "resnet50_id"
name = "baseline"
"""


def _finished_run(folder, single, multi=None):
    """A run folder as the trainer leaves it (config.json + metrics.json): the runner reuses it."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    protocol = {"mean_std": {"rank-1": [single[0], None], "mAP": [single[1], None]}}
    if multi is not None:
        protocol["multi_shot"] = {"mean_std": {"rank-1": [multi[0], None], "mAP": [multi[1], None]}}
    metrics = {"embedding_cosine": {"rank1": 0.01, "mAP": 0.01, "dataset_protocol": protocol}}
    (folder / "metrics.json").write_text(json.dumps(metrics))


def test_splits_are_trained_apart_and_averaged_with_their_sd(tmp_path):
    path = tmp_path / "e.toml"
    path.write_text(SPLITS_SPEC)
    spec = paper_tables.load_experiment(str(path))
    trainings = paper_tables.split_runs(spec, spec["runs"][0])
    assert [t["name"] for t in trainings] == ["r-split00", "r-split01", "r-split02"]
    assert [experiment.train_argv(spec, t, "/d", "o", False)[-2:] for t in trainings] == [
        ["--dataset-option", f"split_index={i}"] for i in range(3)]
    assert len(paper_tables.split_runs(spec, spec["runs"][0], smoke=True)) == paper_tables.SMOKE_SPLITS

    single = [(0.5, 0.625), (0.75, 0.5), (0.25, 0.375)]
    multi = [(0.8, 0.7), (0.6, 0.5), None]            # split 2 did not compute multi-shot
    for i, (s, m) in enumerate(zip(single, multi)):
        _finished_run(tmp_path / "runs" / f"r-split{i:02d}", s, m)
    out = tmp_path / "table.md"
    assert experiment.main([str(path), "--output", str(tmp_path / "runs"), "--results", str(out),
                            "--only", "r"]) == 0  # nothing to train: every split's folder is finished
    lines = out.read_text().splitlines()
    assert "| model | source | single shot rank1 | single shot mAP | multi shot rank1 | multi shot mAP |" in lines
    assert "| r | paper | 83.4 | 86.4 | 88.3 | 85.0 |" in lines
    r1 = [100 * s[0] for s in single]
    ap = [100 * s[1] for s in single]
    cells = [f"{statistics.mean(r1):.1f} ± {statistics.stdev(r1):.1f}",
             f"{statistics.mean(ap):.1f} ± {statistics.stdev(ap):.1f}",
             f"{70.0:.1f} ± {statistics.stdev([80.0, 60.0]):.1f} (2 of 3 splits)",
             f"{60.0:.1f} ± {statistics.stdev([70.0, 50.0]):.1f} (2 of 3 splits)"]
    assert f"| r | ours, mean ± sd of 3 splits | {' | '.join(cells)} |" in lines
    assert "| baseline | ours | not run | not run | not run | not run |" in lines


def test_protocols_read_from_metrics_and_missing_ones_say_so():
    metrics = {"embedding_cosine": {"rank1": 0.5, "mAP": 0.25,
                                    "multi_query": {"mean_std": {"rank-1": [0.75, None], "mAP": [0.5, None]}}}}
    spec = {"title": "t", "metrics": ["rank1", "mAP"], "protocols": ["single_query", "multi_query", "multi_shot"],
            "runs": [{"model": "m"}]}
    numbers = paper_tables.split_numbers(spec, metrics)
    assert numbers == {"single_query": {"rank1": 50.0, "mAP": 25.0}, "multi_query": {"rank1": 75.0, "mAP": 50.0},
                       "multi_shot": None}
    table = paper_tables.results_table(spec, [(spec["runs"][0], [numbers])])
    assert "| m | ours | 50.0 | 25.0 | 75.0 | 50.0 | not computed | not computed |" in table


def test_gallery_curve_table_and_its_required_folder(tmp_path, capsys):
    run = {"model": "resnet50_idver", "name": "iv",
           "paper_gallery_curve": {"0": {"rank1": 79.51, "mAP": 59.87}, "500000": {"rank1": 68.26, "mAP": 45.24}}}
    ours = [{"distractors": 0, "gallery_size": 100, "rank1": 0.5, "mAP": 0.25},
            {"distractors": 40, "gallery_size": 140, "rank1": 0.375, "mAP": 0.125}]
    lines = paper_tables.gallery_curve_table([(run, ours), (dict(run, name="other"), None)]).splitlines()
    assert "| model | source | +0 | +40 | +500,000 |" in lines
    assert "| iv | paper | 79.5 / 59.9 | – | 68.3 / 45.2 |" in lines
    assert "| iv | ours | 50.0 / 25.0 | 37.5 / 12.5 | – |" in lines
    assert "| other | ours | not run | not run | not run |" in lines
    path = tmp_path / "e.toml"
    path.write_text(SPEC.replace('metrics = ["rank1", "rank5"]', 'metrics = ["rank1", "rank5"]\ngallery_curve = true'))
    assert experiment.main([str(path), "--output", str(tmp_path / "runs")]) == 2
    assert "pass --distractors DIR" in capsys.readouterr().err


@pytest.mark.parametrize("line, message", [("splits = 0", "'splits' must be a positive integer"),
                                           ("protocols = 'multi_query'", "'protocols' must be a list"),
                                           ("gallery_curve = 'yes'", "'gallery_curve' must be true or false")])
def test_bad_optional_keys_name_the_problem(tmp_path, line, message):
    path = tmp_path / "e.toml"
    path.write_text(SPEC.replace('metrics = ["rank1", "rank5"]', f'metrics = ["rank1", "rank5"]\n{line}'))
    with pytest.raises(ValueError, match=message):
        paper_tables.load_experiment(str(path))
