"""Evaluate an embedding model on a dataset: docs/protocols.md (a) plus the protocols the dataset declares.

`evaluate_model` embeds the query and gallery splits (features cached in the output folder and
reused for the same model file, size, preprocessing and flip), ranks the gallery by cosine
(baseline, then query expansion / k-reciprocal re-ranking when asked), and adds the same-person
threshold at the equal error rate, the dataset's own protocols (`dataset_protocols`), the
camera-pair matrix (idver paper Fig. 6), the gallery-size curve with distractors (Table VI) and the
plots; it writes `metrics.json` and appends a row to a results CSV.

Damaged images are counted skips, never the end of an evaluation: the files the loader left out,
the query / gallery / protocol / distractor images a full decode check rejects
(`data.decoding.drop_damaged`) and any the feature pipeline still fails on are printed and
recorded under "skipped" in metrics.json. Only a split with no usable image left is an error.
"""
from __future__ import annotations

import datetime
import json
import os

import numpy as np

from reid_keras.io_utils import append_csv_row, write_json
from reid_keras.metrics.dataset_protocols import ProtocolInputs, check_protocols, run_protocols
from reid_keras.metrics.diagnostics import (cross_camera_matrix, distractor_tiers, eer_threshold,
                                            gallery_size_curve, sample_pair_distances)
from reid_keras.metrics.features import NoDecodableImages, extract_features
from reid_keras.metrics.options import EvaluationError, EvaluationOptions
from reid_keras.metrics.ranking import evaluate_ranking
from reid_keras.metrics.report import CSV_FIELDS, csv_row, metric_summary

PROTOCOL_A = "docs/protocols.md (a): junk = same id and camera or id -1, invalid queries excluded"
REASON_FEATURE_DECODE = "not decodable by TensorFlow during feature extraction"


def rank_variants(query, gallery, options: EvaluationOptions) -> dict:
    """{variant name: {result, query_features, distmat}}: the cosine baseline, then query expansion
    and / or re-ranking when the options ask for them (the last entry is the reported one)."""
    common = dict(query_pids=query.pids, gallery_pids=gallery.pids, query_cams=query.camids,
                  gallery_cams=gallery.camids, max_rank=options.max_rank, ap=options.ap)
    try:
        baseline = evaluate_ranking(query_features=query.features, gallery_features=gallery.features,
                                    metric="cosine", memory_budget_mb=options.memory_budget_mb, **common)
    except ValueError as err:  # e.g. no valid query: a data problem, not a bug
        raise EvaluationError(f"cannot rank this dataset: {err}") from None
    out = {"baseline": {"result": baseline, "query_features": query.features, "distmat": None}}
    if not (options.rerank or options.query_expansion):
        return out
    from reid_keras.metrics.rerank import query_expansion, rerank_k_reciprocal  # scipy.sparse, only when asked

    qf, name = query.features, []
    if options.query_expansion:
        kwargs = {} if options.qe_top_k is None else {"top_k": options.qe_top_k}
        qf = np.asarray(query_expansion(query.features, gallery.features, **kwargs), dtype=np.float32)
        name.append("query expansion")
    distmat = None
    if options.rerank:
        distmat = np.asarray(rerank_k_reciprocal(qf, gallery.features, k1=options.rerank_k1, k2=options.rerank_k2,
                                                 lambda_value=options.rerank_lambda))
        result = evaluate_ranking(distmat=distmat, **common)
        name.append("re-ranking")
    else:
        result = evaluate_ranking(query_features=qf, gallery_features=gallery.features, metric="cosine",
                                  memory_budget_mb=options.memory_budget_mb, **common)
    out[" + ".join(name)] = {"result": result, "query_features": qf, "distmat": distmat}
    return out


