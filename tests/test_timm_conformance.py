"""timm's own model tests (tests/test_models.py of the installed timm's sdist) run on every lossattn model.

The sdist's tests are unpacked by `python tests/fetch_timm_tests.py` (part of the README's test command). Their
test functions are called directly, parametrised over our models. Tests that need a tensor output create the
models with the documented plain-logits switch (`return_patches=False`).
"""
import functools
import sys
from pathlib import Path

import pytest
import timm

import timm_lossattn  # noqa: F401  registers the models

TIMM_TESTS = Path(__file__).resolve().parent.parent / '.cache' / f'timm-{timm.__version__}'
if not (TIMM_TESTS / 'tests' / 'test_models.py').exists():
    pytest.fail(f'timm {timm.__version__} tests missing: run `python tests/fetch_timm_tests.py`', pytrace=False)
sys.path.insert(0, str(TIMM_TESTS))
from tests import test_models as timm_tests  # noqa: E402  timm's sdist tests package

MODELS = timm.list_models('lossattn_*')


def _plain_logits(create_model):
    @functools.wraps(create_model)
    def create(model_name, *args, **kwargs):
        if model_name.startswith('lossattn_') and not kwargs.get('features_only'):
            kwargs.setdefault('return_patches', False)
        return create_model(model_name, *args, **kwargs)
    return create


@pytest.fixture(autouse=True)
def plain_logits(monkeypatch):
    monkeypatch.setattr(timm_tests, 'create_model', _plain_logits(timm.create_model))


def test_all_models_registered():
    trunks = ('resnet18', 'resnet50', 'vgg11', 'vgg16', 'tinyresnet')
    assert MODELS == sorted(f'lossattn_{trunk}_{head}' for trunk in trunks for head in ('conv', 'caps'))


@pytest.mark.parametrize('model_name', MODELS)
def test_forward(model_name):
    timm_tests.test_model_forward(model_name, 1)


@pytest.mark.parametrize('model_name', MODELS)
def test_backward(model_name):
    timm_tests.test_model_backward(model_name, 2)


@pytest.mark.parametrize('model_name', MODELS)
def test_default_cfgs(model_name):
    timm_tests.test_model_default_cfgs(model_name, 1, 'meta')


@pytest.mark.parametrize('model_name', MODELS)
def test_features(model_name):
    timm_tests.test_model_forward_features(model_name, 1)


@pytest.mark.parametrize('model_name', MODELS)
def test_torchscript(model_name):
    timm_tests.test_model_forward_torchscript(model_name, 1)


@pytest.mark.parametrize('model_name', MODELS)
def test_fx_forward(model_name):
    timm_tests.test_model_forward_fx(model_name, 1)


@pytest.mark.parametrize('model_name', MODELS)
def test_fx_backward(model_name):
    timm_tests.test_model_backward_fx(model_name, 2)


@pytest.mark.parametrize('model_name', MODELS)
def test_forward_intermediates(model_name):
    timm_tests.test_model_forward_intermediates(model_name, 1)


@pytest.mark.parametrize('model_name', MODELS)
def test_forward_intermediates_features(model_name):
    timm_tests.test_model_forward_intermediates_features(model_name, 1)
