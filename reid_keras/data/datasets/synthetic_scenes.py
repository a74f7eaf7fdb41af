"""Synthetic crowded scenes: drawing the planned scenes and writing them in the real formats
(issue 13, Deliver 2; docs/datasets.md §6 CUHK-SYSU, §7 PRW).

Each scene of a `ScenePlan` (`synthetic_scene_layout`) is drawn from its own generator seeded by
(seed, scene index), so the bytes depend neither on the order nor on the number of worker
processes: the camera's background (`synthetic_render._background`, a scene-sized window of it),
then people and occluders from far to near (people by `synthetic_render.draw_person`), then the
camera's lighting, blur and noise (`_photometric`). Each person's box is the tight box of the
pixels drawn for it inside the image (before anything in front covers it): what an annotator
draws around a partly occluded or truncated person.

`write_scene_files` writes the images and, through the real formats' writers
(`cuhk_sysu.write_annotations`, `prw.write_annotations`), the annotation files the loaders read;
`synthetic.write_scenes` puts them in place atomically. `scene_contact_sheet` draws a few scenes
of any `SearchDataset` with their boxes and ids.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import os

import cv2
import numpy as np

from reid_keras.io_utils import atomic_write

from .scenes import UNLABELED
from .synthetic_attributes import CLOTHING, camera_style, identity_attributes, pick_colour, random_identity
from .synthetic_render import _background, _photometric, draw_person
from .synthetic_scene_layout import SCENE_LAYOUTS, PlannedOccluder, PlannedPerson, ScenePlan, scene_camera

JPEG_QUALITY = 90
PRW_KEYS = (("box_new", 0.8), ("anno_file", 0.1), ("anno_previous", 0.1))  # docs/datasets.md §7: the key varies


def _draw_occluder(img, occluder: PlannedOccluder, rng) -> None:
    """A grey pole with a highlight, or a barrier (a car-like block with a dark window band)."""
    x1, y1, x2, y2 = (int(round(v)) for v in occluder.box)
    if x2 <= x1 or y2 <= y1:
        return
    if occluder.kind == "pole":
        grey = int(rng.integers(40, 200))
        cv2.rectangle(img, (x1, y1), (x2 - 1, y2 - 1), (grey, grey, grey + 10), -1)
        cv2.line(img, (x1 + (x2 - x1) // 3, y1), (x1 + (x2 - x1) // 3, y2 - 1), (min(255, grey + 50),) * 3, 1)
        return
    cv2.rectangle(img, (x1, y1), (x2 - 1, y2 - 1), pick_colour(rng, CLOTHING), -1)
    band = max(1, (y2 - y1) // 3)
    cv2.rectangle(img, (x1 + 2, y1 + 2), (x2 - 3, y1 + band), (50, 45, 40), -1)


def _draw_person(img, person: PlannedPerson, rng, seed: int) -> np.ndarray:
    """Draw `person` into `img` through a blank patch; return the tight box [x1, y1, x2, y2] (int) of
    its pixels inside the image. The patch leaves half a height each side: the widest pose (a side
    view with a bag and a swinging arm) stays well inside it."""
    identity = identity_attributes(seed, person.identity) if person.identity > 0 else random_identity(rng)
    ph = person.height
    x0, y0 = int(np.floor(person.cx - 0.5 * ph)), int(np.floor(person.top - 0.05 * ph))
    patch = np.zeros((int(np.ceil(1.1 * ph)) + 2, int(np.ceil(ph)) + 2, 3), np.uint8)
    draw_person(patch, identity, person.view, person.cx - x0, person.top - y0, ph, rng)
    h, w = img.shape[:2]
    iy1, iy2, ix1, ix2 = max(0, y0), min(h, y0 + patch.shape[0]), max(0, x0), min(w, x0 + patch.shape[1])
    inside = patch[iy1 - y0:iy2 - y0, ix1 - x0:ix2 - x0]
    mask = inside.any(axis=2)  # no palette colour is (0, 0, 0): every drawn pixel differs from the blank
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        raise RuntimeError(f"planned person at column {person.cx:.1f}, row {person.top:.1f} is outside the image")
    img[iy1:iy2, ix1:ix2][mask] = inside[mask]
    return np.array([ix1 + cols[0], iy1 + rows[0], ix1 + cols[-1] + 1, iy1 + rows[-1] + 1], np.int32)


def render_scene(plan: ScenePlan, index: int) -> tuple:
    """Draw scene `index` of `plan`: `(BGR uint8 [H, W, 3], boxes int32 [n, 4] x1y1x2y2)`, the boxes
    in the order of `plan.scenes[index].people`."""
    scene, seed, (h, w) = plan.scenes[index], plan.seed, plan.size
    camera = camera_style(seed, scene.cam)
    geometry = scene_camera(seed, plan.layout, scene.cam, plan.size)
    # The texture is 1.5 H x 2 W with its floor from `horizon`: put the floor at the camera's floor line.
    horizon = (geometry.floor_y + geometry.background_y) / (h + h // 2)
    texture = _background(dataclasses.replace(camera, horizon=horizon), h, w)
    rng = np.random.default_rng([seed, 33, scene.index])
    pan = int(rng.integers(-(w // 20), w // 20 + 1))
    ox = int(np.clip(geometry.background_x + pan, 0, texture.shape[1] - w))
    img = texture[geometry.background_y:geometry.background_y + h, ox:ox + w].copy()
    boxes = np.zeros((len(scene.people), 4), np.int32)
    items = [(p.feet, 0, j) for j, p in enumerate(scene.people)] + \
            [(o.ground, 1, k) for k, o in enumerate(scene.occluders)]
    for _, kind, j in sorted(items):
        if kind == 0:
            boxes[j] = _draw_person(img, scene.people[j], np.random.default_rng([seed, 34, scene.index, j]), seed)
        else:
            _draw_occluder(img, scene.occluders[j], np.random.default_rng([seed, 35, scene.index, j]))
    return _photometric(img, camera, rng), boxes


def _render_chunk(args) -> dict:
    """Draw and write the scenes `indices` of `plan` into `image_dir`; {index: boxes}."""
    plan, indices, image_dir = args
    cv2.setNumThreads(1)  # the pool already uses the cores
    out = {}
    for i in indices:
        img, boxes = render_scene(plan, i)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise RuntimeError(f"OpenCV could not encode {plan.scenes[i].name}")
        with open(os.path.join(image_dir, plan.scenes[i].name), "wb") as f:
            f.write(buf.tobytes())
        out[i] = boxes
    return out


def render_all(plan: ScenePlan, image_dir: str, workers: int = 1) -> list:
    """Write every scene of `plan` as JPEG into `image_dir`; return the boxes of each scene."""
    workers = max(1, min(int(workers), os.cpu_count() or 1, len(plan.scenes)))
    chunks = [(plan, range(k, len(plan.scenes), workers), image_dir) for k in range(workers)]
    if workers == 1:
        results = [_render_chunk(chunks[0])]
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.map(_render_chunk, chunks)
    boxes = {}
    for part in results:
        boxes.update(part)
    return [boxes[i] for i in range(len(plan.scenes))]


def _xywh(box) -> list:
    return [int(box[0]), int(box[1]), int(box[2] - box[0]), int(box[3] - box[1])]


def cuhk_sysu_annotations(plan: ScenePlan, boxes: list) -> dict:
    """The arguments of `cuhk_sysu.write_annotations` (docs/datasets.md §6) for `plan`'s scenes."""
    scenes = plan.scenes
    appearances: dict = {}
    for s, scene in enumerate(scenes):
        for j, person in enumerate(scene.people):
            if person.identity > 0:
                appearances.setdefault(person.identity, []).append((scene.name, _xywh(boxes[s][j])))
    queries = [(scenes[s].name, _xywh(boxes[s][j])) for s, j in plan.queries]
    query_ids = [scenes[s].people[j].identity for s, j in plan.queries]
    galleries = {}
    for size, lists in plan.galleries.items():
        galleries[size] = []
        for identity, gallery in zip(query_ids, lists):
            entries = []
            for s in gallery:
                j = next((k for k, p in enumerate(scenes[s].people) if p.identity == identity), None)
                entries.append((scenes[s].name, None if j is None else _xywh(boxes[s][j])))
            galleries[size].append(entries)
    return {"images": {scene.name: np.array([_xywh(b) for b in boxes[s]], np.int32).reshape(-1, 4)
                       for s, scene in enumerate(scenes)},
            "test_names": [scene.name for scene in scenes if scene.split == "test"],
            "train_identities": [appearances[i] for i in plan.train_ids],
            "queries": queries, "galleries": galleries}


