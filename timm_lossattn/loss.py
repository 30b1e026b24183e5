""" The loss of loss-based attention (Eq. 9 single-label, Eq. 10 multi-label) with its ramp-up

`Loss-based Attention for Interpreting Image-level Prediction of Convolutional Neural Networks`
    - https://doi.org/10.1109/TIP.2020.3046875 (Shi et al., IEEE TIP 2021)

    single: L = mean_i [ CE(z_i, y_i) + gamma(t) * sum_m a_im CE(p_im, y_i) ]
    multi:  L = mean_i [ sum_k BCE(z_ik, y_ik) + gamma(t) * sum_m a_im min_{k: y_ik = 1} -log sigmoid(p_imk) ]
    gamma(t) = gamma_max * exp(-coef * (1 - T)^2),  T = min(t / rampup_epochs, 1)

The paper's text prints exp(-(1 - T)^2); the authors' code and the ramp-up it cites (Laine & Aila 2017) use
coef = 5, the default here.
"""
import math
from typing import NamedTuple, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['LossAttentionLoss', 'LossAttnLossParts', 'rampup_weight']


class LossAttnLossParts(NamedTuple):
    """The loss and its parts, for logging.

    Attributes:
        loss: The total loss (scalar tensor, differentiable).
        image_loss: Mean image term (CE or summed BCE).
        patch_loss: Mean attention-weighted patch term, before multiplying by gamma.
        gamma: The ramp-up weight of the patch term at this epoch.
    """
    loss: torch.Tensor
    image_loss: torch.Tensor
    patch_loss: torch.Tensor
    gamma: float


def rampup_weight(epoch: float, gamma_max: float = 0.1, rampup_epochs: float = 80, coef: float = 5.0) -> float:
    """Gaussian ramp-up of the patch term: gamma_max * exp(-coef * (1 - T)^2), T = min(epoch / rampup_epochs, 1).

    Args:
        epoch: Training progress in epochs (fractions allowed), >= 0.
        gamma_max: Weight reached at the end of the ramp-up (paper: 0.1).
        rampup_epochs: Length of the ramp-up (paper: 80); 0 gives gamma_max from the start.
        coef: Sharpness of the ramp (authors' code: 5).

    Returns:
        The patch-term weight gamma.
    """
    if epoch < 0:
        raise ValueError(f'epoch must be >= 0, got {epoch}')
    progress = 1.0 if rampup_epochs == 0 else min(epoch / rampup_epochs, 1.0)
    return gamma_max * math.exp(-coef * (1.0 - progress) ** 2)


