""" Train a tiny loss-attention model on the built-in cluttered digits and write a training checkpoint

Used to produce the checkpoints shipped in `weights/` while `python -m timm_lossattn train` was being written:

    PYTHONPATH=. python weights/train_tiny.py --model lossattn_tinyresnet_conv --output runs/tiny_conv

Writes `model.safetensors` (the state dict, safetensors only) and `summary.json` (model, model_args, data, command,
device, metrics on the test split) into `--output`, the input of `python -m timm_lossattn hub export`.
"""
import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time

import safetensors.torch
import timm
import torch

import timm_lossattn
from timm_lossattn.data import CLASS_NAMES, ClutteredDigits, collate_boxes
from timm_lossattn.hub import DataSpec, measure_metrics
from timm_lossattn.loss import LossAttentionLoss


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', required=True)
    parser.add_argument('--output', required=True)
    parser.add_argument('--epochs', type=int, default=3)
    parser.add_argument('--train-samples', type=int, default=4000)
    parser.add_argument('--test-samples', type=int, default=500)
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--lr', type=float, default=0.05)
    parser.add_argument('--rampup-epochs', type=float, default=2)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    model = timm.create_model(args.model, num_classes=len(CLASS_NAMES))
    train = ClutteredDigits('train', preset='digits32', num_samples=args.train_samples, seed=args.seed)
    loader = torch.utils.data.DataLoader(
        train, batch_size=args.batch_size, shuffle=True, collate_fn=collate_boxes, drop_last=True,
        generator=torch.Generator().manual_seed(args.seed))
    steps = args.epochs * len(loader)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    criterion = LossAttentionLoss(rampup_epochs=args.rampup_epochs)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        for step, (images, targets, _) in enumerate(loader):
            loss = criterion(model(images), targets, epoch=epoch + step / len(loader))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            if step % 20 == 0:
                print(f'epoch {epoch} step {step}/{len(loader)} loss {loss.item():.4f} {time.time() - start:.0f}s',
                      flush=True)
    data = DataSpec(preset='digits32', split='test', num_samples=args.test_samples, seed=args.seed)
    metrics = measure_metrics(model, data)
    print(json.dumps(metrics), flush=True)
    os.makedirs(args.output, exist_ok=True)
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(args.output, 'model.safetensors'))
    summary = dict(
        model=args.model,
        model_args={},
        num_classes=len(CLASS_NAMES),
        label_names=list(CLASS_NAMES),
        train_data=dict(name='builtin:digits32', preset='digits32', split='train', num_samples=args.train_samples,
                        seed=args.seed),
        eval_data=data.to_dict(),
        command='PYTHONPATH=. python ' + ' '.join(shlex.quote(a) for a in sys.argv),
        device=f'cpu ({platform.processor() or platform.machine()}, {args.threads} thread(s))',
        train_seconds=round(time.time() - start, 1),
        metrics=metrics,
        date=datetime.date.today().isoformat(),
        versions=dict(torch=torch.__version__, timm=timm.__version__, timm_lossattn=timm_lossattn.__version__),
    )
    with open(os.path.join(args.output, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
