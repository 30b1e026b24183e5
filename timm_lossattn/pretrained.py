""" Pretrained weights of the loss-attention models: tags, shipped checkpoints, ImageNet-initialised trunks

* Every pretrained tag (`lossattn_tinyresnet_conv.digits32`, ...) has a Hub id under the `timm-lossattn`
  organisation and an entry in the manifest (`weights/manifest.json`): sha256, size, data, training command, device,
  metrics, date and status ('published' or 'not yet published').
* Checkpoints small enough for git ship as Hub-layout folders (`config.json`, `model.safetensors`, `README.md`) next
  to the manifest; their cfg points timm at the local `model.safetensors` (`file=`), so `pretrained=True` works
  offline. The folder is looked up in the package (`timm_lossattn/weights/`, the installed wheel) and then at the top
  of a source checkout (`weights/`).
* `pretrained=True` on a tag that is not published yet raises `PretrainedNotPublishedError` with the command that
  produces it, instead of a network error.
* `pretrained_trunk=True` (or a timm name such as `'resnet18.tv_in1k'`) loads timm's own ImageNet weights into the
  trunk through timm's pretrained path (Hub cache, `HF_HUB_OFFLINE`, checksums), leaving the patch head and
  classifier as initialised.

This module imports nothing else of the package, so the model files can use it.
"""
import functools
import json
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Type, TypeVar, Union

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg, get_pretrained_cfg
from timm.models._builder import resolve_pretrained_cfg

__all__ = [
    'HUB_ORG', 'MANIFEST_NAME', 'TRUNK_SOURCES', 'PretrainedNotPublishedError', 'TrunkWeightsError',
    'build_lossattn_model', 'hub_cfg', 'load_manifest', 'shipped_folder', 'weights_dirs',
]

HUB_ORG = 'timm-lossattn'
MANIFEST_NAME = 'manifest.json'
PUBLISHED = 'published'

# timm ImageNet checkpoints whose trunk fits each paper-size model (same module names, shapes and indices)
TRUNK_SOURCES: Dict[str, str] = {
    'lossattn_resnet18': 'resnet18.a1_in1k',
    'lossattn_resnet50': 'resnet50.a1_in1k',
    'lossattn_vgg11': 'vgg11_bn.tv_in1k',
    'lossattn_vgg16': 'vgg16_bn.tv_in1k',
}

ModelT = TypeVar('ModelT', bound=nn.Module)


class PretrainedNotPublishedError(RuntimeError):
    """`pretrained=True` on a tag whose checkpoint has not been published yet."""


class TrunkWeightsError(RuntimeError):
    """ImageNet trunk weights that do not fit the model's trunk."""


def weights_dirs() -> tuple:
    """Folders searched for the manifest and shipped checkpoints: the package's, then a source checkout's."""
    package = Path(__file__).resolve().parent
    return package / 'weights', package.parent / 'weights'


@functools.lru_cache(maxsize=1)
def load_manifest() -> Dict[str, Any]:
    """The manifest of every pretrained tag (`weights/manifest.json`); empty when neither folder has one."""
    for folder in weights_dirs():
        path = folder / MANIFEST_NAME
        if path.is_file():
            with open(path, encoding='utf-8') as f:
                return json.load(f)
    return {'checkpoints': {}}


def shipped_folder(name: str) -> Optional[Path]:
    """The Hub-layout folder of a shipped checkpoint `arch.tag`, or None when it is not shipped."""
    for folder in weights_dirs():
        path = folder / name
        if (path / 'model.safetensors').is_file():
            return path
    return None


def hub_cfg(name: str) -> Dict[str, Any]:
    """Pretrained cfg entries of the tag `arch.tag`: its Hub id and, when shipped, the local weight file."""
    cfg: Dict[str, Any] = dict(hf_hub_id=f'{HUB_ORG}/{name}')
    folder = shipped_folder(name)
    if folder is not None:
        cfg['file'] = str(folder / 'model.safetensors')
    return cfg


