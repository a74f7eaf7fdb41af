"""Anchor and RoI training targets of the person-search detector (models/person_search/sampling.py).

Every label is checked against IoUs computed here in numpy; the sampling runs inside one
tf.function per target function (different seeds reuse the same graph).
"""
import numpy as np
import pytest
import tensorflow as tf

from reid_keras.models.oim import IGNORE, UNLABELED
from reid_keras.models.person_search.boxes import (ROI_BOX_WEIGHTS, RPN_BOX_WEIGHTS, decode_boxes,
                                                   generate_anchors)
from reid_keras.models.person_search.sampling import anchor_targets, roi_targets

IMAGE = (128, 192)  # height, width


def numpy_iou(a, b):
    a, b = np.asarray(a, np.float64)[:, None, :], np.asarray(b, np.float64)[None, :, :]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    union = area(a) + area(b) - iw * ih
    return np.where(union > 0, iw * ih / np.where(union > 0, union, 1), 0.0)


def jittered(rng, box, count, pixels):
    return (np.asarray(box, np.float32) + rng.uniform(-pixels, pixels, size=(count, 4))).astype(np.float32)


# ---------------------------------------------------------------- anchors

G0, G1, G2 = [40, 30, 88, 126], [130, 20, 160, 90], [100, 60, 118, 80]


def anchor_problem():
    """A stride-16 grid plus 300 anchors jittered around G0 (more positives than the 128 allowed)."""
    rng = np.random.default_rng(0)
    grid = generate_anchors(IMAGE[0] // 16, IMAGE[1] // 16, 16, (32, 64), (0.5, 1.0, 2.0)).numpy()
    anchors = np.concatenate([grid, jittered(rng, G0, 300, 2.0)])
    far = int(np.argmin(numpy_iou(grid, [G2])[:, 0] + (grid[:, 0] > 60)))  # a grid anchor nowhere near G2
    assert numpy_iou(grid[far:far + 1], [G2])[0, 0] == 0
    gt = np.zeros((3, 3, 4), np.float32)
    gt[0, :2] = [G0, G1]  # two people and a padding row
    gt[1, 0], gt[1, 1] = G2, grid[far]  # one small person; a padding row exactly on an anchor
    gt[2, 0] = anchors[-1]  # no person: a padding row exactly on a cluster anchor
    mask = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]], bool)
    return anchors, gt, mask, far


@tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([None, None, 4], tf.float32),
                              tf.TensorSpec([None, None], tf.bool), tf.TensorSpec([None, 2], tf.int32),
                              tf.TensorSpec([2], tf.int32)])
def anchor_targets_in_graph(anchors, gt, mask, image_shape, seed):
    return anchor_targets(anchors, gt, mask, image_shape, seed)


def check_anchor_labels(labels, targets, anchors, gt, mask, allow_low_quality=True):
    """Every label and target against the numpy IoUs; returns per-image (positives, negatives)."""
    counts = []
    for b in range(len(gt)):
        valid = gt[b][mask[b]]
        iou = numpy_iou(anchors, valid) if len(valid) else np.zeros((len(anchors), 0))
        best = iou.max(axis=1) if len(valid) else np.zeros(len(anchors))
        low_quality = np.zeros(len(anchors), bool)
        if allow_low_quality and len(valid):
            per_gt = iou.max(axis=0)
            low_quality = ((np.abs(iou - per_gt[None]) < 1e-6) & (per_gt[None] > 0)).any(axis=1)
        pos, neg = labels[b] == 1, labels[b] == 0
        assert set(np.unique(labels[b])) <= {-1, 0, 1}
        assert np.all((best[pos] >= 0.7 - 1e-6) | low_quality[pos]), "a positive below 0.7 that is no gt's best"
        assert np.all(best[neg] < 0.3 + 1e-6) and not np.any(low_quality[neg])
        assert pos.sum() <= 128 and pos.sum() + neg.sum() <= 256
        np.testing.assert_array_equal(targets[b][~pos], 0.0)
        if pos.any():
            matched = valid[iou[pos].argmax(axis=1)]
            decoded = decode_boxes(anchors[pos], targets[b][pos], RPN_BOX_WEIGHTS).numpy()
            np.testing.assert_allclose(decoded, matched, atol=1e-3)
        counts.append((int(pos.sum()), int(neg.sum()), int((best >= 0.7).sum()), int((best < 0.3).sum())))
    return counts


