"""Evaluation (docs/protocols.md): re-ID ranking with CMC / mAP / mINP ((a), (f)), classic CUHK03 and
CUHK01 protocols ((b), (c)), Market-1501 multi-query pooling (docs/datasets.md §1), bounded-memory
distances, k-reciprocal re-ranking and query expansion, and `evaluate_model`, the whole evaluation
of a trained model on a dataset; person search ((d): `evaluate_search`, `ground_truth_detections`)
and detection ((e): `evaluate_detection`, `box_iou`). `rerank_k_reciprocal` / `query_expansion` import scipy.sparse on
first use; the plots (`reid_keras.metrics.plots`) import matplotlib when drawn."""
from reid_keras.metrics.detection import box_iou, evaluate_detection
from reid_keras.metrics.distances import (GalleryIndex, chunk_rows, iter_distance_blocks,
                                          pairwise_distance)
from reid_keras.metrics.evaluation import evaluate_model
from reid_keras.metrics.multi_query import POOLING_METHODS, pool_multi_query
from reid_keras.metrics.options import EvaluationError, EvaluationOptions
from reid_keras.metrics.protocols import (aggregate_splits, draw_single_shot_gallery,
                                          evaluate_cuhk01, evaluate_cuhk03)
from reid_keras.metrics.ranking import AP_VARIANTS, evaluate_ranking, rank_queries
from reid_keras.metrics.report import format_table
from reid_keras.metrics.search import evaluate_search, ground_truth_detections

_LAZY = {"rerank_k_reciprocal", "query_expansion"}

__all__ = ["AP_VARIANTS", "EvaluationError", "EvaluationOptions", "GalleryIndex", "POOLING_METHODS",
           "aggregate_splits", "box_iou", "evaluate_detection", "evaluate_search", "ground_truth_detections", "chunk_rows", "draw_single_shot_gallery", "evaluate_cuhk01", "evaluate_cuhk03",
           "evaluate_model", "evaluate_ranking", "format_table", "iter_distance_blocks", "pairwise_distance",
           "pool_multi_query", "query_expansion", "rank_queries", "rerank_k_reciprocal"]


def __getattr__(name):
    if name in _LAZY:
        import reid_keras.metrics.rerank as rerank

        return getattr(rerank, name)
    raise AttributeError(f"module 'reid_keras.metrics' has no attribute {name!r}")
