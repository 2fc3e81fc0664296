"""Per-slide adaptation: a slide's cells shown to the network in the colours it was trained on.

A slide gives hundreds or thousands of cells in one stain. Its crops' per-channel mean colour
(of R, G and B over every pixel of every crop: mostly the slide's background, red cells and
stain) is shifted onto the mean of the training crops of one lab (a shift per channel, so the
network's normalisation absorbs it at no cost). Only the input moves: no layer's statistics are
re-estimated (re-estimating every batch-norm layer on a held-out set lowered the known labs'
scores).

Only the means move, not the spreads: matching the standard deviations too (Reinhard et al.
2001 in RGB) lowered the unseen lab (BCCD, five groups, ``default`` v3: 0.624 -> 0.581) where the
shift alone raised it (0.644), the known labs unchanged either way. A crop's spread says as much
about how much of it the cell fills (its size, the crowding) as about the stain.

A card trained on several labs records each lab's moments, and a slide is matched to the
**nearest** of them: a slide of a known lab is left nearly as it is, and an unseen lab's is
brought to the training lab it resembles most. (Matching every slide to the pooled moments of two
labs moved each known lab towards a mixture that is neither: ``default`` v2, MLL test macro F1
0.737 -> 0.707.)

Two moments of a slide are estimated from all its crops (or a sample spread over it); under
:data:`MIN_CELLS` crops a slide is not adapted, since a handful of cells says more about their
own classes than about the stain.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "ADAPTATION_METHOD",
    "MIN_CELLS",
    "ColourMoments",
    "adapted_normalisation",
    "colour_moments",
    "nearest_reference",
    "references",
    "slide_colours",
]

#: What the store and the cards call the adaptation.
ADAPTATION_METHOD = (
    "mean colour of the slide's cells shifted onto that of the nearest training lab's crops"
)

#: Fewest crops whose moments adapt a slide.
MIN_CELLS = 32


@dataclass(frozen=True)
class ColourMoments:
    """Per-channel mean and standard deviation of crops, RGB in [0, 1].

    Attributes
    ----------
    mean, std : tuple of float
    n : int
        Crops they were measured on.
    source : str
        Whose crops: a training folder's name for a card's references, empty for a slide.
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    n: int
    source: str = ""

    def as_dict(self) -> dict[str, Any]:
        named = {"source": self.source} if self.source else {}
        return {**named, "mean": list(self.mean), "std": list(self.std), "n": self.n}

    @property
    def vector(self) -> NDArray[np.float64]:
        """Means and standard deviations as one vector, to compare slides."""
        return np.array([*self.mean, *self.std])

    @classmethod
    def from_dict(cls, table: dict[str, Any]) -> ColourMoments:
        mean, std = (tuple(float(v) for v in table[k]) for k in ("mean", "std"))
        return cls(mean, std, int(table.get("n", 0)), str(table.get("source", "")))  # type: ignore[arg-type]


def colour_moments(
    crops: NDArray[np.uint8], max_crops: int = 4096, source: str = ""
) -> ColourMoments:
    """The colour moments of uint8 (N, H, W, 3) crops (an evenly spaced sample of
    ``max_crops`` when there are more), of ``source``."""
    sample = crops[:: max(1, -(-len(crops) // max_crops))]
    pixels = sample.reshape(-1, 3)
    mean = pixels.mean(0, dtype=np.float64) / 255.0
    std = pixels.std(0, dtype=np.float64) / 255.0
    return ColourMoments(
        tuple(round(float(v), 5) for v in mean),  # type: ignore[arg-type]
        tuple(round(float(v), 5) for v in std),  # type: ignore[arg-type]
        len(crops),
        source,
    )


def slide_colours(crops: NDArray[np.uint8]) -> ColourMoments | None:
    """The colour moments of one slide's crops, or None under :data:`MIN_CELLS` crops (too
    few to adapt to)."""
    return colour_moments(crops) if len(crops) >= MIN_CELLS else None


def references(adaptation: dict[str, Any]) -> list[ColourMoments]:
    """The training labs' moments of a card's ``[adaptation]`` table (empty without one)."""
    return [ColourMoments.from_dict(t) for t in adaptation.get("references", [])]


def nearest_reference(
    references: list[ColourMoments], slide: ColourMoments
) -> ColourMoments | None:
    """The reference (a training lab's moments) nearest the slide's, Euclidean over means and
    standard deviations; None without references."""
    if not references:
        return None
    return min(references, key=lambda r: float(np.linalg.norm(r.vector - slide.vector)))


def adapted_normalisation(
    mean: tuple[float, ...],
    std: tuple[float, ...],
    reference: ColourMoments,
    slide: ColourMoments,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The network's input normalisation with a slide's mean colour shifted onto the
    reference's.

    ``x`` is first mapped to ``x - slide.mean + reference.mean``, then normalised by
    ``(mean, std)``: together one normalisation ``(x - M) / std``, returned as ``(M, std)``.
    """
    shifted = tuple(
        m + m_s - m_r for m, m_s, m_r in zip(mean, slide.mean, reference.mean, strict=True)
    )
    return shifted, tuple(std)
