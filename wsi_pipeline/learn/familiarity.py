"""What a trained card knows of its own data: the colours it was trained on and where its
classes lie in its feature space.

After training, two tables are added to a card:

* ``[adaptation]``: the colour moments of each source's (lab's) training crops, the nearest of
  which each slide's cells are matched to at run time (:mod:`wsi_pipeline.model.adapt`);
* ``[novelty]``: each member's class Gaussians in its last feature space, fitted on the training
  crops as the training augmentation redraws them, scaled and thresholded on the validation
  split redrawn the same way (:mod:`wsi_pipeline.model.novelty`), written to
  ``NAME.novelty.safetensors`` beside the card.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from wsi_pipeline.core.files import file_sha256
from wsi_pipeline.learn.augment import AugmentConfig, augment
from wsi_pipeline.model.adapt import ADAPTATION_METHOD, colour_moments
from wsi_pipeline.model.cards import ClassifierCard
from wsi_pipeline.model.classify import Classifier, to_unit_tensor
from wsi_pipeline.model.novelty import (
    DEFAULT_QUANTILE,
    FeatureGaussians,
    NoveltyModel,
    features_and_logits,
    fit_gaussians,
)

__all__ = ["add_familiarity", "member_features"]

#: Crops per forward pass when collecting features.
BATCH = 128


@torch.inference_mode()
def member_features(
    model: torch.nn.Module,
    classifier: Classifier,
    crops: NDArray[np.uint8],
    augmentation: AugmentConfig | None,
    seed: int,
) -> NDArray[np.float32]:
    """Pooled pre-logit features of crops, each redrawn once by ``augmentation`` (None: as
    they are), shape (N, D)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(crops), BATCH):
        x = to_unit_tensor(crops[start : start + BATCH], classifier.device)
        if augmentation is not None:
            x = augment(x, generator, augmentation)
        x = classifier.normalise(x).contiguous(memory_format=torch.channels_last)
        out.append(features_and_logits(model, x)[0].float().cpu().numpy())
    return np.concatenate(out)


def add_familiarity(
    card: ClassifierCard,
    train: tuple[NDArray[np.uint8], NDArray[np.int64]],
    val: tuple[NDArray[np.uint8], NDArray[np.int64]],
    sources: dict[str, NDArray[np.bool_]],
    augmentation: AugmentConfig,
    seed: int = 0,
    device: str = "cpu",
    quantile: float = DEFAULT_QUANTILE,
) -> tuple[ClassifierCard, dict[str, Any]]:
    """The card with its ``adaptation`` and ``novelty`` tables (the novelty file written beside
    it), and a record of the novelty model's fit for the provenance.

    Parameters
    ----------
    card : ClassifierCard
        A trained card (weights written, calibrated).
    train, val : (crops, labels)
        The training and validation splits.
    sources : dict of str to ndarray of bool
        Which training crops each source (a lab's folder) holds; those with white cells of a
        counted class become the adaptation's references.
    augmentation : AugmentConfig
        The training augmentation: the Gaussians and the threshold see every crop redrawn once.
    seed : int
    device : str
    quantile : float
        Share of the validation cells whose novelty stays at or below 1.
    """
    # A lab is a source of white cells: a folder of platelets alone (artefacts, mostly glass)
    # is not a stain a slide should be matched to.
    counted = np.array([c.counted for c in card.classes])[train[1]]
    references = [
        colour_moments(train[0][held], max_crops=int(held.sum()), source=name).as_dict()
        for name, held in sources.items()
        if (held & counted).any()
    ]
    adaptation = {"method": ADAPTATION_METHOD, "references": references}
    classifier = Classifier(dataclasses.replace(card, novelty={}), device=device)
    members, val_distances = [], []
    for k, model in enumerate(classifier.models):
        fitted = fit_gaussians(
            member_features(model, classifier, train[0], augmentation, seed + k), train[1]
        )
        val_features = member_features(model, classifier, val[0], augmentation, seed + 100 + k)
        distance = fitted.distance(torch.as_tensor(val_features)).numpy()
        scale = float(np.median(distance))
        members.append(FeatureGaussians(fitted.means, fitted.precision, scale))
        val_distances.append(distance / scale)
    score = np.mean(val_distances, axis=0)
    threshold = float(np.quantile(score, quantile))
    novelty = NoveltyModel(tuple(members), threshold, quantile)
    path = card.path.parent / f"{card.path.stem}.novelty.safetensors"
    novelty.save(path)
    table = {
        "file": path.name,
        "sha256": file_sha256(path),
        "members": len(members),
        "threshold": round(threshold, 4),
        "quantile": quantile,
    }
    record = {
        "method": "Mahalanobis distance to the nearest class mean (shared covariance) in each "
        "member's pooled features, fitted on the training split and thresholded at the "
        "validation split's quantile, both redrawn once by the training augmentation",
        "n_train": int(len(train[1])),
        "n_val": int(len(val[1])),
        "features": int(members[0].means.shape[1]),
    }
    return dataclasses.replace(card, adaptation=adaptation, novelty=table), record
