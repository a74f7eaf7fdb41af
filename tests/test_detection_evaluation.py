"""evaluate_detection (docs/protocols.md (e)) against literal per-image references written here:
mutual-best matching as the OIM release / SeqNet loop it (sklearn AP x recall), VOC greedy matching
with the VOC all-point AP; identity 0 counts as labeled; box_iou by hand; bad input."""
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from reid_keras.data.datasets.scenes import UNLABELED, SearchDataset, make_scene
from reid_keras.metrics.detection import box_iou, evaluate_detection


def ref_iou(a, b):
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def kept(dets, name, threshold):
    if name not in dets:
        return []
    boxes, scores = dets[name][0], dets[name][1]
    return [([float(v) for v in boxes[j]], float(scores[j])) for j in range(len(scores)) if scores[j] >= threshold]


def ref_mutual_best(gallery, dets, threshold, labeled_only=False):
    """Per image: IoU matrix, pairs >= 0.5, keep each detection's best box and each box's best detection
    (np.argmax: ties to the lower index); returns (recall, AP = sklearn AP x recall)."""
    y_true, y_score, count_gt, count_tp = [], [], 0, 0
    for scene in gallery:
        gt = [[float(v) for v in b] for b, p in zip(scene.boxes, scene.pids) if not labeled_only or p != UNLABELED]
        det = kept(dets, scene.name, threshold)
        count_gt += len(gt)
        if not det:
            continue
        if not gt:
            y_true += [False] * len(det)
            y_score += [s for _, s in det]
            continue
        ious = np.array([[ref_iou(g, d) for d, _ in det] for g in gt])
        tfmat = ious >= 0.5
        for j in range(len(det)):
            best = int(np.argmax(ious[:, j]))
            for i in range(len(gt)):
                if i != best:
                    tfmat[i, j] = False
        for i in range(len(gt)):
            best = int(np.argmax(ious[i, :]))
            for j in range(len(det)):
                if j != best:
                    tfmat[i, j] = False
        for j, (_, s) in enumerate(det):
            y_score.append(s)
            y_true.append(bool(tfmat[:, j].any()))
        count_tp += int(tfmat.sum())
    recall = count_tp / count_gt
    ap = average_precision_score(y_true, y_score) * recall if count_tp else 0.0
    return recall, ap


def ref_voc(gallery, dets, threshold, labeled_only=False):
    """All detections by descending score (ties in gallery, then detection, order); each takes its
    highest-IoU box if IoU >= 0.5 and the box is free, else it is a false positive; VOC all-point AP."""
    gts = {s.name: [[float(v) for v in b] for b, p in zip(s.boxes, s.pids) if not labeled_only or p != UNLABELED]
           for s in gallery}
    all_dets = [(s.name, box, score) for s in gallery for box, score in kept(dets, s.name, threshold)]
    order = sorted(range(len(all_dets)), key=lambda i: -all_dets[i][2])
    taken, tp = set(), []
    for i in order:
        name, box, _ = all_dets[i]
        ious = [ref_iou(box, g) for g in gts[name]]
        if ious and max(ious) >= 0.5 and (name, int(np.argmax(ious))) not in taken:
            taken.add((name, int(np.argmax(ious))))
            tp.append(1)
        else:
            tp.append(0)
    npos = sum(len(g) for g in gts.values())
    ctp = np.cumsum(tp)
    rec = ctp / npos
    prec = ctp / np.arange(1, len(tp) + 1)
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    for i in range(len(mpre) - 1, 0, -1):
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return len(taken) / npos, float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def dataset_of(scenes):
    return SearchDataset(name="toy", root="/nowhere", train=[], gallery=scenes, queries=[])


