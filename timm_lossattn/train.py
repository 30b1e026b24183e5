""" One-command training of loss-attention models, single process or DDP (`torchrun`), and the demo

    python -m timm_lossattn train --model lossattn_resnet18_conv --data builtin:digits32 --epochs 30 --output out/
    torchrun --nproc_per_node=2 -m timm_lossattn train --model ... --data DIR --output out/
    python -m timm_lossattn demo --out demo/

The defaults are the paper's CIFAR recipe (Shi et al., IEEE TIP 2021): SGD momentum 0.9, weight decay 5e-4, lr 0.1,
lr x0.1 at 50% and 75% of the epochs, random crop with 4 px padding and horizontal flip (no flip on the digits),
batch 128. Built from timm's components: `create_dataset` (image folders), `create_model`, `create_optimizer_v2`,
`create_scheduler_v2`, `ModelEmaV3` (through the task), `NativeScaler`, and this package's `LossAttnTask`.

Outputs (rank 0): `model.safetensors` + `config.json` (loadable with `timm.create_model('local-dir:OUT')` after
`import timm_lossattn`), `model_ema.safetensors` with `--model-ema`, `train_state.pth` (optimizer, scheduler,
epoch, history; plain tensors and Python values, `torch.load(weights_only=True)`-safe) and `summary.json`.

Determinism: every epoch reseeds torch / numpy / random from (seed, epoch, rank) and the sampler from (seed, epoch),
so `--resume` continues bit-for-bit on CPU without storing generator states.
"""
import argparse
import json
import logging
import math
import os
import sys
import time
from contextlib import nullcontext
from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

__all__ = ['UsageError', 'build_parser', 'train', 'main', 'demo_main']

_logger = logging.getLogger(__name__)

_BUILTIN = 'builtin:'
_EVAL_SPLITS = ('validation', 'val', 'test')


