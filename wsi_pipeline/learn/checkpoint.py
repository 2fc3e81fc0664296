"""The resumable checkpoint of the training loop: the network, the optimiser, the random
generator and the loop's own state (step, epoch, snapshots kept, history), written whole after
every epoch, so a killed run resumes where it stopped and draws the same batches it would have."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from wsi_pipeline.core.files import atomic_path

__all__ = ["CHECKPOINT", "resume", "save_checkpoint"]

#: File name of the checkpoint in a run's working folder.
CHECKPOINT = "checkpoint.pt"


def save_checkpoint(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    state: dict[str, Any],
) -> None:
    """Write the loop's ``state`` with the weights, optimiser and generator to ``path``,
    atomically (a run killed while writing leaves the previous checkpoint)."""
    payload = {
        **state,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def resume(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into ``model``, ``optimizer`` and ``generator``; return
    the loop's state as it was saved."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(payload.pop("model"))
    optimizer.load_state_dict(payload.pop("optimizer"))
    generator.set_state(payload.pop("generator"))
    return payload