def _check_published(variant: str, kwargs: Dict[str, Any]) -> None:
    cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=kwargs.get('pretrained_cfg'), pretrained_cfg_overlay=kwargs.get('pretrained_cfg_overlay'))
    if cfg.file or cfg.state_dict or cfg.source == 'local-dir' or not cfg.hf_hub_id:
        return
    name = cfg.hf_hub_id.split('/', 1)[-1]
    entry = load_manifest().get('checkpoints', {}).get(name)
    if cfg.hf_hub_id.startswith(HUB_ORG + '/') and entry is not None and entry.get('status') != PUBLISHED:
        raise PretrainedNotPublishedError(
            f'{name} is not published yet (status: {entry.get("status")!r}): there is no {cfg.hf_hub_id} on the '
            f'Hub. Produce the checkpoint with\n    {entry.get("command")}\nthen load it with '
            f"timm.create_model('local-dir:<exported folder>') or pretrained_cfg_overlay=dict(file=...).")


def _trunk_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """Take every trunk tensor from an ImageNet checkpoint and keep the model's own patch head and classifier."""
    own = model.state_dict()
    first_conv = model.pretrained_cfg.get('first_conv')
    out, missing, mismatched = {}, [], []
    for key, value in own.items():
        if key.startswith(('patch_head.', 'head.')):
            out[key] = value
        elif key in state_dict:
            src = state_dict[key]
            same = src.shape == value.shape or (
                key == f'{first_conv}.weight' and src.shape[:1] + src.shape[2:] == value.shape[:1] + value.shape[2:])
            if not same:
                mismatched.append(f'{key}: checkpoint {tuple(src.shape)}, model {tuple(value.shape)}')
            out[key] = src
        elif key.endswith('num_batches_tracked'):
            out[key] = value
        else:
            missing.append(key)
    if missing or mismatched:
        hint = ' (ResNet trunks need stem_type=\'imagenet\')' if any(k.startswith('conv1.') for k in
                                                                    [m.split(':')[0] for m in mismatched]) else ''
        raise TrunkWeightsError(
            f'the ImageNet checkpoint does not fit the trunk of {model.pretrained_cfg.get("architecture")}{hint}: '
            + '; '.join([f'missing {k}' for k in missing[:5]] + mismatched[:5]))
    return out


def build_lossattn_model(
        model_cls: Union[Type[ModelT], Callable[..., ModelT]],
        variant: str,
        pretrained: bool = False,
        pretrained_trunk: Union[bool, str] = False,
        trunk_kwargs: Optional[Dict[str, Any]] = None,
        **kwargs,
) -> ModelT:
    """`build_model_with_cfg` for the loss-attention family, with published-tag checks and ImageNet trunks.

    Args:
        model_cls: Model class.
        variant: Model name without tag.
        pretrained: Load the tag's checkpoint (whole model).
        pretrained_trunk: True loads the trunk from timm's ImageNet checkpoint of the same backbone
            (`TRUNK_SOURCES`), a string names the timm checkpoint (`'resnet18.tv_in1k'`); exclusive with `pretrained`.
        trunk_kwargs: Model arguments an ImageNet trunk needs unless given (ResNet: `stem_type='imagenet'`).
        **kwargs: Passed to `build_model_with_cfg` and the model.

    Returns:
        The model.
    """
    if pretrained and pretrained_trunk:
        raise ValueError('pretrained=True loads the whole model; pretrained_trunk loads only the trunk: pick one')
    if pretrained:
        _check_published(variant, kwargs)
    elif pretrained_trunk:
        family = variant.rsplit('_', 1)[0]
        source = TRUNK_SOURCES.get(family) if pretrained_trunk is True else str(pretrained_trunk)
        if source is None:
            raise TrunkWeightsError(
                f'no ImageNet trunk is known for {variant}; pass pretrained_trunk=\'<timm model>.<tag>\' '
                f'(known: {", ".join(f"{k}_*: {v}" for k, v in TRUNK_SOURCES.items())})')
        trunk_cfg = get_pretrained_cfg(source)
        if trunk_cfg is None or not trunk_cfg.has_weights:
            raise TrunkWeightsError(f'timm has no pretrained weights named {source!r}')
        for key, value in (trunk_kwargs or {}).items():
            kwargs.setdefault(key, value)
        kwargs['pretrained_cfg_overlay'] = dict(
            kwargs.get('pretrained_cfg_overlay') or {},
            url=trunk_cfg.url, file=None, state_dict=None, hf_hub_id=trunk_cfg.hf_hub_id,
            hf_hub_filename=trunk_cfg.hf_hub_filename, source=None, custom_load=False,
            origin_url=trunk_cfg.origin_url, notes=(f'trunk initialised from timm {source}',),
        )
        kwargs['pretrained_filter_fn'] = _trunk_filter_fn
        pretrained = True
    return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
