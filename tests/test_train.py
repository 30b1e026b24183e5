""" The train command: bit-for-bit resume on CPU, outputs, one-line errors for bad arguments """
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip('sklearn')
from PIL import Image
from safetensors.torch import load_file

from timm_lossattn.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures('one_torch_thread')

TINY = ['--model', 'lossattn_resnet18_conv', '--model-kwargs', 'channels=(8,16,16,32)', 'head_width=32']
SMALL_RUN = TINY + ['--data', 'builtin:digits32', '--train-samples', '16', '--val-samples', '8', '--batch-size', '8',
                    '--workers', '0', '--no-progress', '--lr', '0.05']


def test_resume_equals_uninterrupted(tmp_path):
    full, part = str(tmp_path / 'full'), str(tmp_path / 'part')
    assert main(SMALL_RUN + ['--epochs', '4', '--output', full]) == 0
    # an interrupted run: 2 epochs of the 4-epoch schedule, then resume
    assert main(SMALL_RUN + ['--epochs', '4', '--output', part, '--stop-epoch', '2']) == 0
    with open(os.path.join(part, 'summary.json')) as f:
        assert json.load(f)['completed_epochs'] == 2
    assert main(SMALL_RUN + ['--epochs', '4', '--resume', part]) == 0
    a, b = load_file(os.path.join(full, 'model.safetensors')), load_file(os.path.join(part, 'model.safetensors'))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with open(os.path.join(full, 'summary.json')) as f:
        summary_full = json.load(f)
    with open(os.path.join(part, 'summary.json')) as f:
        summary_part = json.load(f)
    timing = 'train_images_per_s'
    assert {k: v for k, v in summary_full['final'].items() if k != timing} == \
        {k: v for k, v in summary_part['final'].items() if k != timing}
    final = summary_full['final']
    for key in ('eval_top1', 'eval_patch_precision', 'eval_patch_recall', 'eval_patch_f', 'eval_loc_ap'):
        assert key in final
    assert [h['epoch'] for h in summary_part['history']] == [0, 1, 2, 3]
    state = torch.load(os.path.join(full, 'train_state.pth'), weights_only=True)
    assert state['epoch'] == 3


def test_cli_bad_model_one_line_error(tmp_path):
    """Through `python -m timm_lossattn train`: exit code 2 and one line on stderr, no traceback."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    result = subprocess.run(
        [sys.executable, '-m', 'timm_lossattn', 'train', '--model', 'no_such_model', '--data', 'builtin:digits32',
         '--output', str(tmp_path / 'out')], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and 'unknown model' in result.stderr
    assert not (tmp_path / 'out').exists()


def test_bad_arguments_give_one_line_errors(tmp_path, capsys):
    (tmp_path / 'empty' / 'train' / 'a').mkdir(parents=True)
    one_class = tmp_path / 'one' / 'train' / 'cat'
    one_class.mkdir(parents=True)
    for i in range(2):
        Image.new('RGB', (32, 32)).save(one_class / f'{i}.png')
    out = str(tmp_path / 'out')
    cases = [
        (['--model', 'resnet18', '--data', 'builtin:digits32'], 'not a loss-attention model'),
        (TINY + ['--data', str(tmp_path / 'missing')], 'data folder not found'),
        (TINY + ['--data', str(tmp_path / 'empty')], 'image'),
        (TINY + ['--data', str(tmp_path / 'one')], 'at least 2'),
        (TINY + ['--data', 'builtin:digits99'], 'unknown built-in data'),
        (TINY + ['--data', 'builtin:digits32', '--resume', str(tmp_path / 'nothing')], 'nothing to resume'),
    ]
    for args, match in cases:
        capsys.readouterr()
        assert main(args + ['--output', out]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('error:') and match in lines[0], lines
    assert not os.path.exists(out)
