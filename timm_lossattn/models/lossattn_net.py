""" Loss-based attention network: the head and the model contract shared by every trunk

`Loss-based Attention for Interpreting Image-level Prediction of Convolutional Neural Networks`
    - https://doi.org/10.1109/TIP.2020.3046875 (Shi et al., IEEE TIP 2021)

A trunk (ResNet or VGG without its strides) keeps the image's layout; a patch head (conv or capsule) turns the
trunk map into patches; a patch pool weighs the patch decisions into the image decision. Subclasses build the
trunk and implement `_forward_trunk`, `_trunk_layers`, `forward_intermediates` and `prune_intermediate_layers`.
"""
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import get_device_dtype, register_notrace_function

from ..layers import (
    POOL_TYPES, CapsulePatchHead, ConvPatchHead, LayerSpec, PatchGeometry, create_patch_pool, min_input_size,
    patch_geometry, patch_head_layers,
)

__all__ = ['LossAttnOutput', 'LossAttnNet', 'HEAD_TYPES', 'lossattn_cfg', 'check_input', 'check_stage_strides']

HEAD_TYPES = ('conv', 'caps')


class LossAttnOutput(NamedTuple):
    """What a loss-attention model returns.

    Attributes:
        logits: Image logits (B, K).
        patch_weights: Patch weights (B, M), >= 0, summing to 1 per image; M = patch grid rows x cols, row-major.
        patch_logits: Patch logits (B, M, K). For the capsule head, the logits of a location are the
            attention-weighted mean of its capsules' logits.
    """
    logits: torch.Tensor
    patch_weights: torch.Tensor
    patch_logits: torch.Tensor


@register_notrace_function
def check_input(x: torch.Tensor, in_chans: int, min_size: int) -> None:
    """Raise a clear error for an input the model cannot take (FX leaf, scriptable)."""
    if not x.is_floating_point():
        raise TypeError(f'expected a floating point image tensor, got dtype {x.dtype}')
    if x.dim() != 4:
        raise ValueError(f'expected an image batch of shape (B, C, H, W), got shape {list(x.shape)}')
    if x.shape[1] != in_chans:
        raise ValueError(f'expected {in_chans} input channels, got {x.shape[1]} (input shape {list(x.shape)})')
    if x.shape[2] < min_size or x.shape[3] < min_size:
        raise ValueError(
            f'input of {x.shape[2]}x{x.shape[3]} is too small for the patch head: '
            f'the smallest input this model accepts is {min_size}x{min_size}')


def check_stage_strides(stage_strides: Sequence[int], num_stages: int) -> Tuple[int, ...]:
    stage_strides = tuple(int(s) for s in stage_strides)
    if len(stage_strides) != num_stages or any(s not in (1, 2) for s in stage_strides):
        raise ValueError(f'stage_strides must be {num_stages} values, each 1 or 2; got {stage_strides}')
    return stage_strides


def lossattn_cfg(**kwargs) -> Dict[str, Any]:
    """Default pretrained cfg of the family: the paper's 32x32 inputs, 10 classes."""
    return {
        'url': '',
        'num_classes': 10, 'input_size': (3, 32, 32), 'pool_size': (32, 32),
        'crop_pct': 1.0, 'interpolation': 'bilinear',
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'conv1', 'classifier': 'head.fc',
        'license': 'apache-2.0',
        'paper_ids': 'doi:10.1109/TIP.2020.3046875',
        'paper_name': 'Loss-based Attention for Interpreting Image-level Prediction of Convolutional Neural Networks',
        **kwargs,
    }


