"""Automatic mode: the promptable model over the whole volume without clicks.

MONAI's :class:`~monai.inferers.SlidingWindowInferer` runs the windows on the GPU
(``sw_device``) and stitches them on the CPU (``device``), so GPU memory does not
grow with the volume. Each window is decoded with one padding prompt (label -1),
which the prompt encoder ignores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.inferers import SlidingWindowInferer


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
