import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import create_model, list_models
from models.resnet import ResNet

NUM_CLASSES = 7  # not 10, so nothing can hard-code the class count
DATA = [(1, 28), (3, 32)]  # (channels, img_size): MNIST-like and CIFAR-like
CASES = [(name, stem, ch, size)
         for name in list_models()
         for stem in (('cifar', 'imagenet') if name.startswith('resnet') else ('cifar',))
         for ch, size in DATA]


@pytest.mark.parametrize('name,stem,channels,img_size', CASES)
def test_forward_features_backward(name, stem, channels, img_size):
    torch.manual_seed(0)
    model = create_model(name, NUM_CLASSES, channels, img_size, stem=stem)
    x = torch.randn(2, channels, img_size, img_size)
    y = torch.tensor([0, NUM_CLASSES - 1])

    logits = model(x)
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(logits).all()

    feats = model.features(x)
    assert len(feats) >= 2
    assert all(f.shape[0] == 2 and f.numel() > 0 for f in feats)
    assert feats[-1].shape == (2, model.fc.in_features)  # pooled embedding feeds fc
    torch.testing.assert_close(model.fc(feats[-1]), logits)

    F.cross_entropy(logits, y).backward()
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, pname
            assert torch.isfinite(p.grad).all(), pname
    assert any(n.startswith('fc.') for n, _ in model.named_parameters())


def test_unknown_model_lists_names():
    with pytest.raises(ValueError, match="unknown model 'nope'; choose from: .*convnet.*resnet18_ap"):
        create_model('nope', 10, 3, 32)


def test_unknown_stem():
    with pytest.raises(ValueError, match='stem'):
        create_model('resnet18', 10, 3, 32, stem='vit')


def test_registry_contents():
    expected = {'convnet', 'densenet'} | {f'resnet{d}{s}' for d in (10, 18, 34, 50, 101) for s in ('', '_ap')}
    assert set(list_models()) == expected


@pytest.mark.parametrize('img_size,expected', [(28, 4), (32, 4)])
def test_convnet_spatial(img_size, expected):
    # 28-px inputs are padded to 32 by the first conv, so both end at 4x4
    model = create_model('convnet', NUM_CLASSES, 1, img_size)
    assert model.features(torch.randn(2, 1, img_size, img_size))[-2].shape[-1] == expected
    assert model.fc.in_features == 128 * 4 * 4


@pytest.mark.parametrize('depth,blocks', [(10, 1), (18, 2), (34, 5), (50, 8), (101, 16)])
def test_resnet_cifar_blocks(depth, blocks):
    model = create_model(f'resnet{depth}', NUM_CLASSES, 3, 32)
    assert [len(s) for s in model.stages] == [blocks] * 4
    assert model.fc.in_features == 256


@pytest.mark.parametrize('depth,blocks,fc_in', [
    (10, [1, 1, 1, 1], 512), (18, [2, 2, 2, 2], 512), (34, [3, 4, 6, 3], 512),
    (50, [3, 4, 6, 3], 2048), (101, [3, 4, 23, 3], 2048)])
def test_resnet_imagenet_blocks(depth, blocks, fc_in):
    model = create_model(f'resnet{depth}', NUM_CLASSES, 3, 32, stem='imagenet')
    assert [len(s) for s in model.stages] == blocks
    assert model.fc.in_features == fc_in


@pytest.mark.parametrize('stem', ['cifar', 'imagenet'])
@pytest.mark.parametrize('img_size', [28, 32])
def test_resnet_ap_matches_strided_shapes(stem, img_size):
    # AP's ceil-mode pooling must reproduce the strided nets' maps, incl. odd 7 -> 4
    x = torch.randn(2, 3, img_size, img_size)
    plain = [f.shape for f in create_model('resnet18', NUM_CLASSES, 3, img_size, stem).features(x)]
    ap_model = create_model('resnet18_ap', NUM_CLASSES, 3, img_size, stem)
    assert [f.shape for f in ap_model.features(x)] == plain
    assert not any(isinstance(m, nn.Conv2d) and m.stride != (1, 1) for m in ap_model.modules())
    assert any(isinstance(m, nn.AvgPool2d) for m in ap_model.modules())


def test_resnet_init_and_no_conv_bias():
    model = create_model('resnet18_ap', NUM_CLASSES, 3, 32, stem='imagenet')
    assert isinstance(model, ResNet)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            assert m.bias is None
        if isinstance(m, nn.BatchNorm2d):
            assert (m.weight == 1).all() and (m.bias == 0).all()


def test_densenet_uses_input_channels():
    model = create_model('densenet', NUM_CLASSES, 1, 28)
    assert model.stem.in_channels == 1
    assert model.fc.in_features == 384  # DenseNet-121 at growth 12
