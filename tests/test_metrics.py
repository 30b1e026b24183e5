import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from timm_lossattn.metrics import (
    accuracy, box_from_patches, box_iou, boxes_from_patches, deletion_insertion_curves, localization_ap, max_box_acc,
    multilabel_map, patch_correctness, patch_precision_recall, pointing_game,
)


def t(*values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype)


# accuracy

def test_accuracy_hard_and_soft_targets():
    logits = t([2., 1.], [0., 3.], [1., 0.])
    assert accuracy(logits, t(0, 0, 0, dtype=torch.long)) == pytest.approx(2 / 3)
    assert accuracy(logits, t([1., 0.], [1., 0.], [1., 0.])) == pytest.approx(2 / 3)
    assert accuracy(logits, t([.6, .4], [.3, .7], [.9, .1])) == 1.


def test_accuracy_bad_input():
    with pytest.raises(ValueError, match='target'):
        accuracy(torch.zeros(3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match='integer'):
        accuracy(torch.zeros(3, 2), torch.zeros(3))
    with pytest.raises(ValueError, match='logits'):
        accuracy(torch.zeros(3), torch.zeros(3, dtype=torch.long))


# multilabel_map

def test_map_hand_worked():
    scores = t([.9, .1], [.8, .2], [.7, .3], [.6, .4])
    targets = t([1, 0], [0, 0], [1, 0], [0, 0])
    mean_ap, per_class = multilabel_map(scores, targets)
    # class 0: positives at ranks 1 and 3 -> (1 + 2/3) / 2; class 1 has no positive and is excluded
    assert per_class[0].item() == pytest.approx(5 / 6)
    assert math.isnan(per_class[1].item())
    assert mean_ap == pytest.approx(5 / 6)


def test_map_no_positive_anywhere_and_bad_targets():
    mean_ap, per_class = multilabel_map(torch.rand(5, 3), torch.zeros(5, 3))
    assert math.isnan(mean_ap) and per_class.isnan().all()
    with pytest.raises(ValueError, match='binary'):
        multilabel_map(torch.rand(5, 3), torch.full((5, 3), .5))
    with pytest.raises(ValueError, match='match'):
        multilabel_map(torch.rand(5, 3), torch.zeros(5, 2))


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 40), st.integers(1, 5), st.integers(0, 2 ** 31 - 1), st.booleans())
def test_map_matches_sklearn(num, classes, seed, ties):
    average_precision_score = pytest.importorskip('sklearn.metrics').average_precision_score
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(num, classes, generator=g, dtype=torch.float64)
    if ties:
        scores = (scores * 4).round()
    targets = (torch.rand(num, classes, generator=g) > .6).long()
    targets[:, 0] = 0  # a class absent everywhere
    mean_ap, per_class = multilabel_map(scores, targets)
    expected = [average_precision_score(targets[:, k], scores[:, k]) for k in range(classes) if targets[:, k].any()]
    assert per_class[~per_class.isnan()].tolist() == pytest.approx(expected)
    assert math.isnan(mean_ap) if not expected else mean_ap == pytest.approx(sum(expected) / len(expected))


# box_iou

def test_box_iou():
    a = t([0., 0., 2., 2.], [0., 0., 0., 0.])
    b = t([0., 0., 2., 2.], [0., 0., 2., 1.], [5., 5., 6., 6.])
    expected = t([1., .5, 0.], [0., 0., 0.])
    assert torch.equal(box_iou(a, b), expected)
    assert box_iou(a, torch.zeros(0, 4)).shape == (2, 0)
    with pytest.raises(ValueError, match='b'):
        box_iou(a, torch.zeros(3, 3))
    with pytest.raises(TypeError, match='floating'):
        box_iou(a, torch.zeros(3, 4, dtype=torch.long))


# patch correctness and precision / recall

