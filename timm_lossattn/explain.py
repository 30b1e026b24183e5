""" Explanations of loss-attention models: heat maps, selected patches, estimated boxes and pictures

`Loss-based Attention for Interpreting Image-level Prediction of Convolutional Neural Networks`
    - https://doi.org/10.1109/TIP.2020.3046875 (Shi et al., IEEE TIP 2021)

One forward pass gives, per image, the top-k classes with their scores, the patch weights a_m on the patch grid and
upsampled to the image, the selected patches (a_m > 0) with their input boxes, and the paper's estimated object box
(the minimum square containing the selected patches, `metrics.box_from_patches`).

Upsampling: the grid map is interpolated bilinearly between the patch centres given by `model.patch_geometry` (and
held constant beyond the outermost centres), so every pixel takes the weight of the patches whose centres are
nearest to it. This keeps the map aligned with the patch boxes whatever the model's stride and padding, where a plain
`F.interpolate` of the grid to the image size would stretch the grid over the uncovered border.

Multi-label models: the score of a class is the sigmoid of its image logit, and the map of class k is
a_m * sigmoid(p_mk) normalised to sum 1 over the patches, i.e. the attention restricted to patches that vote for k.
Its box is the minimum square around the selected patches whose own decision is k (sigmoid(p_mk) > 0.5), or None
when no selected patch votes for k.

Pictures need matplotlib (`pip install "timm-lossattn[plots]"`), imported on first use; figures are drawn with the
Agg canvas, never through pyplot's global state.
"""
import os
from typing import TYPE_CHECKING, List, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import PatchGeometry
from .metrics import boxes_from_patches

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from PIL import Image

__all__ = ['Explanation', 'explain', 'upsample_patch_map', 'render_explanation', 'render_grid']

_PLOTS_HINT = 'pip install "timm-lossattn[plots]"'

ImageLike = Union[torch.Tensor, np.ndarray, 'Image.Image']


class Explanation(NamedTuple):
    """The explanation of one image.

    Attributes:
        classes: (k,) top-k class indices, best first.
        scores: (k,) their probabilities (softmax for single-label, sigmoid for multi-label).
        labels: Names of the top-k classes (class indices as strings when no names were given).
        weights: (M,) patch weights a_m, >= 0, summing to 1, row-major over the grid.
        weight_map: (rows, cols) the patch weights on the patch grid.
        heatmap: (H, W) the patch weights upsampled to the image (bilinear between patch centres).
        selected: (M,) bool, patches with a_m > 0.
        selected_boxes: (S, 4) input boxes (x0, y0, x1, y1) of the selected patches.
        box: (4,) estimated object box, the minimum square around the selected patches clipped to the image; None
            when no patch is selected.
        geometry: The model's patch geometry at this input size.
        multi_label: Whether scores and class maps use sigmoids.
        class_maps: Multi-label only: (k, rows, cols) map of each top-k class, a_m * sigmoid(p_mk) normalised.
        class_boxes: Multi-label only: estimated box of each top-k class (None where no selected patch votes for it).
        image: (3, H, W) image in [0, 1] for drawing, when given to `explain`.
    """
    classes: torch.Tensor
    scores: torch.Tensor
    labels: List[str]
    weights: torch.Tensor
    weight_map: torch.Tensor
    heatmap: torch.Tensor
    selected: torch.Tensor
    selected_boxes: torch.Tensor
    box: Optional[torch.Tensor]
    geometry: PatchGeometry
    multi_label: bool = False
    class_maps: Optional[torch.Tensor] = None
    class_boxes: Optional[List[Optional[torch.Tensor]]] = None
    image: Optional[torch.Tensor] = None

    def to_dict(self) -> dict:
        """JSON-ready summary: classes, scores, weights on the grid, selected patch boxes and the estimated box."""
        out = {
            'classes': self.classes.tolist(),
            'labels': list(self.labels),
            'scores': [round(s, 6) for s in self.scores.tolist()],
            'input_size': list(self.geometry.input_size),
            'grid_size': list(self.geometry.grid_size),
            'weights': [[round(w, 6) for w in row] for row in self.weight_map.tolist()],
            'selected_patches': self.selected.nonzero().flatten().tolist(),
            'selected_boxes': self.selected_boxes.tolist(),
            'box': None if self.box is None else self.box.tolist(),
            'multi_label': self.multi_label,
        }
        if self.class_boxes is not None:
            out['class_boxes'] = [None if b is None else b.tolist() for b in self.class_boxes]
        return out


