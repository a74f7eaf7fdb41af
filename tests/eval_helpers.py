"""Test support for the feature / evaluation / plot tests: tiny models, tiny image trees, and
`reference_ranking`, an independent brute-force implementation of docs/protocols.md (a) used as the
expected value in tests.
"""
from __future__ import annotations

import os

import numpy as np

IMAGE_SIZE = (16, 8)


def reference_ranking(distmat=None, query_pids=None, gallery_pids=None, query_cams=None, gallery_cams=None,
                      max_rank=50, ap="non-interpolated", query_features=None, gallery_features=None,
                      metric="cosine", memory_budget_mb=1024, method="sort"):
    """Per-query loops over a full distance matrix: slow, obviously correct."""
    if distmat is None:
        distmat = 1.0 - np.asarray(query_features, np.float64) @ np.asarray(gallery_features, np.float64).T
    distmat = np.asarray(distmat, np.float64)
    cmcs, aps, inps = [], [], []
    per_ap = np.full(len(query_pids), np.nan)
    for i, (pid, cam) in enumerate(zip(query_pids, query_cams)):
        order = np.argsort(distmat[i], kind="stable")
        kept = [j for j in order if not ((gallery_pids[j] == pid and gallery_cams[j] == cam) or gallery_pids[j] == -1)]
        hits = np.array([gallery_pids[j] == pid for j in kept], dtype=bool)
        if not hits.any():
            continue
        ranks = np.flatnonzero(hits) + 1
        cmc = np.array([1.0 if ranks[0] <= k else 0.0 for k in range(1, max_rank + 1)])
        if ap == "trapezoid":
            terms = [((n - 1) / (r - 1) if r > 1 else 1.0) / 2 + (n / r) / 2 for n, r in enumerate(ranks, start=1)]
        else:
            terms = [n / r for n, r in enumerate(ranks, start=1)]
        per_ap[i] = np.mean(terms)
        cmcs.append(cmc)
        aps.append(per_ap[i])
        inps.append(len(ranks) / ranks[-1])
    if not cmcs:
        raise ValueError("no valid query")
    return {"cmc": np.mean(cmcs, axis=0), "mAP": float(np.mean(aps)), "mINP": float(np.mean(inps)),
            "num_valid_queries": len(cmcs), "num_invalid_queries": len(query_pids) - len(cmcs),
            "ap_variant": ap, "ap": per_ap}


def build_tiny_models():
    """(embedding, siamese): a flip-sensitive embedding `Input(16, 8, 3) -> Conv -> Flatten -> Dense`
    named "embedding", and a two-input verification model around it."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input(IMAGE_SIZE + (3,))
    x = keras.layers.Rescaling(1.0 / 255)(inp)
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(x)
    x = keras.layers.Flatten()(x)  # not flip invariant, unlike global pooling
    embedding = keras.Model(inp, keras.layers.Dense(8)(x), name="embedding")
    a, b = keras.Input(IMAGE_SIZE + (3,)), keras.Input(IMAGE_SIZE + (3,))
    diff = keras.layers.Subtract()([embedding(a), embedding(b)])
    siamese = keras.Model([a, b], keras.layers.Dense(2, activation="softmax")(diff), name="siamese")
    return embedding, siamese


def write_market_tree(root, num_ids=6, cams=(1, 2, 3), per_cam=2, seed=0, junk=True, distractors=2):
    """A tiny Market-1501 layout of 32x16 jpgs whose colours depend on the identity."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = {pid: rng.integers(30, 225, size=3) for pid in range(1, num_ids + 1)}
    for folder in ("bounding_box_train", "bounding_box_test", "query"):
        os.makedirs(os.path.join(root, folder), exist_ok=True)

    def write(folder, pid, cam, index, colour=None):
        colour = base[pid] if colour is None else colour
        pixels = np.clip(colour + rng.normal(0, 25, size=(32, 16, 3)), 0, 255).astype(np.uint8)
        pixels[16:] = np.clip(pixels[16:].astype(int) - 60, 0, 255)  # legs darker: not flip symmetric anyway
        name = f"{pid:04d}_c{cam}s1_{index:06d}_01.jpg" if pid >= 0 else f"-1_c{cam}s1_{index:06d}_01.jpg"
        Image.fromarray(pixels).save(os.path.join(root, folder, name), quality=95)

    index = 0
    for pid in range(1, num_ids + 1):
        for cam in cams:
            for _ in range(per_cam):
                index += 1
                write("bounding_box_train", pid, cam, index)
                index += 1
                write("bounding_box_test", pid, cam, index)
            if cam in cams[:2]:
                index += 1
                write("query", pid, cam, index)
    if junk:
        index += 1
        write("bounding_box_test", -1, cams[0], index, colour=base[1])
    for _ in range(distractors):
        index += 1
        write("bounding_box_test", 0, cams[-1], index, colour=rng.integers(0, 255, size=3))
    return root


def write_distractor_folder(folder, count=10, seed=1):
    from PIL import Image

    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 255, size=(32, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"d{i:05d}.jpg"))
    return folder
