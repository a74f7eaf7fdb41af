"""`python -m reid_keras.evaluate_search`: score a detector's output on a person-search dataset.

    python -m reid_keras.evaluate_search --dataset cuhk_sysu --data-root /data/CUHK-SYSU --detections dets.npz \
        [--query-embeddings q.npz] [--gallery-size 100|50|500|1000|2000|4000|-1|all] [--score-threshold 0.5] \
        [--matching mutual_best|voc] [--out DIR] [--top-k-figure 5]

The detections file (reid_keras/metrics/detections_file.py) holds, for every gallery scene, the boxes,
scores and embeddings of a detector, and usually the embedding of each query box; any detector can
write it, PyTorch ones included. Prints mAP and top-1/5/10 per gallery size (docs/protocols.md (d);
`all`: every size the dataset offers) and detection AP / recall (docs/protocols.md (e)), writes
`metrics.json`, `per_query.csv`, the gallery-size curve (OIM paper Fig. 7c, when several sizes were
evaluated), the detection precision-recall curve and a results figure (query crop beside its top-k
gallery scenes, matched box green if correct, red if not). Without `--out`, the files go to
`eval_search_<dataset>/` in the detections file's run folder, else `runs/eval_search/<file name>-<dataset>/`.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import os
import sys

from reid_keras.cli.arguments import (HelpFormatter, add_dataset_arguments, add_verbose_argument, non_negative_int,
                                      output_beside_run, positive_int, require_data_root)

AP_VARIANT = "non-interpolated (sklearn-style over distinct scores) x n_tp / n_gt, docs/protocols.md (d)"
PER_QUERY_FIELDS = ["query", "scene", "pid", "valid", "ap", "n_gt", "n_tp", "first_hit_rank"]


class UsageError(ValueError):
    """A command-line value that cannot work (reported without a traceback, exit code 2)."""


def gallery_size_arg(text: str):
    """argparse type: an integer gallery size (-1 = every test scene) or `all`."""
    if text.strip().lower() == "all":
        return "all"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a gallery size such as 50, 100, 500, 1000, 2000, 4000, -1 "
                                         f"or all, got {text!r}") from None


def finite_float(text: str) -> float:
    """argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def default_output(detections: str, dataset: str) -> str:
    """`<run folder>/eval_search_<dataset>` for a detections file in a run folder, else
    `runs/eval_search/<file name>-<dataset>` (never the working directory itself)."""
    return output_beside_run(detections, "eval_search", dataset)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m reid_keras.evaluate_search", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    add_dataset_arguments(p, dataset_help="person-search dataset: cuhk_sysu, prw, or synthetic with "
                                          "--dataset-option layout=cuhk_sysu|prw",
                          root_help="the unpacked dataset folder or its parent (synthetic: where it is written, "
                                    "default data/)")
    p.add_argument("--detections", required=True,
                   help=".npz of every gallery scene's boxes, scores and embeddings (layout: "
                        "reid_keras/metrics/detections_file.py)")
    p.add_argument("--query-embeddings", default=None,
                   help=".npy [Q, D] or .npz with query_embeddings, in the dataset's query order "
                        "(default: the query_embeddings array of --detections)")
    p.add_argument("--gallery-size", type=gallery_size_arg, default=100,
                   help="gallery scenes per query: one the dataset offers (CUHK-SYSU 50, 100, 500, 1000, 2000, "
                        "4000, -1 = every test scene), or all of them (default: 100)")
    p.add_argument("--score-threshold", type=finite_float, default=0.5,
                   help="detections with a lower score are not searched; detection recall is measured there")
    p.add_argument("--matching", default="mutual_best", choices=["mutual_best", "voc"],
                   help="detection matching (docs/protocols.md (e))")
    p.add_argument("--out", default=None, help="output folder (default: eval_search_<dataset> in the detections "
                                               "file's run folder, else runs/eval_search/<file name>-<dataset>)")
    p.add_argument("--top-k-figure", type=non_negative_int, default=5,
                   help="gallery scenes per query in the results figure (0: no figure)")
    p.add_argument("--figure-queries", type=positive_int, default=4, help="queries in the results figure")
    p.add_argument("--seed", type=int, default=0, help="seed of the queries shown in the results figure")
    p.add_argument("--no-plots", action="store_true", help="metrics only")
    add_verbose_argument(p)
    return p


