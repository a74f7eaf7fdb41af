"""What an evaluation run is asked to do (`EvaluationOptions`) and the error for what a user can fix.

Defaults are those of docs/protocols.md (a) as the evaluation command runs it: cosine ranking of
flip-averaged features, non-interpolated AP, CMC to rank 50, Market-1501 multi-query by mean
pooling (docs/datasets.md §1) when the dataset declares it.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Optional

from reid_keras.metrics.multi_query import POOLING_METHODS
from reid_keras.metrics.ranking import AP_VARIANTS

MULTI_QUERY_CHOICES = (*POOLING_METHODS, "off")


class EvaluationError(ValueError):
    """The data or the options cannot be evaluated (e.g. no valid query, an empty split); the
    message says what is wrong, so commands report it without a traceback."""


def _int(value, name: str, low: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"EvaluationOptions.{name} must be {what}, got {value!r}")
    return int(value)


@dataclasses.dataclass(frozen=True)
class EvaluationOptions:
    """Options of `evaluate_model`; every field is checked, a bad value raises ValueError naming it.

    distractors: folder of distractor images for the gallery-size curve (idver paper Table VI);
    distractor_sizes: the distractor counts of its tiers (default: `diagnostics.distractor_tiers`).
    multi_query: pooling of the multi-query protocol ("mean", "max") or "off".
    tsne_ids / tsne_points / ranked_queries: plot sizes, 0 leaves that plot out.
    results_csv: CSV a row is appended to (default: `<out>/results.csv`).
    """

    batch_size: int = 64
    flip: bool = True
    max_rank: int = 50
    ap: str = "non-interpolated"
    rerank: bool = False
    rerank_k1: int = 20
    rerank_k2: int = 6
    rerank_lambda: float = 0.3
    query_expansion: bool = False
    qe_top_k: Optional[int] = None
    distractors: Optional[str] = None
    distractor_sizes: Optional[tuple] = None
    multi_query: str = "mean"
    memory_budget_mb: float = 1024
    plots: bool = True
    tsne_ids: int = 30
    tsne_points: int = 2000
    ranked_queries: int = 8
    seed: int = 0
    results_csv: Optional[str] = None

    def __post_init__(self):
        for name in ("batch_size", "max_rank", "rerank_k1", "rerank_k2"):
            _int(getattr(self, name), name, 1, "a positive integer")
        for name in ("tsne_ids", "tsne_points", "ranked_queries", "seed"):
            _int(getattr(self, name), name, 0, "an integer >= 0")
        if self.qe_top_k is not None:
            _int(self.qe_top_k, "qe_top_k", 1, "a positive integer or None")
        for name in ("flip", "rerank", "query_expansion", "plots"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"EvaluationOptions.{name} must be True or False, got {getattr(self, name)!r}")
        if self.ap not in AP_VARIANTS:
            raise ValueError(f"EvaluationOptions.ap must be one of {', '.join(AP_VARIANTS)}, got {self.ap!r}")
        if self.multi_query not in MULTI_QUERY_CHOICES:
            raise ValueError(f"EvaluationOptions.multi_query must be one of {', '.join(MULTI_QUERY_CHOICES)}, "
                             f"got {self.multi_query!r}")
        if not (isinstance(self.rerank_lambda, numbers.Real) and 0 <= self.rerank_lambda <= 1):
            raise ValueError(f"EvaluationOptions.rerank_lambda must be in [0, 1], got {self.rerank_lambda!r}")
        budget = self.memory_budget_mb
        if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not 0 < budget < math.inf:
            raise ValueError(f"EvaluationOptions.memory_budget_mb must be a positive number, got {budget!r}")
        for name in ("distractors", "results_csv"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"EvaluationOptions.{name} must be a path or None, got {value!r}")
        if self.distractor_sizes is not None:
            if isinstance(self.distractor_sizes, (str, bytes)) or not hasattr(self.distractor_sizes, "__iter__"):
                raise ValueError("EvaluationOptions.distractor_sizes must be a sequence of counts, "
                                 f"got {self.distractor_sizes!r}")
            sizes = tuple(_int(v, "distractor_sizes", 0, "counts >= 0") for v in self.distractor_sizes)
            if not sizes:
                raise ValueError("EvaluationOptions.distractor_sizes is empty: give at least one count, or None")
            object.__setattr__(self, "distractor_sizes", sizes)  # frozen: a tuple, whatever sequence came in
