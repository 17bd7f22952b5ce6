"""Synthetic data, seeded: abdominal CT volumes with kidney lesions (:mod:`.ct`),
fundus-like vessel images (:mod:`.vessels`), echocardiography-like images (:mod:`.echo`)
and multi-site prostate MRI (:mod:`.prostate`), written as MSD-style datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sam3d.data.io import atomic_write
from sam3d.data.phantoms.common import (
    _iter_cases,
    _rotation,
    case_seed,
    make_affine,
    save_nifti,
    save_png,
    smooth_field,
)
from sam3d.data.phantoms.ct import (
    LESION_CONTRAST_HU,
    LESION_DIAMETER_MM,
    ORIENTATIONS,
    TISSUE_HU,
    TISSUES,
    CTPhantom,
    Lesion,
    T,
    make_ct_phantom,
)
from sam3d.data.phantoms.echo import (
    ECHO_CLASS_NAMES,
    ECHO_LABELS,
    EchoPhantom,
    make_echo_phantom,
)
from sam3d.data.phantoms.prostate import (
    SITES,
    ProstatePhantom,
    make_prostate_phantom,
    save_site_preview,
    write_prostate_dataset,
)
from sam3d.data.phantoms.vessels import VesselPhantom, make_vessel_phantom
from sam3d.data.splits import carve
from sam3d.errors import Sam3DError

__all__ = [
    "ECHO_CLASS_NAMES",
    "ECHO_LABELS",
    "EchoPhantom",
    "make_echo_phantom",
    "LESION_CONTRAST_HU",
    "LESION_DIAMETER_MM",
    "ORIENTATIONS",
    "SITES",
    "T",
    "TISSUES",
    "TISSUE_HU",
    "CTPhantom",
    "Lesion",
    "ProstatePhantom",
    "VesselPhantom",
    "_rotation",
    "case_seed",
    "make_affine",
    "make_ct_phantom",
    "make_prostate_phantom",
    "make_vessel_phantom",
    "save_nifti",
    "save_png",
    "save_site_preview",
    "smooth_field",
    "split_cases",
    "write_phantom_dataset",
    "write_prostate_dataset",
]


def split_cases(n: int) -> tuple[list[int], list[int], list[int]]:
    """Deterministic 60/20/20 split of case indices in order (:func:`sam3d.data.splits.carve`),
    at least one case each when n >= 3."""
    parts = carve(list(range(int(n))), 0.2, 0.2, seed=None)
    return parts["training"], parts["validation"], parts["test"]


def write_phantom_dataset(
    kind: str,
    out: Path | str,
    n: int,
    seed: int = 0,
    progress: bool = False,
    balance_contrast: bool = False,
    **kwargs: Any,
) -> Path:
    """Write ``n`` phantoms as an MSD-style dataset and return its ``dataset.json`` path.

    ct: ``imagesTr/phantom_XXX.nii.gz`` (int16 HU) and ``labelsTr/phantom_XXX.nii.gz``
    (uint8: 0 background, 1 kidney, 2 tumour). vessels: ``imagesTr/vessel_XXX.png``
    (RGB), ``labelsTr/vessel_XXX.png`` (uint8 0/1) and ``fovTr/vessel_XXX.png`` (0/1).
    echo: ``imagesTr/echo_XXX.png`` (grey), ``labelsTr/echo_XXX.png`` (uint8: 0
    background, 1 left ventricle, 2 myocardium, 3 left atrium), each entry with its
    ``spacing_mm`` (row, col), and ``preview.png`` (the first case, outlined).
    ``dataset.json`` lists ``training``/``validation``/``test`` (60/20/20) with paths
    relative to it. ``kwargs`` go to :func:`make_ct_phantom` / :func:`make_vessel_phantom`
    / :func:`make_echo_phantom`. With ``balance_contrast`` (ct) each split gets its
    60/20/20 share of the cases with a bright (first) lesion and of the others, so that
    no split is all dark lesions.
    """
    if kind not in ("ct", "vessels", "echo"):
        raise Sam3DError(f"unknown phantom kind {kind!r}: use 'ct', 'vessels' or 'echo'")
    if int(n) < 1:
        raise Sam3DError(f"the number of cases must be at least 1, got {n}")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Sam3DError(f"cannot create the output folder {out}: {e.strerror}") from e
    entries: list[dict[str, Any]] = []
    cases: list[dict[str, Any]] = []
    for i in _iter_cases(int(n), progress, f"phantoms ({kind})"):
        s = case_seed(seed, i)
        if kind == "ct":
            ph = make_ct_phantom(s, **kwargs)
            name = f"phantom_{i:03d}.nii.gz"
            save_nifti(ph.image_hu, ph.affine, out / "imagesTr" / name, np.int16)
            save_nifti(ph.label, ph.affine, out / "labelsTr" / name, np.uint8)
            entries.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
            cases.append(
                {
                    "case": name,
                    "seed": s,
                    "shape_vox": list(ph.image_hu.shape),
                    "spacing_mm": [round(v, 4) for v in ph.spacing_mm],
                    "orientation": ph.orientation,
                    "lesion_diameters_mm": [round(les.diameter_mm, 2) for les in ph.lesions],
                    "lesion_contrasts_hu": [round(les.contrast_hu, 1) for les in ph.lesions],
                }
            )
        elif kind == "echo":
            ep = make_echo_phantom(s, **kwargs)
            name = f"echo_{i:03d}.png"
            save_png(np.rint(ep.image * 255).astype(np.uint8), out / "imagesTr" / name)
            save_png(ep.label, out / "labelsTr" / name)
            spacing = [round(v, 6) for v in ep.spacing_mm]
            entries.append(
                {
                    "image": f"./imagesTr/{name}",
                    "label": f"./labelsTr/{name}",
                    "spacing_mm": spacing,
                }
            )
            cases.append({"case": name, "seed": s, "spacing_mm": spacing})
            if i == 0:
                from sam3d.visualize import save_planar_overlay

                save_planar_overlay(
                    ep.image, ep.label, out / "preview.png", class_names=ECHO_LABELS
                )
        else:
            vp = make_vessel_phantom(s, **kwargs)
            name = f"vessel_{i:03d}.png"
            save_png(np.rint(vp.image * 255).astype(np.uint8), out / "imagesTr" / name)
            save_png(vp.label, out / "labelsTr" / name)
            save_png(vp.fov.astype(np.uint8), out / "fovTr" / name)
            entries.append(
                {
                    "image": f"./imagesTr/{name}",
                    "label": f"./labelsTr/{name}",
                    "fov": f"./fovTr/{name}",
                }
            )
            cases.append({"case": name, "seed": s, "n_trees": vp.n_trees})
    if kind == "ct" and balance_contrast:
        bright = [bool(c["lesion_contrasts_hu"]) and c["lesion_contrasts_hu"][0] > 0 for c in cases]
        train, val, test = [], [], []
        for group in (
            [i for i, b in enumerate(bright) if b],
            [i for i, b in enumerate(bright) if not b],
        ):
            for split, part in zip((train, val, test), split_cases(len(group))):
                split.extend(group[j] for j in part)
        train, val, test = sorted(train), sorted(val), sorted(test)
    else:
        train, val, test = split_cases(int(n))
    modality = {"ct": "CT", "vessels": "fundus RGB", "echo": "US"}[kind]
    labels = {
        "ct": {"0": "background", "1": "kidney", "2": "tumour"},
        "vessels": {"0": "background", "1": "vessel"},
        "echo": {str(k): v for k, v in ECHO_LABELS.items()},
    }[kind]
    meta: dict[str, Any] = {
        "name": f"sam3d-phantom-{kind}",
        "description": f"synthetic data from sam3d.data.phantoms (seed {seed})",
        "reference": "sam3d",
        "licence": "CC0",
        "tensorImageSize": "3D" if kind == "ct" else "2D",
        "modality": {"0": modality},
        "labels": labels,
        "numTraining": len(train) + len(val),
        "numTest": len(test),
        "training": [entries[i] for i in train],
        "validation": [entries[i] for i in val],
        "test": [entries[i] for i in test],
        "phantom": {"kind": kind, "seed": seed, "cases": cases},
    }
    path = out / "dataset.json"
    text = json.dumps(meta, indent=2)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return path