def _load_inputs(args):
    """(detections, query_embeddings, meta) from --detections / --query-embeddings; UsageError naming the flag."""
    from reid_keras.metrics.detections_file import DetectionsFileError, load_detections, load_query_embeddings

    try:
        detections, query, meta = load_detections(args.detections)
    except DetectionsFileError as err:
        raise UsageError(f"--detections: {err}") from None
    if args.query_embeddings:
        try:
            query = load_query_embeddings(args.query_embeddings)
        except DetectionsFileError as err:
            raise UsageError(f"--query-embeddings: {err}") from None
        if meta["num_detections"] and query.shape[1] != meta["embedding_dim"]:
            raise UsageError(f"--query-embeddings {args.query_embeddings}: embeddings of size {query.shape[1]}, but "
                             f"--detections {args.detections} has size {meta['embedding_dim']}")
    elif query is None:
        raise UsageError(f"--detections {args.detections} holds no query_embeddings array: pass "
                         "--query-embeddings FILE (one embedding per query box, in the dataset's query order)")
    return detections, query, meta


def _load_search_dataset(args):
    from reid_keras.data.datasets import load_dataset, parse_options
    from reid_keras.data.datasets.base import DatasetCountError, DatasetLayoutError
    from reid_keras.data.datasets.synthetic import SCENE_LAYOUT_NAMES

    try:
        options = parse_options(args.dataset_option)
        if args.dataset == "synthetic" and options.get("layout") not in SCENE_LAYOUT_NAMES:
            # checked before loading: a crop layout would be generated first, then refused
            raise UsageError(f"--dataset synthetic: person search needs --dataset-option layout="
                             f"{' or layout='.join(SCENE_LAYOUT_NAMES)} (the other layouts are cropped people)")
        require_data_root(args.dataset, args.data_root)
        dataset = load_dataset(args.dataset, args.data_root, **options)
    except (ValueError, DatasetLayoutError, DatasetCountError) as err:
        raise UsageError(str(err)) from None
    if dataset.kind != "scenes":
        raise UsageError(f"--dataset {args.dataset} is a re-ID dataset of cropped people, not person search (no "
                         "scene galleries): use python -m reid_keras.evaluate")
    return dataset


def gallery_sizes_to_run(dataset, requested) -> list:
    """The gallery sizes to evaluate: `requested`, or for "all" every size the dataset offers (sizes that
    name the same gallery, e.g. PRW's 100 and -1, once). UsageError naming --gallery-size."""
    offered = [s for s in dataset.gallery_sizes if s is not None]
    if requested != "all":
        if requested not in dataset.gallery_sizes:
            raise UsageError(f"--gallery-size {requested}: {dataset.name} has no such gallery; accepted: "
                             f"{', '.join(str(s) for s in offered)} or all")
        return [requested]
    sizes = dataset.distinct_gallery_sizes(offered)
    if not sizes:
        raise UsageError(f"--gallery-size all: {dataset.name} declares no gallery size")
    return sizes


def headline_size(sizes):
    """The size whose numbers head metrics.json: the one asked for, or 100 (the usual table) if evaluated."""
    return 100 if 100 in sizes else sizes[0]


def _search_row(result: dict, protocol) -> dict:
    row = {k: result[k] for k in ("gallery_size", "protocol", "mAP", "top1", "top5", "top10", "num_valid_queries",
                                   "num_invalid_queries", "duplicates", "warnings")}
    row["mean_gallery"] = float(sum(len(g) for g in protocol.galleries) / max(len(protocol.galleries), 1))
    return row


