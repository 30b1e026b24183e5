""" `python -m timm_lossattn explain`: explanation pictures and JSON for image files

    python -m timm_lossattn explain --model lossattn_resnet18_conv --checkpoint model.safetensors \
        img1.png img2.jpg --out explanations/

writes `explanations/<image stem>.png` (heat map, selected patches, estimated box) for every image and
`explanations/explanations.json` (per image: top-k classes and scores, patch weights on the grid, selected patch
boxes and the estimated box, in input pixels of the resized image). Images are read with Pillow and preprocessed by
timm's eval transform for the model's pretrained cfg (resize, centre crop at crop_pct, mean/std normalisation).
"""
import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ['main', 'build_parser']


class CliError(Exception):
    """An error reported to the user as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the explain command."""
    from timm.utils import ParseKwargs
    parser = argparse.ArgumentParser(
        prog='python -m timm_lossattn explain',
        description='Explain images with a loss-attention model: one PNG per image and explanations.json.')
    parser.add_argument('images', nargs='+', metavar='IMAGE', help='image files (anything Pillow reads)')
    parser.add_argument('--model', required=True, help='model name, e.g. lossattn_resnet18_conv')
    weights = parser.add_mutually_exclusive_group()
    weights.add_argument('--checkpoint', default=None, help='state dict: .safetensors or a torch file')
    weights.add_argument('--pretrained', action='store_true', help='load the pretrained weights of the model')
    parser.add_argument('--out', required=True, help='output directory (created if missing)')
    parser.add_argument('--input-size', type=int, default=None, help='square input side; default the model cfg')
    parser.add_argument('--topk', type=int, default=5, help='classes reported per image (default 5)')
    parser.add_argument('--num-classes', type=int, default=None, help='default: from the checkpoint or model cfg')
    parser.add_argument('--multi-label', action='store_true', help='sigmoid scores and per-class maps')
    parser.add_argument('--class-map', default=None, help='text file of class names, one per line')
    parser.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs,
                        help='extra model arguments as key=value (Python literals)')
    parser.add_argument('--batch-size', type=int, default=16, help='images per forward pass (default 16)')
    parser.add_argument('--no-patches', action='store_true', help='do not outline the selected patches')
    parser.add_argument('--dpi', type=int, default=100, help='resolution of the PNGs (default 100)')
    return parser


def _load_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    from timm.models import load_state_dict
    if not os.path.isfile(path):
        raise CliError(f'checkpoint not found: {path}')
    try:
        return load_state_dict(path, use_ema=False, weights_only=True)
    except Exception as e:  # corrupt file, pickle refused by weights_only, ...
        raise CliError(f'cannot read checkpoint {path}: {type(e).__name__}: {e}') from e


def _create_model(args: argparse.Namespace) -> Tuple[torch.nn.Module, Optional[List[str]]]:
    import timm
    import timm_lossattn  # noqa: F401  registers the models
    if not timm.is_model(args.model):
        known = ', '.join(timm.list_models('lossattn_*'))
        raise CliError(f'unknown model {args.model!r}; loss-attention models: {known}')
    kwargs = dict(args.model_kwargs)
    state_dict = None
    if args.checkpoint is not None:
        state_dict = _load_checkpoint(args.checkpoint)
        classifier = timm.models.get_pretrained_cfg(args.model).classifier
        weight = state_dict.get(f'{classifier}.weight')
        if args.num_classes is None and weight is not None:
            kwargs['num_classes'] = weight.shape[0]
    if args.num_classes is not None:
        kwargs['num_classes'] = args.num_classes
    try:
        model = timm.create_model(args.model, pretrained=args.pretrained, return_patches=True, **kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        raise CliError(f'cannot create {args.model}: {e}') from e
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as e:
            details = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
            first = details[0] if details else str(e)
            raise CliError(
                f'checkpoint {args.checkpoint} does not fit {args.model} ({first}); pass the architecture it was '
                f'trained with as --model-kwargs key=value') from e
    class_names = None
    if args.class_map is not None:
        try:
            with open(args.class_map) as f:
                class_names = [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise CliError(f'cannot read class map {args.class_map}: {e.strerror}') from e
        if len(class_names) != model.num_classes:
            raise CliError(f'class map lists {len(class_names)} names for {model.num_classes} classes')
    return model.eval(), class_names


def _transforms(model: torch.nn.Module, input_size: Optional[int]):
    """timm's eval transform without normalisation (for drawing) and the model's mean / std."""
    from timm.data import create_transform, resolve_data_config
    args = {} if input_size is None else {'input_size': (model.in_chans, input_size, input_size)}
    config = resolve_data_config(args, model=model)
    mean = torch.tensor(config['mean']).view(-1, 1, 1)
    std = torch.tensor(config['std']).view(-1, 1, 1)
    display = create_transform(**{**config, 'mean': (0.,) * len(config['mean']), 'std': (1.,) * len(config['std'])})
    return display, mean, std


def _read_image(path: str, display, in_chans: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            image = image.convert('L' if in_chans == 1 else 'RGB')
    except FileNotFoundError as e:
        raise CliError(f'image not found: {path}') from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise CliError(f'cannot read image {path}: {e}') from e
    return display(image)


def _output_names(paths: Sequence[str]) -> List[str]:
    """A unique file stem per image: its own stem, with the image index appended where stems repeat."""
    stems = [os.path.splitext(os.path.basename(p))[0] for p in paths]
    return [s if stems.count(s) == 1 else f'{s}_{i}' for i, s in enumerate(stems)]


def run(args: argparse.Namespace) -> None:
    """Explain the images of `args`, writing PNGs and explanations.json to `args.out`."""
    from tqdm import tqdm
    from .explain import explain, render_explanation

    if args.topk < 1:
        raise CliError(f'--topk must be >= 1, got {args.topk}')
    if args.batch_size < 1:
        raise CliError(f'--batch-size must be >= 1, got {args.batch_size}')
    model, class_names = _create_model(args)
    display, mean, std = _transforms(model, args.input_size)
    os.makedirs(args.out, exist_ok=True)
    names = _output_names(args.images)
    records = []
    with tqdm(total=len(args.images), desc='explain', unit='img', file=sys.stderr) as progress:
        for start in range(0, len(args.images), args.batch_size):
            paths = args.images[start:start + args.batch_size]
            images = torch.stack([_read_image(p, display, model.in_chans) for p in paths])
            try:
                explanations = explain(
                    model, (images - mean) / std, topk=args.topk, multi_label=args.multi_label,
                    class_names=class_names, display_images=images)
            except ValueError as e:
                raise CliError(str(e)) from e
            for path, name, explanation in zip(paths, names[start:start + args.batch_size], explanations):
                png = os.path.join(args.out, f'{name}.png')
                render_explanation(None, explanation, path=png, show_patches=not args.no_patches, dpi=args.dpi)
                records.append({'image': path, 'png': os.path.basename(png), **explanation.to_dict()})
                progress.update()
    summary = {'model': args.model, 'checkpoint': args.checkpoint, 'pretrained': args.pretrained, 'images': records}
    with open(os.path.join(args.out, 'explanations.json'), 'w') as f:
        json.dump(summary, f, indent=1)


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of `python -m timm_lossattn explain`.

    Args:
        argv: Command line arguments after `explain`.

    Returns:
        0 on success, 2 on a usage or input error (reported as one line on stderr).
    """
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except (CliError, ImportError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0
