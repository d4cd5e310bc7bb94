import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gen_condense import gradient_penalty
from utils.augment import (GRAD_WEIGHT, METRICS, MATCH_LOSSES, DiffAug, dist, feature_match_loss,
                           gradient_match_loss, logit_match_loss)


class TinyNet(nn.Module):
    """conv -> BN -> ReLU -> conv -> ReLU -> pool -> fc, with a features() list."""

    def __init__(self, channels=3, num_classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def features(self, x):
        h1 = F.relu(self.bn1(self.conv1(x)))
        h2 = F.relu(self.conv2(h1))
        h3 = F.adaptive_avg_pool2d(h2, 1).flatten(1)
        return [h1, h2, h3]

    def forward(self, x):
        return self.fc(self.features(x)[-1])


class TinyGenerator(nn.Module):
    def __init__(self, z_dim=8, shape=(3, 8, 8)):
        super().__init__()
        self.shape = shape
        self.fc = nn.Linear(z_dim, shape[0] * shape[1] * shape[2])

    def forward(self, z):
        return torch.tanh(self.fc(z)).view(-1, *self.shape)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = TinyNet()
    gen = TinyGenerator()
    real = torch.randn(6, 3, 8, 8)
    z = torch.randn(6, 8)
    labels = torch.arange(6) % 5
    return model, gen, real, z, labels


# --------------------------------------------------------------------------- gradient penalty
def linear_critic(w):
    return lambda x: x.flatten(1) @ w


@pytest.mark.parametrize('norm,expected', [(1.0, 0.0), (3.0, 40.0), (0.5, 2.5)])
def test_gradient_penalty_of_linear_critic(norm, expected):
    # f(x) = <w, x> has gradient w everywhere, whatever the interpolates are
    torch.manual_seed(0)
    w = torch.randn(3 * 4 * 4, dtype=torch.float64)
    w = w / w.norm() * norm
    real, fake = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(5, 3, 4, 4, dtype=torch.float64)
    gp = gradient_penalty(linear_critic(w), real, fake)
    assert gp.shape == () and abs(float(gp) - expected) < 1e-9
    assert abs(float(gradient_penalty(linear_critic(w), real, fake, weight=1.0)) - expected / 10) < 1e-9


def test_gradient_penalty_double_backward_gives_analytic_weight_gradient():
    torch.manual_seed(0)
    w = torch.randn(3 * 4 * 4, dtype=torch.float64)
    w = (w / w.norm() * 3.0).requires_grad_(True)
    real, fake = torch.randn(5, 3, 4, 4, dtype=torch.float64), torch.randn(5, 3, 4, 4, dtype=torch.float64)
    gp = gradient_penalty(linear_critic(w), real, fake)
    gp.backward()
    # d/dw 10 (||w|| - 1)^2 = 20 (||w|| - 1) w / ||w||
    expected = 20 * (3.0 - 1) * w.detach() / 3.0
    assert torch.allclose(w.grad, expected, atol=1e-10)


def test_gradient_penalty_uses_alpha_per_sample():
    # f(x) = ||x||^2 / 2 has gradient x, so the norm is ||x_hat|| of each interpolate
    torch.manual_seed(0)
    real, fake = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(4, 2, 3, 3, dtype=torch.float64)
    alpha = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)

    def critic(x):
        return 0.5 * (x.flatten(1) ** 2).sum(1)

    x_hat = alpha.view(-1, 1, 1, 1) * real + (1 - alpha.view(-1, 1, 1, 1)) * fake
    expected = 10 * ((x_hat.flatten(1).norm(dim=1) - 1) ** 2).mean()
    assert torch.allclose(gradient_penalty(critic, real, fake, alpha=alpha), expected)