def _detection_summary(result: dict) -> dict:
    keys = ("ap", "recall", "recall_labeled", "precision", "num_boxes", "num_labeled_boxes", "num_detections",
            "matching", "score_threshold", "ap_score_threshold", "warnings")
    return {k: result[k] for k in keys if k in result}


def run_evaluation(args, dataset, detections, query, meta) -> tuple:
    """(metrics dict, search results per size, detection result); UsageError for what the evaluation refuses."""
    from reid_keras.metrics.detection import evaluate_detection
    from reid_keras.metrics.search import evaluate_search

    if len(query) != len(dataset.queries):
        source = f"--query-embeddings {args.query_embeddings}" if args.query_embeddings else \
            f"the query_embeddings array of --detections {args.detections}"
        raise UsageError(f"{source} has {len(query)} rows, but {dataset.name} has {len(dataset.queries)} queries "
                         "(one embedding per query box, in the dataset's query order)")
    sizes = gallery_sizes_to_run(dataset, args.gallery_size)
    head = headline_size(sizes)
    keep = args.top_k_figure if not args.no_plots else 0
    image_sizes, unreadable = scene_image_sizes(dataset.gallery)
    results = {}
    try:
        for size in sizes:
            results[size] = evaluate_search(detections, query, dataset, gallery_size=size,
                                            score_threshold=args.score_threshold, keep_top=keep if size == head else 0,
                                            image_sizes=image_sizes)
        detection = evaluate_detection(detections, dataset, score_threshold=args.score_threshold,
                                       matching=args.matching, image_sizes=image_sizes)
    except ValueError as err:  # what the evaluation refuses names the image or the array
        inputs = f"--detections {args.detections}" + (f" with --query-embeddings {args.query_embeddings}"
                                                       if args.query_embeddings else "")
        raise UsageError(f"{inputs}: {err}") from None
    rows = [_search_row(results[s], dataset.search_protocol(s)) for s in sizes]
    warnings = collect_warnings(results, detection)
    if unreadable:
        warnings.append(f"{len(unreadable)} gallery image(s) could not be opened (e.g. {unreadable[0]}): boxes past "
                        "their right or bottom edge are not counted")
    if meta.get("dataset_name") and meta["dataset_name"] != dataset.name:
        warnings.append(f"the detections file was written for {meta['dataset_name']!r}, evaluated on {dataset.name!r}")
    headline = next(r for r in rows if r["gallery_size"] == head)
    metrics = {"dataset": dataset.name, "data_root": dataset.root, "dataset_options": dict(dataset.options),
               "detections": os.path.abspath(args.detections),
               "query_embeddings": os.path.abspath(args.query_embeddings) if args.query_embeddings else "in detections",
               "num_queries": len(dataset.queries), "num_gallery_scenes": len(dataset.gallery),
               "detection_images": meta["num_images"], "num_detections": meta["num_detections"],
               "embedding_dim": meta["embedding_dim"], "score_threshold": args.score_threshold,
               "ap_variant": AP_VARIANT, "gallery_sizes": sizes, "search": rows,
               **{k: headline[k] for k in ("gallery_size", "protocol", "mAP", "top1", "top5", "top10",
                                           "num_valid_queries", "num_invalid_queries")},
               "detection": _detection_summary(detection), "warnings": warnings,
               "dataset_skipped": dataset.skipped.as_dict()}
    return metrics, results, detection


def scene_image_sizes(scenes) -> tuple:
    """({scene name: (height, width)} read from the image headers, [paths that could not be opened])."""
    from PIL import Image

    sizes, unreadable = {}, []
    for scene in scenes:
        try:
            with Image.open(scene.path) as img:
                sizes[scene.name] = (img.height, img.width)
        except (OSError, ValueError):
            unreadable.append(scene.path)
    return sizes, unreadable


