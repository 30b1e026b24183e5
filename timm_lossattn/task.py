""" Loss-attention training task for timm's task-based training loops

`Loss-based Attention for Interpreting Image-level Prediction of Convolutional Neural Networks`
    - https://doi.org/10.1109/TIP.2020.3046875 (Shi et al., IEEE TIP 2021)

`LossAttnTask` is a `timm.task.ClassificationTask` whose loss is `LossAttentionLoss` (Eq. 9, or Eq. 10 with
`multi_label=True`). It returns the dict timm's `train.py` expects (`loss`, `output` = image logits) plus the parts
of the loss (`image_loss`, `patch_loss`, `gamma`) and the patch outputs, and logs the per-epoch means of the parts.

The ramp-up of the patch term needs the epoch: call `task.set_epoch(epoch)` at the start of every epoch (this
package's `train` command does). Stock timm `train.py` has no such call; `timm_lossattn.timm_script` links the
learning-rate scheduler to the task so each `scheduler.step(epoch)` / `step_update(num_updates)` also sets it.
"""
import logging
from typing import Any, Callable, Dict, Optional, Union

import torch
import torch.nn as nn
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy
from timm.task import ClassificationTask

from .loss import LossAttentionLoss

__all__ = ['LossAttnTask']

_logger = logging.getLogger(__name__)


