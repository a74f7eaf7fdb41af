"""DukeMTMC-reID, docs/datasets.md §2: Market rules, cameras 1-8.

The 408 identities seen by one camera only carry ordinary ids that never occur among the
queries; they stay in the gallery as negatives. The dataset was withdrawn by its authors: this
loads existing copies and offers no download.
"""
from __future__ import annotations

import os

from reid_keras.data.datasets.base import ReidDataset, resolve_root
from reid_keras.data.datasets.common import split_counts, verify_counts
from reid_keras.data.datasets.market1501 import load_market_style

CANDIDATES = ("DukeMTMC-reID", "dukemtmc-reid", "dukemtmc",
              os.path.join("dukemtmc-reid", "DukeMTMC-reID"), os.path.join("dukemtmc", "DukeMTMC-reID"))
REQUIRED = ("bounding_box_train", "bounding_box_test", "query")
LAYOUT = """DukeMTMC-reID/
  bounding_box_train/  0001_c2_f0046182.jpg ...  (16,522 images)
  bounding_box_test/   (17,661 images)
  query/               (2,228 images)"""

EXPECTED_COUNTS = {
    "train images": 16522, "train ids": 702,
    "query images": 2228, "query ids": 702,
    "gallery images": 17661, "gallery ids": 1110,  # 702 test ids + 408 single-camera ids
}


def load(root: str, strict: bool | None = None) -> ReidDataset:
    """Load DukeMTMC-reID from the unpacked folder or its parent.

    Raises:
        DatasetLayoutError, DatasetCountError.
    """
    folder = resolve_root(root, CANDIDATES, REQUIRED, LAYOUT)
    dataset = load_market_style(folder, "dukemtmc", num_cams=8, layout=LAYOUT)
    verify_counts("dukemtmc", split_counts(dataset), EXPECTED_COUNTS, strict)
    return dataset
