"""ProtoPNet: a classifier that explains itself by prototypical parts (Chen, Li, Tao, Barnett, Su &
Rudin, 2019, "This Looks Like That: Deep Learning for Interpretable Image Recognition", NeurIPS,
arXiv:1806.10574), as used to expose source-specific cues in chest X-rays by Gautam et al. (2022).

    x (N, C_in, H, W) -> trunk -> (N, C, h, w) -> add-on 1x1 convs, sigmoid -> z (N, D, h, w)
      -> squared L2 distance to each prototype p_j (1 x 1 x D): d (N, P, h, w)
      -> similarity log((d + 1) / (d + eps)) (N, P, h, w) -> max over positions: scores (N, P)
      -> last layer (K x P, no bias) -> logits (N, K)

``P = K * per_class`` prototypes, ``per_class`` (default 10) belonging to each class; the last
layer starts class-connected (+1 to its own class, -0.5 to the others). The trunk is any
registered architecture's convolutional part (:attr:`ArchSpec.trunk`): ``protopnet:resnet18``,
``protopnet:densenet121``, ...

Training (:mod:`cxr_audit.training.protopnet`) follows the paper's three steps; the
projection onto training patches is recorded in the checkpoint. The model holds no state between
forward passes (the training costs hook :attr:`ProtoPNet.prototypes`), so it copies and pickles
like any module.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

#: ProtoPNet's similarity ``log((d + 1) / (d + eps))``: large where a patch is close to a prototype
SIMILARITY_EPS = 1e-4
PROTOTYPE_DEPTH = 128
PROTOTYPES_PER_CLASS = 10


class PrototypeDistances(nn.Module):
    """Squared L2 distance of every feature position to every prototype: ``z (N, D, h, w)`` ->
    ``(N, P, h, w)``, from ``|z|^2 - 2 z.p + |p|^2`` (one 1x1 convolution), clipped at 0."""

    def __init__(self, num_prototypes: int, depth: int):
        super().__init__()
        self.vectors = nn.Parameter(torch.rand(num_prototypes, depth, 1, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z_sq = (z * z).sum(1, keepdim=True)
        p_sq = (self.vectors * self.vectors).sum((1, 2, 3)).view(1, -1, 1, 1)
        cross = nn.functional.conv2d(z, self.vectors)
        return (z_sq - 2 * cross + p_sq).clamp_min(0)


class L2Similarity(nn.Module):
    """``log((d + 1) / (d + eps))`` elementwise: distance maps -> similarity maps, same shape."""

    def forward(self, distances: torch.Tensor) -> torch.Tensor:
        return torch.log((distances + 1) / (distances + SIMILARITY_EPS))


class ProtoPNet(nn.Module):
    """See the module docstring. ``trunk``: an ``nn.Module`` mapping images to ``(N, C, h, w)``
    non-negative features; ``trunk_channels``: its ``C``."""

    def __init__(self, trunk: nn.Module, trunk_channels: int, num_classes: int,
                 per_class: int = PROTOTYPES_PER_CLASS, depth: int = PROTOTYPE_DEPTH):
        super().__init__()
        self.features = trunk
        self.add_on = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(trunk_channels, depth, 1)), ("relu", nn.ReLU()),
            ("conv2", nn.Conv2d(depth, depth, 1)), ("sigmoid", nn.Sigmoid())]))
        num_prototypes = num_classes * per_class
        self.prototypes = PrototypeDistances(num_prototypes, depth)
        self.similarity = L2Similarity()
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.last_layer = nn.Linear(num_prototypes, num_classes, bias=False)
        self.register_buffer("prototype_class", torch.arange(num_prototypes) // per_class)
        with torch.no_grad():
            self.last_layer.weight.copy_(torch.where(self.class_identity().bool(), 1.0, -0.5))

    def class_identity(self) -> torch.Tensor:
        """``(K, P)`` 1 where prototype ``j`` belongs to class ``k``."""
        classes = torch.arange(self.last_layer.out_features, device=self.prototype_class.device)
        return (self.prototype_class[None, :] == classes[:, None]).float()

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """The add-on features ``z (N, D, h, w)`` the prototypes live among."""
        return self.add_on(self.features(x))

    def min_distances(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, P)`` each prototype's smallest distance to a patch of each image."""
        return self.prototypes(self.latent(x)).flatten(2).amin(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.pool(self.similarity(self.prototypes(self.latent(x)))).flatten(1)
        return self.last_layer(scores)


def cell_box(cell: int, grid: tuple[int, int], size: int) -> list[int]:
    """``[y0, x0, y1, x1]`` in input pixels (``size`` x ``size``) of feature cell ``cell`` (row-major)
    of a ``grid = (h, w)`` feature map: the patch a prototype at that cell stands for."""
    h, w = int(grid[0]), int(grid[1])
    r, c = divmod(int(cell), w)
    return [r * size // h, c * size // w, -(-(r + 1) * size // h), -(-(c + 1) * size // w)]


def protopnet_builder(backbone: str):
    """``build(num_classes, in_channels, image_size)`` of ``protopnet:<backbone>``."""

    def build(num_classes: int, in_channels: int, image_size: int) -> nn.Module:
        from cxr_audit.models.architectures import build_model, spec_of

        trunk = spec_of(backbone).trunk(build_model(backbone, num_classes, in_channels, image_size))
        with torch.no_grad():
            channels = trunk.eval()(torch.zeros(1, in_channels, image_size, image_size)).shape[1]
        return ProtoPNet(trunk.train(), channels, num_classes)
    return build


def protopnet_layers(model: nn.Module) -> list[str]:
    """What a scan records: the trunk's output, the add-on features and the similarity maps (their
    spatial max per prototype is the prototype's score: the "concepts" of a ProtoPNet)."""
    last = list(model.features.named_children())[-1][0]
    return [f"features.{last}", "add_on", "similarity"]
