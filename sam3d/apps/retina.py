"""The retina (TopoLoRA-SAM) bundle's glue: its datalists, phantoms when the folder is empty.

Layouts and pairing rules: :mod:`sam3d.data.planar`; splits: :mod:`sam3d.data.splits`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from sam3d.data.planar import planar_split

logger = logging.getLogger(__name__)


def retina_datalist(
    dataset_dir: str | Path,
    split: str = "training",
    n_phantoms: int = 20,
    phantom_size: Sequence[int] = (256, 256),
    seed: int = 0,
) -> list[dict[str, str]]:
    """The cases of one split (``training``, ``validation`` or ``test``) of ``dataset_dir``.

    A missing or empty ``dataset_dir`` is first filled with ``n_phantoms`` 2D vessel
    phantoms of ``phantom_size`` (H, W) pixels.
    """
    return planar_split(dataset_dir, split, "vessels", n_phantoms, phantom_size, seed)
