"""Read Segment Anything checkpoints and tell which model they hold.

Files are read by :func:`sam3d.models.checkpoint.read_checkpoint` (``weights_only``).
Every model built from SAM (the volumetric mapping, the planar wrappers) starts from
:func:`load_sam_state_dict`; the shapes of the official presets are those of
``configs/sam/``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sam3d.errors import Sam3DError
from sam3d.models.checkpoint import read_checkpoint
from sam3d.presets import preset_names, read_preset


def _official_variants() -> dict[str, dict[str, int]]:
    """Encoder shapes of the presets with official weights (``configs/sam/``)."""
    out = {}
    for name in preset_names("sam"):
        spec = read_preset("sam", name)
        if spec.get("official_checkpoint"):
            out[name] = {
                "embed_dim": spec["encoder_embed_dim"],
                "depth": spec["encoder_depth"],
                "num_heads": spec["encoder_num_heads"],
            }
    return out


SAM_VARIANTS: dict[str, dict[str, int]] = _official_variants()

_REQUIRED_KEYS = ("image_encoder.patch_embed.proj.weight", "image_encoder.pos_embed")


@dataclass
class LoadReport:
    """What a weight mapping did: checkpoint keys used and ignored, new parameters."""

    used: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    # whether the loaded SAM weights are then frozen (None: the loader does not say)
    sam_frozen: bool | None = None

    def summary(self) -> str:
        frozen = {None: "", True: "; SAM weights frozen", False: "; SAM weights trainable"}
        return (
            f"{len(self.used)} checkpoint tensors used, {len(self.ignored)} ignored, "
            f"{len(self.new)} parameters newly initialised{frozen[self.sam_frozen]}"
        )


def load_sam_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an official segment_anything checkpoint (``sam_vit_b_01ec64.pth`` format).

    Accepts a plain state dict or one wrapped as ``{"model": state_dict}`` /
    ``{"state_dict": state_dict}``. Raises :class:`Sam3DError` for a missing file,
    a file torch cannot read, or a file that is not a SAM checkpoint.
    """
    p = Path(path)
    obj = read_checkpoint(p, "PyTorch checkpoint of SAM weights")
    if isinstance(obj, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise Sam3DError(f"{p} does not hold a state dict of tensors; is it a SAM checkpoint?")
    missing = [k for k in _REQUIRED_KEYS if k not in obj]
    if missing:
        raise Sam3DError(
            f"{p} is not a Segment Anything checkpoint: it has no {', '.join(missing)} "
            "(expected the official sam_vit_{b,l,h}_*.pth key names)"
        )
    return obj


def sam_encoder_shape(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """Encoder shape of a SAM state dict: ``embed_dim``, ``depth``, ``num_heads``, ``patch_size``.

    ``num_heads`` is read from the relative-position tables (their width is the head
    dimension) where present.
    """
    w = state_dict["image_encoder.patch_embed.proj.weight"]
    embed_dim = int(w.shape[0])
    blocks = {
        int(k.split(".")[2])
        for k in state_dict
        if k.startswith("image_encoder.blocks.") and k.split(".")[2].isdigit()
    }
    depth = max(blocks) + 1 if blocks else 0
    rel = state_dict.get("image_encoder.blocks.0.attn.rel_pos_h")
    num_heads = embed_dim // int(rel.shape[1]) if rel is not None else 0
    return {
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "patch_size": int(w.shape[-1]),
    }


def detect_sam_variant(state_dict: dict[str, torch.Tensor]) -> str:
    """The official preset a state dict matches: ``vit_b``, ``vit_l``, ``vit_h`` or ``custom``."""
    shape = sam_encoder_shape(state_dict)
    for name, spec in SAM_VARIANTS.items():
        if all(shape[k] == v for k, v in spec.items()):
            return name
    return "custom"


def check_encoder_shape(
    state_dict: dict[str, torch.Tensor], embed_dim: int, depth: int, source: str = "checkpoint"
) -> None:
    """Raise :class:`Sam3DError` unless the checkpoint's encoder has this width and depth."""
    shape = sam_encoder_shape(state_dict)
    if shape["embed_dim"] != embed_dim or shape["depth"] != depth:
        found = detect_sam_variant(state_dict)
        wanted = next(
            (
                n
                for n, s in SAM_VARIANTS.items()
                if s["embed_dim"] == embed_dim and s["depth"] == depth
            ),
            f"embed_dim={embed_dim}, depth={depth}",
        )
        raise Sam3DError(
            f"{source} holds a SAM {found} encoder (embed_dim={shape['embed_dim']}, "
            f"depth={shape['depth']}) but the model needs {wanted}; "
            "pick the preset that matches the checkpoint"
        )
