"""The siamese EfficientNet verification family (efficientnet_siamese_cuhk01.txt): recipe, presets, task.

`siamese_b0` ... `siamese_b5` follow §III.B-C: 160x80 inputs, RMSprop with learning rate 1e-4, batch 48,
18 epochs, horizontal flip / zoom / width-shift augmentation, positives balanced 1:1 with negatives,
2-way softmax verification loss. The model is `models/siamese.py`.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from reid_keras.families.base import Family, Preset, Recipe, Task, evaluate_embedding, markdown_table
from reid_keras.models.siamese import DEFAULT_DROPOUT, HEAD_METRICS, HEADS


@dataclasses.dataclass(frozen=True)
class SiameseRecipe(Recipe):
    """Recipe of a siamese verification run (defaults: §III.C and the authors' released code)."""

    backbone: object = "efficientnetb0"
    image_size: tuple = (160, 80)
    preprocessing: str = "efficientnet"  # pixels 0..255 in; EfficientNet normalises inside the model
    optimizer: str = "rmsprop"
    learning_rate: float = 1e-4
    momentum: float = 0.0  # Keras' SGD default: the paper trains with RMSprop
    batch_size: int = 48
    epochs: int = 18
    head: str = "softmax"  # §II.C 2-way softmax + cross-entropy; "sigmoid" = the authors' code
    # §II.C: a Dense on (f1 - f2)^2 ("free"); "nonneg": its weights >= 0, a learned diagonal metric that ranks
    head_metric: str = "free"
    dropout: float = DEFAULT_DROPOUT
    pooling: str = "avg"
    feature_dim: Optional[int] = None  # authors' code: a 4096-channel 1x1 conv before pooling
    pair_ratio: object = 1.0  # negatives per positive, or "idver" (1:1 growing x1.01 per epoch to 4:1)
    pairs_per_epoch: Optional[int] = None  # default: one pair per training image
    id_warmup_steps: int = 0  # identity warm-up steps without pretrained weights (training/warmup.py)
    id_warmup_lr: float = 1e-3

    def __post_init__(self):
        super().__post_init__()
        if self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}: expected one of {', '.join(HEADS)}")
        if self.head_metric not in HEAD_METRICS:
            raise ValueError(f"unknown head_metric {self.head_metric!r}: expected one of {', '.join(HEAD_METRICS)}")


# The main job's recipe: 2-core CPU, about 8 minutes. Without ImageNet weights, 800 steps of identity
# warm-up stand in for §II.B's ImageNet pretraining, then 600 siamese steps with the paper's optimizer.
# The head is the non-negative diagonal metric: the paper's free head cannot rank a gallery (models/siamese.py).
QUICK = {"image_size": (64, 32), "batch_size": 32, "epochs": 6, "steps_per_epoch": 100, "optimizer": "rmsprop",
         "learning_rate": 1e-4, "id_warmup_steps": 800, "head_metric": "nonneg"}


def _preset(size: str) -> Preset:
    return Preset(SiameseRecipe(
        backbone=f"efficientnet{size}",
        weights="imagenet",  # §II.B transfer learning from ImageNet
        # §III.B: horizontal flip, zoom, width shift; ranges not given (AugmentConfig.efficientnet_paper)
        augment={"flip": True, "zoom": 0.1, "width_shift": 0.1},
    ), paper="efficientnet_siamese_cuhk01.txt", quick=QUICK)


PRESETS = {f"siamese_b{i}": _preset(f"b{i}") for i in range(6)}


