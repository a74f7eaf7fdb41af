"""`python -m reid_keras.data`: write synthetic data (`synth`) or describe and check a dataset (`info`).

    python -m reid_keras.data synth --layout market1501 --out data/synth --ids 200
    python -m reid_keras.data info --dataset cuhk03 --data-root data/cuhk03 --dataset-option box_type=detected

`info` decodes every image once (`reid_keras.data.decoding.drop_damaged`, remembered per file so a
second call is quick) and counts damaged files among the skips, with the first few names.
"""
from __future__ import annotations

import argparse
import sys

from reid_keras.cli.arguments import add_dataset_arguments, add_verbose_argument


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reid_keras.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write a synthetic pedestrian dataset in a benchmark's layout")
    synth.add_argument("--layout", default="market1501", choices=["market1501", "dukemtmc", "cuhk01"],
                       help="on-disk layout to write (default: %(default)s)")
    synth.add_argument("--out", required=True, help="output folder (created)")
    synth.add_argument("--ids", type=int, default=200, help="number of identities (default: %(default)s)")
    synth.add_argument("--cams", type=int, default=None,
                       help="number of cameras (default: the layout's own, 6 / 8 / 2)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    add_verbose_argument(synth)

    info = sub.add_parser("info", help="print ids / images / cameras per split of a dataset on disk")
    add_dataset_arguments(info)
    info.add_argument("--no-strict", action="store_true",
                      help="do not compare counts with the published ones (custom subsets)")
    info.add_argument("--no-decode-check", action="store_true",
                      help="only the quick header/trailer probe of each file, no full decode check")
    add_verbose_argument(info)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "synth":
        from reid_keras.data.datasets import synthetic

        try:
            summary = synthetic.write_dataset(layout=args.layout, out=args.out, num_ids=args.ids,
                                              num_cams=args.cams, seed=args.seed, overwrite=args.overwrite)
        except (FileExistsError, ValueError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(summary)
        return 0
    from reid_keras.data.datasets import load_dataset, parse_options
    from reid_keras.data.datasets.base import DatasetCountError, DatasetLayoutError

    checked = ""
    try:
        dataset = load_dataset(args.dataset, args.data_root, strict=False if args.no_strict else None,
                               **parse_options(args.dataset_option))
        if not args.no_decode_check:
            from reid_keras.data.decoding import drop_damaged

            images = len(dataset.train) + len(dataset.query) + len(dataset.gallery)
            dataset, damaged = drop_damaged(dataset)
            checked = (f"decode check: {images} image(s) decoded, {damaged.total} damaged "
                       "(counted among the skips above)")
    # OSError: unreadable folders or files (permissions), reported like layout errors.
    except (DatasetLayoutError, DatasetCountError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)  # an unknown dataset's message lists the known ones
        return 2
    print(dataset.summary())
    if checked:
        print(checked)
    return 0