class LossAttnTask(ClassificationTask):
    """Forward pass plus `LossAttentionLoss`, with timm's target conventions.

    Targets: class indices (B,), or dense (B, K) targets from timm's Mixup / CutMix (soft labels, single-label) or a
    multi-hot dataset (multi-label). A timm criterion passed as `criterion` (what `train.py` builds from its flags)
    is read for its target handling and replaced by `LossAttentionLoss`:

    * `BinaryCrossEntropy` (`--bce-loss`): multi-label (Eq. 10); hard targets become dense targets with its
      smoothing (off = s / K, on = 1 - s + s / K), its `target_threshold` binarises them, as timm's BCE does.
    * `LabelSmoothingCrossEntropy` or `nn.CrossEntropyLoss(label_smoothing=s)`: hard targets become the smoothed
      distribution (1 - s) one_hot + s / K, which gives exactly timm's label-smoothing loss on the image term.
    * anything else (`SoftTargetCrossEntropy`, plain cross-entropy): targets are used as given.
    """

    def __init__(
            self,
            model: nn.Module,
            criterion: Optional[Union[nn.Module, Callable]] = None,
            multi_label: Optional[bool] = None,
            smoothing: Optional[float] = None,
            gamma_max: float = 0.1,
            rampup_epochs: float = 80,
            rampup_coef: float = 5.0,
            epoch: float = 0,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
            verbose: bool = True,
    ):
        """
        Args:
            model: A loss-attention model returning `LossAttnOutput` (`return_patches=True`).
            criterion: A `LossAttentionLoss` (used as is), a timm classification criterion (read as described in
                the class docstring), or None.
            multi_label: Force Eq. 10 (True) or Eq. 9 (False); None follows `criterion`.
            smoothing: Label smoothing of hard targets; None follows `criterion`.
            gamma_max: Final weight of the patch term (ignored when `criterion` is a `LossAttentionLoss`).
            rampup_epochs: Ramp-up length in epochs (idem).
            rampup_coef: Ramp-up sharpness (idem).
            epoch: Initial epoch of the ramp-up.
            device: Device for task tensors.
            dtype: Dtype for task tensors.
            verbose: Log the criterion and the per-epoch means of the loss parts.
        """
        target_threshold = None
        if isinstance(criterion, LossAttentionLoss):
            loss = criterion
            if multi_label is not None and multi_label != loss.multi_label:
                raise ValueError(
                    f'multi_label={multi_label} contradicts the criterion (multi_label={loss.multi_label})')
        else:
            if isinstance(criterion, BinaryCrossEntropy):
                multi_label = True if multi_label is None else multi_label
                smoothing = criterion.smoothing if smoothing is None else smoothing
                target_threshold = criterion.target_threshold
            elif isinstance(criterion, (LabelSmoothingCrossEntropy, nn.CrossEntropyLoss)) and smoothing is None:
                smoothing = getattr(criterion, 'smoothing', getattr(criterion, 'label_smoothing', 0.))
            loss = LossAttentionLoss(
                multi_label=bool(multi_label), gamma_max=gamma_max, rampup_epochs=rampup_epochs,
                rampup_coef=rampup_coef)
        smoothing = float(smoothing or 0.)
        if not 0. <= smoothing < 1.:
            raise ValueError(f'smoothing must lie in [0, 1), got {smoothing}')
        super().__init__(model, criterion=loss, device=device, dtype=dtype, verbose=verbose)
        self.smoothing = smoothing
        self.target_threshold: Optional[float] = target_threshold
        self.multi_label = loss.multi_label
        self.epoch = epoch
        self._part_sums: Dict[str, torch.Tensor] = {}
        self._part_count = 0

    def set_epoch(self, epoch: float) -> None:
        """Set the epoch of the ramp-up; logs the mean loss parts of the previous epoch when it changes."""
        if epoch != self.epoch:
            self.log_parts()
        self.epoch = epoch

    def parts_summary(self, reset: bool = True) -> Dict[str, float]:
        """Mean `loss`, `image_loss`, `patch_loss` over the training steps since the last reset, and `gamma`."""
        summary = {k: float(v) / self._part_count for k, v in self._part_sums.items()} if self._part_count else {}
        summary['gamma'] = self.criterion.gamma(self.epoch)
        if reset:
            self._part_sums, self._part_count = {}, 0
        return summary

    def log_parts(self) -> None:
        """Log (when verbose) and reset the running means of the loss parts."""
        if self._part_count and self.verbose:
            steps = self._part_count
            parts = self.parts_summary()
            _logger.info(
                f'{type(self).__name__} epoch {self.epoch}: loss {parts["loss"]:.4f} = image {parts["image_loss"]:.4f}'
                f' + gamma {parts["gamma"]:.4g} x patch {parts["patch_loss"]:.4f} (means over {steps} steps)')
        self._part_sums, self._part_count = {}, 0

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """The ramp-up epoch, saved with timm checkpoints."""
        return {} if ema else {'epoch': self.epoch}

    def load_task_state(
            self,
            state: Optional[Dict[str, Any]],
            strict: bool = True,
            module: Optional[nn.Module] = None,
            ema: bool = False,
    ) -> None:
        """Restore the ramp-up epoch."""
        if state and 'epoch' in state:
            self.epoch = state['epoch']

    def prepare_target(self, target: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Targets as `LossAttentionLoss` takes them: indices (B,) or dense (B, K), smoothed and thresholded."""
        if target.dim() == 1:
            if self.multi_label or self.smoothing:
                off_value = self.smoothing / num_classes
                on_value = 1. - self.smoothing + off_value
                target = torch.full(
                    (target.shape[0], num_classes), off_value, device=target.device,
                ).scatter_(1, target.long().view(-1, 1), on_value)
        if self.multi_label and self.target_threshold is not None:
            target = target.gt(self.target_threshold).float()
        return target

    def forward(
            self,
            input: torch.Tensor,
            target: torch.Tensor,
    ) -> Dict[str, Any]:
        """Forward pass and loss.

        Args:
            input: Input tensor [B, C, H, W].
            target: Class indices [B] or dense targets [B, K].

        Returns:
            Dict with `loss` (differentiable), `output` (image logits), `image_loss`, `patch_loss` (detached),
            `gamma` (float), `patch_weights` and `patch_logits`.
        """
        output = self.trainable_module(input)
        if not isinstance(output, tuple) or len(output) != 3:
            raise TypeError(
                f'{type(self).__name__} needs a loss-attention model returning (logits, patch_weights, patch_logits); '
                f'got {type(output).__name__}. Create the model with return_patches=True (the default).')
        logits, patch_weights, patch_logits = output
        parts = self.criterion.forward_parts(output, self.prepare_target(target, logits.shape[-1]), self.epoch)
        if self.trainable_module.training and torch.is_grad_enabled():
            for name in ('loss', 'image_loss', 'patch_loss'):
                value = getattr(parts, name).detach()
                self._part_sums[name] = self._part_sums.get(name, 0.) + value
            self._part_count += 1
        return {
            'loss': parts.loss,
            'output': logits,
            'image_loss': parts.image_loss.detach(),
            'patch_loss': parts.patch_loss.detach(),
            'gamma': parts.gamma,
            'patch_weights': patch_weights,
            'patch_logits': patch_logits,
        }

    def create_evaluator(self, **kwargs):
        """timm's single- or multi-label classification evaluator, following the loss."""
        if self.multi_label:
            from timm.task import MultiLabelClassificationEvaluator
            return MultiLabelClassificationEvaluator(device=self.device, **kwargs)
        return super().create_evaluator(**kwargs)
