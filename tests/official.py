"""The official DiM generator and discriminator, written from the checkpoint layout alone
(the project's notes on the official code, DIM_REFERENCE.md: "Generator", "Discriminator", "Checkpoint
layout"), and a checkpoint file as the official code writes it: {generator, discriminator, optim_g, optim_d}, state
dicts only. The tests load such files through this repository and compare what the networks compute.

`order` sets the module registration order (hence the state-dict key order and the optimizer's
parameter order): 'interleaved' (fc1, bn0, conv1, bn1, ... / conv1, ln1, conv2, ln2, ...) or 'grouped'
(every conv first, then every norm). A loader must derive the parameter order from the file, not assume
one.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

WIDTH = 196  # the official width
STRIDES = (1, 2, 1, 2, 1, 1, 1, 2)


def _register(module, entries, order):
    if order == 'grouped':  # linear/conv layers first, then the norms
        entries = sorted(entries, key=lambda e: e[0].startswith(('bn', 'ln')))
    elif order != 'interleaved':
        raise ValueError(order)
    for name, layer in entries:
        setattr(module, name, layer)


class OfficialGenerator(nn.Module):
    def __init__(self, channels=3, img_size=32, dim_noise=100, width=WIDTH, order='interleaved'):
        super().__init__()
        self.width, self.dim_noise, self.num_classes = width, dim_noise, 10  # for validate.draw_fixed_set
        w = width
        entries = [('fc1', nn.Linear(dim_noise, w * 4 * 4)), ('bn0', nn.BatchNorm1d(w * 4 * 4)),
                   ('conv1', nn.ConvTranspose2d(w, w, 3 if img_size == 28 else 4, stride=2, padding=1)),
                   ('bn1', nn.BatchNorm2d(w))]
        for i in (2, 3, 4):
            entries += [(f'conv{i}', nn.Conv2d(w, w, 3, padding=1)), (f'bn{i}', nn.BatchNorm2d(w))]
        entries += [('conv5', nn.ConvTranspose2d(w, w, 4, stride=2, padding=1)), ('bn5', nn.BatchNorm2d(w)),
                    ('conv6', nn.Conv2d(w, w, 3, padding=1)), ('bn6', nn.BatchNorm2d(w)),
                    ('conv7', nn.ConvTranspose2d(w, w, 4, stride=2, padding=1)), ('bn7', nn.BatchNorm2d(w)),
                    ('conv8', nn.Conv2d(w, channels, 3, padding=1))]
        _register(self, entries, order)

    def forward(self, z):
        x = F.relu(self.bn0(self.fc1(z))).view(-1, self.width, 4, 4)
        for i in range(1, 8):
            x = F.relu(getattr(self, f'bn{i}')(getattr(self, f'conv{i}')(x)))
        return torch.tanh(self.conv8(x))


class OfficialDiscriminator(nn.Module):
    def __init__(self, channels=3, img_size=32, width=WIDTH, order='interleaved'):
        super().__init__()
        self.width = width
        entries, in_ch, size = [], channels, img_size
        for i, stride in enumerate(STRIDES, 1):
            size = (size - 1) // stride + 1
            entries += [(f'conv{i}', nn.Conv2d(in_ch, width, 3, stride, 1)),
                        (f'ln{i}', nn.LayerNorm([width, size, size]))]
            in_ch = width
        entries += [('fc1', nn.Linear(width, 1)), ('fc10', nn.Linear(width, 10))]
        _register(self, entries, order)

    def forward(self, x):
        for i in range(1, 9):
            x = F.leaky_relu(getattr(self, f'ln{i}')(getattr(self, f'conv{i}')(x)), 0.01)
        x = F.max_pool2d(x, 4).view(-1, self.width)
        return self.fc1(x), self.fc10(x)


def _perturb_norms(module, gen):
    """Norm weights and biases away from 1 and 0, BatchNorm running statistics away from 0 and 1."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
                m.num_batches_tracked.fill_(1234)


def make_official(channels, img_size, seed=0, order='interleaved', width=WIDTH, steps=2, batch=2):
    """(G, D, opt_g, opt_d): random official networks after a few real Adam steps (betas (0, 0.9), as
    the official stage 1), then BatchNorm statistics set to random values."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    G = OfficialGenerator(channels, img_size, width=width, order=order)
    D = OfficialDiscriminator(channels, img_size, width=width, order=order)
    _perturb_norms(G, gen)
    _perturb_norms(D, gen)
    opt_g = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.0, 0.9))
    opt_d = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.0, 0.9))
    for _ in range(steps):
        labels = torch.randint(10, (batch,), generator=gen)
        z = torch.randn(batch, 100, generator=gen)
        z[:, :10] = F.one_hot(labels, 10).float()
        real = torch.rand(batch, channels, img_size, img_size, generator=gen) * 2 - 1
        fake = G(z)
        critic, logits = D(fake)
        opt_g.zero_grad()
        (-critic.mean() + F.cross_entropy(logits, labels)).backward()
        opt_g.step()
        (c_real, l_real), (c_fake, _) = D(real), D(fake.detach())
        opt_d.zero_grad()
        (c_fake.mean() - c_real.mean() + F.cross_entropy(l_real, labels)).backward()
        opt_d.step()
    _perturb_norms(G, gen)  # running statistics not just a few momentum steps from (0, 1)
    return G, D, opt_g, opt_d


def save_official(path, channels, img_size, **kwargs):
    """Write an official checkpoint (state dicts only) to `path`; returns (G, D, opt_g, opt_d)."""
    G, D, opt_g, opt_d = make_official(channels, img_size, **kwargs)
    torch.save({'generator': G.state_dict(), 'discriminator': D.state_dict(),
                'optim_g': opt_g.state_dict(), 'optim_d': opt_d.state_dict()}, path)
    return G, D, opt_g, opt_d
