"""Speed and memory of the loss-attention models, measured with torch.utils.benchmark on CPU or GPU

Sections (`--sections` picks a subset):

    throughput  forward time of the registered models at 32x32 and 64x64, batch 1 and 32, against the same timm
                backbone unmodified (its strides, max-pool and classifier as timm builds them): what removing the
                strides costs. FLOPs of both from `torch.utils.flop_counter.FlopCounterMode`.
    head        loss-attention pooling against mean pooling (and the attention pools) on the same trunk and patch
                head: the whole forward, the head (`forward_head` on a precomputed trunk map) and the pool
                (`model.head` on precomputed patch instances) alone. The extra time of the whole forward (target:
                <= 3 %) is judged on the pools timed alone (pool difference / whole mean-pool forward): the models
                differ only there, and the difference is smaller than the run-to-run spread of a whole forward,
                which is reported next to the whole-forward difference.
    explain     one explanation (`timm_lossattn.explain.explain`: logits, patch map upsampled to the image, boxes)
                against Grad-CAM (`timm_lossattn.gradcam.gradcam`) on the same network and batch (target: >= 3x
                faster); the plain forward for reference.
    train       a training step (forward, LossAttentionLoss, backward, SGD step): eager, channels_last and
                torch.compile, fp32 and AMP (bf16 autocast), and eager with gradient checkpointing; the compile time
                (first step) is reported apart from the step time.
    memory      training memory without and with gradient checkpointing (target: >= 40 % less). On CUDA: the peak
                allocated during a step above what was allocated before it (weights, gradients, optimizer state). On
                CPU, which has no allocator statistics: the bytes of the tensors autograd saves for backward in the
                forward and loss (`torch.autograd.graph.saved_tensors_hooks`, distinct storages, parameters and
                buffers excluded); the recomputation of one checkpointed segment in backward is not counted.
    input_size  time, FLOPs and patches against the input size, 32 to 224.
    strides     time, FLOPs and patch grid against the number of stride-2 stages kept (the paper's Table VII).

Timing: the threads are fixed (`--threads`); every function is warmed up, then timed `repeats` times in blocks of
about `block_time` seconds (`torch.utils.benchmark.Timer.timeit`, which synchronises CUDA); the functions compared in
a row are interleaved block by block so they share the machine's state, and the median time per call is reported.
Ratios are taken between medians of the same run. Benchmarks measure: nothing here asserts a time.

    python benchmarks/speed.py --preset cpu     # tiny models everywhere, paper-size ones where affordable (~10 min)
    python benchmarks/speed.py --preset gpu     # every registered model, every row
    python benchmarks/speed.py --preset tiny    # seconds: the smoke test's run

Writes speed_<preset>.json (rows, machine, versions, command), speed_<preset>.md and speed_<preset>_*.png to
benchmarks/results/ (`--out DIR` elsewhere).
"""
import argparse
import copy
import itertools
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch._inductor.config as inductor_config
import torch.nn as nn
from timm.models.resnet import BasicBlock, ResNet
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.benchmark import Timer
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import timm_lossattn  # noqa: F401  (registers the lossattn_* models)
from timm_lossattn.explain import explain
from timm_lossattn.gradcam import gradcam
from timm_lossattn.loss import LossAttentionLoss

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, environment, environment_md, markdown_table, pyplot, write_results  # noqa: E402

SECTIONS = ('throughput', 'head', 'explain', 'train', 'memory', 'input_size', 'strides')
TINY_MODELS = ('lossattn_tinyresnet_conv', 'lossattn_tinyresnet_caps')
PAPER_MODELS = (
    'lossattn_resnet18_conv', 'lossattn_resnet18_caps', 'lossattn_resnet50_conv', 'lossattn_resnet50_caps',
    'lossattn_vgg11_conv', 'lossattn_vgg11_caps', 'lossattn_vgg16_conv', 'lossattn_vgg16_caps',
)
NUM_CLASSES = 10
STRIDE_PATTERNS = ((1, 1, 1, 1), (2, 1, 1, 1), (2, 2, 1, 1), (2, 2, 2, 1), (2, 2, 2, 2))
HEAD_OVERHEAD_TARGET_PCT = 3.0
EXPLAIN_SPEEDUP_TARGET = 3.0
MEMORY_SAVING_TARGET_PCT = 40.0


@dataclass(frozen=True)
class TrainVariant:
    """How a training step runs."""
    channels_last: bool = False
    amp: bool = False
    compiled: bool = False
    checkpointing: bool = False


TRAIN_VARIANTS: Dict[str, TrainVariant] = {
    'eager': TrainVariant(),
    'channels_last': TrainVariant(channels_last=True),
    'eager+amp': TrainVariant(amp=True),
    'channels_last+amp': TrainVariant(channels_last=True, amp=True),
    'compile': TrainVariant(compiled=True),
    'compile+amp': TrainVariant(compiled=True, amp=True),
    'eager+checkpointing': TrainVariant(checkpointing=True),
}


