"""Click simulation: positive clicks inside the tumour, negative clicks outside it.

Clicks are float voxel coordinates ``(i, j, k)`` in the index order of the array they
were drawn from (the spatial part of MONAI's ``C x H x W x D``), so they are drawn
*after* the last spatial transform of a pipeline (orientation, spacing, crop) and need
no carrying through transforms. Labels: 1 positive, 0 negative, -1 padding; every sample
is padded to the same number of clicks so batches collate to ``points B x N x 3`` and
``point_labels B x N``.

Two dictionary transforms for a tumour in a volume:

- :class:`SimulateClicksd`: deterministic, seeded per case (global seed + case name), so
  every model scored on a split sees exactly the same clicks, whatever the order of the
  cases or the number of workers. Not randomizable, so MONAI's ``CacheDataset`` caches it.
- :class:`RandSimulateClicksd`: a MONAI randomizable transform for training; its generator
  is seeded by MONAI (``set_determinism`` / the data loader), so runs are reproducible.

And for several structures in an image (any number of spatial dims; one channel per
structure, one prompt per structure: ``points K x N x d``, ``point_labels K x N``):

- :func:`interior_point`: the deterministic evaluation click, the point farthest from
  the structure's boundary (a distance transform), inside every mask, also a U-shaped
  one (the middle element of ``argwhere`` is not);
- :func:`error_region_click`: the refinement click, the point of the error region
  farthest from the first click (positive where missed, negative where leaked);
- :class:`StructureClicksd` (evaluation: interior points, optionally a second
  click from a prediction) and :class:`RandStructureClicksd` (training: one random
  positive per structure).
"""

from __future__ import annotations

import zlib
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable
from scipy import ndimage

from sam3d.errors import Sam3DError

__all__ = [
    "case_seed",
    "sample_clicks",
    "SimulateClicksd",
    "RandSimulateClicksd",
    "interior_point",
    "error_region_click",
    "StructureClicksd",
    "RandStructureClicksd",
    "clicked_lesion",
    "clicked_instance",
    "ClickedLesiond",
]

Generator = np.random.Generator | np.random.RandomState


def case_seed(seed: int, case_id: str) -> int:
    """A stable 32-bit seed from a global seed and a case name (independent of case order)."""
    return zlib.crc32(f"{int(seed)}:{case_id}".encode()) & 0xFFFFFFFF


def _as_mask(label: Any, tumour_label: int) -> np.ndarray:
    arr = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    if arr.ndim == 4:
        if arr.shape[0] != 1:
            raise ValueError(f"expected a single-channel label 1 x H x W x D, got {arr.shape}")
        arr = arr[0]
    if arr.ndim != 3:
        raise ValueError(f"expected a 3D label (H x W x D or 1 x H x W x D), got {arr.shape}")
    return arr == tumour_label


def _draw(region: np.ndarray, k: int, rng: Generator) -> np.ndarray:
    """``k`` indices (``k x d``) drawn uniformly from the True points of ``region``."""
    flat = np.flatnonzero(region)
    if k <= 0 or flat.size == 0:
        return np.zeros((0, 3), dtype=np.int64)
    chosen = rng.choice(flat, size=k, replace=flat.size < k)
    return np.stack(np.unravel_index(np.asarray(chosen), region.shape), axis=-1)


