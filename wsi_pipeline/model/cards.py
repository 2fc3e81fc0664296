"""Classifier cards: a TOML file that says how to build, feed and trust one cell classifier.

A card (``classifiers/<name>.toml``) holds the timm architecture and its arguments, the input
size and the physical field of view of a crop, the normalisation, the ordered class list, the
weights files (fp16 safetensors, several for an ensemble) with their SHA-256, the provenance
(data, licence, split, measured scores), the classes it cannot recognise and a one-line caveat.

Example::

    name = "default"
    caveat = "Research model, not for diagnosis."

    [model]
    architecture = "coatnet_pico_rw_224"
    cfg = { embed_dim = [32, 64, 128, 256], depths = [2, 2, 3, 2] }  # MaxxVitCfg overrides
    kwargs = {}
    input_size = 96
    fov_um = 32.0
    mean = [0.5, 0.5, 0.5]
    std = [0.25, 0.25, 0.25]

    [weights]
    files = ["default.safetensors"]
    sha256 = ["..."]
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.models import maxxvit

from wsi_pipeline.core.errors import InputError
from wsi_pipeline.core.files import atomic_path, data_path, file_sha256
from wsi_pipeline.core.taxonomy import CellClass, cell_class, codes
from wsi_pipeline.core.toml_writer import dump_toml
from wsi_pipeline.model import hybrid
from wsi_pipeline.model.novelty import NoveltyModel

__all__ = [
    "CardError",
    "ClassifierCard",
    "ModelSpec",
    "WeightsFile",
    "build_model",
    "card_path",
    "classifiers_dir",
    "list_cards",
    "load_card",
    "resolve_card",
    "load_novelty",
    "load_state_dicts",
    "save_weights",
    "write_card",
]


class CardError(InputError):
    """A card or its weights cannot be used; ``str()`` is one line naming the file."""


@dataclass(frozen=True)
class ModelSpec:
    """How to build the network and feed it.

    Attributes
    ----------
    architecture : str
        timm model name.
    input_size : int
        Side of the square input in pixels.
    fov_um : float
        Physical side of a crop in micrometres (centred on the cell).
    mean, std : tuple of float
        Per-channel normalisation of RGB values scaled to [0, 1].
    kwargs : dict
        Extra keyword arguments of the timm constructor.
    cfg : dict
        Overrides of the timm ``MaxxVitCfg`` (CoAtNet family only) for compact variants.
    temperature : float
        Every member's logits are divided by it before the softmax (temperature scaling,
        fitted on the validation split; 1 = uncalibrated).
    """

    architecture: str
    input_size: int = 96
    fov_um: float = 32.0
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    kwargs: dict[str, Any] = field(default_factory=dict)
    cfg: dict[str, Any] = field(default_factory=dict)
    temperature: float = 1.0

    @property
    def mpp(self) -> float:
        """Microns per pixel of the input crops."""
        return self.fov_um / self.input_size


@dataclass(frozen=True)
class WeightsFile:
    """One safetensors file and the SHA-256 it must have."""

    path: Path
    sha256: str


@dataclass(frozen=True)
class ClassifierCard:
    """Everything needed to build, run and trust one classifier.

    Attributes
    ----------
    name : str
        Card name (file stem).
    path : Path
        Where the card was read from (weights paths are relative to its folder).
    model : ModelSpec
    classes : tuple of CellClass
        Output classes in the order of the network's outputs.
    weights : tuple of WeightsFile
        One file, or several averaged at inference (snapshot ensemble). Empty: no weights yet.
    cannot_recognise : tuple of str
        MLL codes the classifier has no output for (reported "not assessable", never 0 %).
    caveat : str
        One line printed once per run.
    description : str
    provenance : dict
        Data, licence and attribution, split, training command, pixel-size estimate, scores.
    adaptation : dict
        The colour moments of the training crops, to which each slide's are matched
        (:mod:`wsi_pipeline.model.adapt`); empty: the card cannot adapt to a slide.
    novelty : dict
        The novelty model (:mod:`wsi_pipeline.model.novelty`): ``file``, ``sha256``,
        ``members``, ``threshold``, ``quantile``; empty: the card has none.
    """

    name: str
    path: Path
    model: ModelSpec
    classes: tuple[CellClass, ...]
    weights: tuple[WeightsFile, ...] = ()
    cannot_recognise: tuple[str, ...] = ()
    caveat: str = "Research model, not for diagnosis."
    description: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)
    adaptation: dict[str, Any] = field(default_factory=dict)
    novelty: dict[str, Any] = field(default_factory=dict)

    @property
    def codes(self) -> tuple[str, ...]:
        """Class codes in output order."""
        return tuple(c.code for c in self.classes)

    @property
    def mpp(self) -> float:
        """Microns per pixel at which crops are fed to the network."""
        return self.model.mpp

    def to_dict(self) -> dict[str, Any]:
        """The card as the nested dict its TOML file holds."""
        return {
            "name": self.name,
            "caveat": self.caveat,
            "description": self.description,
            "cannot_recognise": list(self.cannot_recognise),
            "model": {
                "architecture": self.model.architecture,
                "input_size": self.model.input_size,
                "fov_um": self.model.fov_um,
                "mean": list(self.model.mean),
                "std": list(self.model.std),
                "kwargs": self.model.kwargs,
                "cfg": self.model.cfg,
                # Only written when calibrated, so uncalibrated cards read as they were.
                **({"temperature": self.model.temperature} if self.model.temperature != 1 else {}),
            },
            "weights": {
                "files": [w.path.name for w in self.weights],
                "sha256": [w.sha256 for w in self.weights],
            },
            **({"adaptation": self.adaptation} if self.adaptation else {}),
            **({"novelty": self.novelty} if self.novelty else {}),
            "classes": [dataclasses.asdict(c) for c in self.classes],
            "provenance": self.provenance,
        }


def classifiers_dir() -> Path:
    """The ``classifiers/`` folder shipped with the package."""
    return data_path("classifiers")


def list_cards() -> list[str]:
    """Names of the shipped cards."""
    return sorted(p.stem for p in classifiers_dir().glob("*.toml"))


def card_path(name_or_path: str | os.PathLike[str]) -> Path:
    """Resolve a card name (``"default"``) or a path to a ``.toml`` file."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or candidate.is_file():
        if not candidate.is_file():
            raise CardError(candidate, "classifier card not found")
        return candidate
    shipped = classifiers_dir() / f"{name_or_path}.toml"
    if not shipped.is_file():
        raise CardError(
            shipped,
            f"no classifier card named {name_or_path!r}; shipped: {', '.join(list_cards())}",
        )
    return shipped


