"""The prostate (DeSAM) bundle's glue: leave-sites-out splits, slices, the embedding cache,
batches for MONAI engines, volume-by-slice segmentation and per-site reports.

Preprocessing follows the reference: per volume, intensities clipped at the 0.5 / 99.5
percentiles and scaled to 0..255 (uint8); each slice (along the volume's third voxel
axis) resized to the mask side ``s = S/4`` and then to SAM's input ``S`` as three equal
channels; labels resized to ``s`` (nearest).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sam3d.data.embedding_cache import CachedSliceDataset, EmbeddingCache, encoder_fingerprint
from sam3d.data.io import atomic_write, load_image, load_image_label, nifti_stem
from sam3d.data.splits import carve, check_disjoint
from sam3d.errors import Sam3DError

logger = logging.getLogger(__name__)

PREPROCESS = "percentile 0.5-99.5 -> uint8; slice -> s (bilinear) -> S (bilinear), 3 channels"


# --------------------------------------------------------------------------- data


def ensure_dataset(
    dataset_dir: str | Path,
    n_per_site: int = 4,
    sites: Sequence[str] = ("A", "B", "C", "D", "E", "F"),
    seed: int = 0,
    in_plane_vox: int | None = 96,
    n_slices: int = 12,
) -> Path:
    """``dataset_dir/dataset.json``; a missing one is first generated as prostate phantoms."""
    path = Path(dataset_dir) / "dataset.json"
    if not path.is_file():
        from sam3d.data.phantoms import write_prostate_dataset

        logger.warning(
            f"no dataset in {dataset_dir}: generating {n_per_site} prostate phantoms per site "
            f"({''.join(sites)}) there (seed {seed})"
        )
        write_prostate_dataset(
            dataset_dir, n_per_site, tuple(sites), seed,
            in_plane_vox=in_plane_vox, n_slices=n_slices,
        )  # fmt: skip
    return path


def load_cases(dataset_dir: str | Path) -> list[dict[str, str]]:
    """Every case of ``dataset.json`` (all its lists) as absolute ``image``, ``label``, ``site``."""
    path = Path(dataset_dir) / "dataset.json"
    if not path.is_file():
        raise Sam3DError(f"no dataset.json in {dataset_dir}")
    meta = json.loads(path.read_text())
    cases = []
    for split in ("training", "validation", "test"):
        for c in meta.get(split) or []:
            if "site" not in c or "label" not in c:
                raise Sam3DError(f"{path}: every case needs 'image', 'label' and 'site'")
            cases.append(
                {
                    "image": str((path.parent / c["image"]).resolve()),
                    "label": str((path.parent / c["label"]).resolve()),
                    "site": str(c["site"]),
                }
            )
    return cases


def prostate_datalist(
    dataset_dir: str | Path,
    split: str,
    train_sites: Sequence[str] = ("A",),
    test_sites: Sequence[str] | None = None,
    val_fraction: float = 0.25,
    seed: int = 0,
    phantom: dict[str, Any] | None = None,
) -> list[dict[str, str]]:
    """Leave-sites-out cases of ``split``: ``training`` / ``validation`` are carved from the
    training sites' cases (seeded, :func:`sam3d.data.splits.carve`); ``test`` holds every
    case of ``test_sites`` (default: all sites not trained on). Never overlapping.

    ``phantom``: kwargs of :func:`ensure_dataset` (used only when there is no dataset).
    """
    ensure_dataset(dataset_dir, **(phantom or {}))
    cases = load_cases(dataset_dir)
    sites = sorted({c["site"] for c in cases})
    train_sites = list(train_sites)
    unknown = [s for s in train_sites if s not in sites]
    if unknown:
        raise Sam3DError(f"training sites {unknown} are not in {dataset_dir} (sites {sites})")
    test_sites = (
        [s for s in sites if s not in train_sites] if test_sites is None else list(test_sites)
    )
    both = sorted(set(test_sites) & set(train_sites))
    if both:
        raise Sam3DError(f"a site cannot be both trained and tested on: {both}")
    carved = carve([c for c in cases if c["site"] in train_sites], val_fraction, 0.0, seed)
    splits = {
        "training": carved["training"],
        "validation": carved["validation"],
        "test": [c for c in cases if c["site"] in test_sites],
    }
    check_disjoint(splits, str(dataset_dir))
    if split not in splits:
        raise Sam3DError(f"split must be training, validation or test, got {split!r}")
    if not splits[split]:
        raise Sam3DError(
            f"the {split} split of {dataset_dir} is empty (sites {train_sites} / {test_sites})"
        )
    return splits[split]


def volume_to_uint8(volume: np.ndarray) -> np.ndarray:
    """Clip at the 0.5 / 99.5 percentiles and scale to 0..255 uint8 (the reference's)."""
    lo, hi = np.percentile(volume, (0.5, 99.5))
    scaled = (np.clip(volume, lo, hi) - lo) / max(float(hi - lo), 1e-8)
    return np.rint(scaled * 255).astype(np.uint8)


def slice_to_input(slice_u8: np.ndarray, input_size: int, mask_size: int) -> np.ndarray:
    """``H x W`` uint8 -> SAM input ``3 x S x S`` uint8 (resized to ``s`` then ``S``)."""
    x = torch.as_tensor(slice_u8, dtype=torch.float32)[None, None]
    x = F.interpolate(x, (mask_size, mask_size), mode="bilinear", align_corners=False)
    x = F.interpolate(x, (input_size, input_size), mode="bilinear", align_corners=False)
    return x[0].clamp(0, 255).round().to(torch.uint8).expand(3, -1, -1).numpy()


def label_to_mask(label: np.ndarray, mask_size: int) -> np.ndarray:
    """``H x W`` label -> ``s x s`` uint8 0/1 (nearest)."""
    y = torch.as_tensor(label > 0, dtype=torch.float32)[None, None]
    y = F.interpolate(y, (mask_size, mask_size), mode="nearest")[0, 0]
    return (y > 0.5).numpy().astype(np.uint8)


def case_slices(
    case: dict[str, str], input_size: int, mask_size: int, gt_only: bool = True
) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(key, input ``3 x S x S`` uint8, mask ``s x s`` uint8) of a case's slices; with
    ``gt_only`` only slices whose label has foreground (the reference's training set)."""
    image, label = load_image_label(case["image"], case["label"])
    vol = volume_to_uint8(image[0].numpy())
    lab = label[0].numpy()
    stem = nifti_stem(case["image"])
    out = []
    for k in range(vol.shape[2]):
        if gt_only and not (lab[:, :, k] > 0).any():
            continue
        out.append((f"{stem}/{k:04d}", slice_to_input(vol[:, :, k], input_size, mask_size),
                    label_to_mask(lab[:, :, k], mask_size)))  # fmt: skip
    return out


class CaseSlices:
    """Training / validation preprocessing: a case ``{"image", "label"}`` -> its slices
    ``[(key, input 3 x S x S uint8, mask s x s uint8)]`` (:func:`case_slices`)."""

    description = PREPROCESS  # part of the embedding cache's fingerprint

    def __init__(self, input_size: int, mask_size: int, gt_only: bool = True) -> None:
        self.input_size, self.mask_size, self.gt_only = int(input_size), int(mask_size), gt_only

    def __call__(self, case: dict[str, str]) -> list[tuple[str, np.ndarray, np.ndarray]]:
        return case_slices(case, self.input_size, self.mask_size, self.gt_only)


def cached_slices(
    network: torch.nn.Module,
    data: Sequence[dict[str, str]],
    cache_dir: str | Path,
    batch_size: int = 4,
    seed: int = 0,
    progress: bool = True,
    preprocessing: CaseSlices | None = None,
) -> CachedSliceDataset:
    """Build (or reuse, checked) the embedding cache of the cases' (``data``) ground-truth
    slices and return the training dataset over it (DeSAM's one-point prompts).

    ``preprocessing``: case -> slices (default :class:`CaseSlices` at the network's sizes,
    ground-truth slices only); the sizes must be the network's.
    """
    net = network.module if hasattr(network, "module") else network
    s_in, s_mask = net.img_size, net.mask_size
    prep = preprocessing or CaseSlices(s_in, s_mask, gt_only=True)
    if (prep.input_size, prep.mask_size) != (s_in, s_mask):
        raise Sam3DError(
            f"preprocessing makes {prep.input_size} / {prep.mask_size} px slices, the "
            f"network takes {s_in} / {s_mask}"
        )
    slices = [sl for c in data for sl in prep(c)]
    if not slices:
        raise Sam3DError("no slice with ground truth in these cases: nothing to train on")
    device = next(net.parameters()).device
    cache = EmbeddingCache(
        cache_dir,
        [k for k, _, _ in slices],
        net.feature_shapes(),
        (s_mask, s_mask),
        encoder_fingerprint(net, {"preprocess": prep.description}),
    )

    def encode(batch: np.ndarray) -> list[torch.Tensor]:
        x = torch.as_tensor(batch, device=device).float()
        return net.encode(net.preprocess(x))

    report = cache.build(lambda i: slices[i][1:], encode, batch_size, progress)
    dataset = CachedSliceDataset(cache, s_in, seed)
    dataset.report = report  # what the build reused / recomputed, and the store's size
    return dataset


class DeSAMPrepareBatch:
    """``prepare_batch`` for MONAI engines over :class:`CachedSliceDataset` batches.

    Returns ``(features, target, (), prompt kwargs)``: ``mode="points"`` the item's
    training point, the target ``(label, iou_target)`` and ``return_iou=True``;
    ``mode="box"`` the whole-image box (the network's default prompt; no IoU term, as the
    reference), target ``label``. ``logits_only``: logits and ``label`` only (evaluators).
    """

    def __init__(self, mode: str = "points", input_size: int = 1024, logits_only: bool = False):
        if mode not in ("points", "box"):
            raise Sam3DError(f"training prompt mode must be 'points' or 'box', got {mode!r}")
        self.mode, self.input_size, self.logits_only = mode, int(input_size), logits_only

    def __call__(
        self, batch: dict[str, Any], device: Any = None, non_blocking: bool = False, **_: Any
    ):
        def to(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        feats = [to(f) for f in batch["features"]]
        label = to(batch["label"])
        kwargs: dict[str, Any] = {}
        if self.mode == "points" and not self.logits_only:
            kwargs = {"points": to(batch["points"]), "point_labels": to(batch["point_labels"])}
            return feats, (label, to(batch["iou_target"])), (), {**kwargs, "return_iou": True}
        if self.mode == "points":
            kwargs = {"points": to(batch["points"]), "point_labels": to(batch["point_labels"])}
        else:  # the whole-image box: the network's default prompt
            kwargs = {}
        return feats, label, (), kwargs


# --------------------------------------------------------------------------- volumes


def volume_slices(volume: np.ndarray, input_size: int, mask_size: int) -> np.ndarray:
    """``I x J x K`` intensities -> the SAM inputs of its K slices, ``K x 3 x S x S`` uint8."""
    vol = volume_to_uint8(np.asarray(volume, dtype=np.float32))
    return np.stack([slice_to_input(vol[:, :, k], input_size, mask_size)
                     for k in range(vol.shape[2])])  # fmt: skip


def masks_to_volume(masks: torch.Tensor, shape: Sequence[int]) -> np.ndarray:
    """Slice masks ``K x s x s`` -> uint8 volume ``I x J x K`` (each resized, nearest)."""
    m = F.interpolate(masks[:, None].float().cpu(), tuple(shape[:2]), mode="nearest")[:, 0]
    return np.ascontiguousarray((m > 0.5).numpy().astype(np.uint8).transpose(1, 2, 0))


class SliceInferer:
    """Runs the network on a slice stack: ``K x 3 x S x S`` pixels -> masks ``K x s x s``
    (bool), ``batch_size`` slices at a time, automatically (``mode`` ``"grid"``: the point
    grid, ``grid`` and ``grid_kwargs`` the kwargs of :meth:`DeSAM.segment_grid`; ``"box"``:
    the whole-image box, the grid settings unused).

    Called as MONAI inferers are: ``inferer(inputs, network)``.
    """

    def __init__(
        self,
        mode: str = "grid",
        batch_size: int = 4,
        grid: dict[str, Any] | None = None,
        **grid_kwargs: Any,
    ) -> None:
        if mode not in ("grid", "box"):
            raise Sam3DError(f"automatic mode must be 'grid' or 'box', got {mode!r}")
        self.mode, self.batch_size = mode, int(batch_size)
        self.grid_kwargs = {**(grid or {}), **grid_kwargs} if mode == "grid" else {}

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor | np.ndarray, network: torch.nn.Module) -> torch.Tensor:
        net = network.module if hasattr(network, "module") else network
        net.eval()
        device = next(net.parameters()).device
        x = torch.as_tensor(inputs)
        out = []
        for k0 in range(0, len(x), self.batch_size):
            batch = x[k0 : k0 + self.batch_size].to(device).float()
            out.append(net.segment(batch, mode=self.mode, **self.grid_kwargs).cpu())
        return torch.cat(out)


@torch.no_grad()
def segment_volume(
    network: torch.nn.Module,
    volume: np.ndarray,
    mode: str = "grid",
    batch_size: int = 4,
    **grid_kwargs: Any,
) -> np.ndarray:
    """``I x J x K`` intensities -> uint8 mask ``I x J x K``, slice by slice along K.

    Each slice is preprocessed as in training (:func:`volume_slices`), segmented
    automatically (:class:`SliceInferer`) at ``s x s`` and resized back to ``I x J``
    (nearest, :func:`masks_to_volume`).
    """
    net = network.module if hasattr(network, "module") else network
    x = volume_slices(volume, net.img_size, net.mask_size)
    return masks_to_volume(SliceInferer(mode, batch_size, **grid_kwargs)(x, net), volume.shape)


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

    def __init__(self, input_size: int, mask_size: int) -> None:
        self.input_size, self.mask_size = int(input_size), int(mask_size)

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        vol = load_image(item["image"], require_3d=True)[0].numpy()
        x = volume_slices(vol, self.input_size, self.mask_size)
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
        logger.info(f"prostate: {src} -> {path} ({int(np.sum(item['pred']))} voxels)")
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
        out = []
        for i in range(len(self.dataset)):
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


def dice_3d(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two binary volumes (1.0 when both are empty)."""
    p, g = pred > 0, gt > 0
    denom = int(p.sum() + g.sum())
    return 1.0 if denom == 0 else 2.0 * int((p & g).sum()) / denom


def _write_csv(path: Path, rows: list[list[Any]]) -> None:
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    atomic_write(path, lambda tmp: tmp.write_text(buf.getvalue(), newline=""))


def evaluate_cases(
    network: torch.nn.Module,
    cases: Sequence[dict[str, str]],
    output_dir: str | Path,
    mode: str = "grid",
    gt_slices_only: bool = True,
    batch_size: int = 4,
    mlflow_run: Any | None = None,
    **grid_kwargs: Any,
) -> dict[str, Any]:
    """Leave-sites-out test: Dice per patient in 3D, a per-case and a per-site CSV.

    As the reference, Dice is computed over the slices with ground truth
    (``gt_slices_only``; False: over the whole volume). Writes
    ``output_dir/metrics_per_case.csv`` (case, site, dice) and ``metrics_per_site.csv``
    (site, n, mean, std, and ``all``); logs ``test_dice`` and ``test_dice_<site>`` to
    ``mlflow_run`` (an :class:`sam3d.engine.MLflowRun`) if given. Returns the summary.
    """
    out = Path(output_dir)
    rows: list[list[Any]] = [["case", "site", "dice"]]
    per_site: dict[str, list[float]] = {}
    for case in cases:
        image, label = load_image_label(case["image"], case["label"])
        pred = segment_volume(network, image[0].numpy(), mode, batch_size, **grid_kwargs)
        gt = label[0].numpy() > 0
        if gt_slices_only:
            ks = np.flatnonzero(gt.any(axis=(0, 1)))
            pred, gt = pred[:, :, ks], gt[:, :, ks]
        d = dice_3d(pred, gt)
        rows.append([nifti_stem(case["image"]), case["site"], f"{d:.6f}"])
        per_site.setdefault(case["site"], []).append(d)
    all_d = [d for v in per_site.values() for d in v]
    site_rows: list[list[Any]] = [["site", "n", "dice_mean", "dice_std"]]
    summary: dict[str, Any] = {"test_dice": float(np.mean(all_d)), "sites": {}}
    for site in sorted(per_site):
        v = per_site[site]
        site_rows.append([site, len(v), f"{np.mean(v):.6f}", f"{np.std(v):.6f}"])
        summary["sites"][site] = float(np.mean(v))
    site_rows.append(["all", len(all_d), f"{np.mean(all_d):.6f}", f"{np.std(all_d):.6f}"])
    _write_csv(out / "metrics_per_case.csv", rows)
    _write_csv(out / "metrics_per_site.csv", site_rows)
    logger.info(
        f"prostate evaluation ({mode}): Dice {summary['test_dice']:.4f}, "
        f"per site {summary['sites']}"
    )
    if mlflow_run is not None and getattr(mlflow_run, "enabled", False):
        client, run_id = mlflow_run.client, mlflow_run.run_id
        client.log_metric(run_id, "test_dice", summary["test_dice"])
        for site, v in summary["sites"].items():
            client.log_metric(run_id, f"test_dice_{site}", v)
        for name in ("metrics_per_case.csv", "metrics_per_site.csv"):
            client.log_artifact(run_id, str(out / name))
        client.set_terminated(run_id)
    return summary


def poly_lambda(max_epochs: int, exponent: float = 0.9):
    """The reference's poly schedule as a ``LambdaLR`` factor: ``(1 - epoch / max) ** 0.9``."""
    return lambda epoch: (1 - min(epoch, max_epochs) / max(1, max_epochs)) ** exponent


def cache_dir_for(root: str | Path, split: str, config: dict[str, Any] | None) -> str:
    """``<root>/<split>_<model name or sam>_<S>``: one store per split and encoder."""
    c = config or {}
    return os.path.join(str(root), f"{split}_{c.get('sam', 'sam')}_{c.get('image_size', 'S')}")
