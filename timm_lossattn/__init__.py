""" timm-lossattn: loss-based attention (Shi et al., IEEE TIP 2021) for timm

`import timm_lossattn` registers the `lossattn_*` models with timm.
"""
from .layers import PatchGeometry
from .models import LossAttnNet, LossAttnOutput
from .version import __version__
