"""Interactive training: simulated correction rounds, as SAM / SAM-Med3D / nnInteractive train.

Per crop: the encoder runs once; a first click (from the data chain: one positive click on
the target object, :func:`sam3d.data.pipelines.train_transforms` with
``click_training="interactive"``) is decoded; then, for a random number of rounds under
``no_grad``, the simulated user clicks at the deepest voxel of the model's own largest
error (:func:`sam3d.data.clicks.deepest_error_click`: positive in a miss, negative in a
leak) and the previous prediction comes back as the mask prompt; the last round runs with
gradients and its logits are what the trainer's loss sees. Zero extra rounds trains the
first click itself.

It is the training inferer of the kits bundle (``train#inferer``): MONAI's
``SupervisedTrainer`` calls it as ``inferer(inputs, network, points=..., point_labels=...,
target=...)`` (:func:`interactive_prepare_batch`), so AMP, gradient clipping and every
handler stay the trainer's. ``click_training="reference"`` keeps 3DSAM-adapter's recipe:
random clicks from the data chain, one forward pass, no mask prompt.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.engines import PrepareBatchExtraInput
from monai.inferers import Inferer, SimpleInferer

from sam3d.data.clicks import deepest_error_click
from sam3d.engine.distributed import unwrap
from sam3d.errors import Sam3DError
from sam3d.models.volumetric.mask_prompt3d import mask_prompt_from_logits

CLICK_TRAINING = ("interactive", "reference")


def click_training_mode(value: str) -> str:
    """Check a bundle's ``click_training`` option: ``"interactive"`` or ``"reference"``."""
    mode = str(value).lower()
    if mode not in CLICK_TRAINING:
        raise Sam3DError(
            f"click_training must be one of {', '.join(CLICK_TRAINING)}, got {value!r}"
        )
    return mode


def interactive_prepare_batch() -> PrepareBatchExtraInput:
    """Clicks and the target to the inferer: the simulated user needs the label."""
    return PrepareBatchExtraInput(
        extra_keys={"points": "points", "point_labels": "point_labels", "target": "label"}
    )


def training_prepare_batch(mode: str) -> PrepareBatchExtraInput:
    """The trainer's ``prepare_batch`` for a ``click_training`` mode."""
    from sam3d.engine.clicks import click_prepare_batch

    if click_training_mode(mode) == "interactive":
        return interactive_prepare_batch()
    return click_prepare_batch()


def training_inferer(mode: str, **kwargs: Any) -> Inferer:
    """The trainer's inferer for a ``click_training`` mode (kwargs: the interactive one's)."""
    if click_training_mode(mode) == "interactive":
        return InteractiveClickInferer(**kwargs)
    return SimpleInferer()


def next_clicks(target: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One simulated correction click per batch item.

    Args:
        target: ``B x 1 x H x W x D`` (> 0 inside the object).
        logits: ``B x 2 x H x W x D``; the prediction is their argmax.

    Returns:
        ``points`` float32 ``B x 1 x 3`` and ``labels`` int64 ``B x 1`` (1 in a miss, 0 in a
        leak, -1 padding where the prediction is already exact), on ``logits``' device.
    """
    gt = (target[:, 0] > 0).cpu().numpy()
    pred = (logits[:, 1] > logits[:, 0]).cpu().numpy()
    points = torch.zeros(gt.shape[0], 1, 3, dtype=torch.float32)
    labels = torch.full((gt.shape[0], 1), -1, dtype=torch.long)
    for b in range(gt.shape[0]):
        click = deepest_error_click(gt[b], pred[b])
        if click is not None:
            points[b, 0] = torch.from_numpy(click[0].astype(np.float32))
            labels[b, 0] = click[1]
    return points.to(logits.device), labels.to(logits.device)


class InteractiveClickInferer(Inferer):
    """Training inferer with simulated correction rounds (see the module docstring).

    Args:
        max_rounds: most clicks per crop (first included); the number of clicks of an
            iteration is uniform in ``1..max_rounds``, the same for the whole batch.
        mask_prompt: feed the previous prediction back (``Sam3D.decode(mask_prompt=...)``);
            False: clicks only (an ablation).
        seed: the round-count draws (reproducible with the trainer's seed).

    Call: ``inputs`` ``B x 1 x H x W x D``, ``network`` (a Sam3D or anything with
    ``encode`` / ``decode``, DDP-unwrapped), ``points`` ``B x N x 3``, ``point_labels``
    ``B x N``, ``target`` ``B x 1 x H x W x D`` -> the last round's logits
    ``B x 2 x H x W x D``. After a call, ``last_rounds`` is the number of clicks used.
    """

    def __init__(self, max_rounds: int = 6, mask_prompt: bool = True, seed: int = 0) -> None:
        super().__init__()
        if int(max_rounds) < 1:
            raise Sam3DError(f"max_rounds must be at least 1, got {max_rounds}")
        self.max_rounds = int(max_rounds)
        self.mask_prompt = bool(mask_prompt)
        self.rng = np.random.default_rng(seed)
        self.last_rounds = 0

    def __call__(
        self,
        inputs: torch.Tensor,
        network: Any,
        points: torch.Tensor,
        point_labels: torch.Tensor,
        target: torch.Tensor,
        **kwargs: Any,
    ) -> torch.Tensor:
        net = unwrap(network)
        use_mask = self.mask_prompt and getattr(net, "mask_prompt", None) is not None
        # DDP synchronises gradients only through its own forward: there the simulated
        # rounds encode once without a graph and the last round runs the wrapper (a second
        # encoder pass); elsewhere the encoder runs once per crop for every round.
        ddp = isinstance(network, torch.nn.parallel.DistributedDataParallel)
        rounds = int(self.rng.integers(1, self.max_rounds + 1))
        if ddp:
            with torch.no_grad():
                features = net.encode(inputs) if rounds > 1 else None
        else:
            features = net.encode(inputs)  # its graph serves the last round
        mask = None

        def decode(points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            # a model without a mask prompt is called without the argument
            extra = {"mask_prompt": mask} if mask is not None else {}
            return net.decode(features, points, labels, **extra)

        with torch.no_grad():
            for _ in range(rounds - 1):
                logits = decode(points, point_labels)
                mask = mask_prompt_from_logits(logits) if use_mask else None
                click, label = next_clicks(target, logits)
                points = torch.cat([points, click.to(points.dtype)], dim=1)
                point_labels = torch.cat([point_labels, label.to(point_labels.dtype)], dim=1)
        self.last_rounds = rounds
        if ddp:
            kwargs = {"mask_prompt": mask} if mask is not None else {}
            return network(inputs, points, point_labels, **kwargs)
        return decode(points, point_labels)
