"""Speed and memory of `reid_keras.metrics.search.evaluate_search` at CUHK-SYSU size (issue 13;
docs/protocols.md (d)).

A synthetic problem of the real shape, built in memory: 2,900 queries, 6,978 gallery scenes with
~40,900 annotated boxes, ~6 detections per image scoring >= 0.5 (plus ~2 below it), 256-d
embeddings; each query person is annotated in its query scene and 1-4 gallery scenes. The protocol
builder mimics TestG100 (the positives first, then random scenes up to 100) and the full set -1
(TestG50's list, then every other test scene except the query's own).

Against it, in the same run: a per-query Python loop written like the published code (the
structure of SeqNet's `eval_search_cuhk`: a name -> (dets, feats) dict, a loop over the protocol's
gallery images, then over all test images for -1, per-image argsort and IoU, sklearn's
`average_precision_score`), with two changes so that both must give the same numbers: protocol
images are marked "seen" before the full-set pass (the size -1 double-counting bug, docs/protocols.md
(d)) and sorts are stable. Similarities come from different BLAS calls (one matrix product against
per-image matrix-vector products), so a true match within a few float32 ulps of another score can
swap places: per-query APs are compared with a tolerance and the largest difference is printed.

Times are the best of `--repeats` interleaved runs (5; the loop runs once at -1): the machine is
shared, and the minimum is the least disturbed run. Peak RSS: a thread samples the process RSS every 5 ms
during each call (psutil); "peak" is the highest sample, "+" its rise over the RSS before the
call. ru_maxrss of the whole run is printed too.

    python experiments/benchmarks/search_evaluation_speed.py                 # full size, ~3 min
    python experiments/benchmarks/search_evaluation_speed.py --loop-queries 300   # loop on a subset
    python experiments/benchmarks/search_evaluation_speed.py --small         # seconds-long smoke run
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time

import numpy as np
import psutil
from sklearn.metrics import average_precision_score

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from reid_keras.data.datasets.scenes import (UNLABELED, SearchDataset, SearchProtocol,  # noqa: E402
                                             SearchQuery, make_scene)
from reid_keras.metrics.search import evaluate_search  # noqa: E402
from machine import describe_machine  # noqa: E402  (experiments/benchmarks/machine.py)

SEED = 0


# ----------------------------------------------------------------------------- the synthetic problem

def build_problem(num_scenes=6978, num_queries=2900, dim=256, boxes_per_scene=5.86, dets_above=5.0,
                  dets_below=2.0, protocol_size=100, seed=SEED):
    """(dataset, detections, query_embeddings) of CUHK-SYSU's shape; see the module docstring."""
    rng = np.random.default_rng(seed)
    names = [f"s{i:05d}.jpg" for i in range(num_scenes)]
    counts = 1 + rng.poisson(boxes_per_scene - 1, num_scenes)
    xy = rng.uniform(0, 500, (counts.sum(), 2))
    wh = np.stack([rng.uniform(15, 120, counts.sum()), rng.uniform(40, 300, counts.sum())], 1)
    boxes = np.round(np.concatenate([xy, xy + wh], 1)).astype(np.float32)
    pids = np.full(counts.sum(), UNLABELED, np.int32)
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])
    # each query person: one box in its query scene and in 1-4 gallery scenes (their first free box)
    free = first.copy()
    person_scenes = []
    for q in range(num_queries):
        scenes, wanted = [], int(rng.integers(2, 6))
        while len(scenes) < wanted:  # scenes whose boxes all have an identity already are passed over
            s = int(rng.integers(num_scenes))
            if s not in scenes and free[s] < first[s] + counts[s]:
                pids[free[s]] = q
                free[s] += 1
                scenes.append(s)
        person_scenes.append(scenes)
    scene_of_box = np.repeat(np.arange(num_scenes), counts)
    gallery = [make_scene(f"/synthetic/{n}", boxes[first[i]:first[i] + counts[i]], pids[first[i]:first[i] + counts[i]])
               for i, n in enumerate(names)]
    ids = rng.standard_normal((num_queries, dim)).astype(np.float32)

    def unit(x):
        return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)

    # detections: most people found (jittered box, score >= 0.5), false positives up to ~6 per image, ~2 below
    found = rng.random(counts.sum()) < 0.85
    jitter = rng.normal(0, 4, (counts.sum(), 4)).astype(np.float32)
    found_per_scene = np.bincount(scene_of_box[found], minlength=num_scenes)
    n_false = np.maximum(0, rng.poisson(dets_above, num_scenes) - found_per_scene)
    n_low = rng.poisson(dets_below, num_scenes)
    detections = {}
    for i, n in enumerate(names):
        sl = slice(first[i], first[i] + counts[i])
        keep = found[sl]
        person_boxes = boxes[sl][keep] + jitter[sl][keep]
        person_emb = np.where((pids[sl][keep] >= 0)[:, None], ids[np.maximum(pids[sl][keep], 0)], 0)
        person_emb = person_emb + rng.standard_normal((keep.sum(), dim)).astype(np.float32) * 2.0
        extra = int(n_false[i] + n_low[i])
        xy = rng.uniform(0, 500, (extra, 2))
        other = np.concatenate([xy, xy + rng.uniform(20, 200, (extra, 2))], 1).astype(np.float32)
        det_boxes = np.concatenate([person_boxes, other])
        det_scores = np.concatenate([rng.uniform(0.5, 1.0, keep.sum() + n_false[i]), rng.uniform(0.0, 0.5, n_low[i])])
        det_emb = np.concatenate([person_emb, rng.standard_normal((extra, dim)).astype(np.float32)])
        detections[n] = (det_boxes, det_scores.astype(np.float32), unit(det_emb))
    queries, q_emb = [], []
    for q, scenes in enumerate(person_scenes):
        s = scenes[0]
        box = boxes[first[s]:first[s] + counts[s]][pids[first[s]:first[s] + counts[s]] == q][0]
        queries.append(SearchQuery(scene=names[s], box=box, pid=q, camid=-1, index=q))
        q_emb.append(ids[q] + rng.standard_normal(dim).astype(np.float32) * 1.2)
    lists = {size: [] for size in (protocol_size, 50)}
    for q, scenes in enumerate(person_scenes):
        positives = np.array(scenes[1:], np.int64)
        taken = np.zeros(num_scenes, bool)
        taken[scenes] = True
        pool = np.flatnonzero(~taken)
        for size in lists:
            others = rng.choice(pool, size - len(positives), replace=False)
            lists[size].append((np.concatenate([positives, others]).astype(np.int32), positives))

    def box_of(q, s):
        return gallery[s].boxes[gallery[s].pids == q][0]

    def builder(ds, size):
        source = lists[50 if size == -1 else size]
        galleries = []
        for q, (listed, _) in enumerate(source):
            if size == -1:
                rest = np.ones(num_scenes, bool)
                rest[listed] = False
                rest[person_scenes[q][0]] = False
                listed = np.concatenate([listed, np.flatnonzero(rest).astype(np.int32)])
            galleries.append(listed)
        return SearchProtocol(
            name=f"synthetic CUHK-SYSU {'full set (-1)' if size == -1 else f'TestG{size}'}",
            scene_names=tuple(names), galleries=tuple(galleries),
            positive_scenes=tuple(pos.astype(np.int32) for _, pos in source),
            positive_boxes=tuple(np.array([box_of(q, s) for s in pos], np.float32).reshape(-1, 4)
                                 for q, (_, pos) in enumerate(source)))

    dataset = SearchDataset(name="synthetic_cuhk_sysu", root="/synthetic", train=[], gallery=gallery,
                            queries=queries, gallery_sizes=(protocol_size, -1), protocol_builder=builder)
    return dataset, detections, unit(np.array(q_emb))


