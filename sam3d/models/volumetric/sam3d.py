"""Sam3D: encode a crop once, prompt it with clicks many times; presets and checkpoints.

``build_sam3d("vit_b", sam_checkpoint="sam_vit_b_01ec64.pth")`` builds the 3DSAM-adapter
model from an official SAM checkpoint; ``build_sam3d("tiny")`` is the same classes with
small numbers for tests. Presets are JSON files in ``configs/model/``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sam3d.errors import Sam3DError
from sam3d.models.checkpoint import load_trained, save_trained
from sam3d.models.protocol import parameter_groups
from sam3d.models.registry import get_kind, model_preset
from sam3d.models.sam.build import sam_preset
from sam3d.models.volumetric.backbone import VolumeEncoder
from sam3d.models.volumetric.decoder3d import MLADecoder3D
from sam3d.models.volumetric.encoder3d import ImageEncoder3D
from sam3d.models.volumetric.mask_prompt3d import MaskPrompt3D
from sam3d.models.volumetric.prompt3d import PromptEncoder3D
from sam3d.presets import CONFIG_DIR, preset_names

logger = logging.getLogger(__name__)

PRESET_DIR = CONFIG_DIR / get_kind("sam3d").presets

# The encoder's shape: from the SAM preset named by ``sam`` (configs/sam/, the one place
# ViT shapes are written) unless a preset sets it itself.
SHAPE_FROM_SAM = {
    "embed_dim": "encoder_embed_dim",
    "depth": "encoder_depth",
    "num_heads": "encoder_num_heads",
    "global_attn_indexes": "encoder_global_attn_indexes",
}
# Every other key a preset may set, with its default.
PRESET_OPTIONS: dict[str, Any] = {
    "name": "custom",
    "sam": "vit_b",  # the SAM preset (configs/sam/) whose encoder shape the 3D encoder takes
    "sam_window_size": 14,
    "sam_img_size": 1024,
    "patch_size": 16,
    "upsample": 4,
    "crop_size": 128,
    "window_size": 8,
    "shift_size": 4,
    "adapter_dim": 384,
    "neck_blocks": [3, 6, 9, 12],
    "neck_dim": 256,
    "prompt_depth": 2,
    "prompt_heads": 8,
    "prompt_mlp_dim": 2048,
    "num_global_queries": 10,
    "decoder_dim": 128,
    "num_classes": 2,
    "use_checkpoint": False,
    # the previous prediction as a dense prompt (MaskPrompt3D); off: the reference model
    "mask_prompt": False,
    # "auto": freeze SAM's weights only when they were loaded from a SAM checkpoint;
    # True / False force it (random SAM weights frozen would stay random for ever).
    "freeze_sam": "auto",
}


@dataclass
class Sam3DFeatures:
    """What :meth:`Sam3D.encode` keeps for prompting: keep it, prompt it again and again.

    Attributes:
        prompt_map: the last neck map ``B x neck_dim x h x w x d``, which the clicks prompt.
        context: the decoder's click-independent part (the other neck maps and the crop
            downsampled x2, through their heads and the fuse conv), ``B x decoder_dim x 2h x
            2w x 2d``; see :meth:`MLADecoder3D.context`.
        image_shape: the crop's ``(H, W, D)`` in voxels.
    """

    prompt_map: torch.Tensor
    context: torch.Tensor
    image_shape: tuple[int, int, int]

    def to(self, *args, **kwargs) -> Sam3DFeatures:
        return Sam3DFeatures(
            self.prompt_map.to(*args, **kwargs), self.context.to(*args, **kwargs), self.image_shape
        )

    def select(self, index: int | slice | torch.Tensor) -> Sam3DFeatures:
        """Features of some batch items (e.g. ``features.select(slice(0, 1))``)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Sam3DFeatures(self.prompt_map[index], self.context[index], self.image_shape)


