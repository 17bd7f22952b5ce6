"""Interactive click segmentation of one volume: open once, click many times.

>>> session = ClickSession(model, "case.nii.gz", dataset="kits")
>>> mask = session.click((120, 88, 40))                  # positive click, original voxels
>>> mask = session.click((131, 90, 42), positive=False)  # a negative click removes a region
>>> session.undo()
>>> session.save("case_seg.nii.gz")

The image is preprocessed once (RAS, 1 mm, window, z-score); encoder features are
cached per window, so every click after the first runs only the prompt encoder and
the decoder. Masks come back on the original voxel grid.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from sam3d.data.geometry import spacing_from_affine
from sam3d.errors import Sam3DError
from sam3d.inference.grid import (
    LoadVolumed,
    check_points_inside,
    grid_spacing_mm,
    invert_region_to_original,
    invert_to_original,
    original_to_grid,
    preprocessing,
    save_mask,
    world_to_original,
)
from sam3d.inference.windows import (
    Origin,
    PreviousPrediction,
    WindowGrowth,
    WindowPredictor,
    select_seed_windows,
)

# Resident memory of an open session (measured in docs/BENCHMARKS.md, "Memory of a session"):
# per voxel of the original image, the image (float32) and the mask (bool);
BYTES_PER_ORIGINAL_VOXEL = 4 + 1
# per voxel of the model's grid, the preprocessed volume and the stitched map (float32 each);
BYTES_PER_GRID_VOXEL = 4 + 4
# per cached window: its encoder features plus its last probability (float32, roi voxels),
# see window_bytes.


def tensor_nbytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (nested dicts, lists, tuples, dataclasses), each once."""
    seen: set[int] = set()

    def walk(o: Any) -> int:
        if isinstance(o, torch.Tensor):
            key = id(o)
            if key in seen:
                return 0
            seen.add(key)
            return o.numel() * o.element_size()
        if isinstance(o, Mapping):
            return sum(walk(v) for v in o.values())
        if isinstance(o, (list, tuple)):
            return sum(walk(v) for v in o)
        if dataclasses.is_dataclass(o):  # Sam3DFeatures
            return sum(walk(getattr(o, f.name)) for f in dataclasses.fields(o))
        return 0

    return walk(obj)


def window_bytes(model: Any, roi: int | Sequence[int] | None = None, device: Any = "cpu") -> int:
    """Resident bytes of one cached window of ``model``: encoder features + kept probability.

    Measured by encoding one blank window (once per model and window size: seconds for
    vit_b on a CPU); the features' size does not depend on the image.
    """
    from sam3d.inference.windows import roi_tuple

    r = roi_tuple(roi if roi is not None else model.crop_size)
    with torch.inference_mode():
        feats = model.encode(torch.zeros(1, 1, *r, device=device))
    return tensor_nbytes(feats) + 4 * int(np.prod(r))


def session_bytes_estimate(
    original_shape: Sequence[int],
    grid_shape: Sequence[int],
    n_windows: int,
    bytes_per_window: int,
) -> int:
    """Resident bytes of a :class:`ClickSession` with ``n_windows`` cached windows.

    ``BYTES_PER_ORIGINAL_VOXEL`` x original voxels + ``BYTES_PER_GRID_VOXEL`` x grid voxels
    + ``n_windows`` x :func:`window_bytes`; what a server's admission limit derives from
    (:meth:`ClickSession.resident_bytes` gives the measured value of an open session).
    """
    return (
        BYTES_PER_ORIGINAL_VOXEL * int(np.prod(original_shape))
        + BYTES_PER_GRID_VOXEL * int(np.prod(grid_shape))
        + int(n_windows) * int(bytes_per_window)
    )


def resolve_dataset(dataset: Mapping[str, Any] | str) -> dict[str, Any]:
    """A dataset preset as a dict (a name such as ``"kits"``, a JSON path, or a dict)."""
    from sam3d.data.pipelines import load_dataset_preset

    if not isinstance(dataset, Mapping | str | os.PathLike):
        raise Sam3DError(
            f"a dataset preset must be a name, a JSON path or a dict, got {type(dataset).__name__}"
        )
    preset = load_dataset_preset(dict(dataset) if isinstance(dataset, Mapping) else dataset)
    _check_intensity_fields(preset)
    return preset


