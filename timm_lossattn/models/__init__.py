from .lossattn_net import HEAD_TYPES, LossAttnNet, LossAttnOutput
from .lossattn_resnet import LossAttnResNet
from .lossattn_vgg import LossAttnVgg
