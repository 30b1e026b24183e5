""" Loss-attention VGGs (batch-norm variants)

`Loss-based Attention for Interpreting Image-level Prediction of Convolutional Neural Networks`
    - https://doi.org/10.1109/TIP.2020.3046875 (Shi et al., IEEE TIP 2021)

The trunk is the `features` stack of timm's VGG (same layer indices, so timm's `vgg*_bn` weights map onto it, the
conv/fc MLP head dropped); each max-pool is kept or replaced by an identity according to `stage_strides`: all
removed for the paper's 32x32 inputs.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ..layers import LayerSpec
from ..pretrained import build_lossattn_model, hub_cfg
from .lossattn_net import LossAttnNet, check_input, check_stage_strides, lossattn_cfg

__all__ = ['LossAttnVgg']

VGG_CFGS: Dict[str, List[Union[int, str]]] = {
    'vgg11': [64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'],
    'vgg16': [64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M'],
}


class LossAttnVgg(LossAttnNet):
    """VGG-BN trunk without max-pools, with a loss-attention patch head (conv or capsule)."""

    def __init__(
            self,
            cfg: Sequence[Union[int, str]],
            num_classes: int = 10,
            in_chans: int = 3,
            head_type: str = 'conv',
            pool: str = 'lossattn',
            xi: float = 0.1,
            stage_strides: Sequence[int] = (1, 1, 1, 1, 1),
            head_width: int = 512,
            head_kernel_size: int = 9,
            head_stride: int = 4,
            caps_dims: Tuple[int, int, int, int] = (32, 16, 64, 128),
            global_pool: Optional[str] = None,
            return_patches: bool = True,
            drop_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        """
        Args:
            cfg: Channels of each 3x3 conv, 'M' at the end of each stage (timm's VGG layout).
            num_classes: Number of classes (0: feature extractor returning the pooled patch feature).
            in_chans: Input channels.
            head_type: 'conv' (conv head, Eq. 5) or 'caps' (capsule head, Eq. 6 / Eq. 11).
            pool: Patch pooling: 'lossattn' (the paper), 'mean', 'attention', 'gated', 'routing' (caps only).
            xi: Loss-attention threshold in [0, 1]: patches below xi / M of the total score are removed.
            stage_strides: Per stage, 2 keeps its 2x2 max-pool and 1 removes it (paper at 32x32: all removed).
            head_width: Channels of the conv head (paper: 512).
            head_kernel_size: Patch kernel of the head (paper: 9).
            head_stride: Patch stride of the head (paper: 4).
            caps_dims: Capsule head sizes (primary capsule channels, primary dim, capsule channels, capsule dim);
                paper: (32, 16, 64, 128).
            global_pool: timm's name for the pooling: '' removes the head, a pool name overrides `pool`.
            return_patches: True returns `LossAttnOutput`, False plain logits.
            drop_rate: Dropout on the patch features.
        """
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        num_stages = sum(1 for v in cfg if v == 'M')
        self.stage_strides = check_stage_strides(stage_strides, num_stages)
        self.feature_info = []
        self._layer_specs: List[LayerSpec] = []
        self._stage_ends: List[int] = []
        layers: List[nn.Module] = []
        prev_chs, reduction, stage_idx = in_chans, 1, 0
        for v in cfg:
            if v == 'M':
                last_idx = len(layers) - 1
                self.feature_info.append(dict(num_chs=prev_chs, reduction=reduction, module=f'features.{last_idx}'))
                self._stage_ends.append(last_idx)
                if self.stage_strides[stage_idx] == 2:
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                    self._layer_specs.append((2, 2, 0))
                    reduction *= 2
                else:
                    layers.append(nn.Identity())
                stage_idx += 1
            else:
                layers += [
                    nn.Conv2d(prev_chs, int(v), kernel_size=3, padding=1, **dd),
                    nn.BatchNorm2d(int(v), **dd),
                    nn.ReLU(inplace=True),
                ]
                self._layer_specs.append((3, 1, 1))
                prev_chs = int(v)
        self.features = nn.Sequential(*layers)
        self.num_stages = num_stages

        self._init_head(
            prev_chs, num_classes, in_chans, head_type, pool, xi, global_pool, drop_rate, return_patches,
            head_width, head_kernel_size, head_stride, caps_dims, **dd)
        self.init_weights()

    @torch.jit.ignore
    def init_weights(self) -> None:
        """timm's VGG init: Kaiming convs, unit BN."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

    def _trunk_layers(self) -> List[LayerSpec]:
        return list(self._layer_specs)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^features\.0',
            blocks=[(r'^features\.(\d+)', None), (r'^patch_head', (99998,)), (r'^head', (99999,))],
        )

    def _stage_segments(self) -> List[nn.Module]:
        """`features` cut after each stage's max-pool (or identity): one checkpoint segment per stage."""
        bounds = [0] + [end + 2 for end in self._stage_ends]
        segments = [self.features[start:stop] for start, stop in zip(bounds[:-1], bounds[1:])]
        return [segment for segment in segments if len(segment)]

    def _forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            # A checkpoint per stage, not per layer: per layer keeps every activation as a segment input (no memory
            # saved) and the in-place ReLUs modify those saved inputs, which fails in backward. Each stage starts
            # with a conv, so no segment modifies its input.
            return checkpoint_seq(self._stage_segments(), x)
        return self.features(x)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Trunk features at the end of every stage (timm's forward_intermediates contract).

        Args:
            x: Input images.
            indices: Take last n features if int, all if None, select matching indices if sequence.
            norm: Unused (no final norm), kept for the timm API.
            stop_early: Stop after the last requested feature.
            output_fmt: Only 'NCHW'.
            intermediates_only: Return only the intermediate features.

        Returns:
            The final trunk map and the list of intermediates, or only the intermediates.
        """
        assert output_fmt in ('NCHW',), 'Output shape must be NCHW.'
        check_input(x, self.in_chans, self.min_input_size)
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self._stage_ends), indices)
        take_ends = [self._stage_ends[i] for i in take_indices]
        last = self._stage_ends[max_index] if stop_early else len(self.features) - 1
        for idx, layer in enumerate(self.features):
            if idx > last:
                break
            x = layer(x)
            if idx in take_ends:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the layers after the last requested feature (and the head). Returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self._stage_ends), indices)
        keep = self._stage_ends[max_index] + 1
        if keep < len(self.features):
            self.features = self.features[:keep]
            self.num_features = self.feature_info[max_index]['num_chs']
            self.reset_classifier(0, '')
        elif prune_head:
            self.reset_classifier(0, '')
        return take_indices


def _create_lossattn_vgg(variant: str, pretrained: bool = False, **kwargs) -> LossAttnVgg:
    cfg = VGG_CFGS[variant.split('_')[1]]
    return build_lossattn_model(
        LossAttnVgg,
        variant,
        pretrained,
        model_cfg=cfg,
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3, 4)),
        **kwargs,
    )


default_cfgs = generate_default_cfgs({
    'lossattn_vgg11_conv.digits32': lossattn_cfg(first_conv='features.0', **hub_cfg('lossattn_vgg11_conv.digits32')),
    'lossattn_vgg11_caps.digits32': lossattn_cfg(first_conv='features.0', **hub_cfg('lossattn_vgg11_caps.digits32')),
    'lossattn_vgg16_conv.digits32': lossattn_cfg(first_conv='features.0', **hub_cfg('lossattn_vgg16_conv.digits32')),
    'lossattn_vgg16_caps.digits32': lossattn_cfg(first_conv='features.0', **hub_cfg('lossattn_vgg16_caps.digits32')),
})


@register_model
def lossattn_vgg11_conv(pretrained: bool = False, **kwargs) -> LossAttnVgg:
    """Loss-attention VGG11-BN, conv head (paper Table II: 30.73M params)."""
    model_args = dict(head_type='conv')
    return _create_lossattn_vgg('lossattn_vgg11_conv', pretrained, **dict(model_args, **kwargs))


@register_model
def lossattn_vgg11_caps(pretrained: bool = False, **kwargs) -> LossAttnVgg:
    """Loss-attention VGG11-BN, capsule head."""
    model_args = dict(head_type='caps')
    return _create_lossattn_vgg('lossattn_vgg11_caps', pretrained, **dict(model_args, **kwargs))


@register_model
def lossattn_vgg16_conv(pretrained: bool = False, **kwargs) -> LossAttnVgg:
    """Loss-attention VGG16-BN, conv head."""
    model_args = dict(head_type='conv')
    return _create_lossattn_vgg('lossattn_vgg16_conv', pretrained, **dict(model_args, **kwargs))


@register_model
def lossattn_vgg16_caps(pretrained: bool = False, **kwargs) -> LossAttnVgg:
    """Loss-attention VGG16-BN, capsule head."""
    model_args = dict(head_type='caps')
    return _create_lossattn_vgg('lossattn_vgg16_caps', pretrained, **dict(model_args, **kwargs))
