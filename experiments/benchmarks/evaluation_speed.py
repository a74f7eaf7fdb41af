"""Speed and memory of `reid_keras.metrics.evaluate_ranking` (issue 3; docs/protocols.md (a), (f)).

Part 1, Market-1501 size (3,368 queries x 15,913 gallery, 2048-d, cosine): our full evaluation
(distances + CMC + mAP + mINP) against, in the same run,
  (i) the floor any full-matrix method pays: one float32 matrix product + one full np.argsort;
  (ii) the usual torchreid-style loop: per query argsort + Python list ops, timed on the first
      `--loop-queries` queries and extrapolated linearly to all queries (plus the matrix product).
Every timing is the best of `--repeats` runs (the machine is shared; the minimum is the least
disturbed run), and the ratios are what to compare across machines.

Part 2, Market + 500k size (3,368 x 519,732, 512-d float32): run in a child process so its peak
RSS (getrusage ru_maxrss, features included) is its own; the features are generated in seeded
chunks straight into one preallocated array.

    python experiments/benchmarks/evaluation_speed.py              # both parts
    python experiments/benchmarks/evaluation_speed.py --part market --repeats 3
    python experiments/benchmarks/evaluation_speed.py --small      # a seconds-long smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from reid_keras.metrics import evaluate_ranking  # noqa: E402
from machine import describe_machine  # noqa: E402  (experiments/benchmarks/machine.py)

SEED = 0


def structured(rng, pids, num_ids, dim, signal, centers):
    """Identity centre * signal + unit noise per image; pid 0 (distractor) gets noise only."""
    x = rng.standard_normal((pids.shape[0], dim), dtype=np.float32)
    has_id = pids > 0
    x[has_id] += signal * centers[pids[has_id] % num_ids]
    return x


def market_problem(num_q, num_g_ids, num_distractors, num_ids, dim, seed=SEED):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((num_ids, dim), dtype=np.float32)
    g_pids = np.concatenate([rng.integers(1, num_ids + 1, num_g_ids), np.zeros(num_distractors, np.int64)])
    q_pids = rng.integers(1, num_ids + 1, num_q)
    g_cams, q_cams = rng.integers(0, 6, g_pids.shape[0]), rng.integers(0, 6, num_q)
    gf = structured(rng, g_pids, num_ids, dim, 0.3, centers)
    qf = structured(rng, q_pids, num_ids, dim, 0.3, centers)
    return qf, gf, q_pids, g_pids, q_cams, g_cams


def torchreid_style_loop(distmat, q_pids, g_pids, q_cams, g_cams, max_rank=50):
    """Per query: argsort, masks, then Python lists over the whole gallery (as in torchreid's
    pure-Python `eval_market1501`). Returns per-query AP (NaN when invalid)."""
    aps = []
    for i in range(distmat.shape[0]):
        order = np.argsort(distmat[i])
        matches = (g_pids[order] == q_pids[i]).astype(np.int32)
        keep = ~((g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i])) & (g_pids[order] != -1)
        raw_cmc = matches[keep]
        if not np.any(raw_cmc):
            aps.append(np.nan)
            continue
        cmc = raw_cmc.cumsum()
        cmc[cmc > 1] = 1
        _ = cmc[:max_rank]
        pos_idx = np.where(raw_cmc == 1)
        _ = raw_cmc.sum() / (np.max(pos_idx) + 1.0)  # INP
        tmp = raw_cmc.cumsum()
        tmp = [x / (k + 1.0) for k, x in enumerate(tmp)]
        tmp = np.asarray(tmp) * raw_cmc
        aps.append(tmp.sum() / raw_cmc.sum())
    return np.array(aps)


def best_of(fn, repeats):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def part_market(args):
    scale = 16 if args.small else 1
    num_q, num_g_ids, num_dis = 3368 // scale, 13115 // scale, 2798 // scale
    dim = 512 if args.small else 2048
    qf, gf, q_pids, g_pids, q_cams, g_cams = market_problem(num_q, num_g_ids, num_dis, 751, dim)
    qn = qf / np.linalg.norm(qf, axis=1, keepdims=True)
    gn = gf / np.linalg.norm(gf, axis=1, keepdims=True)
    common = dict(query_pids=q_pids, gallery_pids=g_pids, query_cams=q_cams, gallery_cams=g_cams)

    def floor():
        d = 1.0 - qn @ gn.T
        return np.argsort(d, axis=1)

    def matmul():
        return 1.0 - qn @ gn.T

    n_loop = min(args.loop_queries, num_q)
    distmat = matmul()

    def loop():
        return torchreid_style_loop(distmat[:n_loop], q_pids[:n_loop], g_pids, q_cams[:n_loop], g_cams)

    def ours(method):
        return evaluate_ranking(query_features=qf, gallery_features=gf, method=method, **common)

    rows = {}
    for _ in range(args.repeats):  # interleave so a busy spell hurts every candidate alike
        for name, fn in (("floor", floor), ("matmul", matmul),
                         ("sort", lambda: ours("sort")), ("sort_free", lambda: ours("sort_free")),
                         ("loop", loop)):
            t, out = best_of(fn, 1)
            if name in ("sort", "sort_free", "loop"):
                rows.setdefault(name + "_result", out)
            rows[name] = min(rows.get(name, np.inf), t)
    loop_ap = rows["loop_result"]
    loop_total = rows["matmul"] + rows["loop"] * num_q / n_loop
    res = rows["sort_result"]
    assert np.allclose(res["ap"][:n_loop], loop_ap, equal_nan=True, atol=1e-9), "torchreid-style loop disagrees"
    assert np.array_equal(res["ap"], rows["sort_free_result"]["ap"], equal_nan=True)
    print(f"\n### Market-1501 size: {num_q:,} queries x {gf.shape[0]:,} gallery, {gf.shape[1]}-d, cosine\n")
    print(f"Machine: {describe_machine(numpy=np.__version__)}. Best of {args.repeats} runs each (interleaved).\n")
    print("| method | time (s) | ratio to matmul + argsort | ratio to per-query loop |")
    print("| --- | ---: | ---: | ---: |")
    print(f"| float32 matmul + one full np.argsort (Q x G) | {rows['floor']:.2f} | 1.00 | "
          f"{rows['floor'] / loop_total:.3f} |")
    for name in ("sort", "sort_free"):
        print(f"| evaluate_ranking(features, method=\"{name}\"): distances + CMC + mAP + mINP | "
              f"{rows[name]:.2f} | {rows[name] / rows['floor']:.2f} | {rows[name] / loop_total:.3f} |")
    print(f"| torchreid-style per-query Python loop + matmul (loop timed on {n_loop} queries, "
          f"x{num_q / n_loop:.2f} extrapolated) | {loop_total:.2f} | {loop_total / rows['floor']:.2f} | 1.00 |")
    print(f"\nmAP {res['mAP']:.4f}, rank-1 {res['cmc'][0]:.4f}, mINP {res['mINP']:.4f}; per-query AP equal to "
          f"the loop's on its {n_loop} queries; sort == sort_free exactly.")


def part_large(args):
    """Child process: Market + 500k distractors, peak RSS of this process only."""
    scale = 64 if args.small else 1
    num_q, dim, num_ids = 3368 // scale, 512, 751
    g_ids, num_dis = 15913 // scale, (519732 - 15913) // scale
    rng = np.random.default_rng(SEED)
    centers = rng.standard_normal((num_ids, dim), dtype=np.float32)
    g_pids = np.concatenate([rng.integers(1, num_ids + 1, g_ids), np.zeros(num_dis, np.int64)])
    g_cams = np.concatenate([rng.integers(0, 6, g_ids), np.full(num_dis, -1)])
    q_pids, q_cams = rng.integers(1, num_ids + 1, num_q), rng.integers(0, 6, num_q)
    t = time.perf_counter()
    gf = np.empty((g_pids.shape[0], dim), dtype=np.float32)
    step = 50_000
    for i, a in enumerate(range(0, gf.shape[0], step)):  # seeded chunks, no full-size temporaries
        chunk_rng = np.random.default_rng([SEED, 1, i])
        gf[a:a + step] = structured(chunk_rng, g_pids[a:a + step], num_ids, dim, 0.5, centers)
    qf = structured(np.random.default_rng([SEED, 2]), q_pids, num_ids, dim, 0.5, centers)
    t_gen = time.perf_counter() - t
    out = {"num_q": num_q, "num_g": int(gf.shape[0]), "dim": dim, "gen_s": t_gen,
           "features_gb": (gf.nbytes + qf.nbytes) / 1e9}
    for method in args.methods:
        t = time.perf_counter()
        res = evaluate_ranking(query_features=qf, gallery_features=gf, query_pids=q_pids, gallery_pids=g_pids,
                               query_cams=q_cams, gallery_cams=g_cams, method=method,
                               memory_budget_mb=args.budget_mb)
        out[method] = {"s": time.perf_counter() - t, "mAP": res["mAP"], "rank1": float(res["cmc"][0]),
                       "ap": res["ap"].tolist()}
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(json.dumps(out))


def run_large_child(args):
    cmd = [sys.executable, os.path.abspath(__file__), "--part", "large-child", "--budget-mb", str(args.budget_mb),
           "--methods", *args.methods] + (["--small"] if args.small else [])
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n### Market + 500k size: {out['num_q']:,} queries x {out['num_g']:,} gallery, {out['dim']}-d "
          f"float32, cosine, memory_budget_mb={args.budget_mb}\n")
    print(f"Machine: {describe_machine(numpy=np.__version__)}. One run (child process).\n")
    print("| step | time (s) | note |")
    print("| --- | ---: | --- |")
    print(f"| generate features in 50k-row seeded chunks | {out['gen_s']:.1f} | "
          f"{out['features_gb']:.2f} GB of features |")
    for m in args.methods:
        print(f"| evaluate_ranking(features, method=\"{m}\") | {out[m]['s']:.1f} | mAP {out[m]['mAP']:.4f}, "
              f"rank-1 {out[m]['rank1']:.4f} |")
    print(f"| whole child process (wall, incl. start-up) | {wall:.1f} | peak RSS {out['peak_rss_gb']:.2f} GB "
          f"(ru_maxrss, features included; limit 4 GB) |")
    if len(args.methods) == 2:
        same = np.array_equal(np.array(out[args.methods[0]]["ap"], dtype=float),
                              np.array(out[args.methods[1]]["ap"], dtype=float), equal_nan=True)
        print(f"\nPer-query AP identical for both methods: {same}.")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("all", "market", "large", "large-child"), default="all")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loop-queries", type=int, default=300)
    p.add_argument("--budget-mb", type=float, default=1024)
    p.add_argument("--methods", nargs="+", choices=("sort", "sort_free"), default=["sort_free", "sort"])
    p.add_argument("--small", action="store_true", help="scaled-down smoke run")
    args = p.parse_args(argv)
    if args.part == "large-child":
        part_large(args)
        return
    if args.part in ("all", "market"):
        part_market(args)
    if args.part in ("all", "large"):
        run_large_child(args)


if __name__ == "__main__":
    main()
