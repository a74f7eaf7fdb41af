"""Synthetic pedestrian datasets written in the exact layouts of the real benchmarks (issue 2, item 2).

The images (drawn by `synthetic_render`) go to disk with the folder trees and file names of
docs/datasets.md §1 (Market-1501, including `-1` junk, `0000` distractors and the hand-drawn `gt_bbox/`
boxes of the multi-query protocol), §2 (DukeMTMC-reID, including identities seen by one camera
only) and §4 (CUHK01), so the real loaders read them.

Everything is deterministic by `seed`: the plan (which image goes where under which name) comes from
seeded generators (`plan_dataset`), and each image is drawn from its own generator seeded by (seed, image index),
so the bytes do not depend on the order or the number of worker processes.

Crowded scenes for person search (issue 13) in the CUHK-SYSU and PRW formats (docs/datasets.md §6-7):
`write_scenes`, planned by `synthetic_scene_layout` and drawn by `synthetic_scenes`.

As the registered dataset `synthetic` (`load`), a set is written once under `<root>/synthetic/` and
read by the loader of its layout:
    >>> ds = load_dataset("synthetic", "data", num_ids=100)   # doctest: +SKIP
    >>> scenes = load_dataset("synthetic", "data", layout="prw", train_scenes=40, test_scenes=20)  # doctest: +SKIP
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import shutil
import time

import cv2
import numpy as np

from reid_keras.data.datasets.base import ReidDataset
from reid_keras.data.datasets.scenes import SearchDataset

from reid_keras.io_utils import atomic_write, atomic_write_json

from .synthetic_layouts import LAYOUTS, PlannedImage, check_args, plan_dataset, render_planned  # noqa: F401
from .synthetic_attributes import camera_style, identity_attributes
from .synthetic_render import render_identity_image
from .synthetic_scene_layout import DEFAULT_SIZE as DEFAULT_SCENE_SIZE, DEFAULT_TEST_SCENES, DEFAULT_TRAIN_SCENES
from .synthetic_scene_layout import SCENE_LAYOUTS, check_scene_args, plan_scenes

# Bump when the drawing or the layout changes: ensure_synthetic then rewrites old copies.
# 2: Market gets gt_bbox/ (multi-query); every other file is unchanged from 1.
GENERATOR_VERSION = 2
MANIFEST = "SYNTHETIC.json"
DEFAULT_ROOT = "data"  # `load_dataset("synthetic")` without a root writes and reads data/synthetic/
# Scenes (issue 13): their own version, bumped when their drawing, plan or files change.
SCENE_GENERATOR_VERSION = 1
SCENE_LAYOUT_NAMES = tuple(SCENE_LAYOUTS)


def _render_chunk(args) -> int:
    items, layout, seed, root = args
    cv2.setNumThreads(1)  # tiny images: threads cost more than they save, and cores are shared
    params = [cv2.IMWRITE_JPEG_QUALITY, 92] if LAYOUTS[layout].ext == ".jpg" else []
    for item in items:
        ok, buf = cv2.imencode(LAYOUTS[layout].ext, render_planned(item, layout, seed), params)
        if not ok:
            raise RuntimeError(f"OpenCV could not encode {item.relpath}")
        with open(os.path.join(root, item.relpath), "wb") as f:
            f.write(buf.tobytes())
    return len(items)


def _read_manifest(folder: str) -> dict | None:
    try:
        with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _remove_stale_partials(out: str, folder: str) -> None:
    """Remove temp folders of killed writers (their pid is gone); leave live writers alone."""
    prefix = f".{folder}.partial-"
    for entry in os.listdir(out):
        if entry.startswith(prefix):
            try:
                os.kill(int(entry[len(prefix):].split("-")[0]), 0)
            except (ValueError, ProcessLookupError):
                shutil.rmtree(os.path.join(out, entry), ignore_errors=True)
            except PermissionError:
                pass  # alive, owned by someone else


@contextlib.contextmanager
def _dataset_folder(out: str, folder: str, overwrite: bool):
    """Yield a temp folder beside `<out>/<folder>` that replaces it when the block ends without error.

    Refuses (FileExistsError) a target without a synthetic manifest (e.g. a real download) and, unless
    `overwrite`, any existing target. The temp folder's name carries this process id: the next writer
    removes those of dead processes. On an exception the temp folder is removed, the target kept.
    """
    target = os.path.join(out, folder)
    if os.path.lexists(target):
        if _read_manifest(target) is None:
            raise FileExistsError(f"{target} exists and was not written by the synthetic generator "
                                  f"(no {MANIFEST}); refusing to replace it. Choose another --out.")
        if not overwrite:
            raise FileExistsError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    os.makedirs(out, exist_ok=True)
    _remove_stale_partials(out, folder)
    tmp = os.path.join(out, f".{folder}.partial-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.makedirs(tmp)
        yield tmp
        if os.path.lexists(target):
            old = f"{tmp}.old"  # named like a partial: removed by the next writer if we die now
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except OSError:
                os.rename(old, target)
                raise
            shutil.rmtree(old)
        else:
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_dataset(layout: str, out: str, num_ids: int = 200, num_cams: int | None = None, seed: int = 0,
                  overwrite: bool = False, images_per_id_cam: tuple | None = None, workers: int = 1) -> str:
    """Write a synthetic dataset to `<out>/<layout folder>` and return a printable summary.

    The images go to a temp folder beside the target, the manifest (`SYNTHETIC.json`, the
    parameters) is written last, then the folder is renamed into place: a killed write never
    leaves a half dataset under the real name.

    Args:
        layout: "market1501", "dukemtmc" or "cuhk01" (docs/datasets.md §1, §2, §4).
        out: parent folder (created); the dataset lands in e.g. `<out>/Market-1501-v15.09.15`.
        num_ids: train + test identities (Duke adds ~29 % one-camera gallery identities).
        num_cams: cameras (default 6 / 8 / 2; CUHK01 has exactly 2).
        seed: all content is a function of the seed and the other arguments.
        overwrite: replace an existing synthetic dataset there (a folder without a synthetic
            manifest, e.g. a real download, is never deleted).
        images_per_id_cam: (lo, hi) detections per identity and camera (default (1, 3)).
        workers: processes drawing images (1 = this process).

    Raises:
        FileExistsError if the target exists and `overwrite` is false, or is not synthetic.
        ValueError for a bad argument.
    """
    spec, cams, per = check_args(layout, num_ids, num_cams, images_per_id_cam, seed)
    plan = plan_dataset(layout, num_ids, cams, seed, images_per_id_cam)
    target = os.path.join(out, spec.folder)
    start, cpu_start = time.perf_counter(), time.process_time()
    with _dataset_folder(out, spec.folder, overwrite) as tmp:
        for split in spec.splits:
            os.makedirs(os.path.join(tmp, split))
        workers = max(1, min(int(workers), os.cpu_count() or 1))
        chunks = [(plan[i::workers], layout, seed, tmp) for i in range(workers)]
        if workers == 1:
            _render_chunk(chunks[0])
        else:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                pool.map(_render_chunk, chunks)
        seconds = time.perf_counter() - start
        manifest = {"generator_version": GENERATOR_VERSION, **_params(layout, num_ids, cams, seed, per),
                    "counts": _counts(plan), "images": len(plan)}
        atomic_write_json(os.path.join(tmp, MANIFEST), manifest, indent=1)
    cpu = time.process_time() - cpu_start
    lines = [f"synthetic {layout} (seed {seed}, {num_ids} ids, {cams} cameras) -> {target}",
             f"{'split':<36} {'ids':>6} {'images':>7}"]
    for split, (ids, images) in manifest["counts"].items():
        lines.append(f"{split:<36} {ids:>6} {images:>7}")
    rate = f"{len(plan) / seconds:.0f} images/s wall with {workers} worker(s)"
    if workers == 1:
        rate += f", {len(plan) / max(cpu, 1e-9):.0f} images per CPU-second"
    lines.append(f"{len(plan)} images in {seconds:.2f} s ({rate})")
    return "\n".join(lines)


def _params(layout, num_ids, cams, seed, per) -> dict:
    return {"layout": layout, "num_ids": int(num_ids), "num_cams": int(cams), "seed": int(seed),
            "images_per_id_cam": [int(per[0]), int(per[1])]}


def _counts(plan) -> dict:
    """{split (with junk/distractors apart): [ids, images]} as the manifest and summary show it."""
    groups: dict = {}
    for item in plan:
        split = item.relpath.split("/")[0]
        if item.pid == -1:
            split += " (junk -1)"
        elif item.pid == 0:
            split += " (distractor 0000)"
        groups.setdefault(split, []).append(item.pid)
    return {k: [len(set(v)), len(v)] for k, v in sorted(groups.items())}


def ensure_synthetic(data_dir: str = "data", layout: str = "market1501", num_ids: int = 200, seed: int = 0,
                     num_cams: int | None = None, images_per_id_cam: tuple | None = None) -> str:
    """Return `<data_dir>/synthetic/<layout>/<layout folder>`, writing it first if needed.

    A copy whose manifest matches the parameters (and the generator version) is reused; one with
    other parameters is rewritten; a folder without a manifest is left alone (FileExistsError).
    """
    spec, cams, per = check_args(layout, num_ids, num_cams, images_per_id_cam, seed)
    out = os.path.join(data_dir, "synthetic", layout)
    target = os.path.join(out, spec.folder)
    manifest = _read_manifest(target) if os.path.isdir(target) else None
    wanted = {"generator_version": GENERATOR_VERSION, **_params(layout, num_ids, cams, seed, per)}
    if manifest is not None and all(manifest.get(k) == v for k, v in wanted.items()):
        return target
    try:
        write_dataset(layout, out, num_ids, cams, seed, overwrite=True, images_per_id_cam=images_per_id_cam)
    except OSError:
        # Another process may have renamed the same dataset into place first: then use theirs.
        manifest = _read_manifest(target)
        if manifest is None or any(manifest.get(k) != v for k, v in wanted.items()):
            raise
    return target


def write_scenes(layout: str, out: str, seed: int = 0, train_scenes: int = DEFAULT_TRAIN_SCENES,
                 test_scenes: int = DEFAULT_TEST_SCENES,
                 size: tuple = DEFAULT_SCENE_SIZE, overwrite: bool = False, workers: int = 1) -> str:
    """Write synthetic crowded scenes in a person-search benchmark's real format to
    `<out>/<layout folder>` (`CUHK-SYSU/` or `PRW-v16.04.20/`) and return a printable summary.

    The plan is `synthetic_scene_layout.plan_scenes`, the drawing and files `synthetic_scenes`;
    written atomically like `write_dataset` (manifest last, then renamed into place).

    Args:
        layout: "cuhk_sysu" (docs/datasets.md §6) or "prw" (§7).
        out: parent folder (created).
        seed: all content (image bytes, annotations) is a function of the seed and the other arguments.
        train_scenes, test_scenes: scenes per split (>= 2 each).
        size: (height, width) of every scene.
        overwrite: replace an existing synthetic set there (never a folder without a manifest).
        workers: processes drawing scenes (1 = this process; the bytes do not depend on it).

    Raises:
        FileExistsError if the target exists and `overwrite` is false, or is not synthetic.
        ValueError for a bad argument.
    """
    from .synthetic_scenes import write_scene_files  # OpenCV drawing: loaded when scenes are written

    start = time.perf_counter()
    plan = plan_scenes(layout, seed, train_scenes, test_scenes, size)
    folder = SCENE_LAYOUTS[layout].folder
    with _dataset_folder(out, folder, overwrite) as tmp:
        counts = write_scene_files(tmp, plan, workers)
        manifest = {"generator_version": SCENE_GENERATOR_VERSION, **_scene_params(layout, seed, train_scenes,
                                                                                  test_scenes, plan.size),
                    "counts": counts}
        atomic_write_json(os.path.join(tmp, MANIFEST), manifest, indent=1)
    seconds = time.perf_counter() - start
    lines = [f"synthetic {layout} scenes (seed {seed}, {plan.size[0]}x{plan.size[1]}) -> {os.path.join(out, folder)}",
             f"{'split':<6} {'scenes':>7} {'boxes':>7} {'labeled':>8} {'ids':>5}"]
    for split in ("train", "test"):
        c = counts[split]
        lines.append(f"{split:<6} {c['scenes']:>7} {c['boxes']:>7} {c['labeled boxes']:>8} {c['ids']:>5}")
    sizes = ", ".join(str(v) for v in counts["gallery sizes"]) or "one gallery (every other test frame)"
    lines += [f"queries: {counts['queries']}; gallery sizes: {sizes}",
              f"people per scene: {counts['people per scene'][0]}-{counts['people per scene'][1]} "
              f"(mean {counts['people per scene'][2]}); box heights {counts['box height'][0]}-"
              f"{counts['box height'][1]} px; {counts['occluders']} occluders",
              f"{len(plan.scenes)} scenes in {seconds:.2f} s ({len(plan.scenes) / seconds:.0f} scenes/s with "
              f"{workers} worker(s))"]
    return "\n".join(lines)


def _scene_params(layout, seed, train_scenes, test_scenes, size) -> dict:
    return {"layout": layout, "seed": int(seed), "train_scenes": int(train_scenes),
            "test_scenes": int(test_scenes), "size": [int(size[0]), int(size[1])]}


def ensure_scenes(data_dir: str = DEFAULT_ROOT, layout: str = "cuhk_sysu", seed: int = 0,
                  train_scenes: int = DEFAULT_TRAIN_SCENES, test_scenes: int = DEFAULT_TEST_SCENES,
                  size: tuple = DEFAULT_SCENE_SIZE) -> str:
    """Return `<data_dir>/synthetic/<layout>/<layout folder>`, writing the scenes first if needed
    (reused when the manifest matches, as `ensure_synthetic`)."""
    spec, size = check_scene_args(layout, seed, train_scenes, test_scenes, size)
    out = os.path.join(data_dir, "synthetic", layout)
    target = os.path.join(out, spec.folder)
    wanted = {"generator_version": SCENE_GENERATOR_VERSION, **_scene_params(layout, seed, train_scenes,
                                                                            test_scenes, size)}
    manifest = _read_manifest(target) if os.path.isdir(target) else None
    if manifest is not None and all(manifest.get(k) == v for k, v in wanted.items()):
        return target
    try:
        write_scenes(layout, out, seed, train_scenes, test_scenes, size, overwrite=True)
    except OSError:
        manifest = _read_manifest(target)  # another process may have put the same set in place first
        if manifest is None or any(manifest.get(k) != v for k, v in wanted.items()):
            raise
    return target


def load(root: str, strict: bool | None = None, num_ids: int | None = None, layout: str = "market1501",
         seed: int = 0, train_scenes: int | None = None, test_scenes: int | None = None,
         scene_size=None, multi_view: bool | None = None) -> ReidDataset | SearchDataset:
    """The synthetic pedestrians in `layout`, written under `<root>/synthetic/<layout>/` on first use
    and read by that benchmark's own loader, whose protocols come along (the Market layout's
    gt_bbox/ gives `multi_query`). `strict` is passed on (None: counts unchecked, a synthetic set is
    never the published benchmark). The dataset is named "synthetic" and its root is `root`, so
    `load_dataset("synthetic", ds.root, **ds.options)` reloads it.

    Crop layouts ("market1501", "dukemtmc", "cuhk01"; `ensure_synthetic`) take `num_ids` (default
    300) and return a `ReidDataset`. Scene layouts ("cuhk_sysu", "prw"; `ensure_scenes`) take
    `train_scenes` (500), `test_scenes` (250), `scene_size` ((height, width) or "HxW", 400 x 600)
    and, for prw, `multi_view` (the PRW loader's), and return a `SearchDataset`.
    """
    scene_options = {"train_scenes": train_scenes, "test_scenes": test_scenes, "scene_size": scene_size,
                     "multi_view": multi_view}
    if layout in SCENE_LAYOUT_NAMES:
        if num_ids is not None:
            raise ValueError(f"num_ids is for the crop layouts ({', '.join(LAYOUTS)}); the scene layout {layout} "
                             "takes train_scenes, test_scenes and scene_size")
        if multi_view is not None and layout != "prw":
            raise ValueError(f"multi_view is a prw option, not one of layout {layout!r}")
        from reid_keras.data.datasets import cuhk_sysu, prw

        size = DEFAULT_SCENE_SIZE if scene_size is None else _scene_size(scene_size)
        train_scenes = DEFAULT_TRAIN_SCENES if train_scenes is None else train_scenes
        test_scenes = DEFAULT_TEST_SCENES if test_scenes is None else test_scenes
        folder = ensure_scenes(root, layout, seed, train_scenes, test_scenes, size)
        if layout == "prw":
            dataset = prw.load(folder, strict=bool(strict), multi_view=bool(multi_view))
        else:
            dataset = cuhk_sysu.load(folder, strict=bool(strict))
        what = f"{layout} scenes, {train_scenes} train / {test_scenes} test of {size[0]}x{size[1]}"
    else:
        given = [k for k, v in scene_options.items() if v is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only for the scene layouts ({', '.join(SCENE_LAYOUT_NAMES)}), "
                             f"not layout {layout!r}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(list(LAYOUTS) + list(SCENE_LAYOUT_NAMES))}, "
                             f"got {layout!r}")
        from reid_keras.data.datasets import cuhk01, dukemtmc, market1501

        num_ids = 300 if num_ids is None else num_ids
        loaders = {"market1501": market1501.load, "dukemtmc": dukemtmc.load, "cuhk01": cuhk01.load}
        folder = ensure_synthetic(root, layout, num_ids=num_ids, seed=seed)
        dataset = loaders[layout](folder, strict=bool(strict))
        what = f"{layout} layout, {num_ids} ids"
    info = {"synthetic": f"{what}, seed {seed}, in {folder}", **dataset.info}
    return dataclasses.replace(dataset, name="synthetic", root=root, info=info)


def _scene_size(value) -> tuple:
    """`scene_size` as (height, width) from a pair or from text "HxW" (a --dataset-option)."""
    try:
        parts = value.lower().split("x") if isinstance(value, str) else list(value)
        height, width = (int(v) for v in parts)
    except (TypeError, ValueError):
        raise ValueError(f"scene_size must be (height, width) or 'HEIGHTxWIDTH', e.g. 400x600; got {value!r}") from None
    return height, width


def contact_sheet(path: str, pids=(1, 2, 3, 4, 7, 8, 9, 10), layout: str = "market1501", seed: int = 0,
                  num_cams: int | None = None, per_cam: int = 2) -> np.ndarray:
    """Write a PNG grid of samples (rows = identities with their attributes, columns = cameras).

    Returns the full-colour BGR sheet; the file is a 256-colour palette PNG, small enough to commit.

    The default rows are two colour groups of four identities each, to show that members of a
    group share their colours and differ in pattern, lower body, bag, head and shape.
    """
    spec, cams, _ = check_args(layout, max(2, max(pids)), num_cams, None, seed)
    h, w = spec.size
    label_w, head_h, gap = 150, 18, 2
    sheet = np.full((head_h + len(pids) * (h + gap), label_w + cams * per_cam * (w + gap), 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    for c in range(cams):
        x = label_w + c * per_cam * (w + gap)
        cv2.putText(sheet, f"camera {c + 1}", (x + 4, 13), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    for row, pid in enumerate(pids):
        ident = identity_attributes(seed, pid)
        y = head_h + row * (h + gap)
        text = [f"id {pid:04d}  group {ident.group}", ident.pattern, f"{ident.lower_type}, {ident.sleeves} sleeves",
                ident.bag.replace("_", " "), ident.head.replace("_", " "),
                f"height {ident.height:.2f} width {ident.width:.2f}"]
        for i, line in enumerate(text):
            cv2.putText(sheet, line, (4, y + 16 + 17 * i), font, 0.36, (0, 0, 0), 1, cv2.LINE_AA)
        for c in range(cams):
            camera = camera_style(seed, c + 1)
            views = None if layout != "cuhk01" else (("front", "back") if c == 0 else ("left", "right"))
            for k in range(per_cam):
                rng = np.random.default_rng([seed, 51, pid, c + 1, k])
                x = label_w + (c * per_cam + k) * (w + gap)
                sheet[y:y + h, x:x + w] = render_identity_image(ident, camera, rng, spec.size, views, "detection")
    from PIL import Image  # only here: a 256-colour palette PNG is ~4x smaller than cv2's RGB one

    palette = Image.fromarray(np.ascontiguousarray(sheet[:, :, ::-1])).quantize(
        256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    atomic_write(path, lambda tmp: palette.save(tmp, format="PNG", optimize=True))
    return sheet