def test_anchor_targets_label_count_and_encode_like_numpy():
    anchors, gt, mask, far = anchor_problem()
    shape = np.array([IMAGE] * 3, np.int32)
    labels, targets = anchor_targets_in_graph(anchors, gt, mask, shape, tf.constant([1, 2]))
    assert labels.dtype == tf.int32 and labels.shape == (3, len(anchors)) and targets.shape == (3, len(anchors), 4)
    labels, targets = labels.numpy(), targets.numpy()
    counts = check_anchor_labels(labels, targets, anchors, gt, mask)
    (pos0, neg0, above0, _), (pos1, neg1, above1, _), (pos2, neg2, _, below2) = counts
    assert above0 > 300 and pos0 == 128 and neg0 == 128  # capped at half, negatives fill 256
    best_of_g2 = numpy_iou(anchors, [G2])[:, 0]
    assert above1 == 0 and pos1 == int(np.sum(best_of_g2 > best_of_g2.max() - 1e-6)) >= 1  # only low-quality matches
    assert neg1 == 256 - pos1
    assert pos2 == 0 and neg2 == 256 and below2 == len(anchors)  # no person: only negatives
    assert labels[1, far] != 1  # the padding row on this anchor is not a person
    assert not np.any(labels[2] == 1)


def test_anchor_sampling_is_deterministic_per_seed_and_changes_with_it():
    anchors, gt, mask, _ = anchor_problem()
    shape = np.array([IMAGE] * 3, np.int32)
    first = anchor_targets_in_graph(anchors, gt, mask, shape, tf.constant([7, 8]))[0].numpy()
    again = anchor_targets_in_graph(anchors, gt, mask, shape, tf.constant([7, 8]))[0].numpy()
    other = anchor_targets_in_graph(anchors, gt, mask, shape, tf.constant([9, 8]))[0].numpy()
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[0] == 1, other[0] == 1)  # 128 of > 300 positives: another draw
    assert not np.array_equal(first[2] == 0, other[2] == 0)
    assert (first[0] == 1).sum() == (other[0] == 1).sum() == 128
    assert anchor_targets_in_graph.experimental_get_tracing_count() <= 1


def test_anchor_targets_without_low_quality_matches_and_with_a_border():
    anchors, gt, mask, _ = anchor_problem()
    shape = np.array([IMAGE] * 3, np.int32)
    labels, targets = anchor_targets(anchors, gt, mask, shape, [3, 4], allow_low_quality=False)
    labels = labels.numpy()
    check_anchor_labels(labels, targets.numpy(), anchors, gt, mask, allow_low_quality=False)
    assert (labels[1] == 1).sum() == 0  # G2's best anchor is below 0.7
    # py-faster-rcnn's allowed border: anchors leaving the image are never sampled
    small = np.array([[100, 100], [128, 192], [128, 192]], np.int32)
    labels = anchor_targets(anchors, gt, mask, small, [3, 4], straddle=0)[0].numpy()
    for b, (h, w) in enumerate(small):
        inside = (anchors[:, 0] >= 0) & (anchors[:, 1] >= 0) & (anchors[:, 2] <= w) & (anchors[:, 3] <= h)
        assert np.all(labels[b][~inside] == -1) and (labels[b][inside] >= 0).sum() > 0
    # default: border anchors are kept (torchvision), some of them sampled as negatives
    kept = anchor_targets(anchors, gt, mask, small, [3, 4])[0].numpy()
    crossing = (anchors[:, 0] < 0) | (anchors[:, 1] < 0) | (anchors[:, 2] > 192) | (anchors[:, 3] > 128)
    assert (kept[2][crossing] == 0).sum() > 0


