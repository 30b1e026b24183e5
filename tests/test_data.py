import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip('sklearn')

from timm_lossattn.data import (  # noqa: E402
    PRESETS, ClutteredDigits, _load_digits, collate_boxes, export_image_folder, load_boxes_json, split_indices,
)


def _ink_inside_boxes(image: np.ndarray, boxes: np.ndarray, threshold: float) -> bool:
    inside = np.zeros(image.shape, dtype=bool)
    for x0, y0, x1, y1 in boxes.astype(int):
        inside[y0:y1, x0:x1] = True
    return not (image[~inside] > threshold).any()


def test_split_is_disjoint_and_complete():
    train, test = split_indices('train'), split_indices('test')
    assert len(train) == 1437 and len(test) == 360
    assert not np.intersect1d(train, test).size
    assert np.array_equal(np.union1d(train, test), np.arange(1797))


@pytest.mark.parametrize('multi_label', [False, True])
def test_samples_use_only_their_split(multi_label):
    for split in ('train', 'test'):
        ds = ClutteredDigits(split, 'digits32', multi_label=multi_label, num_samples=30)
        for i in range(len(ds)):
            sample = ds.sample(i)
            assert np.isin(sample.digit_indices, ds.source_indices).all()
            assert np.isin(sample.clutter_indices, ds.source_indices).all()
            assert not np.isin(sample.clutter_indices, sample.digit_indices).any()
            assert np.array_equal(sample.labels, _load_digits()[1][sample.digit_indices])


def test_deterministic_and_independent_of_global_rng():
    a = ClutteredDigits('train', 'digits32', num_samples=10, seed=3)
    torch.manual_seed(123)
    np.random.seed(123)
    b = ClutteredDigits('train', 'digits32', num_samples=10, seed=3)
    c = ClutteredDigits('train', 'digits32', num_samples=10, seed=4)
    for i in range(10):
        (ia, ta, ba), (ib, tb, bb) = a[i], b[i]
        torch.manual_seed(i)
        assert torch.equal(ia, ib) and ta == tb and torch.equal(ba, bb)
        assert torch.equal(ia, a[i][0])
    assert not all(torch.equal(a[i][0], c[i][0]) for i in range(10))


@pytest.mark.parametrize('preset', list(PRESETS))
@pytest.mark.parametrize('in_chans', [1, 3])
def test_sample_format(preset, in_chans):
    ds = ClutteredDigits('test', preset, num_samples=4, in_chans=in_chans)
    size = PRESETS[preset]['canvas_size']
    image, target, boxes = ds[0]
    assert image.shape == (in_chans, size, size) and image.dtype == torch.float32
    assert 0. <= image.min() and image.max() <= 1.
    assert isinstance(target, int) and 0 <= target < 10
    assert boxes.shape == (1, 5) and boxes.dtype == torch.float32 and boxes[0, 4] == target
    if in_chans == 3:
        assert torch.equal(image[0], image[2])


@pytest.mark.parametrize('preset', list(PRESETS))
@pytest.mark.parametrize('multi_label', [False, True])
def test_boxes_are_tight_around_the_digit_ink(preset, multi_label):
    clean = ClutteredDigits('train', preset, multi_label=multi_label, num_samples=20, num_clutter=0)
    cluttered = ClutteredDigits('train', preset, multi_label=multi_label, num_samples=20)
    thr = clean.ink_threshold
    outside_ink = 0
    for i in range(20):
        a, b = clean.sample(i), cluttered.sample(i)
        # clutter is drawn after the digits: same layout, and it never reaches into the digit boxes
        assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.digit_indices, b.digit_indices)
        assert len(a.clutter_indices) == 0
        assert _ink_inside_boxes(a.image, a.boxes, thr)
        for x0, y0, x1, y1 in a.boxes.astype(int):
            crop = a.image[y0:y1, x0:x1] > thr
            assert crop[0].any() and crop[-1].any() and crop[:, 0].any() and crop[:, -1].any()  # tight
            assert np.array_equal(a.image[y0:y1, x0:x1], b.image[y0:y1, x0:x1])
        outside_ink += not _ink_inside_boxes(b.image, b.boxes, thr)
    assert outside_ink == 20  # every cluttered canvas has ink outside the digit boxes


