""" DDP under torchrun (2 CPU processes, gloo): identical weights on both ranks, equal to one process """
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip('sklearn')
import timm
from safetensors.torch import load_file
from timm.layers import freeze_batch_norm_2d
from timm.utils import random_seed

from timm_lossattn.train import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# BatchNorm normalises with per-rank batch statistics under DDP, which differ from the statistics of the global batch
# of a single process; SyncBatchNorm has no CPU kernel, so the comparison freezes BatchNorm (--freeze-bn, timm's
# FrozenBatchNorm2d) and keeps the residual branches alive (zero_init_last=False). Augmentation is off so both runs
# see the same pixels; the DistributedSampler hands the two ranks the two halves of the single process's batches.
ARGS = [
    '--model', 'lossattn_resnet18_conv', '--model-kwargs', 'channels=(8,16,16,32)', 'head_width=32',
    'zero_init_last=False', '--freeze-bn', '--no-aug', '--data', 'builtin:digits32', '--train-samples', '32',
    '--val-samples', '16', '--epochs', '2', '--workers', '0', '--no-progress', '--lr', '0.002', '--rampup-epochs', '0',
    '--device', 'cpu',
]

WORKER = textwrap.dedent('''
    import os, sys
    import torch
    from safetensors.torch import save_file
    from timm_lossattn.train import build_parser, train
    args = build_parser().parse_args(sys.argv[2:])
    model = train(args)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              os.path.join(sys.argv[1], f'rank{os.environ["RANK"]}.safetensors'))
''')


def test_two_process_ddp_equals_single_process(tmp_path):
    torch.set_num_threads(1)
    worker = tmp_path / 'worker.py'
    worker.write_text(WORKER)
    ddp_out, single_out = tmp_path / 'ddp', tmp_path / 'single'
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''), OMP_NUM_THREADS='1')
    result = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(worker),
         str(tmp_path), *ARGS, '--batch-size', '8', '--output', str(ddp_out)],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(ARGS + ['--batch-size', '16', '--output', str(single_out)]) == 0

    rank0, rank1 = load_file(str(tmp_path / 'rank0.safetensors')), load_file(str(tmp_path / 'rank1.safetensors'))
    for key in rank0:
        assert torch.isfinite(rank0[key]).all(), key
        assert torch.equal(rank0[key], rank1[key]), key
    random_seed(0, 0)  # the train command seeds model creation with (seed, epoch 0, rank 0)
    initial = freeze_batch_norm_2d(timm.create_model(
        'lossattn_resnet18_conv', channels=(8, 16, 16, 32), head_width=32, zero_init_last=False,
        num_classes=10)).state_dict()
    saved = load_file(str(ddp_out / 'model.safetensors'))
    single = load_file(str(single_out / 'model.safetensors'))
    for key in rank0:
        assert torch.equal(saved[key], rank0[key]), key
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    moved = max(float((single[k] - initial[k]).abs().max()) for k in single if single[k].is_floating_point())
    assert moved > 1e-3  # the runs trained: the tolerance above is far below the size of the updates
    assert not any(name.startswith('rank') for name in os.listdir(ddp_out))

    with open(ddp_out / 'summary.json') as f:
        ddp_summary = json.load(f)
    with open(single_out / 'summary.json') as f:
        single_summary = json.load(f)
    assert ddp_summary['world_size'] == 2 and single_summary['world_size'] == 1
    for key in ('train_loss', 'eval_top1', 'eval_loss', 'eval_patch_precision', 'eval_patch_recall', 'eval_loc_ap'):
        assert ddp_summary['final'][key] == pytest.approx(single_summary['final'][key], rel=1e-4, abs=1e-4), key
