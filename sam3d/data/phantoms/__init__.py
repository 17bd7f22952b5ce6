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
from sam3d.data.phantoms.heldout import HeldoutPhantom, make_heldout_phantom
from sam3d.data.phantoms.prostate import (
    SITES,
    ProstatePhantom,
    make_prostate_phantom,
    save_site_preview,
    write_prostate_dataset,
)
from sam3d.data.phantoms.registry import PhantomFamily, family_names, get_family, register_family
from sam3d.data.phantoms.synth import SynthPhantom, make_synth_phantom
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
    "HeldoutPhantom",
    "Lesion",
    "PhantomFamily",
    "ProstatePhantom",
    "SynthPhantom",
    "VesselPhantom",
    "_rotation",
    "case_seed",
    "family_names",
    "get_family",
    "make_affine",
    "make_ct_phantom",
    "make_heldout_phantom",
    "make_prostate_phantom",
    "make_synth_phantom",
    "make_vessel_phantom",
    "save_nifti",
    "save_png",
    "register_family",
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


def _write_ct_case(i: int, s: int, out: Path, kwargs: dict[str, Any]) -> tuple[dict, dict]:
    ph = make_ct_phantom(s, **kwargs)
    name = f"phantom_{i:03d}.nii.gz"
    save_nifti(ph.image_hu, ph.affine, out / "imagesTr" / name, np.int16)
    save_nifti(ph.label, ph.affine, out / "labelsTr" / name, np.uint8)
    entry = {"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"}
    case = {
        "case": name,
        "seed": s,
        "shape_vox": list(ph.image_hu.shape),
        "spacing_mm": [round(v, 4) for v in ph.spacing_mm],
        "orientation": ph.orientation,
        "lesion_diameters_mm": [round(les.diameter_mm, 2) for les in ph.lesions],
        "lesion_contrasts_hu": [round(les.contrast_hu, 1) for les in ph.lesions],
    }
    return entry, case


def _ct_bright(case: dict[str, Any]) -> bool:
    """Whether the case's first lesion is brighter than its kidney (``balance_contrast``)."""
    return bool(case["lesion_contrasts_hu"]) and case["lesion_contrasts_hu"][0] > 0


