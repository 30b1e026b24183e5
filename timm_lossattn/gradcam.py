""" Grad-CAM on loss-attention models, for the paper's comparison with loss-based attention (Fig. 4)

Grad-CAM (Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based Localization",
ICCV 2017) weighs the channels of a layer's activations by their spatially averaged gradients of a class score.

Implementation: the `grad-cam` package from PyPI (`pytorch_grad_cam.GradCAM`), which is the reference
implementation the literature uses; it fits once the model returns a tensor, so the model is wrapped to return only
its image logits (`LossAttnOutput.logits`). The target layer is the last trunk stage (`feature_info[-1]`: `layer4`
of the ResNets, the last block of `features` of the VGGs), the map the patch head reads, which keeps the image's
layout as the strides are removed. The package min-max normalises each map to [0, 1] and resizes it to the input.
It is imported on first use (`pip install "timm-lossattn[gradcam]"`).

`pool_to_patches` averages a pixel heat map over each patch box, so Grad-CAM and the patch weights rank the same
patches and `metrics.deletion_insertion_curves` compares both on the same patch order.
"""
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn

from .layers import PatchGeometry

__all__ = ['gradcam', 'gradcam_target_layer', 'pool_to_patches']

_GRADCAM_HINT = 'pip install "timm-lossattn[gradcam]"'


class _LogitsOnly(nn.Module):
    """Wraps a model so that it returns the image logits as a tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return out.logits if hasattr(out, 'logits') else out


def gradcam_target_layer(model: nn.Module) -> nn.Module:
    """The last trunk stage of a model, from its timm `feature_info`.

    Args:
        model: A timm model with `feature_info` (every `lossattn_*` model).

    Returns:
        The module whose output Grad-CAM explains.
    """
    info = getattr(model, 'feature_info', None)
    if not info:
        raise ValueError(f'{type(model).__name__} has no feature_info: pass target_layer explicitly')
    return model.get_submodule(info[-1]['module'])


def gradcam(
        model: nn.Module,
        images: torch.Tensor,
        target_classes: Optional[Union[torch.Tensor, Sequence[int]]] = None,
        target_layer: Optional[nn.Module] = None,
) -> torch.Tensor:
    """Grad-CAM heat maps of a batch.

    Args:
        model: A `lossattn_*` model (returning `LossAttnOutput` or logits) or any classifier returning logits.
        images: (B, C, H, W) images normalised as the model expects.
        target_classes: (B,) class explained per image; default the predicted class.
        target_layer: Layer whose activations and gradients are used; default `gradcam_target_layer(model)`.

    Returns:
        (B, H, W) float maps in [0, 1] at the input resolution.
    """
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as e:
        raise ImportError(f'Grad-CAM needs the grad-cam package: {_GRADCAM_HINT}') from e
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f'images must be a (B, C, H, W) tensor, got {getattr(images, "shape", type(images))}')
    target_layer = gradcam_target_layer(model) if target_layer is None else target_layer
    targets = None
    if target_classes is not None:
        target_classes = torch.as_tensor(target_classes).flatten().tolist()
        if len(target_classes) != images.shape[0]:
            raise ValueError(f'got {len(target_classes)} target classes for {images.shape[0]} images')
        targets = [ClassifierOutputTarget(int(k)) for k in target_classes]
    was_training = model.training
    try:
        with GradCAM(model=_LogitsOnly(model), target_layers=[target_layer]) as cam:
            maps = cam(input_tensor=images, targets=targets)
    finally:
        model.train(was_training)
    return torch.from_numpy(maps).float()


def pool_to_patches(heatmaps: torch.Tensor, geometry: PatchGeometry) -> torch.Tensor:
    """Average pixel heat maps over each patch box (the part inside the image).

    Args:
        heatmaps: (B, H, W) maps at the input size of `geometry`.
        geometry: The model's patch geometry.

    Returns:
        (B, M) mean of each map over the pixels whose centres lie in each patch box, row-major like patch weights.
    """
    height, width = geometry.input_size
    if heatmaps.dim() != 3 or tuple(heatmaps.shape[1:]) != (height, width):
        raise ValueError(f'heatmaps must be (B, {height}, {width}), got shape {tuple(heatmaps.shape)}')
    boxes = geometry.patch_boxes.double()
    ys = torch.arange(height, dtype=torch.float64) + 0.5
    xs = torch.arange(width, dtype=torch.float64) + 0.5
    in_y = (ys[None] >= boxes[:, 1:2]) & (ys[None] < boxes[:, 3:4])
    in_x = (xs[None] >= boxes[:, 0:1]) & (xs[None] < boxes[:, 2:3])
    masks = (in_y[:, :, None] & in_x[:, None, :]).to(heatmaps.dtype)  # (M, H, W)
    counts = masks.sum(dim=(1, 2)).clamp_min(1)
    return torch.einsum('bhw,mhw->bm', heatmaps, masks.to(heatmaps.device)) / counts.to(heatmaps.device)
