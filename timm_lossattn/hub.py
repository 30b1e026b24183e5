""" Checkpoints in Hugging Face Hub layout: export, verify, push

A Hub-layout folder holds `config.json` (timm's format: architecture, num_classes, label_names, the full
pretrained_cfg, model_args, plus a `lossattn` block with the training record), `model.safetensors` and a `README.md`
model card. `timm.create_model('local-dir:<folder>')` and, once pushed, `timm.create_model('hf-hub:<repo>')` load it
(after `import timm_lossattn`).

    python -m timm_lossattn hub export RUN_DIR --output FOLDER [--tag digits32] [--manifest weights/manifest.json]
    python -m timm_lossattn hub verify FOLDER [--manifest weights/manifest.json] [--tolerance 0.005]
    python -m timm_lossattn hub push FOLDER --repo-id ORG/NAME [--dry-run]

Only safetensors files are read, unless `--allow-pickle` is given for a torch checkpoint (`.pth`, `.pth.tar`,
`.bin`), which is then read with `torch.load(weights_only=True)`.
"""
import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import safetensors
import safetensors.torch
import timm
import torch
import torch.nn as nn

from .pretrained import HUB_ORG, MANIFEST_NAME, PUBLISHED, load_manifest
from .version import __version__

__all__ = [
    'DataSpec', 'HubCheckpointError', 'CorruptCheckpointError', 'ChecksumMismatchError', 'UnknownArchitectureError',
    'NumClassesMismatchError', 'PickleNotAllowedError', 'MetricsMismatchError', 'VerifyReport', 'DEFAULT_TOLERANCE',
    'export_checkpoint', 'verify_folder', 'push_folder', 'measure_metrics', 'read_state_dict', 'sha256_file',
    'update_manifest', 'main',
]

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
CARD_NAME = 'README.md'
SUMMARY_NAME = 'summary.json'
SAMPLE_NAME = 'sample_explanation.png'
PICKLE_SUFFIXES = ('.pth', '.pt', '.bin', '.tar', '.ckpt')
# absolute difference allowed between a card's metrics and `verify`'s re-measurement (fractions in [0, 1]); the
# evaluation is deterministic, so this only absorbs floating point differences between machines and torch builds
DEFAULT_TOLERANCE = 0.005
PAPER = 'Loss-based Attention for Interpreting Image-level Prediction of Convolutional Neural Networks'
PAPER_URL = 'https://doi.org/10.1109/TIP.2020.3046875'


class HubCheckpointError(RuntimeError):
    """Base of the errors `export`, `verify` and `push` raise for a checkpoint or folder that is not right."""


class CorruptCheckpointError(HubCheckpointError):
    """A weight file that is missing, truncated, or not a valid safetensors file."""


class ChecksumMismatchError(HubCheckpointError):
    """A weight file whose sha256 differs from the one recorded in the manifest or config.json."""


class UnknownArchitectureError(HubCheckpointError):
    """config.json names an architecture timm does not know (even after `import timm_lossattn`)."""


class NumClassesMismatchError(HubCheckpointError):
    """num_classes of config.json (or the training record) disagrees with the classifier in the weights."""


class PickleNotAllowedError(HubCheckpointError):
    """A pickle-based checkpoint was given without `allow_pickle=True`."""