def test_gradient_penalty_trains_a_conv_critic():
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 6 * 6, 1))
    fake = torch.randn(4, 3, 8, 8, requires_grad=True)
    gp = gradient_penalty(lambda x: critic(x).view(-1), torch.randn(4, 3, 8, 8), fake)
    gp.backward()
    # every weight shapes the input gradient (the output bias does not)
    for p in (critic[0].weight, critic[0].bias, critic[3].weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert fake.grad is None                           # the penalty constrains the critic only


# --------------------------------------------------------------------------- logit matching
def siamese():
    return DiffAug('color_crop_cutout', batch=True)


@pytest.mark.parametrize('augment', [None, 'siamese'])
def test_logit_match_zero_for_identical(setup, augment):
    model, _, real, _, _ = setup
    aug = siamese() if augment else None
    for seed in range(5):
        torch.manual_seed(seed)
        assert logit_match_loss(model, real, real.clone(), aug).item() == 0.0


def test_logit_match_value_and_gradient_to_generator(setup):
    model, gen, real, z, _ = setup
    fake = gen(z)
    loss = logit_match_loss(model, real, fake)
    expected = 0.01 * ((F.log_softmax(model(real), 1) - F.log_softmax(model(fake), 1)) ** 2).mean()
    assert loss > 0 and torch.allclose(loss, expected)
    loss.backward()
    assert gen.fc.weight.grad is not None and gen.fc.weight.grad.abs().sum() > 0


def test_logit_match_with_augment_reaches_generator(setup):
    model, gen, real, z, _ = setup
    torch.manual_seed(1)
    loss = logit_match_loss(model, real, gen(z), siamese())
    loss.backward()
    assert loss > 0 and gen.fc.weight.grad.abs().sum() > 0


def test_logit_match_rejects_per_sample_augment_and_unpaired_batches(setup):
    model, _, real, _, _ = setup
    with pytest.raises(ValueError):
        logit_match_loss(model, real, real, DiffAug('color', batch=False))
    with pytest.raises(ValueError):
        logit_match_loss(model, real, real[:3])


# --------------------------------------------------------------------------- distance
D64 = dict(dtype=torch.float64)


def test_dist_hand_computed_2d():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], **D64)
    y = torch.tensor([[1.0, 0.0, 3.0], [0.0, 5.0, 8.0]], **D64)     # x - y = [[0, 2, 0], [4, 0, -2]]
    assert float(dist(x, y, 'mse')) == 24.0
    assert float(dist(x, y, 'l1')) == 8.0
    # mean over the row, summed over rows: 2/3 + 6/3 (not the global mean 8/6)
    assert math.isclose(float(dist(x, y, 'l1_mean')), 8 / 3, rel_tol=1e-12)
    cos = (1 - 10 / (math.sqrt(14 * 10) + 1e-6)) + (1 - 73 / (math.sqrt(77 * 89) + 1e-6))
    assert math.isclose(float(dist(x, y, 'cos')), cos, rel_tol=1e-12)


def test_dist_l1_mean_sums_over_the_first_dim_only():
    torch.manual_seed(0)
    x, y = torch.randn(3, 4, 5, **D64), torch.randn(3, 4, 5, **D64)
    expected = sum((x[i] - y[i]).abs().mean() for i in range(3))
    assert torch.allclose(dist(x, y, 'l1_mean'), expected)


def test_dist_cos_adds_eps_and_keeps_zero_rows():
    # a zero row counts 1 (no row is dropped); tiny rows are pulled towards 1 by the additive eps
    x = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1e-4, 0.0]], **D64)
    y = torch.tensor([[0.0, 1.0], [0.0, 0.0], [1e-4, 0.0]], **D64)
    expected = 1.0 + 1.0 + (1 - 1e-8 / (1e-8 + 1e-6))
    assert math.isclose(float(dist(x, y, 'cos')), expected, rel_tol=1e-12)
    # parallel rows of any length: 1 - |x||y| / (|x||y| + eps)
    a, b = torch.tensor([[1.0, 2.0]], **D64), torch.tensor([[3.0, 6.0]], **D64)
    assert math.isclose(float(dist(a, b, 'cos')), 1 - 15 / (15 + 1e-6), rel_tol=1e-6, abs_tol=1e-15)
    assert math.isclose(float(dist(a, -b, 'cos')), 1 + 15 / (15 + 1e-6), rel_tol=1e-12)


