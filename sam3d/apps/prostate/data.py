"""The prostate bundle's cases: phantoms when there is no dataset, ``dataset.json``'s cases
with their sites, and the leave-sites-out splits."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sam3d.data.splits import carve, check_disjoint
from sam3d.errors import Sam3DError

logger = logging.getLogger(__name__)


def ensure_dataset(
    dataset_dir: str | Path,
    n_per_site: int = 4,
    sites: Sequence[str] = ("A", "B", "C", "D", "E", "F"),
    seed: int = 0,
    in_plane_vox: int | None = 96,
    n_slices: int = 12,
) -> Path:
    """``dataset_dir/dataset.json``; a missing one is first generated as prostate phantoms."""
    path = Path(dataset_dir) / "dataset.json"
    if not path.is_file():
        from sam3d.data.phantoms import write_prostate_dataset

        logger.warning(
            f"no dataset in {dataset_dir}: generating {n_per_site} prostate phantoms per site "
            f"({''.join(sites)}) there (seed {seed})"
        )
        write_prostate_dataset(
            dataset_dir, n_per_site, tuple(sites), seed,
            in_plane_vox=in_plane_vox, n_slices=n_slices,
        )  # fmt: skip
    return path


def load_cases(dataset_dir: str | Path) -> list[dict[str, str]]:
    """Every case of ``dataset.json`` (all its lists) as absolute ``image``, ``label``, ``site``."""
    path = Path(dataset_dir) / "dataset.json"
    if not path.is_file():
        raise Sam3DError(f"no dataset.json in {dataset_dir}")
    meta = json.loads(path.read_text())
    cases = []
    for split in ("training", "validation", "test"):
        for c in meta.get(split) or []:
            if "site" not in c or "label" not in c:
                raise Sam3DError(f"{path}: every case needs 'image', 'label' and 'site'")
            cases.append(
                {
                    "image": str((path.parent / c["image"]).resolve()),
                    "label": str((path.parent / c["label"]).resolve()),
                    "site": str(c["site"]),
                }
            )
    return cases


def prostate_datalist(
    dataset_dir: str | Path,
    split: str,
    train_sites: Sequence[str] = ("A",),
    test_sites: Sequence[str] | None = None,
    val_fraction: float = 0.25,
    seed: int = 0,
    phantom: dict[str, Any] | None = None,
) -> list[dict[str, str]]:
    """Leave-sites-out cases of ``split``: ``training`` / ``validation`` are carved from the
    training sites' cases (seeded, :func:`sam3d.data.splits.carve`); ``test`` holds every
    case of ``test_sites`` (default: all sites not trained on). Never overlapping.

    ``phantom``: kwargs of :func:`ensure_dataset` (used only when there is no dataset).
    """
    ensure_dataset(dataset_dir, **(phantom or {}))
    cases = load_cases(dataset_dir)
    sites = sorted({c["site"] for c in cases})
    train_sites = list(train_sites)
    unknown = [s for s in train_sites if s not in sites]
    if unknown:
        raise Sam3DError(f"training sites {unknown} are not in {dataset_dir} (sites {sites})")
    test_sites = (
        [s for s in sites if s not in train_sites] if test_sites is None else list(test_sites)
    )
    both = sorted(set(test_sites) & set(train_sites))
    if both:
        raise Sam3DError(f"a site cannot be both trained and tested on: {both}")
    carved = carve([c for c in cases if c["site"] in train_sites], val_fraction, 0.0, seed)
    splits = {
        "training": carved["training"],
        "validation": carved["validation"],
        "test": [c for c in cases if c["site"] in test_sites],
    }
    check_disjoint(splits, str(dataset_dir))
    if split not in splits:
        raise Sam3DError(f"split must be training, validation or test, got {split!r}")
    if not splits[split]:
        raise Sam3DError(
            f"the {split} split of {dataset_dir} is empty (sites {train_sites} / {test_sites})"
        )
    return splits[split]
