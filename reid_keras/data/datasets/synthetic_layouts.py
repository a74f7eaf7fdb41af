"""Synthetic datasets: the benchmark layouts and the plan of every image (docs/datasets.md §1, §2, §4).

`plan_dataset` decides, from one seeded generator, which image goes to which folder under which
name, whom it shows and how it is cropped; `render_planned` draws one planned image from its own
generator seeded by (seed, image index). Writing to disk is in `synthetic`.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from .synthetic_attributes import camera_style, identity_attributes, random_identity
from .synthetic_render import render_identity_image


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a benchmark looks on disk: its folder name, crop size, cameras, extension, splits."""

    folder: str
    size: tuple          # (height, width)
    cams: int
    ext: str
    splits: tuple


LAYOUTS = {
    "market1501": Layout("Market-1501-v15.09.15", (128, 64), 6, ".jpg",
                         ("bounding_box_train", "bounding_box_test", "query", "gt_bbox")),
    "dukemtmc": Layout("DukeMTMC-reID", (128, 64), 8, ".jpg",
                       ("bounding_box_train", "bounding_box_test", "query")),
    "cuhk01": Layout("CUHK01", (160, 60), 2, ".png", ("campus",)),
}
DEFAULT_IMAGES_PER_ID_CAM = (1, 3)
JUNK_FRACTION = 0.05        # Market: `-1` files per gallery detection (the real set has 19 %)
DISTRACTOR_FRACTION = 0.08  # Market: `0000` files per gallery detection (the real set has 14 %)
DUKE_EXTRA_IDS = 408 / 1404  # Duke: ids seen by one camera only, per train + test id
GT_BBOX_EXTRA = (0, 2)      # Market: extra hand-drawn gt_bbox boxes per test id and camera, besides the query


@dataclasses.dataclass(frozen=True)
class PlannedImage:
    """One image to draw: where it goes, what its name says, whom it shows, how it is cropped."""

    relpath: str        # relative to the dataset folder, '/'-separated
    pid: int            # the id written in the name (-1 junk, 0 distractor)
    cam: int            # 1-based camera
    identity: int       # whose body is drawn; 0 = an anonymous passer-by or nobody
    box: str            # query / detection / junk / distractor
    index: int          # seeds this image's generator
    views: tuple | None = None  # restricted views (CUHK01 cameras)