def test_dist_on_1d_tensors_works_per_element():
    x = torch.tensor([1.0, -2.0, 0.0, 3.0], **D64)
    y = torch.tensor([2.0, 1.0, 5.0, 3.0], **D64)
    # cos: sum over elements of 1 - x*y / (|x||y| + eps): ~0 + ~2 + 1 + ~0
    expected = sum(1 - a * b / (abs(a) * abs(b) + 1e-6) for a, b in zip(x.tolist(), y.tolist()))
    assert math.isclose(float(dist(x, y, 'cos')), expected, rel_tol=1e-12)
    assert abs(expected - 3.0) < 1e-5
    # l1_mean: the first dimension is the element, so it equals l1
    assert float(dist(x, y, 'l1_mean')) == float(dist(x, y, 'l1')) == 9.0
    assert float(dist(x, y, 'mse')) == 1 + 9 + 25 + 0


def test_dist_cos_gradient_finite_through_zero_rows():
    gf = torch.zeros(2, 3, requires_grad=True)
    dist(torch.ones(2, 3), gf + torch.tensor([[1.0, 0, 0], [0, 0, 0]]), 'cos').backward()
    assert torch.isfinite(gf.grad).all()


def test_dist_unknown_metric():
    assert sorted(METRICS) == ['cos', 'l1', 'l1_mean', 'mse']
    with pytest.raises(ValueError, match='l1_mean'):
        dist(torch.ones(2), torch.ones(2), 'l2')


# --------------------------------------------------------------------------- feature matching
@pytest.mark.parametrize('augment', [None, 'siamese'])
def test_feature_match_zero_for_identical(setup, augment):
    model, _, real, _, _ = setup
    torch.manual_seed(0)
    for metric in ('l1', 'mse', 'l1_mean'):
        loss = feature_match_loss(model, real, real.clone(), 0, 2, metric, siamese() if augment else None)
        assert loss.item() == 0.0


def hand_dist(a, b, metric):
    d = a - b
    return {'mse': (d ** 2).sum(), 'l1': d.abs().sum(),
            'l1_mean': d.abs().reshape(len(d), -1).mean(1).sum(),
            'cos': (1 - (a.reshape(len(a), -1) * b.reshape(len(b), -1)).sum(1)
                    / (a.reshape(len(a), -1).norm(dim=1) * b.reshape(len(b), -1).norm(dim=1) + 1e-6)).sum()}[metric]


@pytest.mark.parametrize('idx_from,idx_to,layers', [(0, -1, [0]), (1, -1, [1]), (2, -1, [2]), (0, 0, [0]),
                                                    (1, 2, [1, 2]), (0, 2, [0, 1, 2])])
def test_feature_match_layer_range(setup, idx_from, idx_to, layers):
    # idx_to = -1 means the single layer idx_from, not "up to the last layer"
    model, gen, real, z, _ = setup
    fake = gen(z)
    loss = feature_match_loss(model, real, fake, idx_from=idx_from, idx_to=idx_to, metric='mse')
    fr, ff = model.features(real), model.features(fake)
    expected = 0.001 * sum(((fr[i].mean(0) - ff[i].mean(0)) ** 2).sum() for i in layers)
    assert loss > 0 and torch.allclose(loss, expected)
    loss.backward()
    assert gen.fc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('metric', ['l1', 'mse', 'l1_mean', 'cos'])