def distractor_curve(embed, query, gallery, options: EvaluationOptions) -> tuple:
    """Embed the distractor folder (cached) and evaluate the nested gallery-size tiers (idver Table VI).

    Returns `(curve rows, SkipReport of the distractor files left out)`."""
    from reid_keras.data.datasets.base import SkipReport
    from reid_keras.data.datasets.market1501 import load_distractors
    from reid_keras.data.decoding import find_damaged, skip_report

    skipped = SkipReport()
    records = load_distractors(options.distractors, skipped)
    damaged = find_damaged([r.path for r in records], scope=options.distractors) if records else {}
    records = [r for r in records if r.path not in damaged]
    skipped = skipped.merge(skip_report(damaged))
    if skipped.total:
        print(f"distractors: {skipped}", flush=True)
    if not records:
        raise EvaluationError(f"distractors {options.distractors!r} holds no readable images")
    sizes = list(options.distractor_sizes or distractor_tiers(len(records)))
    too_big = [s for s in sizes if s > len(records)]
    if too_big:
        raise EvaluationError(f"distractor_sizes {too_big} outside 0..{len(records)} (images in the folder)")
    feats = embed(records, "distractors", "distractor features")
    skipped = skipped.merge(_feature_skips(feats))
    return gallery_size_curve(query, gallery, feats.features, sizes, seed=options.seed, ap=options.ap,
                              memory_budget_mb=options.memory_budget_mb), skipped


def _feature_skips(features):
    """The files `extract_features` left out (TensorFlow could not decode them after all)."""
    from reid_keras.data.datasets.base import SkipReport

    report = SkipReport()
    for path in features.meta.get("skipped", []):
        report.add(REASON_FEATURE_DECODE, path)
    return report


def usable_dataset(dataset):
    """`dataset` without the query / gallery / protocol images that fail the decode check, as
    `(dataset, SkipReport)`; its `skipped` also holds what the loader left out."""
    from reid_keras.data.datasets.base import DatasetLayoutError
    from reid_keras.data.decoding import drop_damaged

    try:
        return drop_damaged(dataset, splits=("query", "gallery"))
    except DatasetLayoutError as err:
        raise EvaluationError(str(err)) from None


def _model_key(model, image_size, preprocess) -> str:
    source = os.path.abspath(model.source)
    stamp = os.path.getmtime(os.path.join(source, "saved_model.pb") if os.path.isdir(source) else source)
    return json.dumps([source, stamp, list(image_size), preprocess])


def _input_size(model, image_size) -> tuple:
    size = image_size if image_size is not None else getattr(model, "image_size", None)
    if size is None:
        raise EvaluationError(f"image_size is needed: the model {getattr(model, 'source', '')!r} does not fix its "
                              "input size; pass image_size=(height, width)")
    if len(size) != 2 or not all(int(v) > 0 for v in size):
        raise EvaluationError(f"image_size must be (height, width) with positive sides, got {image_size!r}")
    return tuple(int(v) for v in size)


