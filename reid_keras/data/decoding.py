"""Image bytes -> pixels, the one decoder every stream and command uses, and the up-front check of a record list.

`decode_image` runs inside tf.data graphs; `validate_records` decodes every file once and counts
the ones that fail (`SkipReport`) instead of letting them drop out of an epoch unnamed.
"""
from __future__ import annotations

import os

import tensorflow as tf

from reid_keras.data.datasets.base import ImageRecord, SkipReport

AUTOTUNE = tf.data.AUTOTUNE
_PNG = b"\x89PNG\r\n\x1a\n"
# Formats tf.io.decode_image reads, by leading bytes: JPEG, PNG, GIF, BMP, WebP (RIFF).
_MAGICS = (b"\xff\xd8\xff", _PNG, b"GIF8", b"BM", b"RIFF")


def decode_image(contents, path=""):
    """Encoded bytes -> (h, w, 3) float32 RGB in [0, 255].

    Gray is repeated to RGB; alpha is dropped (as PIL's `convert("RGB")` does). 16-bit PNGs are
    scaled by 255/65535: TensorFlow's own uint8 path truncates them (`v >> 8`, so 65280 -> 255
    and 255 -> 0), hence PNGs are decoded as uint16 (8-bit ones arrive as v * 257) and divided by 257.
    """
    head = tf.strings.substr(contents, 0, 4)
    known = tf.reduce_any(tf.stack([tf.strings.substr(contents, 0, len(m)) == m for m in _MAGICS]))
    tf.debugging.Assert(known, ["not a decodable image (empty file or unknown format):", path, head])
    is_png = tf.strings.substr(contents, 0, len(_PNG)) == _PNG

    def png():
        return tf.cast(tf.io.decode_png(contents, channels=3, dtype=tf.uint16), tf.float32) / 257.0

    def other():
        return tf.cast(tf.io.decode_image(contents, channels=3, expand_animations=False), tf.float32)

    return tf.ensure_shape(tf.cond(is_png, png, other), [None, None, 3])


def _records(records) -> list:
    records = [ImageRecord(str(r[0]), int(r[1]), int(r[2])) for r in records]
    if not records:
        raise ValueError("records is empty: nothing to check")
    return records


def validate_records(records, batch_size: int = 256) -> tuple[list, SkipReport]:
    """Fully decode every record once; return the decodable records and a SkipReport of the rest.

    Cheap header probes (the loaders') miss truncated or corrupt bodies; run this once before a
    long training run to have them counted and named instead of dropped mid-epoch.
    """
    records = _records(records)
    report = SkipReport()
    candidates = []
    for i, r in enumerate(records):
        if not os.path.isfile(r.path):
            report.add("missing file", r.path)
        elif os.path.getsize(r.path) == 0:
            report.add("empty file (0 bytes)", r.path)
        else:
            candidates.append(i)
    decoded = set()
    if candidates:
        paths = tf.constant([records[i].path for i in candidates])
        ds = tf.data.Dataset.range(len(candidates)).map(
            lambda i: (tf.shape(decode_image(tf.io.read_file(paths[i]), paths[i]))[0], i),
            num_parallel_calls=AUTOTUNE)
        for _, idx in ds.ignore_errors().batch(batch_size):
            decoded.update(candidates[int(j)] for j in idx.numpy())
    for i in candidates:
        if i not in decoded:
            report.add("not decodable (truncated, corrupt or not an image)", records[i].path)
    return [r for i, r in enumerate(records) if i in decoded], report
