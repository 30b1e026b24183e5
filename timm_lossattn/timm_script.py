""" Run timm's own train.py / validate.py on loss-attention models, unmodified

    python -m timm_lossattn.timm_script [LAUNCHER OPTIONS] PATH/TO/train.py [train.py arguments]
    torchrun --nproc_per_node=2 -m timm_lossattn.timm_script PATH/TO/train.py [train.py arguments]
    python -m timm_lossattn.timm_script PATH/TO/validate.py [validate.py arguments]

train.py and validate.py live in timm's repository, not in its wheel: take the ones of the installed version
(`git show v$(python -c "import timm; print(timm.__version__)"):train.py` in a clone of
https://github.com/huggingface/pytorch-image-models).

The launcher imports this package (registering the `lossattn_*` models), then, for a training script, replaces
`timm.task.ClassificationTask` by `LossAttnTask` (loss-based attention loss; `--bce-loss` gives the multi-label
loss, `--smoothing`, `--mixup` and `--cutmix` targets are honoured) and links `timm.scheduler.create_scheduler_v2`'s
scheduler to the task, so the ramp-up follows the epoch (also on `--resume` and `--start-epoch`). For any other script
(validate.py, inference.py, benchmark.py) loss-attention models created through `timm.models.create_model` return
plain logits. The script then runs with `runpy.run_path(script, run_name='__main__')`.
"""
import argparse
import functools
import os
import runpy
import sys
from typing import Any, List, Optional

__all__ = ['install_train_hooks', 'install_logits_hooks', 'main']


def install_train_hooks(gamma_max: float = 0.1, rampup_epochs: float = 80, rampup_coef: float = 5.0) -> type:
    """Make `timm.task.ClassificationTask` build `LossAttnTask`s whose epoch follows timm's LR scheduler.

    Args:
        gamma_max: Final weight of the patch term.
        rampup_epochs: Ramp-up length in epochs.
        rampup_coef: Ramp-up sharpness.

    Returns:
        The task class installed as `timm.task.ClassificationTask`.
    """
    import timm.scheduler
    import timm.task
    from .task import LossAttnTask

    tasks: List[LossAttnTask] = []

    class ScriptLossAttnTask(LossAttnTask):
        """`LossAttnTask` with the launcher's loss settings, registered for the scheduler link."""

        def __init__(self, *args: Any, **kwargs: Any):
            kwargs.setdefault('gamma_max', gamma_max)
            kwargs.setdefault('rampup_epochs', rampup_epochs)
            kwargs.setdefault('rampup_coef', rampup_coef)
            super().__init__(*args, **kwargs)
            tasks.append(self)

    create_scheduler_v2 = timm.scheduler.create_scheduler_v2

    @functools.wraps(create_scheduler_v2)
    def create_scheduler_v2_linked(*args: Any, **kwargs: Any):
        scheduler, num_epochs = create_scheduler_v2(*args, **kwargs)
        updates_per_epoch = kwargs.get('updates_per_epoch') or 0
        if scheduler is not None:
            step, step_update = scheduler.step, scheduler.step_update

            def step_linked(epoch: int, metric: Optional[float] = None) -> None:
                for task in tasks:
                    task.set_epoch(epoch)
                step(epoch, metric)

            def step_update_linked(num_updates: int, metric: Optional[float] = None) -> None:
                if updates_per_epoch:
                    for task in tasks:
                        task.set_epoch(num_updates // updates_per_epoch)
                step_update(num_updates, metric)

            scheduler.step, scheduler.step_update = step_linked, step_update_linked
        return scheduler, num_epochs

    timm.task.ClassificationTask = ScriptLossAttnTask
    timm.scheduler.create_scheduler_v2 = create_scheduler_v2_linked
    return ScriptLossAttnTask


def install_logits_hooks() -> None:
    """Make loss-attention models created by `timm.models.create_model` / `timm.create_model` return plain logits."""
    import timm
    import timm.models
    from .models import LossAttnNet

    create_model = timm.models.create_model

    @functools.wraps(create_model)
    def create_model_logits(*args: Any, **kwargs: Any):
        model = create_model(*args, **kwargs)
        if isinstance(model, LossAttnNet):
            model.return_patches = False
        return model

    timm.models.create_model = timm.create_model = create_model_logits


def _parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog='python -m timm_lossattn.timm_script',
        description='Run an unmodified timm script (train.py, validate.py) with the loss-attention models.')
    parser.add_argument('--mode', choices=('auto', 'train', 'logits'), default='auto',
                        help='train: LossAttnTask replaces ClassificationTask; logits: models return plain logits; '
                             'auto: train for scripts named train*.py, logits otherwise (default: auto)')
    parser.add_argument('--gamma-max', type=float, default=0.1, help='final weight of the patch loss (default: 0.1)')
    parser.add_argument('--rampup-epochs', type=float, default=80, help='ramp-up length in epochs (default: 80)')
    parser.add_argument('--rampup-coef', type=float, default=5.0, help='ramp-up sharpness (default: 5)')
    parser.add_argument('script', help="path of timm's train.py, validate.py, ...")
    parser.add_argument('script_args', nargs=argparse.REMAINDER, help='arguments passed on to the script')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    """Run the script; returns its exit code (0 when it returns normally)."""
    args = _parse_args(sys.argv[1:] if argv is None else list(argv))
    if not os.path.isfile(args.script):
        print(f'error: script not found: {args.script}', file=sys.stderr)
        return 2
    import timm_lossattn  # noqa: F401  registers the models
    mode = args.mode
    if mode == 'auto':
        mode = 'train' if os.path.basename(args.script).startswith('train') else 'logits'
    if mode == 'train':
        install_train_hooks(args.gamma_max, args.rampup_epochs, args.rampup_coef)
    else:
        install_logits_hooks()
    sys.argv = [args.script] + args.script_args
    sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
    try:
        runpy.run_path(args.script, run_name='__main__')
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
