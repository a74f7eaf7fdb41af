"""Model families declared once (reid_keras/families): the registry, typed recipes that refuse unknown keys,
the trainer's flag check, old run folders resuming, gradient accumulation for every family, and the
export endpoints and layer registration derived from the family."""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from reid_keras.cli import experiment
from reid_keras.cli import train
from reid_keras.families import families, get_preset, presets
from reid_keras.families.base import Preset
from reid_keras.families.config import config_from_json, resolve_config
from reid_keras.training.optimizers import learning_rate_schedule, micro_batch_size, split_batches

CONFIGS = pathlib.Path(__file__).resolve().parent / "fixtures" / "run_configs"
# config.json files written by reid_keras before the families registry (commit 0353da3), with the
# command line that wrote them.
OLD_RUNS = {
    "siamese_b0": "--model siamese_b0 --weights none --steps-per-epoch 2 --batch-size 4 --image-size 64x32 "
                  "--synthetic-ids 12 --seed 3 --epochs 3 --id-warmup-steps 2",
    "resnet50_idver": "--model resnet50_idver --dataset market1501 --data-root /data/market --preset paper "
                      "--losses id+verif --label-smoothing 0.1",
    "resnet50_oim": "--model resnet50_oim --weights none --epochs 1 --steps-per-epoch 2 --batch-size 4 "
                    "--image-size 64x32 --synthetic-ids 12 --oim-scale 30 --feature-dim none",
    "resnet50_triplet": "--model resnet50_triplet --dataset cuhk03 --data-root /data/cuhk03 --dataset-option "
                        "protocol=classic --dataset-option split_index=3 --triplet-margin 0.3 --lr 0.001",
}


def configured(argv):
    return train.config_from_args(train.build_parser().parse_args(argv))


def test_every_preset_belongs_to_exactly_one_family():
    known = families()
    assert list(known) == ["siamese", "idver", "classifier", "person_search"]
    table = presets()
    assert sum(len(f.presets) for f in known.values()) == len(table) == 15
    for name, (family, preset) in table.items():
        assert isinstance(preset.recipe, family.recipe), name
        for recipe in ("default", "paper"):
            assert isinstance(preset.resolve(recipe), family.recipe), (name, recipe)
    with pytest.raises(ValueError, match="unknown model family 'person'.*siamese, idver, classifier"):
        from reid_keras.families import get_family

        get_family("person")


def test_a_flag_the_family_does_not_read_is_an_error(capsys):
    assert train.main(["--model", "resnet50_oim", "--head", "sigmoid"]) == 2
    err = capsys.readouterr().err
    assert "--head does not apply to --model resnet50_oim (family classifier)" in err
    assert "--oim-scale" in err and "--triplet-margin" in err and "--verif-loss" not in err  # the flags it reads
    assert train.main(["--model", "resnet50_idver", "--feature-dim", "512"]) == 2
    err = capsys.readouterr().err
    assert "--feature-dim does not apply to --model resnet50_idver (family idver)" in err and "--verif-loss" in err
    assert train.main(["--model", "siamese_b0", "--losses", "id", "--oim-scale", "30"]) == 2
    assert "--losses, --oim-scale does not apply to --model siamese_b0 (family siamese)" in capsys.readouterr().err
    # Gradient accumulation is every family's now, so the same flag is read, not dropped.
    config = configured(["--model", "resnet50_oim", "--accumulate-steps", "4", "--batch-size", "8"])
    assert config.recipe.accumulate_steps == 4 and config.task().optimizer().gradient_accumulation_steps == 4
    assert train.main(["--model", "siamese_b0", "--synthetic-ids", "20", "--dataset", "cuhk01",
                       "--data-root", "/x"]) == 2
    assert "--synthetic-ids applies to --dataset synthetic" in capsys.readouterr().err


def test_unknown_recipe_keys_are_refused_by_name(tmp_path):
    _, preset = get_preset("resnet50_idver")
    with pytest.raises(ValueError, match=r"preset x: unknown recipe key\(s\) colour for a IdVerRecipe"):
        preset.recipe.replace(source="preset x", colour=1)
    with pytest.raises(ValueError, match="unknown recipe key.*oim_scale"):
        Preset(preset.recipe, paper="p", quick={"oim_scale": 30})
    with pytest.raises(ValueError, match="unknown recipe key.*feature_dim"):
        resolve_config("resnet50_idver", overrides={"feature_dim": 512})
    old = json.loads((CONFIGS / "resnet50_idver.json").read_text())
    with pytest.raises(ValueError, match=r"runs/x/config.json: unknown key\(s\) colour, eval_only for a idver run"):
        config_from_json({**old, "colour": "red", "eval_only": True}, source="runs/x/config.json")


@pytest.mark.parametrize("name", sorted(OLD_RUNS))
def test_a_config_json_written_before_the_registry_still_resumes(name, tmp_path):
    from reid_keras.training.run_folder import prepare_run_folder

    old = json.loads((CONFIGS / f"{name}.json").read_text())
    argv = OLD_RUNS[name].split() + ["--output", str(tmp_path / "runs"), "--name", name]
    config = configured(argv + ["--resume"])
    assert config.changes_from(old) == {}
    folder = tmp_path / "runs" / name
    folder.mkdir(parents=True)
    shutil.copy(CONFIGS / f"{name}.json", folder / "config.json")
    assert prepare_run_folder(config, name) == str(folder)
    written = json.loads((folder / "config.json").read_text())
    assert written["runtime_weights"] == old["runtime_weights"]           # the interrupted part's facts stay
    kept = [k for k in old if not k.startswith("runtime_") and k not in ("synthetic_ids", "dataset_options", "resume",
                                                                           "output", "triplet_margin")]
    assert {k: written[k] for k in kept} == {k: old[k] for k in kept}      # every old value, unchanged
    if "triplet_margin" in old:  # the command line's text "0.3" is now typed
        assert written["triplet_margin"] == float(old["triplet_margin"]) == 0.3
    assert written["dataset_options"] == ({"num_ids": 12} if "synthetic_ids" in old else old["dataset_options"])
    assert config_from_json(written).to_json() == config.to_json()         # today's file reads back the same
    with pytest.raises(ValueError, match=r"differs from the interrupted run \(learning_rate: "):
        prepare_run_folder(configured(argv + ["--resume", "--lr", "0.5"]), name)