def _check_intensity_fields(preset: Mapping[str, Any]) -> None:
    """Refuse a preset whose window / mean / SD / spacing are not usable numbers."""
    name = preset.get("name", "?")

    def numbers(value: Any, n: int | None) -> list[float] | None:
        vals = [value] if n is None else value
        if isinstance(vals, (str, bytes)) or not isinstance(vals, Sequence):
            return None
        try:
            out = [float(v) for v in vals]
        except (TypeError, ValueError):
            return None
        if (n is not None and len(out) != n) or not all(np.isfinite(out)):
            return None
        return out

    window = numbers(preset["window_hu"], 2)
    mean, std = numbers(preset["mean"], None), numbers(preset["std"], None)
    spacing = preset["spacing_mm"]
    spacing = numbers(spacing, None) if np.ndim(spacing) == 0 else numbers(spacing, 3)
    if (
        window is None
        or window[0] >= window[1]
        or mean is None
        or std is None
        or std[0] <= 0
        or spacing is None
        or min(spacing) <= 0
    ):
        raise Sam3DError(
            f"dataset preset {name!r} is malformed: window_hu must be [low, high] HU, mean a "
            "number, std and spacing_mm positive numbers"
        )


def load_model_for_inference(
    checkpoint: str | os.PathLike, device: str | torch.device | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A trained checkpoint of a volumetric kind (Sam3D, SAM-Med3D, the click-channel UNet
    baseline), or an official SAM-Med3D ``.pth`` -> (model in eval mode on ``device``, meta
    with ``dataset``); a planar one is refused in one line.

    An official SAM-Med3D file gets the ``sammed3d`` dataset preset (the reference's 1.5 mm
    grid and intensities) and the published preset.
    """
    from sam3d.models.checkpoint import load_trained
    from sam3d.models.registry import get_kind

    device = default_device(device)  # refuse an unavailable device before loading
    if not Path(checkpoint).is_file():
        raise Sam3DError(f"checkpoint not found: {checkpoint}")
    try:
        model, meta = load_trained(checkpoint, what="trained sam3d checkpoint")
    except Sam3DError as error:
        official = _official_sammed3d(checkpoint)
        if official is None:
            raise error from None
        model, meta = official
    if get_kind(meta.get("model", "sam3d")).wing != "volumetric":
        raise Sam3DError(
            f"{checkpoint} holds a {meta['model']} model, a 2D one: use sam3d segment-2d"
        )
    meta.pop("model", None)
    return model.to(device).eval(), dict(meta)


def _official_sammed3d(checkpoint: str | os.PathLike) -> tuple[torch.nn.Module, dict] | None:
    """An official SAM-Med3D checkpoint as (model, meta), or None when it is not one."""
    from sam3d.data.pipelines import load_dataset_preset
    from sam3d.models.volumetric.sammed3d.build import build_sammed3d
    from sam3d.models.volumetric.sammed3d.checkpoint import load_official, read_official

    try:
        state = read_official(checkpoint)
    except Sam3DError:
        return None
    model = build_sammed3d("vit_b_ori")
    model.load_report = load_official(model, state)
    meta = {"model": "sammed3d", "dataset": load_dataset_preset("sammed3d"), "source": "official"}
    return model, meta


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise Sam3DError(f"unknown device {str(device)!r} (use cpu, cuda or cuda:N)") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise Sam3DError("CUDA was asked for but no CUDA GPU is available; use --device cpu")
    return device


def check_automatic_mode(meta: Mapping[str, Any], checkpoint: Any) -> None:
    """Refuse automatic mode (no clicks) for a checkpoint not trained for it.

    A click model trained only on samples with clicks has never learnt what to do without
    one: automatic mode would mark arbitrary regions (measured: 12 % of a phantom as
    box-shaped blobs, none at the lesions). A checkpoint trained with click-free samples
    says so with ``automatic_mode: true`` in its meta.
    """
    if not meta.get("automatic_mode", False):
        raise Sam3DError(
            f"{checkpoint} was trained with clicks only, not for automatic mode: give --click "
            "(the lesion's centre), or a checkpoint trained for automatic mode"
        )


def _meets(a: tuple[Sequence[int], Sequence[int]], b: tuple[Sequence[int], Sequence[int]]) -> bool:
    """Whether two half-open boxes ``(lo, hi)`` share a voxel."""
    return all(a[0][i] < b[1][i] and b[0][i] < a[1][i] for i in range(3))


@dataclass
class _State:
    points_vox: list[tuple[float, float, float]]
    labels: list[int]
    seeds: list[Origin]
    # the stitched probability these clicks gave (its windows' box, half precision): the next
    # click's mask prompt for models that take one (Sam3D with a mask prompt, SAM-Med3D, the
    # click UNet)
    prob: PreviousPrediction | None = None


class ClickSession:
    """Click segmentation of one image with cached encoder features.

    Args:
        model: a Sam3D (``encode``/``decode``, ``crop_size``), or any model with that interface.
        image: a NIfTI path or a channel-first MetaTensor ``1 x I x J x K``.
        dataset: dataset preset (dict or name such as ``"kits"``): window, mean, std.
        device: where preprocessing and the model run (default: CUDA if available).
        spacing_mm: the grid spacing; default the preset's (training's, 1 mm).
        growth: window growth settings (:class:`WindowGrowth`); ``WindowGrowth(enabled=False)``
            keeps the reference's single window.
        roi: window size in grid voxels; default ``model.crop_size``.
        amp: bfloat16 autocast on CUDA.
        threshold: probability above which a voxel is tumour.
        source: the file a pre-loaded MetaTensor ``image`` was read from (saved masks copy
            its header, as for a path).
    """

    def __init__(
        self,
        model: Any,
        image: str | os.PathLike | MetaTensor,
        dataset: Mapping[str, Any] | str,
        device: str | torch.device | None = None,
        spacing_mm: float | None = None,
        growth: WindowGrowth | None = None,
        roi: int | Sequence[int] | None = None,
        amp: bool = True,
        threshold: float = 0.5,
        source: str | os.PathLike | None = None,
    ) -> None:
        self.device = default_device(device)
        self.dataset = resolve_dataset(dataset)
        self.model = model
        self.threshold = threshold
        self.source = image if isinstance(image, (str, os.PathLike)) else source
        grid_spacing = spacing_mm if spacing_mm is not None else self.dataset.get("spacing_mm", 1.0)
        loaded = LoadVolumed("image", grid_spacing_mm=grid_spacing)({"image": image})
        original = loaded["image"]
        self.original_image = original  # 1 x I x J x K, HU, the file's orientation
        self.original_affine = np.asarray(original.meta["original_affine"], dtype=np.float64)
        self.original_shape = tuple(int(s) for s in original.shape[1:])
        self.transform = preprocessing(self.dataset, spacing_mm=spacing_mm, device=self.device)
        self.grid_image: MetaTensor = self.transform(loaded)["image"]
        roi = roi if roi is not None else model.crop_size
        self.predictor = WindowPredictor(
            model,
            self.grid_image.as_tensor(),
            roi,
            growth=growth,
            amp=amp,
            spacing_mm=grid_spacing_mm(self.grid_image),
        )
        self._history: list[_State] = []
        self._state = _State([], [], [])
        self.prob_grid: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        # the mask is False outside mask_box (original voxels, half-open: the bounding box of
        # what the windows' inversions wrote); the mask tensor is kept and rewritten in place
        self.mask_box: tuple[tuple[int, ...], tuple[int, ...]] = ((0, 0, 0), (0, 0, 0))
        self._mask_buffer: torch.Tensor | None = None
        # window groups -> the box (original voxels) their inversion wrote in the kept mask
        self._mask_groups: dict[frozenset[Origin], tuple[tuple[int, ...], tuple[int, ...]]] = {}
        self._windows: list[Origin] = []

    # -- properties ---------------------------------------------------------------

    @property
    def encode_calls(self) -> int:
        """How many times the encoder has run in this session."""
        return self.predictor.encode_calls

    @property
    def points_vox(self) -> list[tuple[float, float, float]]:
        """The clicks so far, as original voxel coordinates."""
        return list(self._state.points_vox)

    @property
    def point_labels(self) -> list[int]:
        return list(self._state.labels)

    @property
    def windows(self) -> list[Origin]:
        """Origins (grid voxels) of the windows decoded for the current mask."""
        return list(self._windows)

    def resident_bytes(self) -> dict[str, int]:
        """Bytes held by this session's tensors, by part, and their ``total``.

        ``volume``: the original image, the grid and the stitched map; ``mask``: the kept
        mask; ``windows``: cached encoder features and kept window probabilities.
        """
        p = self.predictor
        parts = {
            "volume": tensor_nbytes([self.original_image, self.grid_image, p.blended]),
            "mask": tensor_nbytes(
                self._mask_buffer if self._mask_buffer is not None else self.mask
            ),
            "windows": tensor_nbytes([p.cache, [v[2] for v in p.decoded.values()]]),
        }
        parts["total"] = sum(parts.values())
        return parts

    # -- clicks -------------------------------------------------------------------

    def click(
        self, point: Sequence[float], positive: bool = True, world: bool = False
    ) -> torch.Tensor:
        """Add one click and return the updated mask (bool ``I x J x K``, original grid).

        ``point`` is an original voxel index (i, j, k), or RAS millimetres with ``world``.
        The mask is the session's own tensor (:attr:`mask`), rewritten in place by the next
        click, undo or reset: ``clone()`` it to keep this state.
        """
        return self.add_clicks([point], [1 if positive else 0], world=world)

    def add_clicks(
        self,
        points: Sequence[Sequence[float]],
        labels: Sequence[int],
        world: bool = False,
    ) -> torch.Tensor:
        """Add several clicks at once (1 positive, 0 negative); return the updated mask."""
        pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        labels = [int(v) for v in labels]
        if len(labels) != len(pts):
            raise Sam3DError(f"{len(pts)} clicks but {len(labels)} labels")
        if any(v not in (0, 1) for v in labels):
            raise Sam3DError("click labels must be 1 (positive) or 0 (negative)")
        check_points_inside(pts, self.original_affine, self.original_shape, world=world)
        vox = world_to_original(pts, self.original_affine) if world else pts
        first = not self._state.points_vox
        new = _State(
            self._state.points_vox + [tuple(float(c) for c in p) for p in vox],
            self._state.labels + labels,
            list(self._state.seeds),
        )
        grid = self._grid_points(new.points_vox)
        pos = torch.as_tensor(grid[np.asarray(new.labels) == 1], dtype=torch.float32)
        new.seeds = select_seed_windows(
            pos, self.predictor.roi, self.predictor.shape, new.seeds, centre_on_all=first
        )
        self._history.append(self._state)
        self._state = new
        return self._update()

    def undo(self) -> torch.Tensor:
        """Remove the last click (or group of clicks) and return the mask before it."""
        if not self._history:
            raise Sam3DError("nothing to undo")
        self._state = self._history.pop()
        return self._update()

    def reset(self) -> None:
        """Forget all clicks (cached features are kept)."""
        self._history.clear()
        self._state = _State([], [], [])
        if self._mask_buffer is not None:  # the kept tensor is reused by the next click
            for lo, hi in self._mask_groups.values():
                self._mask_buffer[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = False
            self._mask_groups = {}
        self.prob_grid, self.mask, self._windows = None, None, []
        self.mask_box = ((0, 0, 0), (0, 0, 0))

    def _grid_points(self, points_vox: Sequence[Sequence[float]]) -> np.ndarray:
        return original_to_grid(
            np.asarray(points_vox, dtype=np.float64).reshape(-1, 3),
            self.original_affine,
            self.grid_image.affine,
        )

    def _update(self) -> torch.Tensor:
        grid = torch.as_tensor(self._grid_points(self._state.points_vox), dtype=torch.float32)
        labels = torch.as_tensor(self._state.labels, dtype=torch.long)
        # the mask before this click comes back as the model's mask prompt (if it takes one)
        previous = self._history[-1].prob if self._history else None
        probs = self.predictor.predict_windows(grid, labels, self._state.seeds, previous)
        self._windows = list(probs)
        blended, changed = self.predictor.blend(probs)
        # kept for the next click's mask prompt (a copy: the blended map changes in place)
        self._state.prob = None
        if self.predictor.takes_mask_prompt:  # its windows' box only, not the whole grid
            self._state.prob = PreviousPrediction.of(
                blended, *self.predictor.windows_box(self._windows)
            )
        return self._finish(blended, windows=self._windows, changed=changed)

    def _finish(
        self,
        prob_grid: torch.Tensor,
        windows: Sequence[Origin] | None = None,
        changed: set[Origin] | frozenset[Origin] = frozenset(),
    ) -> torch.Tensor:
        """Threshold the map on the original grid; ``windows``: the only nonzero part.

        With windows, they are grouped (:meth:`WindowPredictor.clusters`) and only the boxes
        of groups with a ``changed`` window are resampled and rewritten in the kept mask
        tensor (a further click costs the windows it changes, not the whole volume, nor
        the history); without, the whole map goes through ``Invertd``.
        """
        self.prob_grid = prob_grid
        if windows is None:
            prob = invert_to_original(prob_grid, self.grid_image, self.transform)
            self.mask = prob > self.threshold
            self._mask_buffer, self._mask_groups = None, {}  # the next click starts afresh
            self.mask_box = ((0, 0, 0), self.original_shape)
            return self.mask
        mask = self._mask_buffer
        if mask is None or mask.device != prob_grid.device:
            mask = torch.zeros(self.original_shape, dtype=torch.bool, device=prob_grid.device)
            self._mask_groups = {}
        groups = [frozenset(g) for g in self.predictor.clusters(windows)]
        clean = {g for g in groups if g in self._mask_groups and g.isdisjoint(changed)}
        stale = [box for g, box in self._mask_groups.items() if g not in clean]
        for lo, hi in stale:  # what the last mask set there, not the whole volume
            mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = False
        boxes = {g: self._mask_groups[g] for g in clean}
        for g in groups:
            if g in clean and not any(_meets(boxes[g], box) for box in stale):
                continue
            crop, lo, hi = invert_region_to_original(
                prob_grid,
                self.grid_image.affine,
                self.original_affine,
                self.original_shape,
                *self.predictor.windows_box(list(g)),
            )
            # groups lie >= 3 grid voxels apart: where their boxes overlap, at most one is
            # above 0, so OR-ing them equals thresholding the whole map
            mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] |= crop > self.threshold
            boxes[g] = (lo, hi)
        self._mask_groups = boxes
        self._mask_buffer = self.mask = mask
        if boxes:
            self.mask_box = (
                tuple(min(b[0][a] for b in boxes.values()) for a in range(3)),
                tuple(max(b[1][a] for b in boxes.values()) for a in range(3)),
            )
        else:
            self.mask_box = ((0, 0, 0), (0, 0, 0))
        return self.mask

    # -- automatic mode -----------------------------------------------------------

    def segment_all(
        self,
        overlap: float = 0.25,
        sw_batch_size: int = 2,
        output_device: str | torch.device = "cpu",
        progress: bool = False,
    ) -> torch.Tensor:
        """Automatic mode (no clicks): sliding windows over the whole grid; returns the mask.

        Windows run on the session's device, the stitched volume lives on
        ``output_device`` (the CPU by default, so GPU memory does not grow with the
        volume); the map is moved back to the session's device only to be inverted.
        Nothing is predicted outside the body (:func:`~sam3d.inference.auto.inside_body`).
        Whether a checkpoint was trained for this mode is the caller's question
        (``sam3d segment`` refuses one that was not: :func:`check_automatic_mode`).
        """
        from sam3d.inference.auto import inside_body, sliding_window_probability

        prob = sliding_window_probability(
            self.model,
            self.grid_image.as_tensor(),
            self.predictor.roi,
            overlap=overlap,
            sw_batch_size=sw_batch_size,
            sw_device=self.device,
            device=output_device,
            amp=self.predictor.amp,
            progress=progress,
        )
        self.reset()
        from sam3d.data.pipelines import air_value

        body_only = inside_body(prob, self.grid_image[0], air_value(self.dataset))
        return self._finish(body_only.to(self.device))

    # -- output -------------------------------------------------------------------

    def mask_numpy(self) -> np.ndarray:
        """The current mask as uint8 ``I x J x K`` (zeros before any click)."""
        if self.mask is None:
            return np.zeros(self.original_shape, dtype=np.uint8)
        return self.mask.to(torch.uint8).cpu().numpy()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the mask as NIfTI with exactly the input's affine, shape and orientation."""
        reference = self.source if self.source is not None else self.original_affine
        return save_mask(self.mask_numpy(), path, reference)

    def save_preview(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """PNG: three orthogonal slices through the first click, mask outlined, clicks marked."""
        from sam3d.visualize import save_overlay_png

        mask = self.mask_numpy()
        if self._state.points_vox:
            center = tuple(int(round(c)) for c in self._state.points_vox[0])
        elif mask.any():
            center = tuple(int(round(c)) for c in np.argwhere(mask).mean(0))
        else:
            center = tuple(s // 2 for s in self.original_shape)
        spacing = spacing_from_affine(self.original_affine)
        save_overlay_png(
            self.original_image[0].cpu().numpy(),
            mask,
            path,
            center_vox=center,
            points_vox=[tuple(int(round(c)) for c in p) for p in self._state.points_vox] or None,
            point_labels=list(self._state.labels) or None,
            spacing_mm=spacing,
            window_hu=tuple(self.dataset["window_hu"]),
            title=title,
        )
        return Path(path)
