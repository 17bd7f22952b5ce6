"""The one checkpoint reader and the one trained-checkpoint format of every model.

Reading is ``torch.load(..., weights_only=True)`` only: a checkpoint is data, never
code (a pickled payload is refused, not executed). A trained checkpoint is

``{"model": kind, "preset": config, "state_dict": ..., "meta": {...}, **extra}``

where ``kind`` names an entry of :mod:`sam3d.models.registry` and ``config`` is what its
builder takes; :func:`load_trained` rebuilds any kind from it.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from sam3d.errors import Sam3DError
from sam3d.files import atomic_write


def read_checkpoint(
    path: str | os.PathLike,
    what: str = "checkpoint",
    map_location: str | torch.device = "cpu",
) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line :class:`Sam3DError` refusals.

    ``what`` names the file in messages (``"SAM checkpoint"``, ``"resume checkpoint"``).
    """
    p = Path(path)
    if not p.is_file():
        raise Sam3DError(f"{what} not found: {p}")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise here
            warnings.simplefilter("ignore")
            return torch.load(p, map_location=map_location, weights_only=True)
    except OSError as e:
        raise Sam3DError(f"cannot read {what} {p}: {e.strerror or e}") from None
    except pickle.UnpicklingError:
        raise Sam3DError(
            f"{p} is not a readable {what}: it holds pickled code or objects other than "
            "tensors and plain data (refused, not run)"
        ) from None
    except Exception as e:  # truncated or foreign: torch raises many types
        lines = str(e).strip().splitlines()
        detail = f": {lines[0][:200]}" if lines else ""
        raise Sam3DError(f"{p} is not a readable {what} ({type(e).__name__}{detail})") from None


def save_trained(
    path: str | os.PathLike,
    model: torch.nn.Module,
    config: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    kind: str | None = None,
    **extra: Any,
) -> Path:
    """Write a trained checkpoint atomically; returns the path.

    ``kind`` and ``config`` default to the model's registry kind and its ``config``
    attribute (set by every registered builder). ``extra`` holds further plain-data
    top-level entries (e.g. ``dataset=<preset dict>``).
    """
    from sam3d.models.registry import kind_of

    net = model.module if hasattr(model, "module") else model  # DDP / DataParallel
    kind = kind or kind_of(net)
    config = dict(config if config is not None else getattr(net, "config", None) or {})
    if not config:
        raise Sam3DError(f"no config to rebuild this {type(net).__name__} from; pass config=")
    obj = {
        "model": kind,
        "preset": config,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "meta": dict(meta or {}),
    }
    obj.update(extra)
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def read_trained(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    what: str = "trained sam3d checkpoint",
) -> dict[str, Any]:
    """A trained checkpoint as a dict with ``model``, ``preset``, ``state_dict``, ``meta``.

    Files written before the ``model`` key existed get their kind from
    :func:`legacy_model_kind`.
    """
    obj = read_checkpoint(path, what, map_location)
    if not isinstance(obj, dict) or "state_dict" not in obj or "preset" not in obj:
        raise Sam3DError(
            f"{path} is not a {what} (expected the keys 'preset' and "
            "'state_dict'; a SAM checkpoint goes to the model builder's sam_checkpoint=)"
        )
    if not isinstance(obj["preset"], dict | str) or not isinstance(obj["state_dict"], dict):
        raise Sam3DError(
            f"{path}: 'preset' must be a dict or a name and 'state_dict' a dict of tensors"
        )
    if "model" not in obj:
        obj["model"] = legacy_model_kind(obj["preset"], path)
    return obj


def legacy_model_kind(preset: dict[str, Any] | str, path: Any = "checkpoint") -> str:
    """The kind of a trained checkpoint written before the ``model`` key existed.

    That first format held one of two kinds, and every kind registered since writes its
    ``model`` key. A Sam3D preset is a name of ``configs/model/`` or has a ``crop_size``;
    a TopoLoRA-SAM config has a ``sam`` and no ``crop_size``. Anything else is refused.
    """
    if isinstance(preset, str) or "crop_size" in preset:
        return "sam3d"
    if "sam" in preset:
        return "topolora"
    raise Sam3DError(
        f"{path} names no model kind ('model') and its preset is neither a Sam3D nor a "
        "TopoLoRA-SAM one (the two kinds of the format without 'model')"
    )


