"""Argument types and flags shared by the commands, so that every command spells them the same way."""
from __future__ import annotations

import argparse
import os
import sys

from reid_keras.cli import VERBOSE_ENV, VERBOSE_FLAG

RUNS = "runs"  # where the commands write when no output is named, relative to the working directory


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Help that keeps the description's line breaks and adds "(default: X)" where X tells something: not for
    a default of None, False or [], nor when the help text already says its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def image_size(min_side: int = 1):
    """argparse type factory: "HEIGHTxWIDTH" (e.g. 160x80) -> (height, width), both sides >= `min_side`."""
    def parse(text: str) -> tuple:
        try:
            height, width = (int(v) for v in text.lower().replace(",", "x").split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"--image-size must look like 160x80 (height x width), got {text!r}") from None
        if height < min_side or width < min_side:
            reason = " (EfficientNet/ResNet downsample 32x)" if min_side == 32 else ""
            raise argparse.ArgumentTypeError(f"--image-size {text}: both sides must be >= {min_side} pixels{reason}")
        return height, width
    return parse


class _DeprecatedAlias(argparse.Action):
    """A hidden old spelling of a flag: stores into the new flag's destination and says so once."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is deprecated and will be removed; use {self.new}", file=sys.stderr)
        current = getattr(namespace, self.dest, None)
        if isinstance(current, list):  # an "append" flag: a new list, never the parser's default one
            setattr(namespace, self.dest, [*current, values])
        else:
            setattr(namespace, self.dest, values)


def add_dataset_arguments(parser: argparse.ArgumentParser, dataset_default=None, dataset_help: str = "",
                          root_help: str = "the unpacked dataset folder or its parent") -> None:
    """`--dataset`, `--data-root` and the repeatable `--dataset-option KEY=VALUE` (old spellings `--root` and
    `--option` are accepted, hidden, with a deprecation note)."""
    parser.add_argument("--dataset", required=dataset_default is None, default=dataset_default,
                        help=dataset_help or "dataset name, e.g. market1501, dukemtmc, msmt17, cuhk01, cuhk03, synthetic")
    parser.add_argument("--data-root", default=None, help=root_help)
    parser.add_argument("--dataset-option", action="append", default=[], metavar="KEY=VALUE",
                        help="loader option, repeatable, e.g. split=half or box_type=detected")
    parser.add_argument("--root", dest="data_root", action=_DeprecatedAlias, new="--data-root", help=argparse.SUPPRESS)
    parser.add_argument("--option", dest="dataset_option", action=_DeprecatedAlias, new="--dataset-option",
                        help=argparse.SUPPRESS)


def add_verbose_argument(parser: argparse.ArgumentParser) -> None:
    """`--verbose`: keep TensorFlow's start-up log lines (the entry point reads it before TensorFlow loads,
    see `reid_keras.cli.quiet_tensorflow_logs`)."""
    parser.add_argument(VERBOSE_FLAG, action="store_true",
                        help=f"show TensorFlow's start-up log lines (hidden by default; or set {VERBOSE_ENV}=1)")


def require_data_root(dataset: str, data_root) -> None:
    """ValueError naming --data-root when `dataset` has no default folder and none was given."""
    from reid_keras.data.datasets import default_root

    if not data_root and default_root(dataset) is None:
        raise ValueError(f"--data-root is required for --dataset {dataset}: the folder where {dataset} is unpacked "
                         "(or its parent; see data/README.md)")


def run_folder_of(model_path: str):
    """The run folder holding `model_path` (a config.json beside it, as `python -m reid_keras.train` writes),
    else None. A SavedModel folder counts as the file it is: runs/x/export -> runs/x."""
    folder = os.path.dirname(os.path.abspath(model_path.rstrip("/" + os.sep) or model_path))
    return folder if os.path.isfile(os.path.join(folder, "config.json")) else None


def model_name(model_path: str) -> str:
    """`best` for runs/x/best.keras, `export` for a SavedModel folder runs/x/export/."""
    return os.path.splitext(os.path.basename(os.path.abspath(model_path.rstrip("/" + os.sep) or model_path)))[0]


def output_beside_run(path: str, kind: str, dataset: str) -> str:
    """Where a command writes without --out: `<run folder>/<kind>_<dataset>` for a file in a run folder,
    else `runs/<kind>/<file name>-<dataset>` (relative to the working directory, never the directory itself)."""
    run = run_folder_of(path)
    if run:
        return os.path.join(run, f"{kind}_{dataset}")
    return os.path.join(RUNS, kind, f"{model_name(path)}-{dataset}")
