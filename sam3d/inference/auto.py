"""Automatic mode: the promptable model over the whole volume without clicks.

MONAI's :class:`~monai.inferers.SlidingWindowInferer` runs the windows on the GPU
(``sw_device``) and stitches them on the CPU (``device``), so GPU memory does not
grow with the volume. Each window is decoded with one padding prompt (label -1),
which the prompt encoder ignores. Nothing is predicted outside the body
(:func:`inside_body`): a click model's automatic mode can otherwise mark blobs in the air.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer

# A windowed CT has air at the window's floor; a volume with fewer voxels there has no air.
MIN_AIR_FRACTION = 0.005


def body_mask(above_air: np.ndarray) -> np.ndarray:
    """The body: the largest 26-connected component of ``above_air`` (bool ``I x J x K``),
    holes filled slice by slice along each axis (lungs and bowel gas lie inside)."""
    from scipy import ndimage

    above = np.asarray(above_air, dtype=bool)
    if above.all() or not above.any():
        return np.ones(above.shape, dtype=bool)
    comps, _ = ndimage.label(above, structure=np.ones((3, 3, 3), dtype=bool))
    body = comps == 1 + int(np.argmax(np.bincount(comps.ravel())[1:]))
    for axis in range(3):
        filled = [ndimage.binary_fill_holes(s) for s in np.moveaxis(body, axis, 0)]
        body = np.moveaxis(np.stack(filled, axis=0), 0, axis)
    return body


def inside_body(prob: torch.Tensor, volume: torch.Tensor, air: float | None) -> torch.Tensor:
    """``prob`` (``H x W x D``) set to 0 outside the body of the preprocessed ``volume``
    (``H x W x D``, windowed and z-scored): the body is :func:`body_mask` of the voxels
    above ``air`` (the window's floor after the z-score,
    :func:`sam3d.data.pipelines.air_value`). A volume with (almost) no voxel at the floor
    has no air around it: all body. ``air`` None: ``prob`` unchanged."""
    if air is None:
        return prob
    at_floor = volume.detach().float().cpu() <= float(air) + 1e-4
    if float(at_floor.float().mean()) < MIN_AIR_FRACTION:
        return prob
    body = torch.from_numpy(body_mask((~at_floor).numpy()))
    return prob * body.to(prob.device, prob.dtype)


class PromptFreeNetwork(torch.nn.Module):
    """``windows B x 1 x H x W x D -> tumour probability B x 1 x H x W x D`` with no clicks."""

    def __init__(self, model: Any, amp: bool = True) -> None:
        super().__init__()
        self.model = model
        self.amp = amp

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        b = windows.shape[0]
        points = torch.zeros(b, 1, 3, device=windows.device)
        labels = torch.full((b, 1), -1, dtype=torch.long, device=windows.device)
        amp = self.amp and windows.device.type == "cuda"
        with torch.autocast(windows.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = self.model.decode(self.model.encode(windows), points, labels)
        return torch.softmax(logits.float(), dim=1)[:, 1:]


def sliding_window_probability(
    model: Any,
    volume: torch.Tensor,
    roi: Sequence[int],
    overlap: float = 0.25,
    sw_batch_size: int = 2,
    sw_device: str | torch.device | None = None,
    device: str | torch.device = "cpu",
    amp: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """Tumour probability ``H x W x D`` (on ``device``) of a preprocessed volume ``1 x H x W x D``.

    Windows of size ``roi`` overlap by ``overlap`` and are blended with Gaussian
    weights; volumes smaller than a window are padded by replication.
    """
    sw_device = torch.device(sw_device) if sw_device is not None else volume.device
    inferer = SlidingWindowInferer(
        roi_size=tuple(roi),
        sw_batch_size=sw_batch_size,
        overlap=overlap,
        mode="gaussian",
        padding_mode="replicate",
        sw_device=sw_device,
        device=torch.device(device),
        progress=progress,
    )
    net = PromptFreeNetwork(model, amp=amp)
    with torch.inference_mode():
        out = inferer(volume[None], net)
    return out[0, 0]
