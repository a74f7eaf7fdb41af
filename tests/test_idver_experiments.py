"""The identification+verification experiment files (paper Tables II-VI, §IV-B) and the synthetic-table
benchmark's table code: cheap checks, no training."""
import importlib.util
import pathlib

import pytest

from reid_keras import paper_tables
from reid_keras.cli import experiment
from reid_keras.cli.train import build_parser, config_from_args

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = ["idver_table2_market1501", "idver_market1501_protocols", "idver_cuhk03", "idver_distractors",
         "idver_contrastive"]
# Settings that decide what a run folder holds: two runs sharing a name (so the runner reuses one
# folder for both) must agree on all of them.
RUN_IDENTITY = ("model", "dataset", "recipe", "weights", "dataset_options", "losses", "verif_loss", "backbone",
                "epochs", "image_size", "batch_size", "learning_rate")


def _spec(name):
    return paper_tables.load_experiment(str(ROOT / "experiments" / f"{name}.toml"))


def _resolved(spec, run, smoke=False):
    argv = experiment.train_argv(spec, run, "/data/somewhere", "runs", smoke=smoke)
    return config_from_args(build_parser().parse_args(argv)).flat()


@pytest.mark.parametrize("name", FILES)
def test_every_run_parses_and_carries_the_paper_numbers(name):
    spec = _spec(name)
    assert spec["metrics"] and spec["runs"]
    names = [run.get("name", run["model"]) for run in spec["runs"]]
    assert len(set(names)) == len(names), f"{name}: two runs share a run folder: {names}"
    for run in spec["runs"]:
        for smoke in (False, True):
            config = _resolved(spec, run, smoke)
            assert config["family"] == "idver" and config["model"] == run["model"]
        assert set(run["paper"]) == set(spec["metrics"]), (name, run["name"])
        assert all(0 < v < 100 for v in run["paper"].values())
        for protocol in spec.get("protocols", [])[1:]:  # every extra column group has the paper's numbers
            assert set(run[f"paper_{protocol}"]) == set(spec["metrics"]), (name, run["name"], protocol)


def test_resolved_configs_follow_the_paper_and_the_flags():
    table2 = {run["name"]: _resolved(_spec("idver_table2_market1501"), run)
              for run in _spec("idver_table2_market1501")["runs"]}
    expected = {"resnet50_verif": ("resnet50", "verif", 75), "resnet50_id": ("resnet50", "id", 75),
                "resnet50_idver": ("resnet50", "id+verif", 75), "vgg16_verif": ("vgg16", "verif", 65),
                "vgg16_id": ("vgg16", "id", 65), "vgg16_idver": ("vgg16", "id+verif", 65),
                "caffenet_verif": ("caffenet", "verif", 155), "caffenet_id": ("caffenet", "id", 155),
                "caffenet_idver": ("caffenet", "id+verif", 155)}
    assert set(table2) == {f"idver-market1501-{short}" for short in expected}
    for short, (backbone, losses, epochs) in expected.items():
        c = table2[f"idver-market1501-{short}"]
        assert (c["backbone"], c["losses"], c["epochs"]) == (backbone, losses, epochs), short
        # §III-F: 224x224 crops and 48 pairs; CaffeNet 227x227 crops of 256x256 and 128 pairs
        size, batch = ((227, 227), 128) if backbone == "caffenet" else ((224, 224), 48)
        assert (c["dataset"], c["recipe"], c["weights"], c["image_size"]) == ("market1501", "paper", "imagenet", size)
        assert c["crop_scale"] == pytest.approx(256 / size[0])
        assert c["verif_loss"] == "crossentropy" and c["batch_size"] == batch and c["learning_rate"] == 1e-3
    spec = _spec("idver_contrastive")
    contrastive = {run["name"]: _resolved(spec, run) for run in spec["runs"]}
    assert contrastive["idver-market1501-resnet50_idver_contrastive"]["verif_loss"] == "contrastive"
    assert contrastive["idver-market1501-resnet50_idver"]["verif_loss"] == "crossentropy"
    cuhk = _spec("idver_cuhk03")
    for run in cuhk["runs"]:
        trainings = paper_tables.split_runs(cuhk, run)
        assert [t["name"] for t in trainings] == [f"{run['name']}-split{i:02d}" for i in range(20)]
        for i, training in enumerate(trainings):
            assert _resolved(cuhk, training)["dataset_options"] == {"protocol": "classic", "box_type": "detected",
                                                                    "split_index": i}
    smoke = _resolved(cuhk, cuhk["runs"][-1], smoke=True)  # smoke flags come last and win
    assert smoke["weights"] == "none" and smoke["image_size"] == (64, 32) and smoke["steps_per_epoch"] == 2
    caffenet = _resolved(cuhk, cuhk["runs"][0], smoke=True)  # CaffeNet's fc6 needs 227 pixels a side
    assert caffenet["backbone"] == "caffenet" and caffenet["image_size"] == (227, 227)


