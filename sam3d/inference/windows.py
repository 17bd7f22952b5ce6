"""Windows of the resampled grid: placement, cached encoding, growth and Gaussian stitching.

All coordinates here are voxel coordinates of the resampled (RAS, 1 mm) grid, in the
index order of the volume tensor ``C x H x W x D``. A window is named by its origin
(the grid voxel of its first corner); windows may reach past the volume where the
volume is smaller than the window, and that part is filled with the volume's minimum.

The prompted model sees one window at a time. :class:`WindowPredictor` keeps the
encoder features of every window it has encoded (keyed by origin), so a further
click only runs the prompt encoder and decoder. Where the predicted lesion touches
a window face that is not the volume's border, the neighbouring window along that
axis is added, prompted with the user's clicks inside it plus one point propagated
from the lesion already found in the overlap; windows are blended with Gaussian
weights (:func:`monai.data.utils.compute_importance_map`).
"""

from __future__ import annotations

import inspect
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map

Origin = tuple[int, int, int]


@dataclass(frozen=True)
class WindowGrowth:
    """How far a prediction may grow beyond its first window.

    Args:
        enabled: add neighbouring windows while the lesion touches a window border.
        max_extent_mm: the windows grown from one seed window never span more than this
            many mm along any axis (voxel spans times the grid spacing of the
            :class:`WindowPredictor`).
        max_windows: hard limit on the number of windows decoded for one prediction.
        overlap: fraction of a window shared with its neighbour (0.5: stride of half
            a window).
        threshold: probability above which a voxel counts as lesion.
    """

    enabled: bool = True
    max_extent_mm: float = 384.0
    max_windows: int = 27
    overlap: float = 0.5
    threshold: float = 0.5


def roi_tuple(roi: int | Sequence[int]) -> tuple[int, int, int]:
    """A window size as three ints."""
    if isinstance(roi, int):
        return (roi, roi, roi)
    t = tuple(int(r) for r in roi)
    if len(t) != 3:
        raise ValueError(f"a window size needs 3 values, got {t}")
    return t  # type: ignore[return-value]


