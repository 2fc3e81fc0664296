"""Saliency evidence for classified cells: Grad-CAM, SmoothGrad, per-class mosaics.

Both methods return **raw** maps, one ``(H, W)`` float32 map per crop at the crop's size, with no
per-map normalisation, so that values are comparable from one cell to another (pytorch-grad-cam
min-max scales each map to [0, 1]; :class:`_RawGradCAM` skips that step). Mosaics scale all maps of
one method with one shared value for the same reason.

Grad-CAM layer
    ``model.stages[-1]``, the last stage of a timm CoAtNet (a transformer stage). timm's
    ``TransformerBlock2d`` keeps tensors in ``(B, C, H, W)`` layout, so the stage output is
    already a spatial map and no reshape transform is needed. It is the layer closest to the
    classifier head, hence the most class-specific, at the price of a coarse grid (input / 32:
    3 x 3 for a 96 px crop, upsampled bilinearly). ``stage=-2`` (input / 16) trades class
    specificity for resolution.

SmoothGrad
    Smilkov et al. 2017: the mean, over ``n_samples`` noisy copies of the input, of the absolute
    gradient of the target-class logit with respect to the input, reduced over colour channels by
    their maximum (Simonyan et al. 2014). The noise is Gaussian with standard deviation
    ``sigma * (max - min)`` of each normalised input; the paper recommends ``sigma`` in 0.1-0.2 and
    finds 25-50 samples enough.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import NDArray
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from skimage.draw import polygon2mask

__all__ = [
    "SMOOTHGRAD_SAMPLES",
    "SMOOTHGRAD_SIGMA",
    "gradcam",
    "gradcam_layer",
    "smoothgrad",
    "select_cells",
    "contour_masks",
    "saliency_share_inside",
    "overlay",
    "mosaic",
    "class_mosaics",
]

SMOOTHGRAD_SAMPLES = 25
SMOOTHGRAD_SIGMA = 0.15
IMAGENET_HALF = (0.5, 0.5, 0.5)

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


def gradcam_layer(model: torch.nn.Module, stage: int = -1) -> torch.nn.Module:
    """The Grad-CAM target layer of a timm CoAtNet: one of its ``stages``.

    Parameters
    ----------
    model : torch.nn.Module
        A timm ``MaxxVit`` model (``coatnet_*``).
    stage : int
        Index into ``model.stages``; -1 (the default) is the last, most class-specific stage.

    Returns
    -------
    torch.nn.Module
    """
    stages = getattr(model, "stages", None)
    if not isinstance(stages, torch.nn.Sequential):
        raise TypeError(f"{type(model).__name__} has no `stages`; expected a timm CoAtNet")
    return stages[stage]


def _to_input(
    crops: NDArray[np.uint8], mean: Sequence[float], std: Sequence[float], device: torch.device
) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 crops to a normalised ``(N, 3, H, W)`` float tensor."""
    if crops.ndim != 4 or crops.shape[-1] != 3 or crops.dtype != np.uint8:
        raise ValueError(f"crops must be (N, H, W, 3) uint8, got {crops.shape} {crops.dtype}")
    x = torch.from_numpy(np.ascontiguousarray(crops)).to(device).permute(0, 3, 1, 2).float() / 255
    m = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return (x - m) / s


def _batches(n: int, batch_size: int) -> list[slice]:
    return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class _RawGradCAM(GradCAM):
    """Grad-CAM that keeps the raw map scale (ReLU of the weighted activations, upsampled).

    The input gradient is switched on so the maps exist even when the model's parameters are frozen.
    """

    def __init__(self, model: torch.nn.Module, target_layers: list[torch.nn.Module]):
        BaseCAM.__init__(self, model, target_layers, compute_input_gradient=True)

    def compute_cam_per_layer(self, input_tensor, targets, eigen_smooth):
        size = input_tensor.shape[-2:]
        maps = []
        for layer, acts, grads in zip(
            self.target_layers,
            self.activations_and_grads.activations,
            self.activations_and_grads.gradients,
            strict=True,
        ):
            cam = self.get_cam_image(
                input_tensor, layer, targets, acts.numpy(), grads.numpy(), eigen_smooth
            )
            cam = torch.from_numpy(np.maximum(cam, 0))[:, None]
            up = torch.nn.functional.interpolate(
                cam, size=size, mode="bilinear", align_corners=False
            )
            maps.append(up.numpy())
        return maps

    def aggregate_multi_layers(self, cam_per_target_layer):
        return np.concatenate(cam_per_target_layer, axis=1).mean(axis=1)


