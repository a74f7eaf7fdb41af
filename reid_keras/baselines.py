"""A hand-crafted colour-histogram descriptor: the floor every learned model must clear.

Learning checks compare a trained network with this baseline on the same split (issue 4 item 6,
issue 5 item 6). The descriptor follows the usual stripe colour histograms of early re-ID work
(e.g. the Market-1501 paper's BoW baselines): the crop is cut into horizontal stripes and each
stripe contributes a joint HSV histogram, so the descriptor knows "red top over blue trousers"
but nothing about texture, pattern or shape.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np


def colour_histogram(image: np.ndarray, stripes: int = 6, bins: Sequence[int] = (8, 4, 4)) -> np.ndarray:
    """Stripe-wise joint HSV histogram of one RGB uint8 image, L2-normalised.

    Args:
        image: H x W x 3 uint8 RGB crop.
        stripes: number of horizontal stripes (top to bottom).
        bins: hue / saturation / value bins of each stripe's joint histogram.

    Returns:
        float32 vector of length `stripes * prod(bins)`, unit L2 norm.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"colour_histogram expects an H x W x 3 RGB image, got shape {image.shape}")
    hsv = cv2.cvtColor(np.ascontiguousarray(image, dtype=np.uint8), cv2.COLOR_RGB2HSV)
    edges = np.linspace(0, hsv.shape[0], stripes + 1).astype(int)
    parts = []
    for top, bottom in zip(edges[:-1], edges[1:]):
        stripe = hsv[top:max(bottom, top + 1)]
        hist = cv2.calcHist([stripe], [0, 1, 2], None, list(bins), [0, 180, 0, 256, 0, 256])
        parts.append(hist.ravel() / max(stripe.shape[0] * stripe.shape[1], 1))
    feature = np.sqrt(np.concatenate(parts)).astype(np.float32)  # Hellinger: tames dominant bins
    return feature / max(float(np.linalg.norm(feature)), 1e-12)


def colour_histogram_features(paths: Sequence[str], size: tuple = (128, 64), **kwargs) -> np.ndarray:
    """`colour_histogram` of image files, each resized to `size` (H, W) first.

    Raises:
        ValueError naming the first file that cannot be read as an image.
    """
    features = []
    for path in paths:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"cannot read {path} as an image (colour-histogram baseline)")
        rgb = cv2.cvtColor(cv2.resize(bgr, (size[1], size[0]), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)
        features.append(colour_histogram(rgb, **kwargs))
    return np.stack(features) if features else np.zeros((0, 0), np.float32)
