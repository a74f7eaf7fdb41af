"""Compare two person images with an exported model (`python -m reid_keras.export`).

    python -m reid_keras.match IMG_A IMG_B --model runs/x/export

prints

    same_person_probability: 0.812345
    cosine_similarity: 0.734567

The probability is the siamese verification head's P(same person) (`verify` endpoint); the cosine
similarity is the dot product of the two L2-normalised `embed` features (1 = same direction).
Images are any size and format TensorFlow decodes (JPEG, PNG, BMP, GIF first frame); the export
resizes them itself. A damaged export folder, NaN / inf weights or NaN / inf outputs end the command
with exit code 2 and a message naming the folder (`reid_keras.models.loading`); an export without a
verification head (`verify`) prints the cosine similarity only.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from reid_keras.cli.arguments import add_verbose_argument


def read_image(path: str) -> np.ndarray:
    """Decode `path` to an RGB uint8 array (H, W, 3).

    Raises:
        ValueError: missing or undecodable file (the message names it).
    """
    import tensorflow as tf  # tf.io.decode_image: one decoder for JPEG/PNG/BMP/GIF, as in the pipelines

    if not os.path.isfile(path):
        raise ValueError(f"image {path!r} does not exist")
    try:
        data = tf.io.read_file(path)
        image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as err:
        reason = err.message.splitlines()[0] if err.message else type(err).__name__
        raise ValueError(f"image {path!r} cannot be decoded as JPEG/PNG/BMP/GIF ({reason})") from None
    return image.numpy()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reid_keras.match",
                                     description="Same-person probability and cosine similarity of two images.")
    parser.add_argument("image_a", metavar="IMG_A")
    parser.add_argument("image_b", metavar="IMG_B")
    parser.add_argument("--model", required=True, help="exported SavedModel folder (python -m reid_keras.export)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of two lines")
    add_verbose_argument(parser)
    args = parser.parse_args(argv)

    from reid_keras.models.loading import ModelLoadError
    from reid_keras.models.saved_model import ExportError, load_export, match_images

    try:
        images = [read_image(args.image_a), read_image(args.image_b)]
        loaded, _ = load_export(args.model)
        probability, cosine = match_images(loaded, *images, source=args.model)
    except (ValueError, ExportError, ModelLoadError) as err:  # ModelLoadError: a damaged or diverged model
        parser.error(str(err))  # the message names the image or the --model folder
    if probability is None:
        print(f"note: {args.model} has no verify endpoint (a model without a verification head): "
              "only the cosine similarity", file=sys.stderr)
    if args.json:
        print(json.dumps({"image_a": args.image_a, "image_b": args.image_b,
                          "same_person_probability": probability, "cosine_similarity": cosine}))
    else:
        if probability is not None:
            print(f"same_person_probability: {probability:.6f}")
        print(f"cosine_similarity: {cosine:.6f}")
    return 0
