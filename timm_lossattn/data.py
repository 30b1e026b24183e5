""" Cluttered digits: an offline localization dataset for loss-based attention

Canvases built from scikit-learn's real 8x8 handwritten digits (the UCI optical recognition of handwritten digits
test set, 1797 images, bundled with scikit-learn, so nothing is downloaded). Each canvas holds one digit (single-label,
10 classes) or 2-3 digits (multi-label) upscaled to a random size and placed on a black canvas, plus clutter:
small fragments cut from other digits of the same split. The ground-truth box of every digit is recorded, which is
what the localization metrics of Shi et al., "Loss-based Attention for Interpreting Image-level Prediction of
Convolutional Neural Networks" (IEEE TIP 2021) need and what CIFAR-10 lacks.

Conventions:
    * image: float tensor (in_chans, H, W) in [0, 1], grey replicated to 3 channels by default so timm's RGB
      pipelines work unchanged.
    * target: int class (single-label) or float multi-hot tensor (10,) (multi-label).
    * boxes: float tensor (N_digits, 5) = (x0, y0, x1, y1, label) in pixel coordinates, half-open: pixel i spans
      [i, i + 1), so a box is the tight box of the digit's ink (pixels above `ink_threshold`).

Split: the 1797 digit images are permuted with a fixed seed (0); the first 80% (1437) feed the train split, the
remaining 360 the test split, for every dataset seed, so train and test canvases never share a source digit (digits
and clutter alike).

Requires the `digits` extra (scikit-learn): `pip install "timm-lossattn[digits]"`.
"""
import functools
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    'PRESETS', 'CLASS_NAMES', 'ClutteredDigits', 'DigitsSample', 'collate_boxes', 'export_image_folder',
    'load_boxes_json', 'split_indices',
]

CLASS_NAMES = tuple(str(i) for i in range(10))

# canvas_size: canvas side; digit_size: (min, max) side of an upscaled digit; num_clutter: clutter fragments per
# canvas; clutter_size: (min, max) side of a fragment. All in pixels, ranges inclusive.
PRESETS: Dict[str, Dict[str, Any]] = {
    'digits32': dict(canvas_size=32, digit_size=(12, 16), num_clutter=4, clutter_size=(4, 8)),
    'digits64': dict(canvas_size=64, digit_size=(16, 28), num_clutter=8, clutter_size=(6, 12)),
}

_SPLITS = ('train', 'test')
_TRAIN_FRACTION = 0.8
_SPLIT_SEED = 0
_MAX_LAYOUT_ATTEMPTS = 100
_SKLEARN_HINT = 'pip install "timm-lossattn[digits]"'


@functools.lru_cache(maxsize=1)
def _load_digits() -> Tuple[np.ndarray, np.ndarray]:
    """Loads scikit-learn's digits once: images (1797, 8, 8) float32 in [0, 1] and labels (1797,) int64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError(f'The cluttered digits dataset needs scikit-learn: {_SKLEARN_HINT}') from e
    digits = load_digits()
    images = (digits.images / 16.).astype(np.float32)
    return images, digits.target.astype(np.int64)


def split_indices(split: str) -> np.ndarray:
    """Indices into `sklearn.datasets.load_digits()` that feed a split.

    Args:
        split: 'train' (first 80% of a permutation seeded with 0) or 'test' (the remaining 20%).

    Returns:
        Sorted int64 array of source digit indices; the two splits are disjoint and together cover all 1797 images.
    """
    if split not in _SPLITS:
        raise ValueError(f'Unknown split {split!r}, expected one of {_SPLITS}.')
    num_images = len(_load_digits()[1])
    perm = np.random.default_rng(_SPLIT_SEED).permutation(num_images)
    num_train = int(_TRAIN_FRACTION * num_images)
    return np.sort(perm[:num_train] if split == 'train' else perm[num_train:])


def _upscale(digit: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upscaling of an 8x8 digit to (size, size), values clamped to [0, 1]."""
    x = torch.from_numpy(digit)[None, None]
    x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
    return x[0, 0].clamp_(0., 1.).numpy()


def _integral(occupied: np.ndarray) -> np.ndarray:
    """Zero-padded integral image (H + 1, W + 1) of a boolean occupancy mask."""
    integral = np.zeros((occupied.shape[0] + 1, occupied.shape[1] + 1), dtype=np.int32)
    np.cumsum(occupied, axis=0, out=integral[1:, 1:])
    np.cumsum(integral[1:, 1:], axis=1, out=integral[1:, 1:])
    return integral