def gradcam(
    model: torch.nn.Module,
    crops: NDArray[np.uint8],
    target_classes: NDArray[np.integer],
    *,
    mean: Sequence[float] = IMAGENET_HALF,
    std: Sequence[float] = IMAGENET_HALF,
    stage: int = -1,
    batch_size: int = 32,
) -> NDArray[np.float32]:
    """Raw Grad-CAM maps of ``target_classes`` for each crop.

    Parameters
    ----------
    model : torch.nn.Module
        A timm CoAtNet classifier (left in eval mode).
    crops : (N, H, W, 3) uint8
        Cell crops as the classifier sees them, before normalisation.
    target_classes : (N,) int
        Class index (into the model's outputs) to explain for each crop, usually its top class.
    mean, std : sequence of 3 floats
        The card's input normalisation, on the 0-1 scale.
    stage : int
        Which of ``model.stages`` to use (see the module docstring).
    batch_size : int
        Crops per forward/backward pass.

    Returns
    -------
    (N, H, W) float32
        Non-negative maps at crop resolution, not normalised.
    """
    targets = np.asarray(target_classes, dtype=np.int64)
    out = np.zeros(crops.shape[:3], dtype=np.float32)
    device = _device(model)
    # Gradients are needed even when the caller runs under torch.no_grad().
    with torch.enable_grad(), _RawGradCAM(model, [gradcam_layer(model, stage)]) as cam:
        for part in _batches(len(crops), batch_size):
            x = _to_input(crops[part], mean, std, device)
            out[part] = cam(x, [ClassifierOutputTarget(int(t)) for t in targets[part]])
    return out


def _crop_noise(
    seed: int, indices: range, n_samples: int, shape: tuple[int, ...]
) -> NDArray[np.float32]:
    """Standard normal noise ``(len(indices), n_samples, *shape)``, one stream per crop index."""
    return np.stack(
        [
            np.random.default_rng([seed, i]).standard_normal((n_samples, *shape), dtype=np.float32)
            for i in indices
        ]
    )


def smoothgrad(
    model: torch.nn.Module,
    crops: NDArray[np.uint8],
    target_classes: NDArray[np.integer],
    *,
    mean: Sequence[float] = IMAGENET_HALF,
    std: Sequence[float] = IMAGENET_HALF,
    n_samples: int = SMOOTHGRAD_SAMPLES,
    sigma: float = SMOOTHGRAD_SIGMA,
    batch_size: int = 32,
    seed: int = 0,
) -> NDArray[np.float32]:
    """Raw SmoothGrad maps of ``target_classes`` for each crop (see the module docstring).

    Parameters
    ----------
    model, crops, target_classes, mean, std, batch_size
        As for :func:`gradcam`.
    n_samples : int
        Noisy copies averaged per crop.
    sigma : float
        Noise standard deviation as a fraction of each normalised input's value range.
    seed : int
        Seed of the noise. Crop ``i`` of the call gets its own stream, ``default_rng([seed, i])``,
        so maps are reproducible and do not depend on ``batch_size``.

    Returns
    -------
    (N, H, W) float32
        Mean absolute input gradient, channel maximum; not normalised.
    """
    if n_samples < 1 or sigma < 0:
        raise ValueError(f"need n_samples >= 1 and sigma >= 0, got {n_samples} and {sigma}")
    model.eval()
    device = _device(model)
    targets = torch.as_tensor(np.asarray(target_classes, dtype=np.int64), device=device)
    out = np.zeros(crops.shape[:3], dtype=np.float32)
    for part in _batches(len(crops), batch_size):
        x = _to_input(crops[part], mean, std, device)
        spread = sigma * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3))).view(-1, 1, 1, 1)
        noise = torch.from_numpy(
            _crop_noise(seed, range(part.start, part.stop), n_samples, x.shape[1:])
        )
        total = torch.zeros(x.shape[0], *x.shape[2:], device=device)
        for sample in range(n_samples):
            noisy = (x + spread * noise[:, sample].to(device)).requires_grad_(True)
            with torch.enable_grad():
                logits = model(noisy)
                chosen = logits.gather(1, targets[part, None]).sum()
                (grad,) = torch.autograd.grad(chosen, noisy)
            total += grad.abs().amax(dim=1)
        out[part] = (total / n_samples).cpu().numpy()
    return out


