"""Tiny CUHK-SYSU and PRW trees in the real on-disk formats (docs/datasets.md §6-7), for the tests.

`make_cuhk_sysu(root)` and `make_prw(root)` write 32x48 JPEG scenes plus the annotation files through
the loaders' own writers (`cuhk_sysu.write_annotations`, `prw.write_annotations`, i.e. `scipy.io.savemat`
in the real structures) and return the dataset folder. The specs below are plain data with every quirk of
§6-7, so a test can derive what a correct loader must find without running the loader:

- CUHK-SYSU: boxes with w = 0 and h < 0 (dropped), both empty-idlocate shapes (0, 0) and (1, 0), a gallery
  scene listed twice, an identity box that is not in Images.mat, a pool order that is not sorted, a train
  image (`s10.jpg`) that sorts between `s1.jpg` and `s2.jpg`, a test scene no gallery lists (for size -1).
- PRW: the three annotation keys (and a file holding two of them), negative and fractional coordinates,
  a zero-width box, id -2, training ids 1..478, 480..483 and 932 (483 values: no `pid - 1` table fits),
  CRLF `query_info.txt` with a blank last line, a query without any positive and a query box that is not
  among its frame's annotations.
"""
from __future__ import annotations

import os

import numpy as np

from tests.fixtures.layouts import write_image

SCENE_SHAPE = (48, 32)  # H x W

# ------------------------------------------------------------------------------------------ CUHK-SYSU
# image name -> boxes x, y, w, h as stored in Images.mat (before the w/h <= 0 boxes are dropped)
CUHK_IMAGES = {
    "s1.jpg": [[2, 3, 10, 20], [15, 5, 8, 30], [20, 10, 0, 12]],
    "s10.jpg": [[3, 2, 11, 28], [18, 8, 9, -3]],
    "s2.jpg": [[1, 1, 12, 30], [16, 4, 10, 25]],
    "s3.jpg": [[4, 6, 9, 22]],
    "s5.jpg": [[2, 2, 10, 30], [14, 3, 12, 34]],
    "s6.jpg": [[1, 4, 9, 25], [12, 6, 10, 28], [24, 1, 6, 20]],
    "s7.jpg": [[5, 5, 14, 36]],
    "s8.jpg": [[3, 3, 8, 24], [13, 2, 0, 10]],
    "s9.jpg": [[6, 1, 12, 40], [20, 5, 10, 30]],
    "s11.jpg": [[2, 2, 10, 20]],
}
CUHK_POOL = ["s7.jpg", "s11.jpg", "s5.jpg", "s6.jpg", "s8.jpg", "s9.jpg"]
CUHK_TRAIN_IDENTITIES = [
    [("s1.jpg", [2, 3, 10, 20]), ("s2.jpg", [1, 1, 12, 30])],
    [("s1.jpg", [15, 5, 8, 30]), ("s10.jpg", [3, 2, 11, 28]), ("s3.jpg", [4, 6, 9, 22])],
    [("s2.jpg", [16, 4, 10, 25]), ("s3.jpg", [99, 99, 5, 5])],  # the second box is in no image: counted
]
CUHK_QUERIES = [("s5.jpg", [2, 2, 10, 30]), ("s6.jpg", [1, 4, 9, 25]), ("s7.jpg", [5, 5, 14, 36])]
CUHK_GALLERIES = {
    50: [
        [("s6.jpg", [12, 6, 10, 28]), ("s9.jpg", [20, 5, 10, 30]), ("s7.jpg", None), ("s8.jpg", None),
         ("s7.jpg", None)],  # s7 listed twice
        [("s8.jpg", [3, 3, 8, 24]), ("s5.jpg", None), ("s9.jpg", None), ("s7.jpg", None)],
        [("s5.jpg", [14, 3, 12, 34]), ("s6.jpg", None)],
    ],
    100: [
        [("s9.jpg", [20, 5, 10, 30]), ("s6.jpg", [12, 6, 10, 28]), ("s8.jpg", None)],
        [("s8.jpg", [3, 3, 8, 24]), ("s7.jpg", None), ("s5.jpg", None), ("s9.jpg", None)],
        [("s5.jpg", [14, 3, 12, 34]), ("s9.jpg", None), ("s6.jpg", None), ("s8.jpg", None)],
    ],
}


def write_scenes(folder: str, names, seed: int = 0) -> None:
    for k, name in enumerate(names):
        write_image(os.path.join(folder, name), seed=seed + k, shape=SCENE_SHAPE)


