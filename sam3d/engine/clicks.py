"""Clicks through MONAI engines: batch preparation, the click-centred crop inferer, and an
image-only view of a promptable network for ``verify_net_in_out``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.engines import PrepareBatchExtraInput
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type


def click_prepare_batch() -> PrepareBatchExtraInput:
    """Hand ``points`` / ``point_labels`` of a batch to the inferer and network as kwargs."""
    return PrepareBatchExtraInput(extra_keys={"points": "points", "point_labels": "point_labels"})


def window_start(centre: float, roi: int, size: int) -> int:
    """Start of a ``roi``-voxel window centred on ``centre``, shifted inside ``size`` voxels."""
    return int(min(max(round(centre) - roi // 2, 0), max(size - roi, 0)))


class ClickCropInferer(Inferer):
    """The reference's single-click protocol: one window centred on the clicks.

    For each volume the network sees one ``roi_size`` crop centred on the mean of its
    positive clicks (the first valid click if none is positive), shifted inward at the
    borders and padded with the volume's minimum where the volume is smaller. The crop's
    logits are pasted into a whole-volume map that is background everywhere else, so
    Dice and NSD are computed on the whole volume (lesions beyond the crop count as missed).

    Args:
        roi_size: crop edge in voxels (an int or three ints).
        background_logit: the logit of the non-background classes outside the crop
            (class 0 gets 0 there).

    Call: ``inputs`` ``B x 1 x H x W x D``, ``points`` ``B x N x 3`` voxel indices of
    ``inputs``, ``point_labels`` ``B x N`` -> logits ``B x K x H x W x D``.
    """

    def __init__(self, roi_size: int | Sequence[int], background_logit: float = -20.0) -> None:
        super().__init__()
        sizes = [roi_size] * 3 if isinstance(roi_size, int) else list(roi_size)
        self.roi_size = [int(r) for r in sizes]
        self.background_logit = float(background_logit)

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: Callable[..., torch.Tensor],
        *args: Any,
        points: torch.Tensor,
        point_labels: torch.Tensor,
        **kwargs: Any,
    ) -> torch.Tensor:
        x = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
        spatial = list(x.shape[2:])
        out: torch.Tensor | None = None
        for b in range(x.shape[0]):
            pts = points[b].to(torch.float32)
            lab = point_labels[b]
            chosen = pts[lab == 1] if bool((lab == 1).any()) else pts[lab >= 0][:1]
            centre = chosen.mean(0).tolist() if chosen.numel() else [s / 2 for s in spatial]
            starts = [window_start(c, r, s) for c, r, s in zip(centre, self.roi_size, spatial)]
            pad = [max(r - s, 0) for r, s in zip(self.roi_size, spatial)]
            vol = x[b : b + 1]
            if any(pad):
                flat = [v for p in reversed(pad) for v in (0, p)]
                vol = torch.nn.functional.pad(vol, flat, value=float(vol.min()))
            crop = vol[
                ...,
                starts[0] : starts[0] + self.roi_size[0],
                starts[1] : starts[1] + self.roi_size[1],
                starts[2] : starts[2] + self.roi_size[2],
            ]
            shift = torch.tensor(starts, dtype=torch.float32, device=pts.device)
            logits = network(
                crop, *args, points=(pts - shift)[None], point_labels=lab[None], **kwargs
            )
            if out is None:
                out = torch.full(
                    (x.shape[0], logits.shape[1], *spatial), self.background_logit,
                    dtype=logits.dtype, device=logits.device,
                )  # fmt: skip
                out[:, 0] = 0
            keep = [min(r, s - st) for r, s, st in zip(self.roi_size, spatial, starts)]
            out[
                b,
                :,
                starts[0] : starts[0] + keep[0],
                starts[1] : starts[1] + keep[1],
                starts[2] : starts[2] + keep[2],
            ] = logits[0, :, : keep[0], : keep[1], : keep[2]]
        assert out is not None
        return convert_to_dst_type(out, inputs)[0] if hasattr(inputs, "meta") else out


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
            points = centre.expand(b, 1, 3).contiguous()
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
