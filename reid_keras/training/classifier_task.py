"""Trainer task of the single-image model family (`models/classifier.py`): ID / triplet / OIM losses.

Config keys read (defaults in brackets; presets in `models/classifier.py` `CLASSIFIER_PRESETS`):
model — "backbone", "weights" [None], "image_size", "losses" ["id"], "feature_dim" [None],
"pooling" ["avg"], "dropout" [0.5], "bnneck" [True], "oim_momentum" [0.5], "oim_scale" [None],
"oim_temperature" [None]; loss — "label_smoothing" [0.0], "triplet_margin" [0.3], "loss_weights"
[1 per head]; optimizer — "optimizer" ["adam"], "learning_rate", "momentum" [0.9],
"weight_decay" [None], "lr_schedule" [None], "jit_compile" [False]; data — "sampler" ["pk"] with
"P", "K" (the global batch must be P*K) and "drop_small_ids" [False], or "random" (shuffled
images), "steps_per_epoch" [one pass over the images], "augment" [None], "preprocessing", "seed".
"""
from __future__ import annotations

from reid_keras.training.tasks import EmbeddingEvaluation


SAMPLERS = ("pk", "random")


class ClassifierTask(EmbeddingEvaluation):
    """Builds, feeds, evaluates and exports a `build_classifier` model (trainer contract, tasks.py)."""

    def __init__(self, config: dict):
        from reid_keras.models.classifier import parse_losses

        self.config = config
        self.image_size = tuple(config["image_size"])
        self.heads = parse_losses(config.get("losses", "id"))
        self.sampler = str(config.get("sampler", "pk")).lower()
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler {config.get('sampler')!r}: expected one of {', '.join(SAMPLERS)}")
        if self.sampler == "random" and "triplet" in self.heads:
            raise ValueError("losses with 'triplet' need P x K batches (sampler 'pk'): random batches rarely hold "
                             "two images of one identity, so almost every anchor would have no positive")

    def check_replicas(self, num_replicas: int) -> None:
        """Batch-hard triplet mines within each replica's contiguous slice of the P x K batch: only with P a
        multiple of the replica count does every slice hold whole identities (all K-1 positives)."""
        P = int(self.config.get("P") or 0)
        if "triplet" in self.heads and self.sampler == "pk" and num_replicas > 1 and P % num_replicas:
            raise ValueError(f"P = {P} identities per batch is not a multiple of the {num_replicas} replicas: the "
                             "triplet loss mines each replica's slice of the batch, which would split identities; "
                             f"use P = {num_replicas * max(1, round(P / num_replicas))} (and --batch-size P*K)")

    def build(self, num_train_ids: int):
        import tensorflow as tf

        from reid_keras.models.classifier import build_classifier, compile_classifier

        self.check_replicas(tf.distribute.get_strategy().num_replicas_in_sync)  # build runs in the strategy scope
        c = self.config
        weights = None if str(c.get("weights")).lower() in ("none", "null") else c.get("weights")
        model, info = build_classifier(
            num_train_ids, c["backbone"], self.image_size, weights=weights, losses=self.heads,
            feature_dim=c.get("feature_dim"), pooling=c.get("pooling", "avg"), dropout=c.get("dropout", 0.5),
            bnneck=c.get("bnneck", True), oim_momentum=c.get("oim_momentum", 0.5), oim_scale=c.get("oim_scale"),
            oim_temperature=c.get("oim_temperature"), return_weights_info=True)
        compile_classifier(model, c["learning_rate"], optimizer=c.get("optimizer", "adam"),
                           label_smoothing=c.get("label_smoothing", 0.0), triplet_margin=c.get("triplet_margin", 0.3),
                           loss_weights=c.get("loss_weights"), momentum=c.get("momentum", 0.9),
                           weight_decay=c.get("weight_decay"), lr_schedule=c.get("lr_schedule"),
                           jit_compile=c.get("jit_compile", False))
        return model, info.to_dict()

    def train_dataset(self, records, initial_epoch: int, epochs: int, global_batch: int):
        """`((images[, pids]), {head: pids})` batches and the steps per epoch.

        Under MirroredStrategy each replica gets a contiguous slice of the P x K batch; with P a
        multiple of the replica count every slice holds whole identities, so the batch-hard mining of
        each replica (see `BatchHardTripletLoss`) still finds all K-1 positives of every anchor.
        """
        from reid_keras.data.augment import AugmentConfig
        from reid_keras.data.pipelines import image_dataset, pk_dataset

        c = self.config
        augment = AugmentConfig(**c["augment"]) if c.get("augment") else None
        if self.sampler == "pk":
            P, K = int(c["P"]), int(c["K"])
            if int(global_batch) != P * K:
                raise ValueError(f"batch size {global_batch} != P x K = {P} x {K} = {P * K}: with the P x K "
                                 "sampler the batch is P identities x K images; set --batch-size to P*K or "
                                 "change P / K")
            steps = c.get("steps_per_epoch") or max(len(records) // (P * K), 1)
            ds = pk_dataset(records, P, K, self.image_size, preprocess=c["preprocessing"], augment=augment,
                            seed=c["seed"], epochs=epochs, initial_epoch=initial_epoch, batches_per_epoch=steps,
                            drop_small_ids=c.get("drop_small_ids", False))
        else:
            steps = c.get("steps_per_epoch") or max(len(records) // int(global_batch), 1)
            # A resumed run reshuffles from another seed instead of replaying epoch 0's order.
            ds = image_dataset(records, self.image_size, global_batch, preprocess=c["preprocessing"],
                               augment=augment, shuffle=True, seed=int(c["seed"]) + int(initial_epoch),
                               drop_remainder=True).repeat()
        heads, with_pid = self.heads, "oim" in self.heads

        def to_model(images, pids):
            return ((images, pids) if with_pid else images), {h: pids for h in heads}

        return ds.map(to_model), int(steps)

    def export(self, model, out_dir: str) -> None:
        from reid_keras.export import export_model

        export_model(model, out_dir, image_size=self.image_size, preprocessing=self.config["preprocessing"])
