import pytest
import torch
import torch.nn.functional as F
from torch import nn

from utils.augment import DiffAug
from utils.matching import (GRAD_METRICS, MATCH_LOSSES, feature_match_loss, gradient_match_loss,
                            gradient_penalty, logit_match_loss)


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


# --------------------------------------------------------------------------- feature matching
@pytest.mark.parametrize('augment', [None, 'siamese'])
def test_feature_match_zero_for_identical(setup, augment):
    model, _, real, _, _ = setup
    torch.manual_seed(0)
    assert feature_match_loss(model, real, real.clone(), siamese() if augment else None).item() == 0.0


@pytest.mark.parametrize('idx_from,idx_to,layers', [(0, -1, [0, 1, 2]), (0, 0, [0]), (1, 2, [1, 2]), (-2, -1, [1, 2])])
def test_feature_match_value_and_layer_range(setup, idx_from, idx_to, layers):
    model, gen, real, z, _ = setup
    fake = gen(z)
    loss = feature_match_loss(model, real, fake, idx_from=idx_from, idx_to=idx_to)
    fr, ff = model.features(real), model.features(fake)
    expected = 0.001 * sum(((fr[i].mean(0) - ff[i].mean(0)) ** 2).sum() for i in layers)
    assert loss > 0 and torch.allclose(loss, expected)
    loss.backward()
    assert gen.fc.weight.grad.abs().sum() > 0


def test_feature_match_with_augment_and_unequal_batches(setup):
    model, gen, real, z, _ = setup
    torch.manual_seed(0)
    loss = feature_match_loss(model, real, gen(z[:4]), siamese())
    loss.backward()
    assert loss > 0 and gen.fc.weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- gradient matching
@pytest.mark.parametrize('metric', sorted(GRAD_METRICS))
def test_gradient_match_zero_for_identical(setup, metric):
    model, _, real, _, labels = setup
    for bias, fc in [(False, False), (True, True)]:
        loss = gradient_match_loss(model, real, labels, real.clone(), labels, metric, bias=bias, fc=fc)
        assert abs(loss.item()) < 1e-5


@pytest.mark.parametrize('metric', sorted(GRAD_METRICS))
def test_gradient_match_positive_and_reaches_fake(setup, metric):
    model, gen, real, z, labels = setup
    fake = gen(z)
    loss = gradient_match_loss(model, real, labels, fake, labels, metric)
    assert loss > 1e-4
    loss.backward()
    assert gen.fc.weight.grad is not None and gen.fc.weight.grad.abs().sum() > 0
    assert torch.isfinite(gen.fc.weight.grad).all()


def test_gradient_match_parameter_selection(setup):
    model, _, real, _, labels = setup
    fake = torch.randn_like(real, requires_grad=True)

    def grads(x):
        loss = F.cross_entropy(model(x), labels)
        return dict(zip([n for n, _ in model.named_parameters()],
                        torch.autograd.grad(loss, list(model.parameters()))))

    gr, gf = grads(real), grads(fake.detach())

    def mse(names):
        return sum(((gr[n] - gf[n]) ** 2).sum() for n in names)

    conv = ['conv1.weight', 'conv2.weight']
    biases = ['conv1.bias', 'bn1.bias', 'conv2.bias', 'fc.bias']
    cases = {
        (False, False): conv,
        (True, False): conv + biases,
        (False, True): conv + ['fc.weight', 'fc.bias'],
        (True, True): conv + biases + ['fc.weight'],
    }
    for (bias, fc), names in cases.items():
        loss = gradient_match_loss(model, real, labels, fake, labels, 'mse', bias=bias, fc=fc)
        assert torch.allclose(loss, mse(set(names)), rtol=1e-5), (bias, fc)


def test_gradient_match_metric_values(setup):
    model, _, real, _, labels = setup
    fake = torch.randn_like(real)
    params = [model.conv1.weight, model.conv2.weight]

    def grads(x):
        return torch.autograd.grad(F.cross_entropy(model(x), labels), params)

    gr, gf = grads(real), grads(fake)
    expected = {
        'l1': sum((a - b).abs().sum() for a, b in zip(gr, gf)),
        'mse': sum(((a - b) ** 2).sum() for a, b in zip(gr, gf)),
        'l1_mean': sum((a - b).abs().mean() for a, b in zip(gr, gf)),
        'cos': sum((1 - (a * b).flatten(1).sum(1) / (a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1))).sum()
                   for a, b in zip(gr, gf)),
    }
    for metric, value in expected.items():
        assert torch.allclose(gradient_match_loss(model, real, labels, fake, labels, metric), value, rtol=1e-4), metric


def test_gradient_match_unknown_metric(setup):
    model, _, real, _, labels = setup
    with pytest.raises(ValueError, match='l1'):
        gradient_match_loss(model, real, labels, real, labels, metric='l2')


def test_match_losses_registry():
    assert MATCH_LOSSES == {'logit': logit_match_loss, 'feat': feature_match_loss, 'grad': gradient_match_loss}


def test_cos_metric_edge_cases():
    cos = GRAD_METRICS['cos']
    # channel 0 orthogonal -> 1; channel 1 has no gradient on either side -> left out
    assert torch.allclose(cos(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]])),
                          torch.tensor(1.0))
    # opposite channels -> 2, parallel ones -> 0 whatever their lengths
    assert torch.allclose(cos(torch.tensor([[1.0, 2.0]]), torch.tensor([[-2.0, -4.0]])), torch.tensor(2.0))
    assert torch.allclose(cos(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 6.0]])), torch.tensor(0.0), atol=1e-6)
    # a 1-D parameter is one vector, not per-element signs
    assert torch.allclose(cos(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])), torch.tensor(1 - 2 ** -0.5))
    # finite gradient through an all-zero channel
    gf = torch.zeros(2, 3, requires_grad=True)
    cos(torch.ones(2, 3), gf + torch.tensor([[1.0, 0, 0], [0, 0, 0]])).backward()
    assert torch.isfinite(gf.grad).all()


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
