"""Batch mode: segment a folder or a datalist of volumes, sharded across ranks, resumable.

Under ``torchrun`` every rank takes the cases ``i`` with ``i % WORLD_SIZE == RANK``
(on ``cuda:LOCAL_RANK``). A case whose outputs all exist is skipped: outputs are
written atomically, so an existing file is complete and an interrupted batch resumes
where it stopped (a mask without its preview is redone). Cases with
``points``/``point_labels`` (VISTA3D style, original voxel indices) are segmented from
those clicks, the others in automatic mode.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from sam3d.data.io import commit_outputs, is_nifti_name, leftover_temporaries, nifti_stem
from sam3d.errors import Sam3DError, find_user_error
from sam3d.inference.session import ClickSession
from sam3d.inference.windows import WindowGrowth

DATALIST_KEYS = ("test", "testing", "validation", "training")


def list_cases(source: str | os.PathLike, key: str | None = None) -> list[dict[str, Any]]:
    """Cases ``{"image": path, ["points", "point_labels"]}`` from a folder or a datalist JSON.

    A folder gives its ``*.nii.gz`` / ``*.nii`` files, sorted. A JSON file is a list of
    cases or an MSD-style dict (``key``, else the first of test/testing/validation/
    training); entries are paths or dicts, relative to the JSON file's folder.
    """
    src = Path(source)
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if is_nifti_name(p))
        if not files:
            raise Sam3DError(f"no .nii or .nii.gz images in {src}")
        return [{"image": str(p)} for p in files]
    if not src.is_file():
        raise Sam3DError(f"batch input not found: {src}")
    try:
        obj = json.loads(src.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Sam3DError(f"{src} is not a readable JSON datalist ({e})") from e
    if isinstance(obj, Mapping):
        keys = [key] if key else [k for k in DATALIST_KEYS if k in obj]
        if not keys or keys[0] not in obj:
            raise Sam3DError(f"{src} has no {key or ' / '.join(DATALIST_KEYS)} list")
        obj = obj[keys[0]]
    if not isinstance(obj, list):
        raise Sam3DError(f"{src} does not hold a list of cases")
    cases = []
    for entry in obj:
        case = dict(entry) if isinstance(entry, Mapping) else {"image": entry}
        if "image" not in case:
            raise Sam3DError(f"a case in {src} has no 'image'")
        image = Path(str(case["image"]))
        case["image"] = str(image if image.is_absolute() else src.parent / image)
        cases.append(case)
    return cases


def output_path(case: Mapping[str, Any], out_dir: str | os.PathLike, postfix: str = "seg") -> Path:
    """``out_dir/<image name without .nii[.gz]>_<postfix>.nii.gz`` (SaveImaged's naming)."""
    name = nifti_stem(str(case["image"]))
    return Path(out_dir) / f"{name}_{postfix}.nii.gz"


def shard(cases: Sequence[Any], rank: int, world_size: int) -> list[Any]:
    """The cases of one rank: every ``world_size``-th, starting at ``rank``."""
    return [c for i, c in enumerate(cases) if i % world_size == rank]


def dist_rank() -> tuple[int, int, int]:
    """``(RANK, WORLD_SIZE, LOCAL_RANK)`` from torchrun's environment (0, 1, 0 without it)."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def rank_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or this rank's GPU (``cuda:LOCAL_RANK``) when CUDA is available, else the CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", dist_rank()[2] % torch.cuda.device_count())
    return torch.device("cpu")


@dataclass
class BatchReport:
    """What one rank did: outputs written, skipped (already there), failed (with messages)."""

    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def segment_batch(
    model: Any,
    dataset: Mapping[str, Any] | str,
    cases: Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    device: str | torch.device | None = None,
    growth: WindowGrowth | None = None,
    world: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    previews: bool = False,
) -> BatchReport:
    """Segment this rank's share of ``cases`` into ``out_dir``, skipping finished outputs.

    ``model`` must be on ``rank_device(device)`` (load it there).

    A case is done when all its outputs exist (the mask, and its PNG with ``previews``);
    they are written together (:func:`sam3d.data.io.commit_outputs`), and temporaries
    that a killed run left for this rank's cases are removed first. A case that fails
    for any reason (corrupt image, click outside it, a model error) is recorded in the
    report with one line and the batch goes on.
    """
    env_rank, env_world, _ = dist_rank()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    device = rank_device(device)
    report = BatchReport()
    mine = shard(list(cases), rank, world_size)
    bar = tqdm(mine, desc=f"segment [rank {rank}/{world_size}]", disable=not progress)
    for case in bar:
        out = output_path(case, out_dir)
        outputs = case_outputs(out, previews)
        for target in outputs:  # what a killed run of this case left half-written
            for tmp in leftover_temporaries(target):
                tmp.unlink(missing_ok=True)
        if all(p.exists() for p in outputs):
            report.skipped.append(out)
            continue
        try:
            segment_case(model, dataset, case, outputs, device=device, growth=growth, world=world)
            report.written.append(out)
        except Exception as e:  # one bad case never stops the batch
            report.failed.append((str(case["image"]), describe_failure(e)))
        bar.set_postfix(
            done=len(report.written), skipped=len(report.skipped), failed=len(report.failed)
        )
    return report


def case_outputs(out: Path, previews: bool) -> list[Path]:
    """Every file a case must have to be done: the mask, and its PNG with ``previews``."""
    return [out] + ([out.with_name(out.name.replace(".nii.gz", ".png"))] if previews else [])


def segment_case(
    model: Any,
    dataset: Mapping[str, Any] | str,
    case: Mapping[str, Any],
    outputs: Sequence[Path],
    device: torch.device | None = None,
    growth: WindowGrowth | None = None,
    world: bool = False,
) -> None:
    """Segment one case and write its mask (and preview, ``outputs[1]``) all or none."""
    session = ClickSession(model, case["image"], dataset, device=device, growth=growth)
    points = case.get("points")
    if points is not None and len(points) > 0:
        labels = case.get("point_labels", [1] * len(points))
        session.add_clicks(points, labels, world=world)
    else:
        session.segment_all()
    writers = {outputs[0]: lambda tmp: session.save(tmp)}
    if len(outputs) > 1:
        writers[outputs[1]] = lambda tmp: session.save_preview(tmp)
    commit_outputs(writers)


def describe_failure(e: BaseException) -> str:
    """One line for the report: the user's error, else the exception's type and first line."""
    user = find_user_error(e)
    if user is not None:
        return " ".join(str(user).split())
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}".rstrip(": ")
