"""Smoke test of benchmarks/speed.py: the tiny preset runs and writes well-formed results (numbers not checked)."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / 'benchmarks' / 'speed.py'
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
ROW_KEYS = {
    'throughput': {'model', 'backbone', 'input_size', 'batch', 'lossattn_ms', 'backbone_ms', 'time_ratio'},
    'head': {'model', 'batch', 'pool', 'forward_ms', 'head_ms', 'pool_ms', 'extra_vs_mean_pct',
             'pool_extra_vs_mean_pct'},
    'explain': {'model', 'batch', 'explain_ms', 'gradcam_ms', 'speedup'},
    'train': {'model', 'batch', 'variant', 'step_ms', 'compile_s', 'error'},
    'memory': {'model', 'batch', 'measure', 'without_checkpointing_mib', 'with_checkpointing_mib', 'saving_pct'},
    'input_size': {'model', 'input_size', 'patches', 'ms_per_image', 'gflops_per_image'},
    'strides': {'model', 'input_size', 'stage_strides', 'patch_grid', 'ms_per_image', 'gflops_per_image'},
}


def test_tiny_preset_writes_json_markdown_and_plots(tmp_path: Path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), '--preset', 'tiny', '--threads', '1', '--out', str(tmp_path)],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]

    payload = json.loads((tmp_path / 'speed_tiny.json').read_text(encoding='utf-8'))
    assert payload['preset'] == 'tiny'
    env = payload['environment']
    assert {'command', 'python', 'torch', 'timm', 'timm_lossattn', 'cpu', 'device', 'torch_threads'} <= set(env)
    assert '--preset tiny' in env['command'] and env['torch_threads'] == 1
    assert set(payload['sections']) == set(ROW_KEYS)
    for section, keys in ROW_KEYS.items():
        rows = payload['sections'][section]
        assert rows, section
        for row in rows:
            assert keys <= set(row), (section, keys - set(row))
    assert {r['pool'] for r in payload['sections']['head']} == {'lossattn', 'mean'}
    assert [t['goal'] for t in payload['targets']] == ['<= 3 %', '>= 3x', '>= 40 %']
    assert all(isinstance(t['met'], bool) and isinstance(t['measured'], float) for t in payload['targets'])

    markdown = (tmp_path / 'speed_tiny.md').read_text(encoding='utf-8')
    assert markdown.startswith('# Speed and memory')
    assert 'Command: `' in markdown and '## Targets' in markdown
    assert markdown.count('|---') >= len(ROW_KEYS) + 1  # a table per section and the targets

    for plot in ('input_size', 'strides', 'throughput', 'train'):
        assert (tmp_path / f'speed_tiny_{plot}.png').read_bytes()[:8] == PNG_SIGNATURE, plot
