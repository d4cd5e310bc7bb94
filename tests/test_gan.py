import pytest
import torch

from models import Discriminator, Generator, conditional_noise

SHAPES = [(1, 28), (3, 32), (3, 28), (1, 32)]  # (channels, img_size)


@pytest.mark.parametrize('channels,img_size', SHAPES)
@pytest.mark.parametrize('num_classes,dim_noise', [(10, 100), (7, 100), (20, 100), (10, 64)])
def test_generator_discriminator_shapes(channels, img_size, num_classes, dim_noise):
    width = 16  # small width keeps the test fast; the default is checked below
    gen = Generator(num_classes, channels, img_size, dim_noise=dim_noise, width=width)
    disc = Discriminator(num_classes, channels, img_size, width=width)
    labels = torch.tensor([0, num_classes - 1, 1])

    z = conditional_noise(labels, num_classes, dim_noise)
    assert z.shape == (3, dim_noise)
    assert gen.project[0].in_features == dim_noise  # input Linear follows dim_noise
    img = gen(z)
    assert img.shape == (3, channels, img_size, img_size)
    assert img.min() >= -1 and img.max() <= 1

    critic, logits = disc(img)
    assert critic.shape == (3,)
    assert logits.shape == (3, num_classes)
    (critic.mean() + logits.logsumexp(1).mean()).backward()
    for name, p in list(gen.named_parameters()) + list(disc.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize('img_size', [28, 32])
def test_default_width(img_size):
    gen, disc = Generator(10, 3, img_size), Discriminator(10, 3, img_size)
    assert gen.config['width'] == 196 and gen.config['dim_noise'] == 100
    assert disc.critic.in_features == 196
    img = gen(conditional_noise(torch.arange(2), 10, 100))
    assert img.shape == (2, 3, img_size, img_size)
    critic, logits = disc(img)
    assert critic.shape == (2,) and logits.shape == (2, 10)


def test_conditional_noise_one_hot_prefix():
    torch.manual_seed(0)
    labels = torch.tensor([3, 0, 9, 3])
    z = conditional_noise(labels, 10, 100)
    torch.testing.assert_close(z[:, :10], torch.eye(10)[labels])
    rest = z[:, 10:]
    assert rest.std() > 0.5  # still Gaussian noise, not zeros/ones
    assert not torch.equal(z[0, 10:], z[3, 10:])  # same label, different noise
    assert z.dtype == torch.float32 and z.device == labels.device


def test_conditional_noise_uses_global_rng():
    labels = torch.tensor([1, 2])
    torch.manual_seed(123)
    a = conditional_noise(labels, 5, 32)
    torch.manual_seed(123)
    b = conditional_noise(labels, 5, 32)
    torch.testing.assert_close(a, b)


def test_conditional_noise_rejects_small_dim():
    with pytest.raises(ValueError, match='dim_noise'):
        conditional_noise(torch.tensor([0]), 20, 16)
    conditional_noise(torch.tensor([0]), 16, 16)  # equal is allowed


@pytest.mark.parametrize('cls', [Generator, Discriminator])
def test_bad_img_size(cls):
    with pytest.raises(ValueError, match='img_size'):
        cls(10, 3, 64)


@pytest.mark.parametrize('img_size', [28, 32])
def test_config_round_trip(img_size):
    gen = Generator(7, 1, img_size, dim_noise=64, width=16)
    assert gen.config == dict(num_classes=7, channels=1, img_size=img_size, dim_noise=64, width=16)
    assert (gen.num_classes, gen.dim_noise) == (7, 64)
    clone = Generator(**gen.config)
    clone.load_state_dict(gen.state_dict())
    gen.eval(), clone.eval()
    z = conditional_noise(torch.tensor([0, 6]), 7, 64)
    torch.testing.assert_close(clone(z), gen(z))

    disc = Discriminator(7, 1, img_size, width=16)
    clone_d = Discriminator(**disc.config)
    clone_d.load_state_dict(disc.state_dict())
    x = torch.randn(2, 1, img_size, img_size)
    torch.testing.assert_close(clone_d(x), disc(x))


def test_discriminator_gradient_penalty_double_backward():
    # WGAN-GP differentiates the critic's input gradient, so double backward must work
    disc = Discriminator(10, 3, 32, width=16)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    critic, _ = disc(x)
    (grad,) = torch.autograd.grad(critic.sum(), x, create_graph=True)
    ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean().backward()
    # every conv and the critic weight get a second-order gradient (biases of the
    # last layers and the class head do not influence d critic / d x)
    convs = [m for m in disc.net if isinstance(m, torch.nn.Conv2d)]
    assert all(torch.isfinite(m.weight.grad).all() for m in convs)
    assert disc.critic.weight.grad is not None
