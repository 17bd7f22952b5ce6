"""Evaluation metrics for both paths, on any device (see docs/METRICS.md)."""

from sam3d.metrics.boundary import BoundaryF1Metric, compute_bf_score, mask_boundary
from sam3d.metrics.calibration import CalibrationErrorMetric, compute_ece
from sam3d.metrics.cldice import ClDiceMetric, compute_cldice
from sam3d.metrics.overlap import (
    CaseOverlapMetric,
    OverlapMetric,
    compute_dice,
    compute_iou,
    compute_precision_recall,
)
from sam3d.metrics.skeleton import skeletonize
from sam3d.metrics.surface import (
    AverageSurfaceDistanceMetric,
    HausdorffDistance95Metric,
    SurfaceDiceMetric,
    compute_assd,
    compute_hd95,
    compute_surface_dice,
    compute_surface_distances,
    spacing_from_meta,
)

__all__ = [
    "AverageSurfaceDistanceMetric",
    "BoundaryF1Metric",
    "CalibrationErrorMetric",
    "CaseOverlapMetric",
    "ClDiceMetric",
    "HausdorffDistance95Metric",
    "OverlapMetric",
    "SurfaceDiceMetric",
    "compute_assd",
    "compute_bf_score",
    "compute_cldice",
    "compute_dice",
    "compute_ece",
    "compute_hd95",
    "compute_iou",
    "compute_precision_recall",
    "compute_surface_dice",
    "compute_surface_distances",
    "mask_boundary",
    "skeletonize",
    "spacing_from_meta",
]