def select_cells(
    top_class: NDArray[np.integer], confidence: NDArray[np.floating], per_class: int | None
) -> NDArray[np.int64]:
    """Indices of the most confident ``per_class`` cells of each class (all cells if ``None``).

    Parameters
    ----------
    top_class : (N,) int
        Top class index of every cell.
    confidence : (N,) float
        Its probability.
    per_class : int or None
        Cells kept per class; ``None`` keeps all.

    Returns
    -------
    (M,) int64
        Cell indices grouped by class (ascending), most confident first within a class.
    """
    top_class = np.asarray(top_class)
    order = np.lexsort((-np.asarray(confidence, dtype=np.float64), top_class))
    if per_class is None:
        return order.astype(np.int64)
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0 or None, got {per_class}")
    sorted_classes = top_class[order]
    first = np.searchsorted(sorted_classes, sorted_classes, side="left")
    rank = np.arange(len(order)) - first
    return order[rank < per_class].astype(np.int64)


def contour_masks(
    contours: NDArray[np.floating],
    centres: NDArray[np.floating],
    fov_um: float,
    level0_mpp: float,
    size: int,
) -> NDArray[np.bool_]:
    """Rasterise cell contours into the frame of their centred crops.

    Parameters
    ----------
    contours : (N, K, 2) float
        Level-0 polygon vertices (x, y).
    centres : (N, 2) float
        Level-0 crop centres (x, y).
    fov_um : float
        Physical field of view of a crop.
    level0_mpp : float
        Microns per pixel at level 0 of the slide.
    size : int
        Crop size in pixels.

    Returns
    -------
    (N, size, size) bool
        True inside each cell.
    """
    scale = size * level0_mpp / fov_um  # crop pixels per level-0 pixel
    local = (np.asarray(contours) - np.asarray(centres)[:, None, :]) * scale + size / 2
    rows_cols = local[..., ::-1] - 0.5  # pixel centres sit at half-integer positions
    return np.stack([polygon2mask((size, size), poly) for poly in rows_cols])


def saliency_share_inside(
    maps: NDArray[np.floating], masks: NDArray[np.bool_]
) -> NDArray[np.float64]:
    """Share of each map's saliency mass that falls inside the cell mask.

    Parameters
    ----------
    maps : (N, H, W) float
        Non-negative saliency maps.
    masks : (N, H, W) bool
        Cell masks (see :func:`contour_masks`).

    Returns
    -------
    (N,) float64
        Inside mass / total mass; NaN for an all-zero map. Compare with the area share
        ``masks.mean(axis=(1, 2))``, the value of a map with no preference.
    """
    maps = np.asarray(maps, dtype=np.float64)
    total = maps.sum(axis=(1, 2))
    inside = np.where(masks, maps, 0.0).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / total, np.nan)


def overlay(
    crops: NDArray[np.uint8], maps: NDArray[np.floating], vmax: float, alpha: float = 0.5
) -> NDArray[np.uint8]:
    """Blend heat-coloured saliency over crops, with one scale ``vmax`` for every map.

    Parameters
    ----------
    crops : (N, H, W, 3) uint8
    maps : (N, H, W) float
    vmax : float
        Saliency value shown at full colour; higher values saturate.
    alpha : float
        Opacity of the heat colour at ``vmax`` (it fades to 0 with the saliency).

    Returns
    -------
    (N, H, W, 3) uint8
    """
    level = np.clip(
        np.asarray(maps, dtype=np.float32) / max(vmax, float(np.finfo(np.float32).tiny)), 0, 1
    )
    heat = _HEAT_LUT[np.round(level * 255).astype(np.intp)]
    weight = (alpha * level)[..., None]
    return np.round(crops * (1 - weight) + heat * weight).astype(np.uint8)


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
    *,
    columns: int = 8,
    vmax: float | None = None,
) -> dict[str, NDArray[np.uint8]]:
    """One saliency mosaic per class present, all drawn on one saliency scale.

    Parameters
    ----------
    crops : (M, H, W, 3) uint8
        Crops of the explained cells, in the order of :func:`select_cells`.
    maps : (M, H, W) float
        Their saliency maps (one method).
    classes : (M,) int
        Their top class index into ``class_codes``.
    class_codes : sequence of str
        The card's class codes.
    columns : int
        Mosaic width in cells.
    vmax : float, optional
        Saliency shown at full colour; default the 99th percentile of all ``maps``, so that
        mosaics of different classes are comparable.

    Returns
    -------
    dict of str to (h, w, 3) uint8
        Keyed by class code, in card order.
    """
    if len(maps) == 0:
        return {}
    scale = float(np.percentile(maps, 99)) if vmax is None else vmax
    blended = overlay(crops, maps, scale)
    classes = np.asarray(classes)
    return {
        code: mosaic(blended[classes == k], columns)
        for k, code in enumerate(class_codes)
        if np.any(classes == k)
    }
