"""Read Segment Anything checkpoints safely and tell which model they hold.

Loading is ``torch.load(..., weights_only=True)`` only: a checkpoint is data,
never code. The 2D -> 3D weight mapping of the volumetric model and the loading
of TopoLoRA-SAM both start from :func:`load_sam_state_dict`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sam3d.errors import Sam3DError

# Encoder shapes of the official presets (segment_anything/build_sam.py).
SAM_VARIANTS: dict[str, dict[str, int]] = {
    "vit_b": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "vit_l": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "vit_h": {"embed_dim": 1280, "depth": 32, "num_heads": 16},
}

_REQUIRED_KEYS = ("image_encoder.patch_embed.proj.weight", "image_encoder.pos_embed")


@dataclass
class LoadReport:
    """What a weight mapping did: checkpoint keys used and ignored, new parameters."""

    used: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{len(self.used)} checkpoint tensors used, {len(self.ignored)} ignored, "
            f"{len(self.new)} parameters newly initialised"
        )


def load_sam_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an official segment_anything checkpoint (``sam_vit_b_01ec64.pth`` format).

    Accepts a plain state dict or one wrapped as ``{"model": state_dict}`` /
    ``{"state_dict": state_dict}``. Raises :class:`Sam3DError` for a missing file,
    a file torch cannot read, or a file that is not a SAM checkpoint.
    """
    p = Path(path)
    if not p.is_file():
        raise Sam3DError(f"SAM checkpoint not found: {p}")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except OSError as e:
        raise Sam3DError(f"cannot read SAM checkpoint {p}: {e.strerror or e}") from e
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise Sam3DError(
            f"{p} is not a readable PyTorch checkpoint ({type(e).__name__}: {str(e)[:200]})"
        ) from e
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


def map_sam_to_sam3d(state_dict: dict[str, torch.Tensor], model: torch.nn.Module) -> LoadReport:
    """Copy a SAM checkpoint's image-encoder weights into a :class:`~sam3d.models.Sam3D`.

    The mapping, key by key (``image_encoder.X`` -> ``encoder.X``):

    - ``patch_embed.proj.{weight,bias}``: SAM's 2D patch conv, folded with the new depth
      conv into the 3D patch embedding at run time (kept at its 2D shape);
    - ``pos_embed``: SAM's 64x64 absolute embedding (pooled to the token grid at run time);
    - ``blocks.i.{norm1,norm2,attn.qkv,attn.proj,attn.rel_pos_h,attn.rel_pos_w,mlp.lin1,
      mlp.lin2}``: as they are (relative-position tables are interpolated to the 3D window
      at run time);
    - ``blocks.i.attn.rel_pos_d`` (new) starts at the mean of ``rel_pos_h`` and ``rel_pos_w``.

    SAM's 2D neck, prompt encoder and mask decoder are ignored. Everything else in the model
    (adapters, depth conv, depth embedding, necks, prompt encoder, decoder) is new.
    Raises :class:`Sam3DError` when the checkpoint's encoder does not fit the model.
    """
    params = dict(model.named_parameters())
    enc = model.encoder
    check_encoder_shape(
        state_dict,
        embed_dim=enc.pos_embed.shape[-1],
        depth=len(enc.blocks),
        source="the SAM checkpoint",
    )
    report = LoadReport()
    targets: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        name = (
            "encoder." + key[len("image_encoder.") :] if key.startswith("image_encoder.") else None
        )
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
        h = targets.get(f"encoder.blocks.{i}.attn.rel_pos_h")
        w = targets.get(f"encoder.blocks.{i}.attn.rel_pos_w")
        if h is not None and w is not None:
            targets[f"encoder.blocks.{i}.attn.rel_pos_d"] = 0.5 * (h + w)
    with torch.no_grad():
        for name, value in targets.items():
            params[name].copy_(value.to(params[name].dtype))
    mapped = {k for k in targets if not k.endswith("attn.rel_pos_d")}
    report.new = [n for n in params if n not in mapped]
    return report
