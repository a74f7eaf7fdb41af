"""`python -m reid_keras.data`: write synthetic data (`synth`) or describe and check a dataset (`info`).

    python -m reid_keras.data synth --layout market1501 --out data/synth --ids 200
    python -m reid_keras.data synth --layout cuhk_sysu --out data/synth --scenes-train 500 --scenes-test 250
    python -m reid_keras.data info --dataset cuhk03 --data-root data/cuhk03 --dataset-option box_type=detected
    python -m reid_keras.data info --dataset synthetic --dataset-option layout=prw

`synth --layout cuhk_sysu|prw` writes crowded scenes in the real person-search formats and a contact
sheet beside them (`<out>/<dataset folder>_contact_sheet.jpg`: boxes and ids drawn).

`info` decodes every image once (`reid_keras.data.decoding.drop_damaged`, remembered per file so a
second call is quick) and counts damaged files among the skips, with the first few names.
"""
from __future__ import annotations

import argparse
import sys

from reid_keras.cli.arguments import add_dataset_arguments, add_verbose_argument, image_size, positive_int

CROP_LAYOUTS = ("market1501", "dukemtmc", "cuhk01")
SCENE_LAYOUTS = ("cuhk_sysu", "prw")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reid_keras.data", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write a synthetic pedestrian dataset in a benchmark's layout")
    synth.add_argument("--layout", default="market1501", choices=CROP_LAYOUTS + SCENE_LAYOUTS,
                       help="on-disk layout to write: crops (market1501, dukemtmc, cuhk01) or crowded scenes for "
                            "person search (cuhk_sysu, prw) (default: %(default)s)")
    synth.add_argument("--out", required=True, help="output folder (created)")
    synth.add_argument("--ids", type=int, default=None, help="crops: number of identities (default: 200)")
    synth.add_argument("--cams", type=int, default=None,
                       help="crops: number of cameras (default: the layout's own, 6 / 8 / 2)")
    synth.add_argument("--scenes-train", type=positive_int, default=None,
                       help="scenes: training scenes (default: 500)")
    synth.add_argument("--scenes-test", type=positive_int, default=None,
                       help="scenes: test scenes (the gallery; default: 250)")
    synth.add_argument("--scene-size", type=image_size(64), default=None,
                       help="scenes: HEIGHTxWIDTH of every scene (default: 400x600)")
    synth.add_argument("--workers", type=positive_int, default=1,
                       help="processes drawing the images (the files do not depend on it; default: 1)")
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


def _misplaced_flags(args) -> list:
    """The given flags that do not apply to the chosen layout's kind (crops or scenes)."""
    crops = {"--ids": args.ids, "--cams": args.cams}
    scenes = {"--scenes-train": args.scenes_train, "--scenes-test": args.scenes_test, "--scene-size": args.scene_size}
    return [flag for flag, value in (scenes if args.layout in CROP_LAYOUTS else crops).items() if value is not None]


def _synth(args) -> int:
    from reid_keras.data.datasets import synthetic

    misplaced = _misplaced_flags(args)
    if misplaced:
        kind = "crop layouts (market1501, dukemtmc, cuhk01)" if args.layout in SCENE_LAYOUTS else \
            "scene layouts (cuhk_sysu, prw)"
        print(f"error: {', '.join(misplaced)} only apply to the {kind}, not --layout {args.layout}", file=sys.stderr)
        return 2
    try:
        if args.layout in CROP_LAYOUTS:
            summary = synthetic.write_dataset(layout=args.layout, out=args.out,
                                              num_ids=200 if args.ids is None else args.ids, num_cams=args.cams,
                                              seed=args.seed, overwrite=args.overwrite, workers=args.workers)
        else:
            options = {k: v for k, v in (("train_scenes", args.scenes_train), ("test_scenes", args.scenes_test),
                                         ("size", args.scene_size)) if v is not None}
            summary = synthetic.write_scenes(args.layout, args.out, seed=args.seed, overwrite=args.overwrite,
                                             workers=args.workers, **options)
            summary += "\n" + _scene_sheet(args.layout, args.out)
    except (FileExistsError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summary)
    return 0


def _scene_sheet(layout: str, out: str) -> str:
    """Read the written scenes back with the benchmark's own loader and draw a contact sheet beside them."""
    import os

    from reid_keras.data.datasets import load_dataset
    from reid_keras.data.datasets.synthetic_scene_layout import SCENE_LAYOUTS as FOLDERS
    from reid_keras.data.datasets.synthetic_scenes import scene_contact_sheet

    folder = os.path.join(out, FOLDERS[layout].folder)
    dataset = load_dataset(layout, folder, strict=False)
    path = f"{folder}_contact_sheet.jpg"
    scene_contact_sheet(path, dataset)
    return f"read back by the {layout} loader: {len(dataset.train)} train / {len(dataset.gallery)} gallery scenes, " \
           f"{len(dataset.queries)} queries; contact sheet: {path}"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "synth":
        return _synth(args)
    from reid_keras.data.datasets import load_dataset, parse_options
    from reid_keras.data.datasets.base import DatasetCountError, DatasetLayoutError

    checked = ""
    try:
        dataset = load_dataset(args.dataset, args.data_root, strict=False if args.no_strict else None,
                               **parse_options(args.dataset_option))
        if not args.no_decode_check:
            from reid_keras.data.decoding import drop_damaged

            # Person-search datasets name their image splits (train and gallery scenes).
            splits = getattr(dataset, "image_splits", ("train", "query", "gallery"))
            images = sum(len(getattr(dataset, split)) for split in splits)
            dataset, damaged = drop_damaged(dataset)
            checked = (f"decode check: {images} image(s) decoded, {damaged.total} damaged "
                       "(counted among the skips above)")
    # OSError: unreadable folders or files (permissions), reported like layout errors.
    except (DatasetLayoutError, DatasetCountError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)  # an unknown dataset's message lists the known ones
        return 2
    print(dataset.summary())
    sizes = getattr(dataset, "gallery_sizes", None)
    if sizes is not None:
        print("search gallery sizes: " + ", ".join("all" if s is None else str(s) for s in sizes))
    if checked:
        print(checked)
    return 0