def upsample_patch_map(patch_map: torch.Tensor, geometry: PatchGeometry) -> torch.Tensor:
    """Upsample maps on the patch grid to the image, bilinear between patch centres.

    Args:
        patch_map: (..., rows, cols) maps on the grid of `geometry`.
        geometry: The model's patch geometry at the image size.

    Returns:
        (..., H, W) maps; pixels beyond the outermost patch centres take the value of the nearest centre.
    """
    rows, cols = geometry.grid_size
    if tuple(patch_map.shape[-2:]) != (rows, cols):
        raise ValueError(f'patch_map must end in the grid size {(rows, cols)}, got shape {tuple(patch_map.shape)}')
    height, width = geometry.input_size
    boxes = geometry.patch_boxes.double()
    cx = (boxes[:cols, 0] + boxes[:cols, 2]) / 2
    cy = (boxes[::cols, 1] + boxes[::cols, 3]) / 2

    def _coords(centres: torch.Tensor, size: int) -> torch.Tensor:
        # pixel centres in grid_sample's align_corners=True coordinates, where -1 / 1 are the first / last centre
        if len(centres) == 1:
            return torch.zeros(size, dtype=torch.float64)
        step = (centres[-1] - centres[0]) / (len(centres) - 1)
        return ((torch.arange(size, dtype=torch.float64) + 0.5 - centres[0]) / step) / (len(centres) - 1) * 2 - 1

    gy, gx = torch.meshgrid(_coords(cy, height), _coords(cx, width), indexing='ij')
    grid = torch.stack([gx, gy], -1)[None].to(patch_map.dtype if patch_map.is_floating_point() else torch.float32)
    lead = patch_map.shape[:-2]
    maps = patch_map.reshape(1, -1, rows, cols).to(grid.dtype)
    out = F.grid_sample(maps, grid.to(maps.device), mode='bilinear', padding_mode='border', align_corners=True)
    return out.reshape(*lead, height, width)


