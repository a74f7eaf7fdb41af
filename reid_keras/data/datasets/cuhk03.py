"""CUHK03, docs/datasets.md §5 and docs/protocols.md §(b).

`cuhk03_release/cuhk-03.mat` is MATLAB v7.3, i.e. HDF5 read with h5py. MATLAB arrays reach h5py
transposed, so every dereference is followed by `.T`: `labeled` / `detected` -> 5 camera pairs ->
(ids x 10) image refs (columns 0-4 view 1, 5-9 view 2) -> H x W x 3 uint8 RGB. Empty slots
(size 0 or fewer than 3 dims) are skipped. The images are decoded once into a cache folder as
`{pair}_{person:03d}_{view}_{slot:02d}.png` (all 1-based), the names the new-protocol lists use,
with an `index.json` (image names + the 20 classic test sets) written last, atomically.

Identity = (pair, person): pid = pair * 1000 + person (e.g. 3042), camid = view - 1.
Protocols: `classic` (20 splits from `testsets`, test images serve as query and gallery; the
dataset declares `cuhk03_classic`, whose evaluator draws the single-shot galleries) and `new` (767/700 from
`cuhk03_new_protocol_config_{labeled,detected}.mat`, MATLAB v5, read with scipy). The new protocol
also loads from its image-folder release (`<box_type>/bounding_box_train` ..., Market rules).
"""
from __future__ import annotations

import json
import os

import numpy as np

from reid_keras.data.datasets.base import (DatasetLayoutError, EvaluationProtocol, ImageRecord, ReidDataset,
                                           SkipReport, relabel, resolve_root)
from reid_keras.data.datasets.common import split_counts, verify_counts
from reid_keras.data.imagefiles import probe_image_file
from reid_keras.io_utils import atomic_write_bytes, atomic_write_json

BOX_TYPES = ("labeled", "detected")
PROTOCOLS = ("classic", "new")
NUM_CLASSIC_SPLITS = 20
MAT_NAME = "cuhk-03.mat"
CANDIDATES = ("cuhk03_release", os.path.join("cuhk03", "cuhk03_release"))
NP_CANDIDATES = ("cuhk03-np", os.path.join("cuhk03", "cuhk03-np"))
LAYOUT = """cuhk03/
  cuhk03_release/cuhk-03.mat                    (MATLAB v7.3 / HDF5: labeled, detected, testsets)
  cuhk03_new_protocol_config_labeled.mat        (new 767/700 protocol only; here or in cuhk03_release/)
  cuhk03_new_protocol_config_detected.mat"""
INDEX_NAME = "index.json"

EXPECTED_CLASSIC = {
    "labeled": {"all images": 14096, "all ids": 1467, "train ids": 1367, "test ids": 100},
    "detected": {"all images": 14097, "all ids": 1467, "train ids": 1367, "test ids": 100},
}
EXPECTED_NEW = {
    "labeled": {"train images": 7368, "train ids": 767, "query images": 1400, "query ids": 700,
                "gallery images": 5328, "gallery ids": 700},
    "detected": {"train images": 7365, "train ids": 767, "query images": 1400, "query ids": 700,
                 "gallery images": 5332, "gallery ids": 700},
}


def image_name(pair: int, person: int, slot: int) -> str:
    """Cache name of a 1-based (pair, person, slot 1..10); slots 1-5 are view 1, 6-10 view 2."""
    return f"{pair}_{person:03d}_{1 if slot <= 5 else 2}_{slot:02d}.png"


def parse_image_name(name: str):
    """`(pid, camid)` of a cache name `{pair}_{person}_{view}_{slot}.png`, or None."""
    fields = os.path.splitext(name)[0].split("_")
    if len(fields) != 4 or not all(f.isdigit() for f in fields) or fields[2] not in ("1", "2"):
        return None
    return int(fields[0]) * 1000 + int(fields[1]), int(fields[2]) - 1


