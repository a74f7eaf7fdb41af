"""The evaluation library: `EvaluationOptions` checks, the dataset-protocol registry, and
`evaluate_model` on the registered `synthetic` dataset (the trainer's path, no command line)."""
import csv
import dataclasses
import json
import os

import numpy as np
import pytest

from reid_keras.data.datasets import load_dataset
from reid_keras.data.datasets.base import EvaluationProtocol, ImageRecord, ReidDataset
from reid_keras.metrics import EvaluationError, EvaluationOptions, evaluate_model
from reid_keras.metrics.dataset_protocols import DATASET_PROTOCOLS, ProtocolInputs, run_protocols
from reid_keras.metrics.features import FeatureSet
from reid_keras.metrics.protocols import evaluate_cuhk01

IMAGE_SIZE = (32, 16)


def grid_colours(images):
    """A cheap deterministic embedding: mean colour of 4 x 2 cells (not flip invariant)."""
    x = np.asarray(images, dtype=np.float32)
    n, h, w, _ = x.shape
    return x.reshape(n, 4, h // 4, 2, w // 2, 3).mean(axis=(2, 4)).reshape(n, -1) - 110.0


def stand_in_model(folder, image_size=IMAGE_SIZE):
    from reid_keras.models.loading import EmbeddingModel

    source = os.path.join(folder, "model.keras")
    with open(source, "wb") as handle:
        handle.write(b"stand-in: the feature cache key needs a file")
    return EmbeddingModel(embed_fn=grid_colours, image_size=image_size, preprocessing=None, source=source,
                          kind="keras")


# ------------------------------------------------------------------------------ options

def test_options_defaults_are_the_commands():
    options = EvaluationOptions()
    assert (options.batch_size, options.flip, options.max_rank, options.ap, options.multi_query) == (
        64, True, 50, "non-interpolated", "mean")
    assert (options.rerank, options.rerank_k1, options.rerank_k2, options.rerank_lambda) == (False, 20, 6, 0.3)
    assert options.distractors is None and options.plots and options.seed == 0 and options.results_csv is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.seed = 1
    assert EvaluationOptions(distractor_sizes=[0, 5]).distractor_sizes == (0, 5)


@pytest.mark.parametrize("field, value", [
    ("batch_size", 0), ("batch_size", 2.5), ("max_rank", True), ("ap", "interpolated"), ("rerank_k1", 0),
    ("rerank_k2", -1), ("rerank_lambda", 1.5), ("qe_top_k", 0), ("multi_query", "median"), ("flip", "yes"),
    ("memory_budget_mb", 0), ("tsne_points", -1), ("seed", -1), ("distractor_sizes", "0,100"),
    ("distractor_sizes", (10, -1)), ("distractor_sizes", ()), ("distractors", 3), ("plots", None),
])
def test_bad_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"EvaluationOptions.{field} "):
        EvaluationOptions(**{field: value})


# ------------------------------------------------------------------------------ protocol registry

def test_unknown_protocol_is_refused_before_any_work(tmp_path):
    record = ImageRecord(str(tmp_path / "a.jpg"), 1, 0)
    dataset = ReidDataset(name="viper", root=str(tmp_path), train=[], query=[record], gallery=[record],
                          protocols=(EvaluationProtocol("viper_trials", {"trials": 10}),))
    model = stand_in_model(str(tmp_path))
    with pytest.raises(EvaluationError, match="dataset viper declares the evaluation protocol 'viper_trials', "
                                              "which reid_keras.metrics.dataset_protocols does not implement"):
        evaluate_model(model, dataset, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    assert {"cuhk01_trials", "cuhk03_classic", "multi_query"} <= set(DATASET_PROTOCOLS)


def test_registry_runs_cuhk01_in_the_declared_direction():
    rng = np.random.default_rng(0)
    pids = np.repeat(np.arange(1, 9), 2)

    def split(cam):
        feats = rng.normal(size=(len(pids), 5)).astype(np.float32)
        return FeatureSet(feats / np.linalg.norm(feats, axis=1, keepdims=True), pids, np.full(len(pids), cam),
                          np.array([]))

    a, b = split(0), split(1)
    options = EvaluationOptions(seed=4)
    for direction, (query, gallery) in (("A->B", (a, b)), ("B->A", (b, a))):
        got = run_protocols((EvaluationProtocol("cuhk01_trials", {"direction": direction}),),
                            ProtocolInputs(query, gallery, options, embed=None))
        direct = evaluate_cuhk01(features_a=a.features, pids_a=pids, features_b=b.features, pids_b=pids,
                                 trials=10, seed=4, direction=direction)
        entry = got["dataset_protocol"]
        assert list(got) == ["dataset_protocol"] and direction in entry["name"]
        for key, (mean, std) in direct["table"].items():
            assert entry["mean_std"][key] == pytest.approx([mean / 100, std / 100])


# ------------------------------------------------------------------------------ evaluate_model

@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    base = tmp_path_factory.mktemp("synthetic")
    dataset = load_dataset("synthetic", str(base / "data"), num_ids=10)
    return {"base": base, "dataset": dataset, "model": stand_in_model(str(base))}


def test_evaluate_model_on_the_synthetic_dataset(synthetic, tmp_path):
    out = str(tmp_path / "eval")
    metrics = evaluate_model(synthetic["model"], synthetic["dataset"], out,
                             EvaluationOptions(plots=False, batch_size=16, seed=2, results_csv=str(tmp_path / "r.csv")))
    assert metrics["dataset"] == "synthetic" and metrics["dataset_options"] == {"num_ids": 10}
    assert metrics["data_root"] == str(synthetic["base"] / "data") and metrics["image_size"] == list(IMAGE_SIZE)
    assert metrics["variant"] == "baseline" and metrics["seed"] == 2 and "plots" not in metrics
    assert metrics["multi_query"]["pooling"] == "mean"  # the synthetic Market has gt_bbox/
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as handle:
        written = json.load(handle)
    assert list(written) == list(metrics) and written["mAP"] == pytest.approx(metrics["mAP"])
    with open(tmp_path / "r.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and rows[0]["dataset"] == "synthetic" and float(rows[0]["mAP"]) == pytest.approx(
        metrics["mAP"], abs=1e-6)
    assert sorted(f for f in os.listdir(out) if f.endswith(".npz")) == [
        "features_gallery.npz", "features_multi_query.npz", "features_query.npz"]


def test_evaluate_model_errors(synthetic, tmp_path):
    model, dataset = synthetic["model"], synthetic["dataset"]
    with pytest.raises(EvaluationError, match="image_size is needed"):
        evaluate_model(dataclasses.replace(model, image_size=None), dataset, str(tmp_path / "a"))
    with pytest.raises(EvaluationError, match="the gallery split is empty"):
        evaluate_model(model, dataclasses.replace(dataset, gallery=[]), str(tmp_path / "b"))
    with pytest.raises(EvaluationError, match="distractors .* is not a folder of images"):
        evaluate_model(model, dataset, str(tmp_path / "c"), EvaluationOptions(distractors=str(tmp_path / "none")))
    no_match = [r for r in dataset.gallery if r.pid <= 0]  # every query invalid
    with pytest.raises(EvaluationError, match="cannot rank this dataset: .*no valid query"):
        evaluate_model(model, dataclasses.replace(dataset, gallery=no_match), str(tmp_path / "d"),
                       EvaluationOptions(plots=False))
