""" Patch pooling: loss-based attention and the paper's baselines

Every pool takes patch instances `h` of shape (B, C, M, D) (C = 1 for the conv head, C capsule channels for the
capsule head, M patch locations, D feature dim), owns the classifier `fc` (theta^L), and returns
`(logits, pooled, patch_weights, patch_logits)`:
    logits        (B, K)     image logits
    pooled        (B, D)     the pre-logits feature, sum of instance weights times instances
    patch_weights (B, M)     >= 0, sum to 1 per image
    patch_logits  (B, M, K)  logits of each patch location

Loss-based attention is from `Loss-based Attention for Interpreting Image-level Prediction of Convolutional
Neural Networks` - https://doi.org/10.1109/TIP.2020.3046875 (Shi et al., IEEE TIP 2021), Eq. 5 and Eq. 6.
Attention and gated attention are from `Attention-based Deep Multiple Instance Learning` (Ilse et al., ICML 2018),
dynamic routing from `Dynamic Routing Between Capsules` (Sabour et al., NeurIPS 2017).
"""
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function

__all__ = [
    'POOL_TYPES', 'PatchPool', 'LossAttentionPool', 'MeanPool', 'AttentionPool', 'GatedAttentionPool',
    'DynamicRoutingPool', 'create_patch_pool', 'loss_attention_weights',
]

POOL_TYPES = ('lossattn', 'mean', 'attention', 'gated', 'routing')


def _normalize_or_uniform(scores: torch.Tensor, dims: List[int]) -> torch.Tensor:
    """Divide non-negative `scores` by their sum over `dims`; an all-zero slice becomes uniform (never NaN)."""
    total = scores.sum(dims, keepdim=True)
    count = 1
    for d in dims:
        count *= scores.shape[d]
    return torch.where(total > 0, scores / total.clamp_min(1e-30), 1.0 / count)