def _free_positions(integral: np.ndarray, size: int) -> Tuple[np.ndarray, int]:
    """Top-left positions of size x size windows that touch no occupied pixel: flat indices and the grid width."""
    counts = integral[size:, size:] - integral[:-size, size:] - integral[size:, :-size] + integral[:-size, :-size]
    return np.flatnonzero(counts == 0), counts.shape[1]


def _ink_box(patch: np.ndarray, threshold: float) -> Tuple[int, int, int, int]:
    """Tight half-open box (x0, y0, x1, y1) of the pixels above threshold in a 2D array."""
    ys, xs = np.nonzero(patch > threshold)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@dataclass
class DigitsSample:
    """One rendered canvas with its provenance.

    Attributes:
        image: (H, W) float32 canvas in [0, 1].
        boxes: (N, 4) float32 ink boxes (x0, y0, x1, y1) of the digits, half-open pixel coordinates.
        labels: (N,) int64 digit classes.
        digit_indices: (N,) indices into `load_digits()` of the placed digits.
        clutter_indices: indices into `load_digits()` of the digits the clutter fragments were cut from.
    """
    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    digit_indices: np.ndarray
    clutter_indices: np.ndarray


class ClutteredDigits(torch.utils.data.Dataset):
    """Cluttered handwritten digits with ground-truth boxes, generated lazily and deterministically.

    Sample `i` depends only on (seed, split, i): two datasets with the same arguments yield identical tensors,
    whatever the global RNG state, in any process or DataLoader worker.

    Args:
        split: 'train' or 'test'; the two draw digits and clutter from disjoint source images (see `split_indices`).
        preset: key of `PRESETS` ('digits32' or 'digits64') fixing canvas, digit and clutter sizes.
        multi_label: place 2-3 non-overlapping digits (classes may repeat) and return a multi-hot target.
        num_samples: number of canvases.
        seed: non-negative int seeding every canvas.
        in_chans: 1 (grey) or 3 (grey replicated, default, for timm's RGB pipelines).
        num_digits: (min, max) digits per canvas in the multi-label variant, inclusive.
        num_clutter: clutter fragments per canvas; None takes the preset's, 0 disables clutter.
        ink_threshold: pixels above it count as ink when computing the tight digit boxes.
        transform: optional callable applied to the image tensor (boxes are not transformed, so use photometric
            transforms only if the boxes are needed).

    `__getitem__` returns (image, target, boxes): image float (in_chans, H, W) in [0, 1]; target int (single-label)
    or float multi-hot (10,) (multi-label); boxes float (N_digits, 5) = (x0, y0, x1, y1, label), half-open pixel
    coordinates. Use `collate_boxes` in a DataLoader.
    """

    def __init__(
            self,
            split: str = 'train',
            preset: str = 'digits32',
            multi_label: bool = False,
            num_samples: int = 10000,
            seed: int = 0,
            in_chans: int = 3,
            num_digits: Tuple[int, int] = (2, 3),
            num_clutter: Optional[int] = None,
            ink_threshold: float = 0.1,
            transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ):
        if split not in _SPLITS:
            raise ValueError(f'Unknown split {split!r}, expected one of {_SPLITS}.')
        if preset not in PRESETS:
            raise ValueError(f'Unknown preset {preset!r}, expected one of {tuple(PRESETS)}.')
        if not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f'num_samples must be a positive int, got {num_samples!r}.')
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f'seed must be a non-negative int, got {seed!r}.')
        if in_chans not in (1, 3):
            raise ValueError(f'in_chans must be 1 or 3, got {in_chans!r}.')
        if len(num_digits) != 2 or not 1 <= num_digits[0] <= num_digits[1]:
            raise ValueError(f'num_digits must be (min, max) with 1 <= min <= max, got {num_digits!r}.')
        if num_clutter is not None and (not isinstance(num_clutter, int) or num_clutter < 0):
            raise ValueError(f'num_clutter must be a non-negative int or None, got {num_clutter!r}.')
        if not 0. <= ink_threshold < 1.:
            raise ValueError(f'ink_threshold must lie in [0, 1), got {ink_threshold!r}.')
        cfg = PRESETS[preset]
        self.split = split
        self.preset = preset
        self.multi_label = multi_label
        self.num_samples = num_samples
        self.seed = seed
        self.in_chans = in_chans
        self.num_digits = tuple(num_digits) if multi_label else (1, 1)
        self.num_clutter = cfg['num_clutter'] if num_clutter is None else num_clutter
        self.ink_threshold = ink_threshold
        self.transform = transform
        self.canvas_size: int = cfg['canvas_size']
        self.digit_size: Tuple[int, int] = cfg['digit_size']
        self.clutter_size: Tuple[int, int] = cfg['clutter_size']
        self.classes = CLASS_NAMES
        self.num_classes = len(CLASS_NAMES)
        self.source_indices = split_indices(split)
        self._images, self._labels = _load_digits()

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Union[int, torch.Tensor], torch.Tensor]:
        sample = self.sample(index)
        image = torch.from_numpy(sample.image)[None].expand(self.in_chans, -1, -1).contiguous()
        if self.transform is not None:
            image = self.transform(image)
        labels = torch.from_numpy(sample.labels)
        boxes = torch.cat([torch.from_numpy(sample.boxes), labels[:, None].float()], dim=1)
        if self.multi_label:
            target = torch.zeros(self.num_classes)
            target[labels] = 1.
        else:
            target = int(labels[0])
        return image, target, boxes

    def sample(self, index: int) -> DigitsSample:
        """Renders canvas `index` and reports which source digits it used.

        Args:
            index: sample index in [0, len(self)).

        Returns:
            The rendered `DigitsSample`.
        """
        if not 0 <= index < self.num_samples:
            raise IndexError(f'Index {index} out of range for a dataset of {self.num_samples} samples.')
        rng = np.random.default_rng([self.seed, _SPLITS.index(self.split), index])
        num = int(rng.integers(self.num_digits[0], self.num_digits[1] + 1))
        digit_indices = self.source_indices[rng.choice(len(self.source_indices), num, replace=False)]
        positions, occupied = self._layout(rng, num)
        canvas = np.zeros(occupied.shape, dtype=np.float32)
        boxes = []
        for src, (x, y, s) in zip(digit_indices, positions):
            patch = _upscale(self._images[src], s)
            canvas[y:y + s, x:x + s] = patch
            x0, y0, x1, y1 = _ink_box(patch, self.ink_threshold)
            boxes.append((x + x0, y + y0, x + x1, y + y1))
        clutter_indices = self._add_clutter(rng, canvas, occupied, digit_indices)
        return DigitsSample(
            image=canvas,
            boxes=np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
            labels=self._labels[digit_indices],
            digit_indices=digit_indices,
            clutter_indices=clutter_indices,
        )

    def _layout(self, rng: np.random.Generator, num: int) -> Tuple[List[Tuple[int, int, int]], np.ndarray]:
        """Draws (x, y, side) for `num` pairwise disjoint digit squares, redrawing the layout when one does not fit.

        Returns the squares and the canvas mask they cover.
        """
        for _ in range(_MAX_LAYOUT_ATTEMPTS):
            occupied = np.zeros((self.canvas_size, self.canvas_size), dtype=bool)
            positions = []
            for _ in range(num):
                s = int(rng.integers(self.digit_size[0], self.digit_size[1] + 1))
                free, width = _free_positions(_integral(occupied), s)
                if not len(free):
                    break
                y, x = divmod(int(free[rng.integers(len(free))]), width)
                occupied[y:y + s, x:x + s] = True
                positions.append((x, y, s))
            if len(positions) == num:
                return positions, occupied
        raise RuntimeError(
            f'Could not place {num} disjoint digits of size {self.digit_size} on a {self.canvas_size}px canvas.')

    def _add_clutter(
            self,
            rng: np.random.Generator,
            canvas: np.ndarray,
            occupied: np.ndarray,
            digit_indices: np.ndarray,
    ) -> np.ndarray:
        """Pastes fragments of other split digits (max-blended) where they touch no digit square; returns sources."""
        integral = _integral(occupied)
        sources = []
        for _ in range(self.num_clutter):
            src = int(self.source_indices[rng.integers(len(self.source_indices))])
            while src in digit_indices:
                src = int(self.source_indices[rng.integers(len(self.source_indices))])
            patch = _upscale(self._images[src], int(rng.integers(self.digit_size[0], self.digit_size[1] + 1)))
            f = int(rng.integers(self.clutter_size[0], self.clutter_size[1] + 1))
            # centre the crop on a random ink pixel so the fragment is never blank
            ys, xs = np.nonzero(patch > self.ink_threshold)
            k = rng.integers(len(ys))
            cy = int(np.clip(ys[k] - f // 2, 0, patch.shape[0] - f))
            cx = int(np.clip(xs[k] - f // 2, 0, patch.shape[1] - f))
            free, width = _free_positions(integral, f)
            if not len(free):
                continue
            y, x = divmod(int(free[rng.integers(len(free))]), width)
            np.maximum(canvas[y:y + f, x:x + f], patch[cy:cy + f, cx:cx + f], out=canvas[y:y + f, x:x + f])
            sources.append(src)
        return np.asarray(sources, dtype=np.int64)


def collate_boxes(
        batch: Sequence[Tuple[torch.Tensor, Union[int, torch.Tensor], torch.Tensor]],
) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
    """DataLoader collate function for `ClutteredDigits`: stacks images and targets, keeps boxes as a list.

    Args:
        batch: (image, target, boxes) tuples.

    Returns:
        images (B, C, H, W), targets (B,) int64 or (B, 10) float, and a list of B box tensors (N_i, 5).
    """
    images, targets, boxes = zip(*batch)
    targets = torch.stack(targets) if isinstance(targets[0], torch.Tensor) else torch.tensor(targets)
    return torch.stack(images), targets, list(boxes)


def export_image_folder(dataset: ClutteredDigits, root: Union[str, os.PathLike]) -> str:
    """Writes a dataset as PNG files that timm's `ImageDataset` (and `train.py --data-dir`) reads.

    Single-label: `root/<class>/<index:06d>.png` with class names '0'..'9', plus `root/class_map.txt` listing the
    ten class names; pass `--class-map class_map.txt` to timm when a small export may miss a class, so indices stay
    the digit values. Multi-label: a flat `root/<index:06d>.png` (timm's folder reader gives every image the label
    0; read the labels from the JSON). Both write `root/boxes.json` mapping each relative POSIX path to
    `{"boxes": [[x0, y0, x1, y1], ...], "labels": [...]}` in the dataset's half-open pixel convention.
    Export train and test to `<dir>/train` and `<dir>/validation` for `train.py --data-dir <dir>`.

    Args:
        dataset: the dataset to export (its `transform` is bypassed; images are written as rendered, in 'L' or
            'RGB' mode following `in_chans`).
        root: output folder, created if needed.

    Returns:
        The path of the written `boxes.json`.
    """
    os.makedirs(root, exist_ok=True)
    records = {}
    for index in range(len(dataset)):
        sample = dataset.sample(index)
        name = f'{index:06d}.png'
        rel_path = name if dataset.multi_label else f'{CLASS_NAMES[sample.labels[0]]}/{name}'
        pixels = np.rint(sample.image * 255.).astype(np.uint8)
        image = Image.fromarray(pixels)
        if dataset.in_chans == 3:
            image = image.convert('RGB')
        path = os.path.join(root, *rel_path.split('/'))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        image.save(path)
        records[rel_path] = dict(boxes=sample.boxes.tolist(), labels=sample.labels.tolist())
    if not dataset.multi_label:
        with open(os.path.join(root, 'class_map.txt'), 'w', encoding='utf-8') as f:
            f.write('\n'.join(CLASS_NAMES) + '\n')
    json_path = os.path.join(root, 'boxes.json')
    with open(json_path, 'w', encoding='utf-8') as f:
        json.dump(records, f)
    return json_path


def load_boxes_json(path: Union[str, os.PathLike]) -> Dict[str, torch.Tensor]:
    """Reads the `boxes.json` written by `export_image_folder`.

    Args:
        path: the JSON file, or the export folder holding it.

    Returns:
        Mapping from relative image path to a float tensor (N, 5) = (x0, y0, x1, y1, label), as `ClutteredDigits`
        returns.
    """
    if os.path.isdir(path):
        path = os.path.join(path, 'boxes.json')
    with open(path, encoding='utf-8') as f:
        records = json.load(f)
    out = {}
    for rel_path, record in records.items():
        boxes = torch.tensor(record['boxes'], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor(record['labels'], dtype=torch.float32).reshape(-1, 1)
        if len(boxes) != len(labels):
            raise ValueError(f'{path}: {rel_path} has {len(boxes)} boxes but {len(labels)} labels.')
        out[rel_path] = torch.cat([boxes, labels], dim=1)
    return out
