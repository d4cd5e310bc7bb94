"""ResNets in two stems (CIFAR 3x3 / ImageNet 7x7) and AP variants.

The AP ("average pooling") variants replace every stride-2 convolution with a
stride-1 convolution followed by AvgPool2d(2), which gives smoother
downsampling; it is the ResNetAP used in the dataset-condensation literature.
"""
from functools import partial

import torch.nn as nn

from models.staged import StagedNet
import torch.nn.functional as F


def _pool(down, ap):
    # ceil_mode keeps odd maps (7x7 at 28 px) at the size a stride-2 pad-1 conv
    # would give (7 -> 4), so AP and non-AP nets have identical shapes.
    return nn.AvgPool2d(2, ceil_mode=True) if down and ap else nn.Identity()


def _shortcut(in_planes, out_planes, stride, ap):
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(
        nn.Conv2d(in_planes, out_planes, 1, stride=1 if ap else stride, bias=False),
        _pool(stride != 1, ap),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1, ap=False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, 1 if ap else stride, 1, bias=False)
        self.pool1 = _pool(stride != 1, ap)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride, ap)

    def forward(self, x):
        out = F.relu(self.bn1(self.pool1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride=1, ap=False):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        # stride on the 3x3 conv (torchvision "v1.5" placement)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1 if ap else stride, 1, bias=False)
        self.pool2 = _pool(stride != 1, ap)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _shortcut(in_planes, out_planes, stride, ap)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.pool2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(StagedNet):
    def __init__(self, block, num_blocks, widths, num_classes, channels, stem='cifar', ap=False):
        super().__init__()
        if stem == 'cifar':
            self.stem = nn.Sequential(
                nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False),
                nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        elif stem == 'imagenet':
            self.stem = nn.Sequential(
                nn.Conv2d(channels, widths[0], 7, 1 if ap else 2, 3, bias=False),
                _pool(True, ap),
                nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1))
        else:
            raise ValueError(f"unknown stem '{stem}'; choose from: cifar, imagenet")

        stages, in_planes = [], widths[0]
        for i, (planes, n) in enumerate(zip(widths, num_blocks)):
            blocks = []
            for stride in [1 if i == 0 else 2] + [1] * (n - 1):
                blocks.append(block(in_planes, planes, stride, ap))
                in_planes = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


# depth -> (block, blocks per stage) for the ImageNet-style stem
_IMAGENET_CFG = {
    10: (BasicBlock, [1, 1, 1, 1]),
    18: (BasicBlock, [2, 2, 2, 2]),
    34: (BasicBlock, [3, 4, 6, 3]),
    50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]),
}


def resnet(depth, num_classes, channels, img_size, stem='cifar', ap=False):
    """Build a ResNet of the given depth. `img_size` is accepted for a uniform
    factory signature; global pooling makes the nets size-agnostic."""
    if stem == 'cifar':
        # CIFAR-style: narrow (32..256) BasicBlock nets, (depth - 2) // 6 blocks per stage
        block, num_blocks, widths = BasicBlock, [(depth - 2) // 6] * 4, (32, 64, 128, 256)
    else:
        block, num_blocks = _IMAGENET_CFG[depth]
        widths = (64, 128, 256, 512)
    return ResNet(block, num_blocks, widths, num_classes, channels, stem, ap)


resnet10 = partial(resnet, 10)
resnet18 = partial(resnet, 18)
resnet34 = partial(resnet, 34)
resnet50 = partial(resnet, 50)
resnet101 = partial(resnet, 101)
resnet10_ap = partial(resnet, 10, ap=True)
resnet18_ap = partial(resnet, 18, ap=True)
resnet34_ap = partial(resnet, 34, ap=True)
resnet50_ap = partial(resnet, 50, ap=True)
resnet101_ap = partial(resnet, 101, ap=True)