class Sam3D(nn.Module):
    """Promptable 3D segmentation: a 3D encoder, visual-sampler prompts, MLA decoder.

    The encoder is any :class:`~sam3d.models.volumetric.backbone.VolumeEncoder` (SAM's 3D
    ViT, :class:`ImageEncoder3D`, from :func:`build_sam3d`).

    Inputs are crops ``B x 1 x H x W x D`` (sides multiples of 4; the model is built for
    ``crop_size``), already windowed and z-scored; clicks are voxel coordinates (i, j, k) in
    the crop. Outputs are 2-class logits ``B x 2 x H x W x D`` (background, tumour).
    """

    def __init__(
        self,
        encoder: ImageEncoder3D,
        prompt_encoder: PromptEncoder3D,
        decoder: MLADecoder3D,
        crop_size: int,
        config: dict[str, Any] | None = None,
        mask_prompt: MaskPrompt3D | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(encoder, VolumeEncoder):
            raise TypeError(
                f"Sam3D's encoder must be a VolumeEncoder, got {type(encoder).__name__}"
            )
        self.encoder = encoder
        self.prompt_encoder = prompt_encoder
        self.decoder = decoder
        # the previous prediction as a dense prompt (zero-initialised: a no-op until trained)
        self.mask_prompt = mask_prompt
        # what load_trained_weights lets an older checkpoint lack
        self.optional_state_prefixes = ("mask_prompt.",) if mask_prompt is not None else ()
        self.register_load_state_dict_post_hook(_allow_missing_mask_prompt)
        self.crop_size = int(crop_size)
        self.config = dict(config) if config is not None else None  # what it is rebuilt from
        self.load_report = None
        self.sam_frozen = False  # whether the encoder's pre-trained weights are frozen

    @property
    def preset(self) -> dict[str, Any]:
        """The older name of :attr:`config` (read-only)."""
        return self.config or {}

    @property
    def voxels_per_token(self) -> int:
        return self.encoder.voxels_per_token

    def encode(self, images: torch.Tensor) -> Sam3DFeatures:
        """``B x 1 x H x W x D`` crops -> :class:`Sam3DFeatures` (runs the ViT once)."""
        if images.ndim != 5 or images.shape[1] != 1:
            raise ValueError(f"images must be B x 1 x H x W x D, got {tuple(images.shape)}")
        shape = tuple(int(s) for s in images.shape[2:])
        vpt = self.voxels_per_token
        if any(s % vpt for s in shape):
            raise ValueError(f"crop sides {shape} must be multiples of {vpt} voxels")
        *levels, last = self.encoder(images)
        small = F.interpolate(
            images, size=tuple(s // 2 for s in shape), mode="trilinear", align_corners=False
        )
        return Sam3DFeatures(last, self.decoder.context(levels, small), shape)

    def decode(
        self,
        features: Sam3DFeatures,
        points: torch.Tensor,
        point_labels: torch.Tensor | None = None,
        mask_prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Prompt kept features with clicks (and the previous mask).

        Args:
            features: from :meth:`encode`.
            points: ``B x N x 3`` float voxel coordinates (i, j, k) in the crop.
            point_labels: ``B x N`` long: 1 positive, 0 negative, -1 padding. None: all 1.
            mask_prompt: the previous prediction as foreground probabilities in [0, 1],
                ``B x 1 x H x W x D`` at crop resolution (``mask_prompt_from_logits`` of the
                last logits); None: the reference model, clicks only.

        Returns:
            logits ``B x num_classes x H x W x D``.
        """
        if point_labels is None:
            point_labels = torch.ones(points.shape[:2], dtype=torch.long, device=points.device)
        prompt_map, fine = features.prompt_map, None
        if mask_prompt is not None:
            if self.mask_prompt is None:
                raise ValueError(
                    "this Sam3D has no mask prompt (built with mask_prompt=False, or from a "
                    "checkpoint made without one): call decode without mask_prompt"
                )
            tokens, fine = self.mask_prompt(mask_prompt)
            prompt_map = prompt_map + tokens.to(prompt_map.dtype)
        prompted = self.prompt_encoder(prompt_map, points, point_labels, features.image_shape)
        return self.decoder.decode(prompted, features.context, features.image_shape, fine)

    def forward(
        self,
        images: torch.Tensor,
        points: torch.Tensor,
        point_labels: torch.Tensor | None = None,
        mask_prompt: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``decode(encode(images), points, point_labels, mask_prompt)``: logits
        ``B x classes x H x W x D``."""
        return self.decode(self.encode(images), points, point_labels, mask_prompt)

    def trainable_parameters(self) -> list[dict[str, Any]]:
        """Named optimizer groups: ``encoder``, ``prompt_encoder``, ``decoder``, ``mask_prompt``
        (trainable only; the last one when built with a mask prompt)."""
        parts = {"mask_prompt": self.mask_prompt} if self.mask_prompt is not None else {}
        return parameter_groups(
            encoder=self.encoder, prompt_encoder=self.prompt_encoder, decoder=self.decoder, **parts
        )

    def set_reference(self, enabled: bool = True) -> Sam3D:
        """Switch to the anchor's slow formulation (512^3 upsample, explicit attention)."""
        self.encoder.set_reference(enabled)
        return self


def _allow_missing_mask_prompt(module: Sam3D, incompatible: Any) -> None:
    """A checkpoint from before the mask prompt loads: its weights stay zero (a no-op)."""
    if module.mask_prompt is None:
        return
    missing = [k for k in incompatible.missing_keys if ".mask_prompt." in "." + k]
    if missing and len(missing) == len(module.mask_prompt.state_dict()):
        for key in missing:
            incompatible.missing_keys.remove(key)
        for proj in (module.mask_prompt.token_proj, module.mask_prompt.fine_proj):
            nn.init.zeros_(proj.weight)  # as built: zero output whatever the mask
            nn.init.zeros_(proj.bias)
        logger.warning(
            "weights without the mask prompt's (made before it existed): its output stays "
            "zero, the previous mask changes nothing until it is trained"
        )


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"total": n, "trainable": n}`` parameter counts."""
    params = list(model.parameters())
    return {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
    }


def available_presets() -> list[str]:
    """Names of the presets in ``configs/model/``."""
    return preset_names(get_kind("sam3d").presets)


def resolve_preset(preset: str | os.PathLike | dict[str, Any], **overrides) -> dict[str, Any]:
    """A full preset dict from a name, a JSON path or a dict, with overrides applied.

    The encoder's width, depth, heads and global blocks come from the SAM preset named
    by ``sam`` (``configs/sam/``) unless the preset sets them itself.
    """
    cfg = dict(preset) if isinstance(preset, dict) else model_preset("sam3d", preset)
    cfg.update(overrides)
    unknown = sorted(set(cfg) - set(PRESET_OPTIONS) - set(SHAPE_FROM_SAM))
    if unknown:
        raise Sam3DError(f"unknown model option(s) {', '.join(unknown)}")
    shape = sam_preset(cfg.get("sam", PRESET_OPTIONS["sam"]))
    from_sam = {key: shape[sam_key] for key, sam_key in SHAPE_FROM_SAM.items()}
    from_sam["global_attn_indexes"] = list(from_sam["global_attn_indexes"])
    return {**PRESET_OPTIONS, **from_sam, **cfg}


def build_sam3d(
    preset: str | dict[str, Any] = "vit_b",
    sam_checkpoint: str | os.PathLike | None = None,
    **overrides,
) -> Sam3D:
    """Build a :class:`Sam3D` from a preset, optionally mapping an official SAM checkpoint.

    Args:
        preset: ``"vit_b"``, ``"vit_l"``, ``"vit_h"``, ``"tiny"``, a JSON path or a dict.
        sam_checkpoint: a segment_anything checkpoint (``sam_vit_b_01ec64.pth`` format) whose
            image-encoder weights are mapped into the 3D encoder; None: random init.
        overrides: preset keys to change (e.g. ``use_checkpoint=True``).

    The encoder is built as a :class:`~sam3d.models.volumetric.backbone.VolumeEncoder`
    (:class:`ImageEncoder3D`) and the checkpoint goes through that interface
    (``read_pretrained``, ``load_pretrained``, ``freeze_pretrained``); the mapping's
    :class:`~sam3d.models.sam.checkpoint.LoadReport` is kept as ``model.load_report``.

    What trains: with ``freeze_sam="auto"`` (the presets' default) SAM's weights (patch
    conv, position, attention, MLP) are frozen only when they were loaded from
    ``sam_checkpoint``; from random initialisation everything trains. ``freeze_sam=True``
    / ``False`` force either. The decision is ``model.sam_frozen``, logged, and said in
    the load report.
    """
    cfg = resolve_preset(preset, **overrides)
    freeze = resolve_freeze(cfg["freeze_sam"], loaded=sam_checkpoint is not None)
    encoder = sam_encoder3d(cfg)
    prompt_encoder = PromptEncoder3D(
        dim=encoder.out_channels,
        depth=cfg["prompt_depth"],
        num_heads=cfg["prompt_heads"],
        mlp_dim=cfg["prompt_mlp_dim"],
        num_queries=cfg["num_global_queries"],
    )
    decoder = MLADecoder3D(
        in_dim=encoder.out_channels,
        dim=cfg["decoder_dim"],
        num_classes=cfg["num_classes"],
        num_levels=encoder.num_levels,
    )
    mask_prompt = None
    if cfg["mask_prompt"]:
        mask_prompt = MaskPrompt3D(
            encoder.out_channels, cfg["decoder_dim"], encoder.voxels_per_token
        )
    model = Sam3D(
        encoder, prompt_encoder, decoder, cfg["crop_size"], config=cfg, mask_prompt=mask_prompt
    )
    if sam_checkpoint is not None:
        from sam3d.models.volumetric.mapping import map_sam_to_sam3d

        report = map_sam_to_sam3d(encoder.read_pretrained(sam_checkpoint), model)
        report.sam_frozen = freeze
        logger.info("SAM weights from %s: %s", sam_checkpoint, report.summary())
        model.load_report = report
    if freeze:
        model.encoder.freeze_pretrained()
    model.sam_frozen = freeze
    if sam_checkpoint is None:
        logger.info(
            "SAM weights: random initialisation (no sam_checkpoint); SAM-derived weights %s "
            "(freeze_sam=%s)", "frozen" if freeze else "trainable", cfg["freeze_sam"],
        )  # fmt: skip
    return model


def sam_encoder3d(cfg: dict[str, Any]) -> ImageEncoder3D:
    """SAM's 3D-adapted ViT of a resolved Sam3D preset (:func:`resolve_preset`), unfrozen."""
    return ImageEncoder3D(
        embed_dim=cfg["embed_dim"],
        depth=cfg["depth"],
        num_heads=cfg["num_heads"],
        global_attn_indexes=cfg["global_attn_indexes"],
        sam_window_size=cfg["sam_window_size"],
        sam_img_size=cfg["sam_img_size"],
        patch_size=cfg["patch_size"],
        upsample=cfg["upsample"],
        crop_size=cfg["crop_size"],
        window_size=cfg["window_size"],
        shift_size=cfg["shift_size"],
        adapter_dim=cfg["adapter_dim"],
        neck_blocks=cfg["neck_blocks"],
        neck_dim=cfg["neck_dim"],
        use_checkpoint=cfg["use_checkpoint"],
        freeze_sam=False,
    )


def resolve_freeze(freeze_sam: bool | str, loaded: bool) -> bool:
    """Whether SAM's weights freeze: ``"auto"`` -> ``loaded`` (from a SAM checkpoint)."""
    if isinstance(freeze_sam, str):
        if freeze_sam.lower() != "auto":
            raise Sam3DError(f"freeze_sam must be true, false or 'auto', got {freeze_sam!r}")
        return bool(loaded)
    return bool(freeze_sam)


def save_sam3d_checkpoint(
    model: Sam3D, path: str | os.PathLike, meta: dict[str, Any] | None = None, **extra: Any
) -> Path:
    """Write the trained-checkpoint format (:func:`sam3d.models.checkpoint.save_trained`)."""
    return save_trained(path, model, dict(model.config or {}), meta, "sam3d", **extra)


def load_sam3d_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[Sam3D, dict[str, Any]]:
    """Rebuild a trained :class:`Sam3D` (:func:`sam3d.models.checkpoint.load_trained`).

    Returns the model (eval mode) and its metadata: the ``meta`` dict merged with every
    other top-level entry (e.g. ``dataset``). Raises :class:`Sam3DError` for a missing,
    unreadable or foreign file, or weights that do not fit the stored preset.
    """
    model, meta = load_trained(path, map_location, kind="sam3d", what="Sam3D checkpoint")
    meta.pop("model", None)
    return model, meta  # type: ignore[return-value]
