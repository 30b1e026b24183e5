""" Tests of the explain API, its pictures, the explain CLI and Grad-CAM """
import json
import sys

import pytest
import timm
import torch
import torch.nn as nn
from PIL import Image

import timm_lossattn  # noqa: F401
from timm_lossattn.cli import main as cli_main
from timm_lossattn.explain import Explanation, explain, render_explanation, render_grid, upsample_patch_map
from timm_lossattn.metrics import box_from_patches
from timm_lossattn.models import LossAttnOutput

TINY = dict(channels=(8, 16, 16, 32), head_width=32, num_classes=10)
TINY_CAPS = dict(channels=(8, 16, 16, 32), head_width=32, caps_dims=(4, 4, 8, 16), num_classes=10)


@pytest.fixture(scope='module')
def conv_model() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model('lossattn_resnet18_conv', **TINY).eval()


@pytest.fixture(scope='module')
def caps_model() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model('lossattn_resnet18_caps', **TINY_CAPS).eval()


class _FixedWeights(nn.Module):
    """Returns given patch weights, with the patch geometry of a real model."""

    def __init__(self, model: nn.Module, weights: torch.Tensor):
        super().__init__()
        self.model = model
        self.weights = weights

    def patch_geometry(self, input_size):
        return self.model.patch_geometry(input_size)

    def forward(self, x: torch.Tensor) -> LossAttnOutput:
        batch, num = x.shape[0], self.weights.shape[0]
        logits = torch.arange(10.)[None].expand(batch, -1)
        return LossAttnOutput(logits, self.weights[None].expand(batch, -1), torch.zeros(batch, num, 10))


def test_patch_boxes_tile_the_image(conv_model):
    geometry = conv_model.patch_geometry((32, 32))
    assert geometry.grid_size == (6, 6)
    expected = torch.tensor(
        [[4. * col, 4. * row, 4. * col + 9, 4. * row + 9] for row in range(6) for col in range(6)])
    torch.testing.assert_close(geometry.patch_boxes, expected)
    explanation = explain(conv_model, torch.randn(1, 3, 32, 32))[0]
    torch.testing.assert_close(explanation.selected_boxes, expected[explanation.selected])


@pytest.mark.parametrize('model_name', ['conv_model', 'caps_model'])
@pytest.mark.parametrize('size', [(32, 32), (40, 48)])
def test_explanation_fields_consistent(request, model_name, size):
    model = request.getfixturevalue(model_name)
    images = torch.randn(2, 3, *size)
    explanations = explain(model, images, topk=3, display_images=images.sigmoid())
    geometry = model.patch_geometry(size)
    rows, cols = geometry.grid_size
    assert len(explanations) == 2
    for e in explanations:
        assert isinstance(e, Explanation)
        assert e.classes.shape == e.scores.shape == (3,)
        assert (e.scores[:-1] >= e.scores[1:]).all()
        assert e.labels == [str(c) for c in e.classes.tolist()]
        assert e.weight_map.shape == (rows, cols) and e.heatmap.shape == size
        assert (e.weights >= 0).all()
        torch.testing.assert_close(e.weights.sum(), torch.tensor(1.))
        assert torch.equal(e.selected, e.weights > 0)
        torch.testing.assert_close(e.selected_boxes, geometry.patch_boxes[e.weights > 0])
        torch.testing.assert_close(e.box, box_from_patches(e.weights, geometry.patch_boxes, size))
        assert e.image.shape == (3, *size)
        json.dumps(e.to_dict())
    assert not model.training


def test_explain_restores_training_mode(conv_model):
    conv_model.train()
    explain(conv_model, torch.randn(1, 3, 32, 32))
    assert conv_model.training
    conv_model.eval()


