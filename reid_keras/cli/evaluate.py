"""`python -m reid_keras.evaluate`: rank a dataset's gallery for its queries with a trained model.

    python -m reid_keras.evaluate --model runs/x/last.keras --dataset market1501 --data-root /data/market \
        [--rerank] [--query-expansion] [--distractors /data/market/500k] [--multi-query max] [--out DIR]

Prints rank-1/5/10/20, mAP and mINP (docs/protocols.md (a); CUHK01 and classic CUHK03 also get their
paper protocol, (c) / (b); Market-1501 with `gt_bbox/` also gets multi-query, docs/datasets.md §1:
each query pooled over the hand-drawn boxes of its id and camera, `--multi-query mean|max|off`),
writes `metrics.json`, appends a row to a results CSV and draws the CMC curve, a ranked-list grid,
the camera-pair heatmap, the pair distance histograms with the equal-error threshold, a t-SNE of the
embeddings and, with `--distractors`, the gallery-size curve (identification-verification paper
Table VI). Features are cached in the output folder and reused by a rerun with the same model.
Without `--out`, the files go to `eval_<dataset>/` inside the model's run folder, or to
`runs/eval/<model name>-<dataset>/` for a model outside a run folder.
The work is `reid_keras.metrics.evaluation.evaluate_model`; this module only reads the flags.
"""
from __future__ import annotations

import argparse
import os
import sys

from reid_keras.cli.arguments import (HelpFormatter, add_dataset_arguments, add_verbose_argument, image_size,
                                      output_beside_run, positive_int, require_data_root)
from reid_keras.metrics.options import MULTI_QUERY_CHOICES, EvaluationOptions


class UsageError(ValueError):
    """A command-line value that cannot work (reported without a traceback, exit code 2)."""


def default_output(model: str, dataset: str) -> str:
    """Where the evaluation goes without --out: `<run folder>/eval_<dataset>` for a model in a run folder,
    else `runs/eval/<model name>-<dataset>` (relative to the working directory, never the directory itself)."""
    return output_beside_run(model, "eval", dataset)


def build_parser() -> argparse.ArgumentParser:
    from reid_keras.data.datasets import DATASET_NAMES

    p = argparse.ArgumentParser(prog="python -m reid_keras.evaluate", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="a .keras file or an exported SavedModel folder")
    add_dataset_arguments(p, dataset_help=f"dataset name, one of {', '.join(DATASET_NAMES)}",
                          root_help="the unpacked dataset folder or its parent (synthetic: where it is written, "
                                    "default data/)")
    p.add_argument("--out", default=None, help="output folder (default: eval_<dataset> in the model's run folder, "
                                               "else runs/eval/<model name>-<dataset>)")
    p.add_argument("--results-csv", default=None, help="CSV to append a row to (default: <out>/results.csv)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    p.add_argument("--image-size", type=image_size(), default=None,
                   help="HEIGHTxWIDTH fed to the model (default: the model's own input size)")
    p.add_argument("--preprocess", default=None,
                   help="backbone preprocessing of a .keras model (efficientnet, none, unit, resnet50, vgg16, "
                        "caffe, tf, torch); default: the run's config.json beside the model, else raw 0..255")
    p.add_argument("--no-flip", action="store_true", help="no horizontal-flip feature averaging")
    p.add_argument("--max-rank", type=positive_int, default=50, help="length of the CMC curve")
    p.add_argument("--ap", default="non-interpolated", choices=["non-interpolated", "trapezoid"],
                   help="AP variant (docs/protocols.md (a))")
    p.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking")
    p.add_argument("--rerank-k1", type=int, default=20, help="re-ranking: k-reciprocal neighbours")
    p.add_argument("--rerank-k2", type=int, default=6, help="re-ranking: neighbours of the query expansion")
    p.add_argument("--rerank-lambda", type=float, default=0.3,
                   help="re-ranking: weight of the original distance beside the Jaccard distance")
    p.add_argument("--query-expansion", action="store_true", help="average query expansion")
    p.add_argument("--qe-top-k", type=int, default=None, help="neighbours for query expansion")
    p.add_argument("--distractors", default=None, help="folder of distractor images for the gallery-size curve")
    p.add_argument("--distractor-sizes", default=None,
                   help="comma-separated distractor counts (default: 0,100k,200k,500k or fractions of the folder)")
    p.add_argument("--multi-query", default="mean", choices=list(MULTI_QUERY_CHOICES),
                   help="Market-1501 multi-query protocol when the dataset has gt_bbox/: pool each query's "
                        "id-and-camera boxes by mean or element-wise max (docs/datasets.md §1), or off")
    p.add_argument("--memory-budget-mb", type=int, default=1024, help="memory for chunked ranking")
    p.add_argument("--tsne-ids", type=int, default=30, help="identities in the t-SNE plot")
    p.add_argument("--tsne-points", type=int, default=2000, help="points in the t-SNE plot")
    p.add_argument("--ranked-queries", type=int, default=8, help="queries in the ranked-list grid")
    p.add_argument("--seed", type=int, default=0, help="seed of every sample drawn (plots, distractor tiers)")
    p.add_argument("--no-plots", action="store_true", help="metrics only")
    add_verbose_argument(p)
    return p


