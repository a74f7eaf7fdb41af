"""Argument types and flags shared by the commands, so that every command spells them the same way."""
from __future__ import annotations

import argparse
import sys


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
