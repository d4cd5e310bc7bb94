"""ResNets in two stems (CIFAR 3x3 / ImageNet 7x7) and AP variants.

The AP ("average pooling") variants (ResNetAP of the dataset-condensation literature) keep every
convolution at stride 1 and downsample with average pooling instead: in a block after the ReLU
that follows the stride-carrying conv, in the shortcut between its 1x1 conv and its norm, and in
the ImageNet stem (7x7 stride-1 conv -> BN -> ReLU -> AvgPool 4x4, no max pool).
"""
from functools import partial

import torch.nn as nn
import torch.nn.functional as F

from models.staged import StagedNet


def _down(stride, ap):
    """AP downsampling: average pooling with kernel = stride where the plain net strides a conv.

    The official code pools with kernel = stride in floor mode. ceil_mode gives the same result on
    even maps, and on odd maps keeps the partial window (averaged over its valid pixels) instead of
    dropping it: on 28-px data the AP ImageNet stem leaves 7x7, which then goes 7 -> 4 -> 2 -> 1
    (the plain nets' sizes) instead of the official 7 -> 3 -> 1, whose layer-4 pool of a 1x1 map
    crashes.
    """
    return nn.AvgPool2d(stride, ceil_mode=True) if ap and stride != 1 else nn.Identity()


def _shortcut(in_planes, out_planes, stride, ap):
    if stride == 1 and in_planes == out_planes:
        return nn.Identity()
    return nn.Sequential(  # plain: strided 1x1 conv -> BN; AP: 1x1 conv -> avg pool -> BN
        nn.Conv2d(in_planes, out_planes, 1, stride=1 if ap else stride, bias=False),
        _down(stride, ap),
        nn.BatchNorm2d(out_planes),
    )


class BasicBlock(nn.Module):
    """conv3x3 (stride; AP: 1) -> BN -> ReLU [-> AP pool] -> conv3x3 -> BN -> + shortcut -> ReLU."""
    expansion = 1

    def __init__(self, in_planes, planes, stride=1, ap=False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, 1 if ap else stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.pool = _down(stride, ap)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride, ap)

    def forward(self, x):
        out = self.pool(F.relu(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """conv1x1 -> BN -> ReLU -> conv3x3 (stride; AP: 1) -> BN -> ReLU [-> AP pool] -> conv1x1 -> BN
    -> + shortcut -> ReLU."""
    expansion = 4

    def __init__(self, in_planes, planes, stride=1, ap=False):
        super().__init__()
        out_planes = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        # stride on the 3x3 conv (torchvision "v1.5" placement)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1 if ap else stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pool = _down(stride, ap)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = _shortcut(in_planes, out_planes, stride, ap)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.pool(F.relu(self.bn2(self.conv2(out))))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class ResNet(StagedNet):
    """`features(x)`: plain nets give [stem, 4 stages, pooled vector, logits] (7 entries), AP nets
    [stem, 4 stages] (5), the official `--match feat` layer lists."""

    def __init__(self, block, num_blocks, widths, num_classes, channels, stem='cifar', ap=False):
        super().__init__()
        self.feature_head = not ap
        if stem == 'cifar':
            self.stem = nn.Sequential(
                nn.Conv2d(channels, widths[0], 3, 1, 1, bias=False),
                nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        elif stem == 'imagenet':
            # plain: 7x7 stride-2 conv -> BN -> ReLU -> max pool 3/2; AP: 7x7 stride-1 conv -> BN ->
            # ReLU -> avg pool 4/4 (both take 32 -> 8, 28 -> 7). The Identity only keeps the
            # state-dict keys of earlier checkpoints (BN at `stem.2`).
            self.stem = nn.Sequential(
                nn.Conv2d(channels, widths[0], 7, 1 if ap else 2, 3, bias=False),
                nn.Identity(),
                nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True),
                nn.AvgPool2d(4, 4) if ap else nn.MaxPool2d(3, 2, 1))
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
            if isinstance(m, nn.Conv2d):  # normal(0, sqrt(2 / (k * k * out_channels)))
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