def decode_mat(mat_path: str, box_type: str, cache_dir: str) -> dict:
    """Decode every image of `box_type` into `cache_dir` and return the index (written last)."""
    import cv2
    import h5py

    try:
        mat = h5py.File(mat_path, "r")
    except OSError as err:
        raise DatasetLayoutError(f"{mat_path} is not a MATLAB v7.3 (HDF5) file ({err}); expected the "
                                 f"original cuhk03_release:\n{LAYOUT}") from err
    try:
        os.makedirs(cache_dir, exist_ok=True)
        probe = os.path.join(cache_dir, f".write-test-{os.getpid()}")
        open(probe, "wb").close()
        os.remove(probe)
    except OSError as err:
        mat.close()
        raise DatasetLayoutError(f"cannot write decoded images to {cache_dir} ({err}); pass cache_dir= "
                                 "a writable folder") from err
    names, empty = [], 0
    with mat:
        for key in (box_type, "testsets"):
            if key not in mat:
                raise DatasetLayoutError(f"{mat_path} has no key {key!r}; expected keys labeled, detected, "
                                         "testsets")

        def deref(ref):
            return mat[ref][()].T  # MATLAB writes column-major: undo the transpose

        for pair, pair_ref in enumerate(mat[box_type][()].T.ravel(), 1):
            cells = deref(pair_ref)
            for person in range(cells.shape[0]):
                for slot in range(cells.shape[1]):
                    img = deref(cells[person, slot])
                    if img.size == 0 or img.ndim < 3:
                        empty += 1
                        continue
                    name = image_name(pair, person + 1, slot + 1)
                    path = os.path.join(cache_dir, name)
                    if not os.path.exists(path):  # kept from an interrupted earlier run
                        bgr = np.ascontiguousarray(img[:, :, ::-1].astype(np.uint8))
                        ok, data = cv2.imencode(".png", bgr)
                        if not ok:
                            raise DatasetLayoutError(f"cannot encode image {name} of {mat_path}")
                        atomic_write_bytes(path, data.tobytes())
                    names.append(name)
        testsets = [deref(ref).astype(int).tolist() for ref in mat["testsets"][()].T.ravel()]
    index = {"source": os.path.abspath(mat_path), "box_type": box_type, "images": names,
             "empty slots": empty, "testsets": testsets}
    atomic_write_json(os.path.join(cache_dir, INDEX_NAME), index, indent=1)
    return index


def load_index(mat_path: str, box_type: str, cache_dir: str) -> dict:
    """The cache index, decoding the .mat file first if the cache is not complete."""
    index_path = os.path.join(cache_dir, INDEX_NAME)
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as handle:
            index = json.load(handle)
        if index.get("box_type") != box_type:
            raise DatasetLayoutError(f"cache {cache_dir} holds {index.get('box_type')!r} images, not "
                                     f"{box_type!r}; pass another cache_dir")
        return index
    return decode_mat(mat_path, box_type, cache_dir)


def _cached_records(names: list, cache_dir: str, skipped: SkipReport) -> dict:
    """name -> ImageRecord for the cached images that are still usable."""
    records = {}
    for name in names:
        path = os.path.join(cache_dir, name)
        reason = probe_image_file(path) if os.path.exists(path) else "cached image missing"
        if reason is not None:
            skipped.add(reason, path)
            continue
        pid, camid = parse_image_name(name)
        records[name] = ImageRecord(os.path.abspath(path), pid, camid)
    return records


def _find_config(folder: str, box_type: str) -> str:
    name = f"cuhk03_new_protocol_config_{box_type}.mat"
    places = [os.path.join(folder, name), os.path.join(os.path.dirname(os.path.abspath(folder)), name)]
    for place in places:
        if os.path.isfile(place):
            return place
    raise DatasetLayoutError(f"no file {name!r} in {folder} or its parent (needed by protocol='new'); "
                             f"expected the layout\n{LAYOUT}")


def _load_new_config(path: str) -> dict:
    import scipy.io

    try:
        config = scipy.io.loadmat(path)
    except (ValueError, OSError, NotImplementedError) as err:
        raise DatasetLayoutError(f"cannot read {path} as a MATLAB v5 file ({err})") from err
    missing = [k for k in ("filelist", "labels", "train_idx", "query_idx", "gallery_idx") if k not in config]
    if missing:
        raise DatasetLayoutError(f"{path} lacks key(s) {', '.join(missing)}; expected filelist, labels, "
                                 "train_idx, query_idx, gallery_idx")
    names = [str(np.asarray(entry).ravel()[0]) for entry in config["filelist"].ravel()]
    out = {"filelist": names, "labels": config["labels"].ravel().astype(int)}
    for key in ("train_idx", "query_idx", "gallery_idx"):
        out[key] = config[key].ravel().astype(int) - 1  # MATLAB indices are 1-based
    return out


def _new_protocol_split(config: dict, records: dict, skipped: SkipReport, config_path: str) -> dict:
    splits = {}
    for split in ("train", "query", "gallery"):
        chosen = []
        for idx in config[f"{split}_idx"]:
            name = config["filelist"][idx]
            if name not in records:
                skipped.add("listed in the new-protocol file but not among the decoded images",
                            f"{config_path}: {name}")
                continue
            rec = records[name]
            chosen.append(ImageRecord(rec.path, int(config["labels"][idx]), rec.camid))
        splits[split] = chosen
    return splits


