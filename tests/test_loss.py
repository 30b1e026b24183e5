"""LossAttentionLoss: Eq. 9 and Eq. 10, soft targets, the ramp-up, parts and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from timm_lossattn.loss import LossAttentionLoss, rampup_weight
from timm_lossattn.models import LossAttnOutput


def _output(batch=4, patches=6, classes=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    patch_logits = torch.randn(batch, patches, classes, generator=g)
    weights = torch.rand(batch, patches, generator=g)
    weights = weights / weights.sum(1, keepdim=True)
    logits = torch.einsum('bm,bmk->bk', weights, patch_logits)
    return LossAttnOutput(logits, weights, patch_logits)


def test_rampup_schedule():
    assert rampup_weight(0) == pytest.approx(0.1 * math.exp(-5))
    assert rampup_weight(40) == pytest.approx(0.1 * math.exp(-5 * 0.25))
    assert rampup_weight(80) == pytest.approx(0.1)
    assert rampup_weight(200) == pytest.approx(0.1)
    assert rampup_weight(3, gamma_max=2.0, rampup_epochs=0) == 2.0
    assert LossAttentionLoss(gamma_max=0.5, rampup_epochs=10, rampup_coef=1).gamma(5) == pytest.approx(
        0.5 * math.exp(-0.25))


def test_single_label_eq9():
    out = _output()
    target = torch.tensor([0, 1, 2, 4])
    parts = LossAttentionLoss(rampup_epochs=0).forward_parts(out, target, epoch=0)
    image = F.cross_entropy(out.logits, target)
    patch = torch.stack([
        (out.patch_weights[i] * F.cross_entropy(out.patch_logits[i], target[i].repeat(6), reduction='none')).sum()
        for i in range(4)]).mean()
    torch.testing.assert_close(parts.image_loss, image)
    torch.testing.assert_close(parts.patch_loss, patch)
    assert parts.gamma == pytest.approx(0.1)
    torch.testing.assert_close(parts.loss, image + 0.1 * patch)


def test_soft_one_hot_equals_hard():
    out = _output()
    target = torch.tensor([0, 1, 2, 4])
    criterion = LossAttentionLoss()
    hard = criterion(out, target, epoch=30)
    soft = criterion(out, F.one_hot(target, 5).float(), epoch=30)
    torch.testing.assert_close(hard, soft)


def test_label_smoothing_targets():
    out = _output()
    target = torch.tensor([0, 1, 2, 4])
    smooth = F.one_hot(target, 5).float() * 0.9 + 0.1 / 5
    parts = LossAttentionLoss().forward_parts(out, smooth, epoch=0)
    torch.testing.assert_close(parts.image_loss, F.cross_entropy(out.logits, target, label_smoothing=0.1))


def test_multi_label_eq10_and_empty_image():
    out = _output(batch=3)
    target = torch.tensor([[1., 0., 1., 0., 0.], [0., 0., 0., 0., 0.], [0., 1., 0., 0., 0.]])
    parts = LossAttentionLoss(multi_label=True, rampup_epochs=0).forward_parts(out, target, epoch=0)
    image = F.binary_cross_entropy_with_logits(out.logits, target, reduction='none').sum(1).mean()
    nll = -F.logsigmoid(out.patch_logits)
    per_image = [
        (out.patch_weights[0] * torch.minimum(nll[0, :, 0], nll[0, :, 2])).sum(),
        torch.tensor(0.),  # no positive label: only its BCE term counts
        (out.patch_weights[2] * nll[2, :, 1]).sum(),
    ]
    torch.testing.assert_close(parts.image_loss, image)
    torch.testing.assert_close(parts.patch_loss, torch.stack(per_image).mean())
    assert torch.isfinite(parts.loss)


def test_gradient_flows_to_weights_and_logits():
    out = _output()
    tensors = [t.clone().requires_grad_() for t in out]
    loss = LossAttentionLoss(rampup_epochs=0)(LossAttnOutput(*tensors), torch.tensor([0, 1, 2, 3]), epoch=0)
    loss.backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in tensors)


@pytest.mark.parametrize('kwargs, match', [
    (dict(gamma_max=-1), 'gamma_max must be a finite number >= 0'),
    (dict(rampup_epochs=float('nan')), 'rampup_epochs must be a finite number >= 0'),
    (dict(rampup_coef=-2), 'rampup_coef must be a finite number >= 0'),
])
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossAttentionLoss(**kwargs)


def test_bad_inputs():
    out = _output()
    criterion = LossAttentionLoss()
    with pytest.raises(TypeError, match='return_patches=True'):
        criterion(out.logits, torch.tensor([0, 1, 2, 3]), epoch=0)
    with pytest.raises(ValueError, match=r'targets must lie in \[0, 4\]'):
        criterion(out, torch.tensor([0, 1, 2, 5]), epoch=0)
    with pytest.raises(ValueError, match='batch size mismatch'):
        criterion(out, torch.tensor([0, 1]), epoch=0)
    with pytest.raises(ValueError, match='multi-hot'):
        LossAttentionLoss(multi_label=True)(out, torch.tensor([0, 1, 2, 3]), epoch=0)
    with pytest.raises(ValueError, match='epoch must be >= 0'):
        criterion(out, torch.tensor([0, 1, 2, 3]), epoch=-1)
