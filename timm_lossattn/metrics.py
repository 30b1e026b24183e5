""" Metrics for interpreting image-level predictions

The evaluation of Shi et al., "Loss-based Attention for Interpreting Image-level Prediction of Convolutional Neural
Networks" (IEEE TIP 2021): image accuracy or mAP, patch precision/recall/F-score, and localization AP of the minimum
square around the selected patches; plus the weakly supervised localization metrics a reader compares it with:
MaxBoxAcc (Choe et al., CVPR 2020), the pointing game (Zhang et al., ECCV 2016) and the deletion/insertion curves
(Petsiuk et al., BMVC 2018).

Box convention everywhere: float (x0, y0, x1, y1) in pixel coordinates, half-open, pixel i spanning [i, i + 1); a
pixel belongs to a box when its centre (i + 0.5) does. Heat maps are indexed (row, col) = (y, x). All functions are
pure, run on CPU tensors and return fractions in [0, 1] (not percentages).
"""
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    'MaxBoxAccResult', 'PatchPR', 'PerturbationCurves', 'accuracy', 'box_from_patches', 'box_iou',
    'boxes_from_patches', 'deletion_insertion_curves', 'localization_ap', 'max_box_acc', 'multilabel_map',
    'patch_correctness', 'patch_precision_recall', 'pointing_game',
]


