"""`python -m reid_keras.models.caffenet convert FILE.caffemodel [--out PATH]`: CaffeNet's ImageNet weights
for reid_keras (identification+verification paper, ref. [26]), converted once from the Caffe model zoo."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    from reid_keras.models.backbones import caffenet_weights_path
    from reid_keras.models.caffe_weights import convert
    from reid_keras.models.caffenet import WEIGHT_LAYERS, WEIGHTS_FILE

    parser = argparse.ArgumentParser(prog="python -m reid_keras.models.caffenet", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    conv = commands.add_parser("convert", help="convert a .caffemodel (e.g. bvlc_reference_caffenet.caffemodel) "
                                               "to Keras backbone weights")
    conv.add_argument("caffemodel", help="binary Caffe weights file")
    conv.add_argument("--out", default=None,
                      help=f"output .weights.h5 (default: <Keras cache folder>/{WEIGHTS_FILE}, "
                           "used by --weights imagenet)")
    args = parser.parse_args(argv)
    try:
        out, model, ignored = convert(args.caffemodel, args.out or caffenet_weights_path())
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}: CaffeNet backbone weights ({', '.join(WEIGHT_LAYERS)}; {model.count_params():,} "
          f"parameters) from {args.caffemodel}" + (f"; ignored layers: {', '.join(ignored)}" if ignored else ""))
    return 0