def test_runs_shared_between_files_are_the_same_training():
    seen = {}
    for name in FILES:
        spec = _spec(name)
        for run in spec["runs"]:
            config = _resolved(spec, run)
            identity = {k: config.get(k) for k in RUN_IDENTITY}
            if run["name"] in seen:
                assert identity == seen[run["name"]][1], f"{run['name']} differs in {name} and {seen[run['name']][0]}"
            else:
                seen[run["name"]] = (name, identity)
    # Table III, VI and the contrastive comparison reuse Table II's ResNet-50 runs
    assert {"idver-market1501-resnet50_id", "idver-market1501-resnet50_idver"} <= set(seen)
    assert seen["idver-market1501-resnet50_idver"][0] == "idver_table2_market1501"


def test_paper_numbers_against_the_tables():
    # Transcribed again here from identification_verification_embedding.txt (rank-1, mAP).
    table2 = {"idver-market1501-resnet50_verif": (64.58, 44.94), "idver-market1501-resnet50_id": (73.69, 51.48),
              "idver-market1501-resnet50_idver": (79.51, 59.87), "idver-market1501-vgg16_verif": (42.99, 24.29),
              "idver-market1501-vgg16_id": (65.02, 38.27), "idver-market1501-vgg16_idver": (70.16, 47.45),
              "idver-market1501-caffenet_verif": (41.24, 22.47), "idver-market1501-caffenet_id": (50.89, 26.79),
              "idver-market1501-caffenet_idver": (62.14, 39.61)}
    runs = {r["name"]: r for r in _spec("idver_table2_market1501")["runs"]}
    assert {n: (r["paper"]["rank1"], r["paper"]["mAP"]) for n, r in runs.items()} == table2
    mq = {r["name"]: r["paper_multi_query"] for r in _spec("idver_market1501_protocols")["runs"]}
    assert mq["idver-market1501-resnet50_idver"] == {"rank1": 85.84, "mAP": 70.33}
    assert mq["idver-market1501-vgg16_id"] == {"rank1": 74.14, "mAP": 52.25}
    assert mq["idver-market1501-caffenet_idver"] == {"rank1": 72.21, "mAP": 49.62}
    cuhk = {r["name"]: r for r in _spec("idver_cuhk03")["runs"]}
    best = cuhk["idver-cuhk03-resnet50_idver"]
    assert best["paper"] == {"rank1": 83.4, "rank5": 97.1, "rank10": 98.7, "mAP": 86.4}           # Table IV
    assert best["paper_multi_shot"] == {"rank1": 88.3, "rank5": 95.7, "rank10": 97.8, "mAP": 85.0}  # Table V
    caffenet = cuhk["idver-cuhk03-caffenet_id"]
    assert caffenet["paper"] == {"rank1": 35.8, "rank5": 65.3, "rank10": 77.96, "mAP": 42.6}
    assert caffenet["paper_multi_shot"] == {"rank1": 43.3, "rank5": 63.5, "rank10": 76.8, "mAP": 37.2}
    curve = {r["name"]: r["paper_gallery_curve"] for r in _spec("idver_distractors")["runs"]}
    ours = curve["idver-market1501-resnet50_idver"]
    # keyed by distractors added: the paper's galleries of 19,732 + 0 / 100k / 200k / 500k
    assert [ours[k]["mAP"] for k in ("0", "100000", "200000", "500000")] == [59.87, 52.28, 49.11, 45.24]
    assert curve["idver-market1501-resnet50_id"]["500000"] == {"rank1": 70.67, "mAP": 46.05}
    contrastive = {r["name"]: r["paper"] for r in _spec("idver_contrastive")["runs"]}
    drop = {k: round(contrastive["idver-market1501-resnet50_idver"][k]
                     - contrastive["idver-market1501-resnet50_idver_contrastive"][k], 2) for k in ("rank1", "mAP")}
    assert drop == {"rank1": 4.39, "mAP": 6.55}  # the drop §IV-B quotes