class LossAttentionLoss(nn.Module):
    """Image loss plus the ramped, attention-weighted patch loss (Eq. 9 / Eq. 10).

    Call it with the model output (`LossAttnOutput` or a `(logits, patch_weights, patch_logits)` tuple), the
    targets and the epoch: `loss = criterion(output, target, epoch=epoch)`. `forward_parts` returns the parts.

    Targets, single-label: class indices (B,) or class probabilities (B, K) (timm's mixup / cutmix / label
    smoothing). Multi-label: multi-hot (B, K) in [0, 1]; a class counts as present when its target is > 0.5, and an
    image with no present class contributes only its BCE term.
    """

    def __init__(
            self,
            multi_label: bool = False,
            gamma_max: float = 0.1,
            rampup_epochs: float = 80,
            rampup_coef: float = 5.0,
    ):
        """
        Args:
            multi_label: Use Eq. 10 (sigmoid / BCE) instead of Eq. 9 (softmax / CE).
            gamma_max: Final weight of the patch term (paper: 0.1); 0 trains the image term alone.
            rampup_epochs: Epochs of the Gaussian ramp-up (paper: 80).
            rampup_coef: Ramp sharpness (authors' code: 5).
        """
        super().__init__()
        for name, value in (('gamma_max', gamma_max), ('rampup_epochs', rampup_epochs), ('rampup_coef', rampup_coef)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f'{name} must be a finite number >= 0, got {value}')
        self.multi_label = multi_label
        self.gamma_max = gamma_max
        self.rampup_epochs = rampup_epochs
        self.rampup_coef = rampup_coef

    def gamma(self, epoch: float) -> float:
        """Weight of the patch term at `epoch` (see `rampup_weight`)."""
        return rampup_weight(epoch, self.gamma_max, self.rampup_epochs, self.rampup_coef)

    def _check(self, output: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, (tuple, list)) or len(output) != 3:
            raise TypeError(
                'LossAttentionLoss needs the model output (logits, patch_weights, patch_logits); got '
                f'{type(output).__name__}. Create the model with return_patches=True (the default).')
        logits, patch_weights, patch_logits = output
        B, K = logits.shape
        if patch_weights.dim() != 2 or patch_weights.shape[0] != B or patch_logits.shape[:2] != patch_weights.shape \
                or patch_logits.shape[2] != K:
            raise ValueError(
                f'inconsistent output shapes: logits {list(logits.shape)}, patch_weights '
                f'{list(patch_weights.shape)}, patch_logits {list(patch_logits.shape)}; expected (B, K), (B, M), '
                '(B, M, K)')
        if target.shape[0] != B:
            raise ValueError(f'batch size mismatch: {B} outputs but {target.shape[0]} targets')
        if self.multi_label or target.is_floating_point():
            if target.shape != (B, K):
                raise ValueError(f'expected {"multi-hot" if self.multi_label else "soft"} targets of shape '
                                 f'{[B, K]}, got {list(target.shape)}')
            return target.to(torch.float32)
        if target.dim() != 1:
            raise ValueError(f'expected class-index targets of shape [{B}], got {list(target.shape)}')
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= K):
            raise ValueError(f'class-index targets must lie in [0, {K - 1}], got range '
                             f'[{int(target.min())}, {int(target.max())}]')
        return F.one_hot(target.long(), K).to(torch.float32)

    def forward_parts(
            self,
            output: Sequence[torch.Tensor],
            target: torch.Tensor,
            epoch: float,
    ) -> LossAttnLossParts:
        """The loss and its parts (see the class docstring for the arguments)."""
        target = self._check(output, target)
        logits, patch_weights, patch_logits = (t.float() for t in output)
        gamma = self.gamma(epoch)
        if self.multi_label:
            image_loss = F.binary_cross_entropy_with_logits(logits, target, reduction='none').sum(1)
            present = target > 0.5  # (B, K)
            patch_nll = -F.logsigmoid(patch_logits)  # (B, M, K)
            patch_nll = patch_nll.masked_fill(~present.unsqueeze(1), torch.finfo(patch_nll.dtype).max)
            patch_nll = patch_nll.amin(2)
            patch_nll = torch.where(present.any(1, keepdim=True), patch_nll, torch.zeros_like(patch_nll))
        else:
            image_loss = -(target * logits.log_softmax(-1)).sum(-1)
            patch_nll = -(target.unsqueeze(1) * patch_logits.log_softmax(-1)).sum(-1)  # (B, M)
        patch_loss = (patch_weights * patch_nll).sum(1)
        image_loss, patch_loss = image_loss.mean(), patch_loss.mean()
        return LossAttnLossParts(image_loss + gamma * patch_loss, image_loss, patch_loss, gamma)

    def forward(
            self,
            output: Sequence[torch.Tensor],
            target: torch.Tensor,
            epoch: Union[int, float],
    ) -> torch.Tensor:
        """Total loss: image term + gamma(epoch) * patch term, averaged over the batch.

        Args:
            output: Model output `(logits, patch_weights, patch_logits)`.
            target: Class indices (B,), class probabilities (B, K) or multi-hot targets (B, K).
            epoch: Training progress in epochs, for the ramp-up.

        Returns:
            Scalar loss.
        """
        return self.forward_parts(output, target, epoch).loss