class LossAttnNet(nn.Module):
    """Base of the loss-attention models: patch head, patch pool and the timm model contract."""

    def _init_head(
            self,
            num_features: int,
            num_classes: int,
            in_chans: int,
            head_type: str,
            pool: str,
            xi: float,
            global_pool: Optional[str],
            drop_rate: float,
            return_patches: bool,
            head_width: int,
            head_kernel_size: int,
            head_stride: int,
            caps_dims: Tuple[int, int, int, int],
            device=None,
            dtype=None,
    ) -> None:
        """Build the patch head and pool on top of a trunk with `num_features` output channels."""
        dd = dict(device=device, dtype=dtype)
        if head_type not in HEAD_TYPES:
            raise ValueError(f'unknown head_type {head_type!r}; expected one of {", ".join(HEAD_TYPES)}')
        if global_pool:
            pool = global_pool
        if pool not in POOL_TYPES:
            raise ValueError(f'unknown pool {pool!r}; expected one of {", ".join(POOL_TYPES)}')
        if not 0.0 <= xi <= 1.0:
            raise ValueError(f'xi must lie in [0, 1] (a fraction of the uniform weight 1/M), got {xi}')
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f'drop_rate must lie in [0, 1), got {drop_rate}')
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = num_features
        self.head_type = head_type
        self.pool_type = pool
        self.global_pool = '' if global_pool == '' else pool
        self.xi = float(xi)
        self.drop_rate = drop_rate
        self.return_patches = return_patches
        self.grad_checkpointing = False
        if head_type == 'conv':
            self.patch_head = ConvPatchHead(
                num_features, width=head_width, kernel_size=head_kernel_size, stride=head_stride, **dd)
        else:
            primary_caps, primary_dim, num_caps, caps_dim = caps_dims
            self.patch_head = CapsulePatchHead(
                num_features, primary_caps=primary_caps, primary_dim=primary_dim, num_caps=num_caps,
                caps_dim=caps_dim, kernel_size=head_kernel_size, stride=head_stride, reduce_width=head_width, **dd)
        self.head_hidden_size = self.patch_head.num_features
        self._head_layers = patch_head_layers(
            num_features, min(num_features, head_width), head_kernel_size, head_stride)
        self.min_input_size = min_input_size(self._trunk_layers(), self._head_layers)
        self.head = create_patch_pool(
            pool, self.head_hidden_size, num_classes, xi=xi, capsule_head=head_type == 'caps', **dd)

    def _trunk_layers(self) -> List[LayerSpec]:
        """(kernel, stride, padding) of the trunk's main path, in order."""
        raise NotImplementedError

    def _forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.jit.ignore
    def patch_geometry(self, input_size: Union[int, Tuple[int, int]]) -> PatchGeometry:
        """The input box of every patch at an input size (H, W): nominal window and receptive field."""
        if isinstance(input_size, int):
            input_size = (input_size, input_size)
        height, width = input_size
        if height < self.min_input_size or width < self.min_input_size:
            raise ValueError(
                f'input of {height}x{width} is too small for the patch head: '
                f'the smallest input this model accepts is {self.min_input_size}x{self.min_input_size}')
        return patch_geometry(
            (height, width), self._trunk_layers(), self._head_layers,
            self.patch_head.kernel_size, self.patch_head.stride)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Enable or disable gradient checkpointing of the trunk stages."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classifier theta^L, shared by the attention and the image decision."""
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Reset the classifier.

        Args:
            num_classes: Number of classes; 0 turns the model into a feature extractor that returns the pooled
                patch feature.
            global_pool: None keeps the current pooling; '' removes the head (forward returns the trunk map);
                a pool name ('lossattn', 'mean', 'attention', 'gated', 'routing') switches the pooling.
        """
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None and global_pool != '' and global_pool != self.pool_type:
            requires_grad = all(p.requires_grad for p in self.head.parameters())
            self.head = create_patch_pool(
                global_pool, self.head_hidden_size, num_classes, xi=self.xi,
                capsule_head=self.head_type == 'caps', **dd)
            self.head.requires_grad_(requires_grad)
            self.pool_type = global_pool
        else:
            self.head.reset(num_classes, **dd)
        if global_pool is not None:
            self.global_pool = '' if global_pool == '' else self.pool_type
        self.head.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk's unpooled feature map (B, num_features, H', W')."""
        check_input(x, self.in_chans, self.min_input_size)
        return self._forward_trunk(x)

    def forward_patches(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Head on a trunk map: (logits, pooled pre-logits, patch weights, patch logits)."""
        h = self.patch_head(x)
        if self.drop_rate > 0.:
            h = F.dropout(h, p=self.drop_rate, training=self.training)
        return self.head(h)

    def forward_head(
            self,
            x: torch.Tensor,
            pre_logits: bool = False,
    ) -> Union[torch.Tensor, LossAttnOutput]:
        """Pool and classify a trunk map.

        Returns:
            The trunk map if the head was removed (global_pool ''), the pooled patch feature (B, head_hidden_size)
            if `pre_logits` or num_classes == 0, the logits if `return_patches` is False, else `LossAttnOutput`.
        """
        if self.global_pool == '':
            return x
        logits, pooled, patch_weights, patch_logits = self.forward_patches(x)
        if pre_logits or self.num_classes == 0:
            return pooled
        if not self.return_patches:
            return logits
        return LossAttnOutput(logits, patch_weights, patch_logits)

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, LossAttnOutput]:
        """Image logits with patch weights and patch logits (`LossAttnOutput`), or as `forward_head` says."""
        x = self.forward_features(x)
        return self.forward_head(x)