class UsageError(ValueError):
    """A bad argument or input; the command line reports it on one line and exits with code 2."""


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `python -m timm_lossattn train`."""
    from timm.utils import ParseKwargs
    parser = argparse.ArgumentParser(
        prog='python -m timm_lossattn train',
        description='Train a loss-attention model (Shi et al., TIP 2021) with the paper recipe, on an image folder '
                    'or the built-in cluttered digits; single process or DDP under torchrun.')
    group = parser.add_argument_group('Model and data')
    group.add_argument('--model', required=True, help='model name, e.g. lossattn_resnet18_conv')
    group.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                       help='extra model arguments, e.g. channels="(16,32,64,64)" head_width=64 xi=0.1')
    group.add_argument('--pretrained', action='store_true', help='start from pretrained weights')
    group.add_argument('--data', required=True,
                       help='builtin:digits32, builtin:digits64, or an image folder DIR with DIR/train/<class>/ '
                            '(and DIR/validation, val or test for evaluation; boxes.json enables localization metrics)')
    group.add_argument('--multi-label', action='store_true', help='multi-label digits (builtin data only), Eq. 10')
    group.add_argument('--train-samples', type=int, default=10000, help='built-in training canvases (default: 10000)')
    group.add_argument('--val-samples', type=int, default=2000, help='built-in test canvases (default: 2000)')
    group.add_argument('--img-size', type=int, default=None,
                       help='image folder input size (default: the model config); built-in data sets its own')
    group.add_argument('--output', default=None, help='output folder (default: output/train/MODEL)')
    group = parser.add_argument_group('Recipe (defaults: the paper)')
    group.add_argument('--epochs', type=int, default=200)
    group.add_argument('--batch-size', '-b', type=int, default=128, help='batch size per process')
    group.add_argument('--opt', default='sgd')
    group.add_argument('--lr', type=float, default=0.1)
    group.add_argument('--momentum', type=float, default=0.9)
    group.add_argument('--weight-decay', type=float, default=5e-4)
    group.add_argument('--decay-milestones', type=int, nargs='+', default=None,
                       help='0-based epochs from which the lr is multiplied by --decay-rate, as torch MultiStepLR '
                            '(default: 50%% and 75%% of --epochs; the paper: 100 150 of 200)')
    group.add_argument('--decay-rate', type=float, default=0.1)
    group.add_argument('--warmup-epochs', type=int, default=0)
    group.add_argument('--gamma-max', type=float, default=0.1, help='final weight of the patch loss')
    group.add_argument('--rampup-epochs', type=float, default=None,
                       help='ramp-up of the patch loss in epochs (default: 80 for 200 epochs, i.e. 40%% of --epochs)')
    group.add_argument('--rampup-coef', type=float, default=5.0)
    group.add_argument('--pad', type=int, default=4, help='random-crop padding in pixels (0: no crop)')
    group.add_argument('--hflip', type=float, default=None, help='flip probability (default: 0.5; 0 for digits)')
    group.add_argument('--no-aug', action='store_true', help='no crop and no flip')
    group.add_argument('--smoothing', type=float, default=0., help='label smoothing')
    group.add_argument('--mixup', type=float, default=0., help='timm Mixup alpha')
    group.add_argument('--cutmix', type=float, default=0., help='timm CutMix alpha')
    group.add_argument('--model-ema', action='store_true', help='keep a timm ModelEmaV3 copy')
    group.add_argument('--model-ema-decay', type=float, default=0.9998)
    group.add_argument('--freeze-bn', action='store_true',
                       help='turn BatchNorm into timm FrozenBatchNorm2d (fine-tuning with small batches)')
    group = parser.add_argument_group('Runtime')
    group.add_argument('--device', default=None, help='cuda or cpu (default: cuda when available)')
    group.add_argument('--amp', action=argparse.BooleanOptionalAction, default=None,
                       help='mixed precision (default: on with CUDA)')
    group.add_argument('--amp-dtype', choices=('bfloat16', 'float16'), default='bfloat16',
                       help='float16 uses a gradient scaler')
    group.add_argument('--channels-last', action=argparse.BooleanOptionalAction, default=None,
                       help='channels_last memory format (default: on with CUDA)')
    group.add_argument('--sync-bn', action='store_true', help='SyncBatchNorm under torchrun (CUDA)')
    group.add_argument('--workers', '-j', type=int, default=2, help='data loader processes per rank')
    group.add_argument('--seed', type=int, default=0)
    group.add_argument('--resume', default=None, help='output folder (or its train_state.pth) to continue')
    group.add_argument('--stop-epoch', type=int, default=None,
                       help='stop after this many epochs of the --epochs schedule (continue later with --resume)')
    group.add_argument('--eval-interval', type=int, default=1, help='evaluate every N epochs and at the end')
    group.add_argument('--no-progress', action='store_true', help='no tqdm progress bars')
    return parser


# ------------------------------------------------------------------------------------------------ data

class _FolderDataset(Dataset):
    """A timm `ImageDataset` with this module's transform, returning (image, target, boxes) like ClutteredDigits.

    Boxes come from the folder's `boxes.json` (`export_image_folder`) scaled to the resized image, else (0, 5).
    """

    def __init__(self, dataset: Dataset, transform: Any, boxes: Optional[Dict[str, torch.Tensor]]):
        self.dataset = dataset
        self.transform = transform
        self.boxes = boxes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int, torch.Tensor]:
        image, target = self.dataset[index]
        width, height = image.size
        image = self.transform(image)
        boxes = torch.zeros(0, 5)
        if self.boxes is not None:
            name = self.dataset.filename(index, basename=False, absolute=False).replace(os.sep, '/')
            if name in self.boxes:
                scale = torch.tensor([image.shape[-1] / width, image.shape[-2] / height] * 2 + [1.])
                boxes = self.boxes[name] * scale
        return image, target, boxes


def _transforms(
        img_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        pad: int,
        hflip: float,
        is_training: bool,
        from_pil: bool,
):
    from torchvision import transforms as T
    ops = []
    if from_pil:
        ops += [T.Resize((img_size, img_size)), T.ToTensor()]
    if is_training and pad > 0:
        ops.append(T.RandomCrop(img_size, padding=pad))
    if is_training and hflip > 0:
        ops.append(T.RandomHorizontalFlip(hflip))
    ops.append(T.Normalize(mean, std))
    return T.Compose(ops)


def _folder_split(root: str, split: str, is_training: bool, transform: Any) -> _FolderDataset:
    from timm.data import create_dataset
    from .data import load_boxes_json
    class_map = ''
    for folder in (os.path.join(root, split), root):
        if os.path.isfile(os.path.join(folder, 'class_map.txt')):
            class_map = os.path.join(folder, 'class_map.txt')
            break
    try:
        dataset = create_dataset('', root=root, split=split, is_training=is_training, class_map=class_map)
    except (RuntimeError, FileNotFoundError) as e:
        raise UsageError(f'{root}: {str(e).splitlines()[0]}') from None
    if len(dataset) == 0:
        raise UsageError(f'{root}: no images found for split {split!r}')
    boxes_path = os.path.join(dataset.reader.root, 'boxes.json')
    boxes = load_boxes_json(boxes_path) if os.path.isfile(boxes_path) else None
    return _FolderDataset(dataset, transform, boxes)


def _create_datasets(args: argparse.Namespace, data_config: Dict[str, Any]) -> Tuple[Dataset, Optional[Dataset], int]:
    """Training set, evaluation set (or None) and the number of classes."""
    mean, std = data_config['mean'], data_config['std']
    pad = 0 if args.no_aug else args.pad
    if args.data.startswith(_BUILTIN):
        from .data import PRESETS, ClutteredDigits
        preset = args.data[len(_BUILTIN):]
        if preset not in PRESETS:
            raise UsageError(f'unknown built-in data {args.data!r}; choose from ' +
                             ', '.join(_BUILTIN + p for p in PRESETS))
        size = PRESETS[preset]['canvas_size']
        hflip = 0. if args.no_aug or args.hflip is None else args.hflip
        common = dict(preset=preset, multi_label=args.multi_label, seed=args.seed)
        train_set = ClutteredDigits(
            'train', num_samples=args.train_samples,
            transform=_transforms(size, mean, std, pad, hflip, True, from_pil=False), **common)
        eval_set = ClutteredDigits(
            'test', num_samples=args.val_samples,
            transform=_transforms(size, mean, std, 0, 0., False, from_pil=False), **common)
        return train_set, eval_set, train_set.num_classes
    if args.multi_label:
        raise UsageError('--multi-label is only available for the built-in digits')
    if not os.path.isdir(args.data):
        raise UsageError(f'data folder not found: {args.data}')
    size = args.img_size or data_config['input_size'][-1]
    hflip = 0. if args.no_aug else (0.5 if args.hflip is None else args.hflip)
    train_set = _folder_split(args.data, 'train', True, _transforms(size, mean, std, pad, hflip, True, from_pil=True))
    num_classes = len(train_set.dataset.reader.class_to_idx)
    if num_classes < 2:
        raise UsageError(f'{args.data}: found {num_classes} class folder(s); a classifier needs at least 2')
    eval_set = None
    eval_transform = _transforms(size, mean, std, 0, 0., False, from_pil=True)
    for split in _EVAL_SPLITS:
        if os.path.isdir(os.path.join(args.data, split)):
            eval_set = _folder_split(args.data, split, False, eval_transform)
            break
    return train_set, eval_set, num_classes


# ------------------------------------------------------------------------------------------------ helpers

class _Dist:
    """Rank, world size and device of this process (torchrun environment or single process)."""

    def __init__(self, device: Optional[str]):
        device = device or ('cuda' if torch.cuda.is_available() else 'cpu')
        self.world_size = int(os.environ.get('WORLD_SIZE', 1))
        self.distributed = self.world_size > 1
        self.rank, self.local_rank = 0, 0
        if device.startswith('cuda') and not torch.cuda.is_available():
            raise UsageError('--device cuda requested but CUDA is not available')
        if self.distributed:
            self.rank, self.local_rank = int(os.environ['RANK']), int(os.environ.get('LOCAL_RANK', 0))
            if not dist.is_initialized():
                dist.init_process_group(backend='nccl' if device.startswith('cuda') else 'gloo')
            if device.startswith('cuda'):
                device = f'cuda:{self.local_rank}'
                torch.cuda.set_device(device)
        self.device = torch.device(device)
        self.primary = self.rank == 0

    def sum(self, values: Sequence[float]) -> List[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, obj: Any) -> List[Any]:
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    from timm.utils import random_seed
    random_seed(seed + 1000003 * epoch, rank)


def _save_safetensors(module: nn.Module, path: str) -> None:
    from safetensors.torch import save_file
    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, path)


def _load_safetensors(module: nn.Module, path: str) -> None:
    from safetensors.torch import load_file
    module.load_state_dict(load_file(path))


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    return value


def _write_json(path: str, obj: Any) -> None:
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(_json_value(obj), f, indent=2)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def _evaluate(
        model: nn.Module,
        loader: DataLoader,
        multi_label: bool,
        ctx: _Dist,
        amp_autocast: Any,
        channels_last: bool,
        progress: bool,
) -> Dict[str, float]:
    """Accuracy (mAP when multi-label), image loss, and with boxes patch precision / recall / F and loc. AP."""
    from tqdm import tqdm
    from .metrics import accuracy, box_from_patches, localization_ap, multilabel_map, patch_correctness, \
        patch_precision_recall
    model.eval()
    logits_all, targets_all, counts, loc = [], [], [0, 0, 0], []
    geometry = None
    for images, targets, boxes in tqdm(loader, desc='eval', disable=not progress, leave=False):
        images = images.to(ctx.device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with amp_autocast():
            logits, weights, _ = model(images)
        logits, weights = logits.float().cpu(), weights.float().cpu()
        logits_all.append(logits)
        targets_all.append(targets)
        size = tuple(images.shape[-2:])
        if geometry is None:
            geometry = model.patch_geometry(size)
        probs = logits.sigmoid() if multi_label else logits.softmax(-1)
        for i, gt in enumerate(boxes):
            if not len(gt):
                continue
            labels = targets[i].nonzero().flatten() if multi_label else targets[i].view(1).long()
            correct = patch_correctness(geometry.patch_boxes, gt[:, :4], gt[:, 4].long(), labels, size)
            pr = patch_precision_recall(weights[i], correct)
            counts = [counts[0] + pr.num_selected, counts[1] + pr.num_correct, counts[2] + pr.num_correct_selected]
            if not multi_label:
                box = box_from_patches(weights[i], geometry.patch_boxes, size)
                pred = int(probs[i].argmax())
                loc.append((box, float(probs[i, pred]), pred, gt[:, :4], gt[:, 4].long()))
    logits = torch.cat(logits_all) if logits_all else torch.zeros(0, 0)
    targets = torch.cat(targets_all) if targets_all else torch.zeros(0)
    gathered = ctx.gather((logits, targets, loc))
    logits = torch.cat([g[0] for g in gathered if g[0].numel()])
    targets = torch.cat([g[1] for g in gathered if g[1].numel()])
    loc = [r for g in gathered for r in g[2]]
    selected, correct, correct_selected = ctx.sum(counts)
    if multi_label:
        metrics = {'mAP': 100. * multilabel_map(logits.sigmoid(), targets)[0],
                   'loss': float(F.binary_cross_entropy_with_logits(logits, targets.float(), reduction='none')
                                 .sum(1).mean())}
    else:
        metrics = {'top1': 100. * accuracy(logits, targets), 'loss': float(F.cross_entropy(logits, targets))}
    if correct or selected:
        precision = correct_selected / selected if selected else 0.
        recall = correct_selected / correct if correct else 0.
        f_score = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.
        metrics.update(patch_precision=100. * precision, patch_recall=100. * recall, patch_f=100. * f_score)
    if loc:
        empty = torch.zeros(0, 4)
        metrics['loc_ap'] = 100. * localization_ap(
            [empty if r[0] is None else r[0][None] for r in loc],
            [torch.tensor([] if r[0] is None else [r[1]]) for r in loc],
            [torch.tensor([] if r[0] is None else [r[2]], dtype=torch.long) for r in loc],
            [r[3] for r in loc], [r[4] for r in loc])
    return metrics


# ------------------------------------------------------------------------------------------------ training

def _resolve_resume(path: str) -> str:
    state_path = os.path.join(path, 'train_state.pth') if os.path.isdir(path) else path
    if not os.path.isfile(state_path):
        raise UsageError(f'nothing to resume: {state_path} not found')
    return state_path


def train(args: argparse.Namespace) -> nn.Module:
    """Train as `args` (from `build_parser`) says; returns the trained model (unwrapped, on its device).

    Raises:
        UsageError: a bad argument or input.
    """
    import timm
    from timm.data import Mixup, resolve_data_config
    from timm.layers import convert_sync_batchnorm, freeze_batch_norm_2d
    from timm.models import get_pretrained_cfg
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import NativeScaler, unwrap_model
    from tqdm import tqdm
    from .models import LossAttnNet
    from .task import LossAttnTask

    if args.epochs < 1 or args.batch_size < 1:
        raise UsageError('--epochs and --batch-size must be >= 1')
    if not timm.is_model(args.model):
        names = ', '.join(timm.list_models('lossattn_*'))
        raise UsageError(f'unknown model {args.model!r}; loss-attention models: {names}')
    state_path = _resolve_resume(args.resume) if args.resume else None
    ctx = _Dist(args.device)
    cuda = ctx.device.type == 'cuda'
    if args.sync_bn and ctx.distributed and not cuda:
        raise UsageError('--sync-bn needs CUDA (torch SyncBatchNorm has no CPU kernel); use --freeze-bn on CPU')
    amp = cuda if args.amp is None else args.amp
    channels_last = cuda if args.channels_last is None else args.channels_last
    if amp and not cuda:
        raise UsageError('--amp needs CUDA')
    output = args.output or (os.path.dirname(state_path) if state_path else os.path.join('output', 'train', args.model))

    # model and data
    _seed_epoch(args.seed, 0, 0)
    data_config = resolve_data_config({}, pretrained_cfg=get_pretrained_cfg(args.model).to_dict())
    train_set, eval_set, num_classes = _create_datasets(args, data_config)
    _seed_epoch(args.seed, 0, 0)
    try:
        model = timm.create_model(args.model, pretrained=args.pretrained, num_classes=num_classes, **args.model_kwargs)
    except TypeError as e:
        raise UsageError(f'bad --model-kwargs for {args.model}: {e}') from None
    if not isinstance(model, LossAttnNet):
        raise UsageError(f'{args.model} is not a loss-attention model (lossattn_*)')
    if args.freeze_bn:
        model = freeze_batch_norm_2d(model)
    model.to(ctx.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if args.sync_bn and ctx.distributed:
        model = convert_sync_batchnorm(model)

    epochs = args.epochs
    rampup_epochs = args.rampup_epochs if args.rampup_epochs is not None else 0.4 * epochs
    task = LossAttnTask(
        model, multi_label=args.multi_label, smoothing=args.smoothing, gamma_max=args.gamma_max,
        rampup_epochs=rampup_epochs, rampup_coef=args.rampup_coef, device=ctx.device, verbose=False)
    optimizer = create_optimizer_v2(
        model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum)
    sampler = DistributedSampler(
        train_set, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=args.seed)
    from .data import collate_boxes
    collate = collate_boxes
    loader = DataLoader(
        train_set, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers, collate_fn=collate,
        pin_memory=cuda, persistent_workers=False)
    eval_loader = None
    if eval_set is not None:
        eval_loader = DataLoader(
            Subset(eval_set, range(ctx.rank, len(eval_set), ctx.world_size)), batch_size=args.batch_size,
            num_workers=args.workers, collate_fn=collate, pin_memory=cuda)
    milestones = args.decay_milestones or sorted({epochs // 2, epochs * 3 // 4} - {0})
    scheduler, _ = create_scheduler_v2(  # timm's multistep decays at epoch t when t + 1 >= milestone
        optimizer, sched='multistep', num_epochs=epochs, decay_milestones=[m + 1 for m in milestones],
        decay_rate=args.decay_rate,
        warmup_epochs=args.warmup_epochs, updates_per_epoch=len(loader))
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0:
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, label_smoothing=args.smoothing,
                         num_classes=num_classes)
    amp_autocast = partial(torch.autocast, device_type='cuda', dtype=getattr(torch, args.amp_dtype)) \
        if amp else nullcontext
    loss_scaler = NativeScaler(device='cuda') if amp and args.amp_dtype == 'float16' else None

    start_epoch, history, num_updates = 0, [], 0
    if state_path:
        state = torch.load(state_path, map_location='cpu', weights_only=True)
        _load_safetensors(model, os.path.join(os.path.dirname(state_path), 'model.safetensors'))
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        if loss_scaler is not None and 'scaler' in state:
            loss_scaler.load_state_dict(state['scaler'])
        start_epoch, history, num_updates = state['epoch'] + 1, state['history'], state['num_updates']
    if args.model_ema:
        task.setup_ema(decay=args.model_ema_decay)
        ema_path = os.path.join(os.path.dirname(state_path), 'model_ema.safetensors') if state_path else None
        if ema_path and os.path.isfile(ema_path):
            _load_safetensors(task.get_trainable_module(ema=True).module, ema_path)
    if ctx.distributed:
        task.prepare_distributed(device_ids=[ctx.device] if cuda else None)
    trainable = task.get_trainable_module()
    if ctx.primary:
        os.makedirs(output, exist_ok=True)
        _logger.info(f'{args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, '
                     f'{len(train_set)} train images, {num_classes} classes, {ctx.world_size} process(es) on '
                     f'{ctx.device}, output {output}')

    progress = ctx.primary and not args.no_progress
    start_time = time.time()
    for epoch in range(start_epoch, min(epochs, args.stop_epoch or epochs)):
        _seed_epoch(args.seed, epoch + 1, ctx.rank)
        sampler.set_epoch(epoch)
        task.set_epoch(epoch)
        trainable.train()
        sums = [0.] * 5  # loss, image loss, patch loss, correct, images
        epoch_start = time.time()
        for images, targets, _ in tqdm(loader, desc=f'epoch {epoch}', disable=not progress, leave=False):
            images, targets = images.to(ctx.device, non_blocking=True), targets.to(ctx.device, non_blocking=True)
            hard_targets = targets
            if mixup_fn is not None:
                images, targets = mixup_fn(images, targets)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with amp_autocast():
                result = task(images, targets)
            optimizer.zero_grad(set_to_none=True)
            if loss_scaler is not None:
                loss_scaler(result['loss'], optimizer)
            else:
                result['loss'].backward()
                optimizer.step()
            num_updates += 1
            scheduler.step_update(num_updates)
            task.update_ema(step=num_updates)
            n = images.shape[0]
            correct = 0. if args.multi_label else float((result['output'].argmax(-1) == hard_targets).sum())
            sums = [sums[0] + float(result['loss'].detach()) * n, sums[1] + float(result['image_loss']) * n,
                    sums[2] + float(result['patch_loss']) * n, sums[3] + correct, sums[4] + n]
        lr = optimizer.param_groups[0]['lr']
        scheduler.step(epoch + 1)
        loss, image_loss, patch_loss, correct, count = ctx.sum(sums)
        record: Dict[str, Any] = {
            'epoch': epoch, 'lr': lr, 'gamma': task.criterion.gamma(epoch),
            'train_loss': loss / count, 'train_image_loss': image_loss / count, 'train_patch_loss': patch_loss / count,
            'train_images_per_s': count / (time.time() - epoch_start)}
        if not args.multi_label:
            record['train_top1'] = 100. * correct / count
        if eval_loader is not None and ((epoch + 1) % args.eval_interval == 0 or epoch + 1 == epochs):
            eval_model = unwrap_model(task.get_eval_model(ema=args.model_ema))
            record.update({f'eval_{k}': v for k, v in _evaluate(
                eval_model, eval_loader, args.multi_label, ctx, amp_autocast, channels_last, progress).items()})
        history.append(record)
        if ctx.primary:
            _logger.info('  '.join(
                f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in record.items()))
            _save_checkpoint(output, args, model, task, optimizer, scheduler, loss_scaler, epoch, num_updates,
                             history, num_classes, time.time() - start_time, ctx)
    if ctx.distributed:
        dist.barrier()
    return model


def _save_checkpoint(
        output: str,
        args: argparse.Namespace,
        model: nn.Module,
        task: Any,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        loss_scaler: Any,
        epoch: int,
        num_updates: int,
        history: List[Dict[str, Any]],
        num_classes: int,
        elapsed: float,
        ctx: _Dist,
) -> None:
    import timm
    from .version import __version__
    _save_safetensors(model, os.path.join(output, 'model.safetensors'))
    if task.has_ema():
        _save_safetensors(task.get_trainable_module(ema=True).module, os.path.join(output, 'model_ema.safetensors'))
    config = dict(
        architecture=args.model, num_classes=num_classes, model_args=dict(args.model_kwargs),
        pretrained_cfg={k: v for k, v in model.pretrained_cfg.items()
                        if k in ('input_size', 'mean', 'std', 'interpolation', 'crop_pct')})
    _write_json(os.path.join(output, 'config.json'), config)
    state = dict(
        epoch=epoch, num_updates=num_updates, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
        history=history)
    if loss_scaler is not None:
        state['scaler'] = loss_scaler.state_dict()
    torch.save(state, os.path.join(output, 'train_state.pth.tmp'))
    os.replace(os.path.join(output, 'train_state.pth.tmp'), os.path.join(output, 'train_state.pth'))
    last = history[-1]
    summary = dict(
        model=args.model, model_kwargs=dict(args.model_kwargs), data=args.data, num_classes=num_classes,
        epochs=args.epochs, completed_epochs=epoch + 1, world_size=ctx.world_size, device=str(ctx.device),
        timm_version=timm.__version__, torch_version=torch.__version__, timm_lossattn_version=__version__,
        args={k: v for k, v in vars(args).items()}, elapsed_s=elapsed,
        final={k: v for k, v in last.items() if k.startswith('eval_') or k.startswith('train_')},
        history=history)
    _write_json(os.path.join(output, 'summary.json'), summary)


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m timm_lossattn train`: returns 0, or 2 after a one-line error for a bad argument or input."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    try:
        train(args)
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


def demo_main(argv: Optional[List[str]] = None) -> int:
    """`python -m timm_lossattn demo`: train a small model on the built-in digits, explain it and score it."""
    parser = argparse.ArgumentParser(
        prog='python -m timm_lossattn demo',
        description='Train a small loss-attention ResNet on the built-in cluttered digits (a few minutes on CPU), '
                    'then write explanation pictures and a test-set metrics table.')
    parser.add_argument('--out', default='lossattn_demo', help='output folder (default: lossattn_demo)')
    parser.add_argument('--epochs', type=int, default=6)
    parser.add_argument('--train-samples', type=int, default=1500)
    parser.add_argument('--val-samples', type=int, default=500)
    parser.add_argument('--num-images', type=int, default=12, help='test images to explain')
    parser.add_argument('--device', default=None)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--no-progress', action='store_true')
    demo_args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    train_dir = os.path.join(demo_args.out, 'train')
    train_argv = [
        '--model', 'lossattn_resnet18_conv', '--model-kwargs', 'channels=(8,16,32,32)', 'head_width=32',
        '--data', 'builtin:digits32', '--epochs', str(demo_args.epochs), '--rampup-epochs', str(demo_args.epochs / 2),
        '--train-samples', str(demo_args.train_samples), '--val-samples', str(demo_args.val_samples),
        '--batch-size', '64', '--lr', '0.05', '--workers', '1', '--seed', str(demo_args.seed), '--output', train_dir]
    if demo_args.device:
        train_argv += ['--device', demo_args.device]
    if demo_args.no_progress:
        train_argv.append('--no-progress')
    start = time.time()
    try:
        model = train(build_parser().parse_args(train_argv))
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    with open(os.path.join(train_dir, 'summary.json'), encoding='utf-8') as f:
        final = json.load(f)['final']
    metrics = {k[len('eval_'):]: v for k, v in final.items() if k.startswith('eval_')}
    metrics_json = os.path.join(demo_args.out, 'metrics.json')
    _write_json(metrics_json, dict(
        model='lossattn_resnet18_conv', model_kwargs=dict(channels=[8, 16, 32, 32], head_width=32),
        data='builtin:digits32 test split', num_test_images=demo_args.val_samples, train_time_s=time.time() - start,
        metrics=metrics))
    names = dict(top1='Accuracy (%)', loss='Test loss (CE)', patch_precision='Patch precision (%)',
                 patch_recall='Patch recall (%)', patch_f='Patch F-score (%)', loc_ap='Localization AP (%)')
    metrics_md = os.path.join(demo_args.out, 'metrics.md')
    with open(metrics_md, 'w', encoding='utf-8') as f:
        f.write(f'| Metric (digits32 test, {demo_args.val_samples} images) | Value |\n|---|---|\n')
        f.writelines(f'| {names.get(k, k)} | {v:.2f} |\n' for k, v in metrics.items() if v is not None)
    outputs = [f'  metrics: {metrics_md}, {metrics_json}', f'  model:   {train_dir}/model.safetensors (+ config.json)']
    try:
        outputs.append(f'  pictures: {_demo_pictures(model, demo_args)}')
    except ImportError as e:
        outputs.append(f'  pictures: skipped ({e})')
    print(open(metrics_md, encoding='utf-8').read())
    print(f'demo finished in {time.time() - start:.0f}s; outputs in {os.path.abspath(demo_args.out)}:')
    print('\n'.join(outputs))
    return 0


def _demo_pictures(model: nn.Module, demo_args: argparse.Namespace) -> str:
    """Explain the first test images with `timm_lossattn.explain`; returns where the pictures went."""
    from torchvision.transforms import Normalize
    from .data import CLASS_NAMES, ClutteredDigits
    from .explain import explain, render_explanation, render_grid
    dataset = ClutteredDigits('test', num_samples=demo_args.val_samples, seed=demo_args.seed)
    count = min(demo_args.num_images, len(dataset))
    images, _, boxes = zip(*(dataset[i] for i in range(count)))
    images = torch.stack(images)
    normalize = Normalize(model.pretrained_cfg['mean'], model.pretrained_cfg['std'])
    device = next(model.parameters()).device
    explanations = explain(model, normalize(images).to(device), topk=3, class_names=CLASS_NAMES,
                           display_images=images)
    folder = os.path.join(demo_args.out, 'explanations')
    os.makedirs(folder, exist_ok=True)
    for i, (explanation, gt) in enumerate(zip(explanations, boxes)):
        render_explanation(None, explanation, gt_boxes=gt, path=os.path.join(folder, f'test_{i:03d}.png'))
    grid = os.path.join(demo_args.out, 'explanations.png')
    render_grid(None, explanations, gt_boxes=list(boxes), path=grid)
    return f'{grid} and {count} panels in {folder}'
