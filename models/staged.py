"""The shape every classifier here shares: stem -> stages -> pool -> fc."""
import torch
import torch.nn as nn


class StagedNet(nn.Module):
    """Subclasses set `stem`, `stages` (a ModuleList), `pool` and `fc`.

    `features(x)` returns the layer list that feature matching (`--match feat`) indexes, in the
    official `get_feature` order: [stem output] + one entry per stage + [pooled vector, logits].
    The two class flags below say which of the bracketed extras an architecture reports:
    ResNet has both (7 entries), ResNetAP only the stem (5), ConvNet neither (its 3 blocks).
    `forward(x)` computes the logits alone and never builds the list; `embed(x)` the vector before fc.
    """

    feature_stem = True  # the list starts with the stem's output
    feature_head = True  # the list ends with the pooled, flattened vector and the logits

    def forward(self, x):
        return self.fc(self.embed(x))

    def embed(self, x):
        """The penultimate features: the pooled, flattened vector the classifier head reads
        (validate.py --select kmeans clusters images by it)."""
        x = self.stem(x)
        for stage in self.stages:
            x = stage(x)
        return self.flat(x)

    def flat(self, x):
        # An explicit NCHW copy first: under channels-last, torch 2.14's compiled graphs believe the
        # pooled map is NCHW-contiguous (so .contiguous() is traced away) and trace flatten as a view,
        # which fails at run time on the real channels-last tensor ("view size is not compatible").
        # The values are those of a plain flatten either way.
        return self.pool(x).clone(memory_format=torch.contiguous_format).flatten(1)

    def features(self, x):
        x = self.stem(x)
        feats = [x] if self.feature_stem else []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        if self.feature_head:
            x = self.flat(x)
            feats += [x, self.fc(x)]
        return feats
