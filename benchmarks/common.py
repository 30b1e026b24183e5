"""What every benchmark script shares: where results go, what machine and versions produced them, how they are written.

Each script writes `benchmarks/results/<name>_<preset>.json` (the measurements plus `environment()`), a markdown
table `<name>_<preset>.md` and PNG plots next to them. `--out DIR` redirects all of it (the smoke tests use a temp dir).
"""
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / 'results'


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux, else `platform.processor()`)."""
    try:
        with open('/proc/cpuinfo', encoding='utf-8') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def environment(device: torch.device, threads: int) -> Dict[str, Any]:
    """Machine, versions and command line of this run, stored with every result."""
    import timm
    import timm_lossattn
    env = {
        'command': ' '.join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        'python': platform.python_version(),
        'torch': torch.__version__,
        'timm': timm.__version__,
        'timm_lossattn': timm_lossattn.__version__,
        'platform': platform.platform(),
        'cpu': cpu_model(),
        'cpu_count': os.cpu_count(),
        'torch_threads': threads,
        'device': str(device),
    }
    if device.type == 'cuda':
        env['gpu'] = torch.cuda.get_device_name(device)
        env['cuda'] = torch.version.cuda
    return env


def environment_md(env: Dict[str, Any]) -> str:
    """A short markdown paragraph naming the machine, versions and command."""
    machine = env.get('gpu') or env['cpu']
    return (f'Measured on {machine} ({env["torch_threads"]} torch threads, {env["cpu_count"]} CPUs), '
            f'torch {env["torch"]}, timm {env["timm"]}, timm_lossattn {env["timm_lossattn"]}, '
            f'Python {env["python"]}.\n\nCommand: `{env["command"]}`\n')


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: Optional[str] = None) -> str:
    """A markdown table; `align` is one character per column, 'l' or 'r' (default: first left, rest right)."""
    align = align or 'l' + 'r' * (len(header) - 1)
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' if a == 'l' else '---:' for a in align) + '|']
    lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
    return '\n'.join(lines) + '\n'


def write_results(out_dir: Path, stem: str, payload: Dict[str, Any], markdown: str) -> List[Path]:
    """Write `<stem>.json` and `<stem>.md` into `out_dir`; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f'{stem}.json', out_dir / f'{stem}.md'
    json_path.write_text(json.dumps(payload, indent=2) + '\n', encoding='utf-8')
    md_path.write_text(markdown, encoding='utf-8')
    return [json_path, md_path]


def pyplot():
    """matplotlib's pyplot on the Agg backend (no screen needed)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt
