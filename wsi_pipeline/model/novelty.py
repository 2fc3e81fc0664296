"""Novelty: how far a cell lies from every class the card was trained on.

A softmax always picks one of the card's classes, however unlike them a cell is: in real myeloma
marrow half the plasma cells (a class the card lacks) were named monocytes, artefacts or
neutrophils with confidence. The network's last feature space knows better. Each ensemble
member's pooled features (``forward_head(..., pre_logits=True)``) of the training split are
summarised as one Gaussian per class with a shared covariance (Lee et al. 2018); a cell's
*Mahalanobis distance* is its squared distance to the nearest class mean under that covariance.

The Gaussians are fitted on the training crops **as the training augmentation redraws them**, so
another lab's stain, focus or compression is familiar, and a cell type that no lab showed is not.
Each member's distances are divided by their median on the validation split; the ensemble's score
is the mean over members; the threshold is that score's ``quantile`` on the validation split (also
augmented). ``novelty = score / threshold``: above 1 a cell is unlike the known classes and is
counted as uncertain, whatever its confidence.

The means, precision matrices and scales live in ``NAME.novelty.safetensors`` beside the card;
the card's ``[novelty]`` table names the file, its SHA-256, the quantile and the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from safetensors.torch import load_file, save_file

from wsi_pipeline.core.files import atomic_path

__all__ = [
    "DEFAULT_QUANTILE",
    "FeatureGaussians",
    "NoveltyModel",
    "features_and_logits",
    "fit_gaussians",
]

#: Share of the validation split's (known) cells below the threshold.
DEFAULT_QUANTILE = 0.95

#: Ridge added to the covariance's diagonal, relative to its mean variance, so that the
#: precision exists when features outnumber what a class's cells span.
RIDGE = 1e-3


def features_and_logits(model: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass giving a timm network's pooled pre-logit features and its logits."""
    features = model.forward_head(model.forward_features(x), pre_logits=True)
    return features, model.get_classifier()(features)


@dataclass(frozen=True)
class FeatureGaussians:
    """One member's class means and shared precision in its feature space.

    Attributes
    ----------
    means : Tensor, shape (C, D)
        Means of the classes the training split holds.
    precision : Tensor, shape (D, D)
    scale : float
        Median distance of the validation split's cells (distances are divided by it).
    """

    means: torch.Tensor
    precision: torch.Tensor
    scale: float = 1.0

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance to the nearest class mean, over ``scale``: shape (N,)."""
        centred = features.float()[:, None, :] - self.means[None]  # (N, C, D)
        projected = centred @ self.precision
        return (projected * centred).sum(-1).min(1).values / self.scale


def fit_gaussians(features: NDArray[np.floating], labels: NDArray[np.integer]) -> FeatureGaussians:
    """Class means and the shared (within-class) precision of features with their labels."""
    x = torch.as_tensor(features, dtype=torch.float64)
    y = torch.as_tensor(labels)
    classes = torch.unique(y)
    means = torch.stack([x[y == c].mean(0) for c in classes])
    centred = x - means[torch.searchsorted(classes, y)]
    covariance = centred.T @ centred / max(1, len(x) - len(classes))
    covariance += torch.eye(len(covariance), dtype=covariance.dtype) * (
        RIDGE * covariance.diagonal().mean()
    )
    return FeatureGaussians(means.float(), torch.linalg.inv(covariance).float())


@dataclass(frozen=True)
class NoveltyModel:
    """Every ensemble member's Gaussians and the ensemble's threshold.

    Attributes
    ----------
    members : tuple of FeatureGaussians
    threshold : float
        Ensemble score at ``quantile`` of the validation split.
    quantile : float
    """

    members: tuple[FeatureGaussians, ...]
    threshold: float
    quantile: float = DEFAULT_QUANTILE

    def score(self, member_distances: torch.Tensor) -> torch.Tensor:
        """Novelty of cells from each member's :meth:`FeatureGaussians.distance`, (M, N) -> (N,)."""
        return member_distances.mean(0) / self.threshold

    def save(self, path: Path) -> None:
        """Write the members' tensors as safetensors (atomically)."""
        tensors: dict[str, torch.Tensor] = {}
        for k, member in enumerate(self.members):
            tensors[f"member{k}.means"] = member.means.contiguous()
            tensors[f"member{k}.precision"] = member.precision.contiguous()
            tensors[f"member{k}.scale"] = torch.tensor([member.scale])
        with atomic_path(path) as tmp:
            save_file(tensors, tmp)

    @classmethod
    def load(cls, path: Path, table: dict[str, Any]) -> NoveltyModel:
        """The model of a card's ``[novelty]`` table, its tensors read from ``path``."""
        tensors = load_file(path)
        members = []
        for k in range(int(table["members"])):
            members.append(
                FeatureGaussians(
                    tensors[f"member{k}.means"],
                    tensors[f"member{k}.precision"],
                    float(tensors[f"member{k}.scale"][0]),
                )
            )
        return cls(tuple(members), float(table["threshold"]), float(table["quantile"]))
