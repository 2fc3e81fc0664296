"""Saliency evidence for classified cells: Grad-CAM and SmoothGrad maps, the cells to explain,
and how much of a map lies on its cell.

Both methods return **raw** maps, one ``(H, W)`` float32 map per crop at the crop's size, with no
per-map normalisation, so that values stay comparable from one cell to another in the result
store. Only the mosaics (:mod:`wsi_pipeline.model.mosaics`) scale each map to its own range,
and label that range beside it.

Grad-CAM layer
    ``model.stages[-2]`` of a timm CoAtNet, the first transformer stage: a 6 x 6 grid for a
    96 px crop (input / 16), upsampled bilinearly. In ``coatnet_lite0``
    (:mod:`wsi_pipeline.model.hybrid`) ``stages`` holds only the transformer stages, and
    ``stages[-2]`` is again the first of them, on the same 6 x 6 grid. timm's
    ``TransformerBlock2d`` keeps tensors in ``(B, C, H, W)`` layout, so the stage output is
    already a spatial map. Measured with the v2 ``default`` card's first member on 160 real MLL
    marrow crops (20 per class, cut as the card expects; ``benchmarks/saliency.py``), against
    Otsu masks of the cell and its nucleus (area shares 22 % and 12 %); "enrichment" is the mass
    share inside over the area share:

    ========== ====== ================= ==================== ==========================
    stage      grid   cell: share, enr. nucleus: share, enr. top-1 vs top-2 map corr.
    ========== ====== ================= ==================== ==========================
    -1         3 x 3  0.26, 1.20        0.14, 1.24           -0.42
    **-2**     6 x 6  0.31, 1.55        0.17, 1.62           -0.43
    -3         12x12  0.30, 1.46        0.16, 1.42           -0.24
    -4         24x24  0.26, 1.32        0.11, 1.07           -0.20
    ========== ====== ================= ==================== ==========================

    Stage -2 puts the most mass on the cell and the nucleus and stays as class-specific as the
    last stage (the maps of the top two classes are as anti-correlated); the convolutional
    stages below are finer but less class-specific and less on the nucleus. (The product of
    the stage -2 and -3 maps scores higher still, 1.81 and 1.82, but mixes two raw scales.)
    The backward pass stops at the target layer, so Grad-CAM costs little more than a forward
    pass: 407 cells/s on 2 CPU cores, 2.7 times pytorch-grad-cam at the last stage, with a
    third of its peak memory.

SmoothGrad
    Smilkov et al. 2017: the mean, over ``n_samples`` noisy copies of the input, of the absolute
    gradient of the target-class logit with respect to the input, reduced over colour channels by
    their maximum (Simonyan et al. 2014). The noise is Gaussian with standard deviation
    ``sigma * (max - min)`` of each normalised input; the paper recommends ``sigma`` in 0.1-0.2 and
    finds 25-50 samples enough.

    Plain SmoothGrad shows a checkerboard: the stem's first convolution has stride 2, so each
    input pixel's gradient depends on its position modulo 2, and noise does not average that
    out. Each noisy copy is therefore also translated by a phase of that stride, (dy, dx) in
    {0, 1}^2, every phase equally often, and its gradient shifted back (translation
    equivariance up to the stride is what the jitter restores; the classifier was trained with
    shifts of +-6 %, far more than 1 px). :func:`stride_power_share` measures the artefact: on
    the crops above the stride-2 lattice holds a median 11.3 % of a plain map's power, 0.03 %
    with jitter (chance level 0.03 %); the share of mass on the cell is unchanged (0.32).
    Copies of several crops share one forward/backward pass (``batch_size`` copies each), which
    bounds the memory whatever ``n_samples``; on a CPU the cost is the network's own forward
    and backward passes either way (7.4 cells/s on 2 cores, as before the jitter).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import NDArray
from skimage.draw import polygon2mask
from tqdm import tqdm

__all__ = [
    "GRADCAM_STAGE",
    "SMOOTHGRAD_SAMPLES",
    "SMOOTHGRAD_SIGMA",
    "SMOOTHGRAD_STRIDE",
    "gradcam",
    "gradcam_layer",
    "smoothgrad",
    "stride_power_share",
    "select_cells",
    "contour_masks",
    "saliency_share_inside",
]

GRADCAM_STAGE = -2
SMOOTHGRAD_SAMPLES = 25
SMOOTHGRAD_SIGMA = 0.15
SMOOTHGRAD_STRIDE = 2  # stride of the CoAtNet stem's first convolution
IMAGENET_HALF = (0.5, 0.5, 0.5)


def gradcam_layer(model: torch.nn.Module, stage: int = GRADCAM_STAGE) -> torch.nn.Module:
    """The Grad-CAM target layer of a timm CoAtNet: one of its ``stages``.

    Parameters
    ----------
    model : torch.nn.Module
        A timm ``MaxxVit`` model (``coatnet_*``).
    stage : int
        Index into ``model.stages`` (see the module docstring for the default).

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