def sample_clicks(
    tumour_mask: np.ndarray,
    n_pos: int,
    n_neg: int,
    rng: Generator,
    neg_margin_vox: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw clicks from a binary tumour mask.

    Args:
        tumour_mask: bool ``H x W x D`` (True inside the tumour).
        n_pos: positive clicks, uniform over tumour voxels (none if the mask is empty).
        n_neg: negative clicks, uniform over non-tumour voxels; with ``neg_margin_vox`` only
            those within that many voxels of the tumour's bounding box (near the lesion,
            where a user would correct a leak), falling back to anywhere outside the tumour.
        rng: a numpy ``Generator`` or ``RandomState``.

    Returns:
        ``points_vox`` float32 ``(n_pos + n_neg) x 3`` and ``labels`` int64 ``n_pos + n_neg``
        (1 positive, 0 negative, -1 padding where a kind of click could not be drawn).
    """
    mask = np.asarray(tumour_mask, dtype=bool)
    pos = _draw(mask, n_pos, rng)
    outside = ~mask
    if neg_margin_vox is not None and pos.shape[0] > 0:
        near = np.zeros_like(mask)
        idx = np.argwhere(mask)
        lo = np.maximum(idx.min(0) - neg_margin_vox, 0)
        hi = np.minimum(idx.max(0) + neg_margin_vox + 1, mask.shape)
        near[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
        if np.any(near & outside):
            outside = near & outside
    neg = _draw(outside, n_neg, rng)
    n = n_pos + n_neg
    points = np.zeros((n, 3), dtype=np.float32)
    labels = np.full((n,), -1, dtype=np.int64)
    points[: pos.shape[0]] = pos
    labels[: pos.shape[0]] = 1
    points[pos.shape[0] : pos.shape[0] + neg.shape[0]] = neg
    labels[pos.shape[0] : pos.shape[0] + neg.shape[0]] = 0
    return points, labels


class _ClicksBase(MapTransform):
    def __init__(
        self,
        keys: KeysCollection = "label",
        n_pos: int = 1,
        n_neg: int = 0,
        tumour_label: int = 1,
        neg_margin_vox: int | None = None,
        points_key: str = "points",
        labels_key: str = "point_labels",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError("click simulation reads exactly one label key")
        self.n_pos, self.n_neg = int(n_pos), int(n_neg)
        self.tumour_label = int(tumour_label)
        self.neg_margin_vox = neg_margin_vox
        self.points_key, self.labels_key = points_key, labels_key

    def _add_clicks(self, data: Mapping[Hashable, Any], rng: Generator) -> dict[Hashable, Any]:
        d = dict(data)
        mask = _as_mask(d[self.keys[0]], self.tumour_label)
        points, labels = sample_clicks(mask, self.n_pos, self.n_neg, rng, self.neg_margin_vox)
        d[self.points_key] = torch.from_numpy(points)
        d[self.labels_key] = torch.from_numpy(labels)
        return d


class SimulateClicksd(_ClicksBase):
    """Deterministic clicks, seeded per case: ``points`` N x 3 and ``point_labels`` N.

    The case name is the label's file name (``MetaTensor.meta["filename_or_obj"]``) or,
    if ``case_key`` is given, ``data[case_key]``. Default: one positive click, the
    reference's single-click evaluation.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        n_pos: int = 1,
        n_neg: int = 0,
        seed: int = 0,
        tumour_label: int = 1,
        neg_margin_vox: int | None = None,
        case_key: str | None = None,
        points_key: str = "points",
        labels_key: str = "point_labels",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(
            keys, n_pos, n_neg, tumour_label, neg_margin_vox, points_key, labels_key,
            allow_missing_keys,
        )  # fmt: skip
        self.seed = int(seed)
        self.case_key = case_key

    def case_id(self, data: Mapping[Hashable, Any]) -> str:
        if self.case_key is not None:
            return str(data[self.case_key])
        label = data[self.keys[0]]
        name = label.meta.get("filename_or_obj") if isinstance(label, MetaTensor) else None
        if not name:
            raise Sam3DError(
                "SimulateClicksd needs the case name: load the label with LoadImaged "
                "(file name in its metadata) or pass case_key."
            )
        return str(name).replace("\\", "/").rsplit("/", 1)[-1]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        rng = np.random.default_rng(case_seed(self.seed, self.case_id(data)))
        return self._add_clicks(data, rng)


