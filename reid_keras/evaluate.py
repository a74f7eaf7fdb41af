"""`python -m reid_keras.evaluate`: rank a dataset's gallery for its queries with a trained model.

    python -m reid_keras.evaluate --model runs/x/model.keras --dataset market1501 --data-root /data/market \
        [--rerank] [--query-expansion] [--distractors /data/market/500k] [--multi-query max] [--out DIR]

Prints rank-1/5/10/20, mAP and mINP (PROTOCOLS.md (a); CUHK01 and classic CUHK03 also get their
paper protocol, (c) / (b); Market-1501 with `gt_bbox/` also gets multi-query, DATASETS.md §1: each
query pooled over the hand-drawn boxes of its id and camera, `--multi-query mean|max|off`; these
live in `paper_protocols`), writes `metrics.json`, appends a row to a results CSV and draws the
CMC curve, a ranked-list grid, the camera-pair heatmap, the pair distance histograms with the
equal-error threshold, a t-SNE of the embeddings and, with `--distractors`, the gallery-size
curve (identification-verification paper Table VI).
Features are cached in the output folder and reused by a rerun with the same model.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import io
import json
import os
import sys

import numpy as np

from reid_keras.io_utils import atomic_write_json, atomic_write_text
# The benchmarks' own protocols live in paper_protocols; re-exported here for existing callers.
from reid_keras.paper_protocols import (MULTI_QUERY_CHOICES, dataset_protocol, distractor_curve,  # noqa: F401
                                        multi_query_protocol)

RANKS = (1, 5, 10, 20)
CSV_FIELDS = ["time", "model", "dataset", "variant", "ap_variant", "flip", "rank1", "rank5", "rank10", "rank20",
              "mAP", "mINP", "num_valid_queries", "num_invalid_queries", "eer_threshold", "out"]


class UsageError(ValueError):
    """A command-line value that cannot work (reported without a traceback, exit code 2)."""


def _image_size(text):
    parts = text.lower().replace(",", "x").split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--image-size {text!r}: expected HEIGHTxWIDTH, e.g. 256x128")
    return int(parts[0]), int(parts[1])


def parse_dataset_options(items) -> dict:
    """`--dataset-option key=value` strings to loader options (see `datasets.parse_options`)."""
    from reid_keras.data.datasets import parse_options

    try:
        return parse_options(items)
    except ValueError as err:
        raise UsageError(str(err)) from None


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a positive integer")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reid_keras.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="a .keras file or an exported SavedModel folder")
    p.add_argument("--dataset", required=True, help="dataset name, e.g. market1501, dukemtmc, msmt17, cuhk03")
    p.add_argument("--data-root", required=True, help="the unpacked dataset folder or its parent")
    p.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE",
                   help="loader option passed to load_dataset, repeatable (e.g. box_type=detected)")
    p.add_argument("--out", default=None, help="output folder (default: eval_<dataset> beside the model)")
    p.add_argument("--results-csv", default=None, help="CSV to append a row to (default: <out>/results.csv)")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="images per forward pass")
    p.add_argument("--image-size", type=_image_size, default=None,
                   help="HEIGHTxWIDTH fed to the model (default: the model's own input size)")
    p.add_argument("--preprocess", default=None,
                   help="backbone preprocessing of a .keras model (efficientnet, none, unit, resnet50, vgg16, "
                        "caffe, tf, torch); default: the run's config.json beside the model, else raw 0..255")
    p.add_argument("--no-flip", action="store_true", help="no horizontal-flip feature averaging")
    p.add_argument("--max-rank", type=_positive_int, default=50, help="length of the CMC curve")
    p.add_argument("--ap", default="non-interpolated", choices=["non-interpolated", "trapezoid"],
                   help="AP variant (PROTOCOLS.md (a))")
    p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking")
    p.add_argument("--rerank-k1", type=int, default=20)
    p.add_argument("--rerank-k2", type=int, default=6)
    p.add_argument("--rerank-lambda", type=float, default=0.3)
    p.add_argument("--query-expansion", action="store_true", help="average query expansion")
    p.add_argument("--qe-top-k", type=int, default=None, help="neighbours for query expansion")
    p.add_argument("--distractors", default=None, help="folder of distractor images for the gallery-size curve")
    p.add_argument("--distractor-sizes", default=None,
                   help="comma-separated distractor counts (default: 0,100k,200k,500k or fractions of the folder)")
    p.add_argument("--multi-query", default="mean", choices=list(MULTI_QUERY_CHOICES),
                   help="Market-1501 multi-query protocol when the dataset has gt_bbox/: pool each query's "
                        "id-and-camera boxes by mean or element-wise max (DATASETS.md §1), or off")
    p.add_argument("--memory-budget-mb", type=int, default=1024, help="memory for chunked ranking")
    p.add_argument("--tsne-ids", type=int, default=30, help="identities in the t-SNE plot")
    p.add_argument("--tsne-points", type=int, default=2000, help="points in the t-SNE plot")
    p.add_argument("--ranked-queries", type=int, default=8, help="queries in the ranked-list grid")
    p.add_argument("--seed", type=int, default=0, help="seed of every sample drawn (plots, distractor tiers)")
    p.add_argument("--no-plots", action="store_true", help="metrics only")
    return p


def _metric_summary(result: dict) -> dict:
    cmc = np.asarray(result["cmc"], dtype=float)
    summary = {f"rank{k}": float(cmc[k - 1]) for k in RANKS if k <= len(cmc)}
    summary.update(mAP=float(result["mAP"]), mINP=float(result["mINP"]),
                   num_valid_queries=int(result["num_valid_queries"]),
                   num_invalid_queries=int(result["num_invalid_queries"]), cmc=cmc.tolist())
    return summary


def rank_features(query, gallery, args) -> dict:
    """Baseline ranking, then query expansion / re-ranking when asked. Returns the variants."""
    import reid_keras.metrics as api  # attribute access: query expansion / re-ranking load only when asked

    evaluate_ranking = api.evaluate_ranking
    common = dict(query_pids=query.pids, gallery_pids=gallery.pids, query_cams=query.camids,
                  gallery_cams=gallery.camids, max_rank=args.max_rank, ap=args.ap)
    try:
        baseline = evaluate_ranking(query_features=query.features, gallery_features=gallery.features,
                                    metric="cosine", memory_budget_mb=args.memory_budget_mb, **common)
    except ValueError as err:  # e.g. no valid query: a data problem, reported without a traceback
        raise UsageError(f"cannot rank this dataset: {err}") from None
    out = {"baseline": {"result": baseline, "query_features": query.features, "distmat": None}}
    if not (args.rerank or args.query_expansion):
        return out
    qf, name = query.features, []
    if args.query_expansion:
        kwargs = {} if args.qe_top_k is None else {"top_k": args.qe_top_k}
        qf = np.asarray(api.query_expansion(query.features, gallery.features, **kwargs), dtype=np.float32)
        name.append("query expansion")
    distmat = None
    if args.rerank:
        distmat = np.asarray(api.rerank_k_reciprocal(qf, gallery.features, k1=args.rerank_k1, k2=args.rerank_k2,
                                                 lambda_value=args.rerank_lambda))
        result = evaluate_ranking(distmat=distmat, **common)
        name.append("re-ranking")
    else:
        result = evaluate_ranking(query_features=qf, gallery_features=gallery.features, metric="cosine",
                                  memory_budget_mb=args.memory_budget_mb, **common)
    out[" + ".join(name)] = {"result": result, "query_features": qf, "distmat": distmat}
    return out


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def write_json(path: str, data: dict) -> str:
    """Atomic JSON write; NaN becomes null (strict JSON readers reject NaN)."""
    return atomic_write_json(path, _jsonable(data), sort_keys=False, allow_nan=False)


def append_csv_row(path: str, row: dict) -> str:
    """Append `row` to the CSV at `path` atomically (rewrite + replace), widening the header for new columns."""
    rows, fields = [], list(CSV_FIELDS)
    if os.path.isfile(path):
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            fields = list(reader.fieldnames or CSV_FIELDS)
            rows = list(reader)
    fields += [k for k in row if k not in fields]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows + [row])
    return atomic_write_text(path, buffer.getvalue())


def format_table(metrics: dict) -> str:
    """The printed summary: one row per variant, percentages."""
    label = "mAP (devkit trapezoid)" if metrics["ap_variant"] == "trapezoid" else "mAP (non-interpolated)"
    ranks = [k for k in RANKS if f"rank{k}" in metrics]
    head = f"{'variant':<32}" + "".join(f"{'rank-' + str(k):>9}" for k in ranks) + f"{label:>25}{'mINP':>8}"
    lines = [f"{metrics['dataset']}: {metrics['num_query']} queries ({metrics['num_valid_queries']} valid, "
             f"{metrics['num_invalid_queries']} invalid), gallery {metrics['num_gallery']}", head]
    for name, m in metrics["variants"].items():
        lines.append(f"{name:<32}" + "".join(f"{100 * m[f'rank{k}']:>9.2f}" for k in ranks)
                     + f"{100 * m['mAP']:>25.2f}{100 * m['mINP']:>8.2f}")
    if "dataset_protocol" in metrics:
        paper = metrics["dataset_protocol"]
        cells = [f"{k} {100 * m:.2f}" + (f" ± {100 * sd:.2f}" if sd is not None and np.isfinite(sd) else "")
                 for k, (m, sd) in paper["mean_std"].items()]
        lines.append(f"{paper['name']}: " + ", ".join(cells))
        if "multi_shot" in paper:
            lines.append(f"{paper['multi_shot']['name']}: " + ", ".join(
                f"{k} {100 * m:.2f}" for k, (m, _) in paper["multi_shot"]["mean_std"].items()))
    if "multi_query" in metrics:
        mq = metrics["multi_query"]
        lines.append(f"{mq['name']}: " + ", ".join(f"{k} {100 * m:.2f}" for k, (m, _) in mq["mean_std"].items())
                     + f" ({mq['pool_images']} gt_bbox images, {mq['queries_without_pool_images']} queries "
                       "without any)")
    if "same_person_threshold" in metrics:
        t = metrics["same_person_threshold"]
        lines.append(f"same-person threshold (equal error rate): cosine distance <= {t['threshold']:.4f} "
                     f"(EER {100 * t['eer']:.2f}%)")
    if "cross_camera" in metrics:
        c = metrics["cross_camera"]
        lines.append(f"cross-camera average: mAP {100 * c['cross_camera_mAP']:.2f}%, "
                     f"rank-1 {100 * c['cross_camera_rank1']:.2f}%")
    for row in metrics.get("gallery_size_curve", []):
        lines.append(f"gallery {row['gallery_size']:>9,} (+{row['distractors']:,} distractors): "
                     f"rank-1 {100 * row['rank1']:.2f}%, mAP {100 * row['mAP']:.2f}%")
    return "\n".join(lines)


def _model_key(model, image_size, preprocess) -> str:
    source = os.path.abspath(model.source)
    stamp = os.path.getmtime(os.path.join(source, "saved_model.pb") if os.path.isdir(source) else source)
    return json.dumps([source, stamp, list(image_size), preprocess])


def run(model, dataset, out: str, args, image_size) -> dict:
    """Extract (or reuse) features, rank, write metrics.json, the CSV row and the plots."""
    from reid_keras.metrics.diagnostics import cross_camera_matrix, eer_threshold, sample_pair_distances
    from reid_keras.metrics.features import extract_features

    os.makedirs(out, exist_ok=True)
    key = _model_key(model, image_size, model.preprocessing)
    feats = {}
    for split in ("query", "gallery"):
        records = getattr(dataset, split)
        if not records:
            raise UsageError(f"{dataset.name} at {dataset.root}: the {split} split is empty")
        feats[split] = extract_features(model, records, batch_size=args.batch_size, flip=not args.no_flip,
                                        image_size=image_size, cache=os.path.join(out, f"features_{split}.npz"),
                                        cache_key=key, label=f"{split} features")
    query, gallery = feats["query"], feats["gallery"]
    variants = rank_features(query, gallery, args)
    final_name = list(variants)[-1]
    final = variants[final_name]
    metrics = {"model": os.path.abspath(model.source), "model_kind": model.kind, "dataset": dataset.name,
               "data_root": os.path.abspath(dataset.root),
               "dataset_options": parse_dataset_options(args.dataset_option),
               "protocol": "PROTOCOLS.md (a): junk = same id and camera or id -1, invalid queries excluded",
               "ap_variant": args.ap, "flip": not args.no_flip, "image_size": list(image_size),
               "preprocessing": model.preprocessing, "num_query": len(query), "num_gallery": len(gallery),
               "variant": final_name, "seed": args.seed,
               "rerank": ({"k1": args.rerank_k1, "k2": args.rerank_k2, "lambda": args.rerank_lambda}
                          if args.rerank else None),
               "query_expansion": {"top_k": args.qe_top_k} if args.query_expansion else None}
    metrics.update({k: v for k, v in _metric_summary(final["result"]).items()})
    metrics["variants"] = {name: _metric_summary(v["result"]) for name, v in variants.items()}

    pos, neg = sample_pair_distances(query.features, gallery.features, query.pids, gallery.pids,
                                     query.camids, gallery.camids, seed=args.seed)
    if len(pos) and len(neg):
        metrics["same_person_threshold"] = dict(eer_threshold(pos, neg), rule="same person if distance <= threshold",
                                                distance="cosine distance 1 - cos of the L2-normalised embeddings "
                                                         "(no re-ranking, no query expansion)")
    paper = dataset_protocol(dataset, query, gallery, args)
    if paper is not None:
        metrics["dataset_protocol"] = paper
    multi = multi_query_protocol(model, dataset, query, gallery, out, args, image_size, key)
    if multi is not None:
        metrics["multi_query"] = multi
    cams = cross_camera_matrix(query.pids, gallery.pids, query.camids, gallery.camids,
                               query_features=final["query_features"], gallery_features=gallery.features,
                               distmat=final["distmat"], ap=args.ap, memory_budget_mb=args.memory_budget_mb)
    metrics["cross_camera"] = cams
    if args.distractors:
        metrics["gallery_size_curve"] = distractor_curve(model, query, gallery, out, args, image_size, key)
        metrics["gallery_size_note"] = "plain embeddings (no re-ranking / query expansion), nested seeded tiers"
    if not args.no_plots:
        from reid_keras.visualize import draw_evaluation_plots

        final_rows = dict(query_features=final["query_features"], distmat=final["distmat"])
        metrics["plots"] = draw_evaluation_plots(
            out, metrics, {name: v["result"]["cmc"] for name, v in variants.items()}, final_rows, query, gallery,
            (pos, neg), seed=args.seed, ranked_queries=args.ranked_queries, tsne_ids=args.tsne_ids,
            tsne_points=args.tsne_points)
    write_json(os.path.join(out, "metrics.json"), metrics)
    row = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "model": metrics["model"], "dataset": dataset.name, "variant": final_name, "ap_variant": args.ap,
           "flip": metrics["flip"], "num_valid_queries": metrics["num_valid_queries"],
           "num_invalid_queries": metrics["num_invalid_queries"], "out": os.path.abspath(out),
           "eer_threshold": metrics.get("same_person_threshold", {}).get("threshold", "")}
    row.update({k: f"{metrics[k]:.6f}" for k in ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP") if k in metrics})
    append_csv_row(args.results_csv or os.path.join(out, "results.csv"), row)
    return metrics


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from reid_keras.data.datasets import DATASET_NAMES, load_dataset
    from reid_keras.data.datasets.base import DatasetCountError, DatasetLayoutError
    from reid_keras.models.loading import ModelLoadError, load_embedding_model

    try:
        if not os.path.exists(args.model):
            raise ModelLoadError(f"--model {args.model!r} does not exist: expected a .keras file or a "
                                 "SavedModel folder")
        if args.distractors and not os.path.isdir(args.distractors):
            raise UsageError(f"--distractors {args.distractors!r} is not a folder of images")
        options = parse_dataset_options(args.dataset_option)
        try:
            dataset = load_dataset(args.dataset, args.data_root, **options)
        except ValueError as err:
            known = "" if args.dataset in DATASET_NAMES else f" (known datasets: {', '.join(DATASET_NAMES)})"
            raise UsageError(f"{err}{known}") from None
        model = load_embedding_model(args.model, preprocessing=args.preprocess)
        if model.kind == "keras" and model.preprocessing is None:
            print(f"note: no preprocessing recorded for {args.model} (no run config.json beside it): feeding "
                  "0..255 pixels; pass --preprocess resnet50 / vgg16 / ... if the backbone needs it", file=sys.stderr)
        image_size = args.image_size or model.image_size
        fixed = model.image_size if model.kind == "keras" else None
        if args.image_size and fixed and tuple(args.image_size) != fixed:
            raise UsageError(f"--image-size {args.image_size[0]}x{args.image_size[1]} differs from the input size "
                             f"{model.image_size[0]}x{model.image_size[1]} fixed in {args.model}")
        if image_size is None:
            raise UsageError(f"{args.model} does not fix its input size: pass --image-size HEIGHTxWIDTH")
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.model.rstrip(os.sep))),
                                       f"eval_{args.dataset}")
        metrics = run(model, dataset, out, args, tuple(image_size))
    except (ModelLoadError, DatasetLayoutError, DatasetCountError, UsageError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(metrics))
    print(f"wrote {os.path.join(out, 'metrics.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