def test_feature_match_honours_metric(setup, metric):
    # layers 1 (a [C, H, W] mean) and 2 (a 1-D pooled vector mean)
    model, gen, real, z, _ = setup
    fake = gen(z)
    loss = feature_match_loss(model, real, fake, idx_from=1, idx_to=2, metric=metric)
    fr, ff = model.features(real), model.features(fake)
    expected = 0.001 * sum(hand_dist(fr[i].mean(0), ff[i].mean(0), metric) for i in (1, 2))
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert torch.allclose(feature_match_loss(model, real, fake),                     # default: layer 0, l1
                          0.001 * hand_dist(fr[0].mean(0), ff[0].mean(0), 'l1'), rtol=1e-5)
    loss.backward()
    assert gen.fc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize('idx_from,idx_to', [(3, -1), (0, 3), (2, 1), (-1, -1), (-2, -1), (0, -2)])
def test_feature_match_bad_layer_range(setup, idx_from, idx_to):
    model, _, real, _, _ = setup
    with pytest.raises(ValueError, match='3 layers') as err:
        feature_match_loss(model, real, real, idx_from=idx_from, idx_to=idx_to)
    assert '\n' not in str(err.value)
    with pytest.raises(ValueError, match='l1'):
        feature_match_loss(model, real, real, metric='l2')


def test_feature_match_with_augment_and_unequal_batches(setup):
    model, gen, real, z, _ = setup
    torch.manual_seed(0)
    loss = feature_match_loss(model, real, gen(z[:4]), augment=siamese())
    loss.backward()
    assert loss > 0 and gen.fc.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        feature_match_loss(model, real, real, augment=DiffAug('color', batch=False))


# --------------------------------------------------------------------------- gradient matching
@pytest.mark.parametrize('metric', sorted(METRICS))
def test_gradient_match_zero_for_identical(setup, metric):
    model, _, real, _, labels = setup
    for bias, fc in [(False, False), (True, True)]:
        loss = gradient_match_loss(model, real, labels, real.clone(), labels, metric, bias=bias, fc=fc)
        if metric == 'cos':
            # 1 - |g|^2 / (|g|^2 + eps) per row is not 0 for a small gradient row (eps is additive),
            # up to 1 for a zero one, such as the conv biases right before BatchNorm (1-D: one row
            # per element): the reference's value
            params = list(model.parameters()) if bias else [model.conv1.weight, model.conv2.weight]
            g = torch.autograd.grad(F.cross_entropy(model(real), labels), params)
            expected = 0.001 * sum(hand_dist(a, a.clone(), 'cos') for a in g)
            assert torch.allclose(loss, expected, rtol=1e-3, atol=1e-9)
        else:
            assert abs(loss.item()) < 1e-5


@pytest.mark.parametrize('metric', sorted(METRICS))
def test_gradient_match_positive_and_reaches_fake(setup, metric):
    model, gen, real, z, labels = setup
    fake = gen(z)
    loss = gradient_match_loss(model, real, labels, fake, labels, metric)
    assert loss > 1e-7
    loss.backward()
    assert gen.fc.weight.grad is not None and gen.fc.weight.grad.abs().sum() > 0
    assert torch.isfinite(gen.fc.weight.grad).all()