def prw_annotations(plan: ScenePlan, boxes: list) -> dict:
    """The arguments of `prw.write_annotations` (docs/datasets.md §7) for `plan`'s scenes: rows
    `[id, x, y, w, h]` (-2 = no identity), the annotation key varying as in the real files."""
    scenes = plan.scenes
    frames = {}
    for s, scene in enumerate(scenes):
        rows = [[float(p.identity if p.identity > 0 else -2), *map(float, _xywh(boxes[s][j]))]
                for j, p in enumerate(scene.people)]
        frames[scene.name] = np.array(rows, np.float64).reshape(-1, 5)
    keys, probs = zip(*PRW_KEYS)
    rng = np.random.default_rng([plan.seed, 72])
    key = {scene.name: keys[int(rng.choice(len(keys), p=probs))] for scene in scenes}
    stem = lambda name: os.path.splitext(name)[0]  # noqa: E731
    queries = [(scenes[s].people[j].identity, *_xywh(boxes[s][j]), stem(scenes[s].name)) for s, j in plan.queries]
    return {"frames": frames, "train_frames": sorted(stem(s.name) for s in scenes if s.split == "train"),
            "test_frames": sorted(stem(s.name) for s in scenes if s.split == "test"),
            "queries": queries, "key": key}


def write_scene_files(folder: str, plan: ScenePlan, workers: int = 1) -> dict:
    """Write `plan`'s images and annotation files into `folder` (the dataset folder, e.g.
    `CUHK-SYSU/`); return the counts the manifest records."""
    image_dir = os.path.join(folder, SCENE_LAYOUTS[plan.layout].image_dir)
    os.makedirs(image_dir, exist_ok=True)
    boxes = render_all(plan, image_dir, workers)
    if plan.layout == "cuhk_sysu":
        from reid_keras.data.datasets import cuhk_sysu

        cuhk_sysu.write_annotations(folder, **cuhk_sysu_annotations(plan, boxes))
    else:
        from reid_keras.data.datasets import prw

        prw.write_annotations(folder, **prw_annotations(plan, boxes))
    return scene_counts(plan, boxes)


