"""Ablation of loss-based attention: the patch-loss weight gamma_max and the selection threshold xi (Shi et al., TIP 2021,
Table VI and Fig. 7)

Trains the loss-attention conv-head model of `localization.py`'s preset (same trunk, data, optimizer, schedule and
metrics) for
    Table VI: gamma_max in {0, 0.1} x xi in {0, 0.1}
    Fig. 7:   xi in XI_SWEEP at gamma_max = 0.1, and gamma_max in GAMMA_SWEEP at xi = 0.1
over several seeds. gamma_max = 0 drops the patch term of Eq. 9 (the ramp-up reaches gamma_max); xi = 0 keeps every
patch (Eq. 5 without the threshold). A patch counts as selected when the model gives it a non-zero weight (its own
xi/M threshold).

    python benchmarks/ablation.py --preset cpu

Writes ablation_<preset>.json / .md / .png into benchmarks/results/ (or --out).
"""
import argparse
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, environment, environment_md, markdown_table, pyplot, write_results  # noqa: E402
from localization import (  # noqa: E402
    METHODS, METRIC_NAMES, METRICS, PRESETS, Preset, create, fmt, load_split, predict, score, summarize, train_one,
)

XI_SWEEP = (0., 0.1, 0.25, 0.5, 0.75, 1.)
GAMMA_SWEEP = (0., 0.1, 0.5, 1., 2., 5.)
TABLE_GAMMAS = (0., 0.1)
TABLE_XIS = (0., 0.1)
DEFAULT_GAMMA, DEFAULT_XI = 0.1, 0.1

ABLATION_PRESETS = {
    'tiny': replace(PRESETS['tiny'], tasks=('single',)),
    'cpu': replace(PRESETS['cpu'], train_samples=1500, epochs=6),
    'gpu': replace(PRESETS['gpu'], tasks=('single',)),
}
SWEEPS = {
    'tiny': ((0., 1.), (0., 5.)),
    'cpu': (XI_SWEEP, GAMMA_SWEEP),
    'gpu': (XI_SWEEP, GAMMA_SWEEP),
}


def configurations(xi_sweep: Sequence[float], gamma_sweep: Sequence[float]) -> List[Tuple[float, float]]:
    """Distinct (gamma_max, xi) pairs of Table VI and both sweeps, in a stable order."""
    pairs = [(g, x) for g in TABLE_GAMMAS for x in TABLE_XIS]
    pairs += [(DEFAULT_GAMMA, x) for x in xi_sweep] + [(g, DEFAULT_XI) for g in gamma_sweep]
    return list(dict.fromkeys(pairs))


