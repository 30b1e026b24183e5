""" Patch geometry: which input box each patch covers

Receptive-field arithmetic over the chain of (kernel, stride, padding) of a network's main path. Boxes are float
(x0, y0, x1, y1) in input pixels, half-open, pixel i spanning [i, i + 1).
"""
from functools import lru_cache
from typing import List, NamedTuple, Sequence, Tuple

import torch

__all__ = ['PatchGeometry', 'LayerSpec', 'patch_geometry', 'min_input_size']

LayerSpec = Tuple[int, int, int]  # (kernel, stride, padding)


class PatchGeometry(NamedTuple):
    """Where the patches of a model lie in its input.

    Attributes:
        input_size: (H, W) of the input.
        grid_size: (rows, cols) of the patch grid; M = rows * cols, patches in row-major order.
        patch_boxes: (M, 4) nominal window of each patch: the trunk cells under the head's kernel, mapped to input.
        receptive_field_boxes: (M, 4) theoretical receptive field of each patch, clipped to the image.
        patch_size: (h, w) of a nominal window in input pixels.
        patch_stride: (h, w) input pixels between neighbouring patches.
    """
    input_size: Tuple[int, int]
    grid_size: Tuple[int, int]
    patch_boxes: torch.Tensor
    receptive_field_boxes: torch.Tensor
    patch_size: Tuple[float, float]
    patch_stride: Tuple[float, float]

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]


class _Axis(NamedTuple):
    size: int  # output size
    jump: float  # input pixels between neighbouring outputs
    start: float  # input coordinate of the centre of output 0
    rf: float  # receptive field size


def _walk(size: int, layers: Sequence[LayerSpec], axis: _Axis) -> _Axis:
    jump, start, rf = axis.jump, axis.start, axis.rf
    for kernel, stride, padding in layers:
        size = (size + 2 * padding - kernel) // stride + 1
        start = start + ((kernel - 1) / 2 - padding) * jump
        rf = rf + (kernel - 1) * jump
        jump = jump * stride
    return _Axis(size, jump, start, rf)


def min_input_size(trunk_layers: Sequence[LayerSpec], head_layers: Sequence[LayerSpec]) -> int:
    """Smallest square input for which every layer of the chain has at least one output."""
    size = 1
    while size < 1 << 16:
        current, ok = size, True
        for kernel, stride, padding in list(trunk_layers) + list(head_layers):
            current = (current + 2 * padding - kernel) // stride + 1
            if current < 1:
                ok = False
                break
        if ok:
            return size
        size += 1
    raise ValueError('no input size up to 65536 fits these layers')


def patch_geometry(
        input_size: Tuple[int, int],
        trunk_layers: Sequence[LayerSpec],
        head_layers: Sequence[LayerSpec],
        head_kernel: int,
        head_stride: int,
) -> PatchGeometry:
    """Patch boxes for an input size.

    Computed once per distinct set of arguments (the arithmetic costs far more than a lookup, and an explanation
    asks for it on every call); the boxes returned are the caller's own copies.

    Args:
        input_size: (H, W) of the input.
        trunk_layers: (kernel, stride, padding) of the trunk's main path, in order.
        head_layers: (kernel, stride, padding) of the head's spatial layers, in order.
        head_kernel: Kernel of the head's patch conv (the nominal window in trunk cells).
        head_stride: Stride of the head's patch conv.

    Returns:
        The patch geometry.
    """
    geometry = _patch_geometry(
        tuple(input_size), tuple(map(tuple, trunk_layers)), tuple(map(tuple, head_layers)), head_kernel, head_stride)
    return geometry._replace(
        patch_boxes=geometry.patch_boxes.clone(), receptive_field_boxes=geometry.receptive_field_boxes.clone())


@lru_cache(maxsize=256)
def _patch_geometry(
        input_size: Tuple[int, int],
        trunk_layers: Tuple[LayerSpec, ...],
        head_layers: Tuple[LayerSpec, ...],
        head_kernel: int,
        head_stride: int,
) -> PatchGeometry:
    centres: List[torch.Tensor] = []
    windows: List[torch.Tensor] = []
    grid: List[int] = []
    rf_sizes: List[float] = []
    size_px: List[float] = []
    stride_px: List[float] = []
    for size in input_size:
        trunk = _walk(size, trunk_layers, _Axis(size, 1.0, 0.5, 1.0))
        head = _walk(trunk.size, head_layers, trunk)
        if trunk.size < 1 or head.size < 1:
            raise ValueError(f'input size {tuple(input_size)} is too small for this model')
        index = torch.arange(head.size, dtype=torch.float64)
        first_cell = trunk.start + index * head_stride * trunk.jump - trunk.jump / 2
        windows.append(torch.stack([first_cell, first_cell + head_kernel * trunk.jump], -1))
        centres.append(head.start + index * head.jump)
        grid.append(head.size)
        rf_sizes.append(head.rf)
        size_px.append(head_kernel * trunk.jump)
        stride_px.append(head_stride * trunk.jump)
    (wy, wx), (cy, cx) = windows, centres
    rows, cols = grid
    wy, wx = wy[:, None, :].expand(rows, cols, 2), wx[None, :, :].expand(rows, cols, 2)
    patch_boxes = torch.stack([wx[..., 0], wy[..., 0], wx[..., 1], wy[..., 1]], -1).reshape(-1, 4)
    cy, cx = cy[:, None].expand(rows, cols), cx[None, :].expand(rows, cols)
    half_y, half_x = rf_sizes[0] / 2, rf_sizes[1] / 2
    rf_boxes = torch.stack([cx - half_x, cy - half_y, cx + half_x, cy + half_y], -1).reshape(-1, 4)
    limits = torch.tensor([input_size[1], input_size[0], input_size[1], input_size[0]], dtype=torch.float64)
    rf_boxes = torch.minimum(rf_boxes.clamp_min(0), limits)
    return PatchGeometry(
        input_size=(int(input_size[0]), int(input_size[1])),
        grid_size=(rows, cols),
        patch_boxes=patch_boxes.float(),
        receptive_field_boxes=rf_boxes.float(),
        patch_size=(size_px[0], size_px[1]),
        patch_stride=(stride_px[0], stride_px[1]),
    )
