"""ResNet baselines for the DenseNet comparison.

- ImageNet ResNets (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016,
  arXiv:1512.03385) are torchvision's, with a "cifar" stem and ``in_channels`` option.
- CIFAR ResNets of the same paper (Section 4.2): a 3x3 stem of 16 maps, three stages of n basic
  blocks at 16/32/64 maps, depth 6n+2 (ResNet-20/32/44/56/110), parameter-free shortcuts
  (option A: strided identity, zero-padded channels).
- "Plain" nets: the same CIFAR ResNets with every shortcut removed, so the vanishing-gradient
  claim can be tested against a net of equal depth without skip connections.
"""

from __future__ import annotations

import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from ..checks import is_int, require, require_int
from ..options import STEMS

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50")


def torchvision_resnet(arch: str, num_classes: int = 1000, in_channels: int = 3, stem: str = "imagenet") -> nn.Module:
    """torchvision's ResNet; the "cifar" stem is a 3x3 stride-1 conv with no max-pool."""
    require("arch", arch, arch in TORCHVISION_RESNETS, f"one of {', '.join(TORCHVISION_RESNETS)}")
    require("stem", stem, stem in STEMS, f"one of {', '.join(STEMS)}")
    require_int("num_classes", num_classes, 1)
    require_int("in_channels", in_channels, 1)
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    if stem == "cifar":
        model.conv1 = nn.Conv2d(in_channels, 64, 3, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


class BasicBlock(nn.Module):
    """Two 3x3 convs (Conv-BN-ReLU-Conv-BN), plus the input when ``shortcut``, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = shortcut
        self.stride = stride
        self.pad = planes - in_planes

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut:
            identity = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
            if self.pad:
                # Option A of He et al.: zero-pad the new channels, no parameters.
                identity = F.pad(identity, (0, 0, 0, 0, 0, self.pad))
            out = out + identity
        return F.relu(out)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 (or 28x28) inputs; ``shortcuts=False`` gives the plain net."""

    def __init__(self, depth: int = 110, num_classes: int = 10, in_channels: int = 3, shortcuts: bool = True) -> None:
        super().__init__()
        require("depth", depth, is_int(depth) and depth >= 8 and (depth - 2) % 6 == 0, "6n + 2 for n >= 1")
        require_int("num_classes", num_classes, 1)
        require_int("in_channels", in_channels, 1)
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for i, planes in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(in_planes, planes, stride, shortcuts))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet_cifar(depth: int = 110, **kwargs) -> CifarResNet:
    """CIFAR ResNet-{20,32,44,56,110} of He et al. 2016."""
    return CifarResNet(depth, shortcuts=True, **kwargs)


def plain_cifar(depth: int = 110, **kwargs) -> CifarResNet:
    """The CIFAR ResNet of the same depth with every shortcut removed."""
    return CifarResNet(depth, shortcuts=False, **kwargs)
