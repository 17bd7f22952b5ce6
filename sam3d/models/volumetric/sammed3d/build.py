"""Presets and the builder of :class:`~sam3d.models.volumetric.sammed3d.model.SamMed3D`.

``build_sammed3d("vit_b_ori")`` is the published model (``configs/sammed3d/``);
``build_sammed3d("tiny")`` the tests' one. Official weights load with
:func:`~sam3d.models.volumetric.sammed3d.checkpoint.load_official` (``checkpoint=`` here).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from sam3d.errors import Sam3DError
from sam3d.models.volumetric.sammed3d.image_encoder3d import ImageEncoder3D
from sam3d.models.volumetric.sammed3d.mask_decoder3d import MaskDecoder3D
from sam3d.models.volumetric.sammed3d.model import SamMed3D
from sam3d.models.volumetric.sammed3d.prompt_encoder3d import PromptEncoder3D
from sam3d.presets import preset_names, read_preset

logger = logging.getLogger(__name__)

# Every key a preset may set, with the published model's value as default.
PRESET_DEFAULTS: dict[str, Any] = {
    "name": "custom",
    "description": "",
    "image_size": 128,
    "patch_size": 16,
    "embed_dim": 768,
    "depth": 12,
    "num_heads": 12,
    "global_attn_indexes": [2, 5, 8, 11],
    "window_size": 14,
    "mlp_ratio": 4.0,
    "prompt_embed_dim": 384,
    "mask_in_chans": 16,
    "decoder_depth": 2,
    "decoder_heads": 8,
    "decoder_mlp_dim": 2048,
    "iou_head_depth": 3,
    "iou_head_hidden_dim": 256,
    "num_multimask_outputs": 3,
    # "foreground_zscore": each crop z-scored over its voxels > 0 in encode (the reference)
    "input_norm": "foreground_zscore",
}
INPUT_NORMS = ("foreground_zscore", "none")


def available_presets() -> list[str]:
    """Names of the presets in ``configs/sammed3d/``."""
    return preset_names("sammed3d")


def resolve_preset(preset: str | os.PathLike | dict[str, Any], **overrides) -> dict[str, Any]:
    """A full preset dict from a name, a JSON path or a dict, with overrides applied."""
    cfg = dict(preset) if isinstance(preset, dict) else read_preset("sammed3d", preset)
    cfg.update(overrides)
    unknown = sorted(set(cfg) - set(PRESET_DEFAULTS))
    if unknown:
        raise Sam3DError(f"unknown SAM-Med3D option(s) {', '.join(unknown)}")
    cfg = {**PRESET_DEFAULTS, **cfg}
    if cfg["input_norm"] not in INPUT_NORMS:
        raise Sam3DError(f"input_norm must be one of {', '.join(INPUT_NORMS)}")
    if cfg["image_size"] % cfg["patch_size"] or (cfg["image_size"] // cfg["patch_size"]) % 2:
        raise Sam3DError("image_size must be an even multiple of patch_size")
    return cfg


def build_sammed3d(
    preset: str | os.PathLike | dict[str, Any] = "vit_b_ori",
    checkpoint: str | os.PathLike | None = None,
    **overrides,
) -> SamMed3D:
    """A :class:`SamMed3D` of a preset, random weights or an official / medim checkpoint.

    Args:
        preset: ``"vit_b_ori"``, ``"tiny"``, a JSON path or a dict (``model.config``).
        checkpoint: an official ``.pth`` (``model_state_dict``) or a medim / plain state
            dict; its :class:`~sam3d.models.volumetric.sammed3d.checkpoint.OfficialLoadReport`
            is ``model.load_report``.
        overrides: preset keys to change.
    """
    cfg = resolve_preset(preset, **overrides)
    grid = cfg["image_size"] // cfg["patch_size"]
    dim = cfg["prompt_embed_dim"]
    model = SamMed3D(
        ImageEncoder3D(
            img_size=cfg["image_size"],
            patch_size=cfg["patch_size"],
            embed_dim=cfg["embed_dim"],
            depth=cfg["depth"],
            num_heads=cfg["num_heads"],
            mlp_ratio=cfg["mlp_ratio"],
            window_size=cfg["window_size"],
            global_attn_indexes=tuple(cfg["global_attn_indexes"]),
            out_dim=dim,
        ),
        PromptEncoder3D(dim, (grid,) * 3, (cfg["image_size"],) * 3, cfg["mask_in_chans"]),
        MaskDecoder3D(
            dim,
            num_multimask_outputs=cfg["num_multimask_outputs"],
            depth=cfg["decoder_depth"],
            num_heads=cfg["decoder_heads"],
            mlp_dim=cfg["decoder_mlp_dim"],
            iou_head_depth=cfg["iou_head_depth"],
            iou_head_hidden_dim=cfg["iou_head_hidden_dim"],
        ),
        config=cfg,
    )
    if checkpoint is not None:
        from sam3d.models.volumetric.sammed3d.checkpoint import load_official

        model.load_report = load_official(model, checkpoint)
        logger.info("SAM-Med3D weights from %s: %s", checkpoint, model.load_report.summary())
    return model
