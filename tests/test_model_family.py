"""The model family: parameter counts, Eq. 5 / Eq. 6, thresholding, geometry, timm integration, bad input."""
import pytest
import torch
import timm

import timm_lossattn  # noqa: F401  registers the models
from timm_lossattn.layers import loss_attention_weights
from timm_lossattn.models import LossAttnOutput, LossAttnVgg

MODELS = timm.list_models('lossattn_*')
TINY = dict(channels=(8, 16, 16, 32), head_width=32)
TINY_CAPS = dict(TINY, caps_dims=(4, 4, 8, 16))


def tiny(name: str = 'lossattn_resnet18_conv', **kwargs) -> torch.nn.Module:
    extra = TINY_CAPS if name.endswith('caps') else TINY
    return timm.create_model(name, **dict(extra, **kwargs)).eval()


@pytest.mark.parametrize('name, expected', [
    ('lossattn_resnet18_conv', 32.67e6),  # paper Table II
    ('lossattn_vgg11_conv', 30.73e6),  # paper Table II
    ('lossattn_resnet18_caps', 32.69e6),  # authors' code, its unused shortcut convs left out
    ('lossattn_vgg11_caps', 30.75e6),
])
def test_param_counts_match_paper(name, expected):
    model = timm.create_model(name, num_classes=10, device='meta')
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - expected) / expected < 0.005, f'{name}: {count} params vs {expected}'


def test_eq5_logits_are_weighted_patch_decisions():
    torch.manual_seed(0)
    model = tiny(xi=0.1)
    x = torch.randn(3, 3, 32, 32)
    out = model(x)
    assert isinstance(out, LossAttnOutput)
    h = model.patch_head(model.forward_features(x))[:, 0]  # (B, M, D)
    fc = model.get_classifier()
    patch_logits = fc(h)
    torch.testing.assert_close(out.patch_logits, patch_logits, atol=1e-5, rtol=0)
    pooled = torch.einsum('bm,bmd->bd', out.patch_weights, h)
    torch.testing.assert_close(out.logits, fc(pooled), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits, torch.einsum('bm,bmk->bk', out.patch_weights, patch_logits), atol=1e-5, rtol=0)

    # the weights recomputed from the patch logits by the paper's formula equal the reported ones
    scores = patch_logits.norm(dim=-1)
    a = scores / scores.sum(1, keepdim=True)
    M = a.shape[1]
    kept = (a - 0.1 / M).clamp_min(0)
    torch.testing.assert_close(out.patch_weights, kept / kept.sum(1, keepdim=True), atol=1e-6, rtol=0)


def test_threshold_zeroes_low_patches_exactly():
    torch.manual_seed(1)
    logits = torch.randn(4, 1, 36, 10) * torch.rand(4, 1, 36, 1) * 3
    _, weights = loss_attention_weights(logits, xi=0.1)
    scores = logits[:, 0].norm(dim=-1)
    normalised = scores / scores.sum(1, keepdim=True)
    below = normalised < 0.1 / 36
    assert below.any(), 'test data should have patches below the threshold'
    assert (weights[below] == 0).all()
    assert (weights[~below] > 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(4))


def test_caps_eq6_location_weights_and_logits():
    torch.manual_seed(2)
    model = tiny('lossattn_resnet18_caps', xi=0.1)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    h = model.patch_head(model.forward_features(x))  # (B, C, M, D)
    capsule_logits = model.get_classifier()(h)
    scores = capsule_logits.norm(dim=-1)
    a = scores / scores.sum((1, 2), keepdim=True)
    location = a.sum(1)
    keep = location > 0.1 / location.shape[1]
    a = a * keep.unsqueeze(1)
    a = a / a.sum((1, 2), keepdim=True)
    torch.testing.assert_close(out.patch_weights, a.sum(1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.logits, torch.einsum('bcm,bcmk->bk', a, capsule_logits), atol=1e-5, rtol=0)
    assert (out.patch_weights[~keep] == 0).all()


@pytest.mark.parametrize('name', MODELS)
def test_create_every_model_num_classes_in_chans(name):
    model = timm.create_model(name, num_classes=7, in_chans=1, device='meta')
    out = model(torch.randn(2, 1, 32, 32, device='meta'))
    assert out.logits.shape == (2, 7)
    assert out.patch_weights.shape == (2, 36)
    assert out.patch_logits.shape == (2, 36, 7)


def test_real_forward_num_classes_in_chans():
    model = tiny(num_classes=7, in_chans=1)
    out = model(torch.randn(2, 1, 32, 32))
    assert out.logits.shape == (2, 7) and torch.isfinite(out.logits).all()


def test_features_only():
    model = timm.create_model('lossattn_resnet18_conv', features_only=True, **TINY)
    feats = model(torch.randn(1, 3, 32, 32))
    assert [f.shape[1] for f in feats] == model.feature_info.channels()
    assert all(f.shape[-1] == 32 for f in feats)  # stride-free trunk


def test_torchscript_matches_eager():
    model = tiny('lossattn_resnet18_caps')
    scripted = torch.jit.script(model)
    x = torch.randn(2, 3, 32, 32)
    eager, script = model(x), scripted(x)
    for a, b in zip(eager, script):
        torch.testing.assert_close(a, b)


def test_torch_compile_matches_eager():
    model = timm.create_model('lossattn_tinyresnet_conv').eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('input_size, stage_strides, grid', [
    (32, (1, 1, 1, 1), (6, 6)),
    (64, (1, 2, 1, 1), (6, 6)),
    (64, (1, 1, 1, 1), (14, 14)),
    ((48, 40), (1, 1, 1, 1), (10, 8)),
])
def test_patch_geometry_matches_forward(input_size, stage_strides, grid):
    model = tiny(stage_strides=stage_strides)
    size = (input_size, input_size) if isinstance(input_size, int) else input_size
    geometry = model.patch_geometry(size)
    assert geometry.grid_size == grid
    out = model(torch.randn(1, 3, *size))
    assert out.patch_weights.shape[1] == geometry.num_patches == geometry.patch_boxes.shape[0]


def test_patch_geometry_boxes_stride_free():
    geometry = tiny().patch_geometry(32)
    boxes = geometry.patch_boxes.reshape(6, 6, 4)
    for row in range(6):
        for col in range(6):
            assert boxes[row, col].tolist() == [4 * col, 4 * row, 4 * col + 9, 4 * row + 9]
    rf = geometry.receptive_field_boxes
    assert (rf[:, :2] >= 0).all() and (rf[:, 2:] <= 32).all()
    assert ((rf[:, 2] - rf[:, 0]) >= 9).all()  # the receptive field covers the nominal window


def test_patch_geometry_with_stride():
    geometry = tiny(stage_strides=(1, 2, 1, 1)).patch_geometry(64)
    assert geometry.patch_size == (18.0, 18.0) and geometry.patch_stride == (8.0, 8.0)


def test_vgg_stage_strides_keep_maxpool():
    model = LossAttnVgg([8, 'M', 16, 'M', 16, 'M'], stage_strides=(2, 1, 1), head_width=16).eval()
    assert isinstance(model.features[3], torch.nn.MaxPool2d)
    assert isinstance(model.features[7], torch.nn.Identity)
    out = model(torch.randn(1, 3, 64, 64))
    assert out.patch_weights.shape[1] == model.patch_geometry(64).num_patches == 36


@pytest.mark.parametrize('make', [
    lambda: tiny(),
    lambda: LossAttnVgg([8, 8, 'M', 16, 'M', 16, 'M'], stage_strides=(1, 1, 1), head_width=16),  # in-place ReLUs
], ids=['resnet', 'vgg'])
def test_grad_checkpointing_gives_eager_gradients(make):
    torch.manual_seed(0)
    model = make().train()
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        model(x).logits.sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for eager, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, eager)