class RandSimulateClicksd(Randomizable, _ClicksBase):
    """Random training clicks (reference: 10 tumour + 20 other points) from MONAI's seeded ``R``.

    With ``vary_count`` each sample gets 1..``n_pos`` positives and 0..``n_neg`` negatives
    (uniform counts), padded with -1 to ``n_pos + n_neg`` so batches still collate.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        n_pos: int = 10,
        n_neg: int = 20,
        tumour_label: int = 1,
        neg_margin_vox: int | None = None,
        points_key: str = "points",
        labels_key: str = "point_labels",
        allow_missing_keys: bool = False,
        vary_count: bool = False,
    ) -> None:
        _ClicksBase.__init__(
            self, keys, n_pos, n_neg, tumour_label, neg_margin_vox, points_key, labels_key,
            allow_missing_keys,
        )  # fmt: skip
        self.vary_count = bool(vary_count)

    def randomize(self, data: Any = None) -> None:  # the draw itself uses self.R
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        if not self.vary_count:
            return self._add_clicks(data, self.R)
        # Departure from the reference (always 10 + 20): 1..n_pos positives and 0..n_neg
        # negatives per sample, so the single click of inference is seen in training too.
        d = dict(data)
        mask = _as_mask(d[self.keys[0]], self.tumour_label)
        k_pos = int(self.R.randint(1, self.n_pos + 1))
        k_neg = int(self.R.randint(0, self.n_neg + 1))
        points, labels = sample_clicks(mask, k_pos, k_neg, self.R, self.neg_margin_vox)
        n = self.n_pos + self.n_neg
        d[self.points_key] = torch.zeros(n, 3, dtype=torch.float32)
        d[self.labels_key] = torch.full((n,), -1, dtype=torch.int64)
        d[self.points_key][: len(points)] = torch.from_numpy(points)
        d[self.labels_key][: len(labels)] = torch.from_numpy(labels)
        return d


# --------------------------------------------------------------------------- structures


def interior_point(mask: np.ndarray, spacing: Any = None) -> np.ndarray | None:
    """The index of the point of ``mask`` farthest from its boundary, or None if empty.

    Euclidean distance transform of the mask padded with background (the image border
    counts as boundary), in units of ``spacing`` (per axis) when given; ties go to the
    first point in C order, so the click is deterministic. ``mask``: bool ``spatial``;
    returns int64 ``d``.
    """
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return None
    dist = ndimage.distance_transform_edt(np.pad(m, 1), sampling=spacing)
    dist = dist[tuple(slice(1, -1) for _ in m.shape)]
    return np.asarray(np.unravel_index(int(np.argmax(dist)), m.shape), dtype=np.int64)


def error_region_click(
    gt: np.ndarray, pred: np.ndarray, first: Sequence[float]
) -> tuple[np.ndarray, int] | None:
    """Second click: the point of the error region farthest from the first click.

    The error region is ``gt xor pred``; the click is positive (1) where the prediction
    missed the structure and negative (0) where it leaked outside it. Ties go to the
    first point in C order. None when the prediction is exact. Returns (int64 ``d``, label).
    """
    g, p = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    if g.shape != p.shape:
        raise ValueError(f"gt and pred shapes differ: {g.shape} vs {p.shape}")
    idx = np.argwhere(g ^ p)
    if idx.size == 0:
        return None
    d2 = ((idx - np.asarray(first, dtype=np.float64)[None]) ** 2).sum(1)
    point = idx[int(np.argmax(d2))].astype(np.int64)
    return point, int(g[tuple(point)])


def deepest_error_click(
    gt: np.ndarray, pred: np.ndarray, spacing: Any = None
) -> tuple[np.ndarray, int] | None:
    """The simulated user's next click: the deepest voxel of the largest error region, the
    one rule of interactive training (:mod:`sam3d.engine.interactive`) and of evaluation by
    clicks (:mod:`sam3d.inference.interactive`).

    The misses (``gt`` and not ``pred``) and the leaks (``pred`` and not ``gt``) are split
    into 26-connected components, each kind apart (a click in a region holding both would
    be ambiguous); the largest by voxels (ties: misses first, then the first component) is
    the region a user would correct, and the click goes to its point farthest from the
    component's boundary (:func:`interior_point`: the image border counts as boundary,
    ``spacing`` per axis when given, ties to the first point in C order). Positive (1) in a
    miss, negative (0) in a leak. None when the prediction is exact. ``gt``, ``pred``: bool
    ``spatial`` of the same shape; returns (int64 ``d``, label).
    """
    g, p = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    if g.shape != p.shape:
        raise ValueError(f"gt and pred shapes differ: {g.shape} vs {p.shape}")
    structure = np.ones((3,) * g.ndim, dtype=bool)
    best: tuple[int, np.ndarray, int] | None = None
    for region, label in ((g & ~p, 1), (p & ~g, 0)):
        if not region.any():
            continue
        components, _ = ndimage.label(region, structure=structure)
        sizes = np.bincount(components.ravel())[1:]
        k = int(np.argmax(sizes))
        if best is None or sizes[k] > best[0]:
            best = (int(sizes[k]), components == k + 1, label)
    if best is None:
        return None
    return interior_point(best[1], spacing), best[2]


def _structure_channels(label: Any) -> np.ndarray:
    arr = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    if arr.ndim < 3:
        raise ValueError(
            f"expected a label K x spatial (one channel per structure), got {arr.shape}"
        )
    return arr > 0


class StructureClicksd(MapTransform):
    """Deterministic clicks, one prompt per structure: the interior point of each channel.

    ``data[key]``: ``K x spatial`` masks (channel k = structure k + 1). Adds
    ``points`` float32 ``K x N x d`` and ``point_labels`` int64 ``K x N`` (N = 1, or 2
    with ``pred_key``: the second click from :func:`error_region_click` on the
    prediction ``data[pred_key]`` (``K x spatial``), -1 padding where the prediction is
    exact). An empty channel gets only padding.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        pred_key: str | None = None,
        points_key: str = "points",
        labels_key: str = "point_labels",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError("click simulation reads exactly one label key")
        self.pred_key, self.points_key, self.labels_key = pred_key, points_key, labels_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.keys[0] not in d and self.allow_missing_keys:
            return d  # clicks given with the case (inference)
        masks = _structure_channels(d[self.keys[0]])
        preds = None if self.pred_key is None else _structure_channels(d[self.pred_key])
        k, dims, n = masks.shape[0], masks.ndim - 1, 1 if preds is None else 2
        points = np.zeros((k, n, dims), dtype=np.float32)
        labels = np.full((k, n), -1, dtype=np.int64)
        for c in range(k):
            first = interior_point(masks[c])
            if first is None:
                continue
            points[c, 0], labels[c, 0] = first, 1
            if preds is not None:
                second = error_region_click(masks[c], preds[c], first)
                if second is not None:
                    points[c, 1], labels[c, 1] = second
        d[self.points_key] = torch.from_numpy(points)
        d[self.labels_key] = torch.from_numpy(labels)
        return d


