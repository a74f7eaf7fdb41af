"""The benchmarks' own evaluation protocols beyond PROTOCOLS.md (a), run by `reid_keras.evaluate`.

- `dataset_protocol`: CUHK01 (PROTOCOLS.md (c)) and classic CUHK03 single- and multi-shot (b).
- `multi_query_protocol`: Market-1501 multi-query (DATASETS.md §1; idver paper Table III "MQ"):
  each query's feature pooled over the `gt_bbox` boxes of its id and camera, then ranked as (a).
- `distractor_curve`: the gallery-size curve with the 500k distractors (idver paper Table VI).

`args` is the `python -m reid_keras.evaluate` namespace; errors a user can fix are
`evaluate.UsageError`s.
"""
from __future__ import annotations

import os

import numpy as np

MULTI_QUERY_CHOICES = ("mean", "max", "off")


def distractor_curve(model, query, gallery, out: str, args, image_size, key: str) -> list:
    """Embed the distractor folder (cached) and evaluate the nested gallery-size tiers."""
    from reid_keras.data.datasets.base import SkipReport
    from reid_keras.data.datasets.market1501 import load_distractors
    from reid_keras.evaluate import UsageError
    from reid_keras.metrics.diagnostics import distractor_tiers, gallery_size_curve
    from reid_keras.metrics.features import extract_features

    skipped = SkipReport()
    records = load_distractors(args.distractors, skipped)
    if skipped.total:
        print(f"distractors: {skipped}")
    if not records:
        raise UsageError(f"--distractors {args.distractors!r} holds no readable images")
    if args.distractor_sizes:
        try:
            sizes = [int(float(v)) for v in args.distractor_sizes.split(",")]
        except ValueError:
            raise UsageError(f"--distractor-sizes {args.distractor_sizes!r}: expected comma-separated counts") from None
        too_big = [s for s in sizes if s > len(records) or s < 0]
        if too_big:
            raise UsageError(f"--distractor-sizes {too_big} outside 0..{len(records)} (images in the folder)")
    else:
        sizes = distractor_tiers(len(records))
    feats = extract_features(model, records, batch_size=args.batch_size, flip=not args.no_flip,
                             image_size=image_size, cache=os.path.join(out, "features_distractors.npz"),
                             cache_key=key, label="distractor features")
    return gallery_size_curve(query, gallery, feats.features, sizes, seed=args.seed, ap=args.ap,
                              memory_budget_mb=args.memory_budget_mb)


def dataset_protocol(dataset, query, gallery, args):
    """The benchmark's own paper protocol where it is not (a): CUHK01 (c), classic CUHK03 (b)."""
    from reid_keras.evaluate import RANKS
    from reid_keras.metrics import protocols

    if dataset.name == "cuhk01":
        direction = dataset.info.get("direction", "A->B")
        cam_a, cam_b = (query, gallery) if direction == "A->B" else (gallery, query)
        result = protocols.evaluate_cuhk01(features_a=cam_a.features, pids_a=cam_a.pids, features_b=cam_b.features,
                                           pids_b=cam_b.pids, trials=10, seed=args.seed, direction=direction)
        table = {k: [v[0] / 100, v[1] / 100] for k, v in result["table"].items()}  # fractions like the rest
        return {"name": f"CUHK01 paper protocol (PROTOCOLS.md (c)), {result['trials']} trials, {direction}",
                "mean_std": table, "trials": result["trials"], "seed": args.seed, "num_ids": result["num_ids"]}
    if dataset.name == "cuhk03" and str(dataset.info.get("protocol", "")).startswith("classic"):
        split = int(dataset.info.get("split_index", 0))
        tables = {}
        for mode in ("single_shot", "multi_shot"):  # idver paper Table IV and Table V
            result = protocols.evaluate_cuhk03(query_features=query.features, gallery_features=gallery.features,
                                               query_pids=query.pids, gallery_pids=gallery.pids,
                                               query_cams=query.camids, gallery_cams=gallery.camids, mode=mode,
                                               repeats=10, seed=args.seed, split_index=split,
                                               max_rank=args.max_rank)
            tables[mode] = _rank_table(result, RANKS)
        return {"name": f"CUHK03 classic single-shot (PROTOCOLS.md (b)), split {split}, 10 repeats",
                "mean_std": tables["single_shot"], "multi_shot": {
                    "name": f"CUHK03 classic multi-shot (PROTOCOLS.md (b)), split {split}",
                    "mean_std": tables["multi_shot"]},
                "seed": args.seed, "split_index": split}
    return None


def _rank_table(result: dict, ranks) -> dict:
    """{"rank-k": [fraction, None], ..., "mAP": [fraction, None]}: one evaluation, no spread."""
    cmc = np.asarray(result["cmc"])
    table = {f"rank-{k}": [float(cmc[k - 1]), None] for k in ranks if k <= len(cmc)}
    table["mAP"] = [float(result["mAP"]), None]
    return table


def multi_query_protocol(model, dataset, query, gallery, out: str, args, image_size, key: str):
    """Market-1501 multi-query (DATASETS.md §1): pooled query features ranked as PROTOCOLS.md (a).

    Runs when `dataset.multi_query` (the `gt_bbox` boxes of the queries' ids and cameras) is not
    empty and `--multi-query` is not "off". The boxes are embedded like the other splits (cache
    `features_multi_query.npz`, same cache key), pooled per query (`pool_multi_query`) and the
    gallery ranked by cosine with the run's AP variant. Returns the metrics.json entry or None.
    """
    from reid_keras.evaluate import RANKS, UsageError
    from reid_keras.metrics import evaluate_ranking, pool_multi_query
    from reid_keras.metrics.features import extract_features

    method = getattr(args, "multi_query", "mean")
    if method not in MULTI_QUERY_CHOICES:
        raise UsageError(f"--multi-query {method!r}: expected one of {', '.join(MULTI_QUERY_CHOICES)}")
    records = getattr(dataset, "multi_query", None) or []
    if method == "off" or not records:
        return None
    pool = extract_features(model, records, batch_size=args.batch_size, flip=not args.no_flip,
                            image_size=image_size, cache=os.path.join(out, "features_multi_query.npz"),
                            cache_key=key, label="multi-query features")
    pooled, counts = pool_multi_query(query.pids, query.camids, query.features, pool.pids, pool.camids,
                                      pool.features, method=method)
    try:
        result = evaluate_ranking(query_features=pooled, gallery_features=gallery.features, query_pids=query.pids,
                                  gallery_pids=gallery.pids, query_cams=query.camids, gallery_cams=gallery.camids,
                                  metric="cosine", max_rank=args.max_rank, ap=args.ap,
                                  memory_budget_mb=args.memory_budget_mb)
    except ValueError as err:
        raise UsageError(f"cannot rank the multi-query features: {err}") from None
    return {"name": f"Market-1501 multi-query (DATASETS.md §1), {method} pooling of gt_bbox features per query "
                    "id and camera",
            "mean_std": _rank_table(result, RANKS), "pooling": method, "pool_images": len(pool),
            "queries_without_pool_images": int(np.count_nonzero(counts == 0))}
