import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import create_model, list_models
from models.resnet import BasicBlock, Bottleneck, ResNet

NUM_CLASSES = 7  # not 10, so nothing can hard-code the class count
DATA = [(1, 28), (3, 32)]  # (channels, img_size): MNIST-like and CIFAR-like
def feature_count(name):
    """Length of the official `--match feat` layer list (DenseNet: the ResNet convention)."""
    if name == 'convnet':
        return 3  # the three blocks
    return 5 if name.endswith('_ap') else 7  # stem, 4 stages (+ pooled vector, logits)


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
    assert len(feats) == feature_count(name)
    assert all(f.shape[0] == 2 and f.numel() > 0 for f in feats)
    if name.endswith('_ap') or name == 'convnet':  # the list ends at the last stage / block
        pooled = torch.flatten(model.pool(feats[-1]), 1)
    else:  # ... ends with the pooled vector and the logits
        pooled = feats[-2]
        torch.testing.assert_close(feats[-1], logits)
    assert pooled.shape == (2, model.fc.in_features)
    torch.testing.assert_close(model.fc(pooled), logits)

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
    assert model.features(torch.randn(2, 1, img_size, img_size))[-1].shape[-1] == expected
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


# --- ResNetAP against a hand-written functional forward in the spec's order, same weights ---

def _bn(x, m):  # train-mode BatchNorm on the batch's own statistics
    return F.batch_norm(x, None, None, m.weight, m.bias, training=True, eps=m.eps)