def test_experiment_files_refuse_unknown_keys_and_flags(tmp_path, capsys):
    from reid_keras.paper_tables import load_experiment

    base = 'title = "t"\ndataset = "market1501"\nmetrics = ["rank1"]\n'
    path = tmp_path / "e.toml"
    path.write_text(base + 'splitz = 2\n[[runs]]\nmodel = "resnet50_oim"\n')
    with pytest.raises(ValueError, match="unknown top-level key 'splitz'"):
        load_experiment(str(path))
    path.write_text(base + '[[runs]]\nmodel = "resnet50_oim"\npaper_multi_query = { rank1 = 1.0 }\n')
    with pytest.raises(ValueError, match=r"unknown key of \[\[runs\]\] number 1 \(resnet50_oim\) 'paper_multi_query'"):
        load_experiment(str(path))
    for flags, message in (('{ colour = 1 }', "run resnet50_oim: unrecognized arguments: --colour 1"),
                           ('{ head = "sigmoid" }', "run resnet50_oim: --head does not apply"),
                           ('{ losses = "both" }', "run resnet50_oim: losses 'both'")):
        path.write_text(base + f'[[runs]]\nmodel = "resnet50_oim"\nflags = {flags}\n')
        assert experiment.main([str(path), "--data-root", str(tmp_path), "--output", str(tmp_path / "runs")]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "runs").exists()  # refused before anything trained


def test_gradient_accumulation_is_every_familys():
    for name in ("siamese_b0", "resnet50_idver", "resnet50_oim"):
        family, preset = get_preset(name)
        task = family.task(preset.resolve("default").replace(accumulate_steps=2))
        assert task.optimizer().gradient_accumulation_steps == 2, name
    with pytest.raises(ValueError, match="--accumulate-steps 3 must be >= 1 and divide --batch-size 32"):
        get_preset("resnet50_oim")[1].resolve().replace(accumulate_steps=3)
    # A P x K batch cut into micro-batches must keep whole identities for the triplet loss.
    family, preset = get_preset("resnet50_triplet")
    with pytest.raises(ValueError, match=r"P = 8 identities per batch is not a multiple of 16 slices"):
        family.task(preset.resolve().replace(accumulate_steps=16, batch_size=32)).check_batch_slices(1)
    family.task(preset.resolve().replace(accumulate_steps=4)).check_batch_slices(1)

    # Schedules count updates, not accumulated batches: the x0.1 boundary at update 2 is batch 4.
    plain = learning_rate_schedule(0.1, {"type": "step", "boundaries": [2], "factor": 0.1})
    per_update = learning_rate_schedule(0.1, {"type": "step", "boundaries": [2], "factor": 0.1}, accumulate_steps=2)
    assert [round(float(plain(s)), 6) for s in (2, 3)] == [0.1, 0.01]
    assert [round(float(per_update(s)), 6) for s in (2, 3, 5, 6)] == [0.1, 0.1, 0.1, 0.01]
    again = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(per_update))
    assert round(float(again(6)), 6) == 0.01

    # Micro-batches hold the same items in the same order.
    batches = tf.data.Dataset.from_tensor_slices(((np.arange(8.0), np.arange(8) * 10), np.arange(8))).batch(4)
    micro = list(split_batches(batches, 4, 2))
    assert [m[1].numpy().tolist() for m in micro] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [m[0][1].numpy().tolist() for m in micro][1] == [20, 30]
    assert split_batches(batches, 4, 1) is batches and micro_batch_size(4, 2) == 2


def test_export_endpoints_come_from_the_family(tmp_path, capsys):
    from reid_keras.cli import export as export_cli
    from reid_keras.models.idver import build_idver

    known = families()
    keras.utils.set_random_seed(0)
    with_head = build_idver(4, "vgg16", (32, 32), losses="id+verif")
    without = build_idver(4, "vgg16", (32, 32), losses="id")
    assert known["idver"].endpoints(with_head) == ("embed", "verify")
    assert known["idver"].endpoints(without) == ("embed",)
    assert known["classifier"].endpoints(with_head) == ("embed",)
    assert known["siamese"].task.verifier(with_head) is with_head
    path = tmp_path / "model.keras"
    without.save(path)
    with pytest.raises(SystemExit):  # outside a run folder the family must be named, not guessed
        export_cli.main(["--model", str(path), "--out", str(tmp_path / "out")])
    assert "pass --family, one of classifier, idver, person_search, siamese" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"family": "idver", "preprocessing": "caffe"}))
    assert export_cli.main(["--model", str(path), "--out", str(tmp_path / "out")]) == 0
    meta = json.loads((tmp_path / "out" / "reid_keras_export.json").read_text())
    assert list(meta["endpoints"]) == ["embed"] and meta["preprocessing"] == "caffe"


def test_register_serializables_imports_what_each_family_declares():
    modules = sorted({m for f in families().values() for m in f.serializables})
    assert "reid_keras.models.oim" in modules and "reid_keras.models.siamese" in modules
    script = ("import sys\nfrom reid_keras.families import register_serializables\nregister_serializables()\n"
              f"print(sorted(m for m in {modules!r} if m not in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr[-2000:]