def render(summary: Dict[Tuple[float, float], Dict[str, Dict[str, Optional[float]]]], xi_sweep: Sequence[float],
           gamma_sweep: Sequence[float], path: Path) -> None:
    """Two panels of line plots (metric vs xi, metric vs gamma_max), mean over seeds with min-max bands."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, (label, xs, key) in zip(axes, (
            (f'xi (gamma_max = {DEFAULT_GAMMA})', xi_sweep, lambda v: (DEFAULT_GAMMA, v)),
            (f'gamma_max (xi = {DEFAULT_XI})', gamma_sweep, lambda v: (v, DEFAULT_XI)))):
        for metric in METRICS:
            stats = [summary[key(v)][metric] for v in xs]
            if any(s['mean'] is None for s in stats):
                continue
            line, = ax.plot(xs, [s['mean'] for s in stats], marker='o', label=METRIC_NAMES[metric])
            ax.fill_between(xs, [s['min'] for s in stats], [s['max'] for s in stats], color=line.get_color(),
                            alpha=0.15)
        ax.set_xlabel(label)
        ax.set_ylabel('%')
        ax.set_ylim(0, 105)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc='lower right')
    fig.suptitle('Loss-Attention (conv): mean over seeds, band min-max', fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--preset', choices=sorted(ABLATION_PRESETS), default='cpu')
    parser.add_argument('--seeds', type=int, default=None, help='number of seeds (default: the preset\'s)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s choice)')
    parser.add_argument('--out', type=Path, default=RESULTS_DIR)
    parser.add_argument('--no-progress', action='store_true')
    args = parser.parse_args(argv)
    preset: Preset = ABLATION_PRESETS[args.preset]
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error(f'--seeds must be >= 1, got {args.seeds}')
        preset = replace(preset, seeds=args.seeds)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    xi_sweep, gamma_sweep = SWEEPS[args.preset]
    configs = configurations(xi_sweep, gamma_sweep)
    method = METHODS[0]  # Loss-Attention (conv)
    progress = not args.no_progress
    start = time.perf_counter()
    test = load_split('test', preset, False, seed=0)
    runs: List[Dict[str, Any]] = []
    for seed in range(preset.seeds):
        train = load_split('train', preset, False, seed=seed)
        for gamma_max, xi in configs:
            desc = f'gamma_max {gamma_max} xi {xi} seed {seed}'
            torch.manual_seed(seed)
            model = create(method, preset, device, xi=xi)
            train_s = train_one(model, replace(method, gamma_max=gamma_max), train, preset, False, seed, device,
                                progress, desc)
            geometry = model.patch_geometry(tuple(test.images.shape[-2:]))
            logits, weights, heatmaps = predict(model, method, geometry, test, preset.batch_size, device)
            metrics = score(logits, weights, heatmaps, geometry, test, False, selection_xi=xi)
            runs.append(dict(gamma_max=gamma_max, xi=xi, seed=seed, train_s=train_s, **metrics))
            tqdm.write(f'{desc}: ' + ', '.join(f'{k} {v:.1f}' for k, v in metrics.items()) + f' ({train_s:.0f} s)')
    summary = {(g, x): {m: summarize([r[m] for r in runs if (r['gamma_max'], r['xi']) == (g, x)])
                        for m in METRICS} for g, x in configs}
    env = environment(device, torch.get_num_threads())
    stem = f'ablation_{args.preset}'
    header = ['gamma_max', 'xi'] + [METRIC_NAMES[m] for m in METRICS]

    def rows(pairs: Sequence[Tuple[float, float]]) -> List[List[str]]:
        return [[str(g), str(x)] + [fmt(summary[(g, x)][m]) for m in METRICS] for g, x in pairs]

    md = (f'# Ablation of Loss-Attention (conv): preset `{args.preset}`\n\n'
          f'Trunk `{preset.arch}_conv` {preset.model_kwargs or "(paper size)"}, {preset.data}, '
          f'{preset.train_samples} training / {preset.test_samples} test canvases, {preset.epochs} epochs, batch '
          f'{preset.batch_size}, SGD lr {preset.lr} (cosine), {preset.seeds} seeds; mean ± std over seeds. Selected '
          f'patches: non-zero weights. {preset.notes}\n\n'
          '## Table VI: patch loss and threshold\n\n'
          + markdown_table(header, rows([(g, x) for g in TABLE_GAMMAS for x in TABLE_XIS]), 'rr' + 'r' * len(METRICS))
          + f'\n## Sweep of xi (gamma_max = {DEFAULT_GAMMA})\n\n'
          + markdown_table(header, rows([(DEFAULT_GAMMA, x) for x in xi_sweep]), 'rr' + 'r' * len(METRICS))
          + f'\n## Sweep of gamma_max (xi = {DEFAULT_XI})\n\n'
          + markdown_table(header, rows([(g, DEFAULT_XI) for g in gamma_sweep]), 'rr' + 'r' * len(METRICS))
          + f'\n![sweeps]({stem}.png)\n\n' + environment_md(env))
    payload = dict(benchmark='ablation', preset=args.preset, config=asdict(preset), xi_sweep=list(xi_sweep),
                   gamma_sweep=list(gamma_sweep), environment=env,
                   summary=[dict(gamma_max=g, xi=x, **summary[(g, x)]) for g, x in configs], runs=runs)
    written = write_results(args.out, stem, payload, md)
    render(summary, xi_sweep, gamma_sweep, args.out / f'{stem}.png')
    written.append(args.out / f'{stem}.png')
    print(f'finished in {time.perf_counter() - start:.0f} s; wrote:\n  ' + '\n  '.join(str(p) for p in written))
    return 0


if __name__ == '__main__':
    sys.exit(main())
