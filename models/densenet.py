"""DenseNet-121 in its CIFAR shape (growth 12, 3x3 stem, no max pool)."""
import torch
import torch.nn as nn

from models.staged import StagedNet


class DenseLayer(nn.Module):
    """Bottleneck layer: BN-ReLU-Conv1x1(4g) -> BN-ReLU-Conv3x3(g), concatenated to the input."""

    def __init__(self, in_planes, growth):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True),
            nn.Conv2d(in_planes, 4 * growth, 1, bias=False),
            nn.BatchNorm2d(4 * growth), nn.ReLU(inplace=True),
            nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False),
        )

    def forward(self, x):
        return torch.cat([self.body(x), x], 1)


def _transition(in_planes, out_planes):
    return nn.Sequential(
        nn.BatchNorm2d(in_planes), nn.ReLU(inplace=True),
        nn.Conv2d(in_planes, out_planes, 1, bias=False),
        nn.AvgPool2d(2),
    )


class DenseNet(StagedNet):
    """`features(x)`: the official code defines no layer list for DenseNet, so it follows the
    ResNet convention: stem output, the four dense blocks' outputs (each after its transition;
    the last after its final BN-ReLU), the pooled vector, the logits (7 entries)."""

    def __init__(self, num_classes, channels, num_blocks=(6, 12, 24, 16), growth=12, reduction=0.5):
        super().__init__()
        planes = 2 * growth
        # from `channels`, not a hard-coded 3, so grayscale datasets work
        self.stem = nn.Conv2d(channels, planes, 3, padding=1, bias=False)
        stages = []
        for i, n in enumerate(num_blocks):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(planes, growth))
                planes += growth
            if i < len(num_blocks) - 1:  # transition after every block but the last
                out_planes = int(planes * reduction)
                layers.append(_transition(planes, out_planes))
                planes = out_planes
            else:  # the last block ends with the final BN-ReLU instead
                layers += [nn.BatchNorm2d(planes), nn.ReLU(inplace=True)]
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)


def densenet(num_classes, channels, img_size, stem='cifar'):
    # img_size/stem accepted for a uniform factory signature (pooling is adaptive)
    return DenseNet(num_classes, channels)
