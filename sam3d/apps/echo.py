"""The echo (SAMUS) bundle's glue: datalists (phantoms when empty), per-structure metrics,
the refinement-click inferer, the reference recipe's low-res inferer, and label maps from
per-structure predictions.

Layouts and pairing: :mod:`sam3d.data.planar`; splits: :mod:`sam3d.data.splits`;
clicks: :mod:`sam3d.data.clicks`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.handlers import IgniteMetricHandler, from_engine
from monai.inferers import Inferer
from monai.transforms import MapTransform

from sam3d.data.clicks import error_region_click
from sam3d.data.planar import planar_split
from sam3d.errors import Sam3DError
from sam3d.metrics import CaseOverlapMetric, HausdorffDistance95Metric

logger = logging.getLogger(__name__)


def echo_datalist(
    dataset_dir: str | Path,
    split: str = "training",
    n_phantoms: int = 20,
    phantom_size: Sequence[int] = (256, 256),
    seed: int = 0,
    spacing_mm: Sequence[float] | None = None,
) -> list[dict[str, Any]]:
    """The cases of one split of ``dataset_dir`` (``training``, ``validation`` or ``test``).

    A missing or empty folder is first filled with ``n_phantoms`` echo phantoms of
    ``phantom_size`` (H, W). Cases carry ``spacing_mm`` (row, col) when the dataset's
    index gives it, else ``spacing_mm`` (all cases) when given; either all cases of the
    split have one or none (then HD95 is in pixels).
    """
    cases = planar_split(dataset_dir, split, "echo", n_phantoms, phantom_size, seed)
    if spacing_mm is not None:
        cases = [{"spacing_mm": [float(s) for s in spacing_mm], **c} for c in cases]
    with_spacing = sum("spacing_mm" in c for c in cases)
    if 0 < with_spacing < len(cases):
        raise Sam3DError(
            f"{with_spacing} of {len(cases)} {split} cases of {dataset_dir} give spacing_mm: "
            "give it for all of them (or set the bundle's spacing_mm)"
        )
    return cases


def hd95_unit(cases: Sequence[Mapping[str, Any]]) -> str:
    """``"mm"`` when the cases carry ``spacing_mm``, else ``"px"`` (logged)."""
    if cases and all("spacing_mm" in c for c in cases):
        return "mm"
    logger.warning("HD95 is in pixels: the cases give no spacing_mm (set the bundle's spacing_mm)")
    return "px"


class BoundedHD95Metric(HausdorffDistance95Metric):
    """HD95 where exactly one mask is empty scores the image diagonal (same unit), not inf.

    A missed or hallucinated structure then weighs as the worst possible boundary, and
    the mean over cases stays finite (MLflow, model comparison).
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        hd = super()._compute_tensor(y_pred, y, **kwargs)
        spacing = torch.as_tensor(self._spacing(y_pred, y, kwargs), dtype=torch.float64)
        extent = torch.tensor(y.shape[2:], dtype=torch.float64)
        diagonal = (extent * spacing).square().sum(-1).sqrt().reshape(-1, 1)
        diagonal = diagonal.expand(hd.shape).to(hd)
        return torch.where(torch.isinf(hd), diagonal, hd)