@dataclass(frozen=True)
class Preset:
    """What a preset measures. Model rows name a registered `lossattn_*` model; sizes are square input sides.

    Attributes:
        repeats: Timed blocks per function (the median is reported).
        block_time: Seconds a timed block aims at (at least one call).
        throughput: (model, input size, batch) rows against the unmodified timm backbone.
        head: (model, batch) rows at 32x32.
        head_pools: Pools compared with 'lossattn' ('routing' only on capsule heads).
        explain: (model, batch) rows at 32x32.
        train: (model, batch, variant names) rows at 32x32.
        memory: (model, batch) rows at 32x32.
        input_sizes: (model, batch, input sizes) rows.
        strides: (model, batch, input size) rows, each over `STRIDE_PATTERNS`.
    """
    repeats: int
    block_time: float
    throughput: Tuple[Tuple[str, int, int], ...]
    head: Tuple[Tuple[str, int], ...]
    head_pools: Tuple[str, ...]
    explain: Tuple[Tuple[str, int], ...]
    train: Tuple[Tuple[str, int, Tuple[str, ...]], ...]
    memory: Tuple[Tuple[str, int], ...]
    input_sizes: Tuple[Tuple[str, int, Tuple[int, ...]], ...]
    strides: Tuple[Tuple[str, int, int], ...]


PRESETS: Dict[str, Preset] = {
    'tiny': Preset(
        repeats=2,
        block_time=0.005,
        throughput=(('lossattn_tinyresnet_conv', 32, 1), ('lossattn_tinyresnet_conv', 32, 2)),
        head=(('lossattn_tinyresnet_conv', 1),),
        head_pools=('lossattn', 'mean'),
        explain=(('lossattn_tinyresnet_conv', 1),),
        train=(('lossattn_tinyresnet_conv', 2, ('eager', 'channels_last', 'eager+amp', 'eager+checkpointing')),),
        memory=(('lossattn_tinyresnet_conv', 2),),
        input_sizes=(('lossattn_tinyresnet_conv', 1, (32, 64)),),
        strides=(('lossattn_tinyresnet_conv', 1, 64),),
    ),
    'cpu': Preset(
        repeats=5,
        block_time=0.1,
        throughput=tuple((m, s, b) for m in TINY_MODELS for s in (32, 64) for b in (1, 32))
        + tuple((m, 32, 1) for m in PAPER_MODELS)
        + tuple((m, 64, 1) for m in ('lossattn_resnet18_conv', 'lossattn_vgg11_conv')),
        head=tuple((m, b) for m in TINY_MODELS for b in (1, 32))
        + (('lossattn_resnet18_conv', 1), ('lossattn_vgg11_conv', 1)),
        head_pools=('lossattn', 'mean', 'attention', 'gated'),
        explain=tuple((m, b) for m in TINY_MODELS for b in (1, 32))
        + (('lossattn_resnet18_conv', 1), ('lossattn_vgg11_conv', 1)),
        train=(
            ('lossattn_tinyresnet_conv', 32, (
                'eager', 'channels_last', 'eager+amp', 'channels_last+amp', 'eager+checkpointing', 'compile')),
            ('lossattn_tinyresnet_caps', 32, ('eager', 'channels_last', 'eager+amp', 'eager+checkpointing')),
            ('lossattn_resnet18_conv', 4, ('eager', 'channels_last')),
        ),
        memory=tuple((m, 32) for m in TINY_MODELS)
        + (('lossattn_resnet18_conv', 8), ('lossattn_resnet50_conv', 4), ('lossattn_vgg11_conv', 8)),
        input_sizes=(
            ('lossattn_tinyresnet_conv', 1, (32, 64, 96, 128, 160, 224)),
            ('lossattn_resnet18_conv', 1, (32, 64, 96)),
        ),
        strides=(
            ('lossattn_tinyresnet_conv', 1, 64), ('lossattn_tinyresnet_conv', 1, 224),
            ('lossattn_resnet18_conv', 1, 64),
        ),
    ),
    'gpu': Preset(
        repeats=10,
        block_time=0.2,
        throughput=tuple((m, s, b) for m in TINY_MODELS + PAPER_MODELS for s in (32, 64) for b in (1, 32)),
        head=tuple((m, b) for m in TINY_MODELS + PAPER_MODELS for b in (1, 32)),
        head_pools=('lossattn', 'mean', 'attention', 'gated', 'routing'),
        explain=tuple((m, b) for m in TINY_MODELS + PAPER_MODELS for b in (1, 32)),
        train=tuple((m, 128, tuple(TRAIN_VARIANTS)) for m in ('lossattn_tinyresnet_conv', 'lossattn_resnet18_conv'))
        + tuple((m, 32, ('eager', 'channels_last', 'eager+amp', 'channels_last+amp', 'eager+checkpointing'))
                for m in TINY_MODELS[1:] + PAPER_MODELS[1:]),
        memory=tuple((m, 32) for m in TINY_MODELS + PAPER_MODELS),
        input_sizes=tuple(
            (m, 32, (32, 64, 96, 128, 160, 224))
            for m in ('lossattn_tinyresnet_conv', 'lossattn_resnet18_conv', 'lossattn_resnet50_conv',
                      'lossattn_vgg11_conv', 'lossattn_vgg16_conv')),
        strides=tuple(
            (m, 32, s) for m in ('lossattn_tinyresnet_conv', 'lossattn_resnet18_conv', 'lossattn_resnet50_conv')
            for s in (64, 224)),
    ),
}