# ---------------------------------------------------------------- RoIs

A, B_, C = [20, 10, 60, 100], [90, 20, 130, 110], [140, 30, 175, 115]  # people of image 0
D = [50, 40, 90, 120]  # the one person of image 1


def roi_problem():
    rng = np.random.default_rng(1)
    proposals = np.zeros((2, 100, 4), np.float32)
    people = np.concatenate([jittered(rng, box, 20, 3.0) for box in (A, B_, C)])  # IoU >= 0.5 with one person
    background = np.concatenate([jittered(rng, [0, 0, 12, 12], 20, 1.0), jittered(rng, [178, 0, 190, 20], 20, 1.0)])
    proposals[0, :60], proposals[0, 60:] = people, background
    proposals[1, :10] = jittered(rng, [150, 10, 185, 40], 10, 2.0)  # background only
    proposals[1, 10:] = D  # invalid (proposal_mask False) rows lying exactly on the person
    proposal_mask = np.ones((2, 100), bool)
    proposal_mask[1, 10:] = False
    gt = np.zeros((2, 4, 4), np.float32)
    gt[0, :3] = [A, B_, C]
    gt[0, 3] = background[0]  # a padding row exactly on a background proposal
    gt[1, 0] = D
    pids = np.array([[0, UNLABELED, 5, -2], [2, -2, -2, -2]], np.int32)
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
    return proposals, proposal_mask, gt, pids, mask


@tf.function(input_signature=[tf.TensorSpec([None, None, 4], tf.float32), tf.TensorSpec([None, None], tf.bool),
                              tf.TensorSpec([None, None, 4], tf.float32), tf.TensorSpec([None, None], tf.int32),
                              tf.TensorSpec([None, None], tf.bool), tf.TensorSpec([2], tf.int32)])
def roi_targets_in_graph(proposals, proposal_mask, gt, pids, mask, seed):
    return roi_targets(proposals, gt, pids, mask, seed, positive_fraction=0.25, proposal_mask=proposal_mask)


def check_rois(out, gt, pids, mask, max_persons):
    """Every row against numpy IoUs; returns per-image (persons, background, padding) counts."""
    counts = []
    for b in range(len(gt)):
        rois, labels, ids = out["rois"][b], out["labels"][b], out["pids"][b]
        targets, weights = out["box_targets"][b], out["weights"][b]
        sampled, person = weights == 1, labels == 1
        assert set(np.unique(weights)) <= {0.0, 1.0} and np.all(sampled[:int(sampled.sum())])  # padding last
        assert np.all(person[:int(person.sum())]) and not np.any(person & ~sampled)  # persons first
        iou = numpy_iou(rois, gt[b][mask[b]])
        best, match = iou.max(axis=1), iou.argmax(axis=1)
        assert np.all(best[person] >= 0.5 - 1e-6)
        np.testing.assert_array_equal(ids[person], pids[b][mask[b]][match[person]])
        decoded = decode_boxes(rois[person], targets[person], ROI_BOX_WEIGHTS).numpy()
        np.testing.assert_allclose(decoded, gt[b][mask[b]][match[person]], atol=1e-3)
        bg = sampled & ~person
        assert np.all(best[bg] < 0.5) and np.all(ids[bg] == IGNORE) and np.all(targets[bg] == 0)
        assert np.all(ids[~sampled] == IGNORE) and np.all(labels[~sampled] == 0) and np.all(rois[~sampled] == 0)
        assert np.all(targets[~sampled] == 0) and person.sum() <= max_persons
        counts.append((int(person.sum()), int(bg.sum()), int((~sampled).sum())))
    return counts


