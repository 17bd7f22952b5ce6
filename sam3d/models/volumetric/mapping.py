"""Map an official SAM checkpoint's 2D image-encoder weights into the 3D encoder of Sam3D.

:func:`map_sam_to_encoder3d` is :meth:`ImageEncoder3D.load_pretrained
<sam3d.models.volumetric.encoder3d.ImageEncoder3D.load_pretrained>` (the encoder seam's
checkpoint mapping); :func:`map_sam_to_sam3d` runs it for a whole Sam3D.
"""

from __future__ import annotations

import torch

from sam3d.errors import Sam3DError
from sam3d.models.sam.checkpoint import LoadReport, check_encoder_shape


def map_sam_to_sam3d(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> LoadReport:
    """Copy a SAM checkpoint's image-encoder weights into a :class:`~sam3d.models.Sam3D`
    through its encoder's ``load_pretrained``; ``new`` then lists every model parameter
    left initialised (``encoder.*``, ``prompt_encoder.*``, ``decoder.*``)."""
    report = model.encoder.load_pretrained(state_dict)
    new_in_encoder = {"encoder." + n for n in report.new}
    report.new = [
        n
        for n, _ in model.named_parameters()
        if n in new_in_encoder or not n.startswith("encoder.")
    ]
    return report


def map_sam_to_encoder3d(
    state_dict: dict[str, torch.Tensor], encoder: torch.nn.Module
) -> LoadReport:
    """Copy a SAM checkpoint's image-encoder weights into an ``ImageEncoder3D``.

    The mapping, key by key (``image_encoder.X`` -> ``X``):

    - ``patch_embed.proj.{weight,bias}``: SAM's 2D patch conv, folded with the new depth
      conv into the 3D patch embedding at run time (kept at its 2D shape);
    - ``pos_embed``: SAM's 64x64 absolute embedding (pooled to the token grid at run time);
    - ``blocks.i.{norm1,norm2,attn.qkv,attn.proj,attn.rel_pos_h,attn.rel_pos_w,mlp.lin1,
      mlp.lin2}``: as they are (relative-position tables are interpolated to the 3D window
      at run time);
    - ``blocks.i.attn.rel_pos_d`` (new) starts at the mean of ``rel_pos_h`` and ``rel_pos_w``.

    SAM's 2D neck, prompt encoder and mask decoder are ignored. Everything else in the
    encoder (adapters, depth conv, depth embedding, necks) is new (``report.new``, names
    relative to the encoder). Raises :class:`Sam3DError` when the checkpoint's encoder does
    not fit.
    """
    params = dict(encoder.named_parameters())
    enc = encoder
    check_encoder_shape(
        state_dict,
        embed_dim=enc.pos_embed.shape[-1],
        depth=len(enc.blocks),
        source="the SAM checkpoint",
    )
    report = LoadReport()
    targets: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = key[len("image_encoder.") :] if key.startswith("image_encoder.") else None
        if name is None or name not in params:
            report.ignored.append(key)
            continue
        if tuple(params[name].shape) != tuple(value.shape):
            raise Sam3DError(
                f"the SAM checkpoint's {key} has shape {tuple(value.shape)} but the model needs "
                f"{tuple(params[name].shape)}; pick the preset that matches the checkpoint"
            )
        targets[name] = value
        report.used.append(key)
    for i in range(len(enc.blocks)):
        h = targets.get(f"blocks.{i}.attn.rel_pos_h")
        w = targets.get(f"blocks.{i}.attn.rel_pos_w")
        if h is not None and w is not None:
            targets[f"blocks.{i}.attn.rel_pos_d"] = 0.5 * (h + w)
    with torch.no_grad():
        for name, value in targets.items():
            params[name].copy_(value.to(params[name].dtype))
    mapped = {k for k in targets if not k.endswith("attn.rel_pos_d")}
    report.new = [n for n in params if n not in mapped]
    return report