def make_cuhk_sysu(root: str, missing=(), galleries=None, parent: str | None = "CUHK-SYSU") -> str:
    """Write the CUHK_* spec under `root/parent` (or `root` itself); `missing` image names are not
    written to disk. Returns the dataset folder."""
    from reid_keras.data.datasets import cuhk_sysu

    folder = os.path.join(root, parent) if parent else root
    write_scenes(os.path.join(folder, "Image", "SSM"), [n for n in CUHK_IMAGES if n not in missing])
    cuhk_sysu.write_annotations(folder, {n: np.array(b) for n, b in CUHK_IMAGES.items()}, CUHK_POOL,
                                CUHK_TRAIN_IDENTITIES, CUHK_QUERIES,
                                CUHK_GALLERIES if galleries is None else galleries)
    return folder


# ------------------------------------------------------------------------------------------------ PRW
# frame name -> annotation rows [id, x, y, w, h] (float, as in the .mat files), and the key they use
PRW_ALL_TRAIN_IDS = list(range(1, 479)) + [480, 481, 482, 483, 932]
PRW_TRAIN_FRAMES = {
    "c1s1_000151.jpg": ([[1, 2, 3, 10, 30], [-2, 15, 5, 8, 20], [932, -3.5, 4, 10, 28], [-2, 5, 5, 0, 10]],
                        "box_new"),
    "c2s1_000201.jpg": ([[478, 3.7, 3, 9, 25], [480, 14, 4, 10, 30]], "anno_file"),
    "c3s2_000301.jpg": ([[pid, pid % 20, 1, 5, 9] for pid in PRW_ALL_TRAIN_IDS], "anno_previous"),
}
PRW_TEST_FRAMES = {
    "c1s1_001051.jpg": ([[5, 2, 3, 10, 30], [-2, 15, 4, 9, 25]], "box_new"),
    "c2s1_001101.jpg": ([[5, -1.5, 2, 11, 28], [7, 14, 6, 10, 30]], "anno_file"),
    "c2s2_001201.jpg": ([[7, 3, 3, 9, 26], [5, 16, 2, 10, 33]], "box_new"),
    "c3s1_001301.jpg": ([[7, 2, 5, 12, 35], [-2, 18, 1, 8, 20], [9, 5, 5, 5, 5]], "anno_previous"),
}
# a training frame whose file holds two keys: the reader must take `anno_file` (id 2), not `anno_previous`
PRW_TWO_KEYS = ("c1s2_000401.jpg", {"anno_previous": [[3, 1, 1, 9, 20]], "anno_file": [[2, 4, 4, 9, 20]]})
# (pid, x, y, w, h, frame without extension), in file order
PRW_QUERIES = [
    (5, 2, 3, 10, 30, "c1s1_001051"),
    (7, 14, 6, 10, 30, "c2s1_001101"),
    (9, 5, 5, 5, 5, "c3s1_001301"),  # id 9 is in no other frame: no positive
    (7, 1, 1, 5, 5, "c2s2_001201"),  # not among the annotations of its frame: counted
]


def make_prw(root: str, missing=(), parent: str | None = "PRW-v16.04.20") -> str:
    """Write the PRW_* spec under `root/parent` (or `root`); `missing` frames get no image. A fifth
    annotation file (`c1s2_000401.jpg.mat`, train) holds `anno_file` and `anno_previous`: the reader
    must take `anno_file`. Returns the dataset folder."""
    import scipy.io

    from reid_keras.data.datasets import prw

    folder = os.path.join(root, parent) if parent else root
    two_keys, contents = PRW_TWO_KEYS
    frames = {**PRW_TRAIN_FRAMES, two_keys: (contents["anno_file"], "anno_file"), **PRW_TEST_FRAMES}
    train = [n[:-4] for n in PRW_TRAIN_FRAMES] + [two_keys[:-4]]
    write_scenes(os.path.join(folder, "frames"), [n for n in frames if n not in missing])
    prw.write_annotations(folder, {n: np.array(rows, np.float64) for n, (rows, _) in frames.items()},
                          train, [n[:-4] for n in PRW_TEST_FRAMES], PRW_QUERIES,
                          key={n: k for n, (_, k) in frames.items()})
    scipy.io.savemat(os.path.join(folder, "annotations", two_keys + ".mat"),
                     {k: np.array(v, np.float64) for k, v in contents.items()})
    return folder


def prw_corners(row) -> list:
    """docs/datasets.md §7 independently of the loader: clip x, y, w, h at 0, corners, int."""
    x, y, w, h = (max(0.0, float(v)) for v in row[1:5])
    return [int(x), int(y), int(x + w), int(y + h)]
