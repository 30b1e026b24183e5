""" LossAttnTask: loss equals LossAttentionLoss, timm target conventions, and timm's public training API """
import pytest
import torch

timm = pytest.importorskip('timm')
pytest.importorskip('sklearn')

import timm_lossattn  # noqa: F401
from timm.data import create_dataset, create_loader
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.task import TrainingTask

from timm_lossattn.data import ClutteredDigits, export_image_folder
from timm_lossattn.loss import LossAttentionLoss
from timm_lossattn.task import LossAttnTask

pytestmark = pytest.mark.usefixtures('one_torch_thread')

TINY = dict(channels=(8, 16, 16, 32), head_width=32, num_classes=10)


@pytest.fixture(scope='module')
def model():
    torch.manual_seed(0)
    return timm.create_model('lossattn_resnet18_conv', **TINY).eval()


@pytest.fixture(scope='module')
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 32, 32, generator=g), torch.tensor([1, 7, 3, 0])


def test_is_timm_task(model):
    assert isinstance(LossAttnTask(model, verbose=False), TrainingTask)


def test_task_loss_equals_criterion(model, batch):
    x, y = batch
    task = LossAttnTask(model, gamma_max=0.1, rampup_epochs=10, epoch=4, verbose=False)
    result = task(x, y)
    expected = LossAttentionLoss(gamma_max=0.1, rampup_epochs=10).forward_parts(model(x), y, epoch=4)
    torch.testing.assert_close(result['loss'], expected.loss)
    torch.testing.assert_close(result['image_loss'], expected.image_loss)
    torch.testing.assert_close(result['patch_loss'], expected.patch_loss)
    assert result['gamma'] == expected.gamma
    assert result['output'].shape == (4, 10)
    assert result['loss'].requires_grad


def test_epoch_drives_rampup(model, batch):
    task = LossAttnTask(model, gamma_max=0.1, rampup_epochs=10, verbose=False)
    gammas = []
    for epoch in (0, 5, 10):
        task.set_epoch(epoch)
        gammas.append(task(*batch)['gamma'])
    assert gammas[0] < gammas[1] < gammas[2] == pytest.approx(0.1)
    assert task.get_task_state() == {'epoch': 10}
    other = LossAttnTask(model, verbose=False)
    other.load_task_state(task.get_task_state())
    assert other.epoch == 10


def test_one_hot_soft_targets_equal_hard(model, batch):
    x, y = batch
    task = LossAttnTask(model, criterion=SoftTargetCrossEntropy(), epoch=30, verbose=False)
    hard = task(x, y)['loss']
    soft = task(x, torch.nn.functional.one_hot(y, 10).float())['loss']
    torch.testing.assert_close(hard, soft)


def test_label_smoothing_matches_timm(model, batch):
    x, y = batch
    task = LossAttnTask(model, criterion=LabelSmoothingCrossEntropy(0.1), gamma_max=0., verbose=False)
    result = task(x, y)
    torch.testing.assert_close(result['loss'], LabelSmoothingCrossEntropy(0.1)(model(x).logits, y))


def test_bce_criterion_gives_multi_label(model, batch):
    x, y = batch
    bce = BinaryCrossEntropy(smoothing=0., sum_classes=True)
    task = LossAttnTask(model, criterion=bce, gamma_max=0., verbose=False)
    assert task.multi_label
    torch.testing.assert_close(task(x, y)['loss'], bce(model(x).logits, y))
    multi_hot = torch.zeros(4, 10)
    multi_hot[:, 2] = 1.
    multi_hot[0] = 0.  # an image with no positive label
    assert torch.isfinite(LossAttnTask(model, criterion=bce, verbose=False)(x, multi_hot)['loss'])


def test_plain_logits_model_is_rejected(batch):
    model = timm.create_model('lossattn_resnet18_conv', return_patches=False, **TINY)
    with pytest.raises(TypeError, match='return_patches'):
        LossAttnTask(model, verbose=False)(*batch)


def test_timm_public_api_on_exported_digits(tmp_path):
    """create_dataset + create_loader on the exported ImageFolder, create_optimizer_v2, create_scheduler_v2."""
    root = tmp_path / 'digits'
    export_image_folder(ClutteredDigits('train', num_samples=24, seed=1), root / 'train')
    dataset = create_dataset('', root=str(root), split='train', is_training=True,
                             class_map=str(root / 'train' / 'class_map.txt'))
    assert len(dataset) == 24
    loader = create_loader(
        dataset, input_size=(3, 32, 32), batch_size=8, is_training=True, hflip=0., scale=(0.9, 1.),
        use_prefetcher=False, num_workers=0, device=torch.device('cpu'), persistent_workers=False)
    torch.manual_seed(0)
    model = timm.create_model('lossattn_resnet18_conv', **TINY)
    task = LossAttnTask(model, criterion=SoftTargetCrossEntropy(), rampup_epochs=2, verbose=False)
    optimizer = create_optimizer_v2(model, opt='sgd', lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer, sched='multistep', num_epochs=2, decay_milestones=[1], updates_per_epoch=len(loader))
    before = [p.detach().clone() for p in model.parameters()]
    for epoch in range(num_epochs):
        task.set_epoch(epoch)
        model.train()
        for x, y in loader:
            result = task(x, y)
            optimizer.zero_grad()
            result['loss'].backward()
            optimizer.step()
            assert torch.isfinite(result['loss'])
        scheduler.step(epoch + 1)
    assert optimizer.param_groups[0]['lr'] == pytest.approx(0.005)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    summary = task.parts_summary()
    assert summary['gamma'] == pytest.approx(task.criterion.gamma(1)) and summary['loss'] > 0