def random_problem(seed, n_scenes=30):
    """Scenes with 0-7 boxes (identity 0 among them, unlabeled people, overlapping and identical boxes),
    detections that jitter the boxes (IoU near 0.5), exact duplicates (IoU ties, conflicts), false
    positives, scores on a coarse grid (ties) from 0.0 to 1.0, an image missing from the detections
    and one with an empty list."""
    rng = np.random.default_rng(seed)
    scenes, dets = [], {}
    for i in range(n_scenes):
        n = int(rng.integers(0, 7)) if 0 < i < n_scenes - 1 else 3
        xy = rng.integers(0, 400, (n, 2))
        wh = rng.integers(10, 120, (n, 2))
        boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        if n and rng.random() < 0.5:  # crowded: a person overlapping another (IoU > 0.5), or on the same box
            near = boxes[0] + (rng.integers(-6, 7, 4) if rng.random() < 0.6 else 0)
            boxes = np.concatenate([boxes, near[None]]).astype(np.float32)
            n += 1
        pids = rng.choice([UNLABELED, 0, 1, 2, 3], n) if i else np.array([0, 0, UNLABELED, 1][:n])
        name = f"f{i:03d}.jpg"
        scenes.append(make_scene(f"/nowhere/{name}", boxes, pids))
        if i == n_scenes - 1:
            continue  # no entry: every box a miss
        det = []
        for b in boxes:
            for _ in range(int(rng.integers(0, 3))):
                det.append(b + rng.integers(-12, 13, 4))
            if rng.random() < 0.2:
                det.append(b.copy())
                det.append(b.copy())
        for _ in range(int(rng.integers(0, 3))):
            det.append(np.concatenate([(xy := rng.integers(0, 400, 2)), xy + rng.integers(10, 120, 2)]))
        det = [d for d in det if d[2] > d[0] and d[3] > d[1]]
        if i == n_scenes - 2:
            det = []
        scores = np.round(rng.random(len(det)) * 10) / 10
        dets[name] = (np.array(det, np.float32).reshape(-1, 4), scores.astype(np.float32),
                      rng.standard_normal((len(det), 4)).astype(np.float32))
    return dataset_of(scenes), dets


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_mutual_best_matches_literal_reference(seed):
    dataset, dets = random_problem(seed)
    r = evaluate_detection(dets, dataset)
    recall, _ = ref_mutual_best(dataset.gallery, dets, 0.5)
    recall_labeled, _ = ref_mutual_best(dataset.gallery, dets, 0.5, labeled_only=True)
    _, ap = ref_mutual_best(dataset.gallery, dets, 0.01)
    assert r["recall"] == pytest.approx(recall, abs=1e-12)
    assert r["recall_labeled"] == pytest.approx(recall_labeled, abs=1e-12)
    assert r["ap"] == pytest.approx(ap, abs=1e-12)
    assert r["matching"] == "mutual_best" and (r["score_threshold"], r["ap_score_threshold"]) == (0.5, 0.01)
    assert r["num_boxes"] == sum(len(s.boxes) for s in dataset.gallery)
    assert r["num_labeled_boxes"] == sum(int(np.sum(s.pids != UNLABELED)) for s in dataset.gallery)
    precision, rec = r["recalls"]
    assert precision.shape == rec.shape and np.all(np.diff(rec) >= 0)
    assert np.sum(np.diff(np.concatenate([[0], rec])) * precision) == pytest.approx(r["ap"])
    assert 0 < r["recall"] < 1 and 0 < r["ap"] < 1
    assert any("1 gallery scene(s) have no entry in detections" in w and "count as missed" in w
               for w in r["warnings"])
    n_empty = sum(len(v[1]) == 0 for v in dets.values())
    assert n_empty >= 1 and any(f"{n_empty} image(s) have an empty detection list" in w for w in r["warnings"])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_voc_greedy_matches_literal_reference(seed):
    dataset, dets = random_problem(seed)
    r = evaluate_detection(dets, dataset, matching="voc")
    recall, _ = ref_voc(dataset.gallery, dets, 0.5)
    recall_labeled, _ = ref_voc(dataset.gallery, dets, 0.5, labeled_only=True)
    _, ap = ref_voc(dataset.gallery, dets, 0.01)
    assert r["recall"] == pytest.approx(recall, abs=1e-12)
    assert r["recall_labeled"] == pytest.approx(recall_labeled, abs=1e-12)
    assert r["ap"] == pytest.approx(ap, abs=1e-12)
    assert r["matching"] == "voc"


def test_mutual_best_and_greedy_settle_a_conflict_differently():
    """Two detections of one box: A (score 0.9, IoU 0.6), B (score 0.8, IoU 0.9). Mutual best keeps
    the box's best detection B; greedy gives the box to A, the higher score."""
    box = np.array([[0, 0, 100, 100]], np.float32)
    a = [0, 0, 100, 60]  # IoU 0.6
    b = [0, 0, 100, 90]  # IoU 0.9
    dataset = dataset_of([make_scene("/x/f.jpg", box, [0])])
    dets = {"f.jpg": (np.array([a, b], np.float32), np.array([0.9, 0.8], np.float32), np.zeros((2, 1)))}
    mutual = evaluate_detection(dets, dataset)
    voc = evaluate_detection(dets, dataset, matching="voc")
    assert mutual["recall"] == voc["recall"] == 1.0
    assert mutual["ap"] == pytest.approx(0.5)  # precision 1/2 at the one recall step (after B, 2nd)
    assert voc["ap"] == pytest.approx(1.0)  # A first, a true positive
    assert mutual["precision"] == voc["precision"] == 0.5
    np.testing.assert_allclose(mutual["recalls"][0], [0.0, 0.5])
    np.testing.assert_allclose(mutual["recalls"][1], [0.0, 1.0])