class SiameseTask(Task):
    """Pairs in, P(same) out; evaluated by the embedding (cosine) and by the verification head itself."""

    def build(self, num_train_ids: int):
        from reid_keras.models.siamese import build_siamese, compile_siamese

        r = self.recipe
        model, info = build_siamese(r.backbone, r.image_size, weights=r.backbone_weights, dropout=r.dropout,
                                    head=r.head, head_metric=r.head_metric, pooling=r.pooling, feature_dim=r.feature_dim,
                                    return_weights_info=True)
        compile_siamese(model, self.optimizer(), jit_compile=r.jit_compile)
        return model, info.to_dict()

    def train_dataset(self, records, initial_epoch: int, epochs: int, global_batch: int, initial_step: int = 0):
        from reid_keras.data.pipelines import pair_dataset
        from reid_keras.data.samplers import PairRatioSchedule

        r = self.recipe
        schedule = PairRatioSchedule.idver() if r.pair_ratio == "idver" else PairRatioSchedule.fixed(float(r.pair_ratio))
        pairs = r.steps_per_epoch * global_batch if r.steps_per_epoch else (r.pairs_per_epoch or len(records))
        ds = pair_dataset(records, r.image_size, global_batch, pairs_per_epoch=pairs, schedule=schedule,
                          preprocess=r.preprocessing, augment=r.augment_config(), seed=self.seed, epochs=epochs,
                          initial_epoch=initial_epoch, initial_step=initial_step)
        return ds, max(pairs // global_batch, 1)

    def prepare(self, model, dataset, weights_info: dict, strategy, verbose, checkpoints=None) -> Optional[dict]:
        """The identity warm-up (training/warmup.py), when the backbone got no pretrained weights; it resumes
        from and snapshots to `checkpoints`."""
        from reid_keras.training.warmup import identity_warmup, needs_warmup

        steps = needs_warmup(self.recipe.id_warmup_steps, weights_info)
        if not steps:
            return None
        return {"runtime_id_warmup": identity_warmup(model, dataset.train, dataset.num_train_ids, self.recipe,
                                                     self.seed, steps, strategy, verbose=verbose,
                                                     checkpoints=checkpoints)}

    def evaluate(self, model, dataset, run_dir: str, plots: bool = True) -> dict:
        from reid_keras.metrics.ranking import evaluate_ranking

        metrics = {"embedding_cosine": evaluate_embedding(model, dataset, run_dir, self.recipe, self.seed, plots)}
        embedding = model.get_layer("embedding")
        # The head ranks the same flip-averaged views as the cosine ranking above (EvaluationOptions.flip).
        query, gallery = (self._raw_features(embedding, getattr(dataset, s), flip=True) for s in ("query", "gallery"))
        distmat = verification_distance(model, query, gallery)
        head = evaluate_ranking(distmat, query_pids=[r.pid for r in dataset.query],
                                gallery_pids=[r.pid for r in dataset.gallery],
                                query_cams=[r.camid for r in dataset.query],
                                gallery_cams=[r.camid for r in dataset.gallery])
        trials = dataset.protocol("cuhk01_trials")
        if trials is not None:
            metrics["cuhk01_protocol"] = self._cuhk01_protocol(dataset, trials.options, distmat)
        metrics["verification_head"] = {
            "rank1": float(head["cmc"][0]), "rank5": float(head["cmc"][4]), "rank10": float(head["cmc"][9]),
            "mAP": float(head["mAP"]), "mINP": float(head["mINP"]), "ap_variant": head["ap_variant"],
            "num_valid_queries": int(head["num_valid_queries"]),
            "num_invalid_queries": int(head["num_invalid_queries"])}
        return metrics

    def _cuhk01_protocol(self, dataset, options: dict, distmat) -> dict:
        """docs/protocols.md (c): 10 seeded 100 x 100 trials scored by the verification head (the paper's way)."""
        from reid_keras.metrics.protocols import evaluate_cuhk01

        direction = options.get("direction", "A->B")
        a_to_b = direction == "A->B"
        # evaluate_cuhk01 wants camera-A rows and camera-B columns whatever the direction.
        similarity = -distmat if a_to_b else -distmat.T
        pids_a = [r.pid for r in (dataset.query if a_to_b else dataset.gallery)]
        pids_b = [r.pid for r in (dataset.gallery if a_to_b else dataset.query)]
        result = evaluate_cuhk01(similarity, pids_a, pids_b, trials=10, seed=self.seed, direction=direction)
        return {"scored_by": "verification head P(same)", "trials": result["trials"], "seed": result["seed"],
                "direction": result["direction"], "num_ids": result["num_ids"],
                "mean_std_percent": {k: [float(v[0]), float(v[1])] for k, v in result["table"].items()}}

    def _raw_features(self, embedding, records, flip: bool = False) -> np.ndarray:
        """Un-normalised embeddings (the head was trained on them), aligned with `records`; `flip` averages
        each image's with its mirror's, as the cosine evaluation does (metrics/features.py)."""
        import tensorflow as tf

        from reid_keras.data.pipelines import image_dataset

        ds = image_dataset(records, self.image_size, 64, preprocess=self.recipe.preprocessing, with_meta=True)
        features, index = [], []
        for images, meta in ds:
            out = np.asarray(embedding(images, training=False), dtype=np.float32)
            if flip:
                out = 0.5 * (out + np.asarray(embedding(tf.reverse(images, [2]), training=False), dtype=np.float32))
            features.append(out)
            index.append(meta["index"].numpy())
        index = np.concatenate(index) if index else np.zeros(0, int)
        if len(index) != len(records):
            missing = sorted(set(range(len(records))) - set(index.tolist()))
            raise ValueError(f"{len(missing)} evaluation image(s) could not be decoded, e.g. {records[missing[0]].path}")
        return np.concatenate(features)[np.argsort(index)]

    @staticmethod
    def verifier(model):
        return model  # the siamese model itself maps two images to P(same)

    @staticmethod
    def format_metrics(metrics: dict) -> str:
        return markdown_table([("embedding, cosine", metrics["embedding_cosine"]),
                               ("verification head", metrics["verification_head"])])


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


FAMILY = Family(name="siamese", recipe=SiameseRecipe, presets=PRESETS, task=SiameseTask,
                serializables=("reid_keras.models.siamese", "reid_keras.training.optimizers"))