def load_trained(
    path: str | os.PathLike,
    map_location: str | torch.device = "cpu",
    kind: str | None = None,
    what: str = "trained sam3d checkpoint",
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild any registered model from a trained checkpoint.

    Returns the model (eval mode, on ``map_location``) and its metadata: the ``meta``
    dict merged with every other top-level entry (e.g. ``dataset``, ``model``). With
    ``kind``, a checkpoint of another kind is refused.
    """
    from sam3d.models.registry import build_model

    obj = read_trained(path, map_location, what)
    if kind is not None and obj["model"] != kind:
        raise Sam3DError(f"{path} holds a {obj['model']} model, not {kind}")
    if not isinstance(obj["model"], str):
        raise Sam3DError(f"{path}: 'model' must name a model kind, got {obj['model']!r}"[:300])
    try:
        model = build_model(obj["model"], obj["preset"])
    except Sam3DError as e:
        raise Sam3DError(f"{path}: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError, AssertionError) as e:
        raise Sam3DError(
            f"{path}: its preset does not describe a {obj['model']} model "
            f"({type(e).__name__}: {_first_line(e)})"
        ) from None
    name = obj["preset"] if isinstance(obj["preset"], str) else obj["preset"].get("name")
    misfit = state_dict_misfit(model.state_dict(), obj["state_dict"])
    if misfit:
        raise Sam3DError(
            f"{path}: its weights do not fit preset {name!r} of its {obj['model']} model "
            f"({misfit}); the file is damaged or was not written by sam3d"
        )
    try:
        model.load_state_dict(obj["state_dict"], strict=True)
    except (RuntimeError, TypeError, ValueError) as e:
        raise Sam3DError(
            f"{path}: weights do not fit preset {name!r} of its {obj['model']} model "
            f"({_first_line(e)})"
        ) from None
    if not isinstance(obj.get("meta") or {}, dict):
        raise Sam3DError(f"{path}: 'meta' must be a dict, got {type(obj['meta']).__name__}")
    meta = {k: v for k, v in obj.items() if k not in ("preset", "state_dict", "meta")}
    meta.update(obj.get("meta") or {})
    return model.to(map_location).eval(), meta


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:200]


def state_dict_misfit(expected: dict[str, Any], given: dict[str, Any]) -> str:
    """One phrase saying how ``given`` differs from a model's ``expected`` state dict
    (missing, unexpected, non-tensor, mis-shaped entries; the first of each), or ""."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    not_tensor = [k for k in given if k in expected and not isinstance(given[k], torch.Tensor)]
    shapes = [
        f"{k} {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
        for k in given
        if k in expected
        and isinstance(given[k], torch.Tensor)
        and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    for label, items in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("not tensors", not_tensor),
        ("of another shape", shapes),
    ):
        if items:
            parts.append(f"{len(items)} {label}, e.g. {str(items[0])[:80]}")
    return "; ".join(parts)


def load_trained_weights(
    network: torch.nn.Module, checkpoint: str | os.PathLike | dict[str, Any]
) -> torch.nn.Module:
    """Load a trained checkpoint's weights (a path or its :func:`read_trained` dict) into a
    network a bundle config built itself; returns ``network``."""
    obj = checkpoint if isinstance(checkpoint, dict) else read_trained(checkpoint)
    expected = network.state_dict()
    # parts a network may lack in older checkpoints (Sam3D's mask prompt: a no-op then)
    optional = tuple(getattr(network, "optional_state_prefixes", ()))
    if optional and not any(k.startswith(optional) for k in obj["state_dict"]):
        expected = {k: v for k, v in expected.items() if not k.startswith(optional)}
    misfit = state_dict_misfit(expected, obj["state_dict"])
    if misfit:
        raise Sam3DError(
            f"the checkpoint does not fit this network ({misfit}); "
            "build the network with the settings it was trained with"
        )
    network.load_state_dict(obj["state_dict"])
    return network