def _check_tensor(
        x: torch.Tensor,
        name: str,
        ndim: Optional[int] = None,
        last_dim: Optional[int] = None,
        floating: Optional[bool] = None,
) -> None:
    """Raises TypeError / ValueError naming `name` when x is not a tensor of the expected rank, width and kind."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f'{name} must be a torch.Tensor, got {type(x).__name__}.')
    if floating is True and not x.is_floating_point():
        raise TypeError(f'{name} must be a floating point tensor, got {x.dtype}.')
    if floating is False and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise TypeError(f'{name} must be an integer tensor, got {x.dtype}.')
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f'{name} must have {ndim} dims, got shape {tuple(x.shape)}.')
    if last_dim is not None and x.shape[-1] != last_dim:
        raise ValueError(f'{name} must have last dim {last_dim}, got shape {tuple(x.shape)}.')


def _check_boxes(boxes: torch.Tensor, name: str) -> torch.Tensor:
    """Validates a (N, 4) float box tensor, or (N, 5) with a trailing label column, which is dropped."""
    _check_tensor(boxes, name, ndim=2, floating=True)
    if boxes.shape[1] not in (4, 5):
        raise ValueError(f'{name} must be (N, 4) boxes or (N, 5) boxes with labels, got shape {tuple(boxes.shape)}.')
    return boxes[:, :4]


def _check_image_size(image_size: Tuple[int, int]) -> Tuple[int, int]:
    if len(image_size) != 2 or min(image_size) <= 0:
        raise ValueError(f'image_size must be (H, W) with positive sides, got {image_size!r}.')
    return int(image_size[0]), int(image_size[1])


def _area(boxes: torch.Tensor) -> torch.Tensor:
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise intersection areas (N, M) of boxes a (N, 4) and b (M, 4)."""
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def _clip_boxes(boxes: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
    h, w = image_size
    return torch.stack([
        boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], dim=1)


def accuracy(logits: torch.Tensor, target: torch.Tensor) -> float:
    """Top-1 accuracy.

    Args:
        logits: (B, K) scores.
        target: (B,) class indices, or (B, K) one-hot / soft targets (mixup, label smoothing) reduced by argmax.

    Returns:
        Fraction of images whose highest-scoring class is the target class.
    """
    _check_tensor(logits, 'logits', ndim=2)
    _check_tensor(target, 'target')
    if target.ndim == 2:
        if target.shape != logits.shape:
            raise ValueError(f'target {tuple(target.shape)} must match logits {tuple(logits.shape)}.')
        target = target.argmax(dim=1)
    elif target.ndim != 1 or target.shape[0] != logits.shape[0]:
        raise ValueError(f'target must be (B,) or (B, K) for logits {tuple(logits.shape)}, got {tuple(target.shape)}.')
    else:
        _check_tensor(target, 'target', floating=False)
    if logits.shape[0] == 0:
        raise ValueError('accuracy needs at least one image.')
    return (logits.argmax(dim=1) == target).double().mean().item()


def _average_precision(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Non-interpolated AP of one class: sum over score thresholds of (R_n - R_{n-1}) P_n, ties grouped."""
    order = torch.argsort(scores, descending=True, stable=True)
    scores, labels = scores[order], labels[order].double()
    # a threshold ends at the last of each run of tied scores
    ends = torch.cat([torch.nonzero(scores[1:] != scores[:-1]).flatten(), torch.tensor([len(scores) - 1])])
    tp = labels.cumsum(0)[ends]
    precision = tp / (ends + 1).double()
    recall = tp / tp[-1]
    return (torch.diff(recall, prepend=recall.new_zeros(1)) * precision).sum().item()


def multilabel_map(scores: torch.Tensor, targets: torch.Tensor) -> Tuple[float, torch.Tensor]:
    """Mean average precision over classes for multi-label classification.

    Per class, AP = sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds ranked from high to low, i.e.
    precision at each positive's rank with tied scores grouped and no interpolation, as
    `sklearn.metrics.average_precision_score`. Classes with no positive image are excluded from the mean, as their
    AP is undefined.

    Args:
        scores: (N, K) scores (logits or probabilities; only their order matters).
        targets: (N, K) binary targets (bool, int or float in {0, 1}).

    Returns:
        mAP (NaN when no class has a positive) and the per-class AP (K,) float64, NaN for excluded classes.
    """
    _check_tensor(scores, 'scores', ndim=2, floating=True)
    _check_tensor(targets, 'targets', ndim=2)
    if targets.shape != scores.shape:
        raise ValueError(f'targets {tuple(targets.shape)} must match scores {tuple(scores.shape)}.')
    if not ((targets == 0) | (targets == 1)).all():
        raise ValueError('targets must be binary (0 or 1).')
    targets = targets.bool()
    per_class = torch.full((scores.shape[1],), float('nan'), dtype=torch.float64)
    for k in range(scores.shape[1]):
        if targets[:, k].any():
            per_class[k] = _average_precision(scores[:, k], targets[:, k])
    valid = ~per_class.isnan()
    mean_ap = per_class[valid].mean().item() if valid.any() else float('nan')
    return mean_ap, per_class


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise intersection over union.

    Args:
        a: (N, 4) boxes (x0, y0, x1, y1).
        b: (M, 4) boxes.

    Returns:
        (N, M) IoU; 0 where the union is empty.
    """
    a, b = _check_boxes(a, 'a'), _check_boxes(b, 'b')
    inter = _intersection(a, b)
    union = _area(a)[:, None] + _area(b)[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(inter))


def patch_correctness(
        patch_boxes: torch.Tensor,
        gt_boxes: torch.Tensor,
        gt_labels: torch.Tensor,
        image_labels: torch.Tensor,
        image_size: Tuple[int, int],
) -> torch.Tensor:
    """Which patches are correct, following Shi et al. (TIP 2021), patch precision and recall.

    A patch is correct when it shares a label with the image and more than half of its area lies inside one
    ground-truth box of that label. Patch boxes are first clipped to the image (the part of a border patch outside
    the image holds no object); a patch with no area inside the image is never correct.

    Args:
        patch_boxes: (M, 4) input region of each patch, may extend beyond the image.
        gt_boxes: (G, 4) ground-truth boxes (G may be 0; a trailing label column is accepted and ignored).
        gt_labels: (G,) class of each ground-truth box.
        image_labels: (L,) class indices the patches are judged against: the image's ground-truth labels as in the
            paper (`target.nonzero().flatten()` for a multi-hot target), or the predicted class.
        image_size: (H, W) of the image.

    Returns:
        (M,) bool.
    """
    patch_boxes = _check_boxes(patch_boxes, 'patch_boxes')
    gt_boxes = _check_boxes(gt_boxes, 'gt_boxes')
    _check_tensor(gt_labels, 'gt_labels', ndim=1, floating=False)
    _check_tensor(image_labels, 'image_labels', ndim=1, floating=False)
    if gt_labels.shape[0] != gt_boxes.shape[0]:
        raise ValueError(f'gt_labels has {gt_labels.shape[0]} entries for {gt_boxes.shape[0]} gt_boxes.')
    patches = _clip_boxes(patch_boxes, _check_image_size(image_size))
    area = _area(patches)
    inter = _intersection(patches, gt_boxes.to(patches.dtype))
    shares_label = torch.isin(gt_labels, image_labels)
    inside = (2 * inter > area[:, None]) & shares_label[None, :]
    return inside.any(dim=1) & (area > 0)


class PatchPR(NamedTuple):
    precision: float
    recall: float
    f_score: float
    num_selected: int
    num_correct: int
    num_correct_selected: int


def patch_precision_recall(weights: torch.Tensor, correct: torch.Tensor) -> PatchPR:
    """Patch precision, recall and F-score of Shi et al. (TIP 2021).

    A patch is selected when its weight is > 0. precision = correct selected / selected, recall = correct selected /
    correct, F = 2 P R / (P + R). Counts are summed over every patch of every image given, so pass a whole dataset's
    (B, M) weights at once for the paper's dataset-level numbers. Empty denominators give 0, as scikit-learn's
    `zero_division=0`: no selected patch -> precision 0, no correct patch -> recall 0, P + R = 0 -> F 0.

    Args:
        weights: (..., M) patch weights a_m.
        correct: bool tensor of the same shape, from `patch_correctness`.

    Returns:
        `PatchPR` with precision, recall, f_score and the three counts.
    """
    _check_tensor(weights, 'weights', floating=True)
    _check_tensor(correct, 'correct')
    if correct.dtype != torch.bool:
        raise TypeError(f'correct must be a bool tensor, got {correct.dtype}.')
    if correct.shape != weights.shape:
        raise ValueError(f'correct {tuple(correct.shape)} must match weights {tuple(weights.shape)}.')
    selected = weights > 0
    num_selected = int(selected.sum())
    num_correct = int(correct.sum())
    num_correct_selected = int((selected & correct).sum())
    precision = num_correct_selected / num_selected if num_selected else 0.
    recall = num_correct_selected / num_correct if num_correct else 0.
    f_score = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.
    return PatchPR(precision, recall, f_score, num_selected, num_correct, num_correct_selected)


def box_from_patches(
        weights: torch.Tensor,
        patch_boxes: torch.Tensor,
        image_size: Tuple[int, int],
) -> Optional[torch.Tensor]:
    """The estimated object box of Shi et al. (TIP 2021): minimum square containing the selected patches.

    Exactly: the bounding box of the patch boxes with weight > 0; its shorter side is expanded symmetrically about
    its centre to the longer side's length; the square is then clipped to the image (so it may end up rectangular
    at a border). `boxes_from_patches` does a batch at once.

    Args:
        weights: (M,) patch weights of one image.
        patch_boxes: (M, 4) input region of each patch.
        image_size: (H, W) of the image.

    Returns:
        (4,) box, or None when no patch is selected.
    """
    _check_tensor(weights, 'weights', ndim=1, floating=True)
    boxes, found = boxes_from_patches(weights[None], patch_boxes, image_size)
    return boxes[0] if found[0] else None


def boxes_from_patches(
        weights: torch.Tensor,
        patch_boxes: torch.Tensor,
        image_size: Tuple[int, int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """`box_from_patches` for a batch of images, without a Python loop over them.

    Args:
        weights: (B, M) patch weights.
        patch_boxes: (M, 4) input region of each patch.
        image_size: (H, W) of the images.

    Returns:
        (B, 4) boxes and (B,) bool, False for an image without a selected patch (its box row is zeros).
    """
    _check_tensor(weights, 'weights', ndim=2, floating=True)
    patch_boxes = _check_boxes(patch_boxes, 'patch_boxes')
    if patch_boxes.shape[0] != weights.shape[1]:
        raise ValueError(f'patch_boxes has {patch_boxes.shape[0]} rows for {weights.shape[1]} weights.')
    image_size = _check_image_size(image_size)
    selected = weights > 0
    found = selected.any(1)
    if patch_boxes.shape[0] == 0:
        return patch_boxes.new_zeros(weights.shape[0], 4), found
    inf = torch.tensor(float('inf'), dtype=patch_boxes.dtype, device=patch_boxes.device)
    top_left = torch.where(selected[..., None], patch_boxes[:, :2], inf).amin(1)  # (B, 2): x0, y0
    bottom_right = torch.where(selected[..., None], patch_boxes[:, 2:], -inf).amax(1)  # (B, 2): x1, y1
    half_side = (bottom_right - top_left).amax(1, keepdim=True) / 2
    centre = (top_left + bottom_right) / 2
    squares = torch.cat([centre - half_side, centre + half_side], dim=1)
    return torch.where(found[:, None], _clip_boxes(squares, image_size), 0.), found


def _voc_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """Area under the precision/recall curve with the monotone precision envelope (PASCAL VOC 2010+)."""
    mrec = np.concatenate([[0.], recall, [1.]])
    mpre = np.concatenate([[0.], precision, [0.]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


def localization_ap(
        pred_boxes: Sequence[torch.Tensor],
        scores: Sequence[torch.Tensor],
        pred_labels: Sequence[torch.Tensor],
        gt_boxes: Sequence[torch.Tensor],
        gt_labels: Sequence[torch.Tensor],
        iou_threshold: float = 0.5,
) -> float:
    """Localization AP of Shi et al. (TIP 2021), computed PASCAL VOC style.

    A predicted (box, class, score) is correct when its IoU is strictly greater than `iou_threshold` with a
    ground-truth box of the predicted class. Predictions of all images and classes are ranked together by score
    (ties keep input order); each is matched, as in the VOC devkit, to the same-class ground-truth box of highest
    IoU, a true positive if that IoU > threshold and the box is not matched yet, a false positive otherwise
    (duplicates included). Recall is over all ground-truth boxes; AP is the area under the precision/recall curve
    with the monotone precision envelope (VOC 2010+). An image without a prediction (e.g. `box_from_patches`
    returned None) only lowers recall. For the paper's single-label protocol give each image one prediction: the
    estimated box, the predicted class and its probability.

    Args:
        pred_boxes: per image, (P_i, 4) predicted boxes.
        scores: per image, (P_i,) confidence of each prediction.
        pred_labels: per image, (P_i,) predicted class of each box.
        gt_boxes: per image, (G_i, 4) ground-truth boxes.
        gt_labels: per image, (G_i,) ground-truth classes.
        iou_threshold: a match needs IoU > iou_threshold (0.5 in the paper; IoU exactly 0.5 is a miss).

    Returns:
        AP in [0, 1]; NaN when there is no ground-truth box at all.
    """
    num_images = len(gt_boxes)
    if not len(pred_boxes) == len(scores) == len(pred_labels) == len(gt_labels) == num_images:
        raise ValueError(
            f'pred_boxes, scores, pred_labels, gt_boxes and gt_labels must list the same images, got lengths '
            f'{len(pred_boxes)}, {len(scores)}, {len(pred_labels)}, {num_images}, {len(gt_labels)}.')
    records = []  # (score, image, index in image)
    ious, matches = [], []
    num_gt = 0
    for i in range(num_images):
        pb, gb = _check_boxes(pred_boxes[i], f'pred_boxes[{i}]'), _check_boxes(gt_boxes[i], f'gt_boxes[{i}]')
        _check_tensor(scores[i], f'scores[{i}]', ndim=1)
        _check_tensor(pred_labels[i], f'pred_labels[{i}]', ndim=1, floating=False)
        _check_tensor(gt_labels[i], f'gt_labels[{i}]', ndim=1, floating=False)
        if not scores[i].shape[0] == pred_labels[i].shape[0] == pb.shape[0]:
            raise ValueError(f'Image {i}: pred_boxes, scores and pred_labels differ in length.')
        if gt_labels[i].shape[0] != gb.shape[0]:
            raise ValueError(f'Image {i}: gt_boxes and gt_labels differ in length.')
        iou = box_iou(pb.double(), gb.double())
        iou[pred_labels[i][:, None] != gt_labels[i][None, :]] = -1.
        ious.append(iou.numpy())
        matches.append(np.zeros(gb.shape[0], dtype=bool))
        records.extend((float(s), i, j) for j, s in enumerate(scores[i].tolist()))
        num_gt += gb.shape[0]
    if num_gt == 0:
        return float('nan')
    records.sort(key=lambda r: -r[0])
    tp = np.zeros(len(records))
    for n, (_, i, j) in enumerate(records):
        if ious[i].shape[1] == 0:
            continue
        best = int(ious[i][j].argmax())
        if ious[i][j, best] > iou_threshold and not matches[i][best]:
            matches[i][best] = True
            tp[n] = 1.
    tp_cum = np.cumsum(tp)
    recall = tp_cum / num_gt
    precision = tp_cum / np.arange(1, len(records) + 1)
    return _voc_ap(recall, precision)


class MaxBoxAccResult(NamedTuple):
    max_box_acc: float
    best_threshold: float
    accuracy: torch.Tensor
    thresholds: torch.Tensor


def _normalize_heatmaps(heatmaps: torch.Tensor) -> torch.Tensor:
    """Per-image min-max normalisation to [0, 1]; a constant map becomes all zeros (Choe et al.)."""
    flat = heatmaps.flatten(1).double()
    low = flat.min(dim=1, keepdim=True).values
    flat = flat - low
    high = flat.max(dim=1, keepdim=True).values
    flat = torch.where(high > 0, flat / high.clamp(min=torch.finfo(flat.dtype).tiny), torch.zeros_like(flat))
    return flat.view_as(heatmaps)


def _largest_component_box(mask: np.ndarray) -> Optional[Tuple[int, int, int, int]]:
    """Half-open box of the largest 8-connected component of a 2D mask (ties: first in raster order)."""
    from scipy import ndimage
    labels, num = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if num == 0:
        return None
    largest = int(np.bincount(labels.ravel())[1:].argmax())
    rows, cols = ndimage.find_objects(labels)[largest]
    return cols.start, rows.start, cols.stop, rows.stop


def _mask_box(mask: np.ndarray) -> Optional[Tuple[int, int, int, int]]:
    """Half-open box around every True pixel of a 2D mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return None
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _check_heatmaps(heatmaps: torch.Tensor, gt_boxes: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    _check_tensor(heatmaps, 'heatmaps', ndim=3, floating=True)
    if heatmaps.shape[0] == 0:
        raise ValueError('heatmaps must hold at least one image.')
    if len(gt_boxes) != heatmaps.shape[0]:
        raise ValueError(f'gt_boxes lists {len(gt_boxes)} images for {heatmaps.shape[0]} heat maps.')
    return [_check_boxes(b, f'gt_boxes[{i}]') for i, b in enumerate(gt_boxes)]


def max_box_acc(
        heatmaps: torch.Tensor,
        gt_boxes: Sequence[torch.Tensor],
        thresholds: Optional[Union[torch.Tensor, Sequence[float]]] = None,
        iou_threshold: float = 0.5,
        largest_component: bool = True,
) -> MaxBoxAccResult:
    """MaxBoxAcc of Choe et al., "Evaluating Weakly Supervised Object Localization Methods Right" (CVPR 2020).

    Each heat map is min-max normalised to [0, 1] (a constant map becomes zeros). For each threshold t, the mask is
    the pixels with value > t (as cv2.THRESH_BINARY in the authors' code) and the box is the tight box of its
    largest 8-connected component by pixel count (scipy.ndimage; the authors take the largest contour by area with
    OpenCV), or of the whole mask when `largest_component` is False (no scipy needed). An image is correct when its
    box has IoU >= `iou_threshold` with some ground-truth box; an empty mask or an image without ground truth is
    incorrect. MaxBoxAcc is the best accuracy over thresholds.

    Args:
        heatmaps: (B, H, W) maps at image resolution (upsample CAMs or patch maps first).
        gt_boxes: per image, (G_i, 4) boxes in the same pixel coordinates (a trailing label column is ignored).
        thresholds: (T,) thresholds in [0, 1]; default 0, 0.01, ..., 0.99 (the authors' `cam_curve_interval`).
        iou_threshold: IoU needed for a correct box (the paper's delta, 0.5).
        largest_component: box the largest connected component (default) rather than the whole mask.

    Returns:
        `MaxBoxAccResult`: max_box_acc, the best threshold (first of equals), accuracy per threshold (T,) and the
        thresholds.
    """
    gt_boxes = _check_heatmaps(heatmaps, gt_boxes)
    thresholds = torch.arange(100, dtype=torch.float64) / 100 if thresholds is None else thresholds
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64)
    if thresholds.ndim != 1 or not len(thresholds):
        raise ValueError(f'thresholds must be a non-empty 1D sequence, got shape {tuple(thresholds.shape)}.')
    if largest_component:
        try:
            import scipy.ndimage  # noqa: F401
        except ImportError as e:
            raise ImportError(
                'max_box_acc(largest_component=True) needs scipy (`pip install scipy`, or `pip install '
                '"timm-lossattn[digits]"` which brings it); pass largest_component=False to avoid it.') from e
    box_fn = _largest_component_box if largest_component else _mask_box
    maps = _normalize_heatmaps(heatmaps).numpy()
    correct = torch.zeros(len(thresholds), dtype=torch.float64)
    for cam, gt in zip(maps, gt_boxes):
        if not len(gt):
            continue
        # an empty mask gets the empty box (0, 0, 0, 0), whose IoU is 0
        boxes = [box_fn(cam > thr) or (0, 0, 0, 0) for thr in thresholds.tolist()]
        iou = box_iou(torch.tensor(boxes, dtype=torch.float64), gt.double()).amax(dim=1)
        correct += (iou >= iou_threshold).double()
    acc = correct / heatmaps.shape[0]
    best = int(acc.argmax())
    return MaxBoxAccResult(acc[best].item(), float(thresholds[best]), acc, thresholds)


def pointing_game(heatmaps: torch.Tensor, gt_boxes: Sequence[torch.Tensor], tolerance: float = 0.) -> float:
    """Pointing game of Zhang et al., "Top-down Neural Attention by Excitation Backprop" (ECCV 2016).

    A hit when the heat map's maximum pixel (the first in raster order on ties) lies in a ground-truth box (its
    centre (x + 0.5, y + 0.5) does, half-open) or, for tolerance > 0, when the distance from that centre to a box is
    <= tolerance (Zhang et al. use 15 px at ImageNet scale). An image without ground truth is a miss.

    Args:
        heatmaps: (B, H, W) maps at image resolution.
        gt_boxes: per image, (G_i, 4) boxes (a trailing label column is ignored).
        tolerance: allowed distance in pixels.

    Returns:
        Hit rate over the B images.
    """
    gt_boxes = _check_heatmaps(heatmaps, gt_boxes)
    if tolerance < 0:
        raise ValueError(f'tolerance must be >= 0, got {tolerance}.')
    width = heatmaps.shape[2]
    hits = 0
    for heatmap, gt in zip(heatmaps, gt_boxes):
        row, col = divmod(int(heatmap.flatten().argmax()), width)
        px, py = col + 0.5, row + 0.5
        inside = (gt[:, 0] <= px) & (px < gt[:, 2]) & (gt[:, 1] <= py) & (py < gt[:, 3])
        dx = torch.clamp(torch.maximum(gt[:, 0] - px, px - gt[:, 2]), min=0)
        dy = torch.clamp(torch.maximum(gt[:, 1] - py, py - gt[:, 3]), min=0)
        near = (dx.pow(2) + dy.pow(2) <= tolerance ** 2) & (tolerance > 0)
        hits += bool((inside | near).any())
    return hits / heatmaps.shape[0]


class PerturbationCurves(NamedTuple):
    fractions: torch.Tensor
    deletion: torch.Tensor
    insertion: torch.Tensor
    deletion_auc: torch.Tensor
    insertion_auc: torch.Tensor
    target: torch.Tensor


def _patch_masks(patch_boxes: torch.Tensor, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """(M, H, W) masks of the pixels whose centres lie in each (half-open) patch box."""
    ys = torch.arange(height, dtype=torch.float64) + 0.5
    xs = torch.arange(width, dtype=torch.float64) + 0.5
    b = patch_boxes.double()
    in_y = (ys[None] >= b[:, 1:2]) & (ys[None] < b[:, 3:4])
    in_x = (xs[None] >= b[:, 0:1]) & (xs[None] < b[:, 2:3])
    return (in_y[:, :, None] & in_x[:, None, :]).to(dtype)


def _call_model(
        model_fn: Callable[[torch.Tensor], torch.Tensor],
        images: torch.Tensor,
        batch_size: int,
) -> torch.Tensor:
    """Runs model_fn over images in chunks of batch_size and checks it returns (N, num_classes) probabilities."""
    outputs = []
    for chunk in images.split(batch_size):
        out = model_fn(chunk)
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != chunk.shape[0]:
            raise ValueError(
                f'model_fn must return a (N, num_classes) tensor for N={chunk.shape[0]} images, got '
                f'{getattr(out, "shape", type(out).__name__)}.')
        outputs.append(out)
    return torch.cat(outputs)


@torch.no_grad()
def deletion_insertion_curves(
        model_fn: Callable[[torch.Tensor], torch.Tensor],
        images: torch.Tensor,
        patch_order: torch.Tensor,
        patch_boxes: torch.Tensor,
        steps: Optional[int] = None,
        baseline: Union[float, torch.Tensor] = 0.,
        target: Optional[torch.Tensor] = None,
        batch_size: int = 64,
) -> PerturbationCurves:
    """Deletion and insertion curves of Petsiuk et al., "RISE: Randomized Input Sampling for Explanation of
    Black-box Models" (BMVC 2018), on patches.

    Patches are perturbed in the given order (most important first). At step s the first n_s = floor(s K / steps)
    patches of the K in `patch_order` are perturbed: deletion sets their pixels to the baseline in the image,
    insertion reveals them from the image on the baseline. Pixels are those whose centres lie in the patch box
    (boxes beyond the image are cut); overlapping patches are perturbed once. The curves record the probability of
    the target class; their AUC is the trapezoid rule over x = n_s / K in [0, 1]. A good explanation has a low
    deletion AUC and a high insertion AUC. Any map ordering the same patches works: patch weights
    (`weights.argsort(dim=1, descending=True)`) or a Grad-CAM map averaged over each patch box.

    Args:
        model_fn: maps images (N, C, H, W) to class probabilities (N, num_classes); called without grad.
        images: (B, C, H, W) images, normalised as model_fn expects.
        patch_order: (B, K) integer indices into patch_boxes, most important patch first.
        patch_boxes: (M, 4) input region of each patch.
        steps: number of perturbation steps; default K (one patch per step).
        baseline: value of deleted / not yet inserted pixels: a scalar or a tensor broadcastable to images (e.g.
            blurred images, as RISE uses for insertion).
        target: (B,) class whose probability is tracked; default the model's top-1 class on the original image.
        batch_size: most perturbed images per model_fn call.

    Returns:
        `PerturbationCurves`: fractions (steps + 1,) the x of each step, deletion and insertion (B, steps + 1)
        probabilities, deletion_auc and insertion_auc (B,), and the target (B,).
    """
    _check_tensor(images, 'images', ndim=4, floating=True)
    _check_tensor(patch_order, 'patch_order', ndim=2, floating=False)
    patch_boxes = _check_boxes(patch_boxes, 'patch_boxes')
    num_images, _, height, width = images.shape
    num_order = patch_order.shape[1]
    if patch_order.shape[0] != num_images:
        raise ValueError(f'patch_order has {patch_order.shape[0]} rows for {num_images} images.')
    if num_order == 0:
        raise ValueError('patch_order must list at least one patch.')
    if patch_order.min() < 0 or patch_order.max() >= patch_boxes.shape[0]:
        raise ValueError(f'patch_order indices must lie in [0, {patch_boxes.shape[0]}).')
    steps = num_order if steps is None else steps
    if not isinstance(steps, int) or steps <= 0:
        raise ValueError(f'steps must be a positive int, got {steps!r}.')
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise ValueError(f'batch_size must be a positive int, got {batch_size!r}.')
    try:
        baseline = torch.as_tensor(baseline, dtype=images.dtype).expand_as(images)
    except RuntimeError as e:
        raise ValueError(f'baseline must broadcast to images {tuple(images.shape)}.') from e
    if target is None:
        target = _call_model(model_fn, images, batch_size).argmax(dim=1)
    _check_tensor(target, 'target', ndim=1, floating=False)
    if target.shape[0] != num_images:
        raise ValueError(f'target has {target.shape[0]} entries for {num_images} images.')

    counts = torch.arange(steps + 1) * num_order // steps
    masks = _patch_masks(patch_boxes, height, width, images.dtype)
    images_per_call = max(1, batch_size // (2 * (steps + 1)))
    probs = []
    for start in range(0, num_images, images_per_call):
        end = min(start + images_per_call, num_images)
        cum = masks[patch_order[start:end]].cummax(dim=1).values  # (n, K, H, W)
        cum = torch.cat([cum.new_zeros(end - start, 1, height, width), cum], dim=1)[:, counts, None]
        image, base = images[start:end, None], baseline[start:end, None]
        deleted = image * (1 - cum) + base * cum
        inserted = base * (1 - cum) + image * cum
        batch = torch.stack([deleted, inserted], dim=1).flatten(0, 2)  # (n * 2 * (steps + 1), C, H, W)
        out = _call_model(model_fn, batch, batch_size).view(end - start, 2 * (steps + 1), -1)
        if target[start:end].max() >= out.shape[2] or target[start:end].min() < 0:
            raise ValueError(f'target must hold class indices in [0, {out.shape[2]}).')
        index = target[start:end, None, None].expand(-1, out.shape[1], 1)
        probs.append(out.gather(2, index)[..., 0].view(end - start, 2, steps + 1))
    probs = torch.cat(probs)
    fractions = counts.double() / num_order
    deletion, insertion = probs[:, 0], probs[:, 1]
    return PerturbationCurves(
        fractions=fractions,
        deletion=deletion,
        insertion=insertion,
        deletion_auc=torch.trapezoid(deletion.double(), fractions, dim=1),
        insertion_auc=torch.trapezoid(insertion.double(), fractions, dim=1),
        target=target,
    )

