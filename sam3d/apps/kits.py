"""The kits bundle's glue: where its datasets come from and how they split.

- :func:`ensure_dataset`: the dataset kind of ``dataset_dir``, phantoms of a training
  family (CT by default, ``synth``) generated there when it holds none;
- :func:`load_datalist`: labelled cases of one split of an MSD ``dataset.json`` or of
  KiTS21 case folders (splits by :mod:`sam3d.data.splits`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from sam3d.data.splits import SPLITS, complete_splits
from sam3d.engine.distributed import barrier, is_rank0
from sam3d.errors import Sam3DError

logger = logging.getLogger("sam3d.engine")

_KITS21_LABELS = ("aggregated_MAJ_seg.nii.gz", "segmentation.nii.gz")


def find_dataset(dataset_dir: str | Path) -> str | None:
    """``"msd"`` (a ``dataset.json``), ``"kits21"`` (``case_*/imaging.nii.gz``) or None."""
    root = Path(dataset_dir)
    if (root / "dataset.json").is_file():
        return "msd"
    if any(root.glob("case_*/imaging.nii.gz")):
        return "kits21"
    return None


def ensure_dataset(
    dataset_dir: str | Path,
    n_cases: int = 12,
    seed: int = 0,
    phantom_kwargs: dict[str, Any] | None = None,
    family: str | None = None,
) -> str:
    """Return the dataset kind of ``dataset_dir``; generate phantoms there if it holds none.

    Generation is deterministic (``seed``) and happens only when the folder is missing or
    empty; a non-empty folder without a recognisable dataset is an error. ``family`` (or
    ``phantom_kwargs["family"]``, so a bundle can set it with its other phantom options)
    names a training phantom family of :mod:`sam3d.data.phantoms` (``ct`` by default,
    ``synth`` for domain-randomised volumes); a held-out family is refused. The other
    ``phantom_kwargs`` go to its generator (e.g. ``shape_vox``, ``spacing_mm``,
    ``n_lesions``). In a distributed run rank 0 generates while the others wait.
    """
    root = Path(dataset_dir)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in (phantom_kwargs or {}).items()}
    family = str(kwargs.pop("family", None) or family or "ct")
    from sam3d.data.phantoms import get_family

    entry = get_family(family)
    if not entry.training or entry.dims != 3:
        raise Sam3DError(
            f"phantom family {family!r} is not a volumetric training family "
            "(held-out families are for evaluation only)"
        )
    kind = find_dataset(root)
    if kind is not None:
        logger.info(f"dataset: {kind} dataset in {root}")
        return kind
    if root.exists() and any(root.iterdir()):
        raise Sam3DError(
            f"{root} holds neither an MSD-style dataset.json nor KiTS21 case_*/imaging.nii.gz "
            "folders; point --dataset_dir at a dataset (or at an empty folder for phantoms)."
        )
    if is_rank0():
        from sam3d.data.phantoms import write_phantom_dataset

        what = "CT" if family == "ct" else family
        logger.warning(
            f"dataset: no dataset in {root}: generating {n_cases} synthetic {what} phantoms "
            f"there (seed {seed}, {kwargs or 'default size'}); pass --dataset_dir for real data."
        )
        write_phantom_dataset(family, root, n=int(n_cases), seed=int(seed), **kwargs)
    barrier()
    return "msd"


def _labelled(entries: Any, root: Path) -> list[dict[str, str]]:
    out = []
    for e in entries or []:
        if isinstance(e, dict) and "image" in e and "label" in e:
            # an instance map (the synth phantoms': one id per lesion) comes along
            keys = ("image", "label", "instance") if "instance" in e else ("image", "label")
            out.append({k: os.path.normpath(str(root / e[k])) for k in keys})
    return out


def dataset_instance_key(dataset_dir: str | Path) -> str | None:
    """:func:`instance_key` of an MSD ``dataset.json`` in ``dataset_dir`` (all its labelled
    entries); None when there is none (yet) or it is another layout."""
    path = Path(dataset_dir) / "dataset.json"
    if not path.is_file():
        return None
    spec = json.loads(path.read_text())
    entries = [
        e for k in SPLITS for e in (spec.get(k) or []) if isinstance(e, dict) and "label" in e
    ]
    return instance_key(entries)


def instance_key(datalist: list[dict[str, str]]) -> str | None:
    """``"instance"`` when every case of ``datalist`` has an instance map, else None: the
    target is then the clicked instance (touching lesions apart), else the clicked
    connected component."""
    return "instance" if datalist and all("instance" in e for e in datalist) else None


def load_datalist(
    dataset_dir: str | Path,
    split: str = "training",
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> list[dict[str, str]]:
    """Labelled cases ``[{"image": path, "label": path}, ...]`` of one split.

    MSD ``dataset.json``: its labelled ``validation`` / ``test`` lists when it has them
    (phantom datasets do); a missing list is carved from ``training`` by
    :func:`sam3d.data.splits.complete_splits` (seeded, logged; validation never from
    test). KiTS21 case folders are carved the same way.
    """
    if split not in ("training", "validation", "test"):
        raise Sam3DError(f"unknown split {split!r}: use training, validation or test.")
    root = Path(dataset_dir)
    kind = find_dataset(root)
    if kind == "msd":
        spec = json.loads((root / "dataset.json").read_text())
        given = {k: _labelled(spec.get(k), root) for k in SPLITS}
    elif kind == "kits21":
        cases = []
        for case in sorted(root.glob("case_*")):
            label = next((case / n for n in _KITS21_LABELS if (case / n).is_file()), None)
            if (case / "imaging.nii.gz").is_file() and label is not None:
                cases.append({"image": str(case / "imaging.nii.gz"), "label": str(label)})
        given = {"training": cases}
    else:
        raise Sam3DError(f"no dataset in {root}: expected a dataset.json or KiTS21 case folders.")
    splits = complete_splits(given, val_fraction, test_fraction, seed, source=str(root))
    data = splits[split]
    if not data:
        raise Sam3DError(f"the {split} split of {root} is empty; add labelled cases.")
    missing = [p for d in data for p in d.values() if not os.path.isfile(p)]
    if missing:
        raise Sam3DError(
            f"{len(missing)} file(s) of the {split} split are missing, e.g. {missing[0]}."
        )
    return data


def default_preset(cuda: bool | None = None) -> str:
    """The bundle's model preset when none is given, said once on the console.

    On CUDA ``vit_b`` (the reference; pass ``--sam_checkpoint sam_vit_b_01ec64.pth`` for
    SAM's weights); without CUDA ``tiny``, which trains in minutes on a CPU.
    """
    import torch

    cuda = torch.cuda.is_available() if cuda is None else bool(cuda)
    if cuda:
        message = (
            "preset vit_b (CUDA found; the reference model: pass --sam_checkpoint "
            "sam_vit_b_01ec64.pth to start from SAM's weights)"
        )
        name = "vit_b"
    else:
        message = (
            "no CUDA: preset tiny (a small random-initialised Sam3D that trains in minutes "
            "on a CPU); for vit_b from SAM weights on a GPU: --preset vit_b "
            "--sam_checkpoint sam_vit_b_01ec64.pth"
        )
        name = "tiny"
    if is_rank0():
        print(f"[kits] {message}", flush=True)
        logger.info(message)
    return name
