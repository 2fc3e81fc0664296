"""Augmentations that make one lab's cells look like another lab's.

A classifier trained on one or two labs collapses on a third when it has learnt their stain,
background, sharpness or scanner instead of the cells. Each training batch is therefore redrawn
as other labs would have made it (:func:`augment`):

* geometry: any rotation, mirror flips, a small shift and a scale of ±20 % (pixel-size errors
  and cell-size variation), in one affine resampling with reflected borders;
* stain: the optical density of each pixel is split into haematoxylin-, eosin- and DAB-like
  components (Ruifrok and Johnston's colour deconvolution, as ``skimage.color.rgb2hed``), each
  scaled and shifted at random and recombined (Tellez et al., 2018, "H&E-E" augmentation);
* exposure: brightness, contrast, gamma and saturation;
* background tint: glass and pale areas pulled towards yellow, pink, grey or blue (rapid stains,
  old slides, white balance of other cameras);
* optics: Gaussian blur (defocus) and sensor noise;
* compression: JPEG at quality 30-90.

Every range is a field of :class:`AugmentConfig`, recorded in the card that is trained with it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["AUGMENTATIONS", "AugmentConfig", "augment"]

#: Ruifrok and Johnston's stain vectors (rows: haematoxylin, eosin, DAB), as scikit-image's
#: ``rgb_from_hed``; any invertible basis of stain-like directions serves for augmentation.
_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float32
)
_RGB_FROM_HED = _RGB_FROM_HED / _RGB_FROM_HED.norm(dim=1, keepdim=True)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)
#: Tints of other labs' backgrounds: yellow (rapid stains), pink, grey, blue (cold white balance).
_TINTS = torch.tensor(
    [[1.0, 0.95, 0.78], [1.0, 0.86, 0.92], [0.88, 0.88, 0.88], [0.86, 0.92, 1.0]],
    dtype=torch.float32,
)
_DARKEST = 1.0 / 255.0


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of :func:`augment`; ``(low, high)`` pairs are drawn uniformly per image.

    Attributes
    ----------
    scale : (float, float)
        Zoom factor (1.2 = the cell looks 20 % larger).
    shift : float
        Largest translation, as a share of the side.
    stain_scale, stain_shift : float
        Each stain component is multiplied by ``1 ± stain_scale`` and shifted by
        ``± stain_shift`` optical-density units.
    brightness, contrast, gamma, saturation : (float, float)
    tint : (float, float)
        Strength of the pull of pale areas towards a random background tint.
    blur_probability : float
    blur_sigma : (float, float)
        Gaussian blur, in pixels of the crop.
    noise : float
        Largest standard deviation of Gaussian sensor noise (intensities in [0, 1]).
    jpeg_probability : float
    jpeg_quality : (int, int)
    """

    scale: tuple[float, float] = (0.8, 1.2)
    shift: float = 0.06
    stain_scale: float = 0.3
    stain_shift: float = 0.05
    brightness: tuple[float, float] = (0.85, 1.15)
    contrast: tuple[float, float] = (0.75, 1.25)
    gamma: tuple[float, float] = (0.75, 1.35)
    saturation: tuple[float, float] = (0.6, 1.4)
    tint: tuple[float, float] = (0.0, 1.0)
    blur_probability: float = 0.3
    blur_sigma: tuple[float, float] = (0.3, 1.5)
    noise: float = 0.02
    jpeg_probability: float = 0.3
    jpeg_quality: tuple[int, int] = (30, 90)

    def as_dict(self) -> dict[str, Any]:
        """TOML-ready copy (lists for pairs)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


#: Named ranges: ``other-labs`` redraws a cell as any lab's stain, background, optics and
#: compression would show it (for a card meant to hold on labs it never saw); ``one-lab`` only
#: as one lab's own slides vary from day to day (for a lab card fine-tuned on that lab's
#: corrections, whose colour cues, such as an eosinophil's granules in that stain, must not be
#: washed out).
AUGMENTATIONS: dict[str, AugmentConfig] = {
    "other-labs": AugmentConfig(),
    "one-lab": AugmentConfig(
        stain_scale=0.1,
        stain_shift=0.02,
        brightness=(0.93, 1.07),
        contrast=(0.9, 1.1),
        gamma=(0.9, 1.1),
        saturation=(0.9, 1.1),
        tint=(0.0, 0.2),
        blur_probability=0.2,
        blur_sigma=(0.3, 1.0),
        jpeg_probability=0.2,
        jpeg_quality=(50, 90),
    ),
}


def augment(
    x: torch.Tensor, generator: torch.Generator, config: AugmentConfig = AugmentConfig()
) -> torch.Tensor:
    """Redraw a batch of RGB images in [0, 1], shape (N, 3, H, W), as other labs would show it.

    Parameters
    ----------
    x : torch.Tensor
    generator : torch.Generator
        The source of every random draw, so a resumed run repeats its augmentations.
    config : AugmentConfig

    Returns
    -------
    torch.Tensor
        A new batch of the same shape, in [0, 1].
    """
    draw = _Draw(x.shape[0], generator, x.device)
    x = _geometry(x, draw, config)
    x = _stain(x, draw, config)
    x = _blur(x, draw, config)
    x = _exposure(x, draw, config)
    x = _tint(x, draw, config)
    x = x + torch.randn(x.shape, generator=generator, device=x.device) * draw.uniform(
        0.0, config.noise, 1, 1, 1
    )
    return _jpeg(x.clamp(0.0, 1.0), draw, config)


class _Draw:
    """Per-image random numbers from one generator."""

    def __init__(self, n: int, generator: torch.Generator, device: torch.device):
        self.n, self.generator, self.device = n, generator, device

    def uniform(self, low: float, high: float, *shape: int) -> torch.Tensor:
        u = torch.rand(self.n, *shape, generator=self.generator, device=self.device)
        return u * (high - low) + low

    def chance(self, probability: float) -> torch.Tensor:
        return self.uniform(0.0, 1.0) < probability


def _geometry(x: torch.Tensor, draw: _Draw, config: AugmentConfig) -> torch.Tensor:
    angle = draw.uniform(0.0, 2 * math.pi)
    zoom = 1.0 / draw.uniform(*config.scale)
    flip = torch.where(draw.chance(0.5), -1.0, 1.0)
    cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
    shift = draw.uniform(-2 * config.shift, 2 * config.shift, 2)  # grid units span [-1, 1]
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, shift[:, 0]], 1),
            torch.stack([sin * flip, cos, shift[:, 1]], 1),
        ],
        1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _stain(x: torch.Tensor, draw: _Draw, config: AugmentConfig) -> torch.Tensor:
    od = -torch.log(x.clamp(min=_DARKEST))
    hed = torch.einsum("nchw,cd->ndhw", od, _HED_FROM_RGB.to(x.device))
    scale = draw.uniform(1 - config.stain_scale, 1 + config.stain_scale, 3, 1, 1)
    shift = draw.uniform(-config.stain_shift, config.stain_shift, 3, 1, 1)
    od = torch.einsum("ndhw,dc->nchw", hed * scale + shift, _RGB_FROM_HED.to(x.device))
    return torch.exp(-od.clamp(min=0.0))


def _blur(x: torch.Tensor, draw: _Draw, config: AugmentConfig) -> torch.Tensor:
    blurred = draw.chance(config.blur_probability)
    if not blurred.any():
        return x
    sigma = draw.uniform(*config.blur_sigma)[blurred]
    radius = math.ceil(3 * config.blur_sigma[1])
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (taps[None] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(3, 0)  # (m * 3, k)
    part = x[blurred]
    m, c, h, w = part.shape
    flat = F.pad(part.reshape(1, m * c, h, w), (radius,) * 4, mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=m * c)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=m * c)
    x = x.clone()
    x[blurred] = flat.reshape(m, c, h, w)
    return x


def _exposure(x: torch.Tensor, draw: _Draw, config: AugmentConfig) -> torch.Tensor:
    x = x.clamp(0.0, 1.0) ** draw.uniform(*config.gamma, 1, 1, 1)
    grey = x.mean(1, keepdim=True)
    x = grey + (x - grey) * draw.uniform(*config.saturation, 1, 1, 1)
    mean = x.mean((1, 2, 3), keepdim=True)
    x = mean + (x - mean) * draw.uniform(*config.contrast, 1, 1, 1)
    return x * draw.uniform(*config.brightness, 1, 1, 1)


def _tint(x: torch.Tensor, draw: _Draw, config: AugmentConfig) -> torch.Tensor:
    """Pull pale pixels towards a tint, in proportion to their brightness: a coloured background
    tints glass fully and dark nuclei hardly at all."""
    which = (draw.uniform(0.0, 1.0) * len(_TINTS)).long().clamp(max=len(_TINTS) - 1)
    tint = _TINTS.to(x.device)[which].view(-1, 3, 1, 1)
    strength = draw.uniform(*config.tint, 1, 1, 1)
    pale = x.mean(1, keepdim=True).clamp(0.0, 1.0)
    return x * (1 - strength * pale * (1 - tint))


def _jpeg(x: torch.Tensor, draw: _Draw, config: AugmentConfig) -> torch.Tensor:
    chosen = torch.nonzero(draw.chance(config.jpeg_probability)).flatten()
    if not len(chosen):
        return x
    quality = draw.uniform(*config.jpeg_quality)[chosen].round().int().tolist()
    images = (x[chosen] * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    for i, (image, q) in enumerate(zip(images, quality, strict=True)):
        bgr = np.ascontiguousarray(image[..., ::-1])
        ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, q])
        decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR) if ok else None
        if decoded is not None:
            images[i] = decoded[..., ::-1]
    x = x.clone()
    x[chosen] = torch.from_numpy(images).to(x.device).permute(0, 3, 1, 2).float() / 255
    return x