def evaluate_model(model, dataset, out: str, options: EvaluationOptions = EvaluationOptions(),
                   image_size=None) -> dict:
    """Evaluate `model` (an `EmbeddingModel`, reid_keras.models.loading) on `dataset`; files go to `out`.

    `image_size` (height, width) defaults to the model's own input size. Returns the metrics.json
    dict. Damaged query / gallery images are left out, printed and counted in metrics.json
    "skipped" (`usable_dataset`). Raises EvaluationError for what the user can fix (an empty split
    or one whose images are all damaged, no valid query, a protocol the dataset declares but this
    library lacks, a bad distractor folder).
    """
    size = _input_size(model, image_size)
    protocols = tuple(getattr(dataset, "protocols", ()))
    check_protocols(protocols, f"dataset {dataset.name}")
    if options.distractors and not os.path.isdir(options.distractors):
        raise EvaluationError(f"distractors {options.distractors!r} is not a folder of images")
    for split in ("query", "gallery"):
        if not getattr(dataset, split):
            raise EvaluationError(f"{dataset.name} at {dataset.root}: the {split} split is empty")
    dataset, _ = usable_dataset(dataset)
    skipped = dataset.skipped
    if skipped.total:
        print(f"{dataset.name} at {dataset.root}: {skipped}", flush=True)
    os.makedirs(out, exist_ok=True)
    key = _model_key(model, size, model.preprocessing)

    def embed(records, name: str, label: str = ""):
        return extract_features(model, records, batch_size=options.batch_size, flip=options.flip, image_size=size,
                                cache=os.path.join(out, f"features_{name}.npz"), cache_key=key,
                                label=label or f"{name.replace('_', '-')} features")

    splits = {}
    for split in ("query", "gallery"):
        try:
            splits[split] = embed(getattr(dataset, split), split)
        except NoDecodableImages as err:
            raise EvaluationError(f"{dataset.name} at {dataset.root}: no usable image in the {split} split: "
                                  f"{err}") from None
        skipped = skipped.merge(_feature_skips(splits[split]))
    query, gallery = splits["query"], splits["gallery"]
    variants = rank_variants(query, gallery, options)
    final_name = list(variants)[-1]
    final = variants[final_name]
    metrics = {"model": os.path.abspath(model.source), "model_kind": model.kind, "dataset": dataset.name,
               "data_root": os.path.abspath(dataset.root), "dataset_options": dict(getattr(dataset, "options", {})),
               "protocol": PROTOCOL_A, "ap_variant": options.ap, "flip": options.flip, "image_size": list(size),
               "preprocessing": model.preprocessing, "num_query": len(query), "num_gallery": len(gallery),
               "skipped": None,
               "variant": final_name, "seed": options.seed,
               "rerank": ({"k1": options.rerank_k1, "k2": options.rerank_k2, "lambda": options.rerank_lambda}
                          if options.rerank else None),
               "query_expansion": {"top_k": options.qe_top_k} if options.query_expansion else None}
    metrics.update(metric_summary(final["result"]))
    metrics["variants"] = {name: metric_summary(v["result"]) for name, v in variants.items()}

    pos, neg = sample_pair_distances(query.features, gallery.features, query.pids, gallery.pids,
                                     query.camids, gallery.camids, seed=options.seed)
    if len(pos) and len(neg):
        metrics["same_person_threshold"] = dict(eer_threshold(pos, neg), rule="same person if distance <= threshold",
                                                distance="cosine distance 1 - cos of the L2-normalised embeddings "
                                                         "(no re-ranking, no query expansion)")
    metrics.update(run_protocols(protocols, ProtocolInputs(query, gallery, options, embed)))
    metrics["cross_camera"] = cross_camera_matrix(
        query.pids, gallery.pids, query.camids, gallery.camids, query_features=final["query_features"],
        gallery_features=gallery.features, distmat=final["distmat"], ap=options.ap,
        memory_budget_mb=options.memory_budget_mb)
    if options.distractors:
        metrics["gallery_size_curve"], distractor_skips = distractor_curve(embed, query, gallery, options)
        skipped = skipped.merge(distractor_skips)
        metrics["gallery_size_note"] = "plain embeddings (no re-ranking / query expansion), nested seeded tiers"
    metrics["skipped"] = skipped.as_dict()
    if options.plots:
        from reid_keras.metrics.plots import draw_evaluation_plots  # matplotlib, only when drawing

        metrics["plots"] = draw_evaluation_plots(
            out, metrics, {name: v["result"]["cmc"] for name, v in variants.items()},
            dict(query_features=final["query_features"], distmat=final["distmat"]), query, gallery, (pos, neg),
            seed=options.seed, ranked_queries=options.ranked_queries, tsne_ids=options.tsne_ids,
            tsne_points=options.tsne_points)
    write_json(os.path.join(out, "metrics.json"), metrics, sort_keys=False)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    append_csv_row(options.results_csv or os.path.join(out, "results.csv"),
                   csv_row(metrics, now, os.path.abspath(out)), CSV_FIELDS)
    return metrics