def test_roi_targets_static_shape_fraction_ground_truth_and_identities():
    proposals, proposal_mask, gt, pids, mask = roi_problem()
    concrete = roi_targets_in_graph.get_concrete_function()
    assert concrete.structured_outputs["rois"].shape.as_list() == [None, 128, 4]  # S static, P and M dynamic
    assert concrete.structured_outputs["pids"].shape.as_list() == [None, 128]
    out = {k: v.numpy() for k, v in roi_targets_in_graph(proposals, proposal_mask, gt, pids, mask,
                                                          tf.constant([1, 2])).items()}
    assert out["labels"].dtype == np.int32 and out["pids"].dtype == np.int32 and out["weights"].dtype == np.float32
    (persons0, bg0, pad0), (persons1, bg1, pad1) = check_rois(out, gt, pids, mask, max_persons=32)
    assert persons0 == 32 and bg0 == 40 and pad0 == 128 - 72  # 63 candidates capped at 128 / 4
    # image 1: no proposal overlaps D, so its only person row is the ground-truth box added; the 90
    # invalid proposals lying on D are never sampled, and the rest is background and padding
    assert persons1 == 1 and bg1 == 10 and pad1 == 117
    np.testing.assert_allclose(out["rois"][1, 0], D)
    assert out["pids"][1, 0] == 2 and np.all(out["box_targets"][1, 0] == 0)
    # the padding row of image 0 lies on a background proposal: that proposal stays background
    on_padding = np.all(np.abs(out["rois"][0] - gt[0, 3]) < 1e-6, axis=1) & (out["weights"][0] == 1)
    assert on_padding.sum() == 1 and out["labels"][0][on_padding][0] == 0 and out["pids"][0][on_padding][0] == IGNORE


def test_roi_targets_keep_every_identity_kind_and_follow_the_seed():
    proposals, proposal_mask, gt, pids, mask = roi_problem()
    out = {k: v.numpy() for k, v in roi_targets(proposals, gt, pids, mask, [5, 6], positive_fraction=0.5,
                                                proposal_mask=proposal_mask).items()}
    (persons0, bg0, _), _ = check_rois(out, gt, pids, mask, max_persons=64)
    assert persons0 == 63 and bg0 == 40  # 60 proposals + 3 ground-truth boxes, all under the cap of 64
    ids = out["pids"][0][out["labels"][0] == 1]
    assert (ids == 0).sum() == 21 and (ids == UNLABELED).sum() == 21 and (ids == 5).sum() == 21
    first = roi_targets_in_graph(proposals, proposal_mask, gt, pids, mask, tf.constant([3, 4]))
    again = roi_targets_in_graph(proposals, proposal_mask, gt, pids, mask, tf.constant([3, 4]))
    other = roi_targets_in_graph(proposals, proposal_mask, gt, pids, mask, tf.constant([4, 4]))
    np.testing.assert_array_equal(first["rois"].numpy(), again["rois"].numpy())
    assert not np.array_equal(np.sort(first["rois"].numpy()[0, :32], axis=0),
                              np.sort(other["rois"].numpy()[0, :32], axis=0))
    assert roi_targets_in_graph.experimental_get_tracing_count() <= 1


def test_roi_targets_without_ground_truth_boxes_or_people():
    proposals, proposal_mask, gt, pids, mask = roi_problem()
    out = roi_targets(proposals, gt, pids, mask, [1, 1], proposal_mask=proposal_mask, add_ground_truth=False)
    assert (out["labels"].numpy()[1] == 1).sum() == 0  # D only reachable through the added gt box
    nobody = roi_targets(proposals, gt, pids, np.zeros_like(mask), [1, 1], proposal_mask=proposal_mask)
    assert (nobody["labels"].numpy() == 1).sum() == 0
    np.testing.assert_array_equal(nobody["weights"].numpy().sum(axis=1), [100, 10])  # all valid proposals: background
    assert np.all(nobody["pids"].numpy() == IGNORE)
    few = roi_targets(proposals[:, :5], gt[:, :0], pids[:, :0], mask[:, :0], [1, 1], num_samples=8)  # M = 0, P < S
    assert few["rois"].shape == (2, 8, 4)
    np.testing.assert_array_equal(few["weights"].numpy().sum(axis=1), [5, 5])


