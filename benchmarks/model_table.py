"""Parameters, FLOPs and patch grid of every registered model at 32x32 (the README's model table).

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on the meta device (no weights allocated), for one
image; GMACs = FLOPs / 2. Run: `python benchmarks/model_table.py` (writes benchmarks/results/model_table.md).
"""
from pathlib import Path

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import timm_lossattn  # noqa: F401


def main() -> None:
    rows = ['| model | params (M), 10 classes | GFLOPs at 32x32 | patch grid (M) |', '|---|---:|---:|---|']
    for name in timm.list_models('lossattn_*'):
        model = timm.create_model(name, num_classes=10, device='meta').eval()
        params = sum(p.numel() for p in model.parameters())
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.empty(1, 3, 32, 32, device='meta'))
        grid = model.patch_geometry(32).grid_size
        rows.append(f'| `{name}` | {params / 1e6:.2f} | {counter.get_total_flops() / 1e9:.2f} | '
                    f'{grid[0]}x{grid[1]} ({grid[0] * grid[1]}) |')
    table = '\n'.join(rows) + '\n'
    out = Path(__file__).parent / 'results' / 'model_table.md'
    out.write_text(table)
    print(table)


if __name__ == '__main__':
    main()
