"""ConvNet-3: the standard small network of the dataset-distillation literature."""
import torch.nn as nn

from models.staged import StagedNet


class ConvNet(StagedNet):
    """`depth` x [Conv3x3 -> InstanceNorm -> ReLU -> AvgPool2] -> Linear.

    `features(x)` is the output of each block (after its pooling), as in the official layer list.
    """

    feature_stem = False  # the stem is an Identity: its "output" is the input image
    feature_head = False

    def __init__(self, num_classes, channels, img_size, width=128, depth=3):
        super().__init__()
        # 28-px inputs (MNIST-like) are padded up to 32 by the first conv, so the
        # rest of the network sees the same sizes as on CIFAR.
        pad0 = 3 if img_size == 28 else 1
        size = img_size + 2 * (pad0 - 1)
        blocks, in_ch = [], channels
        for i in range(depth):
            blocks.append(nn.Sequential(
                nn.Conv2d(in_ch, width, 3, padding=pad0 if i == 0 else 1),
                # Instance norm with affine params, written as GroupNorm with one
                # channel per group (the convention of the DC/DM/MTT code bases).
                nn.GroupNorm(width, width, affine=True),
                nn.ReLU(inplace=True),
                nn.AvgPool2d(2),
            ))
            in_ch, size = width, size // 2
        self.stem, self.pool = nn.Identity(), nn.Identity()  # the blocks are the stages; flatten at the end
        self.stages = nn.ModuleList(blocks)
        self.fc = nn.Linear(width * size * size, num_classes)


def convnet(num_classes, channels, img_size, stem='cifar'):
    # `stem` only matters for ResNets; accepted so all factories share a signature.
    return ConvNet(num_classes, channels, img_size)