class MetricsMismatchError(HubCheckpointError):
    """Re-measured metrics differ from the model card's by more than the tolerance."""


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """The evaluation data a model card names: the built-in cluttered digits, fully determined by these fields.

    Attributes:
        preset: `ClutteredDigits` preset ('digits32' or 'digits64').
        split: 'train' or 'test'.
        num_samples: Number of canvases.
        seed: Dataset seed.
        multi_label: Multi-label canvases.
    """
    preset: str = 'digits32'
    split: str = 'test'
    num_samples: int = 500
    seed: int = 0
    multi_label: bool = False

    @property
    def name(self) -> str:
        return f'builtin:{self.preset}'

    def to_dict(self) -> Dict[str, Any]:
        return dict(name=self.name, **dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> 'DataSpec':
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


@torch.no_grad()
def measure_metrics(model: nn.Module, data: DataSpec, batch_size: int = 100) -> Dict[str, float]:
    """Image accuracy and the paper's patch / localization metrics of a model on the built-in digits.

    Args:
        model: A loss-attention model (returns `LossAttnOutput`).
        data: The evaluation data.
        batch_size: Evaluation batch size.

    Returns:
        accuracy, patch_precision, patch_recall, patch_f_score (patches with weight > 0 against the ground-truth
        labels, Shi et al. TIP 2021) and localization_ap (minimum square around the selected patches, IoU > 0.5),
        each in [0, 1] and rounded to 4 decimals.
    """
    from .data import ClutteredDigits, collate_boxes
    from .metrics import accuracy, box_from_patches, localization_ap, patch_correctness, patch_precision_recall
    if data.multi_label:
        raise ValueError('measure_metrics covers single-label digits only (multi_label=False)')
    dataset = ClutteredDigits(data.split, preset=data.preset, num_samples=data.num_samples, seed=data.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_boxes)
    was_training = model.training
    model.eval()
    size = (dataset.canvas_size, dataset.canvas_size)
    patch_boxes = model.patch_geometry(size).patch_boxes
    all_logits, all_targets, all_weights, all_correct = [], [], [], []
    pred_boxes, scores, pred_labels, gt_boxes, gt_labels = [], [], [], [], []
    for images, targets, boxes in loader:
        logits, weights, _ = model(images)
        probs = logits.float().softmax(-1)
        for i, gt in enumerate(boxes):
            labels = gt[:, 4].long()
            all_correct.append(patch_correctness(patch_boxes, gt[:, :4], labels, labels.unique(), size))
            box = box_from_patches(weights[i].float(), patch_boxes, size)
            pred_boxes.append(box[None] if box is not None else torch.zeros(0, 4))
            scores.append(probs[i].max()[None] if box is not None else torch.zeros(0))
            pred_labels.append(probs[i].argmax()[None] if box is not None else torch.zeros(0, dtype=torch.long))
            gt_boxes.append(gt[:, :4])
            gt_labels.append(labels)
        all_logits.append(logits.float())
        all_targets.append(targets)
        all_weights.append(weights.float())
    model.train(was_training)
    pr = patch_precision_recall(torch.cat(all_weights), torch.stack(all_correct))
    metrics = dict(
        accuracy=accuracy(torch.cat(all_logits), torch.cat(all_targets)),
        patch_precision=pr.precision,
        patch_recall=pr.recall,
        patch_f_score=pr.f_score,
        localization_ap=localization_ap(pred_boxes, scores, pred_labels, gt_boxes, gt_labels),
    )
    return {k: round(v, 4) if math.isfinite(v) else v for k, v in metrics.items()}


def sha256_file(path: Union[str, Path]) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: Union[str, Path], allow_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """Read a checkpoint's state dict: a safetensors file, a folder holding one, or (if allowed) a torch pickle.

    Args:
        path: `model.safetensors`, a folder with one, or a `.pth` / `.pth.tar` / `.bin` file.
        allow_pickle: Allow torch pickles (read with `weights_only=True`; timm's train.py checkpoints: the EMA
            weights if present, else `state_dict`).

    Returns:
        The state dict.
    """
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    if not path.is_file():
        raise CorruptCheckpointError(f'no weight file at {path}')
    if path.suffix != '.safetensors':
        if path.suffix not in PICKLE_SUFFIXES and not path.name.endswith('.pth.tar'):
            raise CorruptCheckpointError(f'{path}: expected a .safetensors file (or a torch pickle with allow_pickle)')
        if not allow_pickle:
            raise PickleNotAllowedError(
                f'{path} is a pickle-based torch checkpoint; it is read only when asked explicitly '
                '(allow_pickle=True, --allow-pickle). Prefer model.safetensors.')
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
        for key in ('state_dict_ema', 'state_dict', 'model'):
            if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
        return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in checkpoint.items()}
    try:
        return safetensors.torch.load_file(str(path), device='cpu')
    except (safetensors.SafetensorError, ValueError, OSError) as e:
        raise CorruptCheckpointError(f'{path} is not a valid safetensors file (truncated or altered?): {e}') from e