@pytest.mark.parametrize('preset', list(PRESETS))
def test_multi_label_targets_match_boxes(preset):
    ds = ClutteredDigits('train', preset, multi_label=True, num_samples=40)
    counts = set()
    for i in range(len(ds)):
        image, target, boxes = ds[i]
        assert target.shape == (10,) and target.dtype == torch.float32
        expected = torch.zeros(10)
        expected[boxes[:, 4].long()] = 1.
        assert torch.equal(target, expected)
        counts.add(len(boxes))
        x0, y0, x1, y1 = boxes[:, :4].T
        overlap_w = torch.minimum(x1[:, None], x1[None]) - torch.maximum(x0[:, None], x0[None])
        overlap_h = torch.minimum(y1[:, None], y1[None]) - torch.maximum(y0[:, None], y0[None])
        overlap = (overlap_w.clamp(min=0) * overlap_h.clamp(min=0)).fill_diagonal_(0)
        assert not overlap.any()
    assert counts == {2, 3}


def test_collate_and_transform():
    ds = ClutteredDigits('train', 'digits32', num_samples=6, transform=lambda x: x * 2)
    images, targets, boxes = next(iter(torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate_boxes)))
    assert images.shape == (3, 3, 32, 32) and images.max() > 1.
    assert targets.dtype == torch.int64 and targets.shape == (3,)
    assert len(boxes) == 3 and all(b.shape == (1, 5) for b in boxes)
    multi = ClutteredDigits('train', 'digits32', multi_label=True, num_samples=3)
    images, targets, boxes = collate_boxes([multi[i] for i in range(3)])
    assert targets.shape == (3, 10)
    assert [len(b[:, 4].unique()) for b in boxes] == [int(t.sum()) for t in targets]  # classes may repeat


@pytest.mark.parametrize('kwargs, match', [
    (dict(split='val'), 'split'),
    (dict(preset='digits16'), 'preset'),
    (dict(num_samples=0), 'num_samples'),
    (dict(seed=-1), 'seed'),
    (dict(in_chans=2), 'in_chans'),
    (dict(num_clutter=-1), 'num_clutter'),
    (dict(multi_label=True, num_digits=(3, 2)), 'num_digits'),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClutteredDigits(**kwargs)


def test_index_out_of_range():
    with pytest.raises(IndexError):
        ClutteredDigits(num_samples=2)[2]


def test_missing_sklearn_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, 'sklearn.datasets', None)
    _load_digits.cache_clear()
    try:
        with pytest.raises(ImportError, match=r'timm-lossattn\[digits\]'):
            ClutteredDigits()
    finally:
        _load_digits.cache_clear()


def test_export_single_label_reads_with_timm(tmp_path):
    from timm.data import create_dataset
    ds = ClutteredDigits('test', 'digits32', num_samples=12, seed=1)
    json_path = export_image_folder(ds, tmp_path / 'validation')
    timm_ds = create_dataset('', root=str(tmp_path), split='validation', class_map='class_map.txt')
    assert len(timm_ds) == 12
    records = load_boxes_json(json_path)
    assert len(records) == 12
    with open(json_path) as f:
        raw = json.load(f)
    for i in range(12):
        image, target, boxes = ds[i]
        rel_path = f'{target}/{i:06d}.png'
        assert torch.equal(records[rel_path], boxes)
        assert raw[rel_path]['labels'] == [target]
        png = np.asarray(Image.open(tmp_path / 'validation' / rel_path))
        assert png.shape == (32, 32, 3)
        assert np.array_equal(png[..., 0], np.rint(image[0].numpy() * 255).astype(np.uint8))
    timm_targets = sorted(int(timm_ds[i][1]) for i in range(12))
    assert timm_targets == sorted(ds[i][1] for i in range(12))
    pil_image, _ = timm_ds[0]
    assert pil_image.size == (32, 32) and pil_image.mode == 'RGB'


def test_export_multi_label_flat(tmp_path):
    ds = ClutteredDigits('train', 'digits64', multi_label=True, num_samples=5, in_chans=1)
    export_image_folder(ds, tmp_path)
    records = load_boxes_json(tmp_path)
    assert sorted(records) == [f'{i:06d}.png' for i in range(5)]
    for i in range(5):
        _, target, boxes = ds[i]
        assert torch.equal(records[f'{i:06d}.png'], boxes)
        png = Image.open(tmp_path / f'{i:06d}.png')
        assert png.mode == 'L' and png.size == (64, 64)
