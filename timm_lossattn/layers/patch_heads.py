""" Patch heads: turn a trunk feature map into patch instances

The conv head and the capsule head of `Loss-based Attention for Interpreting Image-level Prediction of
Convolutional Neural Networks` - https://doi.org/10.1109/TIP.2020.3046875 (Shi et al., IEEE TIP 2021).
Both return instances (B, C, M, D): C = 1 for the conv head, C capsule channels for the capsule head.
"""
from typing import List, Tuple, Type

import torch
import torch.nn as nn

__all__ = ['ConvPatchHead', 'CapsulePatchHead', 'patch_head_layers']


def patch_head_layers(in_chs: int, width: int, kernel_size: int, stride: int) -> List[Tuple[int, int, int]]:
    """(kernel, stride, padding) of the head's spatial layers, for the patch geometry."""
    layers = [(1, 1, 0)] if in_chs != width else []
    return layers + [(kernel_size, stride, 0), (1, 1, 0)]


def _conv_norm_act(
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int,
        norm_layer: Type[nn.Module],
        act_layer: Type[nn.Module],
        device=None,
        dtype=None,
) -> nn.Sequential:
    dd = dict(device=device, dtype=dtype)
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, bias=False, **dd),
        norm_layer(out_chs, **dd),
        act_layer(inplace=True),
    )


class ConvPatchHead(nn.Module):
    """Conv head: conv k x k / s (no bias) + BN + ReLU, then conv 1x1 + BN + ReLU; each output location is a patch.

    A trunk wider than `width` (ResNet50's 2048 channels) is first reduced by a 1x1 conv + BN + ReLU, as in the
    authors' ResNet50.
    """

    def __init__(
            self,
            in_chs: int,
            width: int = 512,
            kernel_size: int = 9,
            stride: int = 4,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            act_layer: Type[nn.Module] = nn.ReLU,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_chs: Trunk channels.
            width: Channels of the head and the patch feature dim D (paper: 512).
            kernel_size: Patch kernel of the first head conv (paper: 9).
            stride: Stride of the first head conv (paper: 4).
        """
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.kernel_size = kernel_size
        self.stride = stride
        self.num_features = width
        self.reduce = _conv_norm_act(in_chs, width, 1, 1, norm_layer, act_layer, **dd) \
            if in_chs != width else nn.Identity()
        self.conv_patch = _conv_norm_act(width, width, kernel_size, stride, norm_layer, act_layer, **dd)
        self.conv_mix = _conv_norm_act(width, width, 1, 1, norm_layer, act_layer, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_mix(self.conv_patch(self.reduce(x)))
        return x.flatten(2).transpose(1, 2).unsqueeze(1)  # (B, 1, M, D)


class CapsulePatchHead(nn.Module):
    """Capsule head (Eq. 6, Eq. 11).

    First capsule layer: one k x k / s conv to `primary_caps * primary_dim` channels + BN + ReLU, read as
    `primary_caps` capsules of dim `primary_dim` per location; Eq. 11 turns each into a scalar
    relu(||u||_2 - b_k) with a learnable per-channel b (the norm is taken safely: an all-zero capsule gives a
    zero gradient, not the authors' NaN). Second capsule layer: conv 1x1 from `primary_caps` to
    `num_caps * caps_dim` + BN + ReLU, giving `num_caps` capsules of dim `caps_dim` at every location.
    """

    def __init__(
            self,
            in_chs: int,
            primary_caps: int = 32,
            primary_dim: int = 16,
            num_caps: int = 64,
            caps_dim: int = 128,
            kernel_size: int = 9,
            stride: int = 4,
            reduce_width: int = 512,
            norm_layer: Type[nn.Module] = nn.BatchNorm2d,
            act_layer: Type[nn.Module] = nn.ReLU,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_chs: Trunk channels.
            primary_caps: Capsule channels of the first capsule layer (paper: 32).
            primary_dim: Capsule dim of the first capsule layer (paper: 16).
            num_caps: Capsule channels C of the second capsule layer (paper: 64).
            caps_dim: Capsule dim D of the second layer, the instance feature dim (paper: 128).
            kernel_size: Patch kernel of the first capsule conv (paper: 9).
            stride: Stride of the first capsule conv (paper: 4).
            reduce_width: Width of the 1x1 reduction used when the trunk is wider than this (ResNet50).
        """
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.kernel_size = kernel_size
        self.stride = stride
        self.primary_caps = primary_caps
        self.primary_dim = primary_dim
        self.num_caps = num_caps
        self.caps_dim = caps_dim
        self.num_features = caps_dim
        width = min(in_chs, reduce_width)
        self.reduce = _conv_norm_act(in_chs, width, 1, 1, norm_layer, act_layer, **dd) \
            if in_chs != width else nn.Identity()
        self.conv_primary = _conv_norm_act(
            width, primary_caps * primary_dim, kernel_size, stride, norm_layer, act_layer, **dd)
        self.primary_bias = nn.Parameter(torch.zeros(primary_caps, **dd))
        self.conv_caps = _conv_norm_act(primary_caps, num_caps * caps_dim, 1, 1, norm_layer, act_layer, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_primary(self.reduce(x))
        B, _, H, W = x.shape
        u = x.reshape(B, self.primary_caps, self.primary_dim, H, W)
        length = torch.linalg.vector_norm(u.float(), dim=2).to(x.dtype)  # zero-safe gradient at u = 0
        x = torch.relu(length - self.primary_bias.reshape(1, -1, 1, 1).to(x.dtype))  # Eq. 11
        x = self.conv_caps(x)
        x = x.reshape(B, self.num_caps, self.caps_dim, H * W)
        return x.transpose(2, 3)  # (B, C, M, D)
