"""MONAI pieces of the inference bundle (``bundles/kits/inference.json``).

The bundle reads VISTA3D-style prompts from the data dict (``points``: original voxel
indices ``N x 3``, ``point_labels``: 1 foreground, 0 background), maps them onto the
grid with :class:`~sam3d.inference.grid.ClicksToGridd`, and hands them to
:class:`ClickInferer` through ``PrepareBatchExtraInput``. Cases without prompts are
segmented automatically (sliding windows).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type

from sam3d.inference.auto import inside_body, sliding_window_probability
from sam3d.inference.grid import grid_spacing_mm
from sam3d.inference.windows import WindowGrowth, WindowPredictor, roi_tuple, select_seed_windows


def make_datalist(
    input_dict: Mapping[str, Any] | None = None,
    datalist: str | os.PathLike | None = None,
    key: str | None = None,
) -> list[dict[str, Any]]:
    """The cases of a run: one ``input_dict`` or the cases of a datalist file / folder."""
    from sam3d.inference.batch import list_cases

    if datalist:
        return list_cases(datalist, key=key)
    if input_dict:
        return [dict(input_dict)]
    raise ValueError("give input_dict (one case) or datalist (a JSON file or a folder)")


class ClickInferer(Inferer):
    """``inputs B x 1 x H x W x D`` + grid clicks -> tumour probability ``B x 1 x H x W x D``.

    With valid clicks: the window around them, grown while the lesion touches its
    border (:class:`~sam3d.inference.windows.WindowPredictor`). Without: sliding-window
    inference over the whole volume.

    Args:
        roi_size: window size; default the network's ``crop_size``.
        growth: :class:`WindowGrowth` or its fields as a dict.
        overlap: sliding-window overlap of the automatic mode.
        sw_batch_size: windows per forward pass in the automatic mode.
        amp: bfloat16 autocast on CUDA.
        output_device: where the automatic mode stitches the whole volume (the CPU, so
            GPU memory does not grow with the volume).
        air: the preprocessed value of air (the window's floor); the automatic mode then
            predicts nothing outside the body (:func:`~sam3d.inference.auto.inside_body`).
        output: ``"probability"`` (``B x 1``, the tumour probability) or ``"logits"``
            (``B x 2``: ``log(1 - p), log(p)``, whose softmax is ``[1 - p, p]``; what
            training's validation postprocessing expects).
    """

    def __init__(
        self,
        roi_size: int | Sequence[int] | None = None,
        growth: WindowGrowth | Mapping[str, Any] | None = None,
        overlap: float = 0.25,
        sw_batch_size: int = 2,
        amp: bool = True,
        output_device: str | torch.device = "cpu",
        output: str = "probability",
        air: float | None = None,
    ) -> None:
        super().__init__()
        self.air = air
        if output not in ("probability", "logits"):
            raise ValueError(f"output must be 'probability' or 'logits', got {output!r}")
        self.output = output
        self.output_device = torch.device(output_device)
        self.roi_size = roi_size
        self.growth = WindowGrowth(**growth) if isinstance(growth, Mapping) else growth
        self.overlap, self.sw_batch_size, self.amp = overlap, sw_batch_size, amp

    def __call__(
        self,
        inputs: torch.Tensor,
        network: Any,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        roi = roi_tuple(self.roi_size or network.crop_size)
        outs = []
        for b in range(inputs.shape[0]):
            volume = torch.as_tensor(inputs[b])
            pts = torch.zeros(0, 3) if points is None else torch.as_tensor(points[b]).float().cpu()
            labels = (
                torch.ones(len(pts), dtype=torch.long)
                if point_labels is None
                else torch.as_tensor(point_labels[b]).long().cpu()
            )
            if bool((labels >= 0).any()):
                predictor = WindowPredictor(
                    network,
                    volume,
                    roi,
                    growth=self.growth,
                    amp=self.amp,
                    spacing_mm=grid_spacing_mm(inputs[b]),
                )
                seeds = select_seed_windows(
                    pts[labels == 1], roi, predictor.shape, centre_on_all=True
                )
                prob = predictor.predict(pts, labels, seeds)
            else:
                prob = sliding_window_probability(
                    network,
                    volume,
                    roi,
                    overlap=self.overlap,
                    sw_batch_size=self.sw_batch_size,
                    sw_device=volume.device,
                    device=self.output_device,
                    amp=self.amp,
                )
                prob = inside_body(prob, volume[0], self.air)
            outs.append(prob[None])
        out = torch.stack([o.to(outs[0].device) for o in outs])
        if self.output == "logits":
            p = out.float().clamp(1e-6, 1 - 1e-6)
            out = torch.cat([torch.log1p(-p), torch.log(p)], dim=1)
        if isinstance(inputs, MetaTensor):  # keep the transform trace for Invertd
            out = convert_to_dst_type(out, inputs, device=out.device)[0]
        return out
