"""Evaluation by clicks, as interactive segmentation reports it (RITM, SAM-Med3D, nnInteractive).

A simulated user segments one lesion with up to ``n_clicks`` clicks through
:class:`~sam3d.inference.session.ClickSession` (the code of ``sam3d segment``), so any
checkpoint that session can run is scored the same way:

- the first click is positive, at the lesion's deepest voxel (largest Euclidean distance
  to its boundary, in mm: :func:`~sam3d.data.clicks.interior_point`);
- each next click goes to the largest error component (26-connected components of the
  misses ``target & ~mask`` and of the leaks ``mask & ~target``, the largest by voxel
  count), at its deepest voxel (in mm): positive in a miss, negative in a leak;
- an exact mask ends the clicking; its Dice then holds for the remaining clicks.

Only the clicked lesion (its instance) is the target; other lesions count as leaks.

Reported per case and as means over cases: Dice after 1..n clicks (the curve), NoC@t
(the fewest clicks reaching Dice >= t; a case that never reaches t within ``n_clicks``
counts ``n_clicks``, the usual cap convention, so NoC is capped at ``n_clicks``), and
the share of positive clicks inside the mask returned right after that click.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from sam3d.data.clicks import deepest_error_click, interior_point
from sam3d.errors import Sam3DError

THRESHOLDS = (0.80, 0.85, 0.90)
_CONN = np.ones((3, 3, 3), dtype=bool)


@dataclass
class ClickCase:
    """One lesion to segment: its volume and its target mask on the volume's voxel grid.

    ``image``: a NIfTI path or a channel-first MetaTensor (what :class:`ClickSession`
    takes); ``target``: bool ``I x J x K`` in the image's own voxel order; ``spacing_mm``:
    its voxel size (the clicks' distance transform is in mm).
    """

    name: str
    image: Any
    target: np.ndarray
    spacing_mm: tuple[float, float, float]


@dataclass
class CaseResult:
    """The clicks on one case: ``dice[k]`` after click k + 1; ``clicks`` (voxel, label)."""

    name: str
    dice: list[float]
    clicks: list[tuple[tuple[int, int, int], int]]
    positive_inside: list[bool]

    def noc(self, threshold: float, n_clicks: int) -> int:
        """Fewest clicks with Dice >= ``threshold``; ``n_clicks`` when never reached."""
        for k, d in enumerate(self.dice[:n_clicks], start=1):
            if d >= threshold:
                return k
        return n_clicks


@dataclass
class ClickEvaluation:
    """Results of :func:`evaluate_clicks` over a set of cases."""

    cases: list[CaseResult]
    n_clicks: int
    thresholds: tuple[float, ...] = THRESHOLDS
    label: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def curve(self) -> np.ndarray:
        """Mean Dice after 1..n clicks, ``n_clicks`` values (NaN without cases)."""
        if not self.cases:
            return np.full(self.n_clicks, np.nan)
        return np.mean([c.dice for c in self.cases], axis=0)

    @property
    def noc(self) -> dict[float, float]:
        """Mean NoC@t per threshold (unreached = ``n_clicks``)."""
        return {
            t: float(np.mean([c.noc(t, self.n_clicks) for c in self.cases])) if self.cases
            else float("nan")
            for t in self.thresholds
        }  # fmt: skip

    @property
    def positive_inside(self) -> float:
        """Share of all positive clicks that lie inside the mask they produced."""
        flags = [f for c in self.cases for f in c.positive_inside]
        return float(np.mean(flags)) if flags else float("nan")

    def summary(self) -> str:
        curve = " ".join(f"{v:.3f}" for v in self.curve)
        noc = ", ".join(f"NoC@{round(t * 100)} {v:.2f}" for t, v in self.noc.items())
        head = f"{self.label}: " if self.label else ""
        return (
            f"{head}{len(self.cases)} lesions; Dice after 1..{self.n_clicks} clicks: {curve}; "
            f"{noc} (cap {self.n_clicks}); positive clicks inside the mask "
            f"{100 * self.positive_inside:.1f} %"
        )

    def rows(self) -> list[dict[str, Any]]:
        """One row per case (name, dice_1..dice_n, NoC, positive-inside share) for a CSV."""
        out = []
        for c in self.cases:
            row: dict[str, Any] = {"set": self.label, "case": c.name}
            row.update({f"dice_{k}": round(d, 5) for k, d in enumerate(c.dice, start=1)})
            row.update({f"noc_{round(t * 100)}": c.noc(t, self.n_clicks) for t in self.thresholds})
            row["positive_inside"] = (
                round(float(np.mean(c.positive_inside)), 4) if c.positive_inside else ""
            )
            out.append(row)
        return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two bool masks; 1.0 when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int((a & b).sum()) / s


def next_click(
    target: np.ndarray, mask: np.ndarray, spacing_mm: Sequence[float] | None = None
) -> tuple[np.ndarray, int] | None:
    """The simulated user's next click (:func:`sam3d.data.clicks.deepest_error_click`, the
    rule training uses too): the deepest voxel (mm) of the largest error component, label 1
    in a miss, 0 in a leak; None when ``mask`` equals ``target``."""
    return deepest_error_click(target, mask, spacing_mm)


def run_case(session: Any, case: ClickCase, n_clicks: int = 10) -> CaseResult:
    """Click one lesion ``n_clicks`` times through ``session`` (a ClickSession, reset first).

    ``session.click(point, positive)`` returns the mask on the image's voxel grid.
    """
    target = np.asarray(case.target, bool)
    first = interior_point(target, case.spacing_mm)
    if first is None:
        raise Sam3DError(f"case {case.name}: the target lesion is empty")
    session.reset()
    point, lab = first, 1
    dices: list[float] = []
    clicks: list[tuple[tuple[int, int, int], int]] = []
    inside: list[bool] = []
    for _ in range(int(n_clicks)):
        mask = _as_numpy(session.click(tuple(float(v) for v in point), positive=bool(lab)))
        if mask.shape != target.shape:
            raise Sam3DError(f"case {case.name}: mask {mask.shape} vs target {target.shape}")
        clicks.append((tuple(int(v) for v in point), int(lab)))
        if lab == 1:
            inside.append(bool(mask[tuple(point)]))
        dices.append(dice(mask, target))
        nxt = next_click(target, mask, case.spacing_mm)
        if nxt is None:
            break
        point, lab = nxt
    dices += [dices[-1]] * (int(n_clicks) - len(dices))
    return CaseResult(case.name, dices, clicks, inside)


def _as_numpy(mask: Any) -> np.ndarray:
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    return np.asarray(mask, bool)


SessionFactory = Callable[[Any], Any]


def session_factory(
    model: Any,
    dataset: Any = "kits",
    device: Any = None,
    **session_kwargs: Any,
) -> SessionFactory:
    """image -> :class:`ClickSession` of ``model`` (what ``sam3d segment`` runs)."""
    from sam3d.inference.session import ClickSession

    def make(image: Any) -> Any:
        return ClickSession(model, image, dataset=dataset, device=device, **session_kwargs)

    return make


def evaluate_clicks(
    model_or_factory: Any,
    cases: Iterable[ClickCase],
    n_clicks: int = 10,
    dataset: Any = "kits",
    device: Any = None,
    thresholds: Sequence[float] = THRESHOLDS,
    label: str = "",
    progress: bool = False,
) -> ClickEvaluation:
    """Score a model (or a session factory: image -> ClickSession-like) by simulated clicks.

    Args:
        model_or_factory: a model with ``encode`` / ``decode`` / ``crop_size`` (run through
            :class:`ClickSession` with ``dataset`` on ``device``), or a callable making a
            session for an image (``.click(point, positive) -> mask``, ``.reset()``).
        cases: :class:`ClickCase` s (e.g. :func:`lesion_cases`); consecutive cases of the
            same image share one session (the encoder's cache survives ``reset``).
        n_clicks: clicks per lesion (the curve's length and the NoC cap).
        label: the set's name, printed and written with the results.

    Returns:
        :class:`ClickEvaluation` with ``.curve``, ``.noc``, ``.positive_inside``, ``.cases``.
    """
    if int(n_clicks) < 1:
        raise Sam3DError(f"n_clicks must be at least 1, got {n_clicks}")
    if callable(model_or_factory) and not hasattr(model_or_factory, "decode"):
        make = model_or_factory
    else:
        make = session_factory(model_or_factory, dataset=dataset, device=device)
    cases = list(cases)
    from tqdm.auto import tqdm

    results = []
    session, key = None, None
    for case in tqdm(cases, desc=f"clicks {label}".strip(), disable=not progress, unit="lesion"):
        k = case.image if isinstance(case.image, str | os.PathLike) else id(case.image)
        if session is None or k != key:
            session, key = make(case.image), k
        results.append(run_case(session, case, n_clicks))
    return ClickEvaluation(results, int(n_clicks), tuple(float(t) for t in thresholds), label)


def lesion_cases(
    dataset_json: str | os.PathLike,
    split: str | Sequence[str] = "test",
    tumour_label: int = 2,
    min_voxels: int = 8,
    limit: int | None = None,
) -> list[ClickCase]:
    """One :class:`ClickCase` per lesion of an MSD-style dataset's split(s).

    Lesions are the entries' instance maps (``instance`` key, e.g. the ``synth`` and
    ``heldout`` phantoms) or, without one, the 26-connected components of
    ``label == tumour_label``; lesions under ``min_voxels`` are skipped. ``limit``: at
    most that many lesions, in order.
    """
    import json

    import nibabel as nib

    path = Path(dataset_json)
    spec = json.loads(path.read_text())
    splits = [split] if isinstance(split, str) else list(split)
    out: list[ClickCase] = []
    for s in splits:
        for e in spec.get(s) or []:
            image = str((path.parent / e["image"]).resolve())
            if e.get("instance"):
                nii = nib.load(str(path.parent / e["instance"]))
                inst = np.asarray(nii.dataobj).astype(np.int64)
            else:
                nii = nib.load(str(path.parent / e["label"]))
                inst, _ = ndimage.label(np.asarray(nii.dataobj) == tumour_label, structure=_CONN)
            spacing = tuple(float(v) for v in nib.affines.voxel_sizes(nii.affine))
            stem = Path(e["image"]).name.split(".")[0]
            for i in sorted(int(v) for v in np.unique(inst) if v):
                target = inst == i
                if int(target.sum()) < min_voxels:
                    continue
                out.append(ClickCase(f"{stem}#{i}", image, target, spacing))  # type: ignore[arg-type]
                if limit is not None and len(out) >= limit:
                    return out
    return out


def write_results_csv(path: str | os.PathLike, evaluations: Iterable[ClickEvaluation]) -> Path:
    """Per-case rows of several evaluations (``checkpoint`` from ``meta``, ``set``), atomic."""
    from sam3d.engine.reporting import write_csv

    rows = [{"checkpoint": ev.meta.get("checkpoint", ""), **r} for ev in evaluations
            for r in ev.rows()]  # fmt: skip
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    write_csv(path, [fields] + [[r.get(k, "") for k in fields] for r in rows])
    return Path(path)
