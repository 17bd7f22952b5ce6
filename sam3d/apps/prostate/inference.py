"""The prostate bundle's automatic segmentation, volume by slice: inference.json's pieces
(datalist, slice loading, inferer, postprocessing, engine) and :func:`segment_files`."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sam3d.apps.prostate.slices import masks_to_volume, volume_slices
from sam3d.data.io import load_image, nifti_stem
from sam3d.errors import Sam3DError

logger = logging.getLogger(__name__)


def zero_border(masks: torch.Tensor, edge_zero_px: float) -> torch.Tensor:
    """``K x s x s`` masks with a border of ``edge_zero_px`` pixels of a 256 x 256 mask
    (scaled to ``s``, rounded half up) set to 0: the reference's ``edge_set_zero`` (50),
    applied before its Dice."""
    s = masks.shape[-1]
    e = int(np.floor(float(edge_zero_px) * s / 256 + 0.5))
    if e <= 0:
        return masks
    out = masks.clone()
    out[..., :e, :] = 0
    out[..., -e:, :] = 0
    out[..., :, :e] = 0
    out[..., :, -e:] = 0
    return out


def clean_box_masks(masks: torch.Tensor, min_region_px: float) -> torch.Tensor:
    """The reference's whole-box clean-up: per mask, holes then islands smaller than
    ``min_region_px`` pixels of a 256 x 256 mask (scaled with ``s x s``) removed, as its
    ``generate_box`` does with ``min_mask_region_area`` (SAM's ``remove_small_regions``)."""
    from sam3d.models.planar.desam import remove_small_regions

    area = float(min_region_px) * masks.shape[-2] * masks.shape[-1] / 256**2
    if area <= 0:
        return masks
    out = []
    for m in masks.cpu().numpy().astype(bool):
        m, _ = remove_small_regions(m, area, "holes")
        m, _ = remove_small_regions(m, area, "islands")
        out.append(torch.from_numpy(np.ascontiguousarray(m)))
    return torch.stack(out).to(masks.device)


class SliceInferer:
    """Runs the network on a slice stack: ``K x 3 x S x S`` pixels -> masks ``K x s x s``
    (bool), ``batch_size`` slices at a time, automatically (``mode`` ``"grid"``: the point
    grid, ``grid`` and ``grid_kwargs`` the kwargs of :meth:`DeSAM.segment_grid`; ``"box"``:
    the whole-image box, the grid settings unused).

    The reference recipe's post-processing (both 0 by default): ``box_min_region_px``
    cleans box-mode masks (:func:`clean_box_masks`; grid mode cleans with its own
    ``min_region_px``), ``edge_zero_px`` zeroes the border (:func:`zero_border`).

    Called as MONAI inferers are: ``inferer(inputs, network)``.
    """

    def __init__(
        self,
        mode: str = "grid",
        batch_size: int = 4,
        grid: dict[str, Any] | None = None,
        edge_zero_px: float = 0,
        box_min_region_px: float = 0,
        **grid_kwargs: Any,
    ) -> None:
        if mode not in ("grid", "box"):
            raise Sam3DError(f"automatic mode must be 'grid' or 'box', got {mode!r}")
        self.mode, self.batch_size = mode, int(batch_size)
        self.grid_kwargs = {**(grid or {}), **grid_kwargs} if mode == "grid" else {}
        self.edge_zero_px, self.box_min_region_px = edge_zero_px, box_min_region_px

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor | np.ndarray, network: torch.nn.Module) -> torch.Tensor:
        net = network.module if hasattr(network, "module") else network
        net.eval()
        device = next(net.parameters()).device
        x = torch.as_tensor(inputs)
        out = []
        for k0 in range(0, len(x), self.batch_size):
            batch = x[k0 : k0 + self.batch_size].to(device).float()
            masks = net.segment(batch, mode=self.mode, **self.grid_kwargs).cpu()
            if self.mode == "box":
                masks = clean_box_masks(masks, self.box_min_region_px)
            out.append(zero_border(masks, self.edge_zero_px))
        return torch.cat(out)


@torch.no_grad()
def segment_volume(
    network: torch.nn.Module,
    volume: np.ndarray,
    mode: str = "grid",
    batch_size: int = 4,
    interpolation: str = "bilinear",
    edge_zero_px: float = 0,
    box_min_region_px: float = 0,
    slices: Sequence[int] | None = None,
    **grid_kwargs: Any,
) -> np.ndarray:
    """``I x J x K`` intensities -> uint8 mask ``I x J x K``, slice by slice along K.

    Each slice is preprocessed as in training (:func:`volume_slices`, intensities clipped
    at the whole volume's percentiles, ``interpolation``), segmented automatically
    (:class:`SliceInferer`, with its ``edge_zero_px`` and ``box_min_region_px``) at
    ``s x s`` and resized back to ``I x J`` (nearest, :func:`masks_to_volume`). With
    ``slices`` only those slices are segmented and the mask is ``I x J x len(slices)``.
    """
    net = network.module if hasattr(network, "module") else network
    shape = tuple(volume.shape)
    if slices is not None and len(slices) == 0:
        return np.zeros((*shape[:2], 0), np.uint8)
    x = volume_slices(volume, net.img_size, net.mask_size, interpolation)
    if slices is not None:
        index = torch.as_tensor(list(slices), dtype=torch.long)
        x = x[index] if isinstance(x, torch.Tensor) else x[index.numpy()]
        shape = (*shape[:2], len(index))
    inferer = SliceInferer(
        mode,
        batch_size,
        edge_zero_px=edge_zero_px,
        box_min_region_px=box_min_region_px,
        **grid_kwargs,
    )
    return masks_to_volume(inferer(x, net), shape)


