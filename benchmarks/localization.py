"""Accuracy and localization of loss-based attention against the paper's baselines (Shi et al., TIP 2021, Tables IV/V)

Every method is trained from scratch on the built-in cluttered digits (`timm_lossattn.data.ClutteredDigits`) with the
same trunk, data, optimizer and schedule, once per seed, then scored on the test canvases:

    Loss-Attention (conv head)      pool='lossattn', Eq. 9/10 loss with the ramped patch term (gamma_max)
    Mean pooling / Attention / Gated attention (conv head)   image loss only
    Loss-Attention (capsule head)   pool='lossattn' on the capsule head, Eq. 9/10
    Dynamic routing (capsule head)  pool='routing', image loss only
    Plain CNN + Grad-CAM            the mean-pooling network explained post hoc by Grad-CAM on the last trunk stage:
                                    the mean of linear patch logits is a linear classifier on the globally averaged
                                    feature, so that network is the plain CNN (GAP + linear) on the same trunk and
                                    head; it is trained once and scored with both explanations

Metrics (timm_lossattn.metrics): image accuracy (mAP for multi-label); localization AP (the paper's estimated box:
the minimum square around the selected patches, correct when IoU > 0.5 with a box of the predicted class);
MaxBoxAcc (Choe et al. 2020) of the heat map upsampled to the image; patch precision / recall / F-score.
A patch counts as selected when its weight exceeds xi/M (xi = 0.1, M patches), the loss-attention threshold: for
loss attention that is exactly its non-zero weights; the baselines' weights (and Grad-CAM pooled over the same
patches, normalised to sum 1) go through the same rule so every method is judged alike.

    python benchmarks/localization.py --preset cpu      # tiny ResNet trunk, 3 seeds, < 30 min on 2 cores
    python benchmarks/localization.py --preset gpu      # the paper's ResNet18 trunk, single- and multi-label

Writes localization_<preset>.json / .md / _metrics.png / _maps.png into benchmarks/results/ (or --out).
"""
import argparse
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from tqdm import tqdm