@dataclass(frozen=True)
class Timing:
    """Time per call of one function.

    Attributes:
        median_s: Median over the timed blocks.
        iqr_s: Interquartile range over the blocks.
        repeats: Timed blocks.
        number: Calls per block.
    """
    median_s: float
    iqr_s: float
    repeats: int
    number: int


class Bench:
    """Device, threads and timing settings shared by the sections."""

    def __init__(self, device: torch.device, threads: int, repeats: int, block_time: float, progress: bool):
        self.device = device
        self.threads = threads
        self.repeats = repeats
        self.block_time = block_time
        self.progress = progress

    def synchronize(self) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def call_time(self, fn: Callable[[], Any]) -> float:
        """Seconds of one call."""
        self.synchronize()
        start = time.perf_counter()
        fn()
        self.synchronize()
        return time.perf_counter() - start

    def time_interleaved(self, fns: Dict[str, Callable[[], Any]]) -> Dict[str, Timing]:
        """Median time per call of each function, timed block by block in turn (A B C A B C ...).

        Each function is called twice first (warm-up); the second call sets how many calls make a block of about
        `block_time` seconds.
        """
        timers, numbers = {}, {}
        for name, fn in fns.items():
            fn()
            numbers[name] = max(1, round(self.block_time / max(self.call_time(fn), 1e-9)))
            timers[name] = Timer(stmt='fn()', globals={'fn': fn}, num_threads=self.threads)
        samples: Dict[str, List[float]] = {name: [] for name in fns}
        for _ in range(self.repeats):
            for name, timer in timers.items():
                samples[name].append(timer.timeit(numbers[name]).median)
        timings = {}
        for name, times in samples.items():
            quartiles = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
            timings[name] = Timing(statistics.median(times), quartiles[2] - quartiles[0], len(times), numbers[name])
        return timings

    def bar(self, items: Sequence[Any], desc: str) -> tqdm:
        return tqdm(items, desc=f'{desc:<10}', unit='row', disable=not self.progress, file=sys.stderr)


def create_model(name: str, device: torch.device, **kwargs) -> nn.Module:
    return timm.create_model(name, num_classes=NUM_CLASSES, device=device, **kwargs)


def trunk_name(model_name: str) -> str:
    """'lossattn_resnet18_conv' -> 'resnet18'."""
    return model_name.split('_')[1]


def create_backbone(model_name: str, device: torch.device) -> Tuple[str, nn.Module]:
    """The unmodified timm model with the trunk of a `lossattn_*` model: its name and the model (10 classes)."""
    trunk = trunk_name(model_name)
    if trunk == 'tinyresnet':
        model = ResNet(block=BasicBlock, layers=(1, 1, 1, 1), channels=(16, 32, 64, 64), num_classes=NUM_CLASSES)
        return 'ResNet(BasicBlock, (1, 1, 1, 1), channels=(16, 32, 64, 64))', model.to(device)
    name = {'resnet18': 'resnet18', 'resnet50': 'resnet50', 'vgg11': 'vgg11_bn', 'vgg16': 'vgg16_bn'}[trunk]
    return name, create_model(name, device)


def gflops(build: Callable[[torch.device], nn.Module], input_size: int) -> float:
    """GFLOPs of one image, counted on the meta device (no weights allocated)."""
    model = build(torch.device('meta')).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.empty(1, 3, input_size, input_size, device='meta'))
    return counter.get_total_flops() / 1e9


def images(batch: int, input_size: int, device: torch.device) -> torch.Tensor:
    return torch.randn(batch, 3, input_size, input_size, device=device)


