"""RGB images as OME-Zarr (NGFF 0.5) multiscale groups, so napari (napari-ome-zarr), the
ome-zarr-py reader and other NGFF viewers open the result store's images.

NGFF 0.5 sits on Zarr v3 and keeps its metadata under the group attribute ``ome``. Axes are
ordered channel first (``c, y, x``), so each level is a ``(3, h, w)`` uint8 array named by its
index (``"0"`` full size, each next one half as wide, down to :data:`SMALLEST_LEVEL_PX`). The
``omero`` block shows the three channels as red, green and blue on a 0-255 window, which
viewers add up to the colour image.
"""

from __future__ import annotations

import numpy as np
import zarr
from numpy.typing import NDArray
from PIL import Image

__all__ = ["AXES", "NGFF_VERSION", "SMALLEST_LEVEL_PX", "pyramid", "write_multiscale"]

NGFF_VERSION = "0.5"
#: The pyramid stops once a level's longest side is this small.
SMALLEST_LEVEL_PX = 256
_CHANNELS = (("red", "FF0000"), ("green", "00FF00"), ("blue", "0000FF"))
AXES = ("c", "y", "x")


def pyramid(image: NDArray[np.uint8], smallest: int = SMALLEST_LEVEL_PX) -> list[NDArray[np.uint8]]:
    """``image`` and its halvings (2 x 2 box mean), while the longest side exceeds ``smallest``.

    Parameters
    ----------
    image : (h, w, 3) uint8
    smallest : int
        A level whose longest side is at most this ends the pyramid.

    Returns
    -------
    list of (h_k, w_k, 3) uint8
        Level k is ``ceil(h / 2**k)`` by ``ceil(w / 2**k)``.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (h, w, 3) uint8 image, got {image.shape} {image.dtype}")
    levels = [image]
    while max(levels[-1].shape[:2]) > smallest:
        h, w = levels[-1].shape[:2]
        half = Image.fromarray(levels[-1]).resize(
            ((w + 1) // 2, (h + 1) // 2), Image.Resampling.BOX
        )
        levels.append(np.asarray(half))
    return levels


def _metadata(name: str, n_levels: int, pixel_um: float) -> dict:
    channel, *space = AXES
    axes = [
        {"name": channel, "type": "channel"},
        *({"name": name, "type": "space", "unit": "micrometer"} for name in space),
    ]
    datasets = [
        {
            "path": str(k),
            "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, pixel_um * 2**k, pixel_um * 2**k]}
            ],
        }
        for k in range(n_levels)
    ]
    channels = [
        {
            "label": label,
            "color": colour,
            "active": True,
            "window": {"min": 0, "max": 255, "start": 0, "end": 255},
        }
        for label, colour in _CHANNELS
    ]
    return {
        "version": NGFF_VERSION,
        "multiscales": [{"name": name, "axes": axes, "datasets": datasets}],
        "omero": {"name": name, "channels": channels, "rdefs": {"model": "color"}},
    }


def write_multiscale(
    parent: zarr.Group, path: str, image: NDArray[np.uint8], pixel_um: float
) -> zarr.Group:
    """Write ``image`` as an NGFF multiscale group ``parent/path`` (replacing one there).

    Parameters
    ----------
    parent : zarr.Group
        A Zarr v3 group.
    path : str
        Group path below ``parent``, e.g. ``"images/overview"``.
    image : (h, w, 3) uint8
    pixel_um : float
        Microns per pixel of ``image`` (level 0).

    Returns
    -------
    zarr.Group
    """
    if pixel_um <= 0:
        raise ValueError(f"pixel_um must be > 0, got {pixel_um}")
    levels = pyramid(np.asarray(image))
    group = parent.create_group(path, overwrite=True)
    for k, level in enumerate(levels):
        chw = np.ascontiguousarray(level.transpose(2, 0, 1))
        group.create_array(
            str(k),
            data=chw,
            chunks=(3, *(min(n, 1024) for n in chw.shape[1:])),
            dimension_names=AXES,  # NGFF 0.5 requires the axis names on the arrays too
        )
    group.attrs["ome"] = _metadata(path.rsplit("/", 1)[-1], len(levels), float(pixel_um))
    return group
