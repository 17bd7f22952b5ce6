"""The one attention of the project: multi-head attention on fused SDPA, with its explicit
reference path, and the folded additive bias (relative positions, masks) that keeps the
fused kernels eligible.

Every attention of the models goes through here: SAM's encoder attention on fused kernels
(:mod:`sam3d.models.sam.memory`), Sam3D's 3D window attention
(:mod:`sam3d.models.volumetric.encoder3d`), its prompt attention
(:mod:`sam3d.models.volumetric.prompt3d`) and SAMUS's cross-branch attention
(:mod:`sam3d.models.planar.samus`). The modules keep their own projections (and so
their state-dict keys); only the attention itself is shared.

The folded bias. A bias that is a sum of per-query x per-key terms,
``bias[i, j] = q_extra[i] . k_extra[j]`` (a decomposed relative position:
``q_i . R[h_i, h_j]`` is ``(q_i . R[h_i, :]) . onehot(h_j)``; a region or padding mask
likewise), is appended to the queries and keys as extra channels, so
``softmax(scale * q.k + bias)`` is one SDPA call on ``[q, q_extra / scale]`` and
``[k, k_extra]`` without an ``N x N`` tensor; the widths are zero-padded once to a
multiple of 8 (what the fused kernels want), ``v`` to the same width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``B x N x C`` -> ``B x heads x N x C/heads``."""
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``B x heads x N x d`` -> ``B x N x heads*d``."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    reference: bool = False,
) -> torch.Tensor:
    """``softmax(scale * q k^T [+ mask]) v`` on ``... x N x d`` tensors.

    Args:
        mask: as SDPA's ``attn_mask``: bool (True where a key may be attended) or an
            additive float bias, broadcastable to ``... x Nq x Nk``.
        scale: default ``1 / sqrt(d)``.
        reference: the explicit formulation (``N x N`` logits materialised), for parity
            tests; otherwise fused ``scaled_dot_product_attention``.
    """
    if not reference:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = (q * scale) @ k.transpose(-2, -1)
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + mask.to(logits.dtype)
    return logits.softmax(dim=-1) @ v


def attend_with_bias(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_extra: torch.Tensor,
    k_extra: torch.Tensor,
    scale: float,
    reference: bool = False,
) -> torch.Tensor:
    """``softmax(scale * q k^T + q_extra k_extra^T) v``: the folded bias (module docstring).

    Args:
        q, k, v: ``... x N x d``.
        q_extra, k_extra: ``... x Nq x e`` and ``... x Nk x e``; their product is the
            additive bias (not scaled).
        reference: materialise the bias and use :func:`attend`'s explicit path.

    Returns:
        ``... x Nq x d``.
    """
    if reference:
        bias = q_extra @ k_extra.transpose(-2, -1)
        return attend(q, k, v, mask=bias, scale=scale, reference=True)
    d = q.shape[-1]
    qa = torch.cat([q, q_extra / scale], dim=-1)
    ka = torch.cat([k, k_extra], dim=-1)
    width = -(-qa.shape[-1] // 8) * 8  # fused kernels want head dims that are multiples of 8
    qa = F.pad(qa, (0, width - qa.shape[-1]))
    ka = F.pad(ka, (0, width - ka.shape[-1]))
    va = F.pad(v, (0, width - d))  # equal q/k/v widths keep the flash kernel eligible
    return F.scaled_dot_product_attention(qa, ka, va, scale=scale)[..., :d]
