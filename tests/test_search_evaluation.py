"""evaluate_search (docs/protocols.md (d)) against a literal per-query reference written here from the
protocol's pseudo-code (Python loops, sklearn's average_precision_score); the full-set double-counting
case; fewer than 10 detections; top matches; ground-truth boxes mode; bad input and its messages."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from reid_keras.data.datasets.scenes import (UNLABELED, SearchDataset, SearchProtocol, SearchQuery,
                                             make_scene)
from reid_keras.metrics import search
from reid_keras.metrics.search import evaluate_search, ground_truth_detections, iou_threshold

D = 8


# ---------------------------------------------------------------------------- the literal reference

def ref_iou(a, b):
    """IoU as the published code writes it: continuous corners, no +1."""
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def reference_search(detections, query_embeddings, lists, query_scenes, test_images, full_set,
                     threshold=0.5, seqnet_full_set_bug=False):
    """docs/protocols.md (d), one query at a time. `lists[q]`: the protocol's (image, gt box or None)
    entries (TestG50's for the full set); `test_images`: every test image in order (full set only).
    seqnet_full_set_bug: mark protocol images as seen only after the full-set pass (SeqNet, COAT)."""
    dets = {}
    for img, (boxes, scores, emb) in detections.items():
        keep = [j for j in range(len(scores)) if scores[j] >= threshold]
        if keep:
            e = np.asarray(emb, np.float64)[keep]
            dets[img] = ([[float(v) for v in boxes[j]] for j in keep], e / np.linalg.norm(e, axis=1, keepdims=True))
    out = {"ap": [], "n_gt": [], "n_tp": [], "top": [], "stats": {"tied_tp": 0, "small_tp": 0, "dup": 0}}
    for q, entries in enumerate(lists):
        q_emb = np.asarray(query_embeddings[q], np.float64)
        q_emb = q_emb / np.linalg.norm(q_emb)
        labels, scores, n_gt, n_tp = [], [], 0, 0
        seen, listed = {query_scenes[q]}, set()
        protocol_part = []
        for img, gt in entries:
            if img in listed:  # a gallery image listed twice is evaluated and counted once
                out["stats"]["dup"] += 1
                continue
            listed.add(img)
            if not seqnet_full_set_bug:
                seen.add(img)
            if gt is not None:
                n_gt += 1
            if img not in dets:
                continue
            boxes, emb = dets[img]
            sim = [float(s) for s in emb @ q_emb]
            lab = [0] * len(sim)
            if gt is not None:
                w, h = gt[2] - gt[0], gt[3] - gt[1]
                thr = min(0.5, w * h / ((w + 10) * (h + 10)))
                for j in sorted(range(len(sim)), key=lambda j: -sim[j]):  # stable: ties to the lower index
                    if ref_iou(boxes[j], gt) >= thr:
                        lab[j] = 1
                        n_tp += 1
                        out["stats"]["small_tp"] += thr < 0.5
                        break
            protocol_part.append((lab, sim))
        full_part = []
        if full_set:
            for img in test_images:
                if img not in seen and img in dets:
                    sim = [float(s) for s in dets[img][1] @ q_emb]
                    full_part.append(([0] * len(sim), sim))
        for lab, sim in (full_part + protocol_part if seqnet_full_set_bug else protocol_part + full_part):
            labels += lab
            scores += sim
        tp_scores = [s for s, t in zip(scores, labels) if t]
        out["stats"]["tied_tp"] += sum(scores.count(s) > 1 for s in tp_scores)
        if n_tp == 0 or not scores:
            ap, top = 0.0, {1: 0, 5: 0, 10: 0}
        else:
            ap = average_precision_score(labels, scores) * n_tp / n_gt
            order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable
            top = {k: int(any(labels[i] for i in order[:k])) for k in (1, 5, 10)}
        out["ap"].append(ap)
        out["n_gt"].append(n_gt)
        out["n_tp"].append(n_tp)
        out["top"].append(top)
    valid = [i for i, n in enumerate(out["n_gt"]) if n > 0]
    out["mAP"] = float(np.mean([out["ap"][i] for i in valid]))
    for k in (1, 5, 10):
        out[f"top{k}"] = float(np.mean([out["top"][i][k] for i in valid]))
    return out


# ---------------------------------------------------------------------------- test problems

def quantised_unit(rng, n):
    """Rows with four entries of +-0.5: exactly unit-norm, and every dot product (a multiple of 0.25)
    is exact in float32 whatever the summation order, so ties are real ties."""
    out = np.zeros((n, D), np.float32)
    for i in range(n):
        out[i, rng.choice(D, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return out


def random_box(rng, small):
    x, y = rng.integers(0, 300, 2)
    w, h = (rng.integers(4, 15), rng.integers(10, 30)) if small else (rng.integers(20, 80), rng.integers(50, 200))
    return np.array([x, y, x + w, y + h], np.float32)


def dataset_from_lists(scenes, queries, lists_by_size, name="toy"):
    """A SearchDataset whose protocol lists exactly the given (image, gt box or None) entries, duplicates
    included (the evaluator must count them once)."""
    def builder(ds, size):
        names = tuple(s.name for s in ds.gallery)
        index = {n: i for i, n in enumerate(names)}
        lists = lists_by_size[size]
        return SearchProtocol(
            name=f"{name} G{size}", scene_names=names,
            galleries=tuple(np.array([index[n] for n, _ in e], np.int32) for e in lists),
            positive_scenes=tuple(np.array([index[n] for n, gt in e if gt is not None], np.int32) for e in lists),
            positive_boxes=tuple(np.array([gt for _, gt in e if gt is not None], np.float32).reshape(-1, 4)
                                 for e in lists))
    return SearchDataset(name=name, root="/nowhere", train=[], gallery=scenes, queries=queries,
                         gallery_sizes=tuple(lists_by_size), protocol_builder=builder)


def full_set_lists(lists, query_scenes, test_images):
    """The -1 protocol: the listed entries, then every other test image except the query's own."""
    out = []
    for entries, q_scene in zip(lists, query_scenes):
        listed = {n for n, _ in entries} | {q_scene}
        out.append(list(entries) + [(n, None) for n in test_images if n not in listed])
    return out


def random_problem(seed, gaussian=False, n_scenes=40, n_people=14, gallery=12):
    rng = np.random.default_rng(seed)
    names = [f"s{i:03d}.jpg" for i in range(n_scenes)]
    content = {n: [] for n in names}  # scene -> [(pid, box)]
    proto = rng.standard_normal((n_people, D)).astype(np.float32) if gaussian else quantised_unit(rng, n_people)
    appears = {}
    for p in range(n_people):
        small = rng.random() < 0.35
        where = rng.choice(n_scenes, rng.integers(1, 5), replace=False)
        appears[p] = [names[i] for i in where]
        for n in appears[p]:
            content[n].append((p, random_box(rng, small and rng.random() < 0.8)))
    for n in names:
        for _ in range(rng.integers(0, 3)):
            content[n].append((UNLABELED, random_box(rng, rng.random() < 0.3)))
    scenes = [make_scene(f"/nowhere/{n}", [b for _, b in content[n]], [p for p, _ in content[n]]) for n in names]

    def embedding(like=None):
        if gaussian:
            e = rng.standard_normal(D).astype(np.float32)
            return e if like is None else (like + 0.5 * e).astype(np.float32)
        return proto[like] if like is not None else quantised_unit(rng, 1)[0]

    detections = {}
    for i, n in enumerate(names):
        u = 0.0 if i == n_scenes - 1 else 0.1 if i == n_scenes - 2 else rng.random()
        if u < 0.08:
            continue  # no entry at all
        if u < 0.15:
            detections[n] = (np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros((0, D), np.float32))
            continue
        boxes, embs = [], []
        for pid, box in content[n]:
            if rng.random() < 0.85:
                jitter = rng.integers(-4, 5, 4).astype(np.float32)
                boxes.append(box + jitter if (box[2:] - box[:2] + jitter[2:] - jitter[:2] > 0).all() else box)
                like = pid if pid != UNLABELED and rng.random() < 0.6 else None
                embs.append(proto[like] if (like is not None and not gaussian) else embedding(
                    None if like is None else proto[like]))
        for _ in range(rng.integers(0, 4)):
            boxes.append(random_box(rng, rng.random() < 0.3))
            embs.append(embedding())
        if boxes and rng.random() < 0.3:  # an exact duplicate detection: a tie
            boxes.append(boxes[0].copy())
            embs.append(embs[0].copy())
        if rng.random() < 0.2:  # a zero-area box, never a match
            b = random_box(rng, False)
            b[2] = b[0]
            boxes.append(b)
            embs.append(embedding())
        if not boxes:
            boxes, embs = [random_box(rng, False)], [embedding()]
        emb = np.array(embs, np.float32)
        emb[rng.random(len(emb)) < 0.2] *= 2.0  # not unit-norm; exactly 2x, so normalising is exact
        scores = rng.choice(np.array([0.3, 0.5, 0.7, 0.9, 1.0], np.float32), len(boxes))
        detections[n] = (np.array(boxes, np.float32), scores, emb)

    queries, q_emb, lists, q_scenes = [], [], [], []
    for p in range(n_people):
        q_scene = appears[p][0]
        box = next(b for pid, b in content[q_scene] if pid == p)
        queries.append(SearchQuery(scene=q_scene, box=box, pid=p, camid=-1, index=len(queries)))
        q_emb.append(embedding(p if not gaussian else proto[p]) if rng.random() < 0.8 else embedding())
        q_scenes.append(q_scene)
        positives = [(n, next(b for pid, b in content[n] if pid == p)) for n in appears[p][1:]
                     if rng.random() < 0.85]
        others = [n for n in names if n not in appears[p]]
        entries = positives + [(n, None) for n in rng.choice(others, gallery - len(positives), replace=False)]
        entries = [entries[i] for i in rng.permutation(len(entries))]
        if rng.random() < 0.3:  # a gallery entry listed twice
            entries.insert(int(rng.integers(1, len(entries) + 1)), entries[int(rng.integers(len(entries)))])
        lists.append(entries)
    lists_by_size = {100: lists, -1: full_set_lists(lists, q_scenes, names)}
    dataset = dataset_from_lists(scenes, queries, lists_by_size)
    return dataset, detections, np.array(q_emb, np.float32), lists, q_scenes, names


# ---------------------------------------------------------------------------- against the reference

@pytest.mark.parametrize("seed,gaussian,matrix_share", [(0, False, None), (1, False, None), (2, False, 0.0),
                                                       (3, False, 1.0), (4, True, 0.0), (5, True, 1.0)])
def test_matches_literal_reference(seed, gaussian, matrix_share, monkeypatch):
    """matrix_share 0.0 / 1.0: every gallery size through the matrix product / the per-query product."""
    if matrix_share is not None:
        monkeypatch.setattr(search, "MATRIX_SHARE", matrix_share)
    dataset, dets, q_emb, lists, q_scenes, names = random_problem(seed, gaussian)
    stats_total = {"tied_tp": 0, "small_tp": 0, "dup": 0}
    for size, full in ((100, False), (-1, True)):
        ref = reference_search(dets, q_emb, lists, q_scenes, names, full_set=full)
        ours = evaluate_search(dets, q_emb, dataset, gallery_size=size)
        valid = np.array(ref["n_gt"]) > 0
        np.testing.assert_array_equal(ours["per_query"]["n_gt"], ref["n_gt"])
        np.testing.assert_array_equal(ours["per_query"]["n_tp"], ref["n_tp"])
        np.testing.assert_array_equal(ours["per_query"]["valid"], valid)
        np.testing.assert_allclose(np.array(ours["per_query_ap"])[valid], np.array(ref["ap"])[valid],
                                   rtol=0, atol=1e-12)
        assert np.isnan(np.array(ours["per_query_ap"])[~valid]).all()
        for key in ("mAP", "top1", "top5", "top10"):
            assert ours[key] == pytest.approx(ref[key], abs=1e-12), key
        assert ours["num_valid_queries"] == valid.sum()
        assert ours["num_invalid_queries"] == (~valid).sum()
        assert ours["duplicates"] == ref["stats"]["dup"]
        assert ours["gallery_size"] == size and ours["protocol"] == f"toy G{size}"
        for key in stats_total:
            stats_total[key] += ref["stats"][key]
    # the problem really holds what the test is about
    assert stats_total["dup"] > 0 and stats_total["small_tp"] > 0
    if not gaussian:
        assert stats_total["tied_tp"] > 0
    assert any(n not in dets for n in names)
    assert any(n in dets and len(dets[n][1]) == 0 for n in names)
    assert 0 < ours["mAP"] < 1


def test_full_set_marks_protocol_images_before_adding_the_rest():
    """docs/protocols.md (d), the size -1 bug: SeqNet's order adds the true match's image a second time as
    negatives (AP 0.20); marking the protocol images first gives 1/3."""
    q_scene, a, b = "q.jpg", "a.jpg", "b.jpg"
    gt = np.array([100, 50, 140, 150], np.float32)
    scenes = [make_scene(f"/x/{q_scene}", [[10, 10, 50, 110]], [0]),
              make_scene(f"/x/{a}", [gt, [300, 40, 340, 140]], [0, UNLABELED]),
              make_scene(f"/x/{b}", [[20, 20, 60, 120]], [UNLABELED])]
    q = np.array([1.0, 0.0], np.float32)
    unit = lambda c: [c, np.sqrt(1 - c * c)]  # noqa: E731  (similarity c with q)
    dets = {a: (np.array([[300, 40, 340, 140], gt]), np.array([0.9, 0.95]), np.array([unit(0.9), unit(0.7)])),
            b: (np.array([[20, 20, 60, 120]]), np.array([0.8]), np.array([unit(0.8)]))}
    lists = [[(a, gt)]]
    names = [q_scene, a, b]
    dataset = dataset_from_lists(scenes, [SearchQuery(q_scene, scenes[0].boxes[0], 0)],
                                 {-1: full_set_lists(lists, [q_scene], names)})
    seqnet = reference_search(dets, q[None], lists, [q_scene], names, full_set=True, seqnet_full_set_bug=True)
    right = reference_search(dets, q[None], lists, [q_scene], names, full_set=True)
    assert seqnet["mAP"] == pytest.approx(0.20)
    assert right["mAP"] == pytest.approx(1 / 3)
    ours = evaluate_search(dets, q[None], dataset, gallery_size=-1, keep_top=5)
    assert ours["mAP"] == pytest.approx(1 / 3, abs=1e-7)
    assert ours["per_query"]["first_hit_rank"][0] == 3
    assert (ours["top1"], ours["top5"]) == (0.0, 1.0)
    ranked = ours["top_matches"][0]
    assert [m[0] for m in ranked] == [a, b, a] and [m[3] for m in ranked] == [False, False, True]
    np.testing.assert_array_equal(ranked[2][1], gt)
    assert [m[2] for m in ranked] == pytest.approx([0.9, 0.8, 0.7], abs=1e-6)


def test_hand_computed_ap_small_box_threshold_and_missed_person():
    """One query, three positive scenes: one matched at rank 3 by a small box under the size-adaptive
    IoU (w=10, h=25: 0.357), one whose box is found only at IoU 0.4 of a big box (no match), one
    without detections (still counted in n_gt): AP = precision 1/3 x recall 1/3 = 1/9, top-1 0, top-5 1."""
    small = np.array([0, 0, 10, 25], np.float32)
    big = np.array([0, 0, 100, 100], np.float32)
    assert iou_threshold(10, 25) == pytest.approx(250 / 700)
    det_small = np.array([0, 0, 10, 10], np.float32)  # IoU 100/250 = 0.4 with `small`
    det_big = np.array([0, 0, 100, 40], np.float32)  # IoU 0.4 with `big`: below 0.5
    names = ["q.jpg", "p1.jpg", "p2.jpg", "p3.jpg", "n.jpg"]
    scenes = [make_scene(f"/x/{n}", [[0, 0, 50, 120]], [0]) for n in names]
    e = np.eye(4, dtype=np.float32)
    q = e[0]
    dets = {"p1.jpg": (det_small[None], [0.9], [0.6 * e[0] + 0.8 * e[1]]),
            "p2.jpg": (det_big[None], [0.9], [e[0]]),
            "n.jpg": (np.array([[5, 5, 50, 50]], np.float32), [0.99], [0.8 * e[0] + 0.6 * e[2]])}
    lists = {100: [[("p1.jpg", small), ("p2.jpg", big), ("p3.jpg", big), ("n.jpg", None)]]}
    dataset = dataset_from_lists(scenes, [SearchQuery("q.jpg", scenes[0].boxes[0], 0)], lists)
    r = evaluate_search(dets, q[None], dataset)
    assert r["per_query"]["n_gt"][0] == 3 and r["per_query"]["n_tp"][0] == 1
    # ranked: p2 det (1.0, not a match), n det (0.8), p1 det (0.6, match) -> precision 1/3 at recall 1/3
    assert r["mAP"] == pytest.approx(1 / 3 * 1 / 3)
    assert r["per_query"]["first_hit_rank"][0] == 3
    assert (r["top1"], r["top5"], r["top10"]) == (0.0, 1.0, 1.0)
    assert any("2 of the protocol's 5 scene(s) have no entry in detections" in w for w in r["warnings"])


def test_fewer_than_ten_detections_does_not_crash():
    """The published code lists each query's top 10 and crashes below 10 detections; ours reports."""
    dataset, dets, q_emb, lists, q_scenes, names = random_problem(7)
    kept = 0
    few = {}
    for n, (b, s, e) in dets.items():
        keep = np.zeros(len(s), bool)
        if kept < 3 and len(s):
            keep[0], kept = True, kept + 1
        few[n] = (b, np.where(keep, 0.9, 0.1).astype(np.float32), e)
    r = evaluate_search(few, q_emb, dataset, keep_top=10)
    ref = reference_search(few, q_emb, lists, q_scenes, names, full_set=False)
    assert r["mAP"] == pytest.approx(ref["mAP"], abs=1e-12)
    assert any("only 3 detection(s) score >= 0.5" in w and "fewer than 10" in w for w in r["warnings"])
    assert all(len(m) <= 3 for m in r["top_matches"])
    assert max(len(m) for m in r["top_matches"]) >= 1
    # no detection at all (an untrained detector): AP 0 and top-k 0 for every query, no crash
    none = evaluate_search({}, q_emb, dataset, keep_top=5)
    assert (none["mAP"], none["top1"], none["top10"]) == (0.0, 0.0, 0.0)
    assert none["top_matches"] == [[]] * len(q_emb) and not none["per_query"]["n_scores"].any()
    assert any("only 0 detection(s) score >= 0.5" in w for w in none["warnings"])


def test_top_matches_follow_the_stable_rank_and_marks():
    dataset, dets, q_emb, lists, q_scenes, names = random_problem(2)
    r = evaluate_search(dets, q_emb, dataset, keep_top=4)
    for q, matches in enumerate(r["top_matches"]):
        sims = [m[2] for m in matches]
        assert sims == sorted(sims, reverse=True)
        assert len(matches) == min(4, r["per_query"]["n_scores"][q])
        first = r["per_query"]["first_hit_rank"][q]
        hit_at = [i + 1 for i, m in enumerate(matches) if m[3]]
        assert (hit_at[0] if hit_at else -1) == (first if 0 < first <= 4 else -1)
        for scene, box, sim, _ in matches:
            assert box.dtype == np.float32 and box.shape == (4,)
            b, s, e = dets[scene]
            row = np.flatnonzero((b == box).all(1) & (s >= 0.5))
            e_unit = e[row] / np.linalg.norm(e[row], axis=1, keepdims=True)
            qn = q_emb[q] / np.linalg.norm(q_emb[q])
            assert np.isclose(e_unit @ qn, sim, atol=1e-6).any()
    assert "top_matches" not in evaluate_search(dets, q_emb, dataset)


def test_chunks_and_similarity_paths_do_not_change_anything(monkeypatch):
    dataset, dets, q_emb, *_ = random_problem(3, n_people=300, n_scenes=60)
    whole = evaluate_search(dets, q_emb, dataset, gallery_size=-1)
    tiny = evaluate_search(dets, q_emb, dataset, gallery_size=-1, memory_budget_mb=0.01)  # 256-query chunks
    monkeypatch.setattr(search, "MATRIX_SHARE", 1.0)
    per_query = evaluate_search(dets, q_emb, dataset, gallery_size=-1)
    monkeypatch.setattr(search, "SCENES_PER_CHUNK", 100)  # chunks of one or two queries
    monkeypatch.setattr(search, "POSITION_CELLS", 3 * 60)  # and at most three
    small_chunks = evaluate_search(dets, q_emb, dataset, gallery_size=-1)
    for key in ("ap", "n_gt", "n_tp", "first_hit_rank", "n_scores"):
        np.testing.assert_array_equal(whole["per_query"][key], tiny["per_query"][key])
        np.testing.assert_array_equal(whole["per_query"][key], per_query["per_query"][key])
        np.testing.assert_array_equal(whole["per_query"][key], small_chunks["per_query"][key])
    assert whole["duplicates"] == small_chunks["duplicates"] > 0
    assert search._chunk_queries(sum(len(s) for _, s, _ in dets.values()), 0.01) == search.TILE < len(q_emb)


def test_normalising_embeddings_is_reported_and_exact():
    dataset, dets, q_emb, *_ = random_problem(1)
    unit = {n: (b, s, e / np.linalg.norm(e, axis=1, keepdims=True) if len(e) else e) for n, (b, s, e) in dets.items()}
    a = evaluate_search(unit, q_emb, dataset)
    b = evaluate_search(dets, 3.0 * q_emb, dataset)
    assert a["per_query_ap"] == pytest.approx(b["per_query_ap"], nan_ok=True)
    scaled = sum(int(np.sum(np.abs(np.linalg.norm(e[s >= 0.5], axis=1) - 1) > 1e-3)) for _, s, e in dets.values())
    assert scaled > 0
    assert f"normalised {scaled} detection embedding(s) that were not unit-norm" in " ".join(b["warnings"])
    assert f"normalised {len(q_emb)} query embedding(s)" in " ".join(b["warnings"])
    assert not any("normalised" in w for w in a["warnings"])


# ---------------------------------------------------------------------------- bad input

def small_case():
    names = ["q.jpg", "a.jpg", "b.jpg"]
    scenes = [make_scene(f"/x/{n}", [[0, 0, 20, 50]], [0]) for n in names]
    lists = {100: [[("a.jpg", np.array([0, 0, 20, 50], np.float32)), ("b.jpg", None)]]}
    dataset = dataset_from_lists(scenes, [SearchQuery("q.jpg", scenes[0].boxes[0], 0)], lists)
    e = np.eye(3, dtype=np.float32)
    dets = {"a.jpg": (np.array([[0, 0, 20, 50], [1, 1, 21, 51]], np.float32), np.array([0.9, 0.8]), e[:2]),
            "b.jpg": (np.array([[0, 0, 20, 50]], np.float32), np.array([0.9]), e[2:])}
    return dataset, dets, e[:1]


def with_entry(dets, name, value):
    out = dict(dets)
    out[name] = value
    return out


@pytest.mark.parametrize("mutate,message", [
    (lambda d, q: (with_entry(d, "a.jpg", (d["a.jpg"][0], d["a.jpg"][1], np.array([[np.nan, 0, 0], [0, 1, 0]]))), q),
     "detections['a.jpg']: embeddings contain NaN or inf (row 0)"),
    (lambda d, q: (with_entry(d, "a.jpg", (d["a.jpg"][0], d["a.jpg"][1][:1], d["a.jpg"][2])), q),
     "detections['a.jpg']: shapes disagree (boxes (2, 4), scores (1,), embeddings (2, 3)); need boxes [N, 4], "
     "scores [N] and embeddings [N, D] with the same N"),
    (lambda d, q: (with_entry(d, "b.jpg", (d["b.jpg"][0], d["b.jpg"][1], np.ones((1, 5)))), q),
     "detections['b.jpg']: embeddings have dimension 5, but detections['a.jpg'] has 3"),
    (lambda d, q: (d, np.ones((2, 3))),
     "query_embeddings has shape (2, 3), expected [1, 3] (one row per query of dataset.queries, in its order, "
     "D = 3 as the detections' embeddings)"),
    (lambda d, q: (d, np.ones((1, 4))), "query_embeddings has shape (1, 4), expected [1, 3]"),
    (lambda d, q: (d, np.ones(3)), "query_embeddings has shape (3,), expected [1, 3]"),
    (lambda d, q: (d, np.array([[np.inf, 0, 0]])), "query_embeddings row 0 (the query in 'q.jpg') contains NaN or inf"),
    (lambda d, q: (d, np.zeros((1, 3))), "query_embeddings row 0 (the query in 'q.jpg') is all zeros"),
    (lambda d, q: (with_entry(d, "a.jpg", (d["a.jpg"][0], d["a.jpg"][1], np.zeros((2, 3)))), q),
     "detections['a.jpg']: a detection scoring at least the threshold has an all-zero embedding: it cannot be "
     "L2-normalised"),
    (lambda d, q: (with_entry(d, "a.jpg", (d["a.jpg"][0][:, :3], d["a.jpg"][1], d["a.jpg"][2])), q),
     "detections['a.jpg']: shapes disagree (boxes (2, 3)"),
    (lambda d, q: (with_entry(d, "a.jpg", (np.array([[0, 0, np.nan, 5], [0, 0, 1, 1]]), d["a.jpg"][1],
                                          d["a.jpg"][2])), q), "detections['a.jpg']: boxes contain NaN or inf (row 0)"),
    (lambda d, q: (with_entry(d, "a.jpg", (d["a.jpg"][0], np.array([0.9, np.nan]), d["a.jpg"][2])), q),
     "detections['a.jpg']: scores contain NaN or inf (row 1)"),
    (lambda d, q: (with_entry(d, "a.jpg", (d["a.jpg"][0], d["a.jpg"][1])), q),
     "detections['a.jpg'] must be (boxes [N, 4], scores [N], embeddings [N, D]), got a 2-tuple"),
    (lambda d, q: ({"/data/a.jpg": d["a.jpg"]}, q),
     "none of the 1 image name(s) in detections is a test scene of toy (got '/data/a.jpg'; expected file names "
     "such as 'q.jpg', 'a.jpg')"),
    (lambda d, q: ([d["a.jpg"]], q),
     "detections must be a dict image file name -> (boxes, scores, embeddings), got list"),
])
def test_bad_input_messages(mutate, message):
    dataset, dets, q = small_case()
    dets, q = mutate(dets, q)
    with pytest.raises(ValueError) as err:
        evaluate_search(dets, q, dataset)
    assert message in str(err.value)


@pytest.mark.parametrize("kwargs,message", [
    ({"score_threshold": float("nan")}, "score_threshold must be a finite number, got nan"),
    ({"keep_top": -1}, "keep_top must be an integer >= 0, got -1"),
    ({"gallery_size": 50}, "gallery_size=50 is not a gallery of toy; accepted: 100"),
    ({"memory_budget_mb": 0}, "memory_budget_mb must be positive, got 0"),
])
def test_bad_arguments(kwargs, message):
    dataset, dets, q = small_case()
    with pytest.raises(ValueError, match=None) as err:
        evaluate_search(dets, q, dataset, **kwargs)
    assert message in str(err.value)


def test_counted_input_problems():
    dataset, dets, q = small_case()
    e = np.eye(3, dtype=np.float32)
    dets["a.jpg"] = (np.array([[0, 0, 20, 50], [5, 5, 5, 30], [-3, 0, 20, 50]], np.float32),
                     np.array([0.4, 0.95, 0.9]), np.array([e[0], e[0], e[1]]))  # zero-area box, most similar
    dets["b.jpg"] = (np.zeros((0, 4)), np.zeros(0), np.zeros((0, 3)))
    dets["elsewhere.jpg"] = dets["a.jpg"]
    r = evaluate_search(dets, q, dataset)
    text = "\n".join(r["warnings"])
    assert "1 detection box(es) have no area (x2 <= x1 or y2 <= y1) and can never match" in text
    assert "1 detection box(es) reach left of or above the image (negative coordinates)" in text
    assert "1 image(s) have an empty detection list (e.g. 'b.jpg')" in text
    assert "ignored the detections of 1 image name(s) that are not test scenes of toy (e.g. 'elsewhere.jpg')" in text
    assert "1 of the protocol's 3 scene(s) have no entry in detections" in text  # q.jpg
    # the zero-area box (similarity 1) is not a match; the box at [-3, 0, 20, 50] (IoU 0.87) is, at rank 2
    assert r["per_query"]["n_tp"][0] == 1 and r["per_query"]["first_hit_rank"][0] == 2
    assert r["mAP"] == pytest.approx(0.5)
    sized = evaluate_search(dets, q, dataset, image_sizes={"a.jpg": (40, 100)})
    assert "2 detection box(es) reach outside the image" in "\n".join(sized["warnings"])


def test_invalid_queries_are_counted_and_all_invalid_is_an_error():
    dataset, dets, q = small_case()
    lists = {100: [[("a.jpg", np.array([0, 0, 20, 50], np.float32))], [("b.jpg", None)]]}
    two = dataset_from_lists(dataset.gallery, [dataset.queries[0], dataset.queries[0]._replace(index=1)], lists)
    r = evaluate_search(dets, np.repeat(q, 2, axis=0), two)
    assert (r["num_valid_queries"], r["num_invalid_queries"]) == (1, 1)
    assert r["per_query"]["valid"].tolist() == [True, False]
    assert r["mAP"] == pytest.approx(1.0) and np.isnan(r["per_query_ap"][1])
    assert any("1 query(ies) have no ground truth in their gallery" in w for w in r["warnings"])
    none = dataset_from_lists(dataset.gallery, dataset.queries, {100: [[("b.jpg", None)]]})
    with pytest.raises(ValueError, match=r"no valid query: none of the 1 queries of toy G100 has its person"):
        evaluate_search(dets, q, none)


# ---------------------------------------------------------------------------- ground-truth boxes mode

def test_ground_truth_detections_mode():
    dataset, dets, q_emb, lists, q_scenes, names = random_problem(5)
    rng = np.random.default_rng(0)
    emb = {s.name: quantised_unit(rng, len(s.boxes)) for s in dataset.gallery}
    gt = ground_truth_detections(dataset, emb)
    assert set(gt) == set(names)
    for s in dataset.gallery:
        b, sc, e = gt[s.name]
        np.testing.assert_array_equal(b, s.boxes)
        np.testing.assert_array_equal(sc, np.ones(len(s.boxes)))
        assert e is emb[s.name] or np.array_equal(e, emb[s.name])
    r = evaluate_search(gt, q_emb, dataset)
    ref = reference_search(gt, q_emb, lists, q_scenes, names, full_set=False)
    assert r["mAP"] == pytest.approx(ref["mAP"], abs=1e-12)
    # with perfect boxes every positive is found: n_tp == n_gt
    np.testing.assert_array_equal(r["per_query"]["n_tp"], r["per_query"]["n_gt"])
    bad = dict(emb)
    bad[names[0]] = np.zeros((len(dataset.gallery[0].boxes) + 1, D))
    with pytest.raises(ValueError, match=rf"embeddings\['{names[0]}'\] has shape \(\d+, {D}\), expected \[\d+, {D}\]"):
        ground_truth_detections(dataset, bad)
    del bad[names[0]]
    with pytest.raises(ValueError, match=r"embeddings has no entry for 1 gallery scene\(s\) with annotated boxes"):
        ground_truth_detections(dataset, bad)


def test_protocol_errors_name_the_protocol_and_query():
    dataset, dets, q = small_case()
    box = np.array([0, 0, 20, 50], np.float32)

    def protocol_of(galleries, positive_scenes, positive_boxes):
        ds = SearchDataset(name="toy", root="/nowhere", train=[], gallery=dataset.gallery, queries=dataset.queries,
                           gallery_sizes=(100,), protocol_builder=lambda d, size: SearchProtocol(
                               "toy G100", tuple(s.name for s in d.gallery), galleries, positive_scenes,
                               positive_boxes))
        with pytest.raises(ValueError) as err:
            evaluate_search(dets, q, ds)
        return str(err.value)

    assert protocol_of(([1, 3],), ([1],), (box[None],)) == \
        "toy G100: the gallery of query 0 refers to scene index 3, outside 0..2"
    assert protocol_of(([2],), ([1],), (box[None],)) == \
        "toy G100: positive scene 'a.jpg' of query 0 is not in its gallery"
    assert protocol_of(([1, 2],), ([1],), (np.zeros((2, 4)),)) == \
        "toy G100: query 0 has 1 positive scene(s) but 2 positive box(es)"
    assert protocol_of(([1, 2],), ([1],), (np.array([[5, 5, 5, 30]]),)) == \
        "toy G100: the box [5.0, 5.0, 5.0, 30.0] of query 0's person in 'a.jpg' has no area (need x2 > x1 and y2 > y1)"
