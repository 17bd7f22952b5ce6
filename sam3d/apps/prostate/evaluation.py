"""The prostate bundle's leave-sites-out test: 3D Dice per patient, per-case and per-site
CSV, MLflow."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sam3d.apps.prostate.inference import segment_volume
from sam3d.data.io import load_image_label, nifti_stem

logger = logging.getLogger(__name__)


def dice_3d(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two volumes (any shape; nonzero = foreground), 1.0 when both are empty
    (:func:`sam3d.metrics.overlap.compute_dice` gives NaN there)."""
    from sam3d.metrics.overlap import compute_dice  # monai.metrics: imported when scoring

    p, g = torch.as_tensor(np.asarray(pred) > 0), torch.as_tensor(np.asarray(gt) > 0)
    d = float(compute_dice(p, g, spatial_dims=max(p.ndim, 1)))
    return 1.0 if math.isnan(d) else d


def evaluate_cases(
    network: torch.nn.Module,
    cases: Sequence[dict[str, str]],
    output_dir: str | Path,
    mode: str = "grid",
    gt_slices_only: bool = True,
    batch_size: int = 4,
    mlflow_run: Any | None = None,
    interpolation: str = "bilinear",
    edge_zero_px: float = 0,
    box_min_region_px: float = 0,
    **grid_kwargs: Any,
) -> dict[str, Any]:
    """Leave-sites-out test: Dice per patient in 3D, a per-case and a per-site CSV.

    As the reference, Dice is computed over the slices with ground truth
    (``gt_slices_only``; False: over the whole volume). Writes
    ``output_dir/metrics_per_case.csv`` (case, site, dice, gt_slices, empty_slices: the
    ground-truth slices given an empty mask) and ``metrics_per_site.csv`` (site, n, mean,
    std, and ``all``); logs ``test_dice``, ``test_dice_<site>`` and ``empty_slices`` to
    ``mlflow_run`` (an :class:`sam3d.engine.MLflowRun`) if given. Returns the summary
    (``test_dice``, ``sites``, ``gt_slices``, ``empty_slices``). A warning says when most
    ground-truth slices got no mask (in grid mode: no candidate passed the IoU threshold).
    ``interpolation``, ``edge_zero_px``, ``box_min_region_px``: :func:`segment_volume`'s
    (the reference recipe: ``"bicubic"``, 50, 1000).
    """
    from sam3d.engine.reporting import write_csv  # sam3d.engine imports MLflow

    out = Path(output_dir)
    rows: list[list[Any]] = [["case", "site", "dice", "gt_slices", "empty_slices"]]
    per_site: dict[str, list[float]] = {}
    n_gt = n_empty = 0
    from tqdm.auto import tqdm

    bar = tqdm(cases, desc="evaluation", unit="case")
    for case in bar:
        image, label = load_image_label(case["image"], case["label"])
        gt = label[0].numpy() > 0
        # Only the slices scored are segmented (the reference scores the ground-truth ones)
        ks = np.flatnonzero(gt.any(axis=(0, 1))) if gt_slices_only else None
        pred = segment_volume(
            network, image[0].numpy(), mode, batch_size, interpolation, edge_zero_px,
            box_min_region_px, slices=ks, **grid_kwargs,
        )  # fmt: skip
        if ks is not None:
            gt = gt[:, :, ks]
        d = dice_3d(pred, gt)
        has_gt = gt.any(axis=(0, 1))
        empty = int((has_gt & ~(pred > 0).any(axis=(0, 1))).sum())
        n_gt, n_empty = n_gt + int(has_gt.sum()), n_empty + empty
        rows.append([nifti_stem(case["image"]), case["site"], f"{d:.6f}", int(has_gt.sum()), empty])
        per_site.setdefault(case["site"], []).append(d)
        bar.set_postfix(dice=f"{d:.3f}", refresh=False)
    all_d = [d for v in per_site.values() for d in v]
    site_rows: list[list[Any]] = [["site", "n", "dice_mean", "dice_std"]]
    summary: dict[str, Any] = {"test_dice": float(np.mean(all_d)), "sites": {},
                               "gt_slices": n_gt, "empty_slices": n_empty}  # fmt: skip
    for site in sorted(per_site):
        v = per_site[site]
        site_rows.append([site, len(v), f"{np.mean(v):.6f}", f"{np.std(v):.6f}"])
        summary["sites"][site] = float(np.mean(v))
    site_rows.append(["all", len(all_d), f"{np.mean(all_d):.6f}", f"{np.std(all_d):.6f}"])
    write_csv(out / "metrics_per_case.csv", rows)
    write_csv(out / "metrics_per_site.csv", site_rows)
    logger.info(
        f"prostate evaluation ({mode}): Dice {summary['test_dice']:.4f}, "
        f"per site {summary['sites']}; {n_empty} of {n_gt} ground-truth slices got no mask"
    )
    if n_gt and n_empty > n_gt / 2:
        hint = (
            f" (grid mode: no candidate passed iou_threshold "
            f"{grid_kwargs.get('iou_threshold', 0.5)} on those slices; check the IoU head)"
            if mode == "grid"
            else ""
        )
        logger.warning(f"{n_empty} of {n_gt} ground-truth slices got an empty mask{hint}")
    if mlflow_run is not None and getattr(mlflow_run, "enabled", False):
        client, run_id = mlflow_run.client, mlflow_run.run_id
        client.log_metric(run_id, "test_dice", summary["test_dice"])
        client.log_metric(run_id, "empty_slices", n_empty)
        for site, v in summary["sites"].items():
            client.log_metric(run_id, f"test_dice_{site}", v)
        for name in ("metrics_per_case.csv", "metrics_per_site.csv"):
            client.log_artifact(run_id, str(out / name))
        client.set_terminated(run_id)
    return summary