class RandStructureClicksd(Randomizable, MapTransform):
    """Training clicks: one random positive per structure (the seed's recipe).

    Uniform over each channel's pixels, from MONAI's seeded ``R``; outputs as
    :class:`StructureClicksd` with N = 1. For a structure absent from the image,
    ``absent="pad"`` (default) gives a -1 padding click; ``"background"`` a negative click
    (label 0) uniform over the pixels outside it, as SAMUS's ``random_click``.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        points_key: str = "points",
        labels_key: str = "point_labels",
        allow_missing_keys: bool = False,
        absent: str = "pad",
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError("click simulation reads exactly one label key")
        if absent not in ("pad", "background"):
            raise ValueError(f"absent must be 'pad' or 'background', got {absent!r}")
        self.points_key, self.labels_key, self.absent = points_key, labels_key, absent

    def randomize(self, data: Any = None) -> None:  # the draw itself uses self.R
        pass

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        masks = _structure_channels(d[self.keys[0]])
        k, dims = masks.shape[0], masks.ndim - 1
        points = np.zeros((k, 1, dims), dtype=np.float32)
        labels = np.full((k, 1), -1, dtype=np.int64)
        for c in range(k):
            drawn = _draw(masks[c], 1, self.R)
            if len(drawn):
                points[c, 0], labels[c, 0] = drawn[0], 1
            elif self.absent == "background":
                points[c, 0], labels[c, 0] = _draw(~masks[c].astype(bool), 1, self.R)[0], 0
        d[self.points_key] = torch.from_numpy(points)
        d[self.labels_key] = torch.from_numpy(labels)
        return d


def clicked_lesion(mask: np.ndarray, points_vox: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The lesions under the positive clicks: connected components of ``mask`` (bool
    ``H x W x D``, 26-connected) that hold a positive click (``points_vox`` N x 3, voxel
    coordinates, rounded half up; ``labels`` N, 1 positive)."""
    mask = np.asarray(mask, dtype=bool)
    components, _ = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    pts = np.asarray(points_vox, dtype=np.float64).reshape(-1, 3)[np.asarray(labels) == 1]
    idx = np.floor(pts + 0.5).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.asarray(mask.shape)), axis=1)
    ids = {int(components[tuple(i)]) for i in idx[inside]} - {0}
    return np.isin(components, sorted(ids)) if ids else np.zeros_like(mask)


