"""Saliency mosaics: each explained cell as a panel (the crop, its saliency map heat-coloured on
the map's own scale, a labelled colour bar, a caption with the cell's id and confidence), and one
grid of panels per class.

The maps stay raw in the result store (:mod:`wsi_pipeline.model.explain`); only a panel scales a
map, to 0 and a high percentile of that map (:func:`map_range`), and labels the scale beside it,
so panels of different cells are each read on their own scale.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "CAPTION_PX",
    "COLOUR_BAR_PX",
    "PANEL_PERCENTILE",
    "class_mosaics",
    "heat_colours",
    "map_range",
    "mosaic",
    "saliency_panel",
]

#: Percentile of a map shown at full colour in its panel (see :func:`map_range`).
PANEL_PERCENTILE = 99.5
#: Panel layout in pixels: caption height under the crop, colour bar and its labels' width.
CAPTION_PX = 14
COLOUR_BAR_PX = 48
_GAP = 2
_BAR_WIDTH = 6
_FONT_PX = 10

# Heat colour map (black-purple-red-orange-yellow), as anchors interpolated to a 256-entry table.
_HEAT_ANCHORS = np.array(
    [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float64
)
_HEAT_LUT = np.stack(
    [
        np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, 5), _HEAT_ANCHORS[:, c])
        for c in range(3)
    ],
    axis=1,
).astype(np.float32)


def heat_colours(levels: NDArray[np.floating]) -> NDArray[np.uint8]:
    """Heat colours (black-purple-red-orange-yellow) of levels in [0, 1]; outside values clip.

    Returns
    -------
    (..., 3) uint8
    """
    index = np.round(np.clip(levels, 0, 1) * 255).astype(np.intp)
    return np.round(_HEAT_LUT[index]).astype(np.uint8)


def map_range(saliency: NDArray[np.floating]) -> tuple[float, float]:
    """The range a panel shows one map on: 0 to its :data:`PANEL_PERCENTILE` th percentile.

    A percentile rather than the maximum, so that a few extreme pixels (common in gradient
    maps) do not leave the rest of the map dark; 0 because saliency is non-negative and 0
    means no evidence.
    """
    high = float(np.percentile(saliency, PANEL_PERCENTILE))
    return 0.0, high if high > 0 else float(np.max(saliency))


def saliency_panel(
    crop: NDArray[np.uint8], saliency: NDArray[np.floating], cell_id: int, confidence: float
) -> NDArray[np.uint8]:
    """One cell's evidence: the plain crop, its saliency map on its own scale, a colour bar.

    The map is heat-coloured from 0 to the top of :func:`map_range` (higher values saturate);
    the colour bar beside it is labelled with those two values, so panels of different cells
    are read each on its own scale. A caption under the crop gives the cell id and the
    confidence of its top class.

    Parameters
    ----------
    crop : (H, W, 3) uint8
    saliency : (H, W) float
        Raw saliency of the crop.
    cell_id : int
        Row of the cell in the result store.
    confidence : float
        Probability of the cell's top class.

    Returns
    -------
    (H + CAPTION_PX, 2 * W + GAP + COLOUR_BAR_PX, 3) uint8
        White background.
    """
    h, w = crop.shape[:2]
    low, high = map_range(saliency)
    tiny = float(np.finfo(np.float32).tiny)
    heat = heat_colours((np.asarray(saliency, dtype=np.float64) - low) / max(high - low, tiny))
    bar = heat_colours(np.linspace(1, 0, h))[:, None].repeat(_BAR_WIDTH, axis=1)
    panel = np.full((h + CAPTION_PX, 2 * w + _GAP + COLOUR_BAR_PX, 3), 255, dtype=np.uint8)
    panel[:h, :w] = crop
    panel[:h, w + _GAP : 2 * w + _GAP] = heat
    bar_x = 2 * w + 2 * _GAP
    panel[:h, bar_x : bar_x + _BAR_WIDTH] = bar
    image = Image.fromarray(panel)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=_FONT_PX)
    label_x = bar_x + _BAR_WIDTH + 2
    draw.text((label_x, 0), f"{high:.2g}", fill=(0, 0, 0), font=font, anchor="lt")
    draw.text((label_x, h), f"{low:.2g}", fill=(0, 0, 0), font=font, anchor="lb")
    caption = f"cell {cell_id} \u00b7 {confidence:.2f}"
    draw.text((1, h + CAPTION_PX // 2), caption, fill=(0, 0, 0), font=font, anchor="lm")
    return np.asarray(image)


def mosaic(images: NDArray[np.uint8], columns: int = 8, gap: int = 2) -> NDArray[np.uint8]:
    """Tile ``(N, H, W, 3)`` images row by row into one white-separated grid.

    Returns
    -------
    (rows * (H + gap) + gap, columns * (W + gap) + gap, 3) uint8
    """
    n, h, w, _ = images.shape
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    grid = np.full((rows * (h + gap) + gap, columns * (w + gap) + gap, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        y, x = gap + r * (h + gap), gap + c * (w + gap)
        grid[y : y + h, x : x + w] = image
    return grid


def class_mosaics(
    crops: NDArray[np.uint8],
    maps: NDArray[np.floating],
    classes: NDArray[np.integer],
    class_codes: Sequence[str],
    cell_ids: NDArray[np.integer],
    confidences: NDArray[np.floating],
    *,
    columns: int = 4,
) -> dict[str, NDArray[np.uint8]]:
    """One mosaic of :func:`saliency_panel` per class present, each map on its own scale.

    Parameters
    ----------
    crops : (M, H, W, 3) uint8
        Crops of the explained cells, in the order of :func:`select_cells`.
    maps : (M, H, W) float
        Their raw saliency maps (one method).
    classes : (M,) int
        Their top class index into ``class_codes``.
    class_codes : sequence of str
        The card's class codes.
    cell_ids : (M,) int
        Their rows in the result store, for the captions.
    confidences : (M,) float
        Their top class probabilities, for the captions.
    columns : int
        Mosaic width in panels.

    Returns
    -------
    dict of str to (h, w, 3) uint8
        Keyed by class code, in card order.
    """
    if len(maps) == 0:
        return {}
    classes = np.asarray(classes)
    mosaics = {}
    for k, code in enumerate(class_codes):
        members = np.flatnonzero(classes == k)
        if len(members):
            panels = [
                saliency_panel(crops[i], maps[i], int(cell_ids[i]), float(confidences[i]))
                for i in members
            ]
            mosaics[code] = mosaic(np.stack(panels), columns, gap=2 * _GAP)
    return mosaics
