"""`python -m reid_keras.train --model siamese_b0`: train, evaluate, plot and export one model.

With no other argument the run uses the built-in synthetic pedestrians (written once under
`data/`), trains on their training identities, evaluates on the held-out identities with the
evaluation engine, writes plots and exports a SavedModel, all under `runs/<name>/`.

Every preset value can be overridden by a flag; `--preset paper` switches to the recipe of the
model's paper (e.g. the EfficientNet siamese paper's CUHK01 recipe: 160x80, RMSprop 1e-4,
batch 48, 18 epochs).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

DEFAULT_OUTPUT = "runs"


def _image_size(text: str) -> tuple:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--image-size must look like 160x80 (height x width), got {text!r}")
    if height < 32 or width < 32:
        raise argparse.ArgumentTypeError(f"--image-size {text}: both sides must be >= 32 pixels "
                                         "(EfficientNet/ResNet downsample 32x)")
    return height, width


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


_NONE = "none"
# Flags that only some model families read, so that a misplaced one is an error, not silently ignored.
FAMILY_FLAGS = {"losses": ("classifier", "idver"), "verif_loss": ("idver",),
                "label_smoothing": ("classifier", "idver"), "triplet_margin": ("classifier",),
                "oim_scale": ("classifier",)}


def _feature_dim(text: str):
    if text.lower() == _NONE:
        return _NONE
    value = _positive_int(text)
    return value


def build_parser() -> argparse.ArgumentParser:
    from reid_keras.models.presets import PRESETS

    p = argparse.ArgumentParser(
        prog="python -m reid_keras.train", description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, choices=sorted(PRESETS), metavar="PRESET",
                   help=f"model preset, one of: {', '.join(sorted(PRESETS))}")
    p.add_argument("--preset", choices=["default", "paper"], default="default",
                   help="recipe: 'default' (quick, sized for the synthetic data on a CPU) or 'paper'")
    p.add_argument("--dataset", default="synthetic",
                   help="synthetic, market1501, dukemtmc, msmt17, cuhk01 or cuhk03")
    p.add_argument("--data-root", default=None,
                   help="dataset folder (or its parent); for synthetic, where it is written (default data/)")
    p.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE",
                   help="loader option, e.g. split=half or box_type=detected (repeatable)")
    p.add_argument("--weights", default=None, help="imagenet, none, or a weights file (preset default)")
    p.add_argument("--epochs", type=_non_negative_int, default=None,
                   help="training epochs (preset default); 0 evaluates and exports the model as built, e.g. an "
                        "ImageNet baseline")
    p.add_argument("--steps-per-epoch", type=_positive_int, default=None,
                   help="batches per epoch (default: one pass over the pairs of an epoch)")
    p.add_argument("--id-warmup-steps", type=_non_negative_int, default=None,
                   help="identity-classifier steps that pre-train a backbone without pretrained weights "
                        "before the siamese training (preset default; 0 = none)")
    p.add_argument("--batch-size", type=_positive_int, default=None, help="global batch size (pairs)")
    p.add_argument("--accumulate-steps", type=_positive_int, default=None,
                   help="feed each batch as N micro-batches and average their gradients (about 1/N of the "
                        "activation memory; must divide --batch-size)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (preset default)")
    p.add_argument("--optimizer", choices=["rmsprop", "adam", "sgd"], default=None, help="optimizer (preset default)")
    p.add_argument("--synthetic-ids", type=_positive_int, default=None,
                   help="identities of the synthetic dataset (default 300; written once per value)")
    p.add_argument("--image-size", type=_image_size, default=None, help="HEIGHTxWIDTH, e.g. 160x80")
    p.add_argument("--head", choices=["softmax", "sigmoid"], default=None,
                   help="verification head: 2-way softmax (paper) or 1-unit sigmoid (authors' code)")
    p.add_argument("--losses", default=None,
                   help="losses joined by '+': id, verif, triplet, oim (e.g. id+verif, id+triplet; preset default)")
    p.add_argument("--verif-loss", choices=["crossentropy", "contrastive"], default=None,
                   help="verification loss of the ID+verification models (preset default: crossentropy)")
    p.add_argument("--label-smoothing", type=float, default=None, help="label smoothing of the identification loss")
    p.add_argument("--feature-dim", type=_feature_dim, default=None,
                   help="projection width of the embedding, or 'none' for the pooled backbone feature")
    p.add_argument("--triplet-margin", default=None, help="batch-hard triplet margin, a number or 'soft'")
    p.add_argument("--oim-scale", type=float, default=None,
                   help="OIM logit scale (1/temperature; the paper's tau = 0.1 is scale 10, the PyTorch ports use 30)")
    p.add_argument("--output", default=DEFAULT_OUTPUT, help="folder that holds the run folders")
    p.add_argument("--name", default=None, help="run folder name (default: model-dataset-time)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling, augmentation and initialisation")
    p.add_argument("--mixed-precision", action="store_true", help="float16 compute (GPUs)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run named by --name (or the latest run of --model) where it stopped")
    p.add_argument("--devices", default=None,
                   help="comma-separated devices to mirror over, e.g. /cpu:0,/cpu:1 (default: all GPUs)")
    p.add_argument("--no-export", action="store_true", help="skip the SavedModel export")
    p.add_argument("--no-plots", action="store_true", help="skip the evaluation plots")
    return p


def resolve_config(args: argparse.Namespace) -> dict:
    """Preset values, then the recipe, then the flags the user gave."""
    from reid_keras.data.datasets import parse_options
    from reid_keras.models.presets import get_preset

    config = dict(get_preset(args.model))
    config.update(config.pop("recipes", {}).get(args.preset, {}))
    overrides = {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.lr,
                 "synthetic_ids": args.synthetic_ids, "optimizer": args.optimizer,
                 "image_size": args.image_size, "head": args.head, "weights": args.weights,
                 "steps_per_epoch": args.steps_per_epoch, "id_warmup_steps": args.id_warmup_steps,
                 "accumulate_steps": args.accumulate_steps}
    family_flags = {"losses": args.losses, "verif_loss": args.verif_loss, "label_smoothing": args.label_smoothing,
                    "triplet_margin": args.triplet_margin, "oim_scale": args.oim_scale}
    for key, value in family_flags.items():
        if value is not None and config["family"] not in FAMILY_FLAGS[key]:
            raise ValueError(f"--{key.replace('_', '-')} does not apply to --model {args.model} (family "
                             f"{config['family']}); it is for the {' and '.join(FAMILY_FLAGS[key])} presets")
    overrides.update(family_flags, feature_dim=args.feature_dim)
    config.update({k: v for k, v in overrides.items() if v is not None})
    if args.oim_scale is not None:
        config["oim_temperature"] = None  # a scale replaces the preset's temperature
    if config.get("feature_dim") == _NONE:
        config["feature_dim"] = None
    config.update(model=args.model, recipe=args.preset, dataset=args.dataset, seed=args.seed,
                  data_root=args.data_root, dataset_options=parse_options(args.dataset_option),
                  mixed_precision=args.mixed_precision, output=args.output, resume=args.resume,
                  devices=args.devices)
    if isinstance(config.get("image_size"), list):
        config["image_size"] = tuple(config["image_size"])
    return config


def run(argv=None, extra_callbacks=None) -> str:
    """Parse `argv`, train, evaluate and export; returns the run folder (errors propagate)."""
    args = build_parser().parse_args(argv)
    config = resolve_config(args)
    from reid_keras.training.runner import run_training

    return run_training(config, name=args.name, export=not args.no_export, plots=not args.no_plots,
                        extra_callbacks=extra_callbacks or [])


def main(argv=None, extra_callbacks=None) -> int:
    """The CLI: like `run`, but a bad argument or dataset ends with a message and exit code 2."""
    try:
        run(argv, extra_callbacks)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        if os.environ.get("REID_KERAS_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    start = time.time()
    code = main()
    if code == 0:
        print(f"done in {time.time() - start:.0f} s", file=sys.stderr)
    sys.exit(code)