def _load_np_release(root: str, box_type: str, strict) -> ReidDataset | None:
    """The Market-style image-folder release of the new protocol, if `root` holds one."""
    from reid_keras.data.datasets.market1501 import load_market_style

    folders = [os.path.join(base, box_type) for base in [root] + [os.path.join(root, c) for c in NP_CANDIDATES]]
    if os.path.basename(os.path.normpath(root)) == box_type:  # given `cuhk03-np/<box_type>` itself
        folders.insert(0, root)
    for folder in folders:
        if os.path.isdir(os.path.join(folder, "bounding_box_train")):
            layout = f"{folder}/  bounding_box_train/  bounding_box_test/  query/"
            dataset = load_market_style(folder, "cuhk03", num_cams=2, layout=layout)
            dataset.info.update({"box_type": box_type, "protocol": "new (767/700)",
                                 "source": "image-folder release"})
            verify_counts("cuhk03", split_counts(dataset), EXPECTED_NEW[box_type], strict)
            return dataset
    return None


def load(root: str, strict: bool | None = None, box_type: str = "labeled", protocol: str = "classic",
         split_index: int = 0, cache_dir: str | None = None) -> ReidDataset:
    """Load CUHK03 with one protocol.

    Args:
        root: `cuhk03_release/` (holding cuhk-03.mat), its parent, or the new protocol's
            image-folder release.
        strict: compare with the published counts: None = only for a full-looking copy.
        box_type: `labeled` (hand-drawn boxes) or `detected` (DPM).
        protocol: `classic` (20 splits, 1,367/100) or `new` (767/700).
        split_index: classic split 0..19.
        cache_dir: where decoded images go; default `<dataset folder>/images_<box_type>`.

    Raises:
        DatasetLayoutError, DatasetCountError, ValueError for bad options.
    """
    if box_type not in BOX_TYPES:
        raise ValueError(f"cuhk03: box_type must be one of {', '.join(BOX_TYPES)}, got {box_type!r}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"cuhk03: protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    if protocol == "classic" and not 0 <= split_index < NUM_CLASSIC_SPLITS:
        raise ValueError(f"cuhk03: split_index must be 0..{NUM_CLASSIC_SPLITS - 1}, got {split_index}")
    try:
        folder = resolve_root(root, CANDIDATES, [MAT_NAME], LAYOUT)
    except DatasetLayoutError:
        released = _load_np_release(root, box_type, strict) if protocol == "new" and os.path.isdir(root) else None
        if released is None:
            raise
        return released

    config_path = _find_config(folder, box_type) if protocol == "new" else None
    cache_dir = cache_dir or os.path.join(folder, f"images_{box_type}")
    index = load_index(os.path.join(folder, MAT_NAME), box_type, cache_dir)
    skipped = SkipReport()
    records = _cached_records(index["images"], cache_dir, skipped)
    info = {"box_type": box_type, "cache_dir": os.path.abspath(cache_dir),
            "pid encoding": "pair * 1000 + person", "camid": "view - 1"}

    if protocol == "new":
        splits = _new_protocol_split(_load_new_config(config_path), records, skipped, config_path)
        train, train_id_map = relabel(splits["train"])
        info.update({"protocol": "new (767/700)", "config": os.path.abspath(config_path)})
        dataset = ReidDataset(name="cuhk03", root=folder, train=train, query=splits["query"],
                              gallery=splits["gallery"], train_id_map=train_id_map, skipped=skipped, info=info)
        verify_counts("cuhk03", split_counts(dataset), EXPECTED_NEW[box_type], strict)
        return dataset

    if len(index["testsets"]) <= split_index:
        raise DatasetLayoutError(f"{index['source']} holds {len(index['testsets'])} test sets; "
                                 f"split_index {split_index} is out of range")
    test_ids = {pair * 1000 + person for pair, person in index["testsets"][split_index]}
    all_records = list(records.values())
    all_ids = {r.pid for r in all_records}
    train, train_id_map = relabel(r for r in all_records if r.pid not in test_ids)
    test = [r for r in all_records if r.pid in test_ids]
    if not test:
        raise DatasetLayoutError(f"test set {split_index} of {index['source']} names no identity with images")
    info.update({"protocol": "classic (1,367/100)", "split_index": split_index,
                 "test ids without images": len(test_ids - all_ids),
                 "query/gallery": "every test image in both; the evaluator draws single-shot galleries"})
    dataset = ReidDataset(name="cuhk03", root=folder, train=train, query=test, gallery=list(test),
                          train_id_map=train_id_map, skipped=skipped, info=info,
                          protocols=(EvaluationProtocol("cuhk03_classic", {"split_index": split_index}),))
    found = {"all images": len(all_records), "all ids": len(all_ids), "train ids": len(train_id_map),
             "test ids": len({r.pid for r in test})}
    verify_counts("cuhk03", found, EXPECTED_CLASSIC[box_type], strict)
    return dataset
