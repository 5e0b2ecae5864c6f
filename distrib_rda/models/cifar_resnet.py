"""The CIFAR ResNets of He et al. 2016, built from torchvision's BasicBlock."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, conv1x1


class CifarResNet(nn.Module):
    """3x3 stem (stride 1, no max-pool), stages of torchvision BasicBlocks, global pool, fc.

    Stage ``i`` has ``blocks[i]`` blocks of ``widths[i]`` channels; every stage after the first
    halves the resolution in its first block. Shortcuts that change shape use option B (1x1
    conv + BN projection), as torchvision does.
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