def load_card(name_or_path: str | os.PathLike[str]) -> ClassifierCard:
    """Read and validate a card by name or path (the weights are checked when loaded)."""
    path = card_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
        return _card_from_dict(raw, path)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise CardError(path, f"not a valid TOML card ({error})") from error
    except (KeyError, TypeError, ValueError) as error:
        raise CardError(path, f"invalid classifier card: {error}") from error


def resolve_card(card: ClassifierCard | str | os.PathLike[str]) -> ClassifierCard:
    """``card`` itself if it is already resolved, else the card of that name or path.

    A run resolves its card once and passes the object down; this is where a name becomes one.
    """
    return card if isinstance(card, ClassifierCard) else load_card(card)


def _card_from_dict(raw: Mapping[str, Any], path: Path) -> ClassifierCard:
    model = raw["model"]
    spec = ModelSpec(
        architecture=str(model["architecture"]),
        input_size=int(model.get("input_size", 96)),
        fov_um=float(model.get("fov_um", 32.0)),
        mean=tuple(float(v) for v in model.get("mean", (0.5, 0.5, 0.5))),
        std=tuple(float(v) for v in model.get("std", (0.25, 0.25, 0.25))),
        kwargs=dict(model.get("kwargs", {})),
        cfg=dict(model.get("cfg", {})),
        temperature=float(model.get("temperature", 1.0)),
    )
    classes = tuple(_class_from_entry(entry) for entry in raw["classes"])
    if len(set(c.code for c in classes)) != len(classes):
        raise ValueError("class codes repeat")
    weights_table = raw.get("weights", {})
    files, hashes = weights_table.get("files", []), weights_table.get("sha256", [])
    if len(files) != len(hashes):
        raise ValueError("weights.files and weights.sha256 differ in length")
    known = {c.code for c in classes}
    return ClassifierCard(
        name=str(raw.get("name", path.stem)),
        path=path,
        model=spec,
        classes=classes,
        weights=tuple(
            WeightsFile(path.parent / f, str(h)) for f, h in zip(files, hashes, strict=True)
        ),
        cannot_recognise=tuple(
            raw.get("cannot_recognise", [code for code in codes() if code not in known])
        ),
        caveat=str(raw.get("caveat", ClassifierCard.caveat)),
        description=str(raw.get("description", "")),
        provenance=dict(raw.get("provenance", {})),
        adaptation=dict(raw.get("adaptation", {})),
        novelty=dict(raw.get("novelty", {})),
    )


def _class_from_entry(entry: str | Mapping[str, str]) -> CellClass:
    """A class entry: an MLL code, or a table whose missing fields come from the taxonomy."""
    if isinstance(entry, str):
        return cell_class(entry)
    base = cell_class(entry["code"])
    return dataclasses.replace(base, **{k: str(v) for k, v in entry.items() if k != "code"})


