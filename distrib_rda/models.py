"""The CNNs of the experiments, built for a dataset's channels, image size and classes.

``build_model(name, in_channels=C, image_size=S, num_classes=K)`` maps a ``C x S x S`` image to
``K`` logits. The models:

- ``lenet5``: LeCun et al. 1998 with ReLU and max-pooling. conv 6@5x5, pool, conv 16@5x5, pool,
  fc 120, 84, K. Images smaller than 32x32 are zero-padded to 32 by the first conv, as LeCun
  padded MNIST, so 28x28 and 32x32 inputs both give the classic 16x5x5 features.
- ``lenet300``: the LeNet-300-100 MLP on the flattened image, ``C*S*S -> 300 -> 100 -> K``.
- ``vgg16``: the CIFAR VGG-16 with BatchNorm (13 conv3x3+BN+ReLU, 5 max-pools, fc 512->K). The
  pools round up and a global average pool ends the features, so 28x28 works as well as 32x32.
- ``resnet18``: the CIFAR ResNet-18: 3x3 stride-1 stem, no max-pool, BasicBlocks [2, 2, 2, 2]
  of 64/128/256/512 channels; 11.17M parameters for 3x32x32 and 10 classes.
- ``resnet20``: He et al. 2016's CIFAR ResNet-20: 3 stages of 3 BasicBlocks, 16/32/64 channels.
  Shortcuts that change shape use option B (1x1 conv + BN projection), as torchvision does,
  not the paper's parameter-free option A: 0.27M parameters for 10 classes.

``init_scale`` multiplies the default initialization of every conv and linear weight:
``w <- init_scale * w`` after the default init (the prox centre of RDA starts there).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1
from torchvision.ops import Conv2dNormActivation

from distrib_rda.errors import UserError

MODEL_NAMES = ("lenet5", "lenet300", "vgg16", "resnet18", "resnet20")

VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M")


class UnknownModelError(UserError, ValueError):
    """A model name that :func:`build_model` does not know."""


def lenet5(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    pad = max(0, (32 - image_size + 1) // 2)
    side = ((image_size + 2 * pad - 4) // 2 - 4) // 2  # after conv5, pool2, conv5, pool2
    return nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(in_channels, 6, 5, padding=pad), relu1=nn.ReLU(), pool1=nn.MaxPool2d(2),
        conv2=nn.Conv2d(6, 16, 5), relu2=nn.ReLU(), pool2=nn.MaxPool2d(2),
        flatten=nn.Flatten(),
        fc1=nn.Linear(16 * side * side, 120), relu3=nn.ReLU(),
        fc2=nn.Linear(120, 84), relu4=nn.ReLU(),
        fc3=nn.Linear(84, num_classes),
    ))


def lenet300(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    return nn.Sequential(OrderedDict(
        flatten=nn.Flatten(),
        fc1=nn.Linear(in_channels * image_size * image_size, 300), relu1=nn.ReLU(),
        fc2=nn.Linear(300, 100), relu2=nn.ReLU(),
        fc3=nn.Linear(100, num_classes),
    ))


def vgg16(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    layers: list[nn.Module] = []
    channels = in_channels
    for item in VGG16_LAYERS:
        if item == "M":
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        else:
            layers.append(Conv2dNormActivation(channels, item, 3))
            channels = item
    return nn.Sequential(OrderedDict(
        features=nn.Sequential(*layers),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        fc=nn.Linear(512, num_classes),
    ))


class CifarResNet(nn.Module):
    """3x3 stem (stride 1, no max-pool), stages of torchvision BasicBlocks, global pool, fc.

    Stage ``i`` has ``blocks[i]`` blocks of ``widths[i]`` channels; every stage after the first
    halves the resolution in its first block.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...],
                 blocks: tuple[int, ...]) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, planes = [], widths[0]
        for index, (width, count) in enumerate(zip(widths, blocks, strict=True)):
            stages.append(self._stage(planes, width, count, stride=1 if index == 0 else 2))
            planes = width
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        for module in self.modules():  # torchvision's ResNet init
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(inplanes: int, planes: int, count: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or inplanes != planes:
            downsample = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
        first = BasicBlock(inplanes, planes, stride, downsample)
        return nn.Sequential(first, *(BasicBlock(planes, planes) for _ in range(count - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet18(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    return CifarResNet(in_channels, num_classes, widths=(64, 128, 256, 512), blocks=(2, 2, 2, 2))


def resnet20(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    return CifarResNet(in_channels, num_classes, widths=(16, 32, 64), blocks=(3, 3, 3))


BUILDERS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "lenet5": lenet5, "lenet300": lenet300, "vgg16": vgg16,
    "resnet18": resnet18, "resnet20": resnet20,
}


def build_model(name: str, *, in_channels: int, image_size: int, num_classes: int,
                init_scale: float = 1.0) -> nn.Module:
    """Model ``name`` for ``in_channels x image_size x image_size`` images and ``num_classes``."""
    if name not in BUILDERS:
        raise UnknownModelError(f"unknown model {name!r} (allowed: {', '.join(MODEL_NAMES)})")
    model = BUILDERS[name](in_channels, image_size, num_classes)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.mul_(init_scale)
    return model
