"""Clicks through MONAI engines: batch preparation, validation's click inferer (the same
windows and growth as ``sam3d segment``), and an image-only view of a promptable network
for ``verify_net_in_out``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.engines import PrepareBatchExtraInput

from sam3d.inference.bundle import ClickInferer
from sam3d.inference.windows import WindowGrowth


def click_prepare_batch() -> PrepareBatchExtraInput:
    """Hand ``points`` / ``point_labels`` of a batch to the inferer and network as kwargs."""
    return PrepareBatchExtraInput(extra_keys={"points": "points", "point_labels": "point_labels"})


class ClickCropInferer(ClickInferer):
    """Validation's click inferer: what ``sam3d segment`` does, as 2-class logits.

    The window around the clicks is placed by the project's one rule
    (:func:`sam3d.inference.windows.centred_origin`) and grown while the lesion touches
    its border (``growth``: a :class:`~sam3d.inference.windows.WindowGrowth` or its
    fields; default ``sam3d segment``'s), so validation scores the mask a user gets.
    Voxels no window covers are background.

    Args:
        roi_size: window edge in voxels (an int or three ints): the network's crop.
        growth: window growth; ``{"enabled": False}`` is the reference's single crop.

    Call: ``inputs`` ``B x 1 x H x W x D``, ``points`` ``B x N x 3`` voxel coordinates of
    ``inputs``, ``point_labels`` ``B x N`` -> logits ``B x 2 x H x W x D`` (``log(1 - p),
    log(p)``).
    """

    def __init__(
        self,
        roi_size: int | Sequence[int],
        growth: WindowGrowth | Mapping[str, Any] | None = None,
        amp: bool = True,
    ) -> None:
        super().__init__(roi_size=roi_size, growth=growth, amp=amp, output="logits")


class CentreClickNetwork(torch.nn.Module):
    """A promptable network whose clicks are optional: one positive click at the crop centre.

    For tools that call ``network(image)`` only (``monai.bundle verify_net_in_out``,
    ``ckpt_export``); clicks given as keywords pass through unchanged, so the same object
    serves the click inferers. Its state dict is the wrapped network's (no ``network.``
    prefix), so a plain ``model.pt`` of the wrapped network loads into it and back.

    ``image`` ``B x C x H x W x D`` (+ ``points`` ``B x N x 3``, ``point_labels`` ``B x N``)
    -> the wrapped network's logits.
    """

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network
        self.register_state_dict_post_hook(_strip_network_prefix)
        self.register_load_state_dict_pre_hook(_add_network_prefix)

    def __getattr__(self, name: str) -> Any:  # crop_size, encode, decode of the wrapped one
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("network"), name)

    def forward(
        self,
        image: torch.Tensor,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if points is None:
            b = image.shape[0]
            centre = torch.tensor(
                [(s - 1) / 2 for s in image.shape[2:]], dtype=torch.float32, device=image.device
            )
            points = centre.expand(b, 1, image.ndim - 2).contiguous()  # 3D or 2D
            point_labels = torch.ones(b, 1, dtype=torch.long, device=image.device)
        return self.network(image, points=points, point_labels=point_labels)


def _strip_network_prefix(module, state_dict, prefix, local_metadata) -> None:
    inner = prefix + "network."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner) :]] = state_dict.pop(key)


def _add_network_prefix(
    module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors
) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        if not key.startswith(prefix + "network."):
            state_dict[prefix + "network." + key[len(prefix) :]] = state_dict.pop(key)