@torch.no_grad()
def explain(
        model: nn.Module,
        images: torch.Tensor,
        topk: int = 5,
        multi_label: bool = False,
        class_names: Optional[Sequence[str]] = None,
        display_images: Optional[torch.Tensor] = None,
) -> List[Explanation]:
    """Explain a batch of images with one forward pass of a loss-attention model.

    The model runs in eval mode without gradients; its training mode is restored afterwards.

    Args:
        model: A `lossattn_*` model returning `LossAttnOutput` (created with `return_patches=True`, the default).
        images: (B, C, H, W) images normalised as the model expects; any size the model accepts.
        topk: Number of classes reported (capped at the number of classes).
        multi_label: Score classes with sigmoids and add per-class maps (Eq. 10 models) instead of a softmax.
        class_names: Names of the classes, for the labels.
        display_images: Optional (B, 3, H, W) unnormalised images in [0, 1], kept in the explanations for drawing.

    Returns:
        One `Explanation` per image.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f'images must be a (B, C, H, W) tensor, got {getattr(images, "shape", type(images))}')
    if display_images is not None and (display_images.shape[0] != images.shape[0]
                                       or display_images.shape[-2:] != images.shape[-2:]):
        raise ValueError(
            f'display_images {tuple(display_images.shape)} must match the batch and size of images '
            f'{tuple(images.shape)}')
    if not hasattr(model, 'patch_geometry'):
        raise TypeError(f'{type(model).__name__} has no patch_geometry: explain needs a lossattn_* model')
    was_training = model.training
    switch_mode = any(m.training for m in model.modules())  # train()/eval() walk every module: skip when eval
    if switch_mode:
        model.eval()
    try:
        output = model(images)
    finally:
        if switch_mode:
            model.train(was_training)
    if not hasattr(output, 'patch_weights'):
        raise TypeError('the model returned plain logits: create it with return_patches=True to explain it')
    geometry = model.patch_geometry(tuple(images.shape[-2:]))
    rows, cols = geometry.grid_size
    logits = output.logits.float().cpu()
    weights = output.patch_weights.float().cpu()
    patch_logits = output.patch_logits.float().cpu()
    if weights.shape[1] != geometry.num_patches:
        raise ValueError(f'the model gave {weights.shape[1]} patch weights for a {rows}x{cols} patch grid')
    probs = logits.sigmoid() if multi_label else logits.softmax(dim=1)
    scores, classes = probs.topk(min(topk, probs.shape[1]), dim=1)
    heatmaps = upsample_patch_map(weights.view(-1, rows, cols), geometry)
    boxes, found = boxes_from_patches(weights, geometry.patch_boxes, geometry.input_size)
    found = found.tolist()
    if class_names is not None and len(class_names) != probs.shape[1]:
        raise ValueError(f'class_names lists {len(class_names)} names for a model with {probs.shape[1]} classes')

    explanations = []
    for i in range(images.shape[0]):
        w = weights[i]
        selected = w > 0
        class_maps = class_boxes = None
        if multi_label:
            patch_probs = patch_logits[i][:, classes[i]].sigmoid().t()  # (k, M)
            maps = w[None] * patch_probs
            maps = maps / maps.sum(dim=1, keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)
            class_maps = maps.view(-1, rows, cols)
            votes, voted = boxes_from_patches(w[None] * (patch_probs > 0.5), geometry.patch_boxes, geometry.input_size)
            class_boxes = [box if any_vote else None for box, any_vote in zip(votes, voted.tolist())]
        explanations.append(Explanation(
            classes=classes[i],
            scores=scores[i],
            labels=[class_names[c] if class_names is not None else str(c) for c in classes[i].tolist()],
            weights=w,
            weight_map=w.view(rows, cols),
            heatmap=heatmaps[i],
            selected=selected,
            selected_boxes=geometry.patch_boxes[selected],
            box=boxes[i] if found[i] else None,
            geometry=geometry,
            multi_label=multi_label,
            class_maps=class_maps,
            class_boxes=class_boxes,
            image=None if display_images is None else display_images[i].detach().float().cpu(),
        ))
    return explanations


def _import_matplotlib():
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.patches import Rectangle
    except ImportError as e:
        raise ImportError(f'drawing explanations needs matplotlib: {_PLOTS_HINT}') from e
    return matplotlib, FigureCanvasAgg, Figure, Rectangle


def _to_hwc(image: ImageLike) -> np.ndarray:
    """An image as an (H, W, 3) float array in [0, 1]."""
    if isinstance(image, torch.Tensor):
        array = image.detach().float().cpu().numpy()
        if array.ndim == 3 and array.shape[0] in (1, 3):
            array = array.transpose(1, 2, 0)
    else:
        array = np.asarray(image)
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / 255
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(f'image must be (3, H, W), (H, W, 3) or (H, W), got shape {array.shape}')
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.clip(array, 0, 1)


def _draw(
        ax,
        image: Optional[ImageLike],
        explanation: Explanation,
        gt_boxes: Optional[torch.Tensor],
        show_patches: bool,
        cmap: str,
        alpha: float,
) -> None:
    matplotlib, _, _, Rectangle = _import_matplotlib()
    image = explanation.image if image is None else image
    height, width = explanation.geometry.input_size
    extent = (0, width, height, 0)  # data coordinates are pixel coordinates, box corners land on pixel edges
    if image is not None:
        array = _to_hwc(image)
        if array.shape[:2] != (height, width):
            raise ValueError(
                f'image of size {array.shape[:2]} does not match the explanation of size {(height, width)}')
        ax.imshow(array, extent=extent, interpolation='nearest')
    heat = explanation.heatmap.numpy()
    heat = heat / heat.max() if heat.max() > 0 else heat
    ax.imshow(heat, extent=extent, cmap=matplotlib.colormaps[cmap], vmin=0, vmax=1, alpha=alpha,
              interpolation='bilinear')

    def _box(box, **kwargs):
        x0, y0, x1, y1 = [float(v) for v in box[:4]]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, **kwargs))

    if show_patches:
        for box in explanation.selected_boxes:
            _box(box, edgecolor='white', linewidth=0.5, alpha=0.35)
    if gt_boxes is not None:
        for box in gt_boxes:
            _box(box, edgecolor='lime', linewidth=1.5, linestyle='--')
    if explanation.box is not None:
        _box(explanation.box, edgecolor='cyan', linewidth=1.5)
    top = zip(explanation.labels[:3], explanation.scores.tolist())
    title = ', '.join(f'{label} {score:.2f}' for label, score in top)
    ax.set_title(title, fontsize=8)
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.set_axis_off()


def _save(fig: 'Figure', path: Optional[Union[str, os.PathLike]], canvas_cls) -> 'Figure':
    canvas_cls(fig)
    if path is not None:
        fig.savefig(os.fspath(path), format='png')
    return fig


def render_explanation(
        image: Optional[ImageLike],
        explanation: Explanation,
        gt_boxes: Optional[torch.Tensor] = None,
        path: Optional[Union[str, os.PathLike]] = None,
        show_patches: bool = True,
        cmap: str = 'jet',
        alpha: float = 0.45,
        size: float = 3.0,
        dpi: int = 100,
) -> 'Figure':
    """Draw one explanation: heat map over the image, selected patches, estimated box (cyan), GT boxes (green).

    Args:
        image: (3, H, W) tensor or (H, W, 3) array in [0, 1] (uint8 arrays and PIL images in [0, 255]); None uses
            `explanation.image`, or draws the heat map alone.
        explanation: From `explain`.
        gt_boxes: Optional (N, 4) or (N, 5) ground-truth boxes, drawn dashed.
        path: Where to write the PNG; None only returns the figure.
        show_patches: Outline the selected patches (thin white lines).
        cmap: matplotlib colormap of the heat map.
        alpha: Opacity of the heat map.
        size: Figure side in inches.
        dpi: Resolution of the PNG.

    Returns:
        The matplotlib Figure (Agg canvas).
    """
    _, canvas_cls, Figure, _ = _import_matplotlib()
    fig = Figure(figsize=(size, size + 0.25), dpi=dpi, layout='constrained')
    _draw(fig.add_subplot(), image, explanation, gt_boxes, show_patches, cmap, alpha)
    return _save(fig, path, canvas_cls)


def render_grid(
        images: Optional[Sequence[Optional[ImageLike]]],
        explanations: Sequence[Explanation],
        gt_boxes: Optional[Sequence[Optional[torch.Tensor]]] = None,
        path: Optional[Union[str, os.PathLike]] = None,
        ncols: int = 4,
        show_patches: bool = True,
        cmap: str = 'jet',
        alpha: float = 0.45,
        size: float = 2.0,
        dpi: int = 100,
) -> 'Figure':
    """Draw a batch of explanations as a grid of `render_explanation` panels.

    Args:
        images: One image per explanation (see `render_explanation`), or None to use `explanation.image`.
        explanations: From `explain`.
        gt_boxes: Optional ground-truth boxes per image.
        path: Where to write the PNG; None only returns the figure.
        ncols: Panels per row.
        show_patches: Outline the selected patches.
        cmap: matplotlib colormap of the heat maps.
        alpha: Opacity of the heat maps.
        size: Side of one panel in inches.
        dpi: Resolution of the PNG.

    Returns:
        The matplotlib Figure (Agg canvas).
    """
    _, canvas_cls, Figure, _ = _import_matplotlib()
    count = len(explanations)
    if count == 0:
        raise ValueError('render_grid needs at least one explanation')
    images = [None] * count if images is None else list(images)
    gt_boxes = [None] * count if gt_boxes is None else list(gt_boxes)
    if len(images) != count or len(gt_boxes) != count:
        raise ValueError(f'got {len(images)} images and {len(gt_boxes)} box sets for {count} explanations')
    ncols = max(1, min(ncols, count))
    nrows = -(-count // ncols)
    fig = Figure(figsize=(size * ncols, (size + 0.25) * nrows), dpi=dpi, layout='constrained')
    axes = fig.subplots(nrows, ncols, squeeze=False).flatten()
    for ax, image, explanation, boxes in zip(axes, images, explanations, gt_boxes):
        _draw(ax, image, explanation, boxes, show_patches, cmap, alpha)
    for ax in axes[count:]:
        ax.set_axis_off()
    return _save(fig, path, canvas_cls)
