"""What a training resumes from: ``last.pt`` written atomically and read back.

Shared by :mod:`.checkpointing` (writes it) and :mod:`.tracking` (keeps the unsent
metrics in it), so neither imports the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sam3d.errors import Sam3DError
from sam3d.files import atomic_write
from sam3d.models.checkpoint import read_checkpoint


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace`` it into place."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def read_resume_state(path: str | Path, max_epochs: int | None = None) -> dict[str, Any] | None:
    """The state in ``last.pt`` if a training can resume from it, else None.

    A training that already reached its ``max_epochs`` (or ``max_epochs``, if given) is
    finished: a new run starts instead. A corrupt file is an error, not a silent restart.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = read_checkpoint(path, "resume checkpoint")
    except Sam3DError as e:
        raise Sam3DError(f"cannot read the resume checkpoint: {e}; delete it to start anew.") from e
    if not isinstance(state, dict):
        raise Sam3DError(f"{path} is not a resume checkpoint of sam3d; delete it to start anew.")
    limit = int(max_epochs if max_epochs is not None else state.get("max_epochs", 0))
    if int(state.get("epoch", 0)) >= limit:
        return None
    return state