def _conv(x, m):  # AP convs: stride 1, no bias, 'same' padding
    assert m.bias is None and m.stride == (1, 1)
    return F.conv2d(x, m.weight, padding=m.weight.shape[-1] // 2)


def _pool(x, stride):  # the official pooling: kernel = stride, only when stride != 1
    return F.avg_pool2d(x, stride, stride) if stride != 1 else x


def ref_shortcut(block, x, stride):
    if isinstance(block.shortcut, nn.Identity):
        return x
    conv, bn = block.shortcut[0], block.shortcut[-1]
    assert conv.kernel_size == (1, 1)
    return _bn(_pool(_conv(x, conv), stride), bn)  # conv1x1 -> pool -> BN


def ref_basic(b, x, stride):
    out = _pool(F.relu(_bn(_conv(x, b.conv1), b.bn1)), stride)
    out = _bn(_conv(out, b.conv2), b.bn2)
    return F.relu(out + ref_shortcut(b, x, stride))


def ref_bottleneck(b, x, stride):
    out = F.relu(_bn(_conv(x, b.conv1), b.bn1))
    out = _pool(F.relu(_bn(_conv(out, b.conv2), b.bn2)), stride)
    out = _bn(_conv(out, b.conv3), b.bn3)
    return F.relu(out + ref_shortcut(b, x, stride))


def ref_stem(model, x, stem):
    conv, bn = model.stem[0], next(m for m in model.stem if isinstance(m, nn.BatchNorm2d))
    out = F.relu(_bn(_conv(x, conv), bn))
    return F.avg_pool2d(out, 4, 4) if stem == 'imagenet' else out  # no pooling in the CIFAR stem


def ref_resnet_ap(model, x, stem):
    feats = [ref_stem(model, x, stem)]
    for i, stage in enumerate(model.stages):
        out = feats[-1]
        for j, block in enumerate(stage):
            stride = 2 if i > 0 and j == 0 else 1
            out = (ref_basic if isinstance(block, BasicBlock) else ref_bottleneck)(block, out, stride)
        feats.append(out)
    return feats, model.fc(feats[-1].mean((2, 3)))


TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('block_type,in_planes,planes,stride', [
    (BasicBlock, 16, 16, 1), (BasicBlock, 16, 32, 1), (BasicBlock, 16, 32, 2),
    (Bottleneck, 64, 16, 1), (Bottleneck, 32, 16, 1), (Bottleneck, 64, 16, 2)])
def test_ap_block_order(block_type, in_planes, planes, stride):
    torch.manual_seed(0)
    block = block_type(in_planes, planes, stride, ap=True)
    x = torch.randn(4, in_planes, 8, 8)
    ref = ref_basic if block_type is BasicBlock else ref_bottleneck
    torch.testing.assert_close(block(x), ref(block, x, stride), **TOL)


@pytest.mark.parametrize('name,stem', [('resnet10_ap', 'cifar'), ('resnet18_ap', 'cifar'), ('resnet10_ap', 'imagenet'),
                                       ('resnet18_ap', 'imagenet'), ('resnet50_ap', 'imagenet')])  # 50: bottlenecks
def test_resnet_ap_whole_net_matches_spec(name, stem):
    torch.manual_seed(0)
    model = create_model(name, NUM_CLASSES, 3, 32, stem)
    x = torch.randn(2, 3, 32, 32)
    feats, logits = ref_resnet_ap(model, x, stem)
    got = model.features(x)
    assert len(got) == 5
    for a, b in zip(got, feats):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(model(x), logits, **TOL)


def test_ap_imagenet_stem():
    model = create_model('resnet18_ap', NUM_CLASSES, 1, 28, stem='imagenet')
    conv = model.stem[0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == \
        (1, 64, (7, 7), (1, 1), (3, 3))
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    pools = [m for m in model.stem if isinstance(m, nn.AvgPool2d)]
    assert len(pools) == 1 and (pools[0].kernel_size, pools[0].stride) == (4, 4)
    assert isinstance(model.stem[-1], nn.AvgPool2d)  # pooling after BN -> ReLU
    for size, out in [(32, 8), (28, 7)]:
        assert model.stem(torch.randn(2, 1, size, size)).shape == (2, 64, out, out)


def test_ap_cifar_stem():
    model = create_model('resnet10_ap', NUM_CLASSES, 3, 32, stem='cifar')
    conv = model.stem[0]
    assert (conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (32, (3, 3), (1, 1), (1, 1))
    assert not any(isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)) for m in model.stem)


def test_plain_stems_unchanged():
    model = create_model('resnet18', NUM_CLASSES, 3, 32, stem='imagenet')
    conv = model.stem[0]
    assert (conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (64, (7, 7), (2, 2), (3, 3))
    assert isinstance(model.stem[-1], nn.MaxPool2d)
    conv = create_model('resnet18', NUM_CLASSES, 3, 32, stem='cifar').stem[0]
    assert (conv.out_channels, conv.kernel_size, conv.stride) == (32, (3, 3), (1, 1))


def test_ap_pool_odd_maps():
    # ceil-mode pooling: the official floor-mode result on the full windows, plus the partial
    # window (mean of its valid pixels) on odd maps, so 7 -> 4 instead of 3
    x = torch.randn(2, 8, 7, 7)
    block = BasicBlock(8, 8, 2, ap=True)
    y = block.pool(x)
    assert y.shape[-2:] == (4, 4)
    torch.testing.assert_close(y[..., :3, :3], F.avg_pool2d(x, 2, 2))
    torch.testing.assert_close(y[..., 3, 3], x[..., 6, 6])
    torch.testing.assert_close(block.pool(x[..., :6, :6]), F.avg_pool2d(x[..., :6, :6], 2, 2))


@pytest.mark.parametrize('name', ['resnet10_ap', 'resnet18_ap'])
@pytest.mark.parametrize('stem,channels,img_size,shapes', [
    ('imagenet', 1, 28, [(64, 7, 7), (64, 7, 7), (128, 4, 4), (256, 2, 2), (512, 1, 1)]),
    ('imagenet', 3, 32, [(64, 8, 8), (64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)]),
    ('cifar', 3, 32, [(32, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4)]),
])
def test_resnet_ap_shapes(name, stem, channels, img_size, shapes):
    # 28 px, ImageNet stem: the official net crashes here (7 -> 3 -> 1 -> pool of 1x1)
    model = create_model(name, NUM_CLASSES, channels, img_size, stem)
    x = torch.randn(2, channels, img_size, img_size)
    assert model(x).shape == (2, NUM_CLASSES)
    assert [tuple(f.shape) for f in model.features(x)] == [(2,) + s for s in shapes]


@pytest.mark.parametrize('stem', ['cifar', 'imagenet'])
@pytest.mark.parametrize('img_size', [28, 32])
def test_resnet_ap_same_maps_as_strided(stem, img_size):
    # AP's pooling reproduces the strided nets' maps (incl. odd 7 -> 4); the AP list stops at the
    # stages, the plain one adds the pooled vector and the logits
    x = torch.randn(2, 3, img_size, img_size)
    plain = [f.shape for f in create_model('resnet18', NUM_CLASSES, 3, img_size, stem).features(x)]
    ap_model = create_model('resnet18_ap', NUM_CLASSES, 3, img_size, stem)
    assert [f.shape for f in ap_model.features(x)] == plain[:5]
    assert plain[5:] == [(2, 256 if stem == 'cifar' else 512), (2, NUM_CLASSES)]
    assert not any(isinstance(m, nn.Conv2d) and m.stride != (1, 1) for m in ap_model.modules())
    assert not any(isinstance(m, nn.MaxPool2d) for m in ap_model.modules())


@pytest.mark.parametrize('name,stem', [('convnet', 'cifar'), ('resnet18', 'cifar'), ('resnet18', 'imagenet'),
                                       ('resnet18_ap', 'cifar'), ('resnet18_ap', 'imagenet'), ('densenet', 'cifar')])
def test_feature_list(name, stem):
    """The official `--match feat` layer lists (DenseNet: the ResNet convention)."""
    expected = {
        'convnet': [(128, 16, 16), (128, 8, 8), (128, 4, 4)],
        ('resnet18', 'cifar'): [(32, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4),
                                (256,), (NUM_CLASSES,)],
        ('resnet18', 'imagenet'): [(64, 8, 8), (64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1),
                                   (512,), (NUM_CLASSES,)],
        ('resnet18_ap', 'cifar'): [(32, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4)],
        ('resnet18_ap', 'imagenet'): [(64, 8, 8), (64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)],
        'densenet': [(24, 32, 32), (48, 16, 16), (96, 8, 8), (192, 4, 4), (384, 4, 4), (384,), (NUM_CLASSES,)],
    }
    torch.manual_seed(0)
    model = create_model(name, NUM_CLASSES, 3, 32, stem)
    x = torch.randn(2, 3, 32, 32)
    feats = model.features(x)
    assert [tuple(f.shape[1:]) for f in feats] == expected.get((name, stem), expected.get(name))
    if name != 'convnet':
        torch.testing.assert_close(feats[0], model.stem(x))  # index 0 is the stem output


def test_forward_does_not_build_the_feature_list(monkeypatch):
    model = create_model('resnet10', NUM_CLASSES, 3, 32)
    monkeypatch.setattr(model, 'features', lambda x: pytest.fail('forward called features()'))
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, NUM_CLASSES)


@pytest.mark.parametrize('name', ['resnet10_ap', 'resnet18_ap', 'resnet50_ap'])
@pytest.mark.parametrize('stem', ['cifar', 'imagenet'])
def test_resnet_ap_init_and_no_conv_bias(name, stem):
    torch.manual_seed(0)
    model = create_model(name, NUM_CLASSES, 3, 32, stem=stem)
    assert isinstance(model, ResNet)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(m.bias is None for m in convs)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert (m.weight == 1).all() and (m.bias == 0).all()
    big = max(convs, key=lambda m: m.weight.numel())  # He normal, fan out
    k = big.kernel_size[0]
    std = (2 / (k * k * big.out_channels)) ** 0.5
    assert abs(big.weight.std().item() / std - 1) < 0.05
    assert abs(big.weight.mean().item()) < 0.05 * std


def test_densenet_uses_input_channels():
    model = create_model('densenet', NUM_CLASSES, 1, 28)
    assert model.stem.in_channels == 1
    assert model.fc.in_features == 384  # DenseNet-121 at growth 12