def test_synthetic_weight_map_gives_expected_square(conv_model):
    weights = torch.zeros(36)
    weights[[1 * 6 + 1, 2 * 6 + 2]] = 0.5  # patches at (4, 4, 13, 13) and (8, 8, 17, 17)
    e = explain(_FixedWeights(conv_model, weights).eval(), torch.zeros(1, 3, 32, 32))[0]
    torch.testing.assert_close(e.box, torch.tensor([4., 4., 17., 17.]))
    assert e.selected.sum() == 2

    weights = torch.zeros(36)
    weights[[0, 2]] = 0.5  # union (0, 0, 17, 9): square of side 17 about y = 4.5, clipped at the top
    e = explain(_FixedWeights(conv_model, weights).eval(), torch.zeros(1, 3, 32, 32))[0]
    torch.testing.assert_close(e.box, torch.tensor([0., 0., 17., 13.]))
    assert e.weight_map[0, 0] == 0.5 and e.weight_map[0, 2] == 0.5


def test_upsample_patch_map(conv_model):
    geometry = conv_model.patch_geometry((32, 32))
    torch.testing.assert_close(upsample_patch_map(torch.full((6, 6), 0.25), geometry), torch.full((32, 32), 0.25))
    one = torch.zeros(6, 6)
    one[2, 3] = 1.
    heat = upsample_patch_map(one, geometry)
    # patch (row 2, col 3) is (12, 8, 21, 17): its centre (16.5, 12.5) is the centre of pixel (x 16, y 12)
    assert heat[12, 16] == 1. and heat.argmax() == 12 * 32 + 16
    assert heat[:, :8].abs().max() == 0 and heat[:4].abs().max() == 0


def test_multi_label_class_maps(conv_model):
    e = explain(conv_model, torch.randn(1, 3, 32, 32), topk=2, multi_label=True, class_names=list('abcdefghij'))[0]
    assert e.multi_label and e.class_maps.shape == (2, 6, 6) and len(e.class_boxes) == 2
    torch.testing.assert_close(e.class_maps.sum(dim=(1, 2)), torch.ones(2))
    assert ((e.class_maps.flatten(1) > 0) == e.selected[None]).all()
    assert all(label in 'abcdefghij' for label in e.labels)
    assert ((e.scores > 0) & (e.scores < 1)).all()


def test_explain_rejects_plain_logits():
    model = timm.create_model('lossattn_resnet18_conv', return_patches=False, **TINY)
    with pytest.raises(TypeError, match='return_patches=True'):
        explain(model, torch.randn(1, 3, 32, 32))


def test_render_png(conv_model, tmp_path):
    images = torch.rand(3, 3, 32, 32)
    explanations = explain(conv_model, images, display_images=images)
    path = tmp_path / 'one.png'
    render_explanation(None, explanations[0], gt_boxes=torch.tensor([[2., 3., 18., 20., 7.]]), path=path)
    with Image.open(path) as image:
        image.load()
        assert image.format == 'PNG' and image.size == (300, 325)
    render_grid(images, explanations, path=tmp_path / 'grid.png', ncols=2)
    with Image.open(tmp_path / 'grid.png') as image:
        image.load()
        assert image.size == (400, 450)


def test_render_without_matplotlib(conv_model, monkeypatch):
    explanation = explain(conv_model, torch.rand(1, 3, 32, 32))[0]
    monkeypatch.setitem(sys.modules, 'matplotlib', None)
    with pytest.raises(ImportError, match=r'timm-lossattn\[plots\]'):
        render_explanation(None, explanation)


@pytest.fixture(scope='module')
def cli_files(tmp_path_factory, conv_model):
    from safetensors.torch import save_file
    root = tmp_path_factory.mktemp('cli')
    save_file(conv_model.state_dict(), str(root / 'tiny.safetensors'))
    torch.save({'state_dict': conv_model.state_dict()}, root / 'tiny.pth')
    generator = torch.Generator().manual_seed(0)
    Image.fromarray(torch.randint(0, 255, (32, 32), generator=generator, dtype=torch.uint8).numpy()).save(
        root / 'a.png')
    Image.fromarray(torch.randint(0, 255, (40, 50, 3), generator=generator, dtype=torch.uint8).numpy()).save(
        root / 'b.png')
    (root / 'broken.png').write_bytes(b'not an image')
    return root


