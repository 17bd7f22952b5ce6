"""SAMUS: SAM for ultrasound at a 256 x 256 input, around segment_anything's modules.

An official ``Sam`` (built at its own 1024 input, official weights loaded) is adapted in
place; its modules are imported, not copied, and keep their state-dict keys:

- input: one channel in [0, 1] repeated to three (no SAM mean / std, as the reference),
  every image resized to ``S x S`` (``S`` = 256); SAM's frozen 16 x 16 patch conv is
  applied with stride 8 to the image resized to ``S + 8``: ``S/8 x S/8`` tokens;
- a feature adapter (``C -> C/4 -> C``, GELU, with skip) after the patch embedding and
  a position adapter (max-pool 2, conv 3 x 3, LayerNorm2d, GELU) that turns SAM's
  ``64 x 64`` absolute position embedding into ``S/8 x S/8``;
- a CNN branch (conv block at ``S``, three max-pool + conv blocks to ``S/8 x S/8 x C``);
- in SAM's global-attention blocks: cross-branch attention (queries from the block's
  normalised tokens, keys / values from the CNN features) added before self-attention,
  a refine conv block on the CNN features, a 0.5-scaled MLP adapter (no skip) beside
  the MLP; their relative-position tables are resized from ``127`` to ``2 S/8 - 1`` at
  load (trainable); the windowed blocks are SAM's own, unchanged;
- encoder output ``x + 0.5 * cnn`` through SAM's neck: ``256 x S/8 x S/8``;
- SAM's prompt encoder (for the ``S`` frame) and mask decoder, frozen; point prompts,
  positive and negative, any number, one prompt per structure; low-res logits
  ``4 S/8`` = 128 are brought back to each image's native ``H x W``.

Trainable: CNN branch, position adapter, all adapters, cross-branch attention, refine
convs and the global blocks' relative-position tables (ViT-B: 39,653,120 of
133,323,568 parameters, exactly the reference's).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling import PromptEncoder, Sam
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.image_encoder import Block, ImageEncoderViT
from torch import nn

from sam3d.errors import Sam3DError
from sam3d.models.attention import attend, merge_heads, split_heads
from sam3d.models.protocol import parameter_groups
from sam3d.models.sam.build import build_sam, resize_sam_state_dict

SAM_GRID = 64  # SAM's token grid at its 1024 input (the pre-trained position embedding)
PATCH_STRIDE = 8  # the patch conv's stride at SAMUS's input


class FeatureAdapter(nn.Module):
    """``x (+ x) <- up(GELU(down(x)))`` on channels-last ``... x C`` (bottleneck ``C * ratio``)."""

    def __init__(self, dim: int, ratio: float = 0.25, skip: bool = True):
        super().__init__()
        hidden = int(dim * ratio)
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        self.skip = skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(self.act(self.down(x)))
        return x + y if self.skip else y


class ConvBlock(nn.Module):
    """``[max-pool 2] -> conv 3x3 (no bias) -> LayerNorm2d -> GELU`` on ``B x C x H x W``."""

    def __init__(self, in_channels: int, out_channels: int, pool: bool = False):
        super().__init__()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm = LayerNorm2d(out_channels)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(self.pool(x))))


class PositionAdapter(nn.Module):
    """SAM's ``1 x G x G x C`` position embedding -> ``1 x g x g x C`` (``G / g`` a power of 2).

    One pooled :class:`ConvBlock` per halving (one from 64 to 32 at a 256 input); at
    ``g == G`` a plain conv block.
    """

    def __init__(self, dim: int, grid_in: int, grid_out: int):
        super().__init__()
        ratio = grid_in // grid_out
        if grid_in % grid_out or ratio & (ratio - 1):
            raise ValueError(f"position grid {grid_in} cannot be pooled to {grid_out}")
        n = int(math.log2(ratio))
        self.blocks = nn.Sequential(
            *[ConvBlock(dim, dim, pool=True) for _ in range(n)] or [ConvBlock(dim, dim)]
        )

    def forward(self, pos: torch.Tensor) -> torch.Tensor:
        return self.blocks(pos.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class CNNBranch(nn.Module):
    """``B x 3 x S x S`` -> channels-last ``B x S/8 x S/8 x C`` local features.

    A conv block at ``S`` (``width`` channels), then three pooled conv blocks doubling the
    width, the last to ``C`` (ViT-B: 3 -> 64 -> 128 -> 256 -> 768).
    """

    def __init__(self, dim: int, width: int = 64, stages: int = 3):
        super().__init__()
        chans = [width * 2**i for i in range(stages)] + [dim]
        self.stem = ConvBlock(3, width)
        self.stages = nn.Sequential(
            *[ConvBlock(chans[i], chans[i + 1], pool=True) for i in range(stages)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x)).permute(0, 2, 3, 1)


class CrossBranchAttention(nn.Module):
    """Multi-head attention, queries from ViT tokens, keys and values from CNN features.

    ``x``, ``cnn``: channels-last ``B x h x w x C`` -> ``B x h x w x C`` (fused SDPA;
    the reference's explicit softmax gives the same function).
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cnn: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return split_heads(t.reshape(b, h * w, c), self.num_heads)

        out = attend(heads(self.q(x)), heads(self.k(cnn)), heads(self.v(cnn)))
        return self.proj(merge_heads(out).reshape(b, h, w, c))


class SamusBlock(nn.Module):
    """One of SAM's global-attention blocks with the SAMUS additions.

    Takes over the block's own ``norm1``, ``attn``, ``norm2``, ``mlp`` (SAM's keys stay);
    adds ``cross_attn``, ``refine`` and ``mlp_adapter``. ``forward(x, cnn)`` on
    channels-last ``B x h x w x C`` returns the new ``(x, cnn)``.
    """

    def __init__(self, block: Block, num_heads: int, adapter_ratio: float = 0.25):
        super().__init__()
        if block.window_size != 0:
            raise ValueError("SamusBlock adapts SAM's global-attention blocks only")
        dim = block.norm1.normalized_shape[0]
        self.norm1, self.attn, self.norm2, self.mlp = (
            block.norm1,
            block.attn,
            block.norm2,
            block.mlp,
        )
        self.cross_attn = CrossBranchAttention(dim, num_heads)
        self.refine = ConvBlock(dim, dim)
        self.mlp_adapter = FeatureAdapter(dim, adapter_ratio, skip=False)
        self.adapter_scale = 0.5

    def forward(self, x: torch.Tensor, cnn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shortcut = x
        xn = self.norm1(x)
        # as the reference: the cross-branch term joins the normalised tokens, not the stream
        h = self.attn(xn + self.cross_attn(xn, cnn))
        cnn = self.refine(cnn.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = shortcut + h
        xn = self.norm2(x)
        return x + self.mlp(xn) + self.adapter_scale * self.mlp_adapter(xn), cnn


class SamusImageEncoder(nn.Module):
    """SAM's ViT encoder (taken over from ``encoder``) at an ``S x S`` input, SAMUS-adapted.

    ``forward(x)``: ``B x 3 x S x S`` in [0, 1] -> ``B x 256 x S/8 x S/8``.
    """

    def __init__(
        self,
        encoder: ImageEncoderViT,
        image_size: int = 256,
        num_heads: int = 12,
        adapter_ratio: float = 0.25,
        cnn_width: int = 64,
    ):
        super().__init__()
        if image_size % PATCH_STRIDE:
            raise Sam3DError(f"SAMUS image_size must be a multiple of 8, got {image_size}")
        grid, ratio = image_size // PATCH_STRIDE, SAM_GRID // max(1, image_size // PATCH_STRIDE)
        if SAM_GRID % grid or ratio & (ratio - 1):
            raise Sam3DError(
                f"SAMUS image_size {image_size}: its {grid} x {grid} position grid cannot be "
                f"pooled from SAM's {SAM_GRID} x {SAM_GRID} (use 512, 256, 128 or 64)"
            )
        self.img_size = int(image_size)
        self.grid = self.img_size // PATCH_STRIDE
        dim = encoder.patch_embed.proj.out_channels
        self.patch_embed, self.pos_embed, self.neck = (
            encoder.patch_embed,
            encoder.pos_embed,
            encoder.neck,
        )
        if self.pos_embed is None or self.pos_embed.shape[1] != SAM_GRID:
            raise ValueError("SAMUS starts from a SAM encoder built at its 1024 input")
        self.input_adapter = FeatureAdapter(dim, adapter_ratio, skip=True)
        self.pos_adapter = PositionAdapter(dim, SAM_GRID, self.grid)
        stages = int(math.log2(PATCH_STRIDE))
        self.cnn_branch = CNNBranch(dim, cnn_width, stages)
        self.blocks = nn.ModuleList(
            SamusBlock(b, num_heads, adapter_ratio) if b.window_size == 0 else b
            for b in encoder.blocks
        )
        # Global blocks attend over g x g tokens: rel-pos tables of 2g-1 rows (resized at load)
        for blk in self.global_blocks():
            head_dim = blk.attn.rel_pos_h.shape[1]
            blk.attn.rel_pos_h = nn.Parameter(torch.zeros(2 * self.grid - 1, head_dim))
            blk.attn.rel_pos_w = nn.Parameter(torch.zeros(2 * self.grid - 1, head_dim))

    def global_blocks(self) -> list[SamusBlock]:
        return [b for b in self.blocks if isinstance(b, SamusBlock)]

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding + input adapter + adapted position: ``B x g x g x C``."""
        proj = self.patch_embed.proj
        x = F.interpolate(
            x, size=(self.img_size + PATCH_STRIDE,) * 2, mode="bilinear", align_corners=False
        )
        x = F.conv2d(x, proj.weight, proj.bias, stride=PATCH_STRIDE).permute(0, 2, 3, 1)
        return self.input_adapter(x) + self.pos_adapter(self.pos_embed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cnn = self.cnn_branch(x)
        x = self.tokens(x)
        for blk in self.blocks:
            if isinstance(blk, SamusBlock):
                x, cnn = blk(x, cnn)
            else:
                x = blk(x)
        return self.neck((x + 0.5 * cnn).permute(0, 3, 1, 2))


class Samus(nn.Module):
    """Promptable 2D segmenter: SAMUS encoder + SAM's frozen prompt encoder and mask decoder.

    Args:
        sam: an official ``Sam`` built at 1024 (weights loaded); adapted in place, kept as
            ``self.sam``.
        image_size: SAMUS's square input side ``S`` (256 in the seed).
        adapter_ratio: bottleneck of the feature adapters (``C/4``).
        cnn_width: channels of the CNN branch's first block (64).
        config: what the registry rebuilds it from (:func:`build_samus` sets it), kept as
            ``self.config``.
    """

    def __init__(
        self,
        sam: Sam,
        image_size: int = 256,
        adapter_ratio: float = 0.25,
        cnn_width: int = 64,
        config: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.config = dict(config) if config is not None else None
        if not isinstance(sam, Sam):
            raise TypeError(f"Samus wraps a segment_anything Sam, got {type(sam).__name__}")
        state = sam.state_dict()
        heads = sam.image_encoder.blocks[0].attn.num_heads
        sam.image_encoder = SamusImageEncoder(
            sam.image_encoder, image_size, heads, adapter_ratio, cnn_width
        )
        grid = sam.image_encoder.grid
        pe = sam.prompt_encoder
        sam.prompt_encoder = PromptEncoder(
            embed_dim=pe.embed_dim,
            image_embedding_size=(grid, grid),
            input_image_size=(image_size, image_size),
            mask_in_chans=pe.mask_downscaling[0].out_channels * 4,
        )
        # SAM's weights into the adapted modules; the global rel-pos tables resized 127 -> 2g-1
        missing, unexpected = sam.load_state_dict(resize_sam_state_dict(state, sam), strict=False)
        new = ("input_adapter", "pos_adapter", "cnn_branch", "cross_attn", "refine", "mlp_adapter")
        if unexpected or any(not any(f".{n}." in k for n in new) for k in missing):
            raise Sam3DError(
                f"SAM weights do not fit SAMUS: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        self.sam = sam
        for name, p in sam.named_parameters():
            p.requires_grad_(
                any(f".{n}." in name for n in new) or ".rel_pos_" in name and self._is_global(name)
            )

    def _is_global(self, name: str) -> bool:
        i = int(name.split(".")[2])
        return isinstance(self.sam.image_encoder.blocks[i], SamusBlock)

    @property
    def img_size(self) -> int:
        """Side ``S`` of SAMUS's square input."""
        return self.sam.image_encoder.img_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``B x C x H x W`` in [0, 1] (C = 1 or 3) -> ``B x 3 x S x S`` (bilinear resize)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"expected images B x 1 x H x W (or B x 3 x H x W), got {tuple(images.shape)}"
            )
        x = images.float()
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size,) * 2, mode="bilinear", align_corners=False)
        return x

    def image_embeddings(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed ``B x 3 x S x S`` -> ``B x 256 x S/8 x S/8`` (encode once, prompt many)."""
        return self.sam.image_encoder(x)

    def to_input_frame(self, points_rc: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        """Pixel indices ``(row, col)`` of an ``H x W`` image -> SAM ``(x, y)`` in the ``S`` frame.

        SAM adds half a pixel itself, so pixel centres map onto pixel centres.
        """
        h, w = hw
        s = self.img_size
        rc = points_rc.float()
        x = (rc[..., 1] + 0.5) * (s / w) - 0.5
        y = (rc[..., 0] + 0.5) * (s / h) - 0.5
        return torch.stack([x, y], dim=-1)

    def decode(
        self,
        embeddings: torch.Tensor,
        points_xy: torch.Tensor | None,
        point_labels: torch.Tensor | None,
    ) -> torch.Tensor:
        """Prompted decoding, one mask per prompt.

        Args:
            embeddings: ``B x 256 x g x g``.
            points_xy: ``B x K x N x 2`` SAM ``(x, y)`` in the ``S`` frame (K prompts per
                image), or None: one prompt-free mask per image (SAM's empty prompt).
            point_labels: ``B x K x N``: 1 positive, 0 negative, -1 padding.

        Returns:
            low-res logits ``B x K x 4g x 4g``.
        """
        pe = self.sam.prompt_encoder
        image_pe = pe.get_dense_pe()
        out = []
        # SAM's decoder repeats one image's embedding for each of its K prompts
        for i in range(embeddings.shape[0]):
            points = None if points_xy is None else (points_xy[i], point_labels[i])
            sparse, dense = pe(points=points, boxes=None, masks=None)
            low_res, _ = self.sam.mask_decoder(
                image_embeddings=embeddings[i : i + 1],
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            out.append(low_res[:, 0])
        return torch.stack(out)

    def forward(
        self,
        images: torch.Tensor,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        low_res: bool = False,
    ) -> torch.Tensor:
        """Logits ``B x K x H x W`` at the images' native size (``low_res``: the decoder's
        own ``B x K x 4g x 4g``, 128 x 128 at 256, what the reference's loss sees).

        Args:
            images: ``B x C x H x W`` in [0, 1], C = 1 (grey) or 3.
            points: ``B x K x N x 2`` pixel indices ``(row, col)`` of the native image, or
                ``B x N x 2`` for one prompt per image (K = 1); None: SAM's prompt-free
                mask (K = 1).
            point_labels: ``B x K x N`` (or ``B x N``): 1 positive, 0 negative, -1 padding.
        """
        hw = (int(images.shape[-2]), int(images.shape[-1]))
        emb = self.image_embeddings(self.preprocess(images))
        if points is None:
            logits = self.decode(emb, None, None)
        else:
            if point_labels is None:
                raise ValueError("points need point_labels (1 positive, 0 negative, -1 padding)")
            if points.ndim == 3:
                points, point_labels = points[:, None], point_labels[:, None]
            if points.ndim != 4 or points.shape[-1] != 2 or point_labels.shape != points.shape[:-1]:
                raise ValueError(
                    f"points must be B x K x N x 2 with labels B x K x N, got "
                    f"{tuple(points.shape)} and {tuple(point_labels.shape)}"
                )
            xy = self.to_input_frame(points, hw).to(emb.dtype)
            logits = self.decode(emb, xy, point_labels.long())
        # float32 logits at native size, also under bf16 autocast
        if low_res:
            return logits.float()
        return F.interpolate(logits.float(), size=hw, mode="bilinear", align_corners=False)

    def trainable_parameters(self) -> list[dict[str, Any]]:
        """Named optimizer groups: the adapted ``image_encoder``'s trainable parts (prompt
        encoder and mask decoder are frozen)."""
        return parameter_groups(
            image_encoder=self.sam.image_encoder,
            prompt_encoder=self.sam.prompt_encoder,
            mask_decoder=self.sam.mask_decoder,
        )

    def parameter_counts(self) -> dict[str, int]:
        """``total``, ``trainable`` and the SAMUS parts (``cnn_branch``, ``pos_adapter``, ...)."""
        enc = self.sam.image_encoder
        glob = enc.global_blocks()

        def n(mods) -> int:
            return sum(p.numel() for m in mods for p in m.parameters())

        return {
            "total": sum(p.numel() for p in self.parameters()),
            "trainable": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "cnn_branch": n([enc.cnn_branch]),
            "pos_adapter": n([enc.pos_adapter]),
            "input_adapter": n([enc.input_adapter]),
            "cross_attn": n([b.cross_attn for b in glob]),
            "refine": n([b.refine for b in glob]),
            "mlp_adapter": n([b.mlp_adapter for b in glob]),
            "global_rel_pos": sum(
                b.attn.rel_pos_h.numel() + b.attn.rel_pos_w.numel() for b in glob
            ),
            "prompt_encoder": n([self.sam.prompt_encoder]),
            "mask_decoder": n([self.sam.mask_decoder]),
        }


def build_samus(
    sam: str | dict = "vit_b",
    sam_checkpoint: str | os.PathLike | None = None,
    image_size: int = 256,
    adapter_ratio: float = 0.25,
    cnn_width: int = 64,
) -> Samus:
    """SAMUS from a SAM preset (name, path or shape dict) and an optional official checkpoint.

    The SAM is built at its own 1024 input by :func:`sam3d.models.sam.build.build_sam`
    (weights read ``weights_only``), then adapted; ``model.config`` is what the registry
    rebuilds it from (without the checkpoint: trained weights come from ``model.pt``).
    """
    config = {
        "sam": sam,
        "image_size": int(image_size),
        "adapter_ratio": float(adapter_ratio),
        "cnn_width": int(cnn_width),
    }
    sam_model = build_sam(sam, sam_checkpoint, 1024)
    return Samus(sam_model, int(image_size), float(adapter_ratio), int(cnn_width), config=config)


def samus_config(preset: str | os.PathLike = "vit_b") -> dict[str, Any]:
    """The :func:`build_samus` keyword arguments of a ``configs/samus/`` preset (name / path):
    :func:`sam3d.models.registry.model_preset`, the one reader."""
    from sam3d.models.registry import model_preset

    return model_preset("samus", preset)
