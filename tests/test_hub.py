""" Hub layout: export -> verify round trip, named errors, push to a local endpoint and load offline from the cache

The push test does not reach the Hugging Face Hub: `tests/hf_local_endpoint.py` runs an in-memory HTTP server on
127.0.0.1 speaking the few routes huggingface_hub uses for create_repo, preupload, commit (NDJSON) and resolve; the
push and the downloads run in subprocesses with HF_ENDPOINT pointing at it (huggingface_hub reads its environment at
import time), then a third subprocess loads the model with HF_HUB_OFFLINE=1 from the populated cache.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

import timm_lossattn  # noqa: F401
from timm_lossattn.hub import (
    ChecksumMismatchError, CorruptCheckpointError, DataSpec, MetricsMismatchError, NumClassesMismatchError,
    PickleNotAllowedError, UnknownArchitectureError, export_checkpoint, main, measure_metrics, read_state_dict,
    verify_folder,
)

from hf_local_endpoint import LocalHubEndpoint

pytest.importorskip('sklearn')
ARCH = 'lossattn_tinyresnet_conv'
EVAL = DataSpec(num_samples=16)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory) -> Path:
    """A training output folder: random tiny model, its safetensors and a summary.json."""
    torch.manual_seed(0)
    model = timm.create_model(ARCH)
    path = tmp_path_factory.mktemp('run')
    safetensors.torch.save_file(model.state_dict(), str(path / 'model.safetensors'))
    summary = dict(
        model=ARCH, model_args={}, num_classes=10, train_data=dict(name='builtin:digits32', split='train'),
        eval_data=EVAL.to_dict(), command='python -m timm_lossattn train --model lossattn_tinyresnet_conv',
        device='cpu', metrics=measure_metrics(model, EVAL), date='2025-01-01')
    (path / 'summary.json').write_text(json.dumps(summary))
    return path


@pytest.fixture(scope='module')
def exported(run_dir, tmp_path_factory) -> Path:
    return export_checkpoint(run_dir, tmp_path_factory.mktemp('hub') / f'{ARCH}.roundtrip', tag='roundtrip')


@pytest.fixture
def copy(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / exported.name))


def test_export_layout(exported):
    assert {'config.json', 'model.safetensors', 'README.md'} <= {p.name for p in exported.iterdir()}
    config = json.loads((exported / 'config.json').read_text())
    assert config['architecture'] == ARCH and config['num_classes'] == 10
    assert config['label_names'] == [str(i) for i in range(10)]
    assert config['pretrained_cfg']['hf_hub_id'] == f'timm-lossattn/{ARCH}.roundtrip'
    assert 'file' not in config['pretrained_cfg'] and 'model_args' in config
    card = (exported / 'README.md').read_text()
    for text in ('library_name: timm', 'license: apache-2.0', '10.1109/TIP.2020.3046875', 'timm_lossattn train',
                 'accuracy', 'Device'):
        assert text in card


def test_export_verify_round_trip(exported, run_dir):
    report = verify_folder(exported)
    summary = json.loads((run_dir / 'summary.json').read_text())
    assert report.metrics == pytest.approx(summary['metrics'], abs=report.tolerance)
    assert report.sha256 == report.expected_sha256
    model = timm.create_model(f'local-dir:{exported}', pretrained=True)
    reference = safetensors.torch.load_file(str(run_dir / 'model.safetensors'))
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())


def test_truncated_safetensors(copy):
    data = (copy / 'model.safetensors').read_bytes()
    (copy / 'model.safetensors').write_bytes(data[:len(data) // 2])
    with pytest.raises(CorruptCheckpointError):
        verify_folder(copy, measure=False)


def test_altered_header(copy):
    data = bytearray((copy / 'model.safetensors').read_bytes())
    data[10:20] = b'\xff' * 10
    (copy / 'model.safetensors').write_bytes(bytes(data))
    with pytest.raises(CorruptCheckpointError):
        verify_folder(copy, measure=False)


def test_checksum_mismatch(copy):
    data = bytearray((copy / 'model.safetensors').read_bytes())
    data[-1] ^= 0xFF
    (copy / 'model.safetensors').write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError):
        verify_folder(copy, measure=False)


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / 'config.json').read_text())
    config.update(changes)
    (folder / 'config.json').write_text(json.dumps(config))


def test_unknown_architecture(copy):
    _edit_config(copy, architecture='lossattn_nosuchnet_conv')
    with pytest.raises(UnknownArchitectureError):
        verify_folder(copy, measure=False)


def test_num_classes_mismatch(copy):
    _edit_config(copy, num_classes=7)
    with pytest.raises(NumClassesMismatchError):
        verify_folder(copy, measure=False)


def test_metrics_mismatch(copy):
    card = (copy / 'README.md').read_text()
    accuracy = json.loads((copy / 'config.json').read_text())['lossattn']['metrics']['accuracy']
    card = card.replace(f'accuracy: {accuracy}', f'accuracy: {accuracy + 0.5}', 1)
    (copy / 'README.md').write_text(card)
    with pytest.raises(MetricsMismatchError):
        verify_folder(copy)


def test_no_pickle_unless_asked(run_dir, tmp_path):
    state_dict = safetensors.torch.load_file(str(run_dir / 'model.safetensors'))
    torch.save({'state_dict': state_dict}, tmp_path / 'model_best.pth.tar')
    with pytest.raises(PickleNotAllowedError):
        read_state_dict(tmp_path / 'model_best.pth.tar')
    with pytest.raises(PickleNotAllowedError):
        export_checkpoint(tmp_path / 'model_best.pth.tar', tmp_path / 'out', architecture=ARCH, sample=False)
    loaded = read_state_dict(tmp_path / 'model_best.pth.tar', allow_pickle=True)
    assert loaded.keys() == state_dict.keys()


def test_cli(exported, copy, capsys):
    assert main(['verify', str(exported), '--no-measure']) == 0
    assert main(['push', str(exported), '--repo-id', 'someone/model', '--dry-run']) == 0
    out = capsys.readouterr().out
    assert 'would upload to someone/model' in out and 'model.safetensors' in out
    _edit_config(copy, num_classes=3)
    assert main(['verify', str(copy), '--no-measure']) == 1
    assert 'NumClassesMismatchError' in capsys.readouterr().err


# push (when a folder is given), then hf-hub: load and save the logits of a fixed input
_LOAD = '''
import sys, torch, timm, timm_lossattn, timm_lossattn.hub
if len(sys.argv) > 3:
    timm_lossattn.hub.push_folder(sys.argv[3], sys.argv[1])
model = timm.create_model('hf-hub:' + sys.argv[1], pretrained=True).eval()
torch.manual_seed(0)
with torch.no_grad():
    torch.save(model(torch.rand(2, 3, 32, 32)).logits, sys.argv[2])
'''


def _run(code: str, *args: str, **env: str) -> None:
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **env)
    proc = subprocess.run([sys.executable, '-c', code, *args], env=full_env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_push_then_offline_hf_hub(exported, tmp_path):
    repo_id = 'someone/lossattn-roundtrip'
    hf_env = dict(HF_HOME=str(tmp_path / 'hf'), HF_HUB_DISABLE_TELEMETRY='1', HF_TOKEN='hf_local_test_token')
    with LocalHubEndpoint() as hub:
        _run(_LOAD, repo_id, str(tmp_path / 'online.pt'), str(exported), HF_ENDPOINT=hub.url, **hf_env)
        assert sorted(hub.repos[repo_id].files) == sorted(p.name for p in exported.iterdir())
        assert hub.repos[repo_id].files['model.safetensors'] == (exported / 'model.safetensors').read_bytes()
        assert any('/commit/' in r for r in hub.requests)
    _run(_LOAD, repo_id, str(tmp_path / 'offline.pt'), HF_ENDPOINT='http://127.0.0.1:9', HF_HUB_OFFLINE='1',
         **hf_env)
    model = timm.create_model(f'local-dir:{exported}', pretrained=True).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        expected = model(torch.rand(2, 3, 32, 32)).logits
    assert torch.equal(torch.load(tmp_path / 'offline.pt'), expected)
    assert torch.equal(torch.load(tmp_path / 'online.pt'), expected)
