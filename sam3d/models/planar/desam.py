"""DeSAM: SAM with a decoupled mask decoder (PRIM + PDMM) for automatic segmentation.

Built around segment_anything's modules (imported, not copied):

- frozen: the SAM image encoder and prompt encoder. The encoder's outputs after its first
  three global-attention blocks (ViT-B 2, 5, 8; ViT-H 7, 15, 23; each ``C x g x g``,
  ``g = S/16``) are tapped beside the neck output ``256 x g x g``: four maps per image,
  all prompt-free, so they can be computed once and cached
  (:mod:`sam3d.data.embedding_cache`);
- **PRIM** (prompt-relevant IoU module): SAM's ``MaskDecoder`` two-way transformer and
  IoU head. Its image-token output, ``256 x g x g``, is the *mask embedding*; one IoU
  score per prompt. SAM's own mask head (upscaling + hypernetwork MLPs) stays in the
  module so SAM's decoder checkpoint loads key for key, but it is never run and is frozen;
- **PDMM** (prompt-decoupled mask module): residual squeeze-excitation conv blocks
  (MONAI ``UnetResBlock`` + SE) over the three taps at ``g``, ``2g``, ``4g`` (64^2,
  128^2, 256^2 at SAM's 1024 input), the deepest fused with the mask embedding, a U-Net
  up path and a 1x1 conv to one logit map ``1 x 4g x 4g``.

The tap branch of PDMM (:meth:`PDMM.encode_taps`) does not depend on the prompt: it is
computed once per image and shared by every prompt of that image (the reference runs it
again for every prompt; it is most of the decoder's FLOPs).

Parameter counts of ``mask_decoder`` are the reference's exactly (ViT-B 11,521,444,
ViT-H 13,815,204): the module layout follows the reference's, including weights it
never uses (SAM's mask head, the 1x1 skip convs of equal-width residual blocks, the
deep-supervision head). Those are kept for state-dict compatibility and frozen, so every
trainable parameter gets a gradient (DDP without ``find_unused_parameters``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetResBlock
from monai.networks.blocks.dynunet_block import get_conv_layer, get_norm_layer
from segment_anything.modeling import MaskDecoder, Sam
from segment_anything.utils.amg import build_point_grid
from torch import nn

from sam3d.errors import Sam3DError
from sam3d.models.planar.amg import remove_small_regions, select_grid_mask  # noqa: F401
from sam3d.models.protocol import parameter_groups
from sam3d.models.sam.build import build_sam, sam_preset

# Features of one image batch: three taps (C x g x g each, shallow to deep) + neck (256 x g x g)
Features = Sequence[torch.Tensor]


class SqueezeExcitation(nn.Module):
    """Channel squeeze-excitation ``x * sigmoid(W2 relu(W1 avgpool(x)))``, bias-free.

    MONAI's ``ChannelSELayer`` has biased linears; the reference's are bias-free (its
    parameter counts depend on it), hence this small layer. Keys: ``fc.0``, ``fc.2``.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc = nn.Sequential(
            nn.Linear(channels, hidden, bias=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, channels, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc(x.mean(dim=(-2, -1)))
        return x * w[..., None, None]


class ResSEBlock(UnetResBlock):
    """MONAI's ``UnetResBlock`` (conv3-IN-LReLU-conv3-IN + residual) with SE before the add.

    2D, kernel 3, stride 1, instance norm. The 1x1 residual projection (``conv3``) is
    built also when ``in == out`` (the reference always builds it) but then unused and
    frozen.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(2, in_channels, out_channels, 3, 1, norm_name="instance")
        if not self.downsample:
            self.conv3 = get_conv_layer(2, in_channels, out_channels, kernel_size=1, stride=1)
            self.norm3 = get_norm_layer(name="instance", spatial_dims=2, channels=out_channels)
            self.conv3.requires_grad_(False)
        self.se = SqueezeExcitation(out_channels)

    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        out = self.norm2(self.conv2(self.lrelu(self.norm1(self.conv1(inp)))))
        out = self.se(out)
        residual = self.norm3(self.conv3(inp)) if self.downsample else inp
        return self.lrelu(out + residual)


def _up(channels_in: int, channels_out: int) -> nn.Module:
    """Transposed 2x2 conv, stride 2 (bias-free)."""
    return get_conv_layer(2, channels_in, channels_out, 2, 2, conv_only=True, is_transposed=True)


class TapBranch(nn.Module):
    """One tap ``C x g x g`` -> ``out x (g * 2^n_up) x (g * 2^n_up)``: a block, then
    ``n_up`` x (transposed conv + block)."""

    def __init__(self, in_channels: int, out_channels: int, n_up: int):
        super().__init__()
        self.block_init = ResSEBlock(in_channels, out_channels)
        self.residual_block = nn.ModuleList(
            nn.Sequential(_up(out_channels, out_channels), ResSEBlock(out_channels, out_channels))
            for _ in range(n_up)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_init(x)
        for blk in self.residual_block:
            x = blk(x)
        return x


class UpStage(nn.Module):
    """U-Net up step: transposed conv ``in -> out`` (x2), concat the skip, ``2 out -> out``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.output_channels = out_channels
        self.transp_conv = _up(in_channels, out_channels)
        self.res_block = ResSEBlock(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.res_block(torch.cat((self.transp_conv(x), skip), dim=1))


class PDMM(nn.Module):
    """Prompt-decoupled mask module: taps + mask embedding -> logits ``N x 1 x 4g x 4g``.

    Args:
        encoder_dim: the taps' channels ``C`` (the ViT width: 768 ViT-B, 1280 ViT-H).
        width: channels at the deepest level (256; then 128, 64).
        deep_supervision: also return the ``2g`` logits of the middle stage.
        embedding_dim: channels of PRIM's mask embedding (SAM's 256).
    """

    def __init__(
        self,
        encoder_dim: int,
        width: int = 256,
        deep_supervision: bool = False,
        embedding_dim: int = 256,
    ):
        super().__init__()
        self.deep_supervision = deep_supervision
        widths = [width, width // 2, width // 4]
        # index d works on the d-th deepest tap and upsamples it d times
        self.conv_blocks_context = nn.ModuleList(
            TapBranch(encoder_dim, w, d) for d, w in enumerate(widths)
        )
        self.conv_blocks_localization = nn.ModuleList(
            UpStage(widths[u], widths[u + 1]) for u in range(2)
        )
        self.seg_outputs = nn.ModuleList(
            nn.Conv2d(widths[u + 1], 1, 1, bias=False) for u in range(2)
        )
        self.seg_outputs[0].requires_grad_(deep_supervision)
        self.mask_embedding_fusion = ResSEBlock(embedding_dim + width, width)

    def encode_taps(self, taps: Features) -> list[torch.Tensor]:
        """The prompt-invariant branch: taps (shallow to deep, ``B x C x g x g``) ->
        ``[B x w x g x g, B x w/2 x 2g x 2g, B x w/4 x 4g x 4g]`` (deep to shallow)."""
        if len(taps) != 3:
            raise Sam3DError(f"PDMM takes three encoder taps, got {len(taps)}")
        return [blk(taps[-(d + 1)]) for d, blk in enumerate(self.conv_blocks_context)]

    def decode(
        self, mask_embedding: torch.Tensor, tap_features: Sequence[torch.Tensor]
    ) -> torch.Tensor | list[torch.Tensor]:
        """Per prompt: ``N x 256 x g x g`` mask embedding + :meth:`encode_taps` output of
        batch N -> logits ``N x 1 x 4g x 4g`` (with deep supervision: [2g logits, 4g])."""
        x = self.mask_embedding_fusion(torch.cat((mask_embedding, tap_features[0]), dim=1))
        outputs = []
        for u, stage in enumerate(self.conv_blocks_localization):
            x = stage(x, tap_features[u + 1])
            if self.deep_supervision or u == len(self.conv_blocks_localization) - 1:
                outputs.append(self.seg_outputs[u](x))
        return outputs if self.deep_supervision else outputs[-1]


class DecoupledMaskDecoder(MaskDecoder):
    """segment_anything's ``MaskDecoder`` as PRIM, plus :class:`PDMM` as ``pimm``.

    Attribute names follow the reference (``transformer``, ``iou_token``,
    ``mask_tokens``, ``iou_prediction_head``, ``pimm``), so SAM's decoder weights load
    into PRIM with only ``pimm.*`` missing.
    """

    def __init__(self, encoder_dim: int, pdmm_width: int = 256, deep_supervision: bool = False):
        from segment_anything.modeling import TwoWayTransformer

        super().__init__(
            transformer_dim=256,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            num_multimask_outputs=3,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        )
        # SAM's mask head: kept for the checkpoint's keys, never run in DeSAM
        self.output_upscaling.requires_grad_(False)
        self.output_hypernetworks_mlps.requires_grad_(False)
        self.pimm = PDMM(encoder_dim, pdmm_width, deep_supervision)

    def prim(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """PRIM: ``B x 256 x g x g`` neck (``N = B * P`` prompts, grouped by image) ->
        mask embedding ``N x 256 x g x g`` and IoU ``N x 1``.

        SAM's ``predict_masks`` up to the transformer (it returns no image tokens).
        """
        n = sparse_prompt_embeddings.shape[0]
        b = image_embeddings.shape[0]
        if n % b:
            raise Sam3DError(f"{n} prompts cannot be split evenly over {b} images")
        tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        tokens = torch.cat((tokens.unsqueeze(0).expand(n, -1, -1), sparse_prompt_embeddings), 1)
        src = image_embeddings.repeat_interleave(n // b, dim=0) + dense_prompt_embeddings
        pos = image_pe.expand(n, -1, -1, -1)
        _, _, h, w = src.shape
        hs, src = self.transformer(src, pos, tokens)
        mask_embedding = src.transpose(1, 2).reshape(n, -1, h, w)
        iou = self.iou_prediction_head(hs[:, 0, :])[:, :1]
        return mask_embedding, iou


class DeSAM(nn.Module):
    """Frozen SAM encoders + :class:`DecoupledMaskDecoder` (PRIM + PDMM).

    Args:
        sam: an official ``Sam`` (weights loaded); its encoders are kept, frozen, and its
            decoder's weights are copied into PRIM.
        tap_blocks: encoder block indices tapped (default: the first three global
            blocks, ``global_attn_indexes[:-1]``).
        pdmm_width, deep_supervision: see :class:`PDMM`.
        config: what the registry rebuilds it from (:func:`build_desam` sets it; None for
            a model around a ``Sam`` passed in), kept as ``self.config``.

    Inputs are SAM's: ``B x 3 x S x S`` preprocessed images (:meth:`preprocess`), points
    and boxes in that ``S x S`` pixel frame (x, y). Logits are ``S/4 x S/4``.
    """

    def __init__(
        self,
        sam: Sam,
        tap_blocks: Sequence[int] | None = None,
        pdmm_width: int = 256,
        deep_supervision: bool = False,
        config: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.config = dict(config) if config is not None else None
        if not isinstance(sam, Sam):
            raise Sam3DError(f"DeSAM wraps a segment_anything Sam, got {type(sam).__name__}")
        enc = sam.image_encoder
        depth = len(enc.blocks)
        if tap_blocks is None:
            glob = [i for i, b in enumerate(enc.blocks) if b.window_size == 0]
            if len(glob) < 4:
                raise Sam3DError(
                    f"this encoder has {len(glob)} global blocks; pass three tap_blocks"
                )
            tap_blocks = glob[:3]
        tap_blocks = [int(i) for i in tap_blocks]
        if len(tap_blocks) != 3 or sorted(set(tap_blocks)) != tap_blocks or tap_blocks[-1] >= depth:
            raise Sam3DError(f"tap_blocks must be 3 increasing block indices < {depth}")
        self.tap_blocks = tap_blocks
        self.image_encoder = enc
        self.prompt_encoder = sam.prompt_encoder
        self.register_buffer("pixel_mean", sam.pixel_mean.clone(), False)
        self.register_buffer("pixel_std", sam.pixel_std.clone(), False)
        encoder_dim = enc.patch_embed.proj.out_channels
        self.mask_decoder = DecoupledMaskDecoder(encoder_dim, pdmm_width, deep_supervision)
        prim_state = sam.mask_decoder.state_dict()
        missing, unexpected = self.mask_decoder.load_state_dict(prim_state, strict=False)
        if unexpected or not all(k.startswith("pimm.") for k in missing):
            raise ValueError(
                f"SAM's mask decoder does not fit PRIM: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
        for p in self.image_encoder.parameters():
            p.requires_grad_(False)
        for p in self.prompt_encoder.parameters():
            p.requires_grad_(False)

    # ------------------------------------------------------------------ sizes
    @property
    def img_size(self) -> int:
        """SAM's square input side ``S`` (1024 for the official models)."""
        return self.image_encoder.img_size

    @property
    def mask_size(self) -> int:
        """Side of the logits, ``S / 4`` (256 at 1024)."""
        return 4 * self.prompt_encoder.image_embedding_size[0]

    def feature_shapes(self) -> list[tuple[int, int, int]]:
        """``C x g x g`` of the four encoder outputs (three taps, then the neck)."""
        g = self.prompt_encoder.image_embedding_size[0]
        c = self.image_encoder.patch_embed.proj.out_channels
        return [(c, g, g)] * 3 + [(self.prompt_encoder.embed_dim, g, g)]

    # ------------------------------------------------------------------ frozen part
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``B x 3 x S x S`` pixels 0..255 -> normalised (SAM's mean / std); the side must be S."""
        if (
            images.ndim != 4
            or images.shape[1] != 3
            or tuple(images.shape[-2:])
            != (
                self.img_size,
                self.img_size,
            )
        ):
            raise Sam3DError(
                f"expected images B x 3 x {self.img_size} x {self.img_size}, "
                f"got {tuple(images.shape)}"
            )
        return (images.float() - self.pixel_mean) / self.pixel_std

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Preprocessed ``B x 3 x S x S`` -> ``[tap1, tap2, tap3, neck]`` (``B x C x g x g``).

        segment_anything's ``ImageEncoderViT.forward``, block by block, keeping the taps.
        """
        enc = self.image_encoder
        h = enc.patch_embed(x)
        if enc.pos_embed is not None:
            h = h + enc.pos_embed
        taps = []
        for i, blk in enumerate(enc.blocks):
            h = blk(h)
            if i in self.tap_blocks:
                taps.append(h.permute(0, 3, 1, 2).contiguous())
        return [*taps, enc.neck(h.permute(0, 3, 1, 2))]

    @torch.no_grad()
    def embed_prompts(
        self,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's prompt encoder: points ``N x n x 2`` (x, y px of the ``S`` frame) with labels
        ``N x n`` (1 fg, 0 bg, -1 pad), or boxes ``N x 4`` (x0, y0, x1, y1) -> sparse, dense."""
        pts = None if points is None else (points.float(), point_labels.int())
        return self.prompt_encoder(points=pts, boxes=boxes, masks=None)

    # ------------------------------------------------------------------ trainable part
    def decode(
        self,
        features: Features,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        tap_features: Sequence[torch.Tensor] | None = None,
        invariant_once: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of B images + N = B * P prompts (grouped by image) -> logits
        ``N x 1 x S/4 x S/4`` and predicted IoU ``N x 1``.

        ``tap_features``: :meth:`PDMM.encode_taps` of ``features[:3]``, if already computed
        for these images. ``invariant_once=False`` recomputes the tap branch for every
        prompt, as the reference does (same result, for tests and benchmarks).
        """
        sparse, dense = self.embed_prompts(points, point_labels, boxes)
        md = self.mask_decoder
        mask_emb, iou = md.prim(features[3], self.prompt_encoder.get_dense_pe(), sparse, dense)
        per_image = mask_emb.shape[0] // features[3].shape[0]
        if invariant_once:
            if tap_features is None:
                tap_features = md.pimm.encode_taps(features[:3])
            if per_image > 1:
                tap_features = [t.repeat_interleave(per_image, 0) for t in tap_features]
        else:
            taps = [t.repeat_interleave(per_image, 0) for t in features[:3]]
            tap_features = md.pimm.encode_taps(taps)
        return md.pimm.decode(mask_emb, tap_features), iou

    def forward(
        self,
        x: Features | torch.Tensor,
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes: torch.Tensor | None = None,
        return_iou: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits ``N x 1 x S/4 x S/4`` (and the IoU ``N x 1`` with ``return_iou``).

        ``x``: the four maps of B images (cached or from :meth:`encode`), or the images
        themselves, ``B x 3 x S x S`` pixels 0..255 (encoded here). Without a prompt, the
        whole-image box is used (automatic, one prompt per image). See :meth:`decode`.
        """
        features = self.encode(self.preprocess(x)) if isinstance(x, torch.Tensor) else x
        if points is None and boxes is None:
            boxes = self.whole_box(features[3].shape[0], features[3].device)
        logits, iou = self.decode(features, points, point_labels, boxes)
        return (logits, iou) if return_iou else logits

    # ------------------------------------------------------------------ prompt modes
    def whole_box(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        """``n x 4`` boxes covering the whole ``S x S`` input (the reference's box mode)."""
        s = float(self.img_size)
        return torch.tensor([[0.0, 0.0, s, s]], device=device).expand(n, 4)

    def grid_points(self, n_per_side: int = 9, device: torch.device | None = None) -> torch.Tensor:
        """SAM's automatic point grid ``n^2 x 2`` (x, y px of the ``S`` frame), cell centres."""
        grid = build_point_grid(int(n_per_side)) * self.img_size
        return torch.as_tensor(grid, dtype=torch.float32, device=device)

    @torch.no_grad()
    def grid_candidates(
        self, features: Features, n_per_side: int = 9, points_per_batch: int = 27
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid's candidates for ONE image (features of batch 1): every point of
        :meth:`grid_points` as a one-point prompt (label 1), the tap branch run once.
        Returns logits ``P x S/4 x S/4`` and predicted IoU ``P`` (float32, on the CPU)."""
        grid = self.grid_points(n_per_side, features[3].device)
        taps = self.mask_decoder.pimm.encode_taps(features[:3])
        logits, ious = [], []
        for j in range(0, len(grid), points_per_batch):
            pts = grid[j : j + points_per_batch]
            ones = torch.ones(len(pts), 1, device=pts.device)
            lg, iou = self.decode(features, pts[:, None, :], ones, tap_features=taps)
            logits.append(lg[:, 0].float().cpu())
            ious.append(iou[:, 0].float().cpu())
        return torch.cat(logits), torch.cat(ious)

    @torch.no_grad()
    def segment_grid(
        self,
        features: Features,
        n_per_side: int = 9,
        points_per_batch: int = 27,
        iou_threshold: float = 0.5,
        min_region_px: float = 1000,
        nms_threshold: float = 0.7,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fully automatic mode: one binary mask per image from an ``n x n`` point grid.

        The candidates of :meth:`grid_candidates` go through the reference's selection
        (:func:`select_grid_mask`: IoU threshold, box NMS, holes and islands under
        ``min_region_px`` at a 256 x 256 mask cleaned, unchanged masks preferred, the
        first kept). Returns masks ``B x S/4 x S/4`` (bool) and the kept mask's predicted
        IoU per image (NaN where no candidate passed the threshold: an empty mask).
        """
        masks, scores = [], []
        for i in range(features[3].shape[0]):
            logits, ious = self.grid_candidates(
                [f[i : i + 1] for f in features], n_per_side, points_per_batch
            )
            mask, score = select_grid_mask(
                logits, ious, iou_threshold, min_region_px, nms_threshold
            )
            masks.append(mask)
            scores.append(score)
        return torch.stack(masks), torch.tensor(scores)

    @torch.no_grad()
    def segment(
        self,
        images: torch.Tensor,
        mode: str = "grid",
        points: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        **grid_kwargs: Any,
    ) -> torch.Tensor:
        """``B x 3 x S x S`` pixels 0..255 -> binary masks ``B x S/4 x S/4`` (bool).

        ``mode``: ``"grid"`` (automatic, :meth:`segment_grid`), ``"box"`` (the whole-image
        box) or ``"points"`` (one prompt per image: ``points`` ``B x n x 2``, labels).
        """
        feats = self.encode(self.preprocess(images))
        if mode == "grid":
            return self.segment_grid(feats, **grid_kwargs)[0].to(images.device)
        if mode == "box":
            logits, _ = self.decode(feats, boxes=self.whole_box(len(images), images.device))
        elif mode == "points":
            if points is None or point_labels is None:
                raise Sam3DError("points mode needs points and point_labels")
            logits, _ = self.decode(feats, points, point_labels)
        else:
            raise Sam3DError(f"mode must be 'grid', 'box' or 'points', got {mode!r}")
        return logits[:, 0] > 0

    # ------------------------------------------------------------------ bookkeeping
    def trainable_parameters(self) -> list[dict[str, Any]]:
        """Named optimizer groups: ``mask_decoder`` (the encoders are frozen)."""
        return parameter_groups(mask_decoder=self.mask_decoder)

    def parameter_counts(self) -> dict[str, int]:
        """``mask_decoder`` (all, as the reference counts), its parts, ``trainable``, encoders."""

        def n(m: nn.Module, trainable: bool = False) -> int:
            return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)

        md = self.mask_decoder
        return {
            "mask_decoder": n(md),
            "pdmm": n(md.pimm),
            "transformer": n(md.transformer),
            "iou_head": n(md.iou_prediction_head),
            "sam_mask_head_unused": n(md.output_upscaling) + n(md.output_hypernetworks_mlps),
            "trainable": n(self, trainable=True),
            "image_encoder": n(self.image_encoder),
            "prompt_encoder": n(self.prompt_encoder),
        }


def desam_preset(name: str | os.PathLike) -> dict[str, Any]:
    """A DeSAM preset of ``configs/desam/`` as builder kwargs: ``vit_b`` (the reference's),
    ``vit_h`` (the paper's), ``tiny`` (CPU tests: the tiny random SAM has two global
    blocks, so its taps are blocks 0-2; 256 input, logits 64 x 64). Read by
    :func:`sam3d.models.registry.model_preset`, the one reader."""
    from sam3d.models.registry import model_preset

    return model_preset("desam", name)


def build_desam(
    sam: Sam | str | dict = "vit_b",
    sam_checkpoint: str | os.PathLike | None = None,
    image_size: int = 1024,
    tap_blocks: Sequence[int] | None = None,
    pdmm_width: int = 256,
    deep_supervision: bool = False,
) -> DeSAM:
    """DeSAM around a built ``Sam`` or a SAM preset (+ optional official SAM checkpoint).

    ``image_size``: SAM's square input ``S`` (see :func:`sam3d.models.sam.build.build_sam`);
    the logits are ``S/4``. ``model.config`` holds what the registry rebuilds it from.
    """
    config = None
    if not isinstance(sam, Sam):
        sam_preset(sam)  # a clear error for an unknown preset before building anything
        config = {
            "sam": sam,
            "image_size": int(image_size),
            "tap_blocks": None if tap_blocks is None else [int(i) for i in tap_blocks],
            "pdmm_width": int(pdmm_width),
            "deep_supervision": bool(deep_supervision),
        }
        sam = build_sam(sam, sam_checkpoint, image_size)
    elif sam_checkpoint is not None:
        raise Sam3DError("pass either a built Sam or a sam_checkpoint, not both")
    return DeSAM(sam, tap_blocks, pdmm_width, deep_supervision, config=config)


def mask_decoder_parameter_count(encoder_dim: int, pdmm_width: int = 256) -> int:
    """Parameters of DeSAM's mask decoder for a ViT of width ``encoder_dim``.

    The decoder's shapes depend on the encoder only through its width (the taps'
    channels), so the ViT-H count needs no 632M-parameter encoder.
    """
    return sum(p.numel() for p in DecoupledMaskDecoder(encoder_dim, pdmm_width).parameters())


def upsample_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``N x 1 x s x s`` logits -> ``N x 1 x H x W`` (bilinear)."""
    return F.interpolate(logits.float(), tuple(size), mode="bilinear", align_corners=False)