def clamp_origin(origin: Sequence[float], roi: Sequence[int], shape: Sequence[int]) -> Origin:
    """Round (half up) and clamp a window origin so the window lies inside the volume.

    Along an axis where the volume is not larger than the window, the window is centred
    on the volume instead (its origin is then negative or 0: the volume sits in the middle
    of the window, padded on both sides, as training's ``SpatialPadd`` pads it).
    """
    out = []
    for o, r, s in zip(origin, roi, shape):
        if s <= r:
            out.append(-((r - s) // 2))
        else:
            out.append(int(min(max(math.floor(float(o) + 0.5), 0), s - r)))
    return tuple(out)  # type: ignore[return-value]


def centred_origin(center_vox: Sequence[float], roi: Sequence[int], shape: Sequence[int]) -> Origin:
    """Origin of the ``roi`` window centred on a click ``center_vox`` (grid voxels, float).

    The one window-placement rule of the project (validation, ``sam3d segment``, the
    session and the inference bundle all come here): the voxel holding the click,
    ``floor(c + 0.5)`` (half-voxel clicks round up, never to even), sits at index
    ``r // 2`` of the window; the window is then shifted inside the volume, or centred on
    a volume thinner than it (:func:`clamp_origin`).
    """
    return clamp_origin(
        [math.floor(float(c) + 0.5) - r // 2 for c, r in zip(center_vox, roi)], roi, shape
    )


def inside(points_vox: torch.Tensor, origin: Origin, roi: Sequence[int], margin: float = 0.0):
    """Which of ``points_vox`` (N x 3, grid voxels) lie in the window, ``margin`` voxels in."""
    o = torch.as_tensor(origin, dtype=points_vox.dtype, device=points_vox.device)
    r = torch.as_tensor(roi, dtype=points_vox.dtype, device=points_vox.device)
    return ((points_vox >= o + margin - 0.5) & (points_vox <= o + r - 1 - margin + 0.5)).all(-1)


def extract_window(volume: torch.Tensor, origin: Origin, roi: Sequence[int]) -> torch.Tensor:
    """The window ``C x r0 x r1 x r2`` of ``volume`` (``C x H x W x D``) at ``origin``.

    Parts outside the volume are filled with the volume's minimum (air after windowing).
    """
    shape = volume.shape[1:]
    lo = [max(o, 0) for o in origin]
    hi = [min(o + r, s) for o, r, s in zip(origin, roi, shape)]
    crop = volume[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    pad = []
    for o, r, s in reversed(list(zip(origin, roi, shape))):
        pad += [max(0, -o), max(0, o + r - s)]
    if any(pad):
        crop = F.pad(crop, pad, value=float(volume.min()))
    return crop


def select_seed_windows(
    points_pos: torch.Tensor,
    roi: Sequence[int],
    shape: Sequence[int],
    seeds: Sequence[Origin] = (),
    centre_on_all: bool = False,
) -> list[Origin]:
    """Windows that hold the positive clicks ``points_pos`` (N x 3, grid voxels), in click order.

    Existing ``seeds`` are kept; a click that is not at least an eighth of a window
    inside one of them gets a new window centred on it. With ``centre_on_all`` and no
    seeds yet, the first window is centred on the mean of all clicks when they all fit
    in it (the one-shot command), otherwise on the first click (interactive use, where
    later clicks must not move a window whose features are cached).
    """
    seeds = list(seeds)
    if len(points_pos) == 0:
        return seeds
    margin = min(roi) / 8
    if not seeds and centre_on_all and len(points_pos) > 1:
        o = centred_origin(points_pos.float().mean(0).tolist(), roi, shape)
        if bool(inside(points_pos.float(), o, roi, margin).all()):
            seeds.append(o)
    for p in points_pos.float():
        if not any(bool(inside(p[None], s, roi, margin)[0]) for s in seeds):
            seeds.append(centred_origin(p.tolist(), roi, shape))
    return seeds


def _face(t: torch.Tensor, axis: int, index: int) -> torch.Tensor:
    return t.select(axis, index)


def _propagated_point(
    prob: torch.Tensor, origin: Origin, new_origin: Origin, roi: Sequence[int], threshold: float
) -> list[float] | None:
    """A lesion voxel of ``prob`` (window at ``origin``) inside the window at ``new_origin``.

    The voxel of the overlap's lesion nearest to that lesion's centroid, as grid voxel
    coordinates; ``None`` if the overlap holds no lesion.
    """
    sl = []
    for o, n, r in zip(origin, new_origin, roi):
        a, b = max(o, n), min(o + r, n + r)
        sl.append(slice(a - o, b - o))
    fg = torch.nonzero(prob[sl[0], sl[1], sl[2]] > threshold).float()
    if len(fg) == 0:
        return None
    c = fg.mean(0)
    best = fg[torch.argmin(((fg - c) ** 2).sum(-1))]
    return [float(best[i]) + sl[i].start + origin[i] for i in range(3)]


@dataclass(frozen=True)
class PreviousPrediction:
    """A stitched probability kept by its box only: ``values`` (``h x w x d``, any float
    dtype) at grid voxel ``lo``; zero everywhere else. What a click state keeps for the
    next click's mask prompt, instead of a whole grid."""

    lo: tuple[int, int, int]
    values: torch.Tensor

    @classmethod
    def of(cls, grid: torch.Tensor, lo: Sequence[int], hi: Sequence[int]) -> PreviousPrediction:
        """The box ``[lo, hi)`` of ``grid`` (``H x W x D``), in half precision (a copy)."""
        box = grid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        return cls(tuple(int(v) for v in lo), box.to(torch.float16, copy=True))


def previous_window(
    previous: torch.Tensor | PreviousPrediction, origin: Origin, roi: Sequence[int]
) -> torch.Tensor:
    """The window ``roi`` at ``origin`` of a previous prediction (0 outside it): ``1 x r0 x
    r1 x r2`` float32."""
    if isinstance(previous, torch.Tensor):
        return extract_window(previous[None].float(), origin, roi)
    out = torch.zeros((1, *roi), dtype=torch.float32, device=previous.values.device)
    src, dst = [], []
    for a in range(3):
        a0 = max(origin[a], previous.lo[a])
        a1 = min(origin[a] + roi[a], previous.lo[a] + previous.values.shape[a])
        if a1 <= a0:
            return out
        src.append(slice(a0 - previous.lo[a], a1 - previous.lo[a]))
        dst.append(slice(a0 - origin[a], a1 - origin[a]))
    out[0, dst[0], dst[1], dst[2]] = previous.values[src[0], src[1], src[2]].float()
    return out


class WindowPredictor:
    """Run a promptable model over windows of one preprocessed volume.

    Args:
        model: has ``encode(images B x 1 x H x W x D) -> features`` and
            ``decode(features, points B x N x 3, point_labels B x N) -> logits B x 2 x H x W x D``.
        volume: the preprocessed volume ``1 x H x W x D`` (resampled grid), on ``device``.
        roi: window size in grid voxels (the model's crop size).
        growth: window growth settings.
        amp: run the model in bfloat16 autocast (CUDA only).
        spacing_mm: grid spacing (one value or one per axis), for ``growth.max_extent_mm``;
            default 1 mm.

    ``encode_calls`` counts encoder runs; ``cache`` maps window origins to features.
    ``blended`` is the persistent stitched map ``H x W x D`` kept by :meth:`blend` (allocated
    on its first call), so that a further click rewrites only its windows' boxes.
    """

    def __init__(
        self,
        model: Any,
        volume: torch.Tensor,
        roi: int | Sequence[int],
        growth: WindowGrowth | None = None,
        amp: bool = True,
        spacing_mm: float | Sequence[float] = 1.0,
    ) -> None:
        self.model = model
        sp = [float(spacing_mm)] * 3 if isinstance(spacing_mm, (int, float)) else list(spacing_mm)
        if len(sp) != 3 or not all(v > 0 for v in sp):
            raise ValueError(f"spacing_mm needs one or 3 positive values, got {spacing_mm!r}")
        self.spacing_mm = tuple(float(v) for v in sp)
        self.volume = volume
        self.roi = roi_tuple(roi)
        self.growth = growth or WindowGrowth()
        self.device = volume.device
        self.amp = amp and self.device.type == "cuda"
        self.cache: dict[Origin, Any] = {}
        self.encode_calls = 0
        self.importance = compute_importance_map(
            self.roi, mode="gaussian", sigma_scale=0.125, device=self.device
        )
        self.blended: torch.Tensor | None = None
        self._blended_probs: dict[Origin, torch.Tensor] = {}
        # the last prompts and probability of every decoded window: a window whose prompts
        # did not change is not decoded again (a click costs the windows it changes)
        self.decoded: dict[Origin, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.volume.shape[1:])  # type: ignore[return-value]

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp)

    def features(self, origin: Origin) -> Any:
        """Encoder features of the window at ``origin``, encoded once and cached."""
        if origin not in self.cache:
            crop = extract_window(self.volume, origin, self.roi)[None]
            with torch.inference_mode(), self._autocast():
                self.cache[origin] = self.model.encode(crop)
            self.encode_calls += 1
        return self.cache[origin]

    @property
    def takes_mask_prompt(self) -> bool:
        """Whether the model takes the previous prediction (``decode(..., mask_prompt=)``):
        a Sam3D built with its mask prompt, or a model whose ``decode`` names one."""
        if hasattr(self.model, "mask_prompt"):
            return self.model.mask_prompt is not None and self.model.mask_prompt is not False
        try:
            return "mask_prompt" in inspect.signature(self.model.decode).parameters
        except (TypeError, ValueError, AttributeError):
            return False

    def decode(
        self,
        origin: Origin,
        points_vox: torch.Tensor,
        labels: torch.Tensor,
        previous: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tumour probability ``r0 x r1 x r2`` of one window for grid-voxel clicks (N x 3, N).

        ``previous``: the last prediction, a probability ``H x W x D`` on the whole grid or
        a :class:`PreviousPrediction` (its box only);
        its window goes to the model as the mask prompt when it takes one.
        """
        feats = self.features(origin)
        o = torch.as_tensor(origin, dtype=torch.float32, device=self.device)
        local = (points_vox.to(self.device, torch.float32) - o)[None]
        lab = labels.to(self.device, torch.long)[None]
        if local.shape[1] == 0:  # the model needs at least one (padding) prompt
            local = torch.zeros(1, 1, 3, device=self.device)
            lab = torch.full((1, 1), -1, dtype=torch.long, device=self.device)
        kwargs = {}
        if previous is not None and self.takes_mask_prompt:
            window = previous_window(previous, origin, self.roi).to(self.device, torch.float32)
            kwargs["mask_prompt"] = window[None]
        with torch.inference_mode(), self._autocast():
            logits = self.model.decode(feats, local, lab, **kwargs)
        return torch.softmax(logits.float(), dim=1)[0, 1]

    def predict_windows(
        self,
        points_vox: torch.Tensor,
        labels: torch.Tensor,
        seeds: Sequence[Origin],
        previous: torch.Tensor | None = None,
    ) -> dict[Origin, torch.Tensor]:
        """Decode the seed windows, then grow while the lesion touches a window border.

        Args:
            points_vox: clicks ``N x 3`` in grid voxels.
            labels: ``N`` (1 positive, 0 negative, -1 ignored).
            seeds: origins of the first windows (see :func:`select_seed_windows`).
            previous: the previous stitched probability ``H x W x D`` (the mask prompt of
                models that take one; None for a first click).

        Returns:
            window origin -> tumour probability ``r0 x r1 x r2``, in decoding order.
        """
        g, roi, shape = self.growth, self.roi, self.shape
        points_vox = points_vox.float().cpu()
        labels = labels.long().cpu()
        stride = [max(1, round(r * (1 - g.overlap))) for r in roi]
        # each seed grows its own group of windows; the extent limit applies per group
        queue: deque[tuple[Origin, list[list[float]], Origin]] = deque((s, [], s) for s in seeds)
        planned = set(seeds)
        groups: dict[Origin, list[Origin]] = {s: [s] for s in seeds}
        probs: dict[Origin, torch.Tensor] = {}
        while queue:
            origin, extra, root = queue.popleft()
            keep = inside(points_vox, origin, roi) & (labels >= 0)
            pts, lab = points_vox[keep], labels[keep]
            if extra:
                pts = torch.cat([pts, torch.tensor(extra, dtype=torch.float32)])
                lab = torch.cat([lab, torch.ones(len(extra), dtype=torch.long)])
            last = self.decoded.get(origin)
            # a mask-prompted decode depends on the previous prediction too: never reused
            prompted = previous is not None and self.takes_mask_prompt
            if (
                not prompted
                and last is not None
                and torch.equal(last[0], pts)
                and torch.equal(last[1], lab)
            ):
                prob = last[2]
            else:
                prob = self.decode(origin, pts, lab, previous)
                if prompted:
                    self.decoded.pop(origin, None)
                else:
                    self.decoded[origin] = (pts, lab, prob)
            probs[origin] = prob
            if not g.enabled:
                continue
            for axis in range(3):
                for side, step in ((0, -1), (roi[axis] - 1, 1)):
                    if not bool((_face(prob, axis, side) > g.threshold).any()):
                        continue
                    new = list(origin)
                    new[axis] += step * stride[axis]
                    new_origin = clamp_origin(new, roi, shape)
                    if new_origin == origin or new_origin in planned:
                        continue
                    if len(planned) >= g.max_windows:
                        continue
                    group = (*groups[root], new_origin)
                    span_mm = [
                        (max(o[a] + roi[a] for o in group) - min(o[a] for o in group))
                        * self.spacing_mm[a]
                        for a in range(3)
                    ]
                    if max(span_mm) > g.max_extent_mm:
                        continue
                    point = _propagated_point(prob, origin, new_origin, roi, g.threshold)
                    if point is None:
                        continue
                    planned.add(new_origin)
                    groups[root].append(new_origin)
                    queue.append((new_origin, [point], root))
        return probs

    def _box(self, origin: Origin) -> tuple[list[int], list[int]]:
        """The part of the window at ``origin`` inside the grid, as half-open ``lo, hi``."""
        shape = self.shape
        lo = [max(0, origin[a]) for a in range(3)]
        hi = [min(shape[a], origin[a] + self.roi[a]) for a in range(3)]
        return lo, hi

    def _blend_box(
        self, probs: dict[Origin, torch.Tensor], lo: Sequence[int], hi: Sequence[int]
    ) -> torch.Tensor:
        """The blended map on the grid box ``lo:hi`` (``num / den`` of every window meeting it).

        Windows are summed in the order of their origins, so every voxel sees the same
        floating point operations in the same order whatever box it is computed in and
        whatever order the windows were decoded in: :meth:`stitch` and :meth:`blend` agree
        exactly.
        """
        size = [h - lq for h, lq in zip(hi, lo)]
        num = torch.zeros(size, dtype=torch.float32, device=self.device)
        den = torch.zeros(size, dtype=torch.float32, device=self.device)
        for origin in sorted(probs):
            prob = probs[origin]
            dst, src = [], []
            for a in range(3):
                a0, a1 = max(origin[a], lo[a]), min(origin[a] + self.roi[a], hi[a])
                if a1 <= a0:
                    break
                dst.append(slice(a0 - lo[a], a1 - lo[a]))
                src.append(slice(a0 - origin[a], a1 - origin[a]))
            else:
                w = self.importance[src[0], src[1], src[2]]
                num[dst[0], dst[1], dst[2]] += w * prob[src[0], src[1], src[2]]
                den[dst[0], dst[1], dst[2]] += w
        return num / den.clamp_min(1e-12)

    def windows_box(self, origins: Sequence[Origin]) -> tuple[list[int], list[int]]:
        """Bounding box (grid voxels, half-open, clipped to the grid) of the windows ``origins``.

        ``([0, 0, 0], [0, 0, 0])`` for no window.
        """
        if not origins:
            return [0, 0, 0], [0, 0, 0]
        shape = self.shape
        lo = [max(0, min(o[a] for o in origins)) for a in range(3)]
        hi = [min(shape[a], max(o[a] + self.roi[a] for o in origins)) for a in range(3)]
        return lo, hi

    def stitch(self, probs: dict[Origin, torch.Tensor]) -> torch.Tensor:
        """Blend window probabilities into a new whole grid ``H x W x D`` with Gaussian weights.

        Voxels that no window covers are 0. This allocates and fills the whole grid: the
        one-shot path; an open session uses :meth:`blend`, which equals it exactly.
        """
        out = torch.zeros(self.shape, dtype=torch.float32, device=self.device)
        if not probs:
            return out
        lo, hi = self.windows_box(list(probs))
        out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = self._blend_box(probs, lo, hi)
        return out

    def blend(self, probs: dict[Origin, torch.Tensor]) -> tuple[torch.Tensor, set[Origin]]:
        """Make the persistent map :attr:`blended` the stitch of ``probs``, touching only windows.

        Only the boxes of the windows that changed since the last call (added, removed, or
        with a new probability tensor) are rewritten, each from every window of ``probs``
        that meets it, so the cost follows the changed windows, not the grid nor the other
        windows; the result equals :meth:`stitch` of ``probs`` exactly. The map is updated
        in place: a caller that keeps an earlier state must clone it.

        Returns:
            ``(blended, changed)``: the map ``H x W x D`` (0 outside the windows) and the
            origins of the windows whose boxes were rewritten.
        """
        if self.blended is None:
            self.blended = torch.zeros(self.shape, dtype=torch.float32, device=self.device)
        old = self._blended_probs
        changed = {o for o in old if o not in probs}
        changed |= {o for o, p in probs.items() if old.get(o) is not p}
        for origin in sorted(changed):
            lo, hi = self._box(origin)
            if any(h <= lq for h, lq in zip(hi, lo)):
                continue
            box = self._blend_box(probs, lo, hi)
            self.blended[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = box
        self._blended_probs = dict(probs)
        return self.blended, changed

    def clusters(self, origins: Sequence[Origin], gap: int = 3) -> list[list[Origin]]:
        """Group windows whose grid boxes come closer than ``gap`` voxels (transitively).

        Two groups' maps are then at least ``gap`` voxels apart, so no linear interpolation
        stencil of the inversion (plus its one voxel of zeros) reaches both: each group's
        box can be inverted on its own.
        """
        groups: list[tuple[list[Origin], list[int], list[int]]] = []
        for o in sorted(origins):
            members, (lo, hi) = [o], self._box(o)
            merged = True
            while merged:
                merged = False
                for g in groups:
                    if all(lo[a] < g[2][a] + gap and g[1][a] < hi[a] + gap for a in range(3)):
                        groups.remove(g)
                        members += g[0]
                        lo = [min(lo[a], g[1][a]) for a in range(3)]
                        hi = [max(hi[a], g[2][a]) for a in range(3)]
                        merged = True
                        break
            groups.append((members, lo, hi))
        return [sorted(g[0]) for g in groups]

    def predict(
        self,
        points_vox: torch.Tensor,
        labels: torch.Tensor,
        seeds: Sequence[Origin],
        previous: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Stitched tumour probability ``H x W x D`` of the whole grid for these clicks."""
        return self.stitch(self.predict_windows(points_vox, labels, seeds, previous))