def scene_counts(plan: ScenePlan, boxes: list) -> dict:
    """Scenes, boxes, labeled boxes and ids per split, queries, galleries, people per scene, box heights."""
    counts = {}
    for split, ids in (("train", plan.train_ids), ("test", plan.test_ids)):
        people = [p for s in plan.scenes if s.split == split for p in s.people]
        counts[split] = {"scenes": sum(s.split == split for s in plan.scenes), "boxes": len(people),
                         "labeled boxes": sum(p.identity > 0 for p in people), "ids": len(ids)}
    per_scene = [len(s.people) for s in plan.scenes]
    heights = np.concatenate([b[:, 3] - b[:, 1] for b in boxes])
    counts.update({"queries": len(plan.queries), "gallery sizes": sorted(plan.galleries),
                   "people per scene": [min(per_scene), max(per_scene), round(float(np.mean(per_scene)), 2)],
                   "box height": [int(heights.min()), int(heights.max())],
                   "occluders": sum(len(s.occluders) for s in plan.scenes)})
    return counts


def scene_contact_sheet(path: str, dataset, count: int = 6, columns: int = 3, tile_width: int = 400) -> np.ndarray:
    """Write a JPEG grid of `count` scenes of a `SearchDataset` (half training, half gallery: those with
    the most people) with their boxes: labeled people green with their id, unlabeled grey.

    Returns the BGR sheet. Raises FileNotFoundError naming an image that cannot be read.
    """
    train = sorted(dataset.train, key=lambda r: -len(r.pids))[:count // 2]
    gallery = sorted(dataset.gallery, key=lambda r: -len(r.pids))[:count - len(train)]
    chosen = [("train", r) for r in train] + [("gallery", r) for r in gallery]
    if not chosen:
        raise ValueError(f"{dataset.name}: no scene to draw")
    tiles = []
    for split, record in chosen:
        img = cv2.imread(record.path, cv2.IMREAD_COLOR)
        if img is None:
            raise FileNotFoundError(f"cannot read scene image {record.path}")
        scale = tile_width / img.shape[1]
        img = cv2.resize(img, (tile_width, max(1, round(img.shape[0] * scale))), interpolation=cv2.INTER_AREA)
        order = np.argsort(record.pids != UNLABELED, kind="stable")  # labeled boxes last: on top
        for box, pid in zip(record.boxes[order] * scale, record.pids[order]):
            labeled = int(pid) != UNLABELED
            colour = (40, 200, 40) if labeled else (170, 170, 170)
            x1, y1, x2, y2 = (int(round(v)) for v in box)
            cv2.rectangle(img, (x1, y1), (x2 - 1, y2 - 1), colour, 2 if labeled else 1)
            if labeled:
                cv2.putText(img, str(int(pid)), (x1 + 2, max(10, y1 - 3)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, colour, 1,
                            cv2.LINE_AA)
        title = np.full((18, tile_width, 3), 255, np.uint8)
        cv2.putText(title, f"{split}: {record.name}, {len(record.pids)} people, "
                    f"{int(np.sum(record.pids != UNLABELED))} labeled", (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (0, 0, 0), 1, cv2.LINE_AA)
        tiles.append(np.vstack([title, img]))
    tile_h = max(t.shape[0] for t in tiles)
    rows = -(-len(tiles) // columns)
    sheet = np.full((rows * (tile_h + 4), columns * (tile_width + 4), 3), 255, np.uint8)
    for k, tile in enumerate(tiles):
        y, x = (k // columns) * (tile_h + 4), (k % columns) * (tile_width + 4)
        sheet[y:y + tile.shape[0], x:x + tile_width] = tile
    def write(tmp):
        params = [cv2.IMWRITE_JPEG_QUALITY, 88] if tmp.lower().endswith((".jpg", ".jpeg")) else []
        if not cv2.imwrite(tmp, sheet, params):
            raise OSError(f"OpenCV could not write {path} (the extension chooses the format: .jpg or .png)")

    atomic_write(path, write)
    return sheet