def build_model(card: ClassifierCard) -> torch.nn.Module:
    """The untrained network of a card, in eval mode, float32 on the CPU.

    CoAtNet (timm MaxxVit family) models are built with ``img_size`` fixed to the card's input
    size; a ``cfg`` table in the card overrides fields of the named variant's ``MaxxVitCfg``
    (``embed_dim``, ``depths``, ``stem_width``...) to build compact models timm does not register.
    The hybrids of :mod:`wsi_pipeline.model.hybrid` take their ``cfg`` table whole.
    """
    spec = card.model
    kwargs = {"num_classes": len(card.classes), **spec.kwargs}
    own = spec.architecture in hybrid.ARCHITECTURES
    if own or timm.get_pretrained_cfg_value(spec.architecture, "fixed_input_size"):
        kwargs.setdefault("img_size", spec.input_size)
    model: torch.nn.Module
    try:
        if own:
            model = timm.create_model(spec.architecture, cfg=spec.cfg, **kwargs)
        elif spec.cfg:
            model = maxxvit.MaxxVit(_maxxvit_cfg(spec), **kwargs)
        else:
            model = timm.create_model(spec.architecture, pretrained=False, **kwargs)
    except (RuntimeError, TypeError, ValueError, KeyError) as error:
        raise CardError(card.path, f"cannot build {spec.architecture}: {error}") from error
    return model.eval()


def _maxxvit_cfg(spec: ModelSpec) -> maxxvit.MaxxVitCfg:
    variant = spec.architecture.rsplit("_", 1)[0]  # timm's own rule: drop the input-size suffix
    if variant not in maxxvit.model_cfgs:
        raise KeyError(f"cfg overrides need a timm CoAtNet/MaxViT name, got {spec.architecture!r}")
    overrides: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in spec.cfg.items()
    }
    return dataclasses.replace(maxxvit.model_cfgs[variant], **overrides)


def load_state_dicts(card: ClassifierCard) -> list[dict[str, torch.Tensor]]:
    """The float32 state dicts of every weights file, each checked against its SHA-256.

    Raises
    ------
    CardError
        When the card has no weights, a file is missing, its hash differs, it is unreadable or
        its tensors do not fit the card's network.
    """
    if not card.weights:
        raise CardError(card.path, "this card has no trained weights (weights.files is empty)")
    shapes = {name: tuple(t.shape) for name, t in build_model(card).state_dict().items()}
    states = []
    for weights in card.weights:
        _check_file(card, weights)
        try:
            state = load_file(weights.path)
        except SafetensorError as error:
            raise CardError(weights.path, f"not a readable safetensors file ({error})") from error
        _check_fits(card, weights.path, state, shapes)
        states.append({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return states


def _check_file(card: ClassifierCard, weights: WeightsFile) -> None:
    """Refuse a missing file of the card or one whose SHA-256 is not the card's."""
    if not weights.path.is_file():
        raise CardError(weights.path, f"weights file of card {card.name!r} not found")
    actual = file_sha256(weights.path)
    if actual != weights.sha256:
        # Enough characters of both hashes to see where they differ.
        shown = max(12, len(os.path.commonprefix([actual, weights.sha256])) + 4)
        raise CardError(
            weights.path,
            f"SHA-256 mismatch: card {card.name!r} expects {weights.sha256[:shown]}..., "
            f"file has {actual[:shown]}...; the file is corrupt or not these weights",
        )


def load_novelty(card: ClassifierCard) -> NoveltyModel | None:
    """The card's novelty model (its file checked against its SHA-256), or None without one."""
    if not card.novelty:
        return None
    weights = WeightsFile(card.path.parent / card.novelty["file"], card.novelty["sha256"])
    _check_file(card, weights)
    try:
        model = NoveltyModel.load(weights.path, card.novelty)
    except (SafetensorError, KeyError) as error:
        raise CardError(weights.path, f"not a readable novelty model ({error})") from error
    if len(model.members) != len(card.weights):
        raise CardError(weights.path, "the novelty model has another number of members")
    return model


def _check_fits(
    card: ClassifierCard,
    path: Path,
    state: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
) -> None:
    """Refuse weights with missing, unknown or differently shaped tensors for the card's network
    (``shapes``: its tensors' shapes), which torch would only refuse with a page of names."""
    resized = sorted(k for k in shapes.keys() & state.keys() if tuple(state[k].shape) != shapes[k])
    missing = sorted(shapes.keys() - state.keys())
    unknown = sorted(state.keys() - shapes.keys())
    problems = []
    if resized:
        first = resized[0]
        problems.append(
            f"{len(resized)} of another shape (first {first}: {tuple(state[first].shape)} in the "
            f"file, {shapes[first]} in the network)"
        )
    if missing:
        problems.append(f"{len(missing)} missing (first {missing[0]})")
    if unknown:
        problems.append(f"{len(unknown)} unknown to the network (first {unknown[0]})")
    if problems:
        raise CardError(
            path,
            f"these weights do not fit the {card.model.architecture} network of card "
            f"{card.name!r}: tensors {'; '.join(problems)}",
        )


def save_weights(model: torch.nn.Module, path: Path) -> WeightsFile:
    """Write a model's weights as fp16 safetensors (atomically) and return the file and hash."""
    state = {
        k: (v.half() if v.is_floating_point() else v).contiguous().cpu()
        for k, v in model.state_dict().items()
    }
    with atomic_path(path) as tmp:
        save_file(state, tmp)
    return WeightsFile(path, file_sha256(path))


def write_card(card: ClassifierCard, path: Path | None = None) -> Path:
    """Write a card as TOML (atomically) to ``path`` (default: ``card.path``)."""
    path = Path(path or card.path)
    text = dump_toml(card.to_dict())
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