def _cli_args(root, checkpoint='tiny.safetensors'):
    return [
        'explain', '--model', 'lossattn_resnet18_conv', '--checkpoint', str(root / checkpoint), '--topk', '3',
        '--model-kwargs', 'channels=(8,16,16,32)', 'head_width=32']


@pytest.mark.parametrize('checkpoint', ['tiny.safetensors', 'tiny.pth'])
def test_cli_writes_png_and_json(cli_files, tmp_path, checkpoint):
    out = tmp_path / 'out'
    images = [str(cli_files / 'a.png'), str(cli_files / 'b.png')]
    assert cli_main(_cli_args(cli_files, checkpoint) + ['--out', str(out)] + images) == 0
    for name in ('a', 'b'):
        with Image.open(out / f'{name}.png') as image:
            image.load()
            assert image.format == 'PNG' and image.size == (300, 325)
    summary = json.loads((out / 'explanations.json').read_text())
    assert [r['image'] for r in summary['images']] == images
    for record in summary['images']:
        assert len(record['classes']) == len(record['scores']) == 3
        assert record['grid_size'] == [6, 6] and len(record['weights']) == 6
        assert abs(sum(map(sum, record['weights'])) - 1) < 1e-4
        assert len(record['selected_boxes']) == len(record['selected_patches']) > 0
        assert len(record['box']) == 4


def test_cli_unreadable_image(cli_files, tmp_path, capsys):
    args = _cli_args(cli_files) + ['--out', str(tmp_path), str(cli_files / 'broken.png')]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith('error: cannot read image') and 'broken.png' in err


def test_cli_missing_checkpoint(cli_files, tmp_path, capsys):
    args = _cli_args(cli_files, 'missing.safetensors') + ['--out', str(tmp_path), str(cli_files / 'a.png')]
    assert cli_main(args) == 2
    assert 'error: checkpoint not found' in capsys.readouterr().err


def test_cli_unknown_model_and_wrong_architecture(cli_files, tmp_path, capsys):
    args = ['explain', '--model', 'lossattn_nope', '--out', str(tmp_path), str(cli_files / 'a.png')]
    assert cli_main(args) == 2
    assert "error: unknown model 'lossattn_nope'" in capsys.readouterr().err
    args = ['explain', '--model', 'lossattn_resnet18_conv', '--checkpoint', str(cli_files / 'tiny.safetensors'),
            '--out', str(tmp_path), str(cli_files / 'a.png')]
    assert cli_main(args) == 2
    assert 'does not fit lossattn_resnet18_conv' in capsys.readouterr().err


@pytest.mark.parametrize('model_name', ['conv_model', 'caps_model'])
def test_gradcam_maps(request, model_name):
    pytest.importorskip('pytorch_grad_cam')
    from timm_lossattn.gradcam import gradcam, gradcam_target_layer, pool_to_patches
    model = request.getfixturevalue(model_name)
    assert gradcam_target_layer(model) is model.layer4
    images = torch.randn(2, 3, 32, 32)
    maps = gradcam(model, images, target_classes=[1, 2])
    assert maps.shape == (2, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    pooled = pool_to_patches(maps, model.patch_geometry((32, 32)))
    assert pooled.shape == (2, 36)
    assert not model.training


def test_pool_to_patches(conv_model):
    from timm_lossattn.gradcam import pool_to_patches
    geometry = conv_model.patch_geometry((32, 32))
    heat = torch.zeros(1, 32, 32)
    heat[0, 0:9, 0:9] = 1.  # exactly patch 0
    pooled = pool_to_patches(heat, geometry)[0]
    assert pooled[0] == 1. and pooled[1] == 5 / 9  # patch 1 spans x 4..13: 5 of its 9 columns lie in the square
    torch.testing.assert_close(pool_to_patches(torch.full((1, 32, 32), 0.5), geometry), torch.full((1, 36), 0.5))
