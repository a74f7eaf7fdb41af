"""The joint detection + identification network of the OIM paper (§3, Fig. 2), as one Keras model.

    images -> ResNet-50 stem (conv1..conv4_x, frozen BN) -> RPN -> proposals (no gradient)
           -> RoI align 14 x 14 -> conv5_x + pooling (2048-d) -> box predictor + 256-d id-feat -> OIM

`build_person_search_model(PersonSearchConfig(num_ids=...))` returns a `PersonSearchModel`:

- training: `model.compile(optimizer)` then `model.fit(scene_train_dataset(...))`; each element is
  the scene pipeline's dict (ground truth inside). `call(batch, training=True)` labels and samples
  anchors and proposals in the graph (`sampling.py`, seeds from `optimizer.iterations` and the
  replica), updates the OIM memory and returns the five losses; `compute_loss` weights them.
  Reported: loss, rpn_objectness, rpn_box, box_classification, box_regression, oim, oim_accuracy.
- inference: `detect(images, image_shape)` and `embed_query(images, image_shape, boxes)`.

Several replicas (MirroredStrategy): Keras sums the replicas' gradients. The four detection losses
are means over each replica's own samples (fixed counts per image), so they are divided by the
number of replicas; the OIM loss is already normalised by the labeled RoIs of the global batch
(`losses.oim_loss` all-reduces the count) and the memory update sees the global batch
(`OIMMemory` all-gathers). The summed gradient is then the global-batch gradient. Anchors and RoIs are
sampled per image from (seed, step, global image index), and conv5's BatchNorm statistics are
synchronised, so a batch split over replicas gives the single-device losses up to float rounding
(per-replica counts of sampled anchors / RoIs are equal: fixed numbers per image, unless an image
lacks candidates).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import keras
import tensorflow as tf

from reid_keras.losses import oim_loss
from reid_keras.models.oim import OIMAccuracy, OIMMemory
from reid_keras.models.person_search import rpn
from reid_keras.models.person_search.backbone import STEM_STRIDE, build_resnet50, split_resnet50
from reid_keras.models.person_search.boxes import clip_boxes, generate_anchors
from reid_keras.models.person_search.detector_outputs import select_detections
from reid_keras.models.person_search.heads import BoxPredictor, EmbeddingHead
from reid_keras.models.person_search.losses import (box_classification_loss, box_regression_loss,
                                                    rpn_box_loss, rpn_objectness_loss)
from reid_keras.models.person_search.roi_align import RoIAlign
from reid_keras.models.person_search.sampling import anchor_targets, roi_targets

LOSS_NAMES = ("rpn_objectness", "rpn_box", "box_classification", "box_regression", "oim")
DETECTION_LOSSES = LOSS_NAMES[:4]
TRAINING_KEYS = ("images", "image_shape", "boxes", "pids", "box_mask")


def _default_loss_weights() -> dict:
    return {name: 1.0 for name in LOSS_NAMES}  # §5.1: "All the losses have the same loss weight"


@dataclasses.dataclass(frozen=True)
class PersonSearchConfig:
    """Every value of the network; defaults are the OIM paper's (§3.1, §5.1) unless noted.

    `num_ids` (L, labeled training identities) has no default. `weights`: None (random) or
    "imagenet" / a ResNet50 weights file (§5.1: ImageNet-pretrained), read by `build_resnet50`.
    """

    num_ids: int
    weights: Optional[str] = None
    # §3.1: "9 anchors at each feature map location" following Faster R-CNN: 3 sizes x 3 ratios (h / w).
    anchor_sizes: tuple = (128, 256, 512)
    anchor_ratios: tuple = (0.5, 1.0, 2.0)
    # Faster R-CNN proposals (py-faster-rcnn, §5.1): 12,000 / 6,000 before NMS 0.7, 2,000 / 300 after
    # (train / test); the paper keeps 128 at test (§3.1, rpn.PAPER_POST_NMS_TOP_N_TEST).
    rpn_pre_nms_top_n_train: int = rpn.PRE_NMS_TOP_N_TRAIN
    rpn_post_nms_top_n_train: int = rpn.POST_NMS_TOP_N_TRAIN
    rpn_pre_nms_top_n_test: int = rpn.PRE_NMS_TOP_N_TEST
    rpn_post_nms_top_n_test: int = rpn.POST_NMS_TOP_N_TEST
    rpn_nms_iou: float = rpn.NMS_IOU
    rpn_min_size: float = rpn.MIN_PROPOSAL_SIZE
    # Anchor sampling: 256 per scene, at most half positive (IoU >= 0.7), negatives IoU < 0.3.
    rpn_batch_size: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_positive_iou: float = 0.7
    rpn_negative_iou: float = 0.3
    # RoI sampling: 128 per scene, persons IoU >= 0.5 (py-faster-rcnn 1/4 positive, SeqNet 1/2).
    roi_batch_size: int = 128
    roi_positive_fraction: float = 0.5
    roi_foreground_iou: float = 0.5
    roi_size: int = 14  # §3.1: "pool a 1024 x 14 x 14 region"
    embedding_dim: int = 256  # §3.1: "a L2-normalized 256 dimensional subspace"
    queue_size: int = 5000  # §5.1
    oim_momentum: float = 0.5  # §3.2's gamma
    oim_temperature: float = 0.1  # §5.1: tau = 0.1
    loss_weights: dict = dataclasses.field(default_factory=_default_loss_weights)
    # Test time: NMS of the refined boxes (SeqNet / the OIM code: 0.4), at most 100 per scene. detect()
    # keeps scores >= detection_min_score (0.01: evaluate_detection's AP floor); the search and the
    # recall use 0.5 (the caller's threshold: metrics.search.evaluate_search score_threshold).
    detection_nms_iou: float = 0.4
    detection_min_score: float = 0.01
    max_detections: int = 100
    sampling_seed: int = 0  # anchor / RoI sampling seed, combined with the step and the replica

    def __post_init__(self):
        def fail(name, expected):
            raise ValueError(f"PersonSearchConfig.{name} must be {expected}, got {getattr(self, name)!r}")

        def integer(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def number(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("num_ids", "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train", "rpn_pre_nms_top_n_test",
                     "rpn_post_nms_top_n_test", "rpn_batch_size", "roi_batch_size", "roi_size", "embedding_dim",
                     "max_detections"):
            if not (integer(getattr(self, name)) and getattr(self, name) >= 1):
                fail(name, "an integer >= 1")
        for name in ("queue_size", "sampling_seed"):
            if not (integer(getattr(self, name)) and getattr(self, name) >= 0):
                fail(name, "an integer >= 0")
        for name in ("rpn_nms_iou", "rpn_positive_fraction", "rpn_positive_iou", "roi_positive_fraction",
                     "roi_foreground_iou", "detection_nms_iou"):
            if not (number(getattr(self, name)) and 0 < getattr(self, name) <= 1):
                fail(name, "a number in (0, 1]")
        for name in ("rpn_negative_iou", "oim_momentum", "detection_min_score"):
            if not (number(getattr(self, name)) and 0 <= getattr(self, name) <= 1):
                fail(name, "a number in [0, 1]")
        if self.rpn_negative_iou > self.rpn_positive_iou:
            fail("rpn_negative_iou", f"<= rpn_positive_iou={self.rpn_positive_iou}")
        for name in ("oim_temperature", "rpn_min_size"):
            if not (number(getattr(self, name)) and getattr(self, name) >= (0 if name == "rpn_min_size" else 1e-12)):
                fail(name, "a finite number > 0" if name == "oim_temperature" else "a finite number >= 0")
        for name in ("anchor_sizes", "anchor_ratios"):
            values = getattr(self, name)
            if not (isinstance(values, (tuple, list)) and values and all(number(v) and v > 0 for v in values)):
                fail(name, "a non-empty sequence of numbers > 0")
            object.__setattr__(self, name, tuple(float(v) for v in values))
        if self.weights is not None and not isinstance(self.weights, str):
            fail("weights", 'None, "imagenet" or the path of a ResNet50 weights file')
        weights = self.loss_weights
        if not isinstance(weights, dict) or set(weights) - set(LOSS_NAMES) or not all(
                number(v) and v >= 0 for v in weights.values()):
            fail("loss_weights", f"a dict of finite numbers >= 0 keyed by {', '.join(LOSS_NAMES)}")
        object.__setattr__(self, "loss_weights", {name: float(weights.get(name, 1.0)) for name in LOSS_NAMES})

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_sizes) * len(self.anchor_ratios)

    def to_dict(self) -> dict:
        """JSON-ready values (tuples as lists), the inverse of `from_dict`."""
        out = dataclasses.asdict(self)
        out["anchor_sizes"], out["anchor_ratios"] = list(self.anchor_sizes), list(self.anchor_ratios)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "PersonSearchConfig":
        """A config from `to_dict` output (or any subset with `num_ids`); unknown keys are refused by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"PersonSearchConfig: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "num_ids" not in values:
            raise ValueError("PersonSearchConfig: num_ids (the number of labeled training identities) is required")
        return cls(**values)