def _bar(method: str, cells: int, progress: bool) -> tqdm:
    return tqdm(total=cells, desc=f"saliency {method}", unit="cell", disable=not progress)


def gradcam(
    model: torch.nn.Module,
    crops: NDArray[np.uint8],
    target_classes: NDArray[np.integer],
    *,
    mean: Sequence[float] = IMAGENET_HALF,
    std: Sequence[float] = IMAGENET_HALF,
    stage: int = GRADCAM_STAGE,
    batch_size: int = 32,
    progress: bool = False,
) -> NDArray[np.float32]:
    """Raw Grad-CAM maps of ``target_classes`` for each crop.

    Parameters
    ----------
    model : torch.nn.Module
        A timm CoAtNet classifier; it is put in eval mode.
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
    progress : bool
        Show a progress bar on stderr.

    Returns
    -------
    (N, H, W) float32
        ReLU of the gradient-weighted activations, upsampled bilinearly to crop size; not
        normalised.
    """
    model.eval()
    targets = torch.as_tensor(np.asarray(target_classes, dtype=np.int64))
    out = np.zeros(crops.shape[:3], dtype=np.float32)
    device = _device(model)
    captured: list[torch.Tensor] = []

    def cut(module: torch.nn.Module, inputs: object, output: torch.Tensor) -> torch.Tensor:
        # The layer's output becomes a leaf: the backward pass stops here instead of running
        # through the whole network, and works even when the parameters are frozen.
        leaf = output.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    hook = gradcam_layer(model, stage).register_forward_hook(cut)
    try:
        # Gradients are needed even when the caller runs under torch.no_grad().
        with torch.enable_grad(), _bar("gradcam", len(crops), progress) as bar:
            for part in _batches(len(crops), batch_size):
                captured.clear()
                logits = model(_to_input(crops[part], mean, std, device))
                score = logits.gather(1, targets[part, None].to(device)).sum()
                (acts,) = captured
                (grads,) = torch.autograd.grad(score, acts)
                weights = grads.mean(dim=(2, 3), keepdim=True)
                cam = torch.relu((weights * acts.detach()).sum(dim=1, keepdim=True))
                up = torch.nn.functional.interpolate(
                    cam, size=crops.shape[1:3], mode="bilinear", align_corners=False
                )
                out[part] = up[:, 0].cpu().numpy()
                bar.update(part.stop - part.start)
    finally:
        hook.remove()
    return out


