"""`python -m reid_keras.train --model siamese_b0`: train, evaluate, plot and export one model.

With no other argument the run uses the built-in synthetic pedestrians (written once under
`data/`), trains on their training identities, evaluates on the held-out identities with the
evaluation engine, writes plots and exports a SavedModel, all under `runs/<name>/`.

Every recipe value a flag names overrides the preset's; a flag the model's family does not read is
refused. `--preset paper` switches to the recipe of the model's paper (e.g. the EfficientNet siamese
paper's CUHK01 recipe: 160x80, RMSprop 1e-4, batch 48, 18 epochs). `--model NAME --help` (with
`--preset paper` if wanted) shows that preset's value beside every recipe flag.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from reid_keras.cli.arguments import (HelpFormatter, add_dataset_arguments, add_verbose_argument, image_size,
                                      non_negative_int, positive_int, require_data_root)

NONE = "none"


def _feature_dim(text: str):
    return NONE if text.lower() == NONE else positive_int(text)


# The recipe's flags: (flag, recipe key, argparse keywords). A family reads the keys its Recipe has.
RECIPE_FLAGS = (
    ("--weights", "weights", dict(help="imagenet, none, or a weights file")),
    ("--epochs", "epochs", dict(type=non_negative_int, help="training epochs; 0 evaluates and exports the model "
                                                            "as built, e.g. an ImageNet baseline")),
    ("--steps-per-epoch", "steps_per_epoch", dict(type=positive_int, help="batches per epoch (auto: one pass over "
                                                                           "the training images or pairs)")),
    ("--batch-size", "batch_size", dict(type=positive_int, help="global batch size (pairs or images)")),
    ("--accumulate-steps", "accumulate_steps", dict(
        type=positive_int, help="feed each batch as N micro-batches and average their gradients (about 1/N of the "
                                "activation memory; must divide --batch-size)")),
    ("--lr", "learning_rate", dict(type=float, help="learning rate")),
    ("--optimizer", "optimizer", dict(choices=["rmsprop", "adam", "sgd"], help="optimizer")),
    ("--image-size", "image_size", dict(type=image_size(32), help="HEIGHTxWIDTH, e.g. 160x80")),
    ("--id-warmup-steps", "id_warmup_steps", dict(
        type=non_negative_int, help="identity-classifier steps that pre-train a backbone without pretrained "
                                    "weights before the siamese training (0 = none)")),
    ("--head", "head", dict(choices=["softmax", "sigmoid"], help="verification head: 2-way softmax (paper) or "
                                                                 "1-unit sigmoid (authors' code)")),
    ("--head-metric", "head_metric", dict(choices=["nonneg", "free"], help="weights of the verification head's "
        "(f1-f2)^2: nonneg = a learned diagonal metric that ranks (default recipe), free = the paper's Dense")),
    ("--losses", "losses", dict(help="losses joined by '+': id, verif, triplet, oim (e.g. id+verif, id+triplet)")),
    ("--verif-loss", "verif_loss", dict(choices=["crossentropy", "contrastive"],
                                        help="verification loss of the ID+verification models")),
    ("--label-smoothing", "label_smoothing", dict(type=float, help="label smoothing of the identification loss")),
    ("--feature-dim", "feature_dim", dict(type=_feature_dim, help="projection width of the embedding, or 'none' "
                                                                  "for the pooled backbone feature")),
    ("--triplet-margin", "triplet_margin", dict(help="batch-hard triplet margin, a number or 'soft'")),
    ("--checkpoint-every-minutes", "checkpoint_every_minutes", dict(
        type=float, help="also write the resume state every N minutes inside the warm-up and each epoch (a kill "
                         "loses at most that much work)")),
    ("--checkpoint-every-steps", "checkpoint_every_steps", dict(
        type=positive_int, help="also write the resume state every N steps inside the warm-up and each epoch")),
    ("--min-side", "min_side", dict(type=positive_int, help="person search: short side of the resized scenes "
                                                             "(pixels)")),
    ("--max-side", "max_side", dict(type=positive_int, help="person search: cap of the long side of the resized "
                                                             "scenes (pixels)")),
    ("--roi-batch-size", "roi_batch_size", dict(type=positive_int, help="person search: RoIs sampled per scene "
                                                                         "for the RoI head and OIM")),
    ("--queue-size", "queue_size", dict(type=non_negative_int, help="person search: OIM circular queue of "
                                                                     "unlabeled people (0 = off, 'w/o unlabeled')")),
    ("--oim-scale", "oim_scale", dict(type=float, help="OIM logit scale (1/temperature; the paper's tau = 0.1 is "
                                                       "scale 10, the PyTorch ports use 30)")),
)
FLAG_OF = {key: flag for flag, key, _ in RECIPE_FLAGS}
# The columns of the preset table `--help` prints when no --model is given: (title, recipe key).
TABLE_COLUMNS = (("epochs", "epochs"), ("steps/epoch", "steps_per_epoch"), ("batch", "batch_size"),
                 ("lr", "learning_rate"), ("optimizer", "optimizer"), ("image", "image_size"),
                 ("warm-up", "id_warmup_steps"))


def format_value(key: str, value) -> str:
    """A recipe value as a user types it on the command line (160x80, 0.0001, none, auto)."""
    if value is None:
        return "auto" if key == "steps_per_epoch" else NONE
    if key == "image_size":
        return f"{value[0]}x{value[1]}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _chosen_preset(argv):
    """(--model, --preset) among `argv` when --model names a known preset, else (None, --preset): what `--help`
    describes. Parsing errors are left to the real parser."""
    from reid_keras.families import presets
    from reid_keras.families.base import RECIPES

    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--model")
    peek.add_argument("--preset", choices=RECIPES, default="default")
    try:
        known, _ = peek.parse_known_args(argv)
    except SystemExit:  # e.g. --preset nonsense: the real parser reports it
        return None, "default"
    return (known.model if known.model in presets() else None), known.preset


def preset_table(recipe: str) -> str:
    """One line per preset with the main values of its `recipe` ("default" or "paper"), for `--help`."""
    from reid_keras.families import presets

    rows = [("preset", "family") + tuple(title for title, _ in TABLE_COLUMNS)]
    for name, (family, preset) in sorted(presets().items()):
        values = preset.resolve(recipe)
        rows.append((name, family.name) + tuple(format_value(key, getattr(values, key)) if hasattr(values, key) else "-"
                                                for _, key in TABLE_COLUMNS))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join("  " + line for line in lines)


def recipe_help(model, recipe: str) -> dict:
    """{recipe key: the note `--help` adds to its flag}: the preset's value, or that its family does not read it."""
    from reid_keras.families import get_preset

    if model is None:
        return {}
    family, preset = get_preset(model)
    values = preset.resolve(recipe)
    notes = {}
    for _, key, _ in RECIPE_FLAGS:
        if not hasattr(values, key):
            notes[key] = f"(not read by {model}: family {family.name})"
            continue
        shown = format_value(key, getattr(values, key))
        temperature = getattr(values, "oim_temperature", None)
        if key == "oim_scale" and getattr(values, key) is None and temperature:
            shown = f"none, temperature {temperature:g} = scale {1 / temperature:g}"
        notes[key] = f"(default for {model}, --preset {recipe}: {shown})"
    return notes