import timm_lossattn  # noqa: F401  (registers the lossattn_* models)
from timm_lossattn.data import ClutteredDigits
from timm_lossattn.explain import upsample_patch_map
from timm_lossattn.gradcam import gradcam, pool_to_patches
from timm_lossattn.layers import PatchGeometry
from timm_lossattn.loss import LossAttentionLoss
from timm_lossattn.metrics import (
    accuracy, box_from_patches, localization_ap, max_box_acc, multilabel_map, patch_correctness,
    patch_precision_recall,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, environment, environment_md, markdown_table, pyplot, write_results  # noqa: E402

SELECTION_XI = 0.1


@dataclass(frozen=True)
class Method:
    """One row of the comparison: a trained network (head, pool, gamma_max) and how it is explained."""
    name: str
    head_type: str
    pool: str
    gamma_max: float
    explainer: str = 'patch weights'  # or 'Grad-CAM'

    @property
    def network(self) -> Tuple[str, str, float]:
        """Methods with the same network share one training per seed."""
        return self.head_type, self.pool, self.gamma_max


METHODS = (
    Method('Loss-Attention (conv)', 'conv', 'lossattn', 0.1),
    Method('Mean pooling (conv)', 'conv', 'mean', 0.),
    Method('Attention (conv)', 'conv', 'attention', 0.),
    Method('Gated attention (conv)', 'conv', 'gated', 0.),
    Method('Loss-Attention (caps)', 'caps', 'lossattn', 0.1),
    Method('Dynamic routing (caps)', 'caps', 'routing', 0.),
    Method('Plain CNN + Grad-CAM', 'conv', 'mean', 0., explainer='Grad-CAM'),
)


@dataclass
class Preset:
    """Trunk, data and schedule of a run."""
    arch: str  # model name prefix: '<arch>_conv' / '<arch>_caps'
    model_kwargs: Dict[str, Any]
    caps_kwargs: Dict[str, Any]
    data: str
    train_samples: int
    test_samples: int
    epochs: int
    batch_size: int
    lr: float
    seeds: int
    tasks: Tuple[str, ...]
    in_chans: int = 1
    weight_decay: float = 5e-4
    rampup_fraction: float = 0.4
    num_map_images: int = 6
    notes: str = field(default='')


PRESETS = {
    'tiny': Preset(
        'lossattn_tinyresnet', dict(channels=(4, 8, 8, 8), head_width=8), dict(caps_dims=(4, 4, 4, 8)),
        'digits32', train_samples=32, test_samples=16, epochs=1, batch_size=16, lr=0.05, seeds=1,
        tasks=('single', 'multi'), num_map_images=2, notes='smoke test: numbers mean nothing'),
    'cpu': Preset(
        'lossattn_tinyresnet', dict(channels=(8, 16, 32, 32), head_width=32), dict(caps_dims=(8, 8, 16, 32)),
        'digits32', train_samples=2000, test_samples=500, epochs=8, batch_size=64, lr=0.05, seeds=3,
        tasks=('single',)),
    'gpu': Preset(
        'lossattn_resnet18', {}, {}, 'digits32', train_samples=10000, test_samples=2000, epochs=30, batch_size=128,
        lr=0.1, seeds=3, tasks=('single', 'multi'), in_chans=3),
}

METRICS = ('accuracy', 'loc_ap', 'max_box_acc', 'patch_precision', 'patch_recall', 'patch_f')
METRIC_NAMES = {
    'accuracy': 'Accuracy / mAP (%)', 'loc_ap': 'Loc. AP (%)', 'max_box_acc': 'MaxBoxAcc (%)',
    'patch_precision': 'Patch P (%)', 'patch_recall': 'Patch R (%)', 'patch_f': 'Patch F (%)', 'train_s': 'Train (s)'}


@dataclass
class Split:
    """A data split held in memory."""
    images: torch.Tensor
    targets: torch.Tensor
    boxes: List[torch.Tensor]


def load_split(split: str, preset: Preset, multi_label: bool, seed: int) -> Split:
    dataset = ClutteredDigits(
        split, preset=preset.data, multi_label=multi_label, seed=seed, in_chans=preset.in_chans,
        num_samples=preset.train_samples if split == 'train' else preset.test_samples)
    images, targets, boxes = zip(*(dataset[i] for i in range(len(dataset))))
    return Split(torch.stack(images), torch.stack(targets) if multi_label else torch.tensor(targets), list(boxes))


def create(method: Method, preset: Preset, device: torch.device, xi: float = SELECTION_XI) -> nn.Module:
    kwargs = dict(preset.model_kwargs, **(preset.caps_kwargs if method.head_type == 'caps' else {}))
    return timm.create_model(
        f'{preset.arch}_{method.head_type}', num_classes=10, in_chans=preset.in_chans, pool=method.pool,
        xi=xi, **kwargs).to(device)


def train_one(model: nn.Module, method: Method, data: Split, preset: Preset, multi_label: bool, seed: int,
              device: torch.device, progress: bool, desc: str) -> float:
    """SGD (momentum 0.9, cosine lr per step) on the split; returns the training time in seconds."""
    torch.manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=preset.lr, momentum=0.9, weight_decay=preset.weight_decay)
    steps_per_epoch = math.ceil(len(data.images) / preset.batch_size)
    total_steps = preset.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_steps)
    criterion = LossAttentionLoss(
        multi_label=multi_label, gamma_max=method.gamma_max, rampup_epochs=preset.rampup_fraction * preset.epochs)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    with tqdm(total=total_steps, desc=desc, disable=not progress, leave=False) as bar:
        for epoch in range(preset.epochs):
            order = torch.randperm(len(data.images), generator=generator)
            for step, index in enumerate(order.split(preset.batch_size)):
                images, targets = data.images[index].to(device), data.targets[index].to(device)
                loss = criterion(model(images), targets, epoch=epoch + step / steps_per_epoch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f'{desc}: loss became {loss.item()} at epoch {epoch}, step {step}')
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                bar.update()
    return time.perf_counter() - start


def predict(model: nn.Module, method: Method, geometry: PatchGeometry, data: Split, batch_size: int,
            device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits (N, K), patch weights (N, M) summing to 1, heat maps (N, H, W)) on the split."""
    model.eval()
    logits, weights, heatmaps = [], [], []
    rows, cols = geometry.grid_size
    for images in data.images.split(batch_size):
        images = images.to(device)
        with torch.no_grad():
            batch_logits, batch_weights, _ = (t.float().cpu() for t in model(images))
        if method.explainer == 'Grad-CAM':
            cams = gradcam(model, images, batch_logits.argmax(1))
            patch_scores = pool_to_patches(cams, geometry)
            batch_weights = patch_scores / patch_scores.sum(1, keepdim=True).clamp_min(1e-12)
        else:
            cams = upsample_patch_map(batch_weights.view(-1, rows, cols), geometry)
        logits.append(batch_logits)
        weights.append(batch_weights)
        heatmaps.append(cams)
    return torch.cat(logits), torch.cat(weights), torch.cat(heatmaps)


def score(logits: torch.Tensor, weights: torch.Tensor, heatmaps: torch.Tensor, geometry: PatchGeometry, data: Split,
          multi_label: bool, selection_xi: float = SELECTION_XI) -> Dict[str, Optional[float]]:
    """The benchmark's metrics (in %) from the predictions on a split; patches with weight > xi/M are selected."""
    size = geometry.input_size
    selected = weights * (weights > selection_xi / weights.shape[1])
    correct = torch.stack([
        patch_correctness(geometry.patch_boxes, gt[:, :4], gt[:, 4].long(),
                          targets.nonzero().flatten() if multi_label else targets.view(1), size)
        for gt, targets in zip(data.boxes, data.targets)])
    pr = patch_precision_recall(selected, correct)
    metrics = {
        'accuracy': 100 * (multilabel_map(logits.sigmoid(), data.targets)[0] if multi_label
                           else accuracy(logits, data.targets)),
        'loc_ap': None,
        'max_box_acc': 100 * max_box_acc(heatmaps, [gt[:, :4] for gt in data.boxes]).max_box_acc,
        'patch_precision': 100 * pr.precision, 'patch_recall': 100 * pr.recall, 'patch_f': 100 * pr.f_score,
    }
    if not multi_label:
        probs = logits.softmax(1)
        pred_boxes, scores, labels = [], [], []
        for i, image_weights in enumerate(selected):
            box = box_from_patches(image_weights, geometry.patch_boxes, size)
            label = int(probs[i].argmax())
            pred_boxes.append(torch.zeros(0, 4) if box is None else box[None])
            scores.append(torch.tensor([] if box is None else [float(probs[i, label])]))
            labels.append(torch.tensor([] if box is None else [label], dtype=torch.long))
        metrics['loc_ap'] = 100 * localization_ap(
            pred_boxes, scores, labels, [gt[:, :4] for gt in data.boxes], [gt[:, 4].long() for gt in data.boxes])
    return metrics