def _replica_id():
    context = tf.distribute.get_replica_context()
    return 0 if context is None else context.replica_id_in_sync_group


@keras.saving.register_keras_serializable(package="reid_keras")
class PersonSearchModel(keras.Model):
    """OIM person-search network (module docstring). Build it with `build_person_search_model`.

    Args:
        config: a `PersonSearchConfig` (or its `to_dict()`).
        load_backbone_weights: read `config.weights` into the ResNet-50 (False when the weights come
            from a `.keras` file anyway: `from_config`).

    Attributes: `config`, `weights_info` (what the ResNet-50 weights request loaded), the parts
    `stem`, `rpn_head`, `roi_align`, `conv5`, `box_predictor`, `embedding_head`, `oim`.
    """

    def __init__(self, config, load_backbone_weights: bool = True, **kwargs):
        # Ground-truth boxes and pixel coordinates stay float32 under mixed precision: no autocast of the
        # inputs; every part casts for itself (the stem and heads compute in the policy's dtype).
        kwargs.pop("autocast", None)
        super().__init__(autocast=False, **kwargs)
        config = PersonSearchConfig.from_dict(config) if isinstance(config, dict) else config
        if not isinstance(config, PersonSearchConfig):
            raise TypeError(f"config must be a PersonSearchConfig, got {type(config).__name__}")
        self.config = config
        c = config
        resnet, info = build_resnet50(c.weights if load_backbone_weights else None)
        self.weights_info = info if load_backbone_weights else None
        self.stem, self.conv5 = split_resnet50(resnet, roi_size=(c.roi_size, c.roi_size))
        for layer in self.conv5.layers:
            # conv5's BN trains on batch statistics (§5.1 "as normal"); synchronised, they are the global
            # batch's under MirroredStrategy (all-reduced moments), so N replicas compute what one does.
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.synchronized = True
        self.rpn_head = rpn.RPNHead(c.num_anchors, name="rpn_head")
        self.train_proposals = rpn.ProposalLayer(c.rpn_pre_nms_top_n_train, c.rpn_post_nms_top_n_train,
                                                 c.rpn_nms_iou, c.rpn_min_size, name="train_proposals")
        self.test_proposals = rpn.ProposalLayer(c.rpn_pre_nms_top_n_test, c.rpn_post_nms_top_n_test,
                                                c.rpn_nms_iou, c.rpn_min_size, name="test_proposals")
        self.roi_align = RoIAlign(output_size=(c.roi_size, c.roi_size), spatial_scale=1.0 / STEM_STRIDE,
                                  name="roi_align")
        self.box_predictor = BoxPredictor(name="box_predictor")
        self.embedding_head = EmbeddingHead(c.embedding_dim, name="embedding_head")
        self.oim = OIMMemory(c.num_ids, c.queue_size, c.embedding_dim, momentum=c.oim_momentum,
                             temperature=c.oim_temperature, name="oim")
        channels = self.stem.output.shape[-1]
        self.rpn_head.build((None, None, None, channels))
        for layer in (self.train_proposals, self.test_proposals, self.roi_align):
            layer.build(None)
        self.box_predictor.build((None, self.conv5.output.shape[-1]))
        self.embedding_head.build((None, self.conv5.output.shape[-1]))
        self.oim.build([(None, c.embedding_dim), (None,)])
        self.loss_trackers = [keras.metrics.Mean(name=name) for name in LOSS_NAMES]
        self.oim_accuracy = OIMAccuracy(name="oim_accuracy")
        self._graph_functions = {}
        self.built = True

    # -- shared pieces ------------------------------------------------------------------------------
    def _rpn(self, images):
        features = self.stem(images, training=False)
        objectness, deltas = self.rpn_head(features)
        shape = tf.shape(features)
        anchors = generate_anchors(shape[1], shape[2], STEM_STRIDE, self.config.anchor_sizes,
                                   self.config.anchor_ratios)
        return features, objectness, deltas, anchors

    def _regions(self, features, rois, training):
        """RoI align + conv5 + pooling: [B, R, 4] rois -> [B * R, 2048]."""
        return self.conv5(self.roi_align([features, rois]), training=training)

    def _image_seeds(self, batch_size, step=None):
        """[B, 2] sampling seeds, one per image, from (sampling_seed, step, global image index).

        The global index is replica * B + b, so an image gets the same anchors and RoIs whether the
        batch runs on one device or is split over several replicas (the first-step losses and the
        OIM memory of 1 and N replicas can then be equal)."""
        optimizer = getattr(self, "optimizer", None)
        if step is None:
            step = 0 if optimizer is None else optimizer.iterations
        base = tf.stack([tf.constant(self.config.sampling_seed, tf.int64), tf.cast(step, tf.int64)])
        first = tf.cast(_replica_id(), tf.int64) * tf.cast(batch_size, tf.int64)
        return tf.map_fn(lambda i: tf.random.experimental.stateless_fold_in(base, i),
                         first + tf.range(tf.cast(batch_size, tf.int64)), fn_output_signature=tf.int64)

    def _targets(self, anchors, proposals, valid, batch, step):
        """Anchor and RoI targets (`sampling.py`), sampled image by image with `_image_seeds`
        (a map over the B images of the batch, not over boxes)."""
        c = self.config
        gt_boxes, gt_pids = tf.cast(batch["boxes"], tf.float32), tf.cast(batch["pids"], tf.int32)
        gt_mask, image_shape = tf.cast(batch["box_mask"], tf.bool), batch["image_shape"]
        seeds = self._image_seeds(tf.shape(gt_boxes)[0], step)

        def one_image(args):
            seed, boxes, pids, mask, shape, image_proposals, image_valid = args
            labels, deltas = anchor_targets(
                anchors, boxes[None], mask[None], shape[None], tf.random.experimental.stateless_fold_in(seed, 0),
                num_samples=c.rpn_batch_size, positive_fraction=c.rpn_positive_fraction,
                positive_iou=c.rpn_positive_iou, negative_iou=c.rpn_negative_iou)
            rois = roi_targets(image_proposals[None], boxes[None], pids[None], mask[None],
                               tf.random.experimental.stateless_fold_in(seed, 1), num_samples=c.roi_batch_size,
                               positive_fraction=c.roi_positive_fraction, foreground_iou=c.roi_foreground_iou,
                               background_iou=(0.0, c.roi_foreground_iou), proposal_mask=image_valid[None])
            return labels[0], deltas[0], {k: v[0] for k, v in rois.items()}

        s = c.roi_batch_size
        signature = (tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, 4], tf.float32),
                     {"rois": tf.TensorSpec([s, 4], tf.float32), "labels": tf.TensorSpec([s], tf.int32),
                      "pids": tf.TensorSpec([s], tf.int32), "box_targets": tf.TensorSpec([s, 4], tf.float32),
                      "weights": tf.TensorSpec([s], tf.float32)})
        return tf.map_fn(one_image, (seeds, gt_boxes, gt_pids, gt_mask, image_shape, proposals, valid),
                         fn_output_signature=signature)

    # -- training -----------------------------------------------------------------------------------
    def call(self, inputs, training=False):
        """`training=True`: the training forward on a scene-pipeline batch (see `training_outputs`);
        otherwise `detect(inputs["images"], inputs["image_shape"])`."""
        if not isinstance(inputs, dict) or not {"images", "image_shape"} <= set(inputs):
            raise ValueError(f"{self.name}: inputs must be the scene pipeline's dict with at least 'images' and "
                             f"'image_shape', got {type(inputs).__name__}"
                             + (f" with keys {sorted(inputs)}" if isinstance(inputs, dict) else ""))
        if training:
            return self.training_outputs(inputs, training=True)
        return self._detect(inputs["images"], inputs["image_shape"])

    def training_outputs(self, batch: dict, training: bool = True, step=None) -> dict:
        """The five losses of one batch (§3.1, §3.2) and what the metrics read.

        Args:
            batch: dict with "images" [B, H, W, 3], "image_shape" [B, 2], "boxes" [B, M, 4],
                "pids" [B, M] (labels, UNLABELED, padding <= -2) and "box_mask" [B, M].
            training: conv5 / embedding BatchNorm in training mode and OIM memory update.
            step: the step number the sampling seeds derive from (default `optimizer.iterations`,
                0 before `compile`); a fixed step replays the same anchor / RoI sample.

        Returns:
            dict "losses" {name: float32 scalar} (detection losses: means over this replica's
            samples; "oim": this replica's share of the global-batch mean), "oim_logits" [B*S, L+Q],
            "roi_pids" [B*S], "rois" (the `sampling.roi_targets` dict of the sampled RoIs).
        """
        missing = [k for k in TRAINING_KEYS if k not in batch]
        if missing:
            raise ValueError(f"{self.name}: a training batch needs {', '.join(TRAINING_KEYS)} (the scene pipeline's "
                             f"dict); missing {', '.join(missing)}")
        images, image_shape = batch["images"], batch["image_shape"]
        features, objectness, rpn_deltas, anchors = self._rpn(images)
        proposals, _, valid = self.train_proposals([objectness, rpn_deltas, anchors, image_shape])
        anchor_labels, anchor_deltas, rois = self._targets(anchors, proposals, valid, batch, step)
        regions = self._regions(features, rois["rois"], training)
        class_logits, box_deltas = self.box_predictor(regions)
        embeddings = self.embedding_head(regions, training=training)
        pids = tf.reshape(rois["pids"], [-1])
        logits = self.oim([embeddings, pids], training=training)
        losses = {
            "rpn_objectness": rpn_objectness_loss(anchor_labels, objectness),
            "rpn_box": rpn_box_loss(anchor_labels, rpn_deltas, anchor_deltas),
            "box_classification": box_classification_loss(rois["labels"], class_logits, rois["weights"]),
            "box_regression": box_regression_loss(rois["labels"], box_deltas, rois["box_targets"], rois["weights"]),
            "oim": oim_loss(pids, logits),
        }
        return {"losses": {k: tf.cast(v, tf.float32) for k, v in losses.items()}, "oim_logits": logits,
                "roi_pids": pids, "rois": rois}

    @staticmethod
    def _replicas() -> int:
        return tf.distribute.get_strategy().num_replicas_in_sync

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """Weighted sum of the five losses, scaled for MirroredStrategy (module docstring)."""
        if not isinstance(y_pred, dict) or "losses" not in y_pred:
            raise ValueError(f"{self.name}: there is no evaluation loss for a person-search model; evaluate its "
                             "detections with metrics.search.evaluate_search (families.person_search)")
        weights, losses = self.config.loss_weights, y_pred["losses"]
        detection = tf.add_n([weights[k] * losses[k] for k in DETECTION_LOSSES])
        return detection / self._replicas() + weights["oim"] * losses["oim"]

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        replicas = self._replicas()
        for tracker in self.loss_trackers:
            value = y_pred["losses"][tracker.name]
            tracker.update_state(value * replicas if tracker.name == "oim" else value)
        self.oim_accuracy.update_state(y_pred["roi_pids"], y_pred["oim_logits"])
        return self.get_metrics_result()

    # -- inference ----------------------------------------------------------------------------------
    def _graph(self, name, function):
        if name not in self._graph_functions:
            self._graph_functions[name] = tf.function(function, reduce_retracing=True)
        return self._graph_functions[name]

    def detect(self, images, image_shape) -> dict:
        """Everyone in a batch of scenes (§3.1 at test time; `detector_outputs` has the steps).

        Args:
            images: [B, H, W, 3] preprocessed scenes as the scene pipeline feeds them (zero padding at
                the bottom / right allowed).
            image_shape: [B, 2] int height, width of each scene before padding.

        Returns:
            dict "boxes" [B, K, 4] float32 x1, y1, x2, y2 in input-image pixels (refined, clipped),
            "scores" [B, K] P(person), "embeddings" [B, K, D] unit norm (each detection's proposal
            feature), "valid" [B, K] bool; K = config.max_detections, valid rows first by score,
            each with score >= config.detection_min_score.
        """
        return self._graph("detect", self._detect)(tf.convert_to_tensor(images, tf.float32),
                                                   tf.convert_to_tensor(image_shape, tf.int32))

    def _detect(self, images, image_shape):
        c = self.config
        features, objectness, deltas, anchors = self._rpn(images)
        proposals, _, valid = self.test_proposals([objectness, deltas, anchors, image_shape])
        regions = self._regions(features, proposals, training=False)
        class_logits, box_deltas = self.box_predictor(regions)
        embeddings = self.embedding_head(regions, training=False)
        return select_detections(proposals, valid, class_logits, box_deltas, embeddings, image_shape,
                                 c.detection_nms_iou, c.detection_min_score, c.max_detections)

    def embed_query(self, images, image_shape, boxes):
        """[B, D] unit-norm embeddings of one given box per scene, a fixed RoI on the whole scene
        (docs/protocols.md (d): not a crop, not a detection). `boxes` [B, 4] x1, y1, x2, y2 in
        input-image pixels, clipped to `image_shape` [B, 2]."""
        return self._graph("embed_query", self._embed_query)(tf.convert_to_tensor(images, tf.float32),
                                                             tf.convert_to_tensor(image_shape, tf.int32),
                                                             tf.convert_to_tensor(boxes, tf.float32))

    def _embed_query(self, images, image_shape, boxes):
        if boxes.shape.rank != 2 or boxes.shape[-1] != 4:
            raise ValueError(f"{self.name}: embed_query boxes must have shape [batch, 4] (x1, y1, x2, y2), "
                             f"got {tuple(boxes.shape)}")
        features = self.stem(images, training=False)
        rois = clip_boxes(boxes[:, None, :], image_shape)
        return tf.cast(self.embedding_head(self._regions(features, rois, False), training=False), tf.float32)

    # -- serialisation ------------------------------------------------------------------------------
    def get_config(self):
        return {"name": self.name, "trainable": self.trainable,
                "dtype": keras.dtype_policies.serialize(self.dtype_policy), "config": self.config.to_dict()}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(PersonSearchConfig.from_dict(config.pop("config")), load_backbone_weights=False, **config)


def build_person_search_model(config) -> PersonSearchModel:
    """The OIM person-search network for `config` (a `PersonSearchConfig` or its dict), not compiled.

    Example:
        >>> model = build_person_search_model(PersonSearchConfig(num_ids=5532, weights="imagenet"))
        >>> model.compile(keras.optimizers.SGD(1e-3, momentum=0.9))
        >>> model.fit(scene_train_dataset(scenes, 900, 1500, batch_size=2, max_boxes=20), steps_per_epoch=...)
        >>> out = model.detect(batch["images"], batch["image_shape"])
    """
    return PersonSearchModel(config)