def _classifier_classes(state_dict: Dict[str, Any], classifier: str) -> Optional[int]:
    weight = state_dict.get(f'{classifier}.weight')
    return None if weight is None else int(weight.shape[0])


def _load_json(path: Path) -> Dict[str, Any]:
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise HubCheckpointError(f'cannot read {path}: {e}') from e


def _create_model(architecture: str, num_classes: int, model_args: Dict[str, Any]) -> nn.Module:
    if not timm.is_model(architecture):
        raise UnknownArchitectureError(
            f'unknown architecture {architecture!r}: timm has no such model (plugins must be imported first; '
            f'timm_lossattn registers {", ".join(timm.list_models("lossattn_*")[:3])}, ...)')
    return timm.create_model(architecture, num_classes=num_classes, **model_args)


def _save_sample_explanation(model: nn.Module, data: DataSpec, path: Path, num_images: int = 6) -> bool:
    """Input images beside their patch-weight maps; returns False when matplotlib (the `plots` extra) is missing."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    from .data import ClutteredDigits
    dataset = ClutteredDigits(data.split, preset=data.preset, num_samples=num_images, seed=data.seed)
    images = torch.stack([dataset[i][0] for i in range(num_images)])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits, weights, _ = model(images)
    model.train(was_training)
    grid = model.patch_geometry(tuple(images.shape[-2:])).grid_size
    fig, axes = plt.subplots(2, num_images, figsize=(1.6 * num_images, 3.4))
    for i in range(num_images):
        axes[0, i].imshow(images[i, 0], cmap='gray')
        axes[0, i].set_title(f'pred {int(logits[i].argmax())}', fontsize=8)
        axes[1, i].imshow(weights[i].reshape(grid), cmap='viridis')
        for ax in axes[:, i]:
            ax.axis('off')
    axes[1, 0].set_title('patch weights', fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def _model_card(name: str, config: Dict[str, Any], record: Dict[str, Any], has_sample: bool) -> str:
    from huggingface_hub import ModelCard, ModelCardData
    metrics = record.get('metrics', {})
    card_data = ModelCardData(
        library_name='timm',
        license=config['pretrained_cfg'].get('license', 'apache-2.0'),
        tags=['image-classification', 'timm', 'timm-lossattn', 'interpretability', 'loss-based-attention'],
        pipeline_tag='image-classification',
        lossattn=dict(
            eval_data=record.get('eval_data'), metrics=metrics, sha256=record.get('sha256'),
            tolerance=DEFAULT_TOLERANCE),
    )
    arch = config['architecture']
    rows = '\n'.join(f'| {k} | {v:.4f} |' for k, v in metrics.items())
    eval_data = record.get('eval_data') or {}
    train_data = record.get('train_data') or {}
    sample = f'\n## Sample explanation\n\n![patch weights]({SAMPLE_NAME})\n' if has_sample else ''
    content = f"""---
{card_data.to_yaml()}
---
# Model card for {name}