def test_targets_carry_no_gradient_to_the_proposals():
    proposals, proposal_mask, gt, pids, mask = roi_problem()
    proposals = tf.Variable(proposals)
    with tf.GradientTape() as tape:
        out = roi_targets(proposals, gt, pids, mask, [1, 1], proposal_mask=proposal_mask)
        total = tf.reduce_sum(out["rois"]) + tf.reduce_sum(out["box_targets"])
    assert tape.gradient(total, proposals) is None  # Faster R-CNN: the RoIs are constants for the loss


@pytest.mark.parametrize("call, message", [
    (lambda p: anchor_targets(p["anchors"], p["gt"], p["mask"], p["shape"], [1, 2], num_samples=0),
     "num_samples must be an integer >= 1, got 0"),
    (lambda p: anchor_targets(p["anchors"], p["gt"], p["mask"], p["shape"], [1, 2], positive_fraction=1.5),
     r"positive_fraction must be a number in \(0, 1\], got 1.5"),
    (lambda p: anchor_targets(p["anchors"], p["gt"], p["mask"], p["shape"], [1, 2], negative_iou=0.8),
     r"negative_iou \(0.8\) must be <= positive_iou \(0.7\)"),
    (lambda p: anchor_targets(p["anchors"], p["gt"], p["mask"], p["shape"], [1, 2], straddle=-1),
     "straddle must be None .* or a number of pixels >= 0, got -1"),
    (lambda p: anchor_targets(p["anchors"], p["gt"][0], p["mask"], p["shape"], [1, 2]),
     r"gt_boxes must have shape \[B, M, 4\] \(x1, y1, x2, y2\), got \(3, 4\)"),
    (lambda p: anchor_targets(p["anchors"][None], p["gt"], p["mask"], p["shape"], [1, 2]),
     r"anchors must have shape \[N, 4\]"),
    (lambda p: anchor_targets(p["anchors"], p["gt"], p["mask"], p["shape"][0], [1, 2]),
     r"image_shape must have shape \[B, 2\] \(height, width\), got \(2,\)"),
    (lambda p: anchor_targets(p["anchors"], p["gt"], p["mask"], p["shape"], [1, 2, 3]),
     r"seed must be an integer tensor of shape \[2\]"),
    (lambda p: roi_targets(p["gt"], p["gt"], p["mask"], p["mask"], [1, 2], background_iou=(0.5, 0.1)),
     r"background_iou must satisfy 0 <= low < high <= foreground_iou=0.5, got \(0.5, 0.1\)"),
    (lambda p: roi_targets(p["gt"], p["gt"], p["mask"][0], p["mask"], [1, 2]), r"gt_pids must have shape \[B, M\]"),
    (lambda p: roi_targets(p["gt"], p["gt"], p["mask"], p["mask"], [1, 2], proposal_mask=p["mask"][:, :2]),
     r"proposal_mask must have shape \[B, P\] = \(3, 3\) like the proposals, got \(3, 2\)"),
    (lambda p: anchor_targets(p["anchors"], p["gt"], p["mask"][:2], p["shape"], [1, 2]),
     r"gt_mask must have shape \[B, M\] = \(3, 3\) like gt_boxes, got \(2, 3\)"),
    (lambda p: roi_targets(p["gt"][0], p["gt"], p["mask"], p["mask"], [1, 2]),
     r"proposals must have shape \[B, P, 4\]"),
])
def test_bad_arguments_are_named(call, message):
    anchors, gt, mask, _ = anchor_problem()
    problem = dict(anchors=anchors, gt=gt, mask=mask, shape=np.array([IMAGE] * 3, np.int32))
    with pytest.raises(ValueError, match=message):
        call(problem)