def build_parser(parser_class=argparse.ArgumentParser, argv=None) -> argparse.ArgumentParser:
    """The command's parser. `argv` (default: sys.argv[1:]) only chooses what `--help` shows: the values of the
    --model and --preset it names beside each recipe flag, or, without --model, a table of every preset."""
    from reid_keras.families import presets
    from reid_keras.families.base import RECIPES

    names = sorted(presets())
    model, recipe = _chosen_preset(sys.argv[1:] if argv is None else argv)
    epilog = None if model else (f"preset values (--preset {recipe}; auto = one pass over the training data, "
                                 f"warm-up = --id-warmup-steps):\n{preset_table(recipe)}\n\n"
                                 "`--model NAME --help` shows one preset's value beside every recipe flag.")
    p = parser_class(prog="python -m reid_keras.train", description=__doc__, epilog=epilog,
                     formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, choices=names, metavar="PRESET", help=f"model preset, one of: "
                                                                                   f"{', '.join(names)}")
    p.add_argument("--preset", choices=RECIPES, default="default",
                   help="recipe: 'default' (quick, sized for the synthetic data on a CPU) or 'paper'")
    add_dataset_arguments(p, dataset_default="synthetic", dataset_help="synthetic (default), market1501, dukemtmc, "
                                                                       "msmt17, cuhk01 or cuhk03",
                          root_help="dataset folder (or its parent); for synthetic, where it is written "
                                    "(default data/)")
    p.add_argument("--synthetic-ids", type=positive_int, default=None,
                   help="identities of the synthetic dataset (default 300; written once per value)")
    p.add_argument("--output", default="runs", help="folder that holds the run folders (default: runs)")
    p.add_argument("--name", default=None, help="run folder name (default: model-dataset-time)")
    p.add_argument("--seed", type=int, default=0, help="seed of sampling, augmentation and initialisation")
    p.add_argument("--mixed-precision", action="store_true", help="float16 compute (GPUs)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run named by --name (or the latest run of --model) where it stopped")
    p.add_argument("--devices", default=None,
                   help="comma-separated devices to mirror over, e.g. /cpu:0,/cpu:1 (default: all GPUs)")
    p.add_argument("--no-export", action="store_true", help="skip the SavedModel export")
    p.add_argument("--no-plots", action="store_true", help="skip the evaluation plots")
    add_verbose_argument(p)
    notes = recipe_help(model, recipe)
    group = p.add_argument_group("recipe values (default: the preset's; a model's family refuses the ones it "
                                 "does not read)")
    for flag, key, kwargs in RECIPE_FLAGS:
        if key in notes:
            kwargs = {**kwargs, "help": f"{kwargs.get('help', '')} {notes[key]}".strip()}
        group.add_argument(flag, dest=key, default=None, **kwargs)
    return p


