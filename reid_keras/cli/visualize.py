"""`python -m reid_keras.visualize`: draw plots from cached features or trained models.

`tsne` and `heatmap` work on `.npz` files written by `reid_keras.metrics.features` (the
evaluation command caches them in its output folder):

    python -m reid_keras.visualize tsne --features out/features_query.npz out/features_gallery.npz --out tsne.png
    python -m reid_keras.visualize heatmap --query out/features_query.npz \
        --gallery out/features_gallery.npz --out cams.png

`activations` draws the identification-verification paper's Fig. 5 from trained `.keras` models
(`reid_keras.activation_maps`):

    python -m reid_keras.visualize activations --model i.keras v.keras iv.keras --labels I V I+V \
        --dataset market1501 --data-root data/market --num-images 3 --out fig5.png

The plots themselves are `reid_keras.metrics.plots`.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from reid_keras.cli.arguments import add_dataset_arguments, add_verbose_argument, positive_int


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reid_keras.visualize", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tsne = sub.add_parser("tsne", help="t-SNE of cached features (.npz), coloured by identity")
    tsne.add_argument("--features", nargs="+", required=True,
                      help="feature files; with two, the first is drawn as queries")
    tsne.add_argument("--out", required=True, help="output image (.png)")
    tsne.add_argument("--max-ids", type=int, default=30, help="identities shown (default: %(default)s)")
    tsne.add_argument("--max-points", type=int, default=2000, help="points shown (default: %(default)s)")
    tsne.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity (default: %(default)s)")
    tsne.add_argument("--seed", type=int, default=0, help="subsample and t-SNE seed (default: %(default)s)")
    heat = sub.add_parser("heatmap", help="mAP / rank-1 per (query camera, gallery camera) from cached features")
    heat.add_argument("--query", required=True, help="query feature file (.npz)")
    heat.add_argument("--gallery", required=True, help="gallery feature file (.npz)")
    heat.add_argument("--out", required=True, help="output image (.png)")
    heat.add_argument("--ap", default="non-interpolated", choices=["non-interpolated", "trapezoid"],
                      help="AP variant (docs/protocols.md (a)); default: %(default)s")
    act = sub.add_parser("activations", help="channel-summed activation maps of an intermediate block "
                                             "(id-verification paper Fig. 5), one column per model")
    act.add_argument("--model", nargs="+", required=True, help=".keras files saved by python -m reid_keras.train")
    act.add_argument("--labels", nargs="+", default=None,
                     help="one column title per model, e.g. I V I+V (default: the run folder names)")
    act.add_argument("--images", nargs="+", help="image files, one row each (or --dataset)")
    add_dataset_arguments(act, dataset_default="", dataset_help="take the images from this dataset (e.g. "
                          "market1501) instead of --images", root_help="with --dataset: the unpacked dataset "
                          "folder or its parent")
    act.add_argument("--split", default="query", choices=["query", "gallery", "train"],
                     help="with --dataset: split to draw from (default: %(default)s)")
    act.add_argument("--num-images", type=positive_int, default=3,
                     help="with --dataset: images of distinct identities (default: %(default)s, as in the paper)")
    act.add_argument("--seed", type=int, default=0, help="with --dataset: image choice seed (default: %(default)s)")
    act.add_argument("--layer", default=None, help="layer to visualise (default: conv4_block6_out for ResNet-50, "
                     "block6a_expand_activation for EfficientNet, block5_conv3 for VGG16, relu5 for CaffeNet)")
    act.add_argument("--preprocess", default=None, help="backbone preprocessing of all models (default: each run's "
                                                        "config.json, else the backbone's own)")
    act.add_argument("--out", required=True, help="output image (.png)")
    act.add_argument("--npz", default=None, help="also save the maps to this .npz file")
    for command in (tsne, heat, act):
        add_verbose_argument(command)
    return parser


def dataset_images(args) -> list:
    """Paths of `--num-images` images of distinct identities from the `--split` of `--dataset`, seeded.

    Distractors (id 0) and junk (-1) are left out of query / gallery; train ids are labels 0..N-1.
    """
    from reid_keras.activation_maps import ActivationMapError
    from reid_keras.data.datasets import default_root, load_dataset, parse_options

    root = args.data_root or default_root(args.dataset)
    if not root:
        raise ActivationMapError("--dataset needs --data-root (the unpacked dataset folder or its parent)")
    records = getattr(load_dataset(args.dataset, root, **parse_options(args.dataset_option)), args.split)
    by_id = {}
    for record in sorted(records):
        if record.pid > 0 or (args.split == "train" and record.pid == 0):
            by_id.setdefault(record.pid, record.path)
    if len(by_id) < args.num_images:
        raise ActivationMapError(f"--num-images {args.num_images}: the {args.split} split of {args.dataset} at "
                                 f"{root} has only {len(by_id)} identities")
    ids = np.random.default_rng(args.seed).choice(sorted(by_id), args.num_images, replace=False)
    return [by_id[int(pid)] for pid in sorted(ids)]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "activations" and bool(args.images) == bool(args.dataset):
        parser.error("activations: give either --images or --dataset")
    from reid_keras.metrics.features import load_features
    from reid_keras.metrics.plots import plot_camera_heatmap, plot_tsne

    try:
        if args.command == "tsne":
            sets = [load_features(p) for p in args.features]
            feats = np.concatenate([s.features for s in sets])
            pids = np.concatenate([s.pids for s in sets])
            is_query = np.concatenate([np.full(len(s), i == 0) for i, s in enumerate(sets)]) if len(sets) > 1 else None
            out = plot_tsne(feats, pids, args.out, is_query=is_query, max_ids=args.max_ids,
                            max_points=args.max_points, seed=args.seed, perplexity=args.perplexity)
        elif args.command == "activations":
            from reid_keras.activation_maps import run
            from reid_keras.families import register_serializables

            images = args.images or dataset_images(args)
            register_serializables()  # a fresh process knows none of the models' own layers
            out = run(args.model, images, args.out, args.labels, args.layer, args.preprocess, args.npz)["figure"]
        else:
            from reid_keras.metrics.diagnostics import cross_camera_matrix

            query, gallery = load_features(args.query), load_features(args.gallery)
            matrix = cross_camera_matrix(query.pids, gallery.pids, query.camids, gallery.camids,
                                         query_features=query.features, gallery_features=gallery.features, ap=args.ap)
            out = plot_camera_heatmap(matrix, args.out)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0