def test_return_patches_false_gives_tensor():
    model = tiny(return_patches=False)
    out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 10)


def test_reset_classifier_switches_pool():
    model = tiny()
    model.reset_classifier(5, 'gated')
    assert model.pool_type == 'gated'
    out = model(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 5)
    model.reset_classifier(0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, model.head_hidden_size)
    model.reset_classifier(0, '')
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 32, 32, 32)


@pytest.mark.parametrize('pool', ['lossattn', 'mean', 'attention', 'gated'])
def test_conv_pools_weights_and_logits(pool):
    model = tiny(pool=pool)
    out = model(torch.randn(2, 3, 32, 32))
    assert (out.patch_weights >= 0).all()
    torch.testing.assert_close(out.patch_weights.sum(1), torch.ones(2))
    torch.testing.assert_close(out.logits, torch.einsum('bm,bmk->bk', out.patch_weights, out.patch_logits),
                               atol=1e-5, rtol=0)


def test_mean_pool_is_uniform():
    out = tiny(pool='mean')(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(out.patch_weights, torch.full((2, 36), 1 / 36))


@pytest.mark.parametrize('pool', ['lossattn', 'mean', 'attention', 'gated', 'routing'])
def test_caps_pools(pool):
    model = tiny('lossattn_resnet18_caps', pool=pool)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 10) and out.patch_logits.shape == (2, 36, 10)
    assert (out.patch_weights >= 0).all()
    torch.testing.assert_close(out.patch_weights.sum(1), torch.ones(2))


@pytest.mark.parametrize('kwargs, error, match', [
    (dict(xi=-0.1), ValueError, r'xi must lie in \[0, 1\]'),
    (dict(xi=1.5), ValueError, r'xi must lie in \[0, 1\]'),
    (dict(pool='max'), ValueError, r"unknown pool 'max'; expected one of lossattn, mean"),
    (dict(pool='routing'), ValueError, r"pool='routing' .* needs the capsule head"),
    (dict(stage_strides=(1, 3, 1, 1)), ValueError, r'stage_strides must be 4 values, each 1 or 2'),
    (dict(stem_type='deep'), ValueError, r"unknown stem_type 'deep'"),
    (dict(drop_rate=1.0), ValueError, r'drop_rate must lie in \[0, 1\)'),
])
def test_bad_hyper_parameters(kwargs, error, match):
    with pytest.raises(error, match=match):
        tiny(**kwargs)


@pytest.mark.parametrize('x, error, match', [
    (torch.randn(1, 3, 8, 8), ValueError, r'input of 8x8 is too small .* smallest input this model accepts is 9x9'),
    (torch.randn(1, 1, 32, 32), ValueError, r'expected 3 input channels, got 1'),
    (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), TypeError, r'expected a floating point image tensor'),
    (torch.randn(3, 32, 32), ValueError, r'expected an image batch of shape \(B, C, H, W\)'),
])
def test_bad_input(x, error, match):
    with pytest.raises(error, match=match):
        tiny()(x)


def test_patch_geometry_too_small():
    with pytest.raises(ValueError, match='too small'):
        tiny(stage_strides=(2, 2, 1, 1)).patch_geometry(32)
