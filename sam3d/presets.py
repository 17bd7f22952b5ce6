"""Presets shipped in the checkout's ``configs/`` folder: model shapes and dataset recipes.

``configs/model/<name>.json`` holds Sam3D presets and ``configs/datasets/<name>.json``
dataset presets (HU window, mean/SD, tumour label, NSD tolerance). sam3d is used from a
source checkout (``pip install -e .``), where the bundles live too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sam3d.errors import Sam3DError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
BUNDLE_DIR = REPO_ROOT / "bundles"


def preset_names(kind: str) -> list[str]:
    """Names of the shipped presets of one kind (``"model"`` or ``"datasets"``)."""
    return sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.json"))


def read_preset(kind: str, preset: str | os.PathLike) -> dict[str, Any]:
    """A preset as a dict: a shipped name of ``configs/<kind>/`` or a path to a JSON file."""
    noun = kind.rstrip("s")  # "datasets" -> "dataset"
    path = Path(preset)
    if path.suffix != ".json":
        if not (CONFIG_DIR / kind).is_dir():
            raise Sam3DError(
                f"no {CONFIG_DIR / kind}: sam3d's presets live in its source checkout; "
                "install it with `pip install -e .` from a clone, or pass a preset JSON path"
            )
        path = CONFIG_DIR / kind / f"{preset}.json"
    if not path.is_file():
        raise Sam3DError(
            f"unknown {noun} preset {str(preset)!r}: use one of "
            f"{', '.join(preset_names(kind))} or a path to a preset JSON file"
        )
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise Sam3DError(f"cannot read preset {path}: {e}") from e