def test_patch_correctness():
    patches = t(
        [0., 0., 4., 4.],  # inside the box
        [2., 0., 6., 4.],  # exactly half inside: not more than half
        [1., 0., 5., 4.],  # three quarters inside
        [-4., -4., 4., 4.],  # clipped to the image first: fully inside
        [8., 8., 12., 12.],  # outside the image
        [4., 4., 8., 8.],  # image but no box
    )
    gt, labels = t([0., 0., 4., 4.]), t(3, dtype=torch.long)
    correct = patch_correctness(patches, gt, labels, t(3, dtype=torch.long), (8, 8))
    assert correct.tolist() == [True, False, True, True, False, False]
    assert not patch_correctness(patches, gt, labels, t(5, dtype=torch.long), (8, 8)).any()
    empty = patch_correctness(patches, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), t(3, dtype=torch.long),
                              (8, 8))
    assert empty.dtype == torch.bool and not empty.any()


def test_patch_correctness_multi_label():
    patches = t([0., 0., 4., 4.], [4., 4., 8., 8.])
    gt, labels = t([0., 0., 4., 4.], [4., 4., 8., 8.]), t(1, 7, dtype=torch.long)
    assert patch_correctness(patches, gt, labels, t(1, 7, dtype=torch.long), (8, 8)).tolist() == [True, True]
    assert patch_correctness(patches, gt, labels, t(7, dtype=torch.long), (8, 8)).tolist() == [False, True]
    with pytest.raises(ValueError, match='gt_labels'):
        patch_correctness(patches, gt, t(1, dtype=torch.long), t(1, dtype=torch.long), (8, 8))


def test_patch_precision_recall():
    pr = patch_precision_recall(t(.5, 0., .5, 0.), t(True, True, False, False, dtype=torch.bool))
    assert pr.precision == .5 and pr.recall == .5 and pr.f_score == pytest.approx(.5)
    assert (pr.num_selected, pr.num_correct, pr.num_correct_selected) == (2, 2, 1)
    empty = patch_precision_recall(torch.zeros(4), t(True, False, False, False, dtype=torch.bool))
    assert (empty.precision, empty.recall, empty.f_score, empty.num_selected) == (0., 0., 0., 0)
    none_correct = patch_precision_recall(torch.ones(4), torch.zeros(4, dtype=torch.bool))
    assert (none_correct.precision, none_correct.recall, none_correct.f_score) == (0., 0., 0.)


def test_patch_precision_recall_sums_counts_over_images():
    weights = t([1., 1., 1., 1.], [1., 0., 0., 0.])
    correct = t([True, False, False, False], [True, True, True, True], dtype=torch.bool)
    pr = patch_precision_recall(weights, correct)
    # pooled counts: 5 selected, 5 correct, 2 correct selected (a mean of per-image ratios would give 0.625 / 0.625)
    assert (pr.precision, pr.recall) == (2 / 5, 2 / 5)
    with pytest.raises(TypeError, match='bool'):
        patch_precision_recall(weights, correct.float())
    with pytest.raises(ValueError, match='match'):
        patch_precision_recall(weights, correct[:1])


# estimated box

def _grid_boxes(grid=6, kernel=9, stride=4):
    """Boxes of a 6x6 grid of 9x9 stride-4 patches on a 32x32 map, row-major."""
    ij = torch.arange(grid).float() * stride
    y, x = torch.meshgrid(ij, ij, indexing='ij')
    return torch.stack([x, y, x + kernel, y + kernel], dim=-1).view(-1, 4)


def test_box_from_patches_is_square():
    boxes = _grid_boxes()
    weights = torch.zeros(6, 6)
    weights[1, 1] = weights[1, 2] = .5  # boxes (4, 4, 13, 13) and (8, 4, 17, 13): 13 x 9, grow height by 2 + 2
    box = box_from_patches(weights.flatten(), boxes, (32, 32))
    assert box.tolist() == [4., 2., 17., 15.]
    weights = torch.zeros(6, 6)
    weights[2, 1] = weights[4, 1] = .5  # (4, 8, 13, 17) and (4, 16, 13, 25): 9 x 17, grow width by 4 + 4
    assert box_from_patches(weights.flatten(), boxes, (32, 32)).tolist() == [0., 8., 17., 25.]