# ----------------------------------------------------------------------------- the published-style loop

def _compute_iou(a, b):
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0, x2 - x1) * max(0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter * 1.0 / union


def published_style_loop(dataset, detections, query_feats, gallery_size, det_thresh=0.5, num_queries=None):
    """SeqNet's eval_search_cuhk structure (per query: Python loop over gallery images, per image argsort
    and IoU, sklearn AP); protocol images marked seen before the full-set pass; stable sorts."""
    protocol = dataset.search_protocol(gallery_size)
    use_full_set = gallery_size == -1
    name_to_det_feat = {}
    for name, (det, scores, feat) in detections.items():
        inds = np.where(scores >= det_thresh)[0]
        if len(inds) > 0:
            name_to_det_feat[name] = (det[inds], feat[inds])
    all_names = [s.name for s in dataset.gallery]
    aps, accs = [], []
    topk = [1, 5, 10]
    for i in range(num_queries or len(dataset.queries)):
        y_true, y_score = [], []
        count_gt, count_tp = 0, 0
        feat_q = query_feats[i].ravel()
        tested = {dataset.queries[i].scene}
        gt_of = {int(s): b for s, b in zip(protocol.positive_scenes[i], protocol.positive_boxes[i])}
        name2sim, name2gt = {}, {}
        if use_full_set:
            listed = protocol.galleries[i][:50]  # TestG50's part; the rest is what the full-set pass adds
        else:
            listed = protocol.galleries[i]
        for s in listed:
            gallery_imname = all_names[s]
            gt = gt_of.get(int(s), np.zeros(0))
            count_gt += gt.size > 0
            tested.add(gallery_imname)  # the fix: marked before the full-set pass
            if gallery_imname not in name_to_det_feat:
                continue
            det, feat_g = name_to_det_feat[gallery_imname]
            sim = feat_g.dot(feat_q).ravel()
            if gallery_imname in name2sim:
                continue
            name2sim[gallery_imname] = sim
            name2gt[gallery_imname] = gt
        if use_full_set:
            for gallery_imname in all_names:
                if gallery_imname in tested or gallery_imname not in name_to_det_feat:
                    continue
                det, feat_g = name_to_det_feat[gallery_imname]
                sim = feat_g.dot(feat_q).ravel()
                y_true.extend(list(np.zeros(len(sim), dtype=np.int32)))
                y_score.extend(list(sim))
        for gallery_imname, sim in name2sim.items():
            gt = name2gt[gallery_imname]
            det, _ = name_to_det_feat[gallery_imname]
            label = np.zeros(len(sim), dtype=np.int32)
            if gt.size > 0:
                w, h = gt[2] - gt[0], gt[3] - gt[1]
                iou_thresh = min(0.5, (w * h * 1.0) / ((w + 10) * (h + 10)))
                inds = np.argsort(-sim, kind="stable")
                sim = sim[inds]
                det = det[inds]
                for j, roi in enumerate(det[:, :4]):
                    if _compute_iou(roi, gt) >= iou_thresh:
                        label[j] = 1
                        count_tp += 1
                        break
            y_true.extend(list(label))
            y_score.extend(list(sim))
        y_score = np.asarray(y_score)
        y_true = np.asarray(y_true)
        recall_rate = count_tp * 1.0 / count_gt
        ap = 0 if count_tp == 0 else average_precision_score(y_true, y_score) * recall_rate
        aps.append(ap)
        inds = np.argsort(-y_score, kind="stable")
        y_true = y_true[inds]
        accs.append([min(1, sum(y_true[:k])) for k in topk])
    accs = np.mean(accs, axis=0)
    return {"mAP": float(np.mean(aps)), "top1": accs[0], "top5": accs[1], "top10": accs[2], "per_query_ap": aps}


# ----------------------------------------------------------------------------- measuring

class PeakRSS:
    """RSS sampled every 5 ms in a thread while the block runs."""

    def __enter__(self):
        self.process = psutil.Process()
        self.before = self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def timed(fn):
    """(result, seconds, peak RSS MB, its rise over the RSS before the call MB)."""
    with PeakRSS() as mem:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    return out, seconds, mem.peak / 2**20, (mem.peak - mem.before) / 2**20


def best_of(runs: list) -> tuple:
    """The fastest run's result and time, the highest peak and rise over all runs."""
    return (runs[0][0], min(r[1] for r in runs), max(r[2] for r in runs), max(r[3] for r in runs))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loop-queries", type=int, default=0,
                        help="run the published-style loop on the first N queries only and extrapolate its time")
    parser.add_argument("--small", action="store_true", help="a seconds-long smoke run (300 scenes, 100 queries)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, -1], help="gallery sizes (100 and/or -1)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="best of this many interleaved runs of both at gallery 100; of ours at -1 (the loop once)")
    args = parser.parse_args(argv)
    print(describe_machine(numpy=np.__version__))
    shape = dict(num_scenes=300, num_queries=100, protocol_size=100) if args.small else {}
    start = time.perf_counter()
    dataset, detections, query = build_problem(**shape)
    n_dets = sum(len(s) for _, s, _ in detections.values())
    n_above = sum(int(np.sum(s >= 0.5)) for _, s, _ in detections.values())
    n_boxes = sum(len(s.boxes) for s in dataset.gallery)
    print(f"problem: {len(dataset.queries)} queries, {len(dataset.gallery)} gallery scenes, {n_boxes} annotated "
          f"boxes, {n_dets} detections ({n_above} score >= 0.5, {n_above / len(dataset.gallery):.1f} per image), "
          f"{query.shape[1]}-d; built in {time.perf_counter() - start:.1f} s")
    rows = []
    for size in args.sizes:
        protocol = dataset.search_protocol(size)  # built once, outside both timings
        mean_gallery = np.mean([len(g) for g in protocol.galleries])
        n_loop = min(args.loop_queries or len(dataset.queries), len(dataset.queries))
        ours_runs, loop_runs = [], []
        for r in range(args.repeats):  # interleaved, so both meet the same load on the shared machine
            ours_runs.append(timed(lambda: evaluate_search(detections, query, dataset, gallery_size=size)))
            if size != -1 or r == 0:
                loop_runs.append(timed(
                    lambda: published_style_loop(dataset, detections, query, size, num_queries=n_loop)))
        ours, t_ours, peak_ours, rise_ours = best_of(ours_runs)
        loop, t_loop, peak_loop, rise_loop = best_of(loop_runs)
        t_loop_all = t_loop * len(dataset.queries) / n_loop
        diff = np.abs(np.array(ours["per_query_ap"][:n_loop]) - np.array(loop["per_query_ap"]))
        same = {k: (abs(ours[k] - loop[k]) if n_loop == len(dataset.queries) else float("nan"))
                for k in ("mAP", "top1", "top5", "top10")}
        rows.append((size, mean_gallery, ours, t_ours, peak_ours, rise_ours, t_loop_all, n_loop, peak_loop,
                     rise_loop, diff, same))
    print()
    print("| gallery | scenes/query | ours (s) | loop (s) | speed-up | ours peak RSS (+rise) MB "
          "| loop peak RSS (+rise) MB | mAP | top-1 | top-5 | top-10 | max |AP diff| | |metric diff| |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (size, mean_gallery, ours, t_ours, peak_ours, rise_ours, t_loop, n_loop, peak_loop, rise_loop, diff,
         same) in rows:
        loop_note = "" if n_loop == len(dataset.queries) else f" (x{len(dataset.queries) / n_loop:.1f} from {n_loop} q)"
        print(f"| {size} | {mean_gallery:.0f} | {t_ours:.2f} | {t_loop:.1f}{loop_note} | {t_loop / t_ours:.0f}x "
              f"| {peak_ours:.0f} (+{rise_ours:.0f}) | {peak_loop:.0f} (+{rise_loop:.0f}) | {100 * ours['mAP']:.2f} "
              f"| {100 * ours['top1']:.2f} | {100 * ours['top5']:.2f} | {100 * ours['top10']:.2f} "
              f"| {diff.max():.1e} | {max(same.values()):.1e} |")
    print(f"\nwhole run: ru_maxrss {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    for row in rows:
        print(f"gallery {row[0]}: evaluate_search warnings: {'; '.join(row[2]['warnings']) or 'none'}")


if __name__ == "__main__":
    main()