def _crop_draws(
    seed: int, index: int, n_samples: int, shape: tuple[int, ...]
) -> tuple[NDArray[np.float32], NDArray[np.intp]]:
    """Crop ``index``'s own stream: standard normal noise ``(n_samples, *shape)`` and the
    ``(n_samples, 2)`` jitter phases ``(dy, dx)`` in ``[0, SMOOTHGRAD_STRIDE)``.

    The phases are stratified (every phase once per ``SMOOTHGRAD_STRIDE ** 2`` samples, in a
    shuffled order) so that the stride-periodic part of the gradient averages out evenly.
    """
    rng = np.random.default_rng([seed, index])
    noise = rng.standard_normal((n_samples, *shape), dtype=np.float32)
    phases = SMOOTHGRAD_STRIDE**2
    rounds = -(-n_samples // phases)
    order = np.concatenate([rng.permutation(phases) for _ in range(rounds)])[:n_samples]
    return noise, np.stack(np.divmod(order, SMOOTHGRAD_STRIDE), axis=1)


def smoothgrad(
    model: torch.nn.Module,
    crops: NDArray[np.uint8],
    target_classes: NDArray[np.integer],
    *,
    mean: Sequence[float] = IMAGENET_HALF,
    std: Sequence[float] = IMAGENET_HALF,
    n_samples: int = SMOOTHGRAD_SAMPLES,
    sigma: float = SMOOTHGRAD_SIGMA,
    jitter: bool = True,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
) -> NDArray[np.float32]:
    """Raw SmoothGrad maps of ``target_classes`` for each crop (see the module docstring).

    Parameters
    ----------
    model, crops, target_classes, mean, std, progress
        As for :func:`gradcam`.
    n_samples : int
        Noisy copies averaged per crop.
    sigma : float
        Noise standard deviation as a fraction of each normalised input's value range.
    jitter : bool
        Translate each noisy copy by a sub-stride phase and shift its gradient back, which
        removes the stem's checkerboard (see the module docstring). False gives plain
        SmoothGrad.
    batch_size : int
        Noisy copies per forward/backward pass, whatever crops they belong to. It bounds the
        memory (about 18 MB per copy for the default card on a CPU), whatever ``n_samples``.
    seed : int
        Seed of the noise and the jitter. Crop ``i`` of the call gets its own stream,
        ``default_rng([seed, i])``, so maps are reproducible and do not depend on
        ``batch_size``.

    Returns
    -------
    (N, H, W) float32
        Mean absolute input gradient, channel maximum; not normalised.
    """
    if n_samples < 1 or sigma < 0:
        raise ValueError(f"need n_samples >= 1 and sigma >= 0, got {n_samples} and {sigma}")
    model.eval()
    device = _device(model)
    n, h, w = crops.shape[:3]
    targets = torch.as_tensor(np.asarray(target_classes, dtype=np.int64), device=device)
    pad = SMOOTHGRAD_STRIDE - 1 if jitter else 0
    total = np.zeros((n, h + 2 * pad, w + 2 * pad), dtype=np.float32)
    seen = np.zeros_like(total)
    # One row per (crop, sample), crop-major; a pass takes ``batch_size`` rows, from one or
    # several crops.
    row_crop = np.repeat(np.arange(n), n_samples)
    row_sample = np.tile(np.arange(n_samples), n)
    draws: dict[int, tuple[NDArray[np.float32], NDArray[np.intp]]] = {}
    with _bar("smoothgrad", n, progress) as bar:
        for part in _batches(len(row_crop), batch_size):
            ids, samples = row_crop[part], row_sample[part]
            first, last = int(ids[0]), int(ids[-1])
            x = _to_input(crops[first : last + 1], mean, std, device)
            spread = sigma * (x.amax(dim=(1, 2, 3)) - x.amin(dim=(1, 2, 3)))
            # A crop's draws are made once, kept while its copies span passes.
            draws = {i: draws[i] for i in draws if i >= first}
            for i in range(first, last + 1):
                if i not in draws:
                    draws[i] = _crop_draws(seed, i, n_samples, tuple(x.shape[1:]))
            noise = np.stack([draws[i][0][j] for i, j in zip(ids, samples, strict=True)])
            offset = np.zeros((len(ids), 2), dtype=np.intp)
            if pad:
                offset[:] = [draws[i][1][j] for i, j in zip(ids, samples, strict=True)]
            local = torch.as_tensor(ids - first, device=device)
            noisy = x[local] + spread[local, None, None, None] * torch.from_numpy(noise).to(device)
            if pad:
                # Each copy shows the crop translated by its phase (a fraction of the stem's
                # stride), cut from the reflect-padded copy.
                noisy = _translated(noisy, offset, pad)
            noisy.requires_grad_(True)
            with torch.enable_grad():
                logits = model(noisy)
                chosen = logits.gather(1, targets[torch.as_tensor(ids)][:, None]).sum()
                (grad,) = torch.autograd.grad(chosen, noisy)
            saliency = grad.abs().amax(dim=1).cpu().numpy()
            # Shift each gradient back onto its crop's own pixels.
            for row, (i, (dy, dx)) in enumerate(zip(ids, offset, strict=True)):
                total[i, dy : dy + h, dx : dx + w] += saliency[row]
                seen[i, dy : dy + h, dx : dx + w] += 1
            bar.update(int(np.sum(samples == n_samples - 1)))
    inner = (slice(None), slice(pad, pad + h), slice(pad, pad + w))
    # A border pixel is missing from the copies translated past it: average what saw it.
    return (total[inner] / np.maximum(seen[inner], 1)).astype(np.float32)


def _translated(images: torch.Tensor, offsets: NDArray[np.intp], pad: int) -> torch.Tensor:
    """``images[k]`` reflect-padded by ``pad`` and cut at ``offsets[k]`` (dy, dx), same size."""
    h, w = images.shape[-2:]
    padded = torch.nn.functional.pad(images, (pad,) * 4, mode="reflect")
    device = images.device
    rows = torch.as_tensor(offsets[:, 0, None] + np.arange(h), device=device)  # (K, h)
    cols = torch.as_tensor(offsets[:, 1, None] + np.arange(w), device=device)  # (K, w)
    k = torch.arange(len(images), device=device)[:, None, None, None]
    c = torch.arange(images.shape[1], device=device)[None, :, None, None]
    return padded[k, c, rows[:, None, :, None], cols[:, None, None, :]]


def stride_power_share(
    maps: NDArray[np.floating], stride: int = SMOOTHGRAD_STRIDE
) -> NDArray[np.float64]:
    """Share of each map's spectral power on the lattice of a ``stride``-periodic pattern.

    A grid (checkerboard) artefact of period ``stride`` puts its power at the frequencies
    ``(a, b) * H / stride`` (not both 0); a map without one has about the chance share
    ``(stride**2 - 1) / (H * W - 1)`` there (0.03 % for stride 2 at 96 px).

    Parameters
    ----------
    maps : (N, H, W) float
        Saliency maps; H and W multiples of ``stride``.
    stride : int

    Returns
    -------
    (N,) float64
        Power on the lattice / power of the mean-removed map; NaN for a constant map.
    """
    maps = np.asarray(maps, dtype=np.float64)
    n, h, w = maps.shape
    if h % stride or w % stride:
        raise ValueError(f"map size {h} x {w} is not a multiple of the stride {stride}")
    power = np.abs(np.fft.fft2(maps - maps.mean(axis=(1, 2), keepdims=True))) ** 2
    lattice = power[:, :: h // stride, :: w // stride].sum(axis=(1, 2))  # the DC term is 0
    total = power.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, lattice / total, np.nan)


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