def test_box_from_patches_clips_and_empty():
    boxes = _grid_boxes()
    weights = torch.zeros(36)
    weights[0] = weights[1] = 1.  # (0, 0, 13, 9) -> square (0, -2, 13, 11) -> clipped (0, 0, 13, 11)
    assert box_from_patches(weights, boxes, (32, 32)).tolist() == [0., 0., 13., 11.]
    assert box_from_patches(torch.ones(36), boxes, (32, 32)).tolist() == [0., 0., 29., 29.]
    assert box_from_patches(torch.zeros(36), boxes, (32, 32)) is None
    with pytest.raises(ValueError, match='patch_boxes'):
        box_from_patches(torch.zeros(35), boxes, (32, 32))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(-8, 40), st.integers(-8, 40), st.integers(1, 20), st.integers(1, 20)),
                min_size=1, max_size=6))
def test_box_from_patches_contains_selection(rects):
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in rects], dtype=torch.float64)
    box = box_from_patches(torch.ones(len(boxes)), boxes, (32, 32))
    clipped = boxes.clone()
    clipped[:, 0::2], clipped[:, 1::2] = clipped[:, 0::2].clamp(0, 32), clipped[:, 1::2].clamp(0, 32)
    assert (box[:2] <= clipped[:, :2].amin(0)).all() and (box[2:] >= clipped[:, 2:].amax(0)).all()
    assert (box[:2] >= 0).all() and (box[2:] <= 32).all()
    if (box[:2] > 0).all() and (box[2:] < 32).all():  # not clipped: a square
        assert box[2] - box[0] == box[3] - box[1]


def test_boxes_from_patches_is_box_from_patches_per_image():
    boxes = _grid_boxes()
    torch.manual_seed(0)
    weights = torch.rand(5, 36) * (torch.rand(5, 36) > 0.7)
    weights[0] = 0  # no patch selected
    batch, found = boxes_from_patches(weights, boxes, (32, 32))
    assert batch.shape == (5, 4) and found.tolist() == [False, True, True, True, True]
    assert batch[0].tolist() == [0., 0., 0., 0.] and box_from_patches(weights[0], boxes, (32, 32)) is None
    for w, box in zip(weights[1:], batch[1:]):
        assert torch.equal(box, box_from_patches(w, boxes, (32, 32)))


# localization AP

def _single(box, score, label):
    return t(box), t(score), t(label, dtype=torch.long)


