"""The benchmarks' own evaluation protocols beyond docs/protocols.md (a), by the name a dataset declares.

A dataset lists the protocols it supports (`ReidDataset.protocols`: name, options, records);
`evaluate_model` runs the function registered here for each and stores its result under the
registered metrics.json key:

| name | key | protocol |
| --- | --- | --- |
| cuhk01_trials | dataset_protocol | CUHK01, docs/protocols.md (c): 10 seeded single-shot trials, options `direction` |
| cuhk03_classic | dataset_protocol | classic CUHK03, docs/protocols.md (b): single- and multi-shot, options `split_index` |
| multi_query | multi_query | Market-1501 multi-query, docs/datasets.md §1: `records` = the gt_bbox boxes pooled per query |
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from reid_keras.metrics.features import FeatureSet
from reid_keras.metrics.multi_query import pool_multi_query
from reid_keras.metrics.options import EvaluationError, EvaluationOptions
from reid_keras.metrics.protocols import evaluate_cuhk01, evaluate_cuhk03
from reid_keras.metrics.ranking import evaluate_ranking
from reid_keras.metrics.report import RANKS, rank_table

TRIALS = 10  # CUHK01 trials and classic CUHK03 single-shot repeats (docs/protocols.md (b), (c))


@dataclasses.dataclass(frozen=True)
class ProtocolInputs:
    """What a protocol function gets besides its declaration: the evaluated splits, the options and
    `embed(records, name)`, which returns the records' features (cached as `features_<name>.npz`)."""

    query: FeatureSet
    gallery: FeatureSet
    options: EvaluationOptions
    embed: Callable


def cuhk01_trials(protocol, inputs: ProtocolInputs) -> dict:
    """CUHK01 (docs/protocols.md (c)): camera A = the query split for direction A->B, else the gallery."""
    direction = protocol.options.get("direction", "A->B")
    query, gallery, seed = inputs.query, inputs.gallery, inputs.options.seed
    cam_a, cam_b = (query, gallery) if direction == "A->B" else (gallery, query)
    result = evaluate_cuhk01(features_a=cam_a.features, pids_a=cam_a.pids, features_b=cam_b.features,
                             pids_b=cam_b.pids, trials=TRIALS, seed=seed, direction=direction)
    table = {k: [v[0] / 100, v[1] / 100] for k, v in result["table"].items()}  # fractions like the rest
    return {"name": f"CUHK01 paper protocol (docs/protocols.md (c)), {result['trials']} trials, {direction}",
            "mean_std": table, "trials": result["trials"], "seed": seed, "num_ids": result["num_ids"]}


def cuhk03_classic(protocol, inputs: ProtocolInputs) -> dict:
    """Classic CUHK03 (docs/protocols.md (b)) on one split: single shot (idver Table IV), multi shot (Table V)."""
    split = int(protocol.options.get("split_index", 0))
    query, gallery, options = inputs.query, inputs.gallery, inputs.options
    tables = {}
    for mode in ("single_shot", "multi_shot"):
        result = evaluate_cuhk03(query_features=query.features, gallery_features=gallery.features,
                                 query_pids=query.pids, gallery_pids=gallery.pids, query_cams=query.camids,
                                 gallery_cams=gallery.camids, mode=mode, repeats=TRIALS, seed=options.seed,
                                 split_index=split, max_rank=options.max_rank)
        tables[mode] = rank_table(result, RANKS)
    return {"name": f"CUHK03 classic single-shot (docs/protocols.md (b)), split {split}, {TRIALS} repeats",
            "mean_std": tables["single_shot"], "multi_shot": {
                "name": f"CUHK03 classic multi-shot (docs/protocols.md (b)), split {split}",
                "mean_std": tables["multi_shot"]},
            "seed": options.seed, "split_index": split}


def multi_query(protocol, inputs: ProtocolInputs):
    """Market-1501 multi-query (docs/datasets.md §1): each query's feature pooled over the records of its
    id and camera (`options.multi_query`: mean or max), then the gallery ranked as docs/protocols.md (a).
    None when `options.multi_query` is "off" or there are no records."""
    options = inputs.options
    if options.multi_query == "off" or not protocol.records:
        return None
    query, gallery = inputs.query, inputs.gallery
    pool = inputs.embed(list(protocol.records), "multi_query")
    pooled, counts = pool_multi_query(query.pids, query.camids, query.features, pool.pids, pool.camids,
                                      pool.features, method=options.multi_query)
    try:
        result = evaluate_ranking(query_features=pooled, gallery_features=gallery.features, query_pids=query.pids,
                                  gallery_pids=gallery.pids, query_cams=query.camids, gallery_cams=gallery.camids,
                                  metric="cosine", max_rank=options.max_rank, ap=options.ap,
                                  memory_budget_mb=options.memory_budget_mb)
    except ValueError as err:
        raise EvaluationError(f"cannot rank the multi-query features: {err}") from None
    return {"name": f"Market-1501 multi-query (docs/datasets.md §1), {options.multi_query} pooling of gt_bbox "
                    "features per query id and camera",
            "mean_std": rank_table(result, RANKS), "pooling": options.multi_query, "pool_images": len(pool),
            "queries_without_pool_images": int(np.count_nonzero(counts == 0))}


# protocol name -> (metrics.json key, function(protocol, ProtocolInputs) -> entry or None)
DATASET_PROTOCOLS = {
    "cuhk01_trials": ("dataset_protocol", cuhk01_trials),
    "cuhk03_classic": ("dataset_protocol", cuhk03_classic),
    "multi_query": ("multi_query", multi_query),
}


def check_protocols(protocols, dataset: str = "the dataset") -> None:
    """EvaluationError naming the first declared protocol that has no function here."""
    for protocol in protocols:
        if protocol.name not in DATASET_PROTOCOLS:
            raise EvaluationError(f"{dataset} declares the evaluation protocol {protocol.name!r}, which "
                                  "reid_keras.metrics.dataset_protocols does not implement (implemented: "
                                  f"{', '.join(DATASET_PROTOCOLS)})")


def run_protocols(protocols, inputs: ProtocolInputs) -> dict:
    """{metrics.json key: entry} of every declared protocol, in declaration order; protocols that are
    off (an entry of None) are left out."""
    check_protocols(protocols)
    results = {}
    for protocol in protocols:
        key, function = DATASET_PROTOCOLS[protocol.name]
        entry = function(protocol, inputs)
        if entry is not None and key in results:  # two protocols would overwrite one metrics.json entry
            raise EvaluationError(f"protocols {list(p.name for p in protocols)} both write {key!r}")
        if entry is not None:
            results[key] = entry
    return results