def inference(forward: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Callable[[], Any]:
    """`forward(x)` under `torch.inference_mode`, as a function of nothing (for the timer)."""
    def run() -> Any:
        with torch.inference_mode():
            return forward(x)
    return run


def ms(timing: Timing) -> float:
    return timing.median_s * 1e3


def bench_throughput(preset: Preset, bench: Bench) -> List[Dict[str, Any]]:
    rows = []
    for model_name, input_size, batch in bench.bar(preset.throughput, 'throughput'):
        model = create_model(model_name, bench.device).eval()
        backbone_name, backbone = create_backbone(model_name, bench.device)
        backbone.eval()
        x = images(batch, input_size, bench.device)
        timings = bench.time_interleaved({'lossattn': inference(model, x), 'backbone': inference(backbone, x)})
        model_gflops = gflops(lambda d: create_model(model_name, d), input_size)
        backbone_gflops = gflops(lambda d: create_backbone(model_name, d)[1], input_size)
        grid = model.patch_geometry(input_size).grid_size
        rows.append(dict(
            model=model_name, backbone=backbone_name, input_size=input_size, batch=batch, patch_grid=list(grid),
            lossattn_ms=ms(timings['lossattn']), backbone_ms=ms(timings['backbone']),
            time_ratio=timings['lossattn'].median_s / timings['backbone'].median_s,
            lossattn_images_per_s=batch / timings['lossattn'].median_s,
            backbone_images_per_s=batch / timings['backbone'].median_s,
            lossattn_gflops=model_gflops, backbone_gflops=backbone_gflops, flop_ratio=model_gflops / backbone_gflops,
        ))
    return rows


def bench_head(preset: Preset, bench: Bench) -> List[Dict[str, Any]]:
    rows = []
    for model_name, batch in bench.bar(preset.head, 'head'):
        base = create_model(model_name, bench.device, pool='lossattn').eval()
        state = base.state_dict()
        capsule_head = base.head_type == 'caps'
        models = {}
        for pool in preset.head_pools:
            if pool == 'routing' and not capsule_head:
                continue
            model = base if pool == 'lossattn' else create_model(model_name, bench.device, pool=pool).eval()
            own = model.state_dict()
            model.load_state_dict({k: v for k, v in state.items() if k in own and own[k].shape == v.shape},
                                  strict=False)  # same trunk and patch head weights
            models[pool] = model
        x = images(batch, 32, bench.device)
        with torch.inference_mode():
            trunk_map = base.forward_features(x)
            instances = base.patch_head(trunk_map)
        fns = {}
        for pool, model in models.items():
            fns[f'{pool}/forward'] = inference(model, x)
            fns[f'{pool}/head'] = inference(model.forward_head, trunk_map)
            fns[f'{pool}/pool'] = inference(model.head, instances)
        timings = bench.time_interleaved(fns)
        mean_forward, mean_pool = timings['mean/forward'].median_s, timings['mean/pool'].median_s
        for pool in models:
            forward = timings[f'{pool}/forward'].median_s
            rows.append(dict(
                model=model_name, batch=batch, input_size=32, pool=pool,
                forward_ms=forward * 1e3, forward_iqr_pct=timings[f'{pool}/forward'].iqr_s / forward * 100,
                head_ms=ms(timings[f'{pool}/head']), pool_ms=ms(timings[f'{pool}/pool']),
                extra_vs_mean_pct=(forward / mean_forward - 1) * 100,
                pool_extra_vs_mean_pct=(timings[f'{pool}/pool'].median_s - mean_pool) / mean_forward * 100,
            ))
    return rows


def bench_explain(preset: Preset, bench: Bench) -> List[Dict[str, Any]]:
    rows = []
    for model_name, batch in bench.bar(preset.explain, 'explain'):
        model = create_model(model_name, bench.device).eval()
        x = images(batch, 32, bench.device)
        timings = bench.time_interleaved({
            'explain': lambda: explain(model, x),
            'gradcam': lambda: gradcam(model, x),
            'forward': inference(model, x),
        })
        rows.append(dict(
            model=model_name, batch=batch, input_size=32,
            explain_ms=ms(timings['explain']), gradcam_ms=ms(timings['gradcam']), forward_ms=ms(timings['forward']),
            speedup=timings['gradcam'].median_s / timings['explain'].median_s,
        ))
    return rows


def train_step(
        model: nn.Module,
        x: torch.Tensor,
        target: torch.Tensor,
        variant: TrainVariant,
        device: torch.device,
) -> Callable[[], torch.Tensor]:
    """One SGD step on a fixed batch: forward, LossAttentionLoss (patch term at full weight), backward, update."""
    model.set_grad_checkpointing(variant.checkpointing)
    if variant.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = LossAttentionLoss()
    forward = torch.compile(model) if variant.compiled else model

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant.amp):
            loss = criterion(forward(x), target, epoch=criterion.rampup_epochs)
        loss.backward()
        optimizer.step()
        return loss
    return step


def bench_train(preset: Preset, bench: Bench) -> List[Dict[str, Any]]:
    rows = []
    for model_name, batch, variants in bench.bar(preset.train, 'train'):
        base = create_model(model_name, bench.device).train()
        x = images(batch, 32, bench.device)
        target = torch.randint(0, NUM_CLASSES, (batch,), device=bench.device)
        steps, first_step_s, errors = {}, {}, {}
        for name in variants:
            step = train_step(copy.deepcopy(base), x, target, TRAIN_VARIANTS[name], bench.device)
            if TRAIN_VARIANTS[name].compiled:
                try:  # compiling needs a toolchain (inductor: a C++ compiler on CPU, triton on GPU)
                    with inductor_config.patch(force_disable_caches=True):  # a cold compile, as on a fresh machine
                        first_step_s[name] = bench.call_time(step)
                except Exception as e:  # noqa: BLE001  (recorded in the results instead of ending the run)
                    errors[name] = f'{type(e).__name__}: {(str(e).strip().splitlines() or [""])[0]}'
                    continue
            else:
                first_step_s[name] = bench.call_time(step)
            steps[name] = step
        timings = bench.time_interleaved(steps)
        eager = timings['eager'].median_s if 'eager' in timings else None
        for name in variants:
            variant = TRAIN_VARIANTS[name]
            row = dict(
                model=model_name, batch=batch, input_size=32, variant=name, **asdict(variant),
                amp_dtype='bfloat16' if variant.amp else None, step_ms=None, images_per_s=None, vs_eager=None,
                first_step_s=first_step_s.get(name), compile_s=None, error=errors.get(name),
            )
            if name in timings:
                timing = timings[name]
                row.update(
                    step_ms=ms(timing), images_per_s=batch / timing.median_s,
                    vs_eager=None if eager is None else timing.median_s / eager,
                    compile_s=first_step_s[name] - timing.median_s if variant.compiled else None,
                )
            rows.append(row)
    return rows


