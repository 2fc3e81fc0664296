"""Fine-tuning a trained card (``wsi train --init PARENT``): every member of the parent's
ensemble is trained on, one cosine cycle each, with the frozen member's own answers kept in the
loss; and the provenance of the corrections folders (``wsi corrections``) it learns from."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from wsi_pipeline.learn.config import TrainConfig
from wsi_pipeline.learn.corrections import MANIFEST
from wsi_pipeline.learn.datasets import LabelledCrops
from wsi_pipeline.learn.loop import fit, on_device
from wsi_pipeline.model.cards import ClassifierCard, build_model, load_state_dicts

__all__ = ["corrections_manifests", "fine_tune"]


def fine_tune(
    parent: ClassifierCard,
    template: ClassifierCard,
    splits: dict[str, LabelledCrops],
    config: TrainConfig,
    workdir: Path,
    device: torch.device,
    log: Callable[[str], None],
) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]], list[dict[str, float]], dict]:
    """Fine-tune each member of the parent's ensemble (one cosine cycle each, its own
    checkpoint folder), so the child is an ensemble too and its members' agreement still says
    how sure it is. Returns the last network, the members' weights, the history and the
    parent's identity for the provenance."""
    snapshots, history = [], []
    restarted: set[str] = set()
    for k, state in enumerate(load_state_dicts(parent)):
        model = build_model(template)
        own = model.state_dict()
        kept = {name: v for name, v in state.items() if name in own and own[name].shape == v.shape}
        model.load_state_dict(kept, strict=False)
        restarted |= set(own) - set(kept)
        teacher = None
        # A restarted layer (another class list) has no answers of the parent's to keep.
        if config.distill > 0 and not restarted:
            teacher = copy.deepcopy(model).to(device).eval().requires_grad_(False)
        elif config.distill > 0 and k == 0:
            log("distillation off: the template's layers differ from the parent's")
        log(f"member {k + 1} of {len(parent.weights)}")
        member, member_history = fit(
            on_device(model, device),
            template,
            splits["train"],
            splits["val"],
            config,
            workdir / f"member{k + 1}",
            log,
            teacher=teacher,
        )
        snapshots += member
        history += member_history
    identity = {
        "name": parent.name,
        "path": str(parent.path),
        "weights_sha256": [w.sha256 for w in parent.weights],
        "layers_restarted": sorted(restarted),
    }
    return model, snapshots, history, identity


def corrections_manifests(folders: Sequence[Path]) -> list[dict[str, Any]]:
    """Where each corrections folder among ``folders`` came from (its ``corrections.json``,
    written by ``wsi corrections``): store, slide and edited export, with checksums."""
    found = []
    for folder in folders:
        manifest = folder / MANIFEST
        if manifest.is_file():
            record = json.loads(manifest.read_text(encoding="utf-8"))
            found.append({"folder": str(folder.resolve()), **record})
    return found