def recipe_overrides(args: argparse.Namespace) -> dict:
    """{recipe key: value} of the recipe flags given; a flag the model's family does not read is refused
    (ValueError naming it, the family and the flags the family reads)."""
    from reid_keras.families import get_preset

    family, _ = get_preset(args.model)
    reads = set(family.recipe.field_names())
    given = {key: getattr(args, key) for _, key, _ in RECIPE_FLAGS if getattr(args, key) is not None}
    refused = [FLAG_OF[key] for key in given if key not in reads]
    if refused:
        accepted = ", ".join(flag for flag, key, _ in RECIPE_FLAGS if key in reads)
        raise ValueError(f"{', '.join(refused)} does not apply to --model {args.model} (family {family.name}); "
                         f"the flags it reads are {accepted}")
    if "oim_scale" in given:
        given["oim_temperature"] = None  # a scale replaces the preset's temperature
    if given.get("feature_dim") == NONE:
        given["feature_dim"] = None
    return given


def config_from_args(args: argparse.Namespace):
    """The `RunConfig` the parsed arguments describe: the preset's recipe, then the flags given.

    Raises:
        ValueError: a flag the model's family does not read (naming the flags it reads), a bad
            dataset option, or a dataset that needs --data-root without one.
    """
    from reid_keras.data.datasets import parse_options
    from reid_keras.families.config import resolve_config

    given = recipe_overrides(args)
    options = parse_options(args.dataset_option)
    if args.synthetic_ids is not None:
        if args.dataset != "synthetic":
            raise ValueError(f"--synthetic-ids applies to --dataset synthetic, not {args.dataset}")
        options["num_ids"] = args.synthetic_ids
    require_data_root(args.dataset, args.data_root)
    try:
        return resolve_config(args.model, args.preset, given, dataset=args.dataset, data_root=args.data_root,
                              dataset_options=options, seed=args.seed, mixed_precision=args.mixed_precision,
                              output=args.output, resume=args.resume, devices=args.devices)
    except ValueError as err:  # the recipe names its key ("learning_rate must be ..."): say the flag given
        key, _, rest = str(err).partition(" ")
        if key in given and key in FLAG_OF:
            raise ValueError(f"{FLAG_OF[key]} {rest}") from None
        raise


def run(argv=None, extra_callbacks=None) -> str:
    """Parse `argv`, train, evaluate and export; returns the run folder (errors propagate)."""
    from reid_keras.training.runner import run_training

    args = build_parser(argv=argv).parse_args(argv)
    return run_training(config_from_args(args), name=args.name, export=not args.no_export, plots=not args.no_plots,
                        extra_callbacks=extra_callbacks or [])


def main(argv=None, extra_callbacks=None) -> int:
    """The command: like `run`, but a bad argument or dataset ends with a message and exit code 2."""
    start = time.time()
    try:
        run(argv, extra_callbacks)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        if os.environ.get("REID_KERAS_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"done in {time.time() - start:.0f} s", file=sys.stderr)
    return 0