def saved_activation_bytes(model: nn.Module, forward_loss: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd saves for backward while `forward_loss` runs, over distinct storages.

    Parameters and buffers are excluded (they exist anyway). Inside a checkpointed segment torch.utils.checkpoint
    installs its own hooks and keeps only the segment's input, so only what checkpointing keeps is counted.
    """
    kept = {t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())}
    sizes: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in kept:
            sizes[storage.data_ptr()] = storage.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        forward_loss()
    return sum(sizes.values())


def cuda_step_peak_bytes(step: Callable[[], torch.Tensor], device: torch.device) -> int:
    """Peak bytes allocated during one step above what was allocated before it."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def memory_measure(device: torch.device) -> str:
    if device.type == 'cuda':
        return 'CUDA peak allocated during a training step above the memory allocated before it'
    return 'bytes saved for backward in the forward and loss (saved_tensors_hooks, distinct storages, no parameters)'


def bench_memory(preset: Preset, bench: Bench) -> List[Dict[str, Any]]:
    rows = []
    criterion = LossAttentionLoss()
    for model_name, batch in bench.bar(preset.memory, 'memory'):
        x = images(batch, 32, bench.device)
        target = torch.randint(0, NUM_CLASSES, (batch,), device=bench.device)
        measured = {}
        for checkpointing in (False, True):
            model = create_model(model_name, bench.device).train()
            step = train_step(model, x, target, TrainVariant(checkpointing=checkpointing), bench.device)
            step()  # allocates gradients and optimizer state; shows the backward runs
            if bench.device.type == 'cuda':
                measured[checkpointing] = cuda_step_peak_bytes(step, bench.device)
            else:
                measured[checkpointing] = saved_activation_bytes(
                    model, lambda: criterion(model(x), target, epoch=criterion.rampup_epochs))
        rows.append(dict(
            model=model_name, batch=batch, input_size=32, measure=memory_measure(bench.device),
            without_checkpointing_mib=measured[False] / 2 ** 20, with_checkpointing_mib=measured[True] / 2 ** 20,
            saving_pct=(1 - measured[True] / measured[False]) * 100,
        ))
    return rows


def bench_input_size(preset: Preset, bench: Bench) -> List[Dict[str, Any]]:
    rows = []
    for model_name, batch, sizes in bench.bar(preset.input_sizes, 'input_size'):
        model = create_model(model_name, bench.device).eval()
        inputs = {size: images(batch, size, bench.device) for size in sizes}
        timings = bench.time_interleaved({str(size): inference(model, x) for size, x in inputs.items()})
        for size in sizes:
            grid = model.patch_geometry(size).grid_size
            timing = timings[str(size)]
            rows.append(dict(
                model=model_name, batch=batch, input_size=size, patch_grid=list(grid), patches=grid[0] * grid[1],
                forward_ms=ms(timing), ms_per_image=ms(timing) / batch, images_per_s=batch / timing.median_s,
                gflops_per_image=gflops(lambda d: create_model(model_name, d), size),
            ))
    return rows


def bench_strides(preset: Preset, bench: Bench) -> List[Dict[str, Any]]:
    rows = []
    for model_name, batch, input_size in bench.bar(preset.strides, 'strides'):
        x = images(batch, input_size, bench.device)
        fns, models = {}, {}
        for strides in STRIDE_PATTERNS:
            model = create_model(model_name, bench.device, stage_strides=strides).eval()
            models[strides] = model
            if input_size >= model.min_input_size:
                fns[str(strides)] = inference(model, x)
        timings = bench.time_interleaved(fns)
        for strides, model in models.items():
            row = dict(
                model=model_name, batch=batch, input_size=input_size, stage_strides=list(strides),
                stride2_stages=strides.count(2), trunk_map=input_size // 2 ** strides.count(2),
                min_input_size=model.min_input_size, patch_grid=None, patches=None, forward_ms=None,
                ms_per_image=None, gflops_per_image=None,
            )
            if str(strides) in timings:
                grid = model.patch_geometry(input_size).grid_size
                timing = timings[str(strides)]
                row.update(
                    patch_grid=list(grid), patches=grid[0] * grid[1], forward_ms=ms(timing),
                    ms_per_image=ms(timing) / batch,
                    gflops_per_image=gflops(lambda d: create_model(model_name, d, stage_strides=strides), input_size),
                )
            rows.append(row)
    return rows


BENCHES: Dict[str, Callable[[Preset, Bench], List[Dict[str, Any]]]] = {
    'throughput': bench_throughput,
    'head': bench_head,
    'explain': bench_explain,
    'train': bench_train,
    'memory': bench_memory,
    'input_size': bench_input_size,
    'strides': bench_strides,
}


def targets(sections: Dict[str, List[Dict[str, Any]]]) -> List[Dict[str, Any]]:
    """Each target with its worst measured row."""
    out = []
    head = [r for r in sections.get('head', []) if r['pool'] == 'lossattn']
    if head:
        worst = max(head, key=lambda r: r['pool_extra_vs_mean_pct'])
        out.append(dict(
            name='loss-attention pool vs mean pool, extra time of the whole forward (pools timed alone)',
            goal=f'<= {HEAD_OVERHEAD_TARGET_PCT:g} %', measured=worst['pool_extra_vs_mean_pct'], unit='%',
            where=f'{worst["model"]}, batch {worst["batch"]}',
            met=all(r['pool_extra_vs_mean_pct'] <= HEAD_OVERHEAD_TARGET_PCT for r in head)))
    explained = sections.get('explain', [])
    if explained:
        worst = min(explained, key=lambda r: r['speedup'])
        out.append(dict(
            name='explanation vs Grad-CAM, speed-up', goal=f'>= {EXPLAIN_SPEEDUP_TARGET:g}x',
            measured=worst['speedup'], unit='x', where=f'{worst["model"]}, batch {worst["batch"]}',
            met=all(r['speedup'] >= EXPLAIN_SPEEDUP_TARGET for r in explained)))
    memory = sections.get('memory', [])
    if memory:
        worst = min(memory, key=lambda r: r['saving_pct'])
        out.append(dict(
            name='gradient checkpointing, training memory saved', goal=f'>= {MEMORY_SAVING_TARGET_PCT:g} %',
            measured=worst['saving_pct'], unit='%', where=f'{worst["model"]}, batch {worst["batch"]}',
            met=all(r['saving_pct'] >= MEMORY_SAVING_TARGET_PCT for r in memory)))
    return out


def others_cpu_share(seconds: float = 1.0) -> Optional[float]:
    """Share of all CPUs busy over `seconds` while this process sleeps: the load of other processes (Linux only).

    Read from /proc/stat; None where it does not exist.
    """
    def busy_and_total() -> Tuple[int, int]:
        with open('/proc/stat', encoding='utf-8') as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return sum(ticks) - ticks[3] - ticks[4], sum(ticks)

    try:
        busy_start, total_start = busy_and_total()
        time.sleep(seconds)
        busy_end, total_end = busy_and_total()
    except (OSError, ValueError):
        return None
    return (busy_end - busy_start) / max(total_end - total_start, 1)


def others_text(share: Dict[str, Optional[float]]) -> str:
    if share['before'] is None or share['after'] is None:
        return 'The load of other processes was not measured (no /proc/stat).'
    return (f'Other processes kept {share["before"]:.0%} of the CPUs busy in the second before the run and '
            f'{share["after"]:.0%} in the second after it (above a few %, they competed with the timings).')


def fmt(value: Optional[float]) -> str:
    """About three significant digits (two decimals below 10, two digits below 0.01); '-' for a missing value."""
    if value is None:
        return '-'
    if abs(value) >= 100:
        return f'{value:.0f}'
    if abs(value) >= 10:
        return f'{value:.1f}'
    if abs(value) >= 0.01 or value == 0:
        return f'{value:.2f}'
    return f'{value:.2g}'


def grid_text(grid: Optional[List[int]]) -> str:
    return '-' if grid is None else f'{grid[0]}x{grid[1]}'


def markdown(preset_name: str, payload: Dict[str, Any]) -> str:
    sections = payload['sections']
    md = [f'# Speed and memory, `{preset_name}` preset\n\n', environment_md(payload['environment']), '\n',
          f'{payload["method"]["timing"]}\n\nWall time of the run: {payload["wall_time_s"]:.0f} s. '
          f'{others_text(payload["others_cpu_share"])}\n\n']
    if payload['targets']:
        md += ['## Targets\n\n', markdown_table(
            ['target', 'goal', 'measured (worst row)', 'worst row', 'status'],
            [[t['name'], t['goal'], f'{fmt(t["measured"])} {t["unit"]}', t['where'], 'met' if t['met'] else 'missed']
             for t in payload['targets']], align='llrll'), '\n']
    rows = sections.get('throughput')
    if rows:
        md += ['## Forward throughput against the unmodified timm backbone\n\n',
               'Inference forward of the whole model (eval, `torch.inference_mode`); the backbone is the timm model '
               'as built by timm, with its strides, max-pool and classifier (VGG: its 4096-wide pre-logits). '
               'Ratio > 1: the stride-free loss-attention model is slower. GFLOPs of one image.\n\n',
               markdown_table(
                   ['model', 'backbone', 'input', 'batch', 'grid', 'lossattn ms', 'backbone ms', 'time ratio',
                    'lossattn img/s', 'GFLOPs lossattn / backbone'],
                   [[f'`{r["model"]}`', f'`{r["backbone"]}`', r['input_size'], r['batch'], grid_text(r['patch_grid']),
                     fmt(r['lossattn_ms']), fmt(r['backbone_ms']), fmt(r['time_ratio']),
                     fmt(r['lossattn_images_per_s']), f'{fmt(r["lossattn_gflops"])} / {fmt(r["backbone_gflops"])}']
                    for r in rows], align='llrrlrrrrr'), '\n']
    rows = sections.get('head')
    if rows:
        md += ['## Loss-attention head against mean pooling on the same trunk\n\n',
               'Same trunk and patch-head weights, 32x32 input. `forward`: the whole model (its spread: interquartile '
               'range of the timed blocks); `head`: `forward_head` on a precomputed trunk map (patch head + pool); '
               '`pool`: the pool alone on precomputed patch instances. Extra time against mean pooling, in % of the '
               'whole mean-pool forward: from the whole forwards, and from the pools timed alone, where the models '
               'differ (the target\'s measure: the whole-forward difference is within the forward\'s spread). '
               f'Target for `lossattn`: <= {HEAD_OVERHEAD_TARGET_PCT:g} %.\n\n',
               markdown_table(
                   ['model', 'batch', 'pool', 'forward ms', 'spread %', 'head ms', 'pool ms', 'extra % (forwards)',
                    'extra % (pools alone)'],
                   [[f'`{r["model"]}`', r['batch'], r['pool'], fmt(r['forward_ms']), fmt(r['forward_iqr_pct']),
                     fmt(r['head_ms']), f'{r["pool_ms"]:.3f}', fmt(r['extra_vs_mean_pct']),
                     fmt(r['pool_extra_vs_mean_pct'])] for r in rows], align='lrlrrrrrr'), '\n']
    rows = sections.get('explain')
    if rows:
        md += ['## One explanation against Grad-CAM\n\n',
               '`explain()` (one forward: logits, patch weights upsampled to the image, selected patches, box) '
               'against `gradcam()` (forward and backward, the grad-cam package) on the same model and batch at '
               f'32x32; the plain forward for reference. Target: >= {EXPLAIN_SPEEDUP_TARGET:g}x.\n\n',
               markdown_table(
                   ['model', 'batch', 'explain ms', 'Grad-CAM ms', 'forward ms', 'speed-up'],
                   [[f'`{r["model"]}`', r['batch'], fmt(r['explain_ms']), fmt(r['gradcam_ms']), fmt(r['forward_ms']),
                     f'{fmt(r["speedup"])}x'] for r in rows]), '\n']
    rows = sections.get('train')
    if rows:
        md += ['## Training step\n\n',
               'Forward, `LossAttentionLoss`, backward and SGD step on a fixed batch at 32x32. AMP: bf16 autocast. '
               'The compile time (first step minus a step, inductor\'s caches disabled: a cold compile) is not in '
               'the step time.\n\n',
               markdown_table(
                   ['model', 'batch', 'variant', 'ms / step', 'img/s', 'vs eager', 'compile s'],
                   [[f'`{r["model"]}`', r['batch'], r['variant'], fmt(r['step_ms']), fmt(r['images_per_s']),
                     fmt(r['vs_eager']), fmt(r['compile_s'])] for r in rows], align='lrlrrrr'), '\n']
        md += [f'`{r["model"]}` {r["variant"]} failed: {r["error"]}\n\n' for r in rows if r['error']]
    rows = sections.get('memory')
    if rows:
        md += ['## Training memory with gradient checkpointing\n\n',
               f'Measure: {rows[0]["measure"]}. Checkpointing: one segment per trunk block (ResNet) or stage (VGG). '
               f'Target: >= {MEMORY_SAVING_TARGET_PCT:g} % less.\n\n',
               markdown_table(
                   ['model', 'batch', 'without MiB', 'with MiB', 'saved %'],
                   [[f'`{r["model"]}`', r['batch'], fmt(r['without_checkpointing_mib']),
                     fmt(r['with_checkpointing_mib']), fmt(r['saving_pct'])] for r in rows]), '\n']
    rows = sections.get('input_size')
    if rows:
        md += ['## Cost against the input size\n\n', 'Default stage strides (all 1, the paper\'s).\n\n',
               markdown_table(
                   ['model', 'batch', 'input', 'grid', 'patches', 'ms / image', 'GFLOPs / image'],
                   [[f'`{r["model"]}`', r['batch'], r['input_size'], grid_text(r['patch_grid']), r['patches'],
                     fmt(r['ms_per_image']), fmt(r['gflops_per_image'])] for r in rows], align='lrrlrrr'), '\n']
    rows = sections.get('strides')
    if rows:
        md += ['## Cost against the stride-2 stages kept (paper Table VII)\n\n',
               'Each stage of the ResNet trunk with stride 1 or 2; `-`: the trunk map is smaller than the patch '
               'kernel at this input size.\n\n',
               markdown_table(
                   ['model', 'input', 'stage strides', 'trunk map', 'grid', 'ms / image', 'GFLOPs / image'],
                   [[f'`{r["model"]}`', r['input_size'], ''.join(str(s) for s in r['stage_strides']),
                     r['trunk_map'], grid_text(r['patch_grid']), fmt(r['ms_per_image']), fmt(r['gflops_per_image'])]
                    for r in rows], align='lrlrlrr'), '\n']
    return ''.join(md)


def plain_log_scale(ax, which: str) -> None:
    """Log scale on the 'x' or 'y' axis of `ax`, ticks at 1, 2, 5 x 10^n written as plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    getattr(ax, f'set_{which}scale')('log')
    axis = ax.xaxis if which == 'x' else ax.yaxis
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f'{value:g}'))
    axis.set_minor_formatter(NullFormatter())


def plot_lines(
        rows: List[Dict[str, Any]],
        x_key: str,
        x_label: str,
        series_keys: Sequence[str],
        panels: Sequence[Tuple[str, str]],
        title: str,
        path: Path,
) -> None:
    """One panel per (row key, label), a line per series (rows sharing `series_keys`), log y."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), layout='constrained')
    series: Dict[str, List[Dict[str, Any]]] = {}
    for row in rows:
        label = ', '.join(str(row[k]).removeprefix('lossattn_') for k in series_keys)
        series.setdefault(label, []).append(row)
    for ax, (y_key, y_label) in zip(axes, panels):
        for label, points in series.items():
            points = [p for p in points if p[y_key] is not None]
            ax.plot([p[x_key] for p in points], [p[y_key] for p in points], marker='o', label=label)
        ax.set_xlabel(x_label)
        ax.set_ylabel(y_label)
        plain_log_scale(ax, 'y')
        ax.set_xticks(sorted({row[x_key] for row in rows}))
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(labels: Sequence[str], values: Sequence[float], x_label: str, title: str, path: Path,
              reference: Optional[float] = None) -> None:
    """Horizontal bars, one per label, log x."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(labels) + 1.2), layout='constrained')
    ax.barh(range(len(labels)), values, color='tab:blue')
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    plain_log_scale(ax, 'x')
    if reference is not None:
        ax.axvline(reference, color='black', linewidth=0.8)
    ax.set_xlabel(x_label)
    ax.set_title(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(sections: Dict[str, List[Dict[str, Any]]], out_dir: Path, stem: str) -> List[Path]:
    written = []
    if sections.get('input_size'):
        path = out_dir / f'{stem}_input_size.png'
        plot_lines(sections['input_size'], 'input_size', 'input size (px)', ('model', 'batch'),
                   [('ms_per_image', 'ms / image'), ('gflops_per_image', 'GFLOPs / image'), ('patches', 'patches')],
                   'Cost against the input size', path)
        written.append(path)
    if sections.get('strides'):
        path = out_dir / f'{stem}_strides.png'
        plot_lines(sections['strides'], 'stride2_stages', 'stride-2 stages kept', ('model', 'input_size'),
                   [('ms_per_image', 'ms / image'), ('gflops_per_image', 'GFLOPs / image'), ('patches', 'patches')],
                   'Cost against the stride-2 stages kept (model, input size)', path)
        written.append(path)
    if sections.get('throughput'):
        path = out_dir / f'{stem}_throughput.png'
        rows = sections['throughput']
        plot_bars([f'{r["model"].removeprefix("lossattn_")} {r["input_size"]}px b{r["batch"]}' for r in rows],
                  [r['time_ratio'] for r in rows], 'forward time, lossattn / unmodified timm backbone',
                  'What removing the strides costs', path, reference=1.0)
        written.append(path)
    if sections.get('train'):
        path = out_dir / f'{stem}_train.png'
        rows = [r for r in sections['train'] if r['step_ms'] is not None]
        plot_bars([f'{r["model"].removeprefix("lossattn_")} b{r["batch"]} {r["variant"]}' for r in rows],
                  [r['step_ms'] for r in rows], 'ms / training step', 'Training step', path)
        written.append(path)
    return written


def run(
        preset_name: str,
        sections: Sequence[str],
        device: torch.device,
        threads: int,
        out_dir: Path,
        progress: bool,
) -> List[Path]:
    """Measure the sections of a preset and write the JSON, markdown and plots; returns the written paths."""
    preset = PRESETS[preset_name]
    bench = Bench(device, threads, preset.repeats, preset.block_time, progress)
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    busy_before = others_cpu_share()
    if busy_before is not None and busy_before > 0.1:
        print(f'warning: other processes keep {busy_before:.0%} of the CPUs busy: they compete with the timings '
              '(an idle machine gives the numbers to keep)', file=sys.stderr)
    start = time.perf_counter()
    results = {name: BENCHES[name](preset, bench) for name in sections}
    payload = dict(
        preset=preset_name,
        environment=environment(device, threads),
        method=dict(
            timing=(f'Timing: `torch.utils.benchmark.Timer`, {threads} torch threads, two warm-up calls, then the '
                    f'median of {preset.repeats} blocks of about {preset.block_time:g} s per function, the '
                    'functions of a row interleaved block by block; ratios are taken within a row.'
                    + (' cudnn.benchmark on.' if device.type == 'cuda' else '')),
            memory=memory_measure(device),
        ),
        settings=asdict(preset),
        targets=targets(results),
        sections=results,
        wall_time_s=time.perf_counter() - start,
        others_cpu_share=dict(before=busy_before, after=others_cpu_share()),
    )
    stem = f'speed_{preset_name}'
    written = write_results(out_dir, stem, payload, markdown(preset_name, payload))
    return written + write_plots(results, out_dir, stem)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--preset', choices=sorted(PRESETS), default='cpu')
    parser.add_argument('--sections', nargs='+', choices=SECTIONS, default=list(SECTIONS), metavar='SECTION',
                        help=f'subset of {", ".join(SECTIONS)} (default: all)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, default=None,
                        help='torch CPU threads (default: 2 on CPU, torch\'s choice with a GPU)')
    parser.add_argument('--out', type=Path, default=RESULTS_DIR)
    parser.add_argument('--no-progress', action='store_true')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: no CUDA device is available')
    threads = args.threads if args.threads is not None else (2 if device.type == 'cpu' else torch.get_num_threads())
    if threads < 1:
        parser.error(f'--threads must be >= 1, got {threads}')
    torch.set_num_threads(threads)
    sections = [s for s in SECTIONS if s in args.sections]
    start = time.perf_counter()
    written = run(args.preset, sections, device, threads, args.out, not args.no_progress)
    print(f'finished in {time.perf_counter() - start:.0f} s; wrote:\n  ' + '\n  '.join(str(p) for p in written))
    return 0


if __name__ == '__main__':
    sys.exit(main())