class ConvBNLinear(nn.Module):
    """conv (with bias) -> ReLU -> BatchNorm -> global pool -> Linear: 4-D, 1-D x 5 and 2-D parameters
    (ReLU before the norm, so the conv bias gets a non-zero gradient)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)
        with torch.no_grad():     # non-trivial norm parameters, so their gradients differ from the defaults'
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.fc(self.bn(F.relu(self.conv(x))).mean([2, 3]))


def test_gradient_match_picks_parameters_by_dimension():
    torch.manual_seed(0)
    model = ConvBNLinear()
    real, fake = torch.randn(6, 3, 6, 6), torch.randn(6, 3, 6, 6)
    labels = torch.arange(6) % 5
    names = [n for n, _ in model.named_parameters()]

    def grads(x):
        return dict(zip(names, torch.autograd.grad(F.cross_entropy(model(x), labels), list(model.parameters()))))

    gr, gf = grads(real), grads(fake)

    def expected(chosen):
        return 0.001 * sum(((gr[n] - gf[n]) ** 2).sum() for n in chosen)

    one_d = ['conv.bias', 'bn.weight', 'bn.bias', 'fc.bias']        # biases AND norm weights
    cases = {
        (False, False): ['conv.weight'],
        (True, False): ['conv.weight'] + one_d,                     # the fc bias is 1-D: it comes with bias
        (False, True): ['conv.weight', 'fc.weight'],                # fc adds only the 2-D weight
        (True, True): names,
    }
    assert GRAD_WEIGHT == 0.001
    for (bias, fc), chosen in cases.items():
        loss = gradient_match_loss(model, real, labels, fake, labels, 'mse', bias=bias, fc=fc)
        assert torch.allclose(loss, expected(chosen), rtol=1e-5), (bias, fc)
    # all the 1-D gradients really differ, so leaving one out would show
    assert all(((gr[n] - gf[n]) ** 2).sum() > 1e-6 * ((gr['conv.weight'] - gf['conv.weight']) ** 2).sum()
               for n in one_d)


def test_gradient_match_metric_values(setup):
    model, _, real, _, labels = setup
    fake = torch.randn_like(real)
    params = [model.conv1.weight, model.conv2.weight]

    def grads(x):
        return torch.autograd.grad(F.cross_entropy(model(x), labels), params)

    gr, gf = grads(real), grads(fake)
    for metric in ('l1', 'mse', 'l1_mean', 'cos'):
        expected = 0.001 * sum(hand_dist(a, b, metric) for a, b in zip(gr, gf))
        loss = gradient_match_loss(model, real, labels, fake, labels, metric)
        assert torch.allclose(loss, expected, rtol=1e-4), metric


def test_gradient_match_unused_parameter_is_skipped():
    torch.manual_seed(0)
    model = ConvBNLinear()
    model.unused = nn.Conv2d(3, 3, 1)                    # 4-D, selected, but no gradient on either side
    x, labels = torch.randn(4, 3, 6, 6), torch.arange(4)
    loss = gradient_match_loss(model, x, labels, x.clone(), labels, 'l1')
    assert torch.isfinite(loss) and abs(loss.item()) < 1e-6


def test_gradient_match_unknown_metric(setup):
    model, _, real, _, labels = setup
    with pytest.raises(ValueError, match='l1'):
        gradient_match_loss(model, real, labels, real, labels, metric='l2')


def test_match_losses_table_passes_the_flags_through(setup):
    """The --match table computes each loss with the flags' options (idx, metric, bias, fc): a wrong
    or dropped option changes the value."""
    model, gen, real, z, labels = setup
    fake = gen(z).detach()
    opts = SimpleNamespace(idx_from=1, idx_to=2, metric='mse', bias=True, fc=True)
    expected = {'logit': logit_match_loss(model, real, fake),
                'feat': feature_match_loss(model, real, fake, idx_from=1, idx_to=2, metric='mse'),
                'grad': gradient_match_loss(model, real, labels, fake, labels, 'mse', bias=True, fc=True)}
    assert set(MATCH_LOSSES) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(MATCH_LOSSES[name](model, real, fake, labels, opts), value, rtol=0, atol=0)
    defaults = SimpleNamespace(idx_from=0, idx_to=-1, metric='l1', bias=False, fc=False)
    for name in ('feat', 'grad'):
        assert not torch.equal(MATCH_LOSSES[name](model, real, fake, labels, defaults), expected[name])


def test_losses_under_autocast(setup):
    model, gen, real, z, labels = setup
    with torch.autocast('cpu', dtype=torch.bfloat16):
        fake = gen(z)
        losses = [logit_match_loss(model, real, fake, siamese()),
                  feature_match_loss(model, real, fake),
                  gradient_match_loss(model, real, labels, fake, labels, 'cos'),
                  gradient_penalty(lambda x: model(x).sum(1), real, fake.detach())]
    for loss in losses:
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    sum(losses[:3]).backward()
    assert torch.isfinite(gen.fc.weight.grad).all() and gen.fc.weight.grad.abs().sum() > 0