class _Channel:
    """``(preds, labels)`` of a decollated batch, channel ``c`` only (picklable)."""

    def __init__(self, c: int | None, keys: tuple[str, str] = ("pred", "label")):
        self.c, self.keys = c, keys

    def __call__(self, output: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        preds, labels = from_engine(list(self.keys))(output)
        if self.c is None:
            return preds, labels
        return [p[self.c : self.c + 1] for p in preds], [y[self.c : self.c + 1] for y in labels]


STRUCTURE_METRICS = ("dice", "iou", "hd95")


def _metric_specs(
    class_names: Sequence[str], prefix: str = "val"
) -> list[tuple[str, str, int | None]]:
    """``(key, metric, channel)`` of every metric :func:`structure_metrics` makes: the
    means over structures (channel None), then one per structure; ``prefix`` names the
    split (``val`` in training, ``test`` for evaluate's test split)."""
    specs = [(f"{prefix}_{m}", m, None) for m in STRUCTURE_METRICS]
    for c, name in enumerate(class_names):
        specs += [(f"{prefix}_{m}_{name}", m, c) for m in STRUCTURE_METRICS]
    return specs


def metric_names(class_names: Sequence[str], prefix: str = "val") -> list[str]:
    """The metric keys :func:`structure_metrics` makes: means, then per structure."""
    return [key for key, _, _ in _metric_specs(class_names, prefix)]


def structure_metrics(
    class_names: Sequence[str],
    save_details: bool = True,
    key: str | None = None,
    prefix: str = "val",
) -> dict[str, IgniteMetricHandler]:
    """MONAI metric handlers of the echo bundle's ``additional_metrics`` (all but ``key``,
    by default ``<prefix>_dice``).

    Per case, on each structure's own prompted mask at native size: Dice, IoU, HD95
    (:class:`BoundedHD95Metric`, in mm from the affines set by ``SetPixelSpacingd``, else
    pixels). ``<prefix>_<m>`` is the mean over structures, ``<prefix>_<m>_<name>`` one
    structure.
    """
    key = key or f"{prefix}_dice"

    def make(metric: str) -> Any:
        if metric == "hd95":
            return BoundedHD95Metric(include_background=True)
        return CaseOverlapMetric(metric=metric, include_background=True)

    return {
        name: IgniteMetricHandler(
            metric_fn=make(metric), output_transform=_Channel(c), save_details=save_details
        )
        for name, metric, c in _metric_specs(class_names, prefix)
        if name != key
    }


def key_metric(save_details: bool = True, prefix: str = "val") -> dict[str, IgniteMetricHandler]:
    """``<prefix>_dice``: per-case Dice averaged over structures and cases (in training,
    ``val_dice`` chooses the best model)."""
    return {
        f"{prefix}_dice": IgniteMetricHandler(
            metric_fn=CaseOverlapMetric(metric="dice", include_background=True),
            output_transform=_Channel(None),
            save_details=save_details,
        )
    }


class RefineClickInferer(Inferer):
    """Two clicks per structure: predict from the first, add the error-region click, again.

    The second click is :func:`sam3d.data.clicks.error_region_click` on the first
    prediction against the reference (``click_label``, ``B x K x H x W``, handed over
    by the engine's ``prepare_batch``): the point of the error region farthest from the
    first click, positive where missed, negative where leaked (the seed's two-click
    setting, with a simulated user who looks at the first result).
    """

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = float(threshold)

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: Callable[..., torch.Tensor],
        *args: Any,
        points: torch.Tensor,
        point_labels: torch.Tensor,
        click_label: torch.Tensor,
        **kwargs: Any,
    ) -> torch.Tensor:
        first = network(inputs, *args, points=points, point_labels=point_labels, **kwargs)
        pred = (torch.sigmoid(first.float()) > self.threshold).cpu().numpy()
        gt = torch.as_tensor(click_label).cpu().numpy() > 0
        b, k = points.shape[:2]
        extra = torch.zeros(b, k, 1, 2, dtype=points.dtype)
        extra_labels = torch.full((b, k, 1), -1, dtype=point_labels.dtype)
        for i in range(b):
            for c in range(k):
                if int(point_labels[i, c, 0]) != 1:
                    continue
                second = error_region_click(gt[i, c], pred[i, c], points[i, c, 0].tolist())
                if second is not None:
                    extra[i, c, 0] = torch.as_tensor(second[0], dtype=points.dtype)
                    extra_labels[i, c, 0] = second[1]
        points = torch.cat([points, extra.to(points.device)], dim=2)
        point_labels = torch.cat([point_labels, extra_labels.to(point_labels.device)], dim=2)
        return network(inputs, *args, points=points, point_labels=point_labels, **kwargs)


class LowResInferer(Inferer):
    """The network's low-res logits (``low_res=True``: SAMUS's 128 x 128 at 256), what
    the reference recipe trains on (``BCEDiceLoss`` resizes the mask to them)."""

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        return network(inputs, *args, low_res=True, **kwargs)


class StructuresToLabeld(MapTransform):
    """Per-structure probabilities ``K x H x W`` -> one ``1 x H x W`` class-id map.

    A pixel gets the structure of highest probability among those above ``threshold``
    (0 where none is): prompts are decoded independently, so they may overlap.
    """

    def __init__(
        self, keys: KeysCollection, threshold: float = 0.5, allow_missing_keys: bool = False
    ):
        super().__init__(keys, allow_missing_keys)
        self.threshold = float(threshold)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            p = d[key]
            best, idx = p.max(dim=0, keepdim=True)
            d[key] = torch.where(best > self.threshold, idx + 1, torch.zeros_like(idx)).to(
                torch.uint8
            )
        return d


def inference_datalist(
    input_dict: Mapping[str, Any] | None, dataset_dir: str | Path, n: int | None = None
) -> list[dict[str, Any]]:
    """Cases for ``inference.json``: one user case or the dataset's test cases.

    ``input_dict``: ``{"image": path, "points": [[x, y], ...], "point_labels": [1, 0, ...]}``
    with ``(x, y)`` pixel coordinates (column, row) of the image, one structure. Without
    it, the test split with the interior point of every structure of its labels.
    """
    if input_dict:
        pts = np.asarray(input_dict.get("points", []), dtype=np.float32).reshape(-1, 2)
        if len(pts) == 0:
            raise Sam3DError("input_dict needs 'points': [[x, y], ...] (column, row pixels)")
        labels = list(input_dict.get("point_labels", [1] * len(pts)))
        if len(labels) != len(pts):
            raise Sam3DError(f"{len(pts)} points but {len(labels)} point_labels")
        return [
            {
                "image": str(input_dict["image"]),
                "points": pts[:, ::-1].copy()[None],  # (row, col), one prompt: 1 x N x 2
                "point_labels": np.asarray(labels, dtype=np.int64)[None],
            }
        ]
    cases = echo_datalist(dataset_dir, "test")
    return cases[:n] if n else cases


def check_click_inside(points_rc: np.ndarray, hw: tuple[int, int], source: str) -> None:
    """Raise :class:`Sam3DError` for a click outside an ``H x W`` image (``(x, y)`` said)."""
    h, w = hw
    for r, c in np.asarray(points_rc, dtype=np.float64).reshape(-1, 2):
        if not (0 <= r <= h - 1 and 0 <= c <= w - 1) or math.isnan(r + c):
            raise Sam3DError(
                f"click x={c:g}, y={r:g} is outside {source} ({w} x {h} pixels: "
                f"x in 0..{w - 1}, y in 0..{h - 1})"
            )