def test_results_table_puts_paper_and_ours_side_by_side():
    spec = _spec("idver_contrastive")
    table = paper_tables.results_table(spec, [(spec["runs"][0], [{None: {"rank1": 12.34, "mAP": 5.0}}]),
                                            (spec["runs"][1], [])])
    lines = table.splitlines()
    assert "| idver-market1501-resnet50_idver | paper | 79.5 | 59.9 |" in lines
    assert "| idver-market1501-resnet50_idver | ours | 12.3 | 5.0 |" in lines
    assert "| idver-market1501-resnet50_idver_contrastive | paper | 75.1 | 53.3 |" in lines
    assert "| idver-market1501-resnet50_idver_contrastive | ours | not run | not run |" in lines


def test_cuhk03_ours_row_is_the_single_shot_protocol_of_table_iv():
    # metrics.json of a classic-CUHK03 run: top level = docs/protocols.md (a), dataset_protocol = single-shot
    metrics = {"embedding_cosine": {"rank1": 0.9, "rank5": 0.95, "rank10": 0.97, "mAP": 0.8, "dataset_protocol": {
        "name": "CUHK03 classic single-shot", "mean_std": {"rank-1": [0.5, None], "rank-5": [0.75, None],
                                                            "rank-10": [0.875, None], "mAP": [0.625, None]}}}}
    ours = paper_tables.our_numbers(metrics)
    spec = _spec("idver_cuhk03")
    assert {k: ours[k] for k in spec["metrics"]} == {"rank1": 50.0, "rank5": 75.0, "rank10": 87.5, "mAP": 62.5}


def _benchmark():
    path = ROOT / "experiments" / "benchmarks" / "idver_synthetic_table.py"
    module_spec = importlib.util.spec_from_file_location("idver_synthetic_table", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_benchmark_table_and_arguments(capsys):
    bench = _benchmark()
    rows = [{"model": "resnet50_id", "rank1": 0.5, "mAP": 0.25, "mq_rank1": 0.625, "mq_mAP": 0.375,
             "train_seconds": 90.0, "wall": 150.0},
            {"model": "resnet50_verif", "error": "exit code 1: boom", "wall": 6.0},
            {"model": "colour histogram (stripes x HSV), no training", "rank1": 0.125, "mAP": 0.0625,
             "train_seconds": 0.0, "wall": 3.0}]
    lines = bench.format_table(rows).splitlines()
    assert lines[2] == "| resnet50_id — I (identification only) | 50.0 | 25.0 | 62.5 | 37.5 | 1.5 | 2.5 |"
    assert lines[3] == "| resnet50_verif — V (verification only) | failed | failed | failed | failed | – | 0.1 |"
    assert lines[4] == "| colour histogram (stripes x HSV), no training | 12.5 | 6.2 | – | – | 0.0 | 0.1 |"
    with pytest.raises(SystemExit):
        bench.main(["--models", "resnet50_id,siamese_b0"])
    assert "--models siamese_b0: expected some of resnet50_id" in capsys.readouterr().err