def summarize(values: Sequence[Optional[float]]) -> Dict[str, Optional[float]]:
    values = [v for v in values if v is not None]
    if not values:
        return dict(mean=None, std=None, min=None, max=None)
    return dict(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else 0.,
                min=min(values), max=max(values))


def render_maps(examples: Dict[str, torch.Tensor], data: Split, path: Path) -> None:
    """Heat maps of the first test images, one row per method (first seed), with the ground-truth boxes."""
    plt = pyplot()
    count = data.images.shape[0] if not examples else next(iter(examples.values())).shape[0]
    rows = len(examples) + 1
    fig, axes = plt.subplots(rows, count, figsize=(1.6 * count, 1.6 * rows), squeeze=False)
    for j in range(count):
        axes[0, j].imshow(data.images[j].mean(0), cmap='gray', vmin=0, vmax=1)
        for r, (name, maps) in enumerate(examples.items(), start=1):
            axes[r, j].imshow(data.images[j].mean(0), cmap='gray', vmin=0, vmax=1)
            heat = maps[j] - maps[j].min()
            axes[r, j].imshow(heat / heat.max() if heat.max() > 0 else heat, cmap='jet', alpha=0.5, vmin=0, vmax=1)
        for r in range(rows):
            for x0, y0, x1, y1, _ in data.boxes[j].tolist():
                axes[r, j].add_patch(plt.Rectangle((x0 - .5, y0 - .5), x1 - x0, y1 - y0, fill=False, ec='lime', lw=1))
    for r, name in enumerate(['image'] + list(examples), start=0):
        axes[r, 0].set_ylabel(name.replace(' (', '\n('), fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render_metrics(summary: Dict[str, Dict[str, Dict[str, Dict[str, Optional[float]]]]], path: Path) -> None:
    """Bar chart per task: each metric's mean over seeds for each method, with min-max whiskers."""
    plt = pyplot()
    tasks = list(summary)
    fig, axes = plt.subplots(len(tasks), 1, figsize=(12, 3.6 * len(tasks)), squeeze=False)
    for ax, task in zip(axes[:, 0], tasks):
        methods = list(summary[task])
        width = 0.8 / len(methods)
        for k, method in enumerate(methods):
            stats = [summary[task][method][m] for m in METRICS]
            xs = [i + (k - (len(methods) - 1) / 2) * width for i in range(len(METRICS))]
            means = [s['mean'] or 0. for s in stats]
            err = [[(s['mean'] or 0.) - (s['min'] or 0.) for s in stats], [(s['max'] or 0.) - (s['mean'] or 0.)
                                                                          for s in stats]]
            ax.bar(xs, means, width, yerr=err, capsize=2, label=method)
        ax.set_xticks(range(len(METRICS)), [METRIC_NAMES[m] for m in METRICS])
        ax.set_ylim(0, 105)
        ax.set_title(f'{task}-label digits: mean over seeds, whiskers min-max', fontsize=10)
        ax.legend(fontsize=7, ncol=4, loc='upper center', bbox_to_anchor=(0.5, -0.12))
        ax.grid(axis='y', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fmt(stats: Dict[str, Optional[float]]) -> str:
    if stats['mean'] is None:
        return '-'
    return f'{stats["mean"]:.1f} ± {stats["std"]:.1f}'


def run(preset_name: str, preset: Preset, methods: Sequence[Method], device: torch.device, out_dir: Path,
        progress: bool, threads: int) -> List[Path]:
    runs: List[Dict[str, Any]] = []
    written: List[Path] = []
    stem = f'localization_{preset_name}'
    for task in preset.tasks:
        multi_label = task == 'multi'
        test = load_split('test', preset, multi_label, seed=0)
        examples: Dict[str, torch.Tensor] = {}
        for seed in range(preset.seeds):
            train = load_split('train', preset, multi_label, seed=seed)
            trained: Dict[Tuple[str, str, float], Tuple[nn.Module, float]] = {}
            for method in methods:
                desc = f'{task}/{method.name}/seed {seed}'
                if method.network not in trained:
                    torch.manual_seed(seed)
                    model = create(method, preset, device)
                    train_s = train_one(model, method, train, preset, multi_label, seed, device, progress, desc)
                    trained[method.network] = model, train_s
                model, train_s = trained[method.network]
                geometry = model.patch_geometry(tuple(test.images.shape[-2:]))
                logits, weights, heatmaps = predict(model, method, geometry, test, preset.batch_size, device)
                metrics = score(logits, weights, heatmaps, geometry, test, multi_label)
                runs.append(dict(task=task, method=method.name, seed=seed, train_s=train_s, **metrics))
                if seed == 0:
                    examples[method.name] = heatmaps[:preset.num_map_images]
                tqdm.write(f'{desc}: ' + ', '.join(
                    f'{k} {v:.1f}' for k, v in metrics.items() if v is not None) + f' ({train_s:.0f} s)')
        maps_path = out_dir / f'{stem}_{task}_maps.png'
        out_dir.mkdir(parents=True, exist_ok=True)
        render_maps(examples, Split(test.images[:preset.num_map_images], test.targets, test.boxes), maps_path)
        written.append(maps_path)
    summary = {task: {m.name: {metric: summarize([r[metric] for r in runs if r['task'] == task and
                                                  r['method'] == m.name]) for metric in METRICS + ('train_s',)}
                      for m in methods} for task in preset.tasks}
    env = environment(device, threads)
    md = [f'# Localization and accuracy: preset `{preset_name}`\n',
          f'Trunk `{preset.arch}_*` {preset.model_kwargs or "(paper size)"}, {preset.data}, {preset.train_samples} '
          f'training / {preset.test_samples} test canvases, {preset.epochs} epochs, batch {preset.batch_size}, '
          f'SGD lr {preset.lr} (cosine), {preset.seeds} seeds; mean ± std over seeds. Patches are selected when '
          f'their weight exceeds xi/M with xi = {SELECTION_XI}. {preset.notes}\n']
    for task in preset.tasks:
        md.append(f'\n## {"Multi-label (accuracy column: mAP)" if task == "multi" else "Single-label"}\n\n')
        md.append(markdown_table(['Method'] + [METRIC_NAMES[m] for m in METRICS + ('train_s',)], [
            [name] + [fmt(stats[m]) for m in METRICS + ('train_s',)] for name, stats in summary[task].items()]))
        md.append(f'\n![heat maps]({stem}_{task}_maps.png)\n')
    md.append(f'\n![metrics]({stem}_metrics.png)\n\n' + environment_md(env))
    payload = dict(benchmark='localization', preset=preset_name, config=asdict(preset), selection_xi=SELECTION_XI,
                   methods=[asdict(m) for m in methods], environment=env, summary=summary, runs=runs)
    written += write_results(out_dir, stem, payload, ''.join(md))
    metrics_path = out_dir / f'{stem}_metrics.png'
    render_metrics(summary, metrics_path)
    written.append(metrics_path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--preset', choices=sorted(PRESETS), default='cpu')
    parser.add_argument('--seeds', type=int, default=None, help='number of seeds (default: the preset\'s)')
    parser.add_argument('--methods', nargs='+', default=None, metavar='NAME',
                        help='subset of methods by name prefix, e.g. "Loss-Attention" "Plain"')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s choice)')
    parser.add_argument('--out', type=Path, default=RESULTS_DIR)
    parser.add_argument('--no-progress', action='store_true')
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    if args.seeds is not None:
        if args.seeds < 1:
            parser.error(f'--seeds must be >= 1, got {args.seeds}')
        preset.seeds = args.seeds
    methods = METHODS if args.methods is None else tuple(
        m for m in METHODS if any(m.name.startswith(prefix) for prefix in args.methods))
    if not methods:
        parser.error(f'no method matches {args.methods}; methods: {", ".join(m.name for m in METHODS)}')
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    written = run(args.preset, preset, methods, torch.device(args.device), args.out, not args.no_progress,
                  torch.get_num_threads())
    print(f'finished in {time.perf_counter() - start:.0f} s; wrote:\n  ' + '\n  '.join(str(p) for p in written))
    return 0


if __name__ == '__main__':
    sys.exit(main())
