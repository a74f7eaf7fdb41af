"""Model families as trainer tasks: how to build, feed, evaluate and export each preset's model.

A task turns a resolved config (preset + recipe + flags) into
- `build(num_train_ids)` -> (compiled keras.Model, weights info dict), called inside the strategy scope;
- `train_dataset(records, initial_epoch, epochs, global_batch)` -> (tf.data.Dataset, steps_per_epoch);
- `evaluate(model, dataset, run_dir, plots)` -> metrics dict;
- `export(model, out_dir)`.
The runner (`training/runner.py`) does the rest identically for every family.
"""
from __future__ import annotations

import os

import numpy as np

FINAL_MODEL = "last.keras"  # the model a run evaluates and exports; the runner makes sure it exists


def make_task(config: dict):
    family = config.get("family")
    if family == "siamese":
        return SiameseTask(config)
    if family == "classifier":
        from reid_keras.training.classifier_task import ClassifierTask

        return ClassifierTask(config)
    if family == "idver":
        from reid_keras.training.idver_task import IdVerTask

        return IdVerTask(config)
    raise ValueError(f"preset {config.get('model')!r} has family {family!r}, which the trainer does not know")


class SiameseTask:
    """Siamese verification network of efficientnet_siamese_cuhk01.txt (pairs in, P(same) out)."""

    def __init__(self, config: dict):
        self.config = config
        self.image_size = tuple(config["image_size"])
        micro_batch_size(config["batch_size"], config.get("accumulate_steps", 1))  # fail before any work

    def build(self, num_train_ids: int):
        from reid_keras.models.siamese import build_siamese, compile_siamese

        c = self.config
        weights = None if str(c.get("weights")).lower() in ("none", "null") else c.get("weights")
        model, info = build_siamese(c["backbone"], self.image_size, weights=weights, dropout=c["dropout"],
                                    head=c["head"], pooling=c.get("pooling", "avg"),
                                    feature_dim=c.get("feature_dim"), return_weights_info=True)
        # XLA makes EfficientNet ~10x slower on CPU; GPUs may opt in through the preset.
        compile_siamese(model, learning_rate=c["learning_rate"], optimizer=c.get("optimizer", "rmsprop"),
                        jit_compile=c.get("jit_compile", False), accumulate_steps=c.get("accumulate_steps", 1))
        return model, info.to_dict()

    def train_dataset(self, records, initial_epoch: int, epochs: int, global_batch: int):
        from reid_keras.data.augment import AugmentConfig
        from reid_keras.data.pipelines import pair_dataset
        from reid_keras.data.samplers import PairRatioSchedule

        c = self.config
        ratio = c.get("pair_ratio", 1.0)
        schedule = PairRatioSchedule.idver() if ratio == "idver" else PairRatioSchedule.fixed(float(ratio))
        augment = AugmentConfig(**c["augment"]) if c.get("augment") else None
        pairs = c.get("pairs_per_epoch") or len(records)
        if c.get("steps_per_epoch"):
            pairs = c["steps_per_epoch"] * global_batch
        # With gradient accumulation the stream carries micro-batches; one update still sees global_batch pairs.
        micro_batch = micro_batch_size(global_batch, c.get("accumulate_steps", 1))
        ds = pair_dataset(records, self.image_size, micro_batch, pairs_per_epoch=pairs, schedule=schedule,
                          preprocess=c["preprocessing"], augment=augment, seed=c["seed"], epochs=epochs,
                          initial_epoch=initial_epoch)
        return ds, max(pairs // global_batch, 1) * (global_batch // micro_batch)

    # -- evaluation -------------------------------------------------------------------------
    def evaluate(self, model, dataset, run_dir: str, plots: bool = True) -> dict:
        """Embedding (cosine) evaluation with plots, plus ranking by the verification head itself."""
        from reid_keras.metrics import evaluate_ranking

        metrics = {"embedding_cosine": evaluate_embedding(model, dataset, run_dir, self.config, self.image_size,
                                                          plots)}
        embedding = model.get_layer("embedding")
        query, gallery = (self._raw_features(embedding, getattr(dataset, s)) for s in ("query", "gallery"))
        distmat = verification_distance(model, query, gallery)
        head = evaluate_ranking(distmat, query_pids=[r.pid for r in dataset.query],
                                gallery_pids=[r.pid for r in dataset.gallery],
                                query_cams=[r.camid for r in dataset.query],
                                gallery_cams=[r.camid for r in dataset.gallery])
        if dataset.name == "cuhk01":
            metrics["cuhk01_protocol"] = self._cuhk01_protocol(dataset, query, gallery, distmat)
        metrics["verification_head"] = {
            "rank1": float(head["cmc"][0]), "rank5": float(head["cmc"][4]), "rank10": float(head["cmc"][9]),
            "mAP": float(head["mAP"]), "mINP": float(head["mINP"]), "ap_variant": head["ap_variant"],
            "num_valid_queries": int(head["num_valid_queries"]),
            "num_invalid_queries": int(head["num_invalid_queries"])}
        return metrics

    def _cuhk01_protocol(self, dataset, query, gallery, distmat) -> dict:
        """PROTOCOLS.md (c): 10 seeded 100 x 100 trials scored by the verification head (the paper's way)."""
        from reid_keras.metrics.protocols import evaluate_cuhk01

        a_to_b = dataset.info.get("direction", "A->B") == "A->B"
        # evaluate_cuhk01 wants camera-A rows and camera-B columns whatever the direction.
        similarity = -distmat if a_to_b else -distmat.T
        pids_a = [r.pid for r in (dataset.query if a_to_b else dataset.gallery)]
        pids_b = [r.pid for r in (dataset.gallery if a_to_b else dataset.query)]
        result = evaluate_cuhk01(similarity, pids_a, pids_b, trials=10, seed=self.config["seed"],
                                 direction=dataset.info.get("direction", "A->B"))
        return {"scored_by": "verification head P(same)", "trials": result["trials"], "seed": result["seed"],
                "direction": result["direction"], "num_ids": result["num_ids"],
                "mean_std_percent": {k: [float(v[0]), float(v[1])] for k, v in result["table"].items()}}

    def _raw_features(self, embedding, records) -> np.ndarray:
        """Un-normalised embeddings (the head was trained on them), aligned with `records`."""
        from reid_keras.data.pipelines import image_dataset

        ds = image_dataset(records, self.image_size, 64, preprocess=self.config["preprocessing"], with_meta=True)
        features, index = [], []
        for images, meta in ds:
            features.append(np.asarray(embedding(images, training=False), dtype=np.float32))
            index.append(meta["index"].numpy())
        index = np.concatenate(index) if index else np.zeros(0, int)
        if len(index) != len(records):
            missing = sorted(set(range(len(records))) - set(index.tolist()))
            raise ValueError(f"{len(missing)} evaluation image(s) could not be decoded, e.g. {records[missing[0]].path}")
        return np.concatenate(features)[np.argsort(index)]

    @staticmethod
    def format_metrics(metrics: dict) -> str:
        rows = ["| ranking by | rank-1 | rank-5 | rank-10 | mAP | mINP |", "| --- | --- | --- | --- | --- | --- |"]
        for name, m in (("embedding, cosine", metrics["embedding_cosine"]),
                        ("verification head", metrics["verification_head"])):
            rows.append(f"| {name} | {100 * m['rank1']:.1f} | {100 * m['rank5']:.1f} | {100 * m['rank10']:.1f} | "
                        f"{100 * m['mAP']:.1f} | {100 * m['mINP']:.1f} |")
        return "\n".join(rows)

    def export(self, model, out_dir: str) -> None:
        from reid_keras.export import export_model

        export_model(model, out_dir, image_size=self.image_size, preprocessing=self.config["preprocessing"])


def evaluate_embedding(model, dataset, run_dir: str, config: dict, image_size, plots: bool = True) -> dict:
    """The model's "embedding" ranked by cosine through `reid_keras.evaluate.run` (table, plots, files
    under run_dir/evaluation), as `python -m reid_keras.evaluate` ranks the run's last.keras: the
    final model, the one that is evaluated and exported (`best.keras` is the lowest training loss)."""
    from reid_keras import evaluate as evaluation
    from reid_keras.models.loading import EmbeddingModel

    out = os.path.join(run_dir, "evaluation")
    options = [arg for key, value in (config.get("dataset_options") or {}).items()
               for arg in ("--dataset-option", f"{key}={value}")]
    args = evaluation.build_parser().parse_args(
        ["--model", os.path.join(run_dir, FINAL_MODEL), "--dataset", dataset.name, "--data-root", dataset.root,
         "--out", out, "--seed", str(config["seed"])] + options + ([] if plots else ["--no-plots"]))
    embedding = model.get_layer("embedding")
    wrapped = EmbeddingModel(embed_fn=lambda x: embedding(x, training=False), image_size=tuple(image_size),
                             preprocessing=config["preprocessing"], source=os.path.join(run_dir, FINAL_MODEL),
                             kind="keras")
    return evaluation.run(wrapped, dataset, out, args, tuple(image_size))


def format_embedding_metrics(metrics: dict) -> str:
    """One markdown row: the embedding's cosine ranking."""
    m = metrics["embedding_cosine"]
    return "\n".join([
        "| ranking by | rank-1 | rank-5 | rank-10 | mAP | mINP |", "| --- | --- | --- | --- | --- | --- |",
        f"| embedding, cosine | {100 * m['rank1']:.1f} | {100 * m['rank5']:.1f} | {100 * m['rank10']:.1f} | "
        f"{100 * m['mAP']:.1f} | {100 * m['mINP']:.1f} |"])


class EmbeddingEvaluation:
    """Task mixin: evaluate and report the model's "embedding" ranked by cosine (needs `config`, `image_size`)."""

    def evaluate(self, model, dataset, run_dir: str, plots: bool = True) -> dict:
        return {"embedding_cosine": evaluate_embedding(model, dataset, run_dir, self.config, self.image_size, plots)}

    @staticmethod
    def format_metrics(metrics: dict) -> str:
        return format_embedding_metrics(metrics)


def micro_batch_size(global_batch: int, accumulate_steps: int) -> int:
    """Pairs per fed batch when each update accumulates `accumulate_steps` batches of `global_batch`."""
    accumulate_steps = int(accumulate_steps or 1)
    if accumulate_steps < 1 or global_batch % accumulate_steps:
        raise ValueError(f"--accumulate-steps {accumulate_steps} must be >= 1 and divide --batch-size "
                         f"{global_batch}")
    return global_batch // accumulate_steps


def verification_distance(model, query_features: np.ndarray, gallery_features: np.ndarray) -> np.ndarray:
    """Rank-equivalent distance of the siamese head: -(logit(same) - logit(different)).

    The head computes `softmax(W^T (f1 - f2)^2 + b)`, so `logit_same - logit_diff = sum_k w_k
    (q_k - g_k)^2 + const` with `w = W[:, same] - W[:, different]` (sigmoid head: `w = W[:, 0]`).
    Expanding the square gives three matrix products instead of Q x G forward passes, and ranking by
    it equals ranking by the head's P(same) exactly (dropout is off at test time).
    """
    from reid_keras.models.siamese import SAME_INDEX

    kernel = np.asarray(model.get_layer("verification").kernel.numpy(), dtype=np.float64)
    w = kernel[:, SAME_INDEX] - kernel[:, 1 - SAME_INDEX] if kernel.shape[1] == 2 else kernel[:, 0]
    q = np.asarray(query_features, dtype=np.float64)
    g = np.asarray(gallery_features, dtype=np.float64)
    score = (q * q) @ w[:, None] + ((g * g) @ w)[None, :] - 2.0 * (q * w) @ g.T
    return (-score).astype(np.float32)
