"""The prostate bundle's training pieces: the embedding cache of the ground-truth slices,
``prepare_batch`` for MONAI engines and the poly learning-rate schedule."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.metrics import Metric
from monai.losses import DiceCELoss

from sam3d.apps.prostate.slices import CaseSlices
from sam3d.data.embedding_cache import CachedSliceDataset, EmbeddingCache, encoder_fingerprint
from sam3d.errors import Sam3DError


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


class SliceLossMetric(Metric):
    """The reference's validation loss as an ignite metric: DeSAM's DiceCE (sigmoid,
    squared prediction) of each slice's logits against its mask, averaged over the
    slices (its validation runs batch 1). ``output_transform`` gives ``(logits, masks)``:
    sequences of ``1 x s x s``. The reference recipe keeps the epoch with the lowest
    value (``TrainingCheckpoint(key_metric_mode="min")``)."""

    def reset(self) -> None:
        self.total, self.n = 0.0, 0
        self.loss = DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")

    def update(self, output: Any) -> None:
        logits, masks = output
        for lg, m in zip(logits, masks):
            lg = torch.as_tensor(lg).float()
            self.total += float(self.loss(lg[None], torch.as_tensor(m).float().to(lg.device)[None]))
            self.n += 1

    def compute(self) -> float:
        return self.total / max(self.n, 1)


def poly_lambda(max_epochs: int, exponent: float = 0.9):
    """The reference's poly schedule as a ``LambdaLR`` factor: ``(1 - epoch / max) ** 0.9``."""
    return lambda epoch: (1 - min(epoch, max_epochs) / max(1, max_epochs)) ** exponent


def cache_dir_for(root: str | Path, split: str, config: dict[str, Any] | None) -> str:
    """``<root>/<split>_<model name or sam>_<S>``: one store per split and encoder."""
    c = config or {}
    return os.path.join(str(root), f"{split}_{c.get('sam', 'sam')}_{c.get('image_size', 'S')}")