A loss-attention CNN (`{arch}`) from [timm-lossattn](https://github.com/timm-lossattn/timm-lossattn): the image
decision is an explicit weighted sum of patch decisions, and the patch weights come from the classifier's own patch
losses, so every prediction shows which patches made it.

Paper: Shi et al., "{PAPER}", IEEE TIP 2021, {PAPER_URL}.

## Model details
- **Architecture:** `{arch}`, model_args `{json.dumps(config.get('model_args', {}))}`
- **Classes:** {config['num_classes']} ({', '.join(map(str, config.get('label_names', []))) or 'unnamed'})
- **Input:** {tuple(config['pretrained_cfg']['input_size'])}, mean {tuple(config['pretrained_cfg']['mean'])}, \
std {tuple(config['pretrained_cfg']['std'])}
- **Training data:** `{json.dumps(train_data)}` (the package's built-in cluttered digits, scikit-learn's 8x8
  handwritten digits placed on a canvas with clutter; generated offline)
- **Training command:** `{record.get('command', 'unknown')}`
- **Device:** {record.get('device', 'unknown')}
- **Date:** {record.get('date', 'unknown')}
- **Weights sha256:** `{record.get('sha256')}`

## Test metrics
Measured on `{json.dumps(eval_data)}`. Patch precision / recall / F: patches with weight > 0 against the
ground-truth digit boxes; localization AP: the minimum square around the selected patches, IoU > 0.5.
`python -m timm_lossattn hub verify <folder>` re-measures them (tolerance {DEFAULT_TOLERANCE} absolute).

| metric | value |
|---|---|
{rows}
{sample}
## Usage
```python
import timm
import timm_lossattn  # registers the lossattn_* models

model = timm.create_model('hf-hub:{record.get('hub_id', HUB_ORG + '/' + name)}').eval()
logits, patch_weights, patch_logits = model(images)
```

## Licence
{card_data.license}
"""
    return str(ModelCard(content))


def export_checkpoint(
        checkpoint: Union[str, Path],
        output: Union[str, Path],
        architecture: Optional[str] = None,
        tag: Optional[str] = None,
        summary: Optional[Union[str, Path]] = None,
        allow_pickle: bool = False,
        sample: bool = True,
) -> Path:
    """Turn a training checkpoint into a Hub-layout folder (config.json, model.safetensors, README.md).

    Args:
        checkpoint: Training output folder (with `model.safetensors` and `summary.json`) or a weight file.
        output: Folder to write.
        architecture: Model name; defaults to the training record's `model`.
        tag: Pretrained tag (e.g. 'digits32'); the Hub id is `timm-lossattn/<architecture>.<tag>`.
        summary: Training record (`summary.json`: model, model_args, num_classes, label_names, train_data,
            eval_data, command, device, metrics, date; or the one `python -m timm_lossattn train` writes, whose
            metrics are then measured here on 500 test canvases); defaults to the one beside the checkpoint.
        allow_pickle: Accept a pickle-based torch checkpoint.
        sample: Write a sample explanation PNG (needs matplotlib).

    Returns:
        The output folder.
    """
    checkpoint = Path(checkpoint)
    summary = Path(summary) if summary else (checkpoint if checkpoint.is_dir() else checkpoint.parent) / SUMMARY_NAME
    record = _load_json(summary) if summary.is_file() else {}
    architecture = architecture or record.get('model')
    if not architecture:
        raise HubCheckpointError(f'no architecture given and no training record at {summary}')
    state_dict = read_state_dict(checkpoint, allow_pickle=allow_pickle)
    # `python -m timm_lossattn train` records model_kwargs, data (a string) and args
    model_args = dict(record.get('model_args') or record.get('model_kwargs') or {})
    if isinstance(record.get('data'), str):
        record.setdefault('train_data', dict(name=record['data'], split='train'))
    if not record.get('command') and record.get('args'):
        record['command'] = f'python -m timm_lossattn train (args: {json.dumps(record["args"], default=str)})'
    default_cfg = timm.get_pretrained_cfg(architecture) if timm.is_model(architecture) else None
    classifier = default_cfg.classifier if default_cfg is not None else 'head.fc'
    weight_classes = _classifier_classes(state_dict, classifier)
    num_classes = int(record.get('num_classes', weight_classes or 0))
    if weight_classes is not None and weight_classes != num_classes:
        raise NumClassesMismatchError(
            f'the training record says num_classes={num_classes}, the classifier {classifier} has {weight_classes}')
    model = _create_model(architecture, num_classes, model_args)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise HubCheckpointError(f'the checkpoint does not fit {architecture} with {model_args}: {e}') from e
    train_name = (record.get('train_data') or {}).get('name', '')
    if not record.get('metrics') and train_name.startswith('builtin:digits'):
        eval_data = DataSpec(preset=train_name.split(':', 1)[1])
        record.update(eval_data=eval_data.to_dict(), metrics=measure_metrics(model, eval_data))
    name = f'{architecture}.{tag}' if tag else architecture
    hub_id = f'{HUB_ORG}/{name}'
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(output / WEIGHTS_NAME),
        metadata={'format': 'pt'})
    label_names = record.get('label_names')
    if label_names is None and record.get('train_data', {}).get('name', '').startswith('builtin:digits'):
        from .data import CLASS_NAMES
        label_names = list(CLASS_NAMES)
    record = dict(
        record, hub_id=hub_id, sha256=sha256_file(output / WEIGHTS_NAME), size=(output / WEIGHTS_NAME).stat().st_size,
        exported_with=f'timm-lossattn {__version__}, timm {timm.__version__}')
    lossattn = {k: record.get(k) for k in (
        'hub_id', 'sha256', 'size', 'train_data', 'eval_data', 'command', 'device', 'metrics', 'date', 'exported_with')}
    model_config = dict(
        pretrained_cfg=dict(hf_hub_id=hub_id, tag=tag or '', label_names=tuple(label_names or ())),
        lossattn=lossattn)
    if label_names:
        model_config['label_names'] = list(label_names)
    from timm.models._hub import save_config_for_hf
    save_config_for_hf(model, str(output / CONFIG_NAME), model_config=model_config, model_args=model_args)
    config = _load_json(output / CONFIG_NAME)
    has_sample = False
    if sample and record.get('eval_data'):
        has_sample = _save_sample_explanation(model, DataSpec.from_dict(record['eval_data']), output / SAMPLE_NAME)
    (output / CARD_NAME).write_text(_model_card(name, config, record, has_sample), encoding='utf-8')
    return output


def update_manifest(manifest: Union[str, Path], folder: Union[str, Path], status: str = PUBLISHED) -> Dict[str, Any]:
    """Record an exported folder in the manifest (created if missing) under its `arch.tag` name.

    Args:
        manifest: Path of `manifest.json`.
        folder: Exported Hub-layout folder.
        status: 'published' or 'not yet published'.

    Returns:
        The entry written.
    """
    manifest, folder = Path(manifest), Path(folder)
    config = _load_json(folder / CONFIG_NAME)
    record = config.get('lossattn', {})
    name = record['hub_id'].split('/', 1)[1]
    data = _load_json(manifest) if manifest.is_file() else {'hub_org': HUB_ORG, 'checkpoints': {}}
    entry = dict(
        hub_id=record['hub_id'], status=status, sha256=sha256_file(folder / WEIGHTS_NAME),
        size=(folder / WEIGHTS_NAME).stat().st_size, data=record.get('train_data'), eval_data=record.get('eval_data'),
        command=record.get('command'), device=record.get('device'), metrics=record.get('metrics'),
        date=record.get('date'), tolerance=DEFAULT_TOLERANCE)
    try:
        entry['folder'] = str(folder.resolve().relative_to(manifest.resolve().parent))
    except ValueError:
        pass
    data.setdefault('checkpoints', {})[name] = entry
    manifest.write_text(json.dumps(data, indent=2) + '\n', encoding='utf-8')
    load_manifest.cache_clear()
    return entry


@dataclasses.dataclass
class VerifyReport:
    """What `verify_folder` checked.

    Attributes:
        name: `arch.tag` of the folder.
        sha256: sha256 of model.safetensors.
        expected_sha256: The recorded sha256 (manifest, else config.json).
        metrics: Re-measured metrics (empty when not measured).
        card_metrics: The model card's metrics.
        tolerance: Allowed absolute difference.
    """
    name: str
    sha256: str
    expected_sha256: Optional[str]
    metrics: Dict[str, float]
    card_metrics: Dict[str, float]
    tolerance: float


def _card_record(folder: Path) -> Dict[str, Any]:
    card_path = folder / CARD_NAME
    if not card_path.is_file():
        return {}
    from huggingface_hub import ModelCard
    return ModelCard.load(card_path).data.to_dict().get('lossattn') or {}


def verify_folder(
        folder: Union[str, Path],
        manifest: Optional[Union[str, Path]] = None,
        tolerance: Optional[float] = None,
        measure: bool = True,
        num_samples: Optional[int] = None,
) -> VerifyReport:
    """Check a Hub-layout folder: safetensors integrity, sha256, config, loading, and the card's metrics.

    Args:
        folder: The folder (config.json, model.safetensors, README.md).
        manifest: Manifest to check the sha256 against; the packaged/checkout manifest when None.
        tolerance: Allowed absolute difference of every metric; the card's (else `DEFAULT_TOLERANCE`) when None.
        measure: Re-measure the card's metrics on the data the card names.
        num_samples: Measure on the first `num_samples` canvases only (a quick check; skips the comparison unless
            equal to the card's).

    Returns:
        A `VerifyReport`; every failed check raises its named `HubCheckpointError`.
    """
    import timm_lossattn  # noqa: F401  registers the architectures config.json may name
    folder = Path(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CorruptCheckpointError(f'{folder} has no {WEIGHTS_NAME}')
    config = _load_json(folder / CONFIG_NAME)
    record = config.get('lossattn') or {}
    card = _card_record(folder)
    name = (record.get('hub_id') or config.get('architecture', folder.name)).split('/')[-1]
    entries = (_load_json(Path(manifest)) if manifest else load_manifest()).get('checkpoints', {})
    expected = (entries.get(name) or {}).get('sha256') or record.get('sha256') or card.get('sha256')
    state_dict = read_state_dict(weights)
    digest = sha256_file(weights)
    if expected and digest != expected:
        raise ChecksumMismatchError(f'{weights}: sha256 {digest} differs from the recorded {expected}')
    architecture = config.get('architecture')
    if not architecture or not timm.is_model(architecture):
        raise UnknownArchitectureError(
            f'{folder / CONFIG_NAME} names architecture {architecture!r}, which timm does not know '
            '(not a timm model and not registered by timm_lossattn)')
    classifier = config.get('pretrained_cfg', {}).get('classifier', 'head.fc')
    weight_classes = _classifier_classes(state_dict, classifier)
    for key, value in (('num_classes', config.get('num_classes')),
                       ('pretrained_cfg.num_classes', config.get('pretrained_cfg', {}).get('num_classes')),
                       ('len(label_names)', len(config['label_names']) if config.get('label_names') else None)):
        if value is not None and weight_classes is not None and value != weight_classes:
            raise NumClassesMismatchError(
                f'{folder / CONFIG_NAME}: {key} = {value}, but the classifier {classifier} has {weight_classes} outputs')
    model = timm.create_model(f'local-dir:{folder.resolve()}', pretrained=True).eval()
    card_metrics = dict(card.get('metrics') or record.get('metrics') or {})
    tolerance = float(tolerance if tolerance is not None else card.get('tolerance', DEFAULT_TOLERANCE))
    metrics: Dict[str, float] = {}
    eval_data = card.get('eval_data') or record.get('eval_data')
    if measure and eval_data and card_metrics:
        data = DataSpec.from_dict(eval_data)
        if num_samples:
            data = dataclasses.replace(data, num_samples=min(num_samples, data.num_samples))
        metrics = measure_metrics(model, data)
        if data.num_samples == eval_data.get('num_samples'):
            off = {k: (v, metrics.get(k)) for k, v in card_metrics.items()
                   if metrics.get(k) is None or not abs(metrics[k] - v) <= tolerance}
            if off:
                raise MetricsMismatchError(
                    f'{name}: re-measured metrics differ from the card by more than {tolerance}: '
                    + ', '.join(f'{k} card {v[0]} measured {v[1]}' for k, v in off.items()))
    return VerifyReport(name, digest, expected, metrics, card_metrics, tolerance)


def push_folder(
        folder: Union[str, Path],
        repo_id: str,
        token: Optional[str] = None,
        private: bool = False,
        revision: Optional[str] = None,
        commit_message: Optional[str] = None,
        dry_run: bool = False,
) -> List[str]:
    """Upload a Hub-layout folder to a model repo (created if needed) in one commit.

    Args:
        folder: The exported folder (checked with `verify_folder(measure=False)` first).
        repo_id: 'org/name' on the Hub (`HF_ENDPOINT` selects another endpoint).
        token: Hub token; None uses `HF_TOKEN` or the token saved by `hf auth login`.
        private: Create the repo private.
        revision: Branch to commit to (default main).
        commit_message: Commit message.
        dry_run: Only list what would be sent.

    Returns:
        The paths uploaded (or that would be), with their sizes, one string each.
    """
    folder = Path(folder)
    verify_folder(folder, measure=False)
    files = sorted(p for p in folder.rglob('*') if p.is_file() and not p.name.startswith('.'))
    listing = [f'{p.relative_to(folder).as_posix()} ({p.stat().st_size} bytes)' for p in files]
    if dry_run:
        return listing
    from huggingface_hub import CommitOperationAdd, HfApi
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
                  for p in files]
    api.create_commit(
        repo_id, operations, commit_message=commit_message or f'Upload {folder.name} (timm-lossattn {__version__})',
        revision=revision)
    return listing


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m timm_lossattn hub', description='Export, verify and push checkpoints in Hub layout.')
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('export', help='training checkpoint -> Hub-layout folder')
    p.add_argument('checkpoint', help='training output folder (model.safetensors + summary.json) or weight file')
    p.add_argument('--output', required=True, help='folder to write')
    p.add_argument('--model', default=None, help="architecture (default: the training record's)")
    p.add_argument('--tag', default=None, help='pretrained tag, e.g. digits32')
    p.add_argument('--summary', default=None, help='training record (default: summary.json beside the checkpoint)')
    p.add_argument('--manifest', default=None, help='record the export in this manifest.json')
    p.add_argument('--status', default=PUBLISHED, help='manifest status (published / not yet published)')
    p.add_argument('--allow-pickle', action='store_true', help='accept a pickle-based torch checkpoint')
    p.add_argument('--no-sample', action='store_true', help='skip the sample explanation PNG')
    p = sub.add_parser('verify', help="check sha256, config, loading and the card's metrics")
    p.add_argument('folder')
    p.add_argument('--manifest', default=None, help='manifest.json with the expected sha256 (default: the shipped one)')
    p.add_argument('--tolerance', type=float, default=None, help=f'absolute metric tolerance ({DEFAULT_TOLERANCE})')
    p.add_argument('--no-measure', action='store_true', help='skip re-measuring the metrics')
    p = sub.add_parser('push', help='upload a Hub-layout folder with huggingface_hub')
    p.add_argument('folder')
    p.add_argument('--repo-id', default=None, help=f'org/name (default: {HUB_ORG}/<folder name>)')
    p.add_argument('--token', default=None, help='Hub token (default: HF_TOKEN or `hf auth login`)')
    p.add_argument('--private', action='store_true')
    p.add_argument('--revision', default=None)
    p.add_argument('--dry-run', action='store_true', help='list what would be sent')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m timm_lossattn hub export|verify|push`."""
    args = _parser().parse_args(argv)
    try:
        if args.command == 'export':
            out = export_checkpoint(
                args.checkpoint, args.output, architecture=args.model, tag=args.tag, summary=args.summary,
                allow_pickle=args.allow_pickle, sample=not args.no_sample)
            if args.manifest:
                update_manifest(args.manifest, out, status=args.status)
            print(f'exported {out}')
        elif args.command == 'verify':
            report = verify_folder(args.folder, args.manifest, args.tolerance, measure=not args.no_measure)
            print(json.dumps(dataclasses.asdict(report), indent=2))
            print(f'OK {report.name}')
        else:
            repo_id = args.repo_id or f'{HUB_ORG}/{Path(args.folder).resolve().name}'
            listing = push_folder(
                args.folder, repo_id, token=args.token, private=args.private, revision=args.revision,
                dry_run=args.dry_run)
            print(('would upload to ' if args.dry_run else 'uploaded to ') + repo_id + ':')
            print('\n'.join(f'  {line}' for line in listing))
    except HubCheckpointError as e:
        print(f'error: {type(e).__name__}: {e}', file=sys.stderr)
        return 1
    return 0
