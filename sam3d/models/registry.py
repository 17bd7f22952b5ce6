"""Registry of model kinds: what a trained checkpoint's ``model`` key names.

Each kind is a builder that takes the checkpoint's ``preset`` (a config dict) and
returns a randomly initialised model of that shape. Entries are import paths, so
``import sam3d.models`` loads neither wing until a kind is built.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

import torch

from sam3d.errors import Sam3DError
from sam3d.presets import read_preset


@dataclass(frozen=True)
class ModelKind:
    """One registered model: ``wing`` (volumetric / planar), builder and class by import path.

    ``presets``: the ``configs/<presets>/`` folder of its named configs (``tiny`` at least).
    ``kwargs``: the builder takes the config as keyword arguments (else as one dict).
    """

    name: str
    wing: str
    builder: str  # "module:function"
    cls: str  # class name of the built model
    presets: str
    kwargs: bool = True


_KINDS: dict[str, ModelKind] = {}


def register_model(kind: ModelKind) -> None:
    """Add a kind (a new model is one file plus one call here)."""
    if kind.name in _KINDS and _KINDS[kind.name] != kind:
        raise ValueError(f"model kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind


register_model(
    ModelKind(
        "sam3d",
        "volumetric",
        "sam3d.models.volumetric.sam3d:build_sam3d",
        "Sam3D",
        presets="model",
        kwargs=False,
    )
)
register_model(
    ModelKind(
        "sammed3d",
        "volumetric",
        "sam3d.models.volumetric.sammed3d.build:build_sammed3d",
        "SamMed3D",
        presets="sammed3d",
        kwargs=False,
    )
)
register_model(
    ModelKind(
        "topolora",
        "planar",
        "sam3d.models.planar.topolora:build_topolora_sam",
        "TopoLoRASam",
        presets="topolora",
    )
)
register_model(
    ModelKind("samus", "planar", "sam3d.models.planar.samus:build_samus", "Samus", presets="samus")
)
register_model(
    ModelKind("desam", "planar", "sam3d.models.planar.desam:build_desam", "DeSAM", presets="desam")
)


def model_kinds() -> list[str]:
    """Names of the registered kinds."""
    return sorted(_KINDS)


def get_kind(name: str) -> ModelKind:
    if name not in _KINDS:
        raise Sam3DError(f"unknown model kind {name!r}: use one of {', '.join(model_kinds())}")
    return _KINDS[name]


def build_model(kind: str, config: dict[str, Any] | str) -> torch.nn.Module:
    """A model of ``kind`` (random weights) from a config dict or a preset name of its
    ``configs/<presets>/`` folder; the builder sets ``model.config``."""
    entry = get_kind(kind)
    module, fn = entry.builder.split(":")
    builder = getattr(importlib.import_module(module), fn)
    if not entry.kwargs:
        return builder(config)
    if isinstance(config, str):
        config = read_preset(entry.presets, config)
    if not isinstance(config, dict):
        raise Sam3DError(f"a {kind} config must be a dict, got {type(config).__name__}")
    return builder(**config)


def kind_of(model: torch.nn.Module) -> str:
    """The registered kind of a built model (by its class)."""
    name = type(model).__name__
    for kind in _KINDS.values():
        if kind.cls == name:
            return kind.name
    raise Sam3DError(f"{name} is not a registered model kind ({', '.join(model_kinds())})")
