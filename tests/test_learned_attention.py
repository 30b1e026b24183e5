""" A learned, checkable property: after a short training, loss-based attention weighs the digit's patches most

A tiny loss-attention ResNet (one block per stage, one stride-2 stage, a 5x5 / 2 patch head giving the paper's 6x6
grid of 10x10 patches on 32x32 inputs) is trained on the single-label 32x32 cluttered digits for a few hundred steps
with the loss of Eq. 9. On held-out canvases, patches inside the digit's box (the paper's patch correctness: more
than half of the patch inside the ground-truth box) must get more weight on average than the other patches.
"""
from typing import Tuple

import pytest
import timm
import torch

import timm_lossattn  # noqa: F401
from timm_lossattn.data import ClutteredDigits, collate_boxes
from timm_lossattn.loss import LossAttentionLoss
from timm_lossattn.metrics import accuracy, patch_correctness

pytest.importorskip('sklearn')

TINY_ARGS = dict(
    layers=(1, 1, 1, 1), channels=(8, 8, 16, 16), stage_strides=(2, 1, 1, 1), head_kernel_size=5, head_stride=2,
    head_width=32, num_classes=10)


def train_tiny_model(seed: int = 0, steps: int = 200, batch_size: int = 16, num_train: int = 512) -> torch.nn.Module:
    """Train the tiny model on the 32x32 single-label digits (Adam, gamma at its final value from the start)."""
    torch.manual_seed(seed)
    model = timm.create_model('lossattn_resnet18_conv', **TINY_ARGS)
    train = ClutteredDigits('train', num_samples=num_train, seed=seed)
    images, targets, _ = collate_boxes([train[i] for i in range(len(train))])
    criterion = LossAttentionLoss(rampup_epochs=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        loss = criterion(model(images[index]), targets[index], epoch=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def weight_inside_outside(model: torch.nn.Module, seed: int = 0, num_test: int = 128) -> Tuple[float, float, float]:
    """Mean patch weight inside and outside the digit boxes on test canvases, and the accuracy."""
    test = ClutteredDigits('test', num_samples=num_test, seed=seed)
    images, targets, boxes = collate_boxes([test[i] for i in range(len(test))])
    geometry = model.patch_geometry((32, 32))
    inside = torch.stack([
        patch_correctness(geometry.patch_boxes, b[:, :4], b[:, 4].long(), t[None], geometry.input_size)
        for t, b in zip(targets, boxes)])
    with torch.no_grad():
        output = model(images)
    weights = output.patch_weights
    return weights[inside].mean().item(), weights[~inside].mean().item(), accuracy(output.logits, targets)


def test_attention_weighs_digit_patches_more():
    # one thread: the convolutions are so small that a second thread only adds synchronisation, which on busy shared
    # cores made training several times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = train_tiny_model(seed=0)
    finally:
        torch.set_num_threads(threads)
    inside, outside, acc = weight_inside_outside(model)
    assert acc > 0.2, f'the model did not learn the digits (accuracy {acc:.2f})'
    assert inside > outside, f'mean weight inside the digit box {inside:.4f} <= outside {outside:.4f}'
