"""The person-search family (`models/person_search/model.py`): the joint detection + identification
network trained with OIM (oim_person_search.txt §3, §5.1), on whole scenes.

Preset `person_search_oim`: the paper's recipe (`--preset paper`, §5.1) and a quick CPU recipe on the
synthetic CUHK-SYSU scenes (`--preset default`). Training streams `data.scene_pipeline` batches (a
dict with the ground truth inside: the model labels anchors and proposals in its `train_step`);
evaluation detects everyone in the gallery scenes, embeds each query's box, and scores them with
`metrics.search.evaluate_search` (docs/protocols.md (d)) and `metrics.detection.evaluate_detection`
((e)); the export serves `detect` and `embed_query` (`models/person_search/export.py`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np
import tensorflow as tf

from reid_keras.families.base import Family, Preset, Recipe, Task, check_numbers, finite, integer

EVALUATION_DIR = "evaluation"
# Gallery sizes reported: CUHK-SYSU's usual table (100) and the full gallery (-1); PRW has one gallery.
SEARCH_GALLERY_SIZES = (100, -1)


def _positive_int(v) -> bool:
    return integer(v) and v >= 1


def _fraction(v) -> bool:
    return finite(v) and 0 < v <= 1


def _sizes(v) -> bool:
    return isinstance(v, (tuple, list)) and len(v) >= 1 and all(finite(x) and x > 0 for x in v)


# The numbers only this family reads (families/base.py NUMBER_RULES has the shared ones).
NUMBER_RULES = {
    "min_side": (_positive_int, "an integer >= 1"),
    "max_side": (_positive_int, "an integer >= 1"),
    "max_boxes": (lambda v: v is None or _positive_int(v), "an integer >= 1 or None"),
    "anchor_sizes": (_sizes, "a non-empty list of numbers > 0"),
    "anchor_ratios": (_sizes, "a non-empty list of numbers > 0"),
    "rpn_pre_nms_top_n_train": (_positive_int, "an integer >= 1"),
    "rpn_post_nms_top_n_train": (_positive_int, "an integer >= 1"),
    "rpn_pre_nms_top_n_test": (_positive_int, "an integer >= 1"),
    "rpn_post_nms_top_n_test": (_positive_int, "an integer >= 1"),
    "rpn_batch_size": (_positive_int, "an integer >= 1"),
    "rpn_positive_fraction": (_fraction, "a number in (0, 1]"),
    "roi_batch_size": (_positive_int, "an integer >= 1"),
    "roi_positive_fraction": (_fraction, "a number in (0, 1]"),
    "embedding_dim": (_positive_int, "an integer >= 1"),
    "queue_size": (lambda v: integer(v) and v >= 0, "an integer >= 0"),
    "oim_momentum": (lambda v: finite(v) and 0 <= v < 1, "a number in [0, 1)"),
    "oim_temperature": (lambda v: finite(v) and v > 0, "a finite number > 0"),
    "detection_nms_iou": (_fraction, "a number in (0, 1]"),
    "detection_min_score": (lambda v: finite(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "max_detections": (_positive_int, "an integer >= 1"),
    "search_score_threshold": (lambda v: finite(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "eval_batch_size": (_positive_int, "an integer >= 1"),
}
LOSS_NAMES = ("rpn_objectness", "rpn_box", "box_classification", "box_regression", "oim")
# Recipe keys handed to `PersonSearchConfig` (same names there), besides `weights` and the training ids.
MODEL_KEYS = ("anchor_sizes", "anchor_ratios", "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train",
              "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test", "rpn_batch_size", "rpn_positive_fraction",
              "roi_batch_size", "roi_positive_fraction", "embedding_dim", "queue_size", "oim_momentum",
              "oim_temperature", "loss_weights", "detection_nms_iou", "detection_min_score", "max_detections")


@dataclasses.dataclass(frozen=True)
class PersonSearchRecipe(Recipe):
    """Recipe of a person-search run; defaults are the OIM paper's (§3.1, §5.1) unless noted.

    Scenes are resized by the Faster R-CNN rule (short side `min_side`, long side at most `max_side`)
    and fed `batch_size` at a time with up to `max_boxes` people each (None: the most crowded training
    scene). `image_size` (the crop families' value) is not read: scenes keep their aspect ratio.
    """

    backbone: object = "resnet50"  # §3.1: ResNet-50 stem (conv1..conv4_x) + conv5_x identification net
    weights: Optional[str] = "imagenet"  # §5.1: ImageNet-pretrained ResNet-50
    preprocessing: str = "caffe"  # keras.applications ResNet50's normalisation
    # §5.1 says only "py-faster-rcnn" (600 / 1,000: data.scene_pipeline.PY_FASTER_RCNN_SIDES); 900 / 1,500
    # is what the PyTorch re-implementations train and test at (SeqNet INPUT.MIN_SIZE / MAX_SIZE, PAPER_SIDES).
    min_side: int = 900
    max_side: int = 1500
    max_boxes: Optional[int] = None
    flip: bool = True  # py-faster-rcnn TRAIN.USE_FLIPPED
    # §5.1: "Each mini-batch consists of two scene images"; SGD (Caffe), momentum 0.9 and weight decay
    # 1e-4 (py-faster-rcnn's solver; Keras' decay is decoupled, Caffe's is L2 in the gradient);
    # "initialized to 0.001, dropped to 0.0001 after 40K iterations, ... converges at 50K iterations".
    batch_size: int = 2
    optimizer: str = "sgd"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    weight_decay: Optional[float] = 1e-4
    lr_schedule: Optional[dict] = dataclasses.field(
        default_factory=lambda: {"type": "step", "boundaries": [40000], "factor": 0.1})
    epochs: int = 10
    steps_per_epoch: Optional[int] = 5000  # 10 x 5,000 = the paper's 50K iterations whatever the dataset
    # §3.1: "9 anchors at each feature map location" following Faster R-CNN [27]: 3 sizes x 3 ratios (h/w).
    anchor_sizes: tuple = (128, 256, 512)
    anchor_ratios: tuple = (0.5, 1.0, 2.0)
    # Faster R-CNN proposals: 12,000 / 6,000 before NMS 0.7, 2,000 / 300 after (train / test).
    rpn_pre_nms_top_n_train: int = 12000
    rpn_post_nms_top_n_train: int = 2000
    rpn_pre_nms_top_n_test: int = 6000
    rpn_post_nms_top_n_test: int = 300
    rpn_batch_size: int = 256  # anchors sampled per scene, half positive (IoU >= 0.7 / < 0.3)
    rpn_positive_fraction: float = 0.5
    roi_batch_size: int = 128  # RoIs per scene (IoU >= 0.5 foreground)
    roi_positive_fraction: float = 0.5  # py-faster-rcnn's 0.25; SeqNet 0.5 (the issue: 1/4-1/2)
    embedding_dim: int = 256  # §3.1: "projected into a L2-normalized 256-d subspace"
    queue_size: int = 5000  # §5.1: "the size of the circular queue is set to 5,000"
    oim_momentum: float = 0.5  # §3.2's gamma (the authors' code)
    oim_temperature: float = 0.1  # §5.1: tau = 0.1
    loss_weights: Optional[dict] = None  # §5.1: "All the losses have the same loss weight" (None: 1 each)
    detection_nms_iou: float = 0.4  # test-time NMS of the refined boxes (SeqNet 0.4)
    # What `detect` keeps: scores >= detection_min_score (low, so that the detection AP curve and the export's
    # users see the low scores too); the evaluation searches those >= search_score_threshold.
    detection_min_score: float = 0.01
    max_detections: int = 100  # per scene
    search_score_threshold: float = 0.5  # detections searched / counted (docs/protocols.md (d), (e))
    eval_batch_size: int = 1

    def __post_init__(self):
        super().__post_init__()
        check_numbers(self, NUMBER_RULES)
        if self.max_side < self.min_side:
            raise ValueError(f"max_side must be >= min_side={self.min_side} (cap of the long side), "
                             f"got {self.max_side!r}")
        if tuple(self.image_size) != tuple(Recipe.image_size):
            raise ValueError(f"image_size {tuple(self.image_size)} is not read by the person-search family: scenes keep "
                             "their aspect ratio; set min_side / max_side (the resize rule) instead")
        if self.backbone != "resnet50":
            raise ValueError(f"backbone {self.backbone!r}: the person-search model is built on ResNet-50 (OIM §3.1), "
                             "the only backbone it takes")
        if self.augment:
            raise ValueError("augment is not read by the person-search family: scenes are only mirrored (flip)")
        self._set("anchor_sizes", tuple(self.anchor_sizes))
        self._set("anchor_ratios", tuple(self.anchor_ratios))
        if self.loss_weights is not None:
            unknown = sorted(set(self.loss_weights) - set(LOSS_NAMES))
            if unknown:
                raise ValueError(f"loss_weights: unknown loss(es) {', '.join(unknown)}; known: {', '.join(LOSS_NAMES)}")
            bad = {k: v for k, v in self.loss_weights.items() if not (finite(v) and v >= 0)}
            if bad:
                raise ValueError(f"loss_weights must be finite numbers >= 0, got {bad}")


# The quick CPU recipe on the synthetic CUHK-SYSU scenes (400 x 600 drawn, fed at 256 / 384): no
# pretrained weights to download, few proposals and RoIs, Adam (SGD at 1e-3 barely moves in a few hundred
# steps). Measured on the 2-core CPU: ~4.2 s a training step (first one ~34 s, tracing), so 200 steps
# take ~14 minutes; 50 proposals per test scene keep the gallery pass short.
QUICK = {"weights": None, "min_side": 256, "max_side": 384, "batch_size": 2, "epochs": 2, "steps_per_epoch": 100,
         "optimizer": "adam", "learning_rate": 1e-4, "weight_decay": None, "lr_schedule": None,
         "anchor_sizes": (32, 64, 128), "rpn_pre_nms_top_n_train": 1000, "rpn_post_nms_top_n_train": 200,
         "rpn_pre_nms_top_n_test": 500, "rpn_post_nms_top_n_test": 50, "rpn_batch_size": 128,
         "roi_batch_size": 32, "queue_size": 500}

PRESETS = {
    "person_search_oim": Preset(PersonSearchRecipe(), paper="oim_person_search.txt §3, §5.1 (joint detection + OIM)",
                                quick=QUICK),
}


class PersonSearchTask(Task):
    """Builds, feeds, evaluates and exports a `build_person_search_model` model."""

    def model_config(self, num_train_ids: int):
        """The `PersonSearchConfig` of this recipe for `num_train_ids` labelled training identities."""
        from reid_keras.models.person_search.model import PersonSearchConfig

        r = self.recipe
        values = {key: getattr(r, key) for key in MODEL_KEYS}
        values["loss_weights"] = {name: 1.0 for name in LOSS_NAMES} if r.loss_weights is None else \
            {name: float(r.loss_weights.get(name, 1.0)) for name in LOSS_NAMES}
        return PersonSearchConfig.from_dict({**values, "num_ids": int(num_train_ids), "weights": r.backbone_weights,
                                             "sampling_seed": self.seed})

    def build(self, num_train_ids: int):
        from reid_keras.models.person_search.model import build_person_search_model

        if int(num_train_ids) < 1:
            raise ValueError("the training scenes hold no labelled identity (num_train_ids = 0): the OIM lookup "
                             "table would be empty")
        model = build_person_search_model(self.model_config(num_train_ids))
        model.compile(optimizer=self.optimizer(), jit_compile=self.recipe.jit_compile)
        info = getattr(model, "weights_info", None)
        info = info.to_dict() if hasattr(info, "to_dict") else dict(info or {"weights": self.recipe.weights})
        return model, info

    def max_boxes(self, records) -> int:
        """M, the box rows per training scene: the recipe's, or the most crowded scene's count."""
        most = max((len(s.boxes) for s in records), default=0)
        return int(self.recipe.max_boxes or max(most, 1))

    def train_dataset(self, records, initial_epoch: int, epochs: int, global_batch: int, initial_step: int = 0):
        """Scene batches (the `scene_train_dataset` dict, ground truth inside) from step `initial_step` of epoch
        `initial_epoch`, and the steps per epoch; batch (epoch, step) is the same in a resumed run."""
        from reid_keras.data.scene_pipeline import scene_train_dataset, steps_per_epoch

        r = self.recipe
        steps = int(r.steps_per_epoch or steps_per_epoch(len(records), int(global_batch)))
        ds = scene_train_dataset(records, r.min_side, r.max_side, int(global_batch), self.max_boxes(records),
                                 preprocess=r.preprocessing, flip=r.flip, seed=self.seed, epochs=epochs,
                                 initial_epoch=initial_epoch, initial_step=initial_step, batches_per_epoch=steps)
        # Booleans as int32: under MirroredStrategy Keras sums the first batch over the replicas while
        # setting up, which TensorFlow refuses for bool tensors (the model casts box_mask back).
        ds = ds.map(lambda b: {k: tf.cast(v, tf.int32) if v.dtype == tf.bool else v for k, v in b.items()})
        return ds, steps

    def evaluate(self, model, dataset, run_dir: str, plots: bool = True) -> dict:
        """Detections over the gallery, query embeddings, search and detection metrics (files under
        run_dir/evaluation: detections.npz, the plots)."""
        return evaluate_person_search(model, dataset, os.path.join(run_dir, EVALUATION_DIR), self.recipe,
                                      seed=self.seed, plots=plots)

    @staticmethod
    def format_metrics(metrics: dict) -> str:
        lines = ["| gallery | mAP | top-1 | top-5 | top-10 |", "| --- | --- | --- | --- | --- |"]
        for row in metrics["search"]:
            lines.append(f"| {row['protocol']} | {100 * row['mAP']:.1f} | {100 * row['top1']:.1f} | "
                         f"{100 * row['top5']:.1f} | {100 * row['top10']:.1f} |")
        d = metrics["detection"]
        lines.append(f"\ndetection: AP {100 * d['ap']:.1f}, recall {100 * d['recall']:.1f} at score >= "
                     f"{d['score_threshold']:g} ({d['num_detections']} detections, {d['num_boxes']} boxes)")
        return "\n".join(lines)

    def export(self, model, out_dir: str) -> None:
        """SavedModel with `detect` and `embed_query` (`models/person_search/export.py`)."""
        from reid_keras.models.person_search.export import export_person_search

        r = self.recipe
        export_person_search(model, out_dir, r.min_side, r.max_side, preprocessing=r.preprocessing)


def _as_numpy(out: dict) -> dict:
    return {k: np.asarray(v) for k, v in out.items()}


def detect_scenes(model, scenes, recipe: PersonSearchRecipe) -> dict:
    """{scene file name: (boxes [N, 4] original pixels, scores [N], embeddings [N, D])} of `model.detect` over
    `scenes` (the valid rows, every score: the evaluation applies its thresholds)."""
    from reid_keras.data.scene_pipeline import scene_eval_dataset, to_original_pixels

    detections = {}
    stream = scene_eval_dataset(scenes, recipe.min_side, recipe.max_side, batch_size=recipe.eval_batch_size,
                                preprocess=recipe.preprocessing)
    for batch in stream:
        out = _as_numpy(model.detect(batch["images"], batch["image_shape"]))
        boxes = to_original_pixels(out["boxes"], batch["scale"].numpy())
        for row, index in enumerate(batch["index"].numpy()):
            keep = out["valid"][row].astype(bool)
            detections[scenes[int(index)].name] = (boxes[row][keep].astype(np.float32),
                                                   out["scores"][row][keep].astype(np.float32),
                                                   out["embeddings"][row][keep].astype(np.float32))
    return detections


def embed_queries(model, dataset, recipe: PersonSearchRecipe) -> np.ndarray:
    """[Q, D] embeddings of every query's box, a fixed RoI on its whole scene (docs/protocols.md (d)), in
    `dataset.queries` order. A query whose scene could not be decoded is refused by name."""
    from reid_keras.data.scene_pipeline import query_dataset

    rows = {}
    for batch in query_dataset(dataset, recipe.min_side, recipe.max_side, batch_size=recipe.eval_batch_size,
                               preprocess=recipe.preprocessing):
        emb = np.asarray(model.embed_query(batch["images"], batch["image_shape"], batch["query_box"]), np.float32)
        for row, index in enumerate(batch["index"].numpy()):
            rows[int(index)] = emb[row]
    missing = [i for i in range(len(dataset.queries)) if i not in rows]
    if missing:
        q = dataset.queries[missing[0]]
        raise ValueError(f"{dataset.name}: {len(missing)} query scene(s) could not be read (e.g. {q.scene!r}); "
                         "drop damaged scenes first (data.decoding.drop_damaged drops their queries)")
    return np.stack([rows[i] for i in range(len(dataset.queries))])


def search_gallery_sizes(dataset) -> list:
    """The gallery sizes to report: those of SEARCH_GALLERY_SIZES the dataset offers (each gallery once),
    else its first one (PRW: its single gallery; a tiny synthetic set: the smallest it has)."""
    offered = list(dataset.gallery_sizes)
    return dataset.distinct_gallery_sizes([s for s in SEARCH_GALLERY_SIZES if s in offered] or offered[:1])


def evaluate_person_search(model, dataset, out_dir: str, recipe: PersonSearchRecipe, seed: int = 0,
                           plots: bool = True, top_k_figure: int = 5) -> dict:
    """Detect, embed the queries, and score with the person-search evaluation (docs/protocols.md (d), (e)).

    Writes `out_dir/detections.npz` (re-scorable by `python -m reid_keras.evaluate_search`) and, with
    `plots`, the results figure, the detection precision-recall curve and the gallery-size curve.
    Returns the metrics dict (search rows per gallery size, the first row's numbers at the top level,
    detection AP / recall, warnings).
    """
    from reid_keras.metrics.detection import evaluate_detection
    from reid_keras.metrics.detections_file import save_detections
    from reid_keras.metrics.search import evaluate_search

    os.makedirs(out_dir, exist_ok=True)
    detections = detect_scenes(model, dataset.gallery, recipe)
    queries = embed_queries(model, dataset, recipe)
    save_detections(os.path.join(out_dir, "detections.npz"), detections, queries, dataset_name=dataset.name)
    sizes = search_gallery_sizes(dataset)
    threshold = float(recipe.search_score_threshold)
    results = {size: evaluate_search(detections, queries, dataset, gallery_size=size, score_threshold=threshold,
                                     keep_top=top_k_figure if (plots and size == sizes[0]) else 0)
               for size in sizes}
    detection = evaluate_detection(detections, dataset, score_threshold=threshold)
    rows = []
    for size in sizes:
        result, protocol = results[size], dataset.search_protocol(size)
        row = {k: result[k] for k in ("gallery_size", "protocol", "mAP", "top1", "top5", "top10",
                                      "num_valid_queries", "num_invalid_queries", "warnings")}
        row["mean_gallery"] = float(sum(len(g) for g in protocol.galleries) / max(len(protocol.galleries), 1))
        rows.append(row)
    detection_summary = {k: detection[k] for k in ("ap", "recall", "recall_labeled", "precision", "num_boxes",
                                                   "num_labeled_boxes", "num_detections", "matching",
                                                   "score_threshold", "ap_score_threshold", "warnings")
                         if k in detection}
    metrics = {"dataset": dataset.name, "num_queries": len(dataset.queries), "num_gallery_scenes": len(dataset.gallery),
               "num_detections": int(sum(len(d[1]) for d in detections.values())),
               "score_threshold": threshold, "search": rows, "detection": detection_summary,
               **{k: rows[0][k] for k in ("gallery_size", "protocol", "mAP", "top1", "top5", "top10")},
               "detections_file": "detections.npz"}
    if plots:
        from reid_keras.metrics.search_plots import draw_search_plots

        metrics["plots"] = draw_search_plots(out_dir, dataset, metrics, results[sizes[0]], detection, seed=seed)
    return metrics


FAMILY = Family(name="person_search", recipe=PersonSearchRecipe, presets=PRESETS, task=PersonSearchTask,
                serializables=("reid_keras.models.person_search.model", "reid_keras.models.oim",
                               "reid_keras.training.optimizers"), data="scenes")