def _write_volume_case(
    prefix: str, ph: Any, i: int, s: int, out: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """image (int16 HU), label (uint8) and instances (uint16) of a lesion family's case."""
    name = f"{prefix}_{i:03d}.nii.gz"
    save_nifti(ph.image_hu, ph.affine, out / "imagesTr" / name, np.int16)
    save_nifti(ph.label, ph.affine, out / "labelsTr" / name, np.uint8)
    save_nifti(ph.instances, ph.affine, out / "instancesTr" / name, np.uint16)
    entry = {
        "image": f"./imagesTr/{name}",
        "label": f"./labelsTr/{name}",
        "instance": f"./instancesTr/{name}",
    }
    case = {
        "case": name,
        "seed": s,
        "shape_vox": list(ph.image_hu.shape),
        "spacing_mm": [round(v, 4) for v in ph.spacing_mm],
        "orientation": ph.orientation,
        "lesions": [
            {k: (round(v, 2) if isinstance(v, float) else v) for k, v in vars(les).items()
             if k != "center_vox"}
            for les in ph.lesions
        ],
    }  # fmt: skip
    return entry, case


def _write_synth_case(i: int, s: int, out: Path, kwargs: dict[str, Any]) -> tuple[dict, dict]:
    return _write_volume_case("synth", make_synth_phantom(s, **kwargs), i, s, out)


def _write_heldout_case(i: int, s: int, out: Path, kwargs: dict[str, Any]) -> tuple[dict, dict]:
    ph = make_heldout_phantom(s, **kwargs)
    entry, case = _write_volume_case("heldout", ph, i, s, out)
    case["phase"] = ph.phase
    return entry, case


def _write_echo_case(i: int, s: int, out: Path, kwargs: dict[str, Any]) -> tuple[dict, dict]:
    ep = make_echo_phantom(s, **kwargs)
    name = f"echo_{i:03d}.png"
    save_png(np.rint(ep.image * 255).astype(np.uint8), out / "imagesTr" / name)
    save_png(ep.label, out / "labelsTr" / name)
    spacing = [round(v, 6) for v in ep.spacing_mm]
    entry = {"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}", "spacing_mm": spacing}
    if i == 0:
        from sam3d.visualize import save_planar_overlay

        save_planar_overlay(ep.image, ep.label, out / "preview.png", class_names=ECHO_LABELS)
    return entry, {"case": name, "seed": s, "spacing_mm": spacing}


def _write_vessel_case(i: int, s: int, out: Path, kwargs: dict[str, Any]) -> tuple[dict, dict]:
    vp = make_vessel_phantom(s, **kwargs)
    name = f"vessel_{i:03d}.png"
    save_png(np.rint(vp.image * 255).astype(np.uint8), out / "imagesTr" / name)
    save_png(vp.label, out / "labelsTr" / name)
    save_png(vp.fov.astype(np.uint8), out / "fovTr" / name)
    entry = {
        "image": f"./imagesTr/{name}",
        "label": f"./labelsTr/{name}",
        "fov": f"./fovTr/{name}",
    }
    return entry, {"case": name, "seed": s, "n_trees": vp.n_trees}


def _write_prostate(out: Path, n: int, seed: int, progress: bool, **kwargs: Any) -> Path:
    """``n`` cases per site (:func:`write_prostate_dataset`)."""
    return write_prostate_dataset(out, n_per_site=n, seed=seed, progress=progress, **kwargs)


register_family(
    PhantomFamily(
        "ct",
        "abdominal CT: kidneys with lobulated lesions (KiTS labels), RAS/LPS/oblique",
        dims=3,
        modality="CT",
        labels={"0": "background", "1": "kidney", "2": "tumour"},
        write_case=_write_ct_case,
        shape_option="shape_vox",
        spacing_option="spacing_mm",
        stratify=_ct_bright,
    )
)
register_family(
    PhantomFamily(
        "vessels",
        "fundus-like RGB images with vessel trees and a field-of-view mask",
        dims=2,
        modality="fundus RGB",
        labels={"0": "background", "1": "vessel"},
        write_case=_write_vessel_case,
        shape_option="size",
    )
)
register_family(
    PhantomFamily(
        "echo",
        "echocardiography-like sector images: left ventricle, myocardium, left atrium",
        dims=2,
        modality="US",
        labels={str(k): v for k, v in ECHO_LABELS.items()},
        write_case=_write_echo_case,
        shape_option="size",
    )
)
register_family(
    PhantomFamily(
        "synth",
        "domain-randomised volumes (SynthSeg-style): organs and 1-5 lesions per volume, "
        "random intensities, spacing, orientation, blur, bias, noise; instance ids",
        dims=3,
        modality="CT",
        labels={"0": "background", "1": "organ", "2": "lesion"},
        write_case=_write_synth_case,
        shape_option="shape_vox",
        spacing_option="spacing_mm",
    )
)
register_family(
    PhantomFamily(
        "heldout",
        "EVALUATION ONLY, never for training: a second generator (liver / spleen, "
        "spiculated, cystic and multi-lobed lesions, contrast phases, 3 clinical grids)",
        dims=3,
        modality="CT",
        labels={"0": "background", "1": "organ", "2": "lesion"},
        write_case=_write_heldout_case,
        spacing_option="grid_mm",
        training=False,
    )
)
register_family(
    PhantomFamily(
        "prostate",
        "T2-like pelvis MRI with a prostate label at six sites (--n cases per site)",
        dims=3,
        modality="T2w-like MRI",
        labels={"0": "background", "1": "prostate"},
        write_dataset=_write_prostate,
    )
)


def write_phantom_dataset(
    kind: str,
    out: Path | str,
    n: int,
    seed: int = 0,
    progress: bool = False,
    balance_contrast: bool = False,
    **kwargs: Any,
) -> Path:
    """Write ``n`` phantoms of a registered family (:func:`family_names`) as an MSD-style
    dataset and return its ``dataset.json`` path.

    ct: ``imagesTr/phantom_XXX.nii.gz`` (int16 HU) and ``labelsTr/phantom_XXX.nii.gz``
    (uint8: 0 background, 1 kidney, 2 tumour). vessels: ``imagesTr/vessel_XXX.png``
    (RGB), ``labelsTr/vessel_XXX.png`` (uint8 0/1) and ``fovTr/vessel_XXX.png`` (0/1).
    echo: ``imagesTr/echo_XXX.png`` (grey), ``labelsTr/echo_XXX.png`` (uint8: 0
    background, 1 left ventricle, 2 myocardium, 3 left atrium), each entry with its
    ``spacing_mm`` (row, col), and ``preview.png`` (the first case, outlined). prostate:
    ``n`` cases per site (:func:`write_prostate_dataset`, its own layout).
    ``dataset.json`` lists ``training``/``validation``/``test`` (60/20/20) with paths
    relative to it. ``kwargs`` go to the family's generator (:func:`make_ct_phantom`,
    :func:`make_vessel_phantom`, :func:`make_echo_phantom`, ...) over its defaults. With
    ``balance_contrast`` (a family with ``stratify``: ct's bright first lesion) each split
    gets its 60/20/20 share of every group, so that no split is all dark lesions.
    """
    family = get_family(kind)
    if int(n) < 1:
        raise Sam3DError(f"the number of cases must be at least 1, got {n}")
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise Sam3DError(f"cannot create the output folder {out}: {e.strerror}") from e
    kwargs = {**family.defaults, **kwargs}
    if family.write_dataset is not None:
        return family.write_dataset(out, int(n), seed=seed, progress=progress, **kwargs)
    assert family.write_case is not None
    entries: list[dict[str, Any]] = []
    cases: list[dict[str, Any]] = []
    for i in _iter_cases(int(n), progress, f"phantoms ({kind})"):
        entry, case = family.write_case(i, case_seed(seed, i), out, kwargs)
        entries.append(entry)
        cases.append(case)
    if balance_contrast and family.stratify is not None:
        keys = [family.stratify(c) for c in cases]
        train, val, test = [], [], []
        for key in sorted(set(keys), key=lambda k: (not k, str(k))):
            group = [i for i, k in enumerate(keys) if k == key]
            for split, part in zip((train, val, test), split_cases(len(group))):
                split.extend(group[j] for j in part)
        train, val, test = sorted(train), sorted(val), sorted(test)
    else:
        train, val, test = split_cases(int(n))
    meta: dict[str, Any] = {
        "name": f"sam3d-phantom-{kind}",
        "description": f"synthetic data from sam3d.data.phantoms (seed {seed})",
        "reference": "sam3d",
        "licence": "CC0",
        "tensorImageSize": f"{family.dims}D",
        "modality": {"0": family.modality},
        "labels": dict(family.labels),
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
