"""Smoke tests of benchmarks/localization.py and benchmarks/ablation.py on their tiny presets: they run from the command
line and write well-formed JSON, markdown and PNG files (the numbers are not checked: the tiny runs train for one
epoch on 32 canvases)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / 'benchmarks'
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
METRICS = ('accuracy', 'loc_ap', 'max_box_acc', 'patch_precision', 'patch_recall', 'patch_f')


def _run(script: str, out: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), '--preset', 'tiny', '--out', str(out), '--no-progress', *args],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _check_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, f'{path} is not a PNG'


def _check_percent(value) -> None:
    assert value is None or (isinstance(value, float) and math.isfinite(value) and 0. <= value <= 100.), value


def _check_environment(env: dict) -> None:
    for key in ('command', 'torch', 'timm', 'timm_lossattn', 'cpu', 'device', 'torch_threads'):
        assert env[key] not in (None, ''), key
    assert '--preset tiny' in env['command']


def test_localization_tiny_writes_results(tmp_path):
    stdout = _run('localization.py', tmp_path)
    assert 'wrote' in stdout
    payload = json.loads((tmp_path / 'localization_tiny.json').read_text())
    assert payload['benchmark'] == 'localization' and payload['preset'] == 'tiny'
    _check_environment(payload['environment'])
    names = [m['name'] for m in payload['methods']]
    assert len(names) == 7 and 'Plain CNN + Grad-CAM' in names and 'Dynamic routing (caps)' in names
    assert set(payload['summary']) == {'single', 'multi'}
    assert len(payload['runs']) == 2 * 7  # two tasks x seven methods x one seed
    for run in payload['runs']:
        for metric in METRICS:
            _check_percent(run[metric])
        assert (run['loc_ap'] is None) == (run['task'] == 'multi')  # localization AP is single-label only
    for task in payload['summary'].values():
        assert set(task) == set(names)
        for stats in task.values():
            assert set(stats) == set(METRICS) | {'train_s'}
    md = (tmp_path / 'localization_tiny.md').read_text()
    assert md.count('| Plain CNN + Grad-CAM |') == 2 and '|---|' in md and 'Command:' in md
    for png in ('localization_tiny_metrics.png', 'localization_tiny_single_maps.png', 'localization_tiny_multi_maps.png'):
        _check_png(tmp_path / png)
        assert f'({png})' in md


def test_ablation_tiny_writes_results(tmp_path):
    _run('ablation.py', tmp_path)
    payload = json.loads((tmp_path / 'ablation_tiny.json').read_text())
    assert payload['benchmark'] == 'ablation'
    _check_environment(payload['environment'])
    pairs = {(row['gamma_max'], row['xi']) for row in payload['summary']}
    # Table VI's 2 x 2 grid and both sweep ends
    assert {(0., 0.), (0., 0.1), (0.1, 0.), (0.1, 0.1), (0.1, 1.), (5., 0.1)} <= pairs
    for row in payload['summary']:
        for metric in METRICS:
            assert set(row[metric]) == {'mean', 'std', 'min', 'max'}
            _check_percent(row[metric]['mean'])
    md = (tmp_path / 'ablation_tiny.md').read_text()
    assert 'Table VI' in md and md.count('|---:|') >= 3
    _check_png(tmp_path / 'ablation_tiny.png')


@pytest.mark.parametrize('script', ['localization.py', 'ablation.py'])
def test_bad_seed_count_is_a_clear_error(tmp_path, script):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), '--preset', 'tiny', '--seeds', '0',
                             '--out', str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and '--seeds must be >= 1' in result.stderr
