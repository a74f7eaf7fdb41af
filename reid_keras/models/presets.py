"""Named training recipes: plain dicts, overridden by CLI flags (DESIGN.md, "Conventions").

`siamese_b0` … `siamese_b5` follow efficientnet_siamese_cuhk01.txt §III.B–C: 160×80 inputs,
RMSprop with learning rate 1e-4, batch 48, 18 epochs, horizontal flip / zoom / width-shift
augmentation to balance positive and negative pairs (1:1), 2-way softmax verification loss.
Values the paper leaves open are marked below with where they come from.
"""
from __future__ import annotations

import copy

from reid_keras.models.siamese import DEFAULT_DROPOUT


DEFAULT_RECIPE = {"image_size": (64, 32), "batch_size": 32, "epochs": 7, "steps_per_epoch": 200,
                  "optimizer": "adam", "learning_rate": 1e-3}


def _siamese(size: str) -> dict:
    return {
        "family": "siamese",
        "paper": "efficientnet_siamese_cuhk01.txt",
        "backbone": f"efficientnet{size}",
        "weights": "imagenet",           # §II.B transfer learning from ImageNet
        "image_size": (160, 80),         # §II.A, §III.C (height, width)
        "pooling": "avg",                # the issue's global pooling; the authors' code flattens instead
        "feature_dim": None,             # authors' code: 4096 (1×1 conv); None keeps the backbone width
        "dropout": DEFAULT_DROPOUT,      # not in the paper; 0.2 is the authors' released code
        "head": "softmax",               # §II.C 2-way softmax + cross-entropy; "sigmoid" = authors' code
        "optimizer": "rmsprop",          # §III.C
        "learning_rate": 1e-4,           # §III.C
        "batch_size": 48,                # §III.C (the authors' code uses 128)
        "epochs": 18,                    # §III.C
        # §III.B: horizontal flip, zoom, width shift; ranges not given (AugmentConfig.efficientnet_paper)
        "augment": {"flip": True, "zoom": 0.1, "width_shift": 0.1},
        "pair_ratio": 1.0,               # §III.B positives balanced 1:1 with negatives, fixed
        "preprocessing": "efficientnet",  # pixels 0..255 in; EfficientNet normalises inside the model
        # `--preset default` (the main job's recipe) fits a 2-core CPU in ~10 minutes on the synthetic
        # data; `--preset paper` keeps the values above unchanged.
        "recipes": {"default": DEFAULT_RECIPE, "paper": {}},
    }


PRESETS = {f"siamese_b{i}": _siamese(f"b{i}") for i in range(6)}


def get_preset(name: str) -> dict:
    """A deep copy of preset `name` (safe to modify).

    Raises:
        ValueError: unknown name; the message lists the known presets.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: known presets are {', '.join(sorted(PRESETS))}")
    return copy.deepcopy(PRESETS[name])


def list_presets() -> list:
    """Sorted preset names."""
    return sorted(PRESETS)