def inference_datalist(paths: Sequence[str | Path]) -> list[dict[str, str]]:
    """``[{"image": path}]`` of the volumes to segment, each checked first: a 2D or 4D
    NIfTI (or a corrupt file) is refused with one sentence
    (:func:`sam3d.data.io.load_image`) before anything is written."""
    for p in paths:
        load_image(p, require_3d=True)
    return [{"image": str(p)} for p in paths]


class LoadSlicesd:
    """Inference preprocessing: ``{"image": path}`` -> ``image`` ``K x 3 x S x S`` uint8
    (:func:`volume_slices`), ``image_path`` and ``spatial_shape`` ``(I, J, K)``."""

    def __init__(self, input_size: int, mask_size: int, interpolation: str = "bilinear") -> None:
        self.input_size, self.mask_size = int(input_size), int(mask_size)
        self.interpolation = interpolation

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        vol = load_image(item["image"], require_3d=True)[0].numpy()
        x = volume_slices(vol, self.input_size, self.mask_size, self.interpolation)
        return {**item, "image": torch.as_tensor(x), "image_path": str(item["image"]),
                "spatial_shape": tuple(vol.shape)}  # fmt: skip


class SliceMasksToVolumed:
    """Postprocessing: ``pred`` ``K x s x s`` -> uint8 ``I x J x K`` at ``spatial_shape``."""

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        return {**item, "pred": masks_to_volume(item["pred"], item["spatial_shape"])}


class SaveMaskd:
    """Postprocessing: writes ``pred`` as ``output_dir/<stem>_mask.nii.gz`` with the input's
    header (:func:`sam3d.inference.grid.save_mask`); the path goes to ``pred_path``."""

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        from sam3d.inference.grid import save_mask

        src = item["image_path"]
        path = save_mask(item["pred"], self.output_dir / f"{nifti_stem(src)}_mask.nii.gz", src)
        n = int(np.sum(item["pred"]))
        logger.info(f"prostate: {src} -> {path} ({n} voxels)")
        if n == 0:
            logger.warning(
                f"prostate: the mask of {src} is empty: no slice got a mask (in grid mode no "
                "candidate passed the IoU threshold: a model whose IoU head has not learnt, "
                "or an image unlike its training data)"
            )
        return {**item, "pred_path": path}


class VolumeEvaluator:
    """The inference engine: for every item of ``dataset`` (preprocessed, e.g. a MONAI
    ``Dataset`` with :class:`LoadSlicesd`), ``pred = inferer(item["image"], network)``, then
    ``postprocessing(item)``. ``run()`` returns the postprocessed items (``image`` dropped).
    """

    def __init__(
        self,
        dataset: Sequence[dict[str, Any]],
        network: torch.nn.Module,
        inferer: SliceInferer,
        postprocessing: Any | None = None,
    ) -> None:
        self.dataset, self.network, self.inferer = dataset, network, inferer
        self.postprocessing = postprocessing

    def run(self) -> list[dict[str, Any]]:
        from tqdm.auto import tqdm

        out = []
        for i in tqdm(range(len(self.dataset)), desc="inference", unit="volume"):
            item = self.dataset[i]
            item = {**item, "pred": self.inferer(item["image"], self.network)}
            if self.postprocessing is not None:
                item = self.postprocessing(item)
            out.append({k: v for k, v in item.items() if k != "image"})
        return out


def segment_files(
    network: torch.nn.Module,
    paths: Sequence[str | Path],
    output_dir: str | Path,
    mode: str = "grid",
    batch_size: int = 4,
    **grid_kwargs: Any,
) -> list[Path]:
    """Segment NIfTI volumes automatically; writes ``<stem>_mask.nii.gz`` with each input's
    geometry. Every input is checked first (:func:`inference_datalist`). The pieces are
    inference.json's: :class:`LoadSlicesd`, :class:`SliceInferer`,
    :class:`SliceMasksToVolumed` + :class:`SaveMaskd`, run by :class:`VolumeEvaluator`."""
    from monai.data import Dataset
    from monai.transforms import Compose

    net = network.module if hasattr(network, "module") else network
    data = Dataset(inference_datalist(paths), LoadSlicesd(net.img_size, net.mask_size))
    post = Compose([SliceMasksToVolumed(), SaveMaskd(output_dir)])
    done = VolumeEvaluator(data, network, SliceInferer(mode, batch_size, **grid_kwargs), post)
    return [item["pred_path"] for item in done.run()]
