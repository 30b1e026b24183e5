""" Prepare the README's explanation picture: train a tiny model on the cluttered digits, save test canvases

    python docs/make_explain_figure.py --workdir /tmp/lossattn_figure

trains a tiny loss-attention ResNet on the 32x32 single-label cluttered digits (about a minute on one CPU core),
writes its state dict to WORKDIR/tiny.safetensors and a few held-out canvases to WORKDIR/canvas_*.png, and prints
the `python -m timm_lossattn explain` command that draws them (docs/explain.md lists the exact commands).
"""
import argparse
import os
import shlex

import numpy as np
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import timm_lossattn  # noqa: F401
from timm_lossattn.data import ClutteredDigits, collate_boxes
from timm_lossattn.loss import LossAttentionLoss

MODEL = 'lossattn_resnet18_conv'
MODEL_KWARGS = dict(
    layers=(1, 1, 1, 1), channels=(8, 8, 16, 16), stage_strides=(2, 1, 1, 1), head_kernel_size=5, head_stride=2,
    head_width=32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument('--workdir', required=True, help='where the checkpoint and canvases go (not committed)')
    parser.add_argument('--steps', type=int, default=1500)
    parser.add_argument('--num-canvases', type=int, default=4)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    model = timm.create_model(MODEL, num_classes=10, **MODEL_KWARGS)
    train = ClutteredDigits('train', num_samples=4096, seed=args.seed)
    images, targets, _ = collate_boxes([train[i] for i in range(len(train))])
    criterion = LossAttentionLoss(rampup_epochs=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    for _ in range(args.steps):
        index = torch.randint(0, len(images), (32,), generator=generator)
        # the canvases are stored as PNG and normalised by the CLI, so train on normalised images too
        batch = (images[index] - torch.tensor(model.pretrained_cfg['mean']).view(1, 3, 1, 1)) / torch.tensor(
            model.pretrained_cfg['std']).view(1, 3, 1, 1)
        loss = criterion(model(batch), targets[index], epoch=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    checkpoint = os.path.join(args.workdir, 'tiny.safetensors')
    save_file(model.state_dict(), checkpoint)

    test = ClutteredDigits('test', num_samples=args.num_canvases, seed=args.seed)
    paths = []
    for i in range(len(test)):
        image, target, boxes = test[i]
        path = os.path.join(args.workdir, f'canvas_{i}_digit{target}.png')
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
        paths.append(path)
    kwargs = [f'{k}={v}'.replace(' ', '') for k, v in MODEL_KWARGS.items()]
    command = ['python', '-m', 'timm_lossattn', 'explain', '--model', MODEL, '--checkpoint', checkpoint,
               '--out', os.path.join(args.workdir, 'explained'), '--topk', '3', '--dpi', '150', *paths,
               '--model-kwargs', *kwargs]
    print(' '.join(shlex.quote(c) for c in command))


if __name__ == '__main__':
    main()