def check_args(layout, num_ids, num_cams, images_per_id_cam, seed=0) -> tuple:
    """`(Layout, cameras, (lo, hi))` after checking every argument; ValueError naming the bad one."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int (numpy SeedSequence entropy), got {seed!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    spec = LAYOUTS[layout]
    cams = spec.cams if num_cams is None else int(num_cams)
    if layout == "cuhk01":
        if cams != 2:
            raise ValueError(f"cuhk01 has exactly 2 cameras (A: front/back, B: side); got num_cams={num_cams}")
        if images_per_id_cam is not None and tuple(images_per_id_cam) != (2, 2):
            raise ValueError("cuhk01 has exactly 2 images per identity and camera; "
                             f"got images_per_id_cam={images_per_id_cam}")
        per = (2, 2)
    else:
        if not 2 <= cams <= 9:
            raise ValueError(f"num_cams must be 2..9 for {layout} (one digit after 'c' in the names), got {cams}")
        per = DEFAULT_IMAGES_PER_ID_CAM if images_per_id_cam is None else tuple(int(v) for v in images_per_id_cam)
        if len(per) != 2 or not 1 <= per[0] <= per[1]:
            raise ValueError(f"images_per_id_cam must be (lo, hi) with 1 <= lo <= hi, got {images_per_id_cam}")
    if isinstance(num_ids, bool) or not isinstance(num_ids, (int, np.integer)) or not 2 <= num_ids <= 9998 or (
            layout == "dukemtmc" and num_ids + max(1, round(num_ids * DUKE_EXTRA_IDS)) > 9999):
        raise ValueError(f"num_ids must be an int in 2..9999 (4-digit ids, >= 1 train and 1 test id), got {num_ids!r}")
    return spec, cams, per


def plan_dataset(layout: str, num_ids: int = 200, num_cams: int | None = None, seed: int = 0,
                 images_per_id_cam: tuple | None = None) -> list:
    """Every image of a synthetic dataset as `PlannedImage`s, without drawing anything.

    Identities 1..num_ids; for Market/Duke the first ceil(n/2) of a seeded permutation train, the
    rest test (Market: 751 / 750). Each identity is seen by 2..num_cams cameras with lo..hi
    detections per camera; a test identity also gets one query per camera it visits (docs/datasets.md
    §1: at most one per id and camera), so each query has a match in another camera.

    Market also gets `gt_bbox/` (hand-drawn boxes, for the multi-query protocol): per test id and
    camera a copy of the query (same name and image index, hence the same pixels: the real
    query/ images are copies of gt_bbox images) and GT_BBOX_EXTRA more boxes of that person there.
    Unlike the real set, training ids get no gt_bbox boxes (nothing reads them). These items come
    last and draw from their own generator, so every other image keeps the name, index and pixels
    it had before gt_bbox existed (generator version 1).
    """
    spec, cams, (lo, hi) = check_args(layout, num_ids, num_cams, images_per_id_cam, seed)
    rng = np.random.default_rng([seed, 41, list(LAYOUTS).index(layout)])
    plan: list = []

    def add(split, name, pid, cam, identity, box, views=None):
        plan.append(PlannedImage(f"{split}/{name}", pid, cam, identity, box, len(plan), views))

    if layout == "cuhk01":
        for pid in range(1, num_ids + 1):
            for img in range(1, 5):
                cam = (img - 1) // 2 + 1
                add("campus", f"{pid:04d}{img:03d}.png", pid, cam, pid, "query",
                    ("front", "back") if cam == 1 else ("left", "right"))
        return plan

    perm = rng.permutation(np.arange(1, num_ids + 1))
    test_ids = {int(p) for p in perm[(num_ids + 1) // 2:]}
    names: set = set()

    def name(pid, cam, box, gen=rng):
        while True:
            if layout == "market1501":
                frame = int(gen.integers(1, 1_000_000))
                boxno = 0 if box == "query" else int(gen.integers(1, 9))  # hand-drawn queries are _00
                out = f"{pid:04d}_c{cam}s{int(gen.integers(1, 7))}_{frame:06d}_{boxno:02d}.jpg"
                out = out.replace("-001_", "-1_")
            else:
                out = f"{pid:04d}_c{cam}_f{int(gen.integers(1, 10_000_000)):07d}.jpg"
            if out not in names:
                names.add(out)
                return out

    visits = {}
    for pid in range(1, num_ids + 1):
        seen = np.sort(rng.choice(cams, int(rng.integers(2, cams + 1)), replace=False)) + 1
        visits[pid] = [(int(c), int(rng.integers(lo, hi + 1))) for c in seen]
    for pid, cam_counts in visits.items():
        split = "bounding_box_test" if pid in test_ids else "bounding_box_train"
        for cam, count in cam_counts:
            for _ in range(count):
                add(split, name(pid, cam, "detection"), pid, cam, pid, "detection")
            if pid in test_ids:
                add("query", name(pid, cam, "query"), pid, cam, pid, "query")
    gallery = sum(p.relpath.startswith("bounding_box_test/") for p in plan)
    test_sorted = sorted(test_ids)
    if layout == "market1501":
        for _ in range(max(1, round(JUNK_FRACTION * gallery))):
            pid = test_sorted[int(rng.integers(len(test_sorted)))]
            cam = visits[pid][int(rng.integers(len(visits[pid])))][0]
            add("bounding_box_test", name(-1, cam, "junk"), -1, cam, pid, "junk")
        for _ in range(max(1, round(DISTRACTOR_FRACTION * gallery))):
            cam = int(rng.integers(1, cams + 1))
            add("bounding_box_test", name(0, cam, "distractor"), 0, cam, 0, "distractor")
        queries = [p for p in plan if p.relpath.startswith("query/")]
        extra_rng = np.random.default_rng([seed, 43])  # apart from `rng`: the items above stay as they were
        for query in queries:
            plan.append(dataclasses.replace(query, relpath="gt_bbox/" + query.relpath[len("query/"):]))
            for _ in range(int(extra_rng.integers(GT_BBOX_EXTRA[0], GT_BBOX_EXTRA[1] + 1))):
                add("gt_bbox", name(query.pid, query.cam, "query", extra_rng), query.pid, query.cam, query.pid,
                    "query")
    else:
        for pid in range(num_ids + 1, num_ids + 1 + max(1, round(num_ids * DUKE_EXTRA_IDS))):
            cam = int(rng.integers(1, cams + 1))
            for _ in range(int(rng.integers(lo, hi + 1))):
                add("bounding_box_test", name(pid, cam, "detection"), pid, cam, pid, "detection")
    return plan


def render_planned(item: PlannedImage, layout: str, seed: int = 0) -> np.ndarray:
    """Draw one planned image (BGR uint8, the layout's native size) without touching the disk."""
    rng = np.random.default_rng([seed, 31, item.index])
    if item.identity > 0:
        person = identity_attributes(seed, item.identity)
    elif item.box == "distractor" and rng.random() < 0.5:
        person = random_identity(rng)  # a false alarm cutting through a passer-by
    else:
        person = None                  # a false alarm on the background
    return render_identity_image(person, camera_style(seed, item.cam), rng, LAYOUTS[layout].size,
                                 item.views, item.box)