@register_notrace_function
def loss_attention_weights(
        patch_logits: torch.Tensor,
        xi: float = 0.1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Loss-based attention weights from instance logits (Eq. 5 for C == 1, Eq. 6 for capsules).

    The score of an instance is the l2 norm of its logits, normalised over all instances of the image. The
    location weight (sum over capsule channels) is thresholded at `xi / M` (the paper's threshold; the authors'
    code divides by the trunk map size instead, which disables it) and renormalised.

    For C == 1 (Eq. 5) the surviving weights are `max(a_m - xi / M, 0)` renormalised. For capsules (Eq. 6) the
    capsule weights at removed locations are zeroed and the rest renormalised.

    If the threshold removes every location (possible only for xi == 1 with all scores equal to 1 / M), the
    locations with the highest score share the weight, so at least one patch always survives. An image whose
    logits are all zero gets uniform weights. Weights are computed in float32.

    Args:
        patch_logits: Instance logits (B, C, M, K).
        xi: Threshold in [0, 1], in units of the uniform weight 1 / M.

    Returns:
        Instance weights (B, C, M) summing to 1 per image, and location weights (B, M) summing to 1.
    """
    logits = patch_logits.float()
    num_channels, num_patches = logits.shape[1], logits.shape[2]
    scores = torch.linalg.vector_norm(logits, dim=-1)  # (B, C, M)
    instance_weights = _normalize_or_uniform(scores, [1, 2])
    location_weights = instance_weights[:, 0] if num_channels == 1 else instance_weights.sum(1)  # (B, M)
    kept = F.relu(location_weights - xi / num_patches)
    best = location_weights == location_weights.amax(1, keepdim=True)
    kept_any = kept.sum(1, keepdim=True) > 0
    if num_channels == 1:
        kept = torch.where(kept_any, kept, best.to(kept.dtype))
        location_weights = kept / kept.sum(1, keepdim=True)
        return location_weights.unsqueeze(1), location_weights
    keep = torch.where(kept_any, kept > 0, best)
    instance_weights = instance_weights * keep.unsqueeze(1).to(instance_weights.dtype)
    instance_weights = instance_weights / instance_weights.sum((1, 2), keepdim=True)
    return instance_weights, instance_weights.sum(1)


@register_notrace_function
def location_logits(instance_logits: torch.Tensor, instance_weights: torch.Tensor) -> torch.Tensor:
    """Logits of each location: the instance-weight-weighted mean of its C instance logits, (B, M, K)."""
    if instance_logits.shape[1] == 1:
        return instance_logits[:, 0]
    weights = _normalize_or_uniform(instance_weights, [1])  # per location, over the C capsule channels
    weights = weights.to(instance_logits.dtype).transpose(1, 2).unsqueeze(2)  # (B, M, 1, C)
    return torch.matmul(weights, instance_logits.transpose(1, 2)).squeeze(2)  # (B, M, 1, C) @ (B, M, C, K)


class PatchPool(nn.Module):
    """Base of the patch pools: owns the classifier theta^L (`fc`), shared by attention and classification."""

    def __init__(
            self,
            in_features: int,
            num_classes: int,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_features: Instance feature dim D.
            num_classes: Number of classes K; 0 makes `fc` an identity (pooled features out).
        """
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.fc = self._make_classifier(num_classes, device=device, dtype=dtype)

    def _make_classifier(self, num_classes: int, device=None, dtype=None) -> nn.Module:
        if num_classes > 0:
            return nn.Linear(self.in_features, num_classes, device=device, dtype=dtype)
        return nn.Identity()

    def reset(self, num_classes: int, device=None, dtype=None) -> None:
        """Replace the classifier with a fresh one for `num_classes` classes (0: identity)."""
        self.num_classes = num_classes
        self.fc = self._make_classifier(num_classes, device=device, dtype=dtype)

    def _weighted_pool(
            self,
            h: torch.Tensor,
            instance_weights: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pool instances with given float32 weights (B, C, M): z = theta^L(sum a h) + b."""
        patch_logits = location_logits(self.fc(h), instance_weights)
        patch_weights = instance_weights.sum(1).to(patch_logits.dtype)
        pooled = torch.einsum('bcm,bcmd->bd', instance_weights.to(h.dtype), h)
        logits = self.fc(pooled)  # computed last: FX feature extraction takes the last node as the output
        return logits, pooled, patch_weights, patch_logits


class LossAttentionPool(PatchPool):
    """Loss-based attention pooling (Shi et al., Eq. 5 / Eq. 6): attention from the classifier's own logits.

    The image logits are z = sum_m a_m p_m with p_m = theta^L h_m, which equals theta^L(sum_m a_m h_m) + b since
    the weights sum to 1.
    """

    def __init__(
            self,
            in_features: int,
            num_classes: int,
            xi: float = 0.1,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_features: Instance feature dim D.
            num_classes: Number of classes K.
            xi: Threshold in [0, 1] that removes patches whose normalised score is below xi / M (Eq. 5).
        """
        super().__init__(in_features, num_classes, device=device, dtype=dtype)
        if not 0.0 <= xi <= 1.0:
            raise ValueError(f'xi must lie in [0, 1] (a fraction of the uniform weight 1/M), got {xi}')
        self.xi = float(xi)

    def forward(self, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        B, C, M, D = h.shape
        instance_logits = self.fc(h)  # (B, C, M, K)
        instance_weights, patch_weights = loss_attention_weights(instance_logits, self.xi)
        patch_weights = patch_weights.to(instance_logits.dtype)
        # sums over the C x M instances as batched matmuls (what einsum dispatches to, without its parsing)
        weights_row = instance_weights.reshape(B, 1, C * M)
        pooled = torch.matmul(weights_row.to(h.dtype), h.reshape(B, C * M, D)).squeeze(1)
        patch_logits = location_logits(instance_logits, instance_weights)
        logits = torch.matmul(weights_row, instance_logits.float().reshape(B, C * M, -1)).squeeze(1)
        return logits.to(instance_logits.dtype), pooled, patch_weights, patch_logits


class MeanPool(PatchPool):
    """Mean pooling over patches (a_m = 1 / M): the paper's plain baseline."""

    def forward(self, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        B, C, M, _ = h.shape
        weights = torch.full((B, C, M), 1.0 / (C * M), device=h.device, dtype=torch.float32)
        return self._weighted_pool(h, weights)


class AttentionPool(PatchPool):
    """Attention MIL pooling (Ilse et al. 2018): a = softmax_m(w^T tanh(V h_m)), z = theta^L(sum_m a_m h_m)."""

    def __init__(
            self,
            in_features: int,
            num_classes: int,
            attn_dim: int = 128,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_features: Instance feature dim D.
            num_classes: Number of classes K.
            attn_dim: Hidden size of the attention network (Ilse et al. use 128).
        """
        super().__init__(in_features, num_classes, device=device, dtype=dtype)
        self.attn_v = nn.Linear(in_features, attn_dim, device=device, dtype=dtype)
        self.attn_w = nn.Linear(attn_dim, 1, device=device, dtype=dtype)

    def _attention_scores(self, h: torch.Tensor) -> torch.Tensor:
        return self.attn_w(torch.tanh(self.attn_v(h))).squeeze(-1)

    def forward(self, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        scores = self._attention_scores(h).float()  # (B, C, M)
        B, C, M = scores.shape
        weights = scores.reshape(B, C * M).softmax(-1).reshape(B, C, M)
        return self._weighted_pool(h, weights)


class GatedAttentionPool(AttentionPool):
    """Gated attention MIL pooling (Ilse et al. 2018): a = softmax_m(w^T (tanh(V h_m) * sigmoid(U h_m)))."""

    def __init__(
            self,
            in_features: int,
            num_classes: int,
            attn_dim: int = 128,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_features: Instance feature dim D.
            num_classes: Number of classes K.
            attn_dim: Hidden size of the attention network.
        """
        super().__init__(in_features, num_classes, attn_dim=attn_dim, device=device, dtype=dtype)
        self.attn_u = nn.Linear(in_features, attn_dim, device=device, dtype=dtype)

    def _attention_scores(self, h: torch.Tensor) -> torch.Tensor:
        return self.attn_w(torch.tanh(self.attn_v(h)) * torch.sigmoid(self.attn_u(h))).squeeze(-1)


def _squash(s: torch.Tensor) -> torch.Tensor:
    """Capsule squash (Sabour et al., Eq. 1), safe at zero."""
    norm_sq = (s * s).sum(-1, keepdim=True)
    return s * (norm_sq / (1.0 + norm_sq)) / torch.sqrt(norm_sq + 1e-12)


class DynamicRoutingPool(PatchPool):
    """Dynamic routing between capsules (Sabour et al. 2017) from the capsule head to class capsules.

    Every instance capsule h_i (i over C x M) votes u_j|i = W_j h_i for class capsule j, with W_j shared over
    instances (a convolutional-capsule weight sharing that keeps the layer independent of the input size).
    Routing-by-agreement refines coupling coefficients c_ij = softmax_j(b_ij) for `num_iters` iterations; the
    class capsules are v_j = squash(sum_i c_ij u_j|i) and the logits are `logit_scale * ||v_j||`.

    Reported patch weights: the share of location m in the predicted class capsule,
    sum_c c_(cm)j* ||u_j*|(cm)||, normalised over locations. Patch logits: `logit_scale` times the length of the
    squashed per-location partial sum. The pooled feature is the instance mean weighted by the coupling to the
    predicted class.
    """

    def __init__(
            self,
            in_features: int,
            num_classes: int,
            capsule_dim: int = 16,
            num_iters: int = 3,
            logit_scale: float = 10.0,
            device=None,
            dtype=None,
    ):
        """
        Args:
            in_features: Instance capsule dim D.
            num_classes: Number of classes K (class capsules).
            capsule_dim: Dimension of the class capsules.
            num_iters: Routing iterations (Sabour et al. use 3).
            logit_scale: Scale from capsule length in [0, 1) to a logit for the cross-entropy.
        """
        self.capsule_dim = capsule_dim
        super().__init__(in_features, num_classes, device=device, dtype=dtype)
        if num_iters < 1:
            raise ValueError(f'num_iters must be >= 1, got {num_iters}')
        self.num_iters = num_iters
        self.logit_scale = logit_scale

    def _make_classifier(self, num_classes: int, device=None, dtype=None) -> nn.Module:
        if num_classes > 0:
            return nn.Linear(self.in_features, num_classes * self.capsule_dim, bias=False, device=device, dtype=dtype)
        return nn.Identity()

    def forward(self, h: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        B, C, M, D = h.shape
        if self.num_classes == 0:
            weights = torch.full((B, C, M), 1.0 / (C * M), device=h.device, dtype=torch.float32)
            pooled = torch.einsum('bcm,bcmd->bd', weights.to(h.dtype), h)
            return pooled, pooled, weights.sum(1).to(h.dtype), h.mean(1)
        votes = self.fc(h).float().reshape(B, C * M, self.num_classes, self.capsule_dim)
        routing_logits = torch.zeros(B, C * M, self.num_classes, device=h.device, dtype=votes.dtype)
        coupling = routing_logits.softmax(-1)
        class_capsules = _squash(torch.einsum('bij,bijd->bjd', coupling, votes))
        for _ in range(self.num_iters - 1):
            routing_logits = routing_logits + torch.einsum('bijd,bjd->bij', votes, class_capsules)
            coupling = routing_logits.softmax(-1)
            class_capsules = _squash(torch.einsum('bij,bijd->bjd', coupling, votes))
        logits = self.logit_scale * torch.linalg.vector_norm(class_capsules, dim=-1)

        predicted = logits.argmax(-1)  # (B,)
        index = predicted.view(B, 1, 1).expand(B, C * M, 1)
        coupling_pred = coupling.gather(2, index).squeeze(2)  # (B, CM)
        vote_len_pred = torch.linalg.vector_norm(votes, dim=-1).gather(2, index).squeeze(2)
        contribution = (coupling_pred * vote_len_pred).reshape(B, C, M).sum(1)
        patch_weights = _normalize_or_uniform(contribution, [1])

        location_sums = (coupling.unsqueeze(-1) * votes).reshape(B, C, M, self.num_classes, self.capsule_dim).sum(1)
        patch_logits = self.logit_scale * torch.linalg.vector_norm(_squash(location_sums), dim=-1)
        instance_weights = _normalize_or_uniform(coupling_pred.reshape(B, C, M), [1, 2])
        pooled = torch.einsum('bcm,bcmd->bd', instance_weights.to(h.dtype), h)
        return logits.to(h.dtype), pooled, patch_weights.to(h.dtype), patch_logits.to(h.dtype)


def create_patch_pool(
        pool: str,
        in_features: int,
        num_classes: int,
        xi: float = 0.1,
        capsule_head: bool = False,
        device=None,
        dtype=None,
) -> PatchPool:
    """Create a patch pool by name.

    Args:
        pool: One of 'lossattn', 'mean', 'attention', 'gated', 'routing' (capsule head only).
        in_features: Instance feature dim D.
        num_classes: Number of classes K.
        xi: Loss-attention threshold in [0, 1] (only used by 'lossattn').
        capsule_head: Whether the instances come from the capsule head.

    Returns:
        The pool module.
    """
    dd = dict(device=device, dtype=dtype)
    if pool == 'lossattn':
        return LossAttentionPool(in_features, num_classes, xi=xi, **dd)
    if pool == 'mean':
        return MeanPool(in_features, num_classes, **dd)
    if pool == 'attention':
        return AttentionPool(in_features, num_classes, **dd)
    if pool == 'gated':
        return GatedAttentionPool(in_features, num_classes, **dd)
    if pool == 'routing':
        if not capsule_head:
            raise ValueError("pool='routing' (dynamic routing) needs the capsule head: use a *_caps model")
        return DynamicRoutingPool(in_features, num_classes, **dd)
    raise ValueError(f'unknown pool {pool!r}; expected one of {", ".join(POOL_TYPES)}')
