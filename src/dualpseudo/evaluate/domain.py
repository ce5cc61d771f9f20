"""Domain features: the penultimate layer of a classifier trained on the dataset itself, for a domain Fréchet
distance. Inception features of 28 px grey images upsampled to 299 px say little about Fashion-MNIST; the
features of an in-domain classifier (the oracle, trained elsewhere) complement FID.

Protocol (kept generic, no import of `classify/`): a classifier network exposes
    features(x) -> (N, D)    penultimate features of a float batch x (N, C, H, W); a spatial map
                             (N, D, h, w) is accepted and global-average-pooled to (N, D)
    head                     the module mapping features to logits, head(features(x)) == model(x)
Only `features` is used here. How uint8 images become the network's input is the classifier's business, so
the caller passes its `preprocess`; the default maps uint8 (N, H, W, C) to float (N, C, H, W) in [-1, 1].
"""
from __future__ import annotations

from typing import Callable

import torch


def uint8_to_signed_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


class DomainFeatures(torch.nn.Module):
    """A feature function for `extract_features`: uint8 (N, H, W, C) -> float32 (N, D) classifier features."""

    def __init__(self, model: torch.nn.Module,
                 preprocess: Callable[[torch.Tensor], torch.Tensor] = uint8_to_signed_unit):
        super().__init__()
        if not callable(getattr(model, "features", None)):
            raise TypeError(f"{type(model).__name__} has no features(x) -> (N, D) method; a domain feature "
                            "extractor needs a classifier network that exposes features(x) and head")
        self.model = model
        self.preprocess = preprocess

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feats = self.model.features(self.preprocess(images))               # (N, D) or (N, D, h, w)
        if feats.ndim > 2:
            feats = feats.mean(dim=tuple(range(2, feats.ndim)))             # global average pool -> (N, D)
        return feats.float()


def domain_feature_fn(model: torch.nn.Module,
                      preprocess: Callable[[torch.Tensor], torch.Tensor] = uint8_to_signed_unit) -> DomainFeatures:
    """Wrap a classifier exposing `.features(x) -> (N, D)` as a feature function (see module docstring)."""
    return DomainFeatures(model, preprocess)