@pytest.mark.parametrize("g2,d,expected_voc", [
    # d's best box is g1 (0.9 > 0.85) but g1's best detection is d2 (0.98): d matches nothing, although it
    # is g2's best detection; greedy lets d (higher score) take g1, then d2 finds g1 taken
    ([15, 110], [10, 100], 0.5),
    # d has the same IoU 90/110 with g1 and g2: its best is the lower box, g1, which is d2's; d matches
    # nothing; greedy: d takes g1 (lower index on the tie), d2 finds g1 taken
    ([20, 120], [10, 110], 0.5),
])
def test_mutual_best_keeps_only_mutual_pairs(g2, d, expected_voc):
    col = lambda y: [0, y[0], 50, y[1]]  # noqa: E731  (boxes that differ only in y)
    boxes = np.array([col([0, 100]), col(g2)], np.float32)
    dataset = dataset_of([make_scene("/x/f.jpg", boxes, [1, 2])])
    dets = {"f.jpg": (np.array([col(d), col([0, 98])], np.float32), np.array([0.9, 0.8], np.float32))}
    r = evaluate_detection(dets, dataset)
    assert r["recall"] == 0.5 == ref_mutual_best(dataset.gallery, dets, 0.5)[0]
    assert evaluate_detection(dets, dataset, matching="voc")["recall"] == expected_voc


def test_identity_zero_counts_as_labeled():
    """docs/protocols.md (e): test the UNLABELED sentinel, never pid > 0 (which dropped identity 0)."""
    boxes = np.array([[0, 0, 50, 100], [200, 0, 250, 100], [400, 0, 450, 100]], np.float32)
    dataset = dataset_of([make_scene("/x/f.jpg", boxes, [0, UNLABELED, 5])])
    dets = {"f.jpg": (boxes[:1] + 1, np.array([0.9], np.float32), np.zeros((1, 2)))}  # finds identity 0 only
    r = evaluate_detection(dets, dataset)
    assert r["num_labeled_boxes"] == 2
    assert r["recall_labeled"] == pytest.approx(1 / 2)  # with `pid > 0` it would be 0 / 1
    assert r["recall"] == pytest.approx(1 / 3)


def test_thresholds_recall_at_half_ap_from_one_hundredth():
    boxes = np.array([[0, 0, 50, 100], [200, 0, 250, 100]], np.float32)
    dataset = dataset_of([make_scene("/x/f.jpg", boxes, [1, 2])])
    dets = {"f.jpg": (boxes.copy(), np.array([0.9, 0.2], np.float32))}  # (boxes, scores) is enough here
    r = evaluate_detection(dets, dataset)
    assert r["recall"] == 0.5 and r["num_detections"] == 1
    assert r["ap"] == pytest.approx(1.0)  # both found from 0.01 up, in score order
    r = evaluate_detection(dets, dataset, ap_score_threshold=0.5)
    assert r["ap"] == pytest.approx(0.5)


def test_box_iou_by_hand():
    a = np.array([[0, 0, 10, 10], [0, 0, 10, 0]], np.float32)  # the second has no area
    b = np.array([[5, 0, 15, 10], [0, 0, 10, 10], [20, 20, 30, 30]], np.float32)
    expected = np.array([[50 / 150, 1.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(box_iou(a, b), expected)
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 3)
    with pytest.raises(ValueError,
                       match=r"box_iou argument a must have shape \[N, 4\] \(x1, y1, x2, y2\), got \(2, 3\)"):
        box_iou(np.zeros((2, 3)), b)


def test_bad_input_messages():
    dataset, dets = random_problem(0, n_scenes=4)
    with pytest.raises(ValueError, match=r"matching must be one of \('mutual_best', 'voc'\), got 'greedy'"):
        evaluate_detection(dets, dataset, matching="greedy")
    with pytest.raises(ValueError, match=r"ap_score_threshold must be a finite number, got None"):
        evaluate_detection(dets, dataset, ap_score_threshold=None)
    name = next(iter(dets))
    bad = dict(dets)
    bad[name] = (dets[name][0][:, :2], dets[name][1], dets[name][2])
    with pytest.raises(ValueError, match=rf"detections\['{name}'\]: shapes disagree \(boxes \(\d+, 2\), scores"):
        evaluate_detection(bad, dataset)
    with pytest.raises(ValueError, match=r"none of the 1 image name\(s\) in detections is a test scene of toy"):
        evaluate_detection({"elsewhere.jpg": dets[name]}, dataset)
    empty = dataset_of([make_scene("/x/f.jpg", np.zeros((0, 4)), [])])
    with pytest.raises(ValueError, match=r"toy: the gallery scenes have no annotated box"):
        evaluate_detection({}, empty)
    extra = dict(dets)
    extra["elsewhere.jpg"] = dets[name]
    r = evaluate_detection(extra, dataset)
    assert any("ignored the detections of 1 image name(s) that are not test scenes of toy" in w for w in r["warnings"])
    assert r["recall"] == evaluate_detection(dets, dataset)["recall"]