def evaluation_options(args) -> EvaluationOptions:
    """The parsed flags as `EvaluationOptions`; UsageError for a value they reject."""
    sizes = None
    if args.distractor_sizes:
        try:
            sizes = tuple(int(float(v)) for v in args.distractor_sizes.split(","))
        except ValueError:
            raise UsageError(f"--distractor-sizes {args.distractor_sizes!r}: expected comma-separated counts") from None
    try:
        return EvaluationOptions(
            batch_size=args.batch_size, flip=not args.no_flip, max_rank=args.max_rank, ap=args.ap,
            rerank=args.rerank, rerank_k1=args.rerank_k1, rerank_k2=args.rerank_k2, rerank_lambda=args.rerank_lambda,
            query_expansion=args.query_expansion, qe_top_k=args.qe_top_k, distractors=args.distractors,
            distractor_sizes=sizes, multi_query=args.multi_query, memory_budget_mb=args.memory_budget_mb,
            plots=not args.no_plots, tsne_ids=args.tsne_ids, tsne_points=args.tsne_points,
            ranked_queries=args.ranked_queries, seed=args.seed, results_csv=args.results_csv)
    except ValueError as err:
        raise UsageError(str(err)) from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from reid_keras.data.datasets import load_dataset, parse_options
    from reid_keras.data.datasets.base import DatasetCountError, DatasetLayoutError
    from reid_keras.families import register_serializables
    from reid_keras.metrics.evaluation import evaluate_model
    from reid_keras.metrics.options import EvaluationError
    from reid_keras.metrics.report import format_table
    from reid_keras.models.loading import ModelLoadError, load_embedding_model

    try:
        if not os.path.exists(args.model):
            raise ModelLoadError(f"--model {args.model!r} does not exist: expected a .keras file or a "
                                 "SavedModel folder")
        options = evaluation_options(args)
        if args.distractors and not os.path.isdir(args.distractors):
            raise UsageError(f"--distractors {args.distractors!r} is not a folder of images")
        try:  # an unknown name: load_dataset's message lists the registered datasets
            require_data_root(args.dataset, args.data_root)
            dataset = load_dataset(args.dataset, args.data_root, **parse_options(args.dataset_option))
            if dataset.kind == "scenes":
                raise ValueError(f"--dataset {args.dataset} holds whole scenes for person search; this command "
                                 "ranks person crops. Score a detector's output with python -m "
                                 "reid_keras.evaluate_search")
        except ValueError as err:
            raise UsageError(str(err)) from None
        register_serializables()  # a .keras file names the models' own layers; a fresh process knows none
        model = load_embedding_model(args.model, preprocessing=args.preprocess)
        if model.kind == "keras" and model.preprocessing is None:
            print(f"note: no preprocessing recorded for {args.model} (no run config.json beside it): feeding "
                  "0..255 pixels; pass --preprocess resnet50 / vgg16 / ... if the backbone needs it", file=sys.stderr)
        fixed = model.image_size if model.kind == "keras" else None
        if args.image_size and fixed and tuple(args.image_size) != fixed:
            raise UsageError(f"--image-size {args.image_size[0]}x{args.image_size[1]} differs from the input size "
                             f"{model.image_size[0]}x{model.image_size[1]} fixed in {args.model}")
        if (args.image_size or model.image_size) is None:
            raise UsageError(f"{args.model} does not fix its input size: pass --image-size HEIGHTxWIDTH")
        out = args.out or default_output(args.model, args.dataset)
        metrics = evaluate_model(model, dataset, out, options, args.image_size)
    except (ModelLoadError, DatasetLayoutError, DatasetCountError, UsageError, EvaluationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_table(metrics))
    print(f"wrote {os.path.join(out, 'metrics.json')}")
    return 0
