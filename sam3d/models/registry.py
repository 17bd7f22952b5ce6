"""Registry of model kinds: everything a caller needs to know about a model, in one place.

A trained checkpoint's ``model`` key names a :class:`ModelKind`; the kind says how to
build it (builder, presets folder), what it takes (prompt kind, input channels, range and
side) and where it trains (its bundle). Export (``sam3d.models.export``), ``sam3d
segment-2d`` (``sam3d.inference.planar``) and ``sam3d bundle export``
(``sam3d.apps.export``) read these fields instead of keeping tables of their own.

The model protocol every registered builder follows:

- ``builder(**config)`` returns a randomly initialised model (plus ``sam_checkpoint=``
  for SAM's weights); ``config`` is a dict of the kind's presets folder
  (``configs/<presets>/<name>.json``, read by :func:`model_preset`);
- the model's constructor takes ``config`` and keeps it as ``model.config`` (what
  :func:`build_model` rebuilds it from; ``None`` for a model built around a ``Sam``
  passed in);
- ``model.trainable_parameters()`` returns named optimizer parameter groups
  (:func:`sam3d.models.protocol.parameter_groups`).

Entries are import paths, so ``import sam3d.models`` loads neither wing until a kind is
built.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from typing import Any

import torch

from sam3d.errors import Sam3DError
from sam3d.presets import read_preset

PROMPT_KINDS = ("none", "points2d", "points3d", "grid")


@dataclass(frozen=True)
class ModelKind:
    """One registered model.

    Attributes:
        name: the kind (a checkpoint's ``model`` key).
        wing: ``"volumetric"`` (3D crops) or ``"planar"`` (2D images).
        builder: ``"module:function"``, called as ``builder(**config)``.
        cls: class name of the built model.
        presets: its ``configs/<presets>/`` folder of named configs (``tiny`` at least).
        prompt: what steers it: ``"none"`` (prompt-free), ``"points2d"`` / ``"points3d"``
            (clicks; 2D ``(row, col)`` pixels, 3D ``(i, j, k)`` voxels), ``"grid"``
            (automatic: a point grid of its own, or given points / boxes).
        prompt_required: its forward needs clicks; the image-only view given to export and
            to the model zoo's checks adds one at the centre
            (:class:`sam3d.engine.CentreClickNetwork`).
        input_channels: channels of the image input.
        input_range: the intensity range its forward expects, or ``None`` for z-scored
            intensities (no fixed range).
        input_side: the model attribute holding its square (cubic) input side.
        bundle: the bundle in ``bundles/`` it trains in (None: none).
    """

    name: str
    wing: str
    builder: str
    cls: str
    presets: str
    prompt: str
    input_channels: int
    input_range: tuple[float, float] | None
    input_side: str
    bundle: str | None = None
    prompt_required: bool = False

    def __post_init__(self) -> None:
        if self.wing not in ("volumetric", "planar"):
            raise ValueError(f"wing must be 'volumetric' or 'planar', got {self.wing!r}")
        if self.prompt not in PROMPT_KINDS:
            raise ValueError(f"prompt must be one of {PROMPT_KINDS}, got {self.prompt!r}")

    @property
    def spatial_dims(self) -> int:
        return 3 if self.wing == "volumetric" else 2

    @property
    def takes_clicks(self) -> bool:
        """Its forward takes point prompts (``points``, ``point_labels``)."""
        return self.prompt in ("points2d", "points3d")

    def example_input(
        self, model: torch.nn.Module, size: int | None = None, seed: int = 0
    ) -> torch.Tensor:
        """A seeded random image its forward takes: ``1 x C x s x s (x s)``, ``s`` = ``size``
        or the model's input side, values uniform in ``input_range`` (normal when z-scored)."""
        s = int(size or getattr(model, self.input_side))
        shape = (1, self.input_channels) + (s,) * self.spatial_dims
        g = torch.Generator().manual_seed(seed)
        if self.input_range is None:
            return torch.randn(shape, generator=g)
        lo, hi = self.input_range
        return lo + (hi - lo) * torch.rand(shape, generator=g)


_KINDS: dict[str, ModelKind] = {}


def register_model(kind: ModelKind) -> None:
    """Add a kind (a new model is one file plus one call here)."""
    if kind.name in _KINDS and _KINDS[kind.name] != kind:
        raise ValueError(f"model kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind


register_model(
    ModelKind(
        "sam3d", "volumetric", "sam3d.models.volumetric.sam3d:build_sam3d", "Sam3D",
        presets="model", prompt="points3d", prompt_required=True,
        input_channels=1, input_range=None, input_side="crop_size", bundle="kits",
    )
)  # fmt: skip
register_model(
    ModelKind(
        "click_unet", "volumetric", "sam3d.models.volumetric.click_unet:build_click_unet",
        "ClickUNet", presets="click_unet", prompt="points3d", prompt_required=True,
        input_channels=1, input_range=None, input_side="crop_size", bundle="kits",
    )
)  # fmt: skip
register_model(
    ModelKind(
        "sammed3d", "volumetric", "sam3d.models.volumetric.sammed3d.build:build_sammed3d",
        "SamMed3D", presets="sammed3d", prompt="points3d", prompt_required=True,
        input_channels=1, input_range=None, input_side="crop_size", bundle=None,
    )
)  # fmt: skip
register_model(
    ModelKind(
        "topolora", "planar", "sam3d.models.planar.topolora:build_topolora_sam", "TopoLoRASam",
        presets="topolora", prompt="none",
        input_channels=3, input_range=(0.0, 255.0), input_side="img_size", bundle="retina",
    )
)  # fmt: skip
register_model(
    ModelKind(
        "samus", "planar", "sam3d.models.planar.samus:build_samus", "Samus",
        presets="samus", prompt="points2d",
        input_channels=1, input_range=(0.0, 1.0), input_side="img_size", bundle="echo",
    )
)  # fmt: skip
register_model(
    ModelKind(
        "desam", "planar", "sam3d.models.planar.desam:build_desam", "DeSAM",
        presets="desam", prompt="grid",
        input_channels=3, input_range=(0.0, 255.0), input_side="img_size", bundle="prostate",
    )
)  # fmt: skip


def model_kinds() -> list[str]:
    """Names of the registered kinds."""
    return sorted(_KINDS)


def get_kind(name: str) -> ModelKind:
    if name not in _KINDS:
        raise Sam3DError(f"unknown model kind {name!r}: use one of {', '.join(model_kinds())}")
    return _KINDS[name]


def kinds_where(**fields: Any) -> list[str]:
    """Names of the kinds whose fields have these values (``kinds_where(prompt="points2d")``)."""
    kinds = [get_kind(name) for name in model_kinds()]
    return [k.name for k in kinds if all(getattr(k, f) == v for f, v in fields.items())]


def model_preset(kind: str, preset: str | os.PathLike) -> dict[str, Any]:
    """The one reader of model presets: a name of the kind's ``configs/<presets>/`` folder or
    a JSON path -> the config dict its builder takes."""
    return dict(read_preset(get_kind(kind).presets, preset))


def build_model(kind: str, config: dict[str, Any] | str, **kwargs: Any) -> torch.nn.Module:
    """A model of ``kind`` (random weights) from a config dict or a preset name of its
    ``configs/<presets>/`` folder: ``builder(**config, **kwargs)``; the model keeps
    ``config`` as ``model.config``."""
    entry = get_kind(kind)
    if isinstance(config, str | os.PathLike):
        config = model_preset(kind, config)
    if not isinstance(config, dict):
        raise Sam3DError(f"a {kind} config must be a dict, got {type(config).__name__}")
    module, fn = entry.builder.split(":")
    builder = getattr(importlib.import_module(module), fn)
    return builder(**config, **kwargs)


def kind_of(model: torch.nn.Module) -> str:
    """The registered kind of a built model (by its class)."""
    name = type(model).__name__
    for kind in _KINDS.values():
        if kind.cls == name:
            return kind.name
    raise Sam3DError(f"{name} is not a registered model kind ({', '.join(model_kinds())})")