def clicked_instance(
    instances: np.ndarray, points_vox: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """The objects under the positive clicks, by instance id: bool mask of the voxels of
    ``instances`` (int ``H x W x D``, 0 none) whose id is under a positive click
    (``points_vox`` N x 3 rounded half up, ``labels`` N). Unlike :func:`clicked_lesion`,
    two touching lesions stay two objects."""
    inst = np.asarray(instances)
    pts = np.asarray(points_vox, dtype=np.float64).reshape(-1, 3)[np.asarray(labels) == 1]
    idx = np.floor(pts + 0.5).astype(np.int64)
    inside = np.all((idx >= 0) & (idx < np.asarray(inst.shape)), axis=1)
    ids = {int(inst[tuple(i)]) for i in idx[inside]} - {0}
    return np.isin(inst, sorted(ids)) if ids else np.zeros(inst.shape, dtype=bool)


class ClickedLesiond(MapTransform):
    """Keep, in a binary label ``1 x H x W x D``, only the lesion(s) under the positive clicks.

    What one click can do is segment the lesion it was put on: validation scores that
    component (:func:`clicked_lesion`) rather than every lesion of the volume. With
    ``all_key`` the whole label is kept there too (e.g. ``"label_all"``). Place it after
    the clicks are drawn (``SimulateClicksd``). With ``instance_key`` (an instance map
    ``1 x H x W x D`` on the same grid, e.g. the ``synth`` phantoms' ``instance``) the
    clicked object is its instance (:func:`clicked_instance`), so a lesion touching
    another is scored alone.
    """

    def __init__(
        self,
        keys: KeysCollection = "label",
        points_key: str = "points",
        labels_key: str = "point_labels",
        all_key: str | None = None,
        allow_missing_keys: bool = False,
        instance_key: str | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.points_key, self.labels_key, self.all_key = points_key, labels_key, all_key
        self.instance_key = instance_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        pts = np.asarray(torch.as_tensor(d[self.points_key]).cpu(), dtype=np.float64)
        labs = np.asarray(torch.as_tensor(d[self.labels_key]).cpu())
        for key in self.key_iterator(d):
            label = d[key]
            if self.all_key is not None:
                d[self.all_key] = label.clone() if isinstance(label, torch.Tensor) else label
            arr = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else label
            if self.instance_key is not None:
                inst = d[self.instance_key]
                inst = inst.detach().cpu().numpy() if isinstance(inst, torch.Tensor) else inst
                keep = (clicked_instance(np.asarray(inst)[0], pts, labs) & (arr[0] > 0))[None]
            else:
                keep = clicked_lesion(np.asarray(arr)[0] > 0, pts, labs)[None]
            if isinstance(label, torch.Tensor):
                d[key] = label * torch.as_tensor(keep, device=label.device).to(label.dtype)
            else:
                d[key] = np.asarray(label) * keep.astype(np.asarray(label).dtype)
        return d
