from .geometry import LayerSpec, PatchGeometry, min_input_size, patch_geometry
from .patch_heads import CapsulePatchHead, ConvPatchHead, patch_head_layers
from .patch_pool import (
    POOL_TYPES, AttentionPool, DynamicRoutingPool, GatedAttentionPool, LossAttentionPool, MeanPool, PatchPool,
    create_patch_pool, loss_attention_weights,
)
