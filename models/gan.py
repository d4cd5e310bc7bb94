"""Conditional generator / AC-WGAN discriminator used to distill a dataset into a GAN."""
import torch
import torch.nn as nn
import torch.nn.functional as F

_SIZES = (28, 32)


def _check_size(img_size):
    if img_size not in _SIZES:
        raise ValueError(f"img_size must be one of {_SIZES}, got {img_size}")


def conditional_noise(labels, num_classes, dim_noise):
    """Gaussian noise whose first `num_classes` entries are replaced by the one-hot
    label: the class condition is carried in the noise itself (no embedding)."""
    if dim_noise < num_classes:
        raise ValueError(f"dim_noise ({dim_noise}) must be >= num_classes ({num_classes})")
    z = torch.randn(labels.shape[0], dim_noise, device=labels.device)
    z[:, :num_classes] = F.one_hot(labels, num_classes).to(z.dtype)
    return z


def generate(G, labels):
    """Images of the given classes: N(0, I) noise whose first entries are the one-hot class."""
    return G(conditional_noise(labels, G.num_classes, G.dim_noise))


def _conv_bn_relu(width):
    return [nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]


def _up_bn_relu(width, kernel=4):
    # stride 2, pad 1: kernel 4 doubles the size, kernel 3 maps 4 -> 7
    return [nn.ConvTranspose2d(width, width, kernel, stride=2, padding=1),
            nn.BatchNorm2d(width), nn.ReLU(inplace=True)]


class Generator(nn.Module):
    def __init__(self, num_classes, channels, img_size, dim_noise=100, width=196):
        super().__init__()
        _check_size(img_size)
        # kept so a checkpoint can rebuild the exact net: Generator(**config)
        self.config = dict(num_classes=num_classes, channels=channels, img_size=img_size,
                           dim_noise=dim_noise, width=width)
        self.num_classes, self.dim_noise, self.width = num_classes, dim_noise, width
        self.project = nn.Sequential(
            nn.Linear(dim_noise, width * 4 * 4), nn.BatchNorm1d(width * 4 * 4), nn.ReLU(inplace=True))
        self.net = nn.Sequential(
            *_up_bn_relu(width, 3 if img_size == 28 else 4),  # 4 -> 7 / 8
            *_conv_bn_relu(width), *_conv_bn_relu(width), *_conv_bn_relu(width),
            *_up_bn_relu(width),  # -> 14 / 16
            *_conv_bn_relu(width),
            *_up_bn_relu(width),  # -> 28 / 32
            nn.Conv2d(width, channels, 3, padding=1),
            nn.Tanh(),
        )

    def forward(self, z):
        x = self.project(z).view(-1, self.width, 4, 4)
        return self.net(x)


class Discriminator(nn.Module):
    """Eight 3x3 convs with LayerNorm (not BatchNorm: the WGAN-GP penalty is
    per-sample), max-pooled to a vector feeding a critic head and a class head."""

    strides = (1, 2, 1, 2, 1, 1, 1, 2)  # 32 -> 16 -> 8 -> 4 ; 28 -> 14 -> 7 -> 4

    def __init__(self, num_classes, channels, img_size, width=196):
        super().__init__()
        _check_size(img_size)
        self.config = dict(num_classes=num_classes, channels=channels, img_size=img_size, width=width)
        self.num_classes = num_classes
        layers, in_ch, size = [], channels, img_size
        for stride in self.strides:
            size = (size - 1) // stride + 1  # 3x3 conv, pad 1
            layers += [nn.Conv2d(in_ch, width, 3, stride, 1),
                       nn.LayerNorm([width, size, size]),
                       nn.LeakyReLU(0.01)]
            in_ch = width
        layers += [nn.MaxPool2d(4), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.critic = nn.Linear(width, 1)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x):
        h = self.net(x)
        return self.critic(h).squeeze(1), self.classifier(h)


# The official implementation's module names -> this repository's, for reading its checkpoints
# (utils/checkpoint.py). A state-dict key is `<module>.<leaf>` (weight, bias, running_mean, ...); only
# the module part differs. The Sequential indices skip the ReLU / LeakyReLU entries between.
OFFICIAL_GENERATOR_NAMES = {
    'fc1': 'project.0', 'bn0': 'project.1',
    'conv1': 'net.0', 'bn1': 'net.1',     # ConvTranspose2d, kernel 4 (32 px) or 3 (28 px)
    'conv2': 'net.3', 'bn2': 'net.4',
    'conv3': 'net.6', 'bn3': 'net.7',
    'conv4': 'net.9', 'bn4': 'net.10',
    'conv5': 'net.12', 'bn5': 'net.13',   # ConvTranspose2d
    'conv6': 'net.15', 'bn6': 'net.16',
    'conv7': 'net.18', 'bn7': 'net.19',   # ConvTranspose2d
    'conv8': 'net.21',                    # -> channels, then Tanh (net.22)
}
OFFICIAL_DISCRIMINATOR_NAMES = {
    **{f'conv{i + 1}': f'net.{3 * i}' for i in range(8)},      # Conv2d 3x3, strides Discriminator.strides
    **{f'ln{i + 1}': f'net.{3 * i + 1}' for i in range(8)},    # LayerNorm([width, H, W])
    'fc1': 'critic',                                           # Linear(width, 1)
    'fc10': 'classifier',                                      # Linear(width, num_classes)
}
