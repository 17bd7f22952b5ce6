"""Build any segment_anything ``Sam`` from a preset, at any input size.

SAM's ViT shapes are written once, in ``configs/sam/<name>.json`` (``vit_b``, ``vit_l``,
``vit_h`` and the tests' ``tiny``). :func:`build_sam` composes the official modules
(imported, not copied) for a square input side and loads an official checkpoint into
them, resizing the position tables when the side is not 1024.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from sam3d.errors import Sam3DError
from sam3d.models.sam.checkpoint import check_encoder_shape, load_sam_state_dict
from sam3d.presets import preset_names, read_preset

SAM_SHAPE_KEYS = (
    "encoder_embed_dim",
    "encoder_depth",
    "encoder_num_heads",
    "encoder_global_attn_indexes",
)


def sam_preset(preset: str | os.PathLike | dict[str, Any]) -> dict[str, Any]:
    """The ``_build_sam`` shape kwargs (``encoder_*``) of a SAM preset name, path or dict."""
    spec = dict(preset) if isinstance(preset, dict) else read_preset("sam", preset)
    missing = [k for k in SAM_SHAPE_KEYS if k not in spec]
    if missing:
        raise Sam3DError(f"SAM preset {preset!r} lacks {', '.join(missing)}")
    return {k: spec[k] for k in SAM_SHAPE_KEYS}


def sam_preset_names() -> list[str]:
    """Names of the SAM presets in ``configs/sam/``."""
    return preset_names("sam")


def compose_sam(spec: dict[str, Any], image_size: int = 1024) -> Sam:
    """segment_anything's ``_build_sam`` with the input side as a parameter (1024 there).

    Args:
        spec: the ``encoder_*`` shape kwargs (see :func:`sam_preset`).
        image_size: square input side in pixels, a multiple of 16; the image embedding is
            ``256 x image_size/16 x image_size/16``.
    """
    if image_size < 64 or image_size % 16:
        raise Sam3DError(f"image_size must be a multiple of 16 and at least 64, got {image_size}")
    patch = 16
    grid = image_size // patch
    return Sam(
        image_encoder=ImageEncoderViT(
            depth=spec["encoder_depth"],
            embed_dim=spec["encoder_embed_dim"],
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=spec["encoder_num_heads"],
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=spec["encoder_global_attn_indexes"],
            window_size=14,
            out_chans=256,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    ).eval()


def resize_sam_state_dict(
    state: dict[str, torch.Tensor], sam: torch.nn.Module
) -> dict[str, torch.Tensor]:
    """Fit a 1024-input SAM state dict to a model built for another input side.

    The absolute position embedding (``1 x g x g x C``) is resized bicubically and the
    global blocks' relative-position tables (``2g-1 x head_dim``) linearly, as
    segment_anything's ``get_rel_pos`` does at run time; other tensors pass through.
    ``sam`` is any module whose state-dict keys follow SAM's (a ``Sam`` or a wrapper's
    ``sam`` attribute).
    """
    target = sam.state_dict()
    out = dict(state)
    for key, value in state.items():
        want = target.get(key)
        if want is None or want.shape == value.shape:
            continue
        if key.endswith("pos_embed") and value.ndim == 4:
            x = value.permute(0, 3, 1, 2).float()
            x = F.interpolate(x, want.shape[1:3], mode="bicubic", align_corners=False)
            out[key] = x.permute(0, 2, 3, 1).to(value.dtype)
        elif ".rel_pos_" in key and value.ndim == 2:
            x = value.t()[None].float()
            x = F.interpolate(x, size=want.shape[0], mode="linear", align_corners=False)
            out[key] = x[0].t().to(value.dtype)
    return out


def build_sam(
    preset: str | dict = "vit_b",
    sam_checkpoint: str | os.PathLike | None = None,
    image_size: int = 1024,
) -> Sam:
    """An official ``Sam`` of a preset (name, path or shape dict), weights from a checkpoint.

    Weights are read by :func:`sam3d.models.sam.checkpoint.load_sam_state_dict`
    (``weights_only``); a checkpoint of another encoder size raises :class:`Sam3DError`.
    ``image_size`` other than SAM's 1024 (a multiple of 16; cheaper, e.g. for CPU tests)
    resizes the checkpoint's position tables with :func:`resize_sam_state_dict`.
    """
    spec = sam_preset(preset)
    sam = compose_sam(spec, int(image_size))
    if sam_checkpoint is not None:
        state = load_sam_state_dict(sam_checkpoint)
        check_encoder_shape(
            state, spec["encoder_embed_dim"], spec["encoder_depth"], source=str(sam_checkpoint)
        )
        try:
            sam.load_state_dict(resize_sam_state_dict(state, sam))
        except RuntimeError as e:
            raise Sam3DError(
                f"{sam_checkpoint} does not fit the SAM preset: {str(e).splitlines()[0]}"
            ) from e
    return sam
