""" Pretrained tags: shipped tiny checkpoints offline, manifest metrics re-measured, unpublished tags, ImageNet trunks

The ImageNet-trunk test never downloads: it writes a Hub-layout HF cache (`models--timm--resnet18.a1_in1k`, ...)
from randomly initialised timm models into a temporary HF_HOME and loads it in a subprocess with HF_HUB_OFFLINE=1
(huggingface_hub reads both at import time).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import timm_lossattn  # noqa: F401
from timm_lossattn.hub import verify_folder
from timm_lossattn.pretrained import PretrainedNotPublishedError, load_manifest, shipped_folder

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ['lossattn_tinyresnet_conv.digits32', 'lossattn_tinyresnet_caps.digits32']


@pytest.mark.parametrize('name', SHIPPED)
def test_shipped_loads_offline(name):
    folder = shipped_folder(name)
    assert folder is not None, f'{name} is not shipped'
    model = timm.create_model(name, pretrained=True)
    assert model.pretrained_cfg['file'] == str(folder / 'model.safetensors')
    reference = safetensors.torch.load_file(str(folder / 'model.safetensors'))
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    untagged = timm.create_model(name.split('.')[0], pretrained=True)
    assert untagged.pretrained_cfg['tag'] == name.split('.')[1]


@pytest.mark.parametrize('name', SHIPPED)
def test_shipped_manifest_metrics_reproduce(name):
    """What the CI runs: `hub verify` re-measures the manifest's metrics on the test split within tolerance."""
    entry = load_manifest()['checkpoints'][name]
    assert entry['status'] == 'published'
    report = verify_folder(shipped_folder(name))
    assert report.sha256 == entry['sha256']
    assert report.metrics == pytest.approx(entry['metrics'], abs=entry['tolerance'])


def test_manifest_lists_every_tag():
    entries = load_manifest()['checkpoints']
    tags = timm.list_pretrained('lossattn_*')
    assert sorted(entries) == sorted(tags)
    for name, entry in entries.items():
        assert entry['hub_id'] == f'timm-lossattn/{name}'
        assert entry['status'] in ('published', 'not yet published') and entry['command']


def test_not_published_says_how_to_make_it():
    with pytest.raises(PretrainedNotPublishedError, match='not published yet.*\n.*timm_lossattn train'):
        timm.create_model('lossattn_resnet18_conv.digits64', pretrained=True)


def test_trunk_unknown_for_tiny():
    from timm_lossattn.pretrained import TrunkWeightsError
    with pytest.raises(TrunkWeightsError, match='no ImageNet trunk'):
        timm.create_model('lossattn_tinyresnet_conv', pretrained_trunk=True)
    with pytest.raises(ValueError, match='pick one'):
        timm.create_model('lossattn_tinyresnet_conv', pretrained=True, pretrained_trunk=True)


def _vgg_features(name: str):
    """Random `features.*` tensors laid out as timm's vgg*_bn (conv, bn, relu per entry, max-pool per 'M')."""
    layers, chs = [], 3
    for v in timm.models.vgg.cfgs[name]:
        if v == 'M':
            layers.append(torch.nn.MaxPool2d(2))
        else:
            layers += [torch.nn.Conv2d(chs, v, 3, padding=1), torch.nn.BatchNorm2d(v), torch.nn.ReLU()]
            chs = v
    for m in layers:
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(m.weight)
            torch.nn.init.uniform_(m.running_mean)
    return {f'features.{k}': v for k, v in torch.nn.Sequential(*layers).state_dict().items()}


def _fake_hub_cache(hf_home: Path, hub_id: str, state_dict) -> None:
    repo = hf_home / 'hub' / ('models--' + hub_id.replace('/', '--'))
    commit = 'a' * 40
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(commit)
    (repo / 'snapshots' / commit).mkdir(parents=True)
    safetensors.torch.save_file(state_dict, str(repo / 'snapshots' / commit / 'model.safetensors'))


_LOAD_TRUNKS = '''
import sys, torch, timm, timm_lossattn
from timm_lossattn.pretrained import TrunkWeightsError
out = {}
model = timm.create_model('lossattn_resnet18_conv', pretrained_trunk=True)
assert model.stem_type == 'imagenet'
out['resnet18'] = {k: v for k, v in model.state_dict().items()}
model = timm.create_model('lossattn_vgg11_conv', pretrained_trunk='vgg11_bn.tv_in1k', num_classes=4)
out['vgg11'] = {k: v for k, v in model.state_dict().items()}
try:
    timm.create_model('lossattn_resnet18_conv', pretrained_trunk=True, stem_type='cifar')
    raise SystemExit('a cifar stem took ImageNet weights')
except TrunkWeightsError as e:
    assert "stem_type='imagenet'" in str(e), e
torch.save(out, sys.argv[1])
'''


def test_pretrained_trunk_offline_cache(tmp_path):
    torch.manual_seed(0)
    resnet = timm.create_model('resnet18').state_dict()
    _fake_hub_cache(tmp_path / 'hf', 'timm/resnet18.a1_in1k', resnet)
    # vgg11_bn's 4096-wide MLP head is ~500 MB: the cache holds only the `features.*` of a random vgg11_bn
    vgg = {k: v for k, v in _vgg_features('vgg11').items()}
    _fake_hub_cache(tmp_path / 'hf', 'timm/vgg11_bn.tv_in1k', vgg)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / 'hf'), HF_HUB_OFFLINE='1')
    proc = subprocess.run([sys.executable, '-c', _LOAD_TRUNKS, str(tmp_path / 'out.pt')], env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(tmp_path / 'out.pt')
    trunk = [k for k in resnet if not k.startswith('fc.')]
    assert all(torch.equal(out['resnet18'][k], resnet[k]) for k in trunk)
    assert all(torch.equal(out['vgg11'][k], v) for k, v in vgg.items())
    assert out['vgg11']['head.fc.weight'].shape[0] == 4
