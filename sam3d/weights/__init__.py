"""The model shipped with the package: what ``sam3d segment`` and ``sam3d serve`` use when
no ``--checkpoint`` is given.

``tiny_synth.pt`` is the tiny Sam3D trained by ``scripts/train_default_model.py`` (the kits
bundle's interactive click training with the mask prompt) on synthetic volumes only; its
metadata (``meta["training"]``) hold the family, seed, budget and command that made it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sam3d.errors import Sam3DError

SHIPPED_MODEL = Path(__file__).with_name("tiny_synth.pt")


def shipped_checkpoint() -> Path:
    """The shipped model's path; a clear error when this install lacks it."""
    if not SHIPPED_MODEL.is_file():
        raise Sam3DError(
            f"no --checkpoint given and the shipped model {SHIPPED_MODEL} is missing; pass "
            "--checkpoint model.pt (or make it: python scripts/train_default_model.py)"
        )
    return SHIPPED_MODEL


def shipped_model_note(meta: dict[str, Any] | None = None) -> str:
    """One line naming the shipped model and what it was trained on."""
    training = dict((meta or {}).get("training") or {})
    family = training.get("family", "synthetic")
    minutes = training.get("wall_minutes")
    budget = f", {minutes:g} min on a CPU" if isinstance(minutes, int | float) else ""
    return (
        f"no --checkpoint: using the shipped model {SHIPPED_MODEL.name} (tiny Sam3D trained "
        f"on synthetic volumes only: {family} phantoms{budget}); pass --checkpoint for yours"
    )