def test_localization_ap_hand_worked():
    gt = [t([0., 0., 2., 2.])] * 4
    gt_labels = [t(1, dtype=torch.long)] * 4
    preds = [
        _single([0., 0., 2., 2.], .9, 1),  # TP
        _single([0., 0., 2., 1.], .8, 1),  # IoU exactly 0.5: FP
        _single([0., 0., 2., 2.], .7, 2),  # wrong class: FP
    ]
    boxes, scores, labels = (list(x) for x in zip(*preds))
    no_pred = (torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    boxes.append(no_pred[0])
    scores.append(no_pred[1])
    labels.append(no_pred[2])
    # ranked TP, FP, FP over 4 ground-truth boxes: recall 0.25 at precision 1
    assert localization_ap(boxes, scores, labels, gt, gt_labels) == pytest.approx(.25)
    # IoU 0.5 counts once the threshold is below it: TP, TP, FP -> recall 0.5 at precision 1
    assert localization_ap(boxes, scores, labels, gt, gt_labels, iou_threshold=.49) == pytest.approx(.5)


def test_localization_ap_ranking_and_duplicates():
    gt, gt_labels = [t([0., 0., 2., 2.])] * 2, [t(0, dtype=torch.long)] * 2
    # an FP ranked above the TP: precision envelope 1/2 over recall [0, 0.5]
    boxes = [t([5., 5., 6., 6.]), t([0., 0., 2., 2.])]
    ap = localization_ap(boxes, [t(.9), t(.5)], [t(0, dtype=torch.long)] * 2, gt, gt_labels)
    assert ap == pytest.approx(.25)
    # two predictions on one ground-truth box: the second is a duplicate (FP)
    boxes = [t([0., 0., 2., 2.], [0., 0., 2., 2.]), torch.zeros(0, 4)]
    ap = localization_ap(boxes, [t(.9, .8), torch.zeros(0)], [t(0, 0, dtype=torch.long),
                                                             torch.zeros(0, dtype=torch.long)], gt, gt_labels)
    assert ap == pytest.approx(.5)


def test_localization_ap_empty_cases():
    empty_boxes, empty_scores, empty_labels = [torch.zeros(0, 4)], [torch.zeros(0)], [torch.zeros(0, dtype=torch.long)]
    assert math.isnan(localization_ap(empty_boxes, empty_scores, empty_labels, empty_boxes, empty_labels))
    gt, gt_labels = [t([0., 0., 2., 2.])], [t(0, dtype=torch.long)]
    assert localization_ap(empty_boxes, empty_scores, empty_labels, gt, gt_labels) == 0.
    assert localization_ap([t([0., 0., 2., 2.])], [t(.1)], [t(0, dtype=torch.long)], gt, gt_labels) == 1.
    with pytest.raises(ValueError, match='same images'):
        localization_ap(empty_boxes, empty_scores, empty_labels, gt * 2, gt_labels * 2)


# MaxBoxAcc and pointing game

def _two_blob_map():
    heatmap = torch.zeros(16, 16)
    heatmap[2:6, 3:9] = 1.  # the object: box (3, 2, 9, 6)
    heatmap[12:14, 12:14] = .5  # a weaker distractor
    return heatmap * 2 - 1  # min-max normalisation undoes the affine map


def test_max_box_acc_largest_component():
    heatmaps, gt = _two_blob_map()[None], [t([3., 2., 9., 6.])]
    result = max_box_acc(heatmaps, gt, thresholds=[0., .25, .75])
    assert result.accuracy.tolist() == [1., 1., 1.] and result.max_box_acc == 1.
    whole = max_box_acc(heatmaps, gt, thresholds=[0., .25, .75], largest_component=False)
    assert whole.accuracy.tolist() == [0., 0., 1.]
    assert whole.max_box_acc == 1. and whole.best_threshold == .75


def test_max_box_acc_connectivity_and_iou_boundary():
    heatmap = torch.zeros(1, 8, 8)
    heatmap[0, 0, 0] = heatmap[0, 1, 1] = heatmap[0, 2, 2] = 1.  # one 8-connected component of 3 pixels
    heatmap[0, 6, 5:7] = 1.  # two pixels
    assert max_box_acc(heatmap, [t([0., 0., 3., 3.])], thresholds=[.5]).max_box_acc == 1.
    # IoU exactly 0.5 is correct here (>= delta, Choe et al.), unlike the paper's localization AP
    assert max_box_acc(heatmap, [t([0., 0., 3., 1.5])], thresholds=[.5]).max_box_acc == 1.


def test_max_box_acc_degenerate_maps():
    heatmaps = torch.stack([torch.full((8, 8), 3.), _two_blob_map()[:8, :8]])
    result = max_box_acc(heatmaps, [t([0., 0., 8., 8.]), torch.zeros(0, 4)])
    # a constant map normalises to zeros (empty mask for thresholds >= 0); an image without ground truth never counts
    assert result.max_box_acc == 0. and result.accuracy.shape == (100,)
    with pytest.raises(ValueError, match='gt_boxes'):
        max_box_acc(heatmaps, [t([0., 0., 8., 8.])])


def test_pointing_game():
    heatmaps = torch.zeros(3, 8, 10)
    heatmaps[0, 1, 1] = 1.  # inside
    heatmaps[1, 2, 8] = 1.  # centre (8.5, 2.5): 3.5 px right of the box
    heatmaps[2, 7, 9] = heatmaps[2, 0, 0] = 1.  # tie: the first in raster order, (0, 0), is inside
    gt = [t([0., 0., 5., 5., 4.])] * 3  # a trailing label column is ignored
    assert pointing_game(heatmaps, gt) == pytest.approx(2 / 3)
    assert pointing_game(heatmaps, gt, tolerance=3.5) == 1.
    assert pointing_game(heatmaps, gt, tolerance=3.4) == pytest.approx(2 / 3)
    assert pointing_game(heatmaps[:1], [torch.zeros(0, 4)]) == 0.
    assert pointing_game(heatmaps[:1], [t([0., 0., 1.5, 5.])]) == 0.  # centre 1.5 on the half-open right edge
    with pytest.raises(ValueError, match='tolerance'):
        pointing_game(heatmaps, gt, tolerance=-1.)


# deletion / insertion

QUADRANTS = t([0., 0., 2., 2.], [2., 0., 4., 2.], [0., 2., 2., 4.], [2., 2., 4., 4.])


def _quadrant_image():
    image = torch.zeros(1, 1, 4, 4)
    image[..., :2, :2], image[..., :2, 2:], image[..., 2:, :2], image[..., 2:, 2:] = .1, .2, .3, .4
    return image


def _sum_model(x):
    """Class 0 probability = pixel sum / 4 (1 for the quadrant image), class 1 its complement."""
    p = x.sum(dim=(1, 2, 3)) / 4
    return torch.stack([p, 1 - p], dim=1)


def test_deletion_insertion_hand_worked():
    order = t([3, 1, 0, 2], dtype=torch.long)  # BR, TR, TL, BL
    curves = deletion_insertion_curves(_sum_model, _quadrant_image(), order, QUADRANTS)
    assert curves.target.tolist() == [0]
    assert curves.fractions.tolist() == [0., .25, .5, .75, 1.]
    assert curves.deletion[0].tolist() == pytest.approx([1., .6, .4, .3, 0.])
    assert curves.insertion[0].tolist() == pytest.approx([0., .4, .6, .7, 1.])
    assert curves.deletion_auc.item() == pytest.approx(.45)
    assert curves.insertion_auc.item() == pytest.approx(.55)
    coarse = deletion_insertion_curves(_sum_model, _quadrant_image(), order, QUADRANTS, steps=2)
    assert coarse.deletion[0].tolist() == pytest.approx([1., .4, 0.])
    assert coarse.fractions.tolist() == [0., .5, 1.]


def test_deletion_insertion_overlap_baseline_target():
    halves = t([0., 0., 4., 2.], [0., 0., 2., 4.])  # top half, left half: overlap at TL, deleted once
    order = t([0, 1], dtype=torch.long)
    curves = deletion_insertion_curves(_sum_model, _quadrant_image(), order, halves)
    assert curves.deletion[0].tolist() == pytest.approx([1., .7, .4])
    same = deletion_insertion_curves(_sum_model, _quadrant_image(), order, halves, baseline=_quadrant_image())
    assert same.deletion[0].tolist() == pytest.approx([1., 1., 1.])
    other = deletion_insertion_curves(_sum_model, _quadrant_image(), order, halves, target=t(1, dtype=torch.long))
    assert other.insertion[0].tolist() == pytest.approx([1., .7, .4])


def test_deletion_insertion_batching_is_invariant():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 4, 4, generator=g)
    order = torch.stack([torch.randperm(4, generator=g) for _ in range(5)])
    weights = torch.rand(2, 3 * 16, generator=g)

    def model_fn(x):
        return torch.softmax(x.flatten(1) @ weights.T, dim=1)

    a = deletion_insertion_curves(model_fn, images, order, QUADRANTS, batch_size=1)
    b = deletion_insertion_curves(model_fn, images, order, QUADRANTS, batch_size=1000)
    assert torch.allclose(a.deletion, b.deletion) and torch.allclose(a.insertion, b.insertion)
    assert a.deletion.shape == (5, 5)


def test_deletion_insertion_bad_input():
    image, order = _quadrant_image(), t([0, 1, 2, 3], dtype=torch.long)
    with pytest.raises(TypeError, match='patch_order'):
        deletion_insertion_curves(_sum_model, image, order.float(), QUADRANTS)
    with pytest.raises(ValueError, match='patch_order'):
        deletion_insertion_curves(_sum_model, image, order + 1, QUADRANTS)
    with pytest.raises(ValueError, match='model_fn'):
        deletion_insertion_curves(lambda x: x.sum(), image, order, QUADRANTS)
    with pytest.raises(ValueError, match='baseline'):
        deletion_insertion_curves(_sum_model, image, order, QUADRANTS, baseline=torch.zeros(3, 3))
    with pytest.raises(ValueError, match='target'):
        deletion_insertion_curves(_sum_model, image, order, QUADRANTS, target=t(2, dtype=torch.long))
