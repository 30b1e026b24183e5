"""No NaN or Inf for any finite input: all-zero images, batch 1, xi at its ends, bf16 autocast, random shapes."""
import pytest
import torch
import timm
from hypothesis import HealthCheck, assume, given, settings, strategies as st

import timm_lossattn  # noqa: F401
from timm_lossattn.layers import loss_attention_weights
from timm_lossattn.loss import LossAttentionLoss

TINY = dict(channels=(4, 8, 8, 8), head_width=8, caps_dims=(2, 2, 4, 4))


def _check_finite_forward_backward(model, x, target):
    out = model(x)
    for t in out:
        assert torch.isfinite(t).all()
    assert (out.patch_weights >= 0).all()
    torch.testing.assert_close(out.patch_weights.float().sum(1), torch.ones(x.shape[0]), atol=1e-2, rtol=0)
    loss = LossAttentionLoss(rampup_epochs=0)(out, target, epoch=0)
    loss.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), f'non-finite gradient in {name}'
    return out


@pytest.mark.parametrize('name', ['lossattn_resnet18_conv', 'lossattn_resnet18_caps'])
@pytest.mark.parametrize('xi', [0.0, 0.1, 1.0])
def test_all_zero_images_batch_one(name, xi):
    model = timm.create_model(name, xi=xi, **TINY).train()
    _check_finite_forward_backward(model, torch.zeros(1, 3, 32, 32), torch.tensor([3]))


@pytest.mark.parametrize('name', ['lossattn_resnet18_conv', 'lossattn_resnet18_caps'])
def test_zero_logits_give_uniform_weights(name):
    model = timm.create_model(name, **TINY).eval()
    torch.nn.init.zeros_(model.get_classifier().weight)
    torch.nn.init.zeros_(model.get_classifier().bias)
    out = model(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(out.patch_weights, torch.full((2, 36), 1 / 36))


def test_xi_one_keeps_at_least_one_patch():
    equal = torch.ones(2, 1, 36, 10)  # every score equals 1/M: xi = 1 removes all, the best (all) share
    _, weights = loss_attention_weights(equal, xi=1.0)
    torch.testing.assert_close(weights, torch.full((2, 36), 1 / 36))
    logits = torch.randn(3, 1, 36, 10)
    _, weights = loss_attention_weights(logits, xi=1.0)
    assert ((weights > 0).sum(1) >= 1).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(3))


@pytest.mark.parametrize('name', ['lossattn_resnet18_conv', 'lossattn_resnet18_caps'])
def test_bf16_autocast(name):
    model = timm.create_model(name, **TINY).train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32))
        loss = LossAttentionLoss(rampup_epochs=0)(out, torch.tensor([1, 2]), epoch=0)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    height=st.integers(9, 40),
    width=st.integers(9, 40),
    batch=st.integers(1, 3),
    xi=st.floats(0.0, 1.0),
    head=st.sampled_from(['conv', 'caps']),
    pool=st.sampled_from(['lossattn', 'mean', 'attention', 'gated', 'routing']),
    scale=st.sampled_from([0.0, 1e-6, 1.0, 1e3]),
)
def test_random_shapes_and_pools(height, width, batch, xi, head, pool, scale):
    if pool == 'routing' and head == 'conv':
        pool = 'lossattn'
    torch.manual_seed(0)
    model = timm.create_model(f'lossattn_resnet18_{head}', xi=xi, pool=pool, **TINY).train()
    # BatchNorm cannot train on a single value per channel (torch raises): that needs 2+ patches in the batch
    assume(batch * model.patch_geometry((height, width)).num_patches > 1)
    x = torch.randn(batch, 3, height, width) * scale
    out = _check_finite_forward_backward(model, x, torch.randint(0, 10, (batch,)))
    assert out.patch_weights.shape[1] == model.patch_geometry((height, width)).num_patches
