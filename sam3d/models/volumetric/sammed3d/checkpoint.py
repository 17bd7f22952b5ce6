"""SAM-Med3D's published checkpoints into :class:`SamMed3D`, with a report of what fitted.

The official training script saves ``{"model_state_dict": ..., "optimizer_state_dict":
..., "args": argparse.Namespace, ...}`` (``train.py``); medim's model gives a plain state
dict with the same keys. Our modules keep the official names, so loading is a copy: DDP's
``module.`` prefix is dropped, and the buffers that the official model does not persist
(``pixel_mean`` / ``pixel_std``) are ignored. Reading stays ``weights_only``; only
``argparse.Namespace`` (the saved ``args``) is allowed besides tensors and plain data.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from sam3d.errors import Sam3DError
from sam3d.models.checkpoint import read_checkpoint

# entries of the official model that are not weights (non-persistent there; harmless here)
IGNORED_KEYS = ("pixel_mean", "pixel_std")


@dataclass
class OfficialLoadReport:
    """What loading a SAM-Med3D checkpoint did.

    ``missing``: our weights the file lacks (left at their initialisation);
    ``unexpected``: the file's tensors we have no place for; ``mismatched``: present in
    both with another shape (``"key: file shape vs ours"``); ``loaded``: copied.
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        parts = [f"{len(self.loaded)} tensors loaded"]
        for label, items in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("of another shape", self.mismatched),
        ):
            if items:
                shown = ", ".join(items[:3]) + (", ..." if len(items) > 3 else "")
                parts.append(f"{len(items)} {label} ({shown})")
        return "; ".join(parts)


def read_official(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of an official SAM-Med3D ``.pth`` (``model_state_dict``) or of a plain
    / ``state_dict``-wrapped one (medim's); refuses anything else in one line."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = read_checkpoint(path, "SAM-Med3D checkpoint")
    return unwrap_state_dict(obj, str(path))


def unwrap_state_dict(obj: Any, name: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """``model_state_dict`` / ``state_dict`` / ``model`` wrappers and ``module.`` removed."""
    if isinstance(obj, dict):
        for wrapper in ("model_state_dict", "state_dict", "model"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not any(
        isinstance(k, str) and k.removeprefix("module.").startswith("image_encoder.") for k in obj
    ):
        raise Sam3DError(
            f"{name} is not a SAM-Med3D checkpoint (no image_encoder.* weights in it or in its "
            "model_state_dict)"
        )
    return {
        (k[len("module.") :] if k.startswith("module.") else k): v
        for k, v in obj.items()
        if isinstance(v, torch.Tensor)
    }


def load_official(
    model: torch.nn.Module,
    checkpoint: str | os.PathLike | dict[str, Any],
    strict: bool = True,
) -> OfficialLoadReport:
    """Copy a SAM-Med3D checkpoint (a path, or an already read dict) into ``model``.

    With ``strict`` a checkpoint that leaves weights missing or has tensors of another
    shape is refused (one line naming them); unexpected tensors are reported, not loaded.
    """
    if isinstance(checkpoint, dict):
        state, source = unwrap_state_dict(checkpoint), "state dict"
    else:
        state, source = read_official(checkpoint), str(checkpoint)
    own = model.state_dict()
    report = OfficialLoadReport(source=source)
    fitting = {}
    for key, value in state.items():
        if key not in own:
            if key.split(".")[-1] not in IGNORED_KEYS:
                report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.mismatched.append(f"{key}: {tuple(value.shape)} vs {tuple(own[key].shape)}")
        else:
            fitting[key] = value
    report.missing = [k for k in own if k not in state]
    report.loaded = sorted(fitting)
    if strict and (report.missing or report.mismatched):
        raise Sam3DError(
            f"{source} does not fit SAM-Med3D preset "
            f"{getattr(model, 'config', {}).get('name', '?')!r}: {report.summary()}"
        )
    model.load_state_dict(fitting, strict=False)
    return report
