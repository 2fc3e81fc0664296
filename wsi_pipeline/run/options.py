"""The parameters of a run, kept light to import so the command line starts fast."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from wsi_pipeline.results.counts import DEFAULT_CONFIDENCE_THRESHOLD, DEFAULT_MIN_AGREEMENT
from wsi_pipeline.results.plausibility import SPECIMENS

SALIENCY_METHODS = ("gradcam", "smoothgrad")
DEFAULT_CELLS_PER_CLASS = 8  # most confident cells explained per class: one mosaic row
#: --region choice -> countability classes of wsi_pipeline.image.regions counted in
REGION_CHOICES = {"monolayer": ("monolayer",), "all": ("sparse", "monolayer", "thick")}
#: --on-bad-tile choices: leave a tile that cannot be decoded out of the count, or stop the run
BAD_TILE_CHOICES = ("skip", "stop")


@dataclass(frozen=True)
class RunOptions:
    """Every parameter of a run; recorded in the store so a rerun can tell what changed.

    Attributes
    ----------
    classifier : str
        Card name or path.
    mpp : float or None
        Level-0 microns per pixel given by the user.
    device : str
        ``auto``, ``cpu`` or ``cuda``.
    backend : str
        What runs the classifier's networks: ``auto``, ``torch``, ``onnxruntime`` or
        ``openvino`` (see :mod:`wsi_pipeline.model.backends`); the store records the one that
        ran.
    batch_size : int or None
        Crops per forward pass; None chooses for the device.
    saliency : tuple of str
        Saliency methods computed (a subset of :data:`SALIENCY_METHODS`).
    saliency_cells : int or None
        Most confident cells explained per class; None explains all.
    region : str
        A key of :data:`REGION_CHOICES`.
    min_confidence : float
        Cells under this top-class probability are counted as uncertain.
    min_agreement : float
        Cells whose top class fewer than this share of the snapshots share are counted as
        uncertain.
    tta : int
        Dihedral test-time transforms averaged (0: none).
    zip_geojson : bool
        Write ``.geojson.zip`` (a zip archive QuPath imports) instead of ``.geojson``.
    on_bad_tile : str
        A tile whose pixels cannot be decoded is left out of the count and recorded (``skip``),
        or stops the run (``stop``); see :data:`BAD_TILE_CHOICES`.
    specimen : str
        ``marrow`` (an aspirate) or ``blood`` (a smear): chooses the reference ranges the
        differential is checked against and the least count.
    adapt : bool
        Adapt the classifier to the slide: its cells' colours are matched to the training
        crops' (see :mod:`wsi_pipeline.model.adapt`).
    """

    classifier: str = "default"
    mpp: float | None = None
    device: str = "auto"
    backend: str = "auto"
    batch_size: int | None = None
    saliency: tuple[str, ...] = SALIENCY_METHODS
    saliency_cells: int | None = DEFAULT_CELLS_PER_CLASS
    region: str = "monolayer"
    min_confidence: float = DEFAULT_CONFIDENCE_THRESHOLD
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    tta: int = 0
    zip_geojson: bool = False
    on_bad_tile: str = "skip"
    specimen: str = "marrow"
    adapt: bool = True

    def __post_init__(self) -> None:
        if self.region not in REGION_CHOICES:
            raise ValueError(f"region must be one of {sorted(REGION_CHOICES)}, got {self.region}")
        if self.on_bad_tile not in BAD_TILE_CHOICES:
            raise ValueError(
                f"on_bad_tile must be one of {BAD_TILE_CHOICES}, got {self.on_bad_tile}"
            )
        if self.specimen not in SPECIMENS:
            raise ValueError(f"specimen must be one of {SPECIMENS}, got {self.specimen}")
        unknown = set(self.saliency) - set(SALIENCY_METHODS)
        if unknown:
            raise ValueError(f"unknown saliency methods {sorted(unknown)}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return {**asdict(self), "saliency": list(self.saliency)}
