"""Evaluate and inference build the network a checkpoint says it was trained as.

A bundle's ``evaluate.json`` / ``inference.json`` reads ``model.pt`` once with
:func:`trained_checkpoint` (one-line refusals of a missing, damaged or foreign file),
takes the model settings from it (``"model_config": "$@trained['preset']"``) instead of
``train.json``'s defaults, and logs which settings those are; so ``--model_preset tiny``
at training needs no repeat at evaluation.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from sam3d.errors import Sam3DError

logger = logging.getLogger("sam3d.engine")


def describe_preset(preset: Any) -> str:
    """A short description of a model preset (a name, or a settings dict)."""
    if isinstance(preset, str):
        return f"preset {preset!r}"
    if not isinstance(preset, dict):
        return repr(preset)[:80]
    if preset.get("name"):
        return f"preset {preset['name']!r}"
    sam = preset.get("sam") or preset.get("sam_preset")
    side = preset.get("image_size") or preset.get("img_size") or preset.get("crop_size")
    parts = [f"SAM {sam!r}" if sam else None, f"input {side}" if side else None]
    return ", ".join(p for p in parts if p) or "its saved settings"


def trained_checkpoint(
    path: str | os.PathLike, kind: str | None = None, step: str = "evaluate"
) -> dict[str, Any]:
    """Read a trained ``model.pt`` (:func:`sam3d.models.checkpoint.read_trained`) for a
    bundle's evaluation or inference; refuses a checkpoint of another model ``kind``.

    Returns the checkpoint dict (``model``, ``preset``, ``state_dict``, ``meta``) and logs
    the settings the network will be built with. Raises :class:`Sam3DError` (one line).
    """
    from sam3d.models.checkpoint import read_trained

    if path is None or not str(path):
        raise Sam3DError(f"{step}: no checkpoint given (--ckpt_path PATH to a trained model.pt)")
    if not os.path.exists(path):
        raise Sam3DError(
            f"{step}: no trained model at {path}: train first, or pass --ckpt_path PATH"
        )
    obj = read_trained(path)
    if kind is not None and obj["model"] != kind:
        raise Sam3DError(f"{path} holds a {obj['model']} model; this bundle needs {kind}")
    if not isinstance(obj["preset"], dict):
        raise Sam3DError(f"{path}: its preset must be a dict of settings for {obj['model']}")
    logger.info(
        f"{step}: building the network {path} was trained as: {obj['model']} "
        f"({describe_preset(obj['preset'])})"
    )
    return obj


def init_from(network: Any, path: str | os.PathLike | None, kind: str | None = None) -> Any:
    """Fine-tuning: start a training from a trained ``model.pt``'s weights (``--init_checkpoint``).

    Unlike resume (``last.pt``: weights, optimizer, schedule, epoch and MLflow run carry
    on), only the weights are taken: the optimizer, the schedule, the epochs and the MLflow
    run start anew, on whatever data the training is given. The network must be built with
    the checkpoint's settings (the same preset); a misfit is refused in one line. A
    resumable ``last.pt`` of the same bundle root still wins (resume restores it later).
    ``path`` None or "" leaves ``network`` as built. Returns ``network``.
    """
    if path is None or not str(path) or str(path).lower() in ("none", "null", "false"):
        return network
    from sam3d.models.checkpoint import load_trained_weights

    obj = trained_checkpoint(path, kind, "fine-tune")
    load_trained_weights(network, obj)
    logger.info(
        f"fine-tune: weights from {path}; optimizer, schedule, epochs and the MLflow run start anew"
    )
    return network