def collect_warnings(results: dict, detection: dict) -> list:
    """Every warning once: those of all gallery sizes as they are, those of some sizes prefixed with the
    size ("gallery 50: ..."), the detection evaluation's own prefixed with "detection: "."""
    lists = [list(r.get("warnings", [])) for r in results.values()]
    warnings = []
    for size, own in zip(results, lists):
        for w in own:
            text = w if all(w in other for other in lists) else f"gallery {size}: {w}"
            if text not in warnings:
                warnings.append(text)
    warnings += [f"detection: {w}" for w in detection.get("warnings", []) if w not in warnings]
    return warnings


def per_query_csv(dataset, result: dict) -> str:
    """One line per query of `result` (an evaluate_search result): index, scene, pid and its numbers."""
    per = result["per_query"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PER_QUERY_FIELDS)
    for i, q in enumerate(dataset.queries):
        writer.writerow([q.index, q.scene, q.pid, int(bool(per["valid"][i])), f"{float(per['ap'][i]):.6f}",
                         int(per["n_gt"][i]), int(per["n_tp"][i]), int(per["first_hit_rank"][i])])
    return buffer.getvalue()


def format_search_table(metrics: dict) -> str:
    """The printed summary: one row per gallery size (percentages), the detection line, the warnings."""
    lines = [f"{metrics['dataset']}: {metrics['num_queries']} queries, {metrics['num_gallery_scenes']} gallery "
             f"scenes; detections for {metrics['detection_images']} images ({metrics['num_detections']:,} boxes, "
             f"{metrics['embedding_dim']}-d); score threshold {metrics['score_threshold']:g}",
             f"{'gallery':<10}{'protocol':<30}{'mAP':>8}{'top-1':>8}{'top-5':>8}{'top-10':>8}{'valid':>8}"
             f"{'invalid':>9}"]
    for r in metrics["search"]:
        lines.append(f"{str(r['gallery_size']):<10}{r['protocol'][:29]:<30}" + "".join(
            f"{100 * r[k]:>8.2f}" for k in ("mAP", "top1", "top5", "top10"))
            + f"{r['num_valid_queries']:>8}{r['num_invalid_queries']:>9}")
    lines.append(f"mAP: {metrics['ap_variant']}")
    d = metrics["detection"]
    lines.append(f"detection ({d.get('matching')} matching): AP {100 * d['ap']:.2f}% (scores >= "
                 f"{d.get('ap_score_threshold', 0.01):g}), recall {100 * d['recall']:.2f}% at score >= "
                 f"{metrics['score_threshold']:g} (labeled people {_percent(d['recall_labeled'])})"
                 + f", precision {_percent(d.get('precision'))}")
    lines += [f"warning: {w}" for w in metrics["warnings"]]
    if metrics["dataset_skipped"]["total"]:
        lines.append(f"dataset: skipped {metrics['dataset_skipped']['total']} file(s) "
                     f"({', '.join(f'{n} {k}' for k, n in metrics['dataset_skipped']['by_reason'].items())})")
    return "\n".join(lines)


def _percent(value) -> str:
    """"12.34%", or "n/a" for a value that is undefined (NaN, e.g. no labeled box)."""
    return f"{100 * value:.2f}%" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from reid_keras.io_utils import atomic_write_text, write_json

    try:
        detections, query, meta = _load_inputs(args)
        dataset = _load_search_dataset(args)
        metrics, results, detection = run_evaluation(args, dataset, detections, query, meta)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out or default_output(args.detections, args.dataset)
    os.makedirs(out, exist_ok=True)
    head = results[metrics["gallery_size"]]
    atomic_write_text(os.path.join(out, "per_query.csv"), per_query_csv(dataset, head))
    metrics["per_query"] = "per_query.csv"
    if not args.no_plots:
        from reid_keras.metrics.search_plots import draw_search_plots

        metrics["plots"] = draw_search_plots(out, dataset, metrics, head, detection,
                                             num_queries=args.figure_queries, seed=args.seed)
    write_json(os.path.join(out, "metrics.json"), metrics)
    print(format_search_table(metrics))
    print(f"wrote {os.path.join(out, 'metrics.json')}")
    return 0
