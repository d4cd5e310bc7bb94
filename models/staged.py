"""The shape every classifier here shares: stem -> stages -> pool -> fc."""
import torch
import torch.nn as nn


class StagedNet(nn.Module):
    """Subclasses set `stem`, `stages` (a ModuleList), `pool` and `fc`. `features()` exposes each
    stage's output and the pooled embedding, which feature matching compares layer by layer."""

    def features(self, x):
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        feats.append(torch.flatten(self.pool(x), 1))
        return feats

    def forward(self, x):
        return self.fc(self.features(x)[-1])
