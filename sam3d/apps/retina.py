"""The retina (TopoLoRA-SAM) bundle's glue: its datalists, phantoms when the folder is empty.

Layouts and pairing rules: :mod:`sam3d.data.planar`; splits: :mod:`sam3d.data.splits`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from sam3d.data.planar import find_image_mask_dataset
from sam3d.data.splits import SPLITS
from sam3d.errors import Sam3DError

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
    if split not in SPLITS:
        raise Sam3DError(f"split must be one of {SPLITS}, got {split!r}")
    found = find_image_mask_dataset(dataset_dir, seed)
    if found is None:
        from sam3d.data.phantoms import write_phantom_dataset

        logger.warning(
            "no dataset in %s: generating %d vessel phantoms of %s px there (seed %d)",
            dataset_dir, n_phantoms, tuple(phantom_size), seed,
        )  # fmt: skip
        write_phantom_dataset(
            "vessels", Path(dataset_dir), int(n_phantoms), seed=seed, size=tuple(phantom_size)
        )
        found = find_image_mask_dataset(dataset_dir, seed)
        assert found is not None
    if not found[split]:
        raise Sam3DError(
            f"the {split} split of {dataset_dir} is empty: it has too few training cases "
            f"({len(found['training'])}) to carve one; add cases or list that split"
        )
    return found[split]
