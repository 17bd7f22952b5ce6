"""Memory savers for ``segment_anything``'s ViT image encoder, same function, same keys.

SAM's ``Attention`` builds the full ``N x N`` attention matrix (plus a decomposed
relative-position bias of the same size) and keeps it for the backward pass; at
1024^2 input and batch 4 those matrices dominate training memory even when the
encoder is frozen, because gradients still flow through it to the LoRA layers.
Two independent options fix that without copying segment_anything:

- :class:`FusedRelPosAttention` computes the same attention with
  ``F.scaled_dot_product_attention``. The decomposed rel-pos term
  ``q_i . Rh[h_i, h_j] + q_i . Rw[w_i, w_j]`` is the folded bias of
  :func:`sam3d.models.attention.attend_with_bias`: extra query channels
  ``[q_i . Rh[h_i, :], q_i . Rw[w_i, :]]`` against key channels
  ``[onehot(h_j), onehot(w_j)]``, so no ``N x N`` tensor is ever materialised and the
  fused (flash / memory-efficient) kernels apply.
- :class:`CheckpointedBlock` runs a ViT ``Block`` under activation checkpointing
  (``torch.utils.checkpoint``, non-reentrant): only block inputs are kept.

Both wrappers register the wrapped module's own sub-modules and parameters under
their original names, so state dicts are unchanged and checkpoints stay portable
between models built with and without them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, Block, ImageEncoderViT, get_rel_pos
from torch import nn
from torch.utils.checkpoint import checkpoint

from sam3d.models.attention import attend, attend_with_bias


class FusedRelPosAttention(nn.Module):
    """Drop-in for segment_anything's ``Attention`` using fused SDPA; reuses its parameters.

    Input / output: ``B x H x W x C`` tokens (a window or the whole grid).
    """

    def __init__(self, attn: Attention):
        super().__init__()
        self.num_heads = attn.num_heads
        self.scale = attn.scale
        self.qkv = attn.qkv
        self.proj = attn.proj
        self.use_rel_pos = attn.use_rel_pos
        if self.use_rel_pos:
            self.rel_pos_h = attn.rel_pos_h
            self.rel_pos_w = attn.rel_pos_w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, _ = x.shape
        # q, k, v: B x heads x N x head_dim
        q, k, v = (
            self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        )
        head_dim = q.shape[-1]
        if not self.use_rel_pos:
            out = attend(q, k, v)
        else:
            Rh = get_rel_pos(H, H, self.rel_pos_h).to(q.dtype)  # H x H x head_dim
            Rw = get_rel_pos(W, W, self.rel_pos_w).to(q.dtype)  # W x W x head_dim
            r_q = q.reshape(B, self.num_heads, H, W, head_dim)
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, Rh).reshape(B, self.num_heads, H * W, H)
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, Rw).reshape(B, self.num_heads, H * W, W)
            rows = torch.arange(H, device=x.device).repeat_interleave(W)
            cols = torch.arange(W, device=x.device).repeat(H)
            onehot = torch.cat([F.one_hot(rows, H), F.one_hot(cols, W)], dim=-1).to(q.dtype)
            q_extra = torch.cat([rel_h, rel_w], dim=-1)
            k_extra = onehot.expand(B, self.num_heads, H * W, H + W)
            out = attend_with_bias(q, k, v, q_extra, k_extra, self.scale)
        out = out.reshape(B, self.num_heads, H, W, head_dim).permute(0, 2, 3, 1, 4)
        return self.proj(out.reshape(B, H, W, -1))


class CheckpointedBlock(nn.Module):
    """A segment_anything ViT ``Block`` run under activation checkpointing while training.

    Holds the block's own sub-modules under their names and runs ``Block.forward`` on
    them, so the computation is the library's, not a copy. Input / output ``B x H x W x C``.
    """

    def __init__(self, block: Block):
        super().__init__()
        self.norm1 = block.norm1
        self.attn = block.attn
        self.norm2 = block.norm2
        self.mlp = block.mlp
        self.window_size = block.window_size

    def _block_forward(self, x: torch.Tensor) -> torch.Tensor:
        return Block.forward(self, x)  # type: ignore[arg-type]  # same attributes as a Block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled():
            return checkpoint(self._block_forward, x, use_reentrant=False)
        return self._block_forward(x)


def use_fused_attention(encoder: ImageEncoderViT) -> int:
    """Swap every block's ``Attention`` for :class:`FusedRelPosAttention`, in place.

    Returns the number of blocks changed (already swapped blocks are skipped).
    """
    n = 0
    for blk in encoder.blocks:
        if isinstance(blk.attn, Attention):
            blk.attn = FusedRelPosAttention(blk.attn)
            n += 1
    return n


def use_block_checkpointing(encoder: ImageEncoderViT) -> int:
    """Run every ViT block of ``encoder`` under activation checkpointing, in place."""
    n = 0
    for i, blk in enumerate(encoder.blocks):
        if not isinstance(blk, CheckpointedBlock):
            encoder.blocks[i] = CheckpointedBlock(blk)
            n += 1
    return n
