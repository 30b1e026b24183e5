""" Loss-attention ResNets

`Loss-based Attention for Interpreting Image-level Prediction of Convolutional Neural Networks`
    - https://doi.org/10.1109/TIP.2020.3046875 (Shi et al., IEEE TIP 2021)

The trunk is timm's ResNet (its `BasicBlock` / `Bottleneck` and module names, so timm's ImageNet weights map onto
it) with the max-pool removed and the stage strides set by `stage_strides`: all 1 for the paper's 32x32 inputs.
ResNet50 uses timm's standard bottleneck (stride in the 3x3 conv); the authors' code has a non-standard one (stride
in a first 3x3 conv, ReLU before the residual add), which is not reproduced.
"""
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn as nn
from timm.layers import DropPath
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models.resnet import BasicBlock, Bottleneck, downsample_conv

from ..layers import LayerSpec
from ..pretrained import build_lossattn_model, hub_cfg
from .lossattn_net import LossAttnNet, check_input, check_stage_strides, lossattn_cfg

__all__ = ['LossAttnResNet']

STEM_TYPES = ('cifar', 'imagenet')


class LossAttnResNet(LossAttnNet):
    """ResNet trunk without max-pool and strides, with a loss-attention patch head (conv or capsule)."""

    def __init__(
            self,
            block: Type[Union[BasicBlock, Bottleneck]],
            layers: Tuple[int, ...],
            channels: Tuple[int, ...] = (64, 128, 256, 512),
            num_classes: int = 10,
            in_chans: int = 3,
            head_type: str = 'conv',
            pool: str = 'lossattn',
            xi: float = 0.1,
            stage_strides: Sequence[int] = (1, 1, 1, 1),
            stem_type: str = 'cifar',
            head_width: int = 512,
            head_kernel_size: int = 9,
            head_stride: int = 4,
            caps_dims: Tuple[int, int, int, int] = (32, 16, 64, 128),
            global_pool: Optional[str] = None,
            return_patches: bool = True,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            zero_init_last: bool = True,
            device=None,
            dtype=None,
    ):
        """
        Args:
            block: timm residual block class (BasicBlock or Bottleneck).
            layers: Blocks per stage.
            channels: Planes per stage.
            num_classes: Number of classes (0: feature extractor returning the pooled patch feature).
            in_chans: Input channels.
            head_type: 'conv' (conv head, Eq. 5) or 'caps' (capsule head, Eq. 6 / Eq. 11).
            pool: Patch pooling: 'lossattn' (the paper), 'mean', 'attention', 'gated', 'routing' (caps only).
            xi: Loss-attention threshold in [0, 1]: patches below xi / M of the total score are removed.
            stage_strides: Stride (1 or 2) of each stage; the paper removes all of them at 32x32 and keeps one
                stride-2 stage at 64x64 (`(1, 2, 1, 1)` here).
            stem_type: 'cifar' (3x3 stride-1 conv, the paper's trunk) or 'imagenet' (timm's 7x7 stride-2 conv,
                loads timm's ImageNet stem weights); there is no max-pool in either.
            head_width: Channels of the conv head (paper: 512); trunks wider than this are reduced by a 1x1 conv.
            head_kernel_size: Patch kernel of the head (paper: 9).
            head_stride: Patch stride of the head (paper: 4).
            caps_dims: Capsule head sizes (primary capsule channels, primary dim, capsule channels, capsule dim);
                paper: (32, 16, 64, 128).
            global_pool: timm's name for the pooling: '' removes the head (forward returns the trunk map), a pool
                name overrides `pool`.
            return_patches: True returns `LossAttnOutput(logits, patch_weights, patch_logits)`, False plain logits
                (for tools that need a tensor: timm's validate.py, ONNX export).
            drop_rate: Dropout on the patch features.
            drop_path_rate: Stochastic depth over the trunk blocks.
            zero_init_last: Zero-init the last BN of every residual branch (timm's default).
        """
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if stem_type not in STEM_TYPES:
            raise ValueError(f'unknown stem_type {stem_type!r}; expected one of {", ".join(STEM_TYPES)}')
        if len(layers) != len(channels):
            raise ValueError(f'layers {tuple(layers)} and channels {tuple(channels)} must have the same length')
        self.bottleneck = block is Bottleneck
        self.layers = tuple(layers)
        self.stem_type = stem_type
        self.stage_strides = check_stage_strides(stage_strides, len(layers))

        stem_kernel, stem_stride = (3, 1) if stem_type == 'cifar' else (7, 2)
        inplanes = channels[0]
        self.conv1 = nn.Conv2d(
            in_chans, inplanes, stem_kernel, stride=stem_stride, padding=stem_kernel // 2, bias=False, **dd)
        self.bn1 = nn.BatchNorm2d(inplanes, **dd)
        self.act1 = nn.ReLU(inplace=True)
        self.feature_info = [dict(num_chs=inplanes, reduction=stem_stride, module='act1')]

        num_blocks = sum(layers)
        drop_path_rates = [drop_path_rate * i / max(num_blocks - 1, 1) for i in range(num_blocks)]
        reduction = stem_stride
        block_idx = 0
        for stage_idx, (depth, planes, stride) in enumerate(zip(layers, channels, self.stage_strides)):
            outplanes = planes * block.expansion
            blocks = []
            for i in range(depth):
                downsample = None
                if i == 0 and (stride != 1 or inplanes != outplanes):
                    downsample = downsample_conv(inplanes, outplanes, 1, stride=stride, **dd)
                dpr = drop_path_rates[block_idx]
                blocks.append(block(
                    inplanes,
                    planes,
                    stride=stride if i == 0 else 1,
                    downsample=downsample,
                    drop_path=DropPath(dpr) if dpr > 0. else None,
                    **dd,
                ))
                inplanes = outplanes
                block_idx += 1
            reduction *= stride
            self.add_module(f'layer{stage_idx + 1}', nn.Sequential(*blocks))
            self.feature_info.append(dict(num_chs=outplanes, reduction=reduction, module=f'layer{stage_idx + 1}'))
        self.num_stages = len(layers)

        self._init_head(
            inplanes, num_classes, in_chans, head_type, pool, xi, global_pool, drop_rate, return_patches,
            head_width, head_kernel_size, head_stride, caps_dims, **dd)
        self.init_weights(zero_init_last=zero_init_last)

    @torch.jit.ignore
    def init_weights(self, zero_init_last: bool = True) -> None:
        """Kaiming init of the convs, timm's zero-init of the last BN in each residual branch."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        if zero_init_last:
            for m in self.modules():
                if hasattr(m, 'zero_init_last'):
                    m.zero_init_last()

    def _trunk_layers(self) -> List[LayerSpec]:
        stem_kernel, stem_stride = (3, 1) if self.stem_type == 'cifar' else (7, 2)
        specs: List[LayerSpec] = [(stem_kernel, stem_stride, stem_kernel // 2)]
        for depth, stride in zip(self.layers, self.stage_strides):
            for i in range(depth):
                s = stride if i == 0 else 1
                if self.bottleneck:
                    specs += [(1, 1, 0), (3, s, 1), (1, 1, 0)]
                else:
                    specs += [(3, s, 1), (3, 1, 1)]
        return specs

    def _stages(self) -> List[nn.Module]:
        return [getattr(self, f'layer{i + 1}') for i in range(self.num_stages)]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r'^conv1|bn1',
            blocks=[
                (r'^layer(\d+)' if coarse else r'^layer(\d+)\.(\d+)', None),
                (r'^patch_head', (99998,)),
                (r'^head', (99999,)),
            ],
        )

    def _forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self._stages(), x, flatten=True)
        else:
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
            x = self.layer4(x)
        return x

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Trunk features of the stem and every stage (timm's forward_intermediates contract).

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
        intermediates = []
        take_indices, max_index = feature_take_indices(self.num_stages + 1, indices)
        check_input(x, self.in_chans, self.min_input_size)
        x = self.act1(self.bn1(self.conv1(x)))
        if 0 in take_indices:
            intermediates.append(x)
        stages = self._stages()
        if stop_early:
            stages = stages[:max_index]
        for feat_idx, stage in enumerate(stages, start=1):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(stage, x)
            else:
                x = stage(x)
            if feat_idx in take_indices:
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
        """Drop the stages after the last requested feature (and the head). Returns the kept indices."""
        take_indices, max_index = feature_take_indices(self.num_stages + 1, indices)
        for stage_idx in range(max_index, self.num_stages):
            setattr(self, f'layer{stage_idx + 1}', nn.Sequential())
        if max_index < self.num_stages:
            self.num_features = self.feature_info[max_index]['num_chs']
        if prune_head or max_index < self.num_stages:
            self.reset_classifier(0, '')
        return take_indices


def _create_lossattn_resnet(variant: str, pretrained: bool = False, **kwargs) -> LossAttnResNet:
    return build_lossattn_model(
        LossAttnResNet,
        variant,
        pretrained,
        trunk_kwargs=dict(stem_type='imagenet'),
        feature_cfg=dict(out_indices=(0, 1, 2, 3, 4)),
        **kwargs,
    )


default_cfgs = generate_default_cfgs({
    'lossattn_resnet18_conv.digits32': lossattn_cfg(**hub_cfg('lossattn_resnet18_conv.digits32')),
    'lossattn_resnet18_conv.digits64': lossattn_cfg(
        input_size=(3, 64, 64), pool_size=(64, 64), **hub_cfg('lossattn_resnet18_conv.digits64')),
    'lossattn_resnet18_caps.digits32': lossattn_cfg(**hub_cfg('lossattn_resnet18_caps.digits32')),
    'lossattn_resnet18_caps.digits64': lossattn_cfg(
        input_size=(3, 64, 64), pool_size=(64, 64), **hub_cfg('lossattn_resnet18_caps.digits64')),
    'lossattn_resnet50_conv.digits32': lossattn_cfg(**hub_cfg('lossattn_resnet50_conv.digits32')),
    'lossattn_resnet50_caps.digits32': lossattn_cfg(**hub_cfg('lossattn_resnet50_caps.digits32')),
    'lossattn_tinyresnet_conv.digits32': lossattn_cfg(
        mean=(0., 0., 0.), std=(1., 1., 1.), **hub_cfg('lossattn_tinyresnet_conv.digits32')),  # trained on [0, 1]
    'lossattn_tinyresnet_caps.digits32': lossattn_cfg(
        mean=(0., 0., 0.), std=(1., 1., 1.), **hub_cfg('lossattn_tinyresnet_caps.digits32')),  # trained on [0, 1]
})


@register_model
def lossattn_resnet18_conv(pretrained: bool = False, **kwargs) -> LossAttnResNet:
    """Loss-attention ResNet18, conv head (paper Table II: 32.67M params)."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2), head_type='conv')
    return _create_lossattn_resnet('lossattn_resnet18_conv', pretrained, **dict(model_args, **kwargs))


@register_model
def lossattn_resnet18_caps(pretrained: bool = False, **kwargs) -> LossAttnResNet:
    """Loss-attention ResNet18, capsule head."""
    model_args = dict(block=BasicBlock, layers=(2, 2, 2, 2), head_type='caps')
    return _create_lossattn_resnet('lossattn_resnet18_caps', pretrained, **dict(model_args, **kwargs))


@register_model
def lossattn_resnet50_conv(pretrained: bool = False, **kwargs) -> LossAttnResNet:
    """Loss-attention ResNet50 (standard bottleneck), conv head."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3), head_type='conv')
    return _create_lossattn_resnet('lossattn_resnet50_conv', pretrained, **dict(model_args, **kwargs))


@register_model
def lossattn_resnet50_caps(pretrained: bool = False, **kwargs) -> LossAttnResNet:
    """Loss-attention ResNet50 (standard bottleneck), capsule head."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3), head_type='caps')
    return _create_lossattn_resnet('lossattn_resnet50_caps', pretrained, **dict(model_args, **kwargs))


@register_model
def lossattn_tinyresnet_conv(pretrained: bool = False, **kwargs) -> LossAttnResNet:
    """Tiny loss-attention ResNet (one block a stage, narrow), conv head: small enough to ship trained in git."""
    model_args = dict(
        block=BasicBlock, layers=(1, 1, 1, 1), channels=(16, 32, 64, 64), head_width=64, head_type='conv')
    return _create_lossattn_resnet('lossattn_tinyresnet_conv', pretrained, **dict(model_args, **kwargs))


@register_model
def lossattn_tinyresnet_caps(pretrained: bool = False, **kwargs) -> LossAttnResNet:
    """Tiny loss-attention ResNet (one block a stage, narrow), capsule head: small enough to ship trained in git."""
    model_args = dict(
        block=BasicBlock, layers=(1, 1, 1, 1), channels=(16, 32, 64, 64), head_width=64, caps_dims=(8, 8, 16, 32),
        head_type='caps')
    return _create_lossattn_resnet('lossattn_tinyresnet_caps', pretrained, **dict(model_args, **kwargs))
