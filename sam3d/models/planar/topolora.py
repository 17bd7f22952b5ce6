"""TopoLoRA-SAM: prompt-free thin-structure segmentation around segment_anything's ``Sam``.

The official ``Sam`` is used as built (imported, not copied):

- image encoder frozen, with LoRA (rank 8, alpha 16) on every block's FFN linears
  (``mlp.lin1``, ``mlp.lin2``);
- a residual spatial adapter on the ``B x 256 x 64 x 64`` image embedding
  (depthwise 3x3 -> 1x1 -> norm -> GELU -> 1x1). Its last conv starts at zero, so at
  step 0 the model's logits are exactly the official SAM's prompt-free logits; its
  norm is a channel LayerNorm, which behaves the same at batch 1 as at any batch;
- prompt-free decoding: empty sparse prompt, SAM's ``no_mask_embed`` dense prompt,
  one mask; the prompt encoder stays frozen, the mask decoder is trained.

Images of any size go to SAM's 1024 input the official way (longest side resized to
1024, normalised, zero-padded) and the logits come back to the image's own ``H x W``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling import (
    Sam,
)
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.utils.transforms import ResizeLongestSide
from torch import nn

from sam3d.errors import Sam3DError
from sam3d.models.protocol import parameter_groups
from sam3d.models.sam.build import build_sam
from sam3d.models.sam.lora import count_lora_parameters, inject_lora, lora_parameters
from sam3d.models.sam.memory import use_block_checkpointing, use_fused_attention


class SpatialAdapter(nn.Module):
    """Residual conv adapter: ``x + up(GELU(norm(pw(dw(x)))))`` on ``B x C x h x w``.

    Args:
        channels: embedding channels ``C`` (256 for SAM).
        norm: ``"layer"`` (channel LayerNorm, batch-size independent), ``"group"``
            (GroupNorm, 32 groups) or ``"batch"`` (BatchNorm, as the reference).
        zero_init: start the last 1x1 conv at zero so the adapter is the identity.
    """

    def __init__(self, channels: int = 256, norm: str = "layer", zero_init: bool = True):
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.pw = nn.Conv2d(channels, channels, 1, bias=False)
        if norm == "layer":
            self.norm: nn.Module = LayerNorm2d(channels)
        elif norm == "group":
            self.norm = nn.GroupNorm(min(32, channels), channels)
        elif norm == "batch":
            self.norm = nn.BatchNorm2d(channels)
        else:
            raise Sam3DError(f"adapter norm must be 'layer', 'group' or 'batch', got {norm!r}")
        self.act = nn.GELU()
        self.up = nn.Conv2d(channels, channels, 1, bias=False)
        if zero_init:
            nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.norm(self.pw(self.dw(x)))))


class TopoLoRASam(nn.Module):
    """Prompt-free binary segmenter: frozen SAM encoder + LoRA + adapter + trainable decoder.

    Args:
        sam: an official ``segment_anything`` ``Sam`` (weights already loaded); it is
            adapted in place and kept as ``self.sam``.
        lora_rank, lora_alpha, lora_dropout: LoRA settings (scale ``alpha / rank``).
        lora_targets: ``fnmatch`` globs of the encoder's linear layers to adapt.
        adapter_norm: norm of the spatial adapter (see :class:`SpatialAdapter`).
        adapter_zero_init: zero-initialise the adapter's last conv (identity at step 0).
        fused_attention: compute encoder attention with fused SDPA (same function).
        checkpoint_encoder: activation checkpointing of every encoder block while training.
        train_prompt_encoder: also train the prompt encoder (frozen in the reference).
        config: what the registry rebuilds it from (:func:`build_topolora_sam` sets it;
            None for a model around a ``Sam`` passed in), kept as ``self.config``.
    """

    def __init__(
        self,
        sam: Sam,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        lora_targets: Sequence[str] = ("*.mlp.lin1", "*.mlp.lin2"),
        adapter_norm: str = "layer",
        adapter_zero_init: bool = True,
        fused_attention: bool = False,
        checkpoint_encoder: bool = False,
        train_prompt_encoder: bool = False,
        config: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.config = dict(config) if config is not None else None
        if not isinstance(sam, Sam):
            raise Sam3DError(f"TopoLoRASam wraps a segment_anything Sam, got {type(sam).__name__}")
        self.sam = sam
        for p in sam.parameters():
            p.requires_grad_(False)
        inject_lora(sam.image_encoder, lora_targets, lora_rank, lora_alpha, lora_dropout)
        if fused_attention:
            use_fused_attention(sam.image_encoder)
        if checkpoint_encoder:
            use_block_checkpointing(sam.image_encoder)
        self.adapter = SpatialAdapter(
            sam.prompt_encoder.embed_dim, norm=adapter_norm, zero_init=adapter_zero_init
        )
        for p in sam.mask_decoder.parameters():
            p.requires_grad_(True)
        for p in sam.prompt_encoder.parameters():
            p.requires_grad_(train_prompt_encoder)

    @property
    def img_size(self) -> int:
        """Side of SAM's square input (1024 for the official models)."""
        return self.sam.image_encoder.img_size

    def preprocess(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``B x 3 x H x W`` pixels in 0..255 -> ``B x 3 x S x S`` SAM input and resized ``(h, w)``.

        Longest side resized to ``S`` (bilinear, antialiased, as segment_anything's
        ``ResizeLongestSide.apply_image_torch``), normalised, zero-padded bottom/right.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise Sam3DError(f"expected images B x 3 x H x W, got {tuple(images.shape)}")
        h, w = images.shape[-2:]
        size = ResizeLongestSide.get_preprocess_shape(int(h), int(w), self.img_size)
        if size != (h, w):
            images = F.interpolate(
                images.float(), size, mode="bilinear", align_corners=False, antialias=True
            )
        return self.sam.preprocess(images.float()), size

    def image_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed ``B x 3 x S x S`` -> adapted embedding ``B x 256 x S/16 x S/16``."""
        return self.adapter(self.sam.image_encoder(x))

    def decode(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Prompt-free decoding: ``B x 256 x h x w`` -> low-res logits ``B x 1 x 4h x 4w``."""
        pe = self.sam.prompt_encoder
        sparse, dense = pe(points=None, boxes=None, masks=None)  # 1 x 0 x 256, 1 x 256 x h x w
        b = embeddings.shape[0]
        sparse = sparse.expand(b, -1, -1)
        dense = dense.expand(b, -1, -1, -1)
        image_pe = pe.get_dense_pe()
        # SAM's decoder repeats the image embedding once per prompt; decoding image by
        # image keeps one prompt per image, exactly the official call.
        low_res = [
            self.sam.mask_decoder(
                image_embeddings=embeddings[i : i + 1],
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse[i : i + 1],
                dense_prompt_embeddings=dense[i : i + 1],
                multimask_output=False,
            )[0]
            for i in range(b)
        ]
        return torch.cat(low_res, dim=0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``B x 3 x H x W`` pixels in 0..255 -> logits ``B x 1 x H x W`` at the input's size."""
        h, w = images.shape[-2:]
        x, input_size = self.preprocess(images)
        low_res = self.decode(self.image_embeddings(x))
        # float32 logits at native size, also under bf16 autocast (losses, calibration)
        return self.sam.postprocess_masks(low_res.float(), input_size, (h, w))

    def trainable_parameters(self) -> list[dict[str, Any]]:
        """Named optimizer groups: ``lora``, ``adapter``, ``decoder`` (+ ``prompt_encoder``)."""
        return parameter_groups(
            lora=lora_parameters(self.sam.image_encoder),
            adapter=self.adapter,
            decoder=self.sam.mask_decoder,
            prompt_encoder=self.sam.prompt_encoder,
        )

    def parameter_counts(self) -> dict[str, int]:
        """``total``, ``trainable`` and per-part counts (``lora``, ``adapter``, ``decoder``)."""
        return {
            "total": sum(p.numel() for p in self.parameters()),
            "trainable": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "lora": count_lora_parameters(self.sam.image_encoder),
            "adapter": sum(p.numel() for p in self.adapter.parameters()),
            "decoder": sum(p.numel() for p in self.sam.mask_decoder.parameters()),
        }


def build_topolora_sam(
    sam: Sam | str | dict = "vit_b",
    sam_checkpoint: str | os.PathLike | None = None,
    image_size: int = 1024,
    **kwargs,
) -> TopoLoRASam:
    """TopoLoRA-SAM around an already-built ``Sam`` or a preset (+ optional SAM checkpoint).

    ``image_size`` is SAM's square input side (see :func:`build_sam`); ``kwargs`` go to
    :class:`TopoLoRASam` (``lora_rank``, ``fused_attention``, ...).
    """
    config = None
    if not isinstance(sam, Sam):
        config = {"sam": sam, "image_size": int(image_size), **kwargs}
        sam = build_sam(sam, sam_checkpoint, image_size)
    elif sam_checkpoint is not None:
        raise Sam3DError("pass either a built Sam or a sam_checkpoint, not both")
    return TopoLoRASam(sam, **kwargs, config=config)
