"""The one attention: fused and reference paths agree, and the folded bias equals an explicit
softmax written out here (not through sam3d.models.attention)."""

from __future__ import annotations

import pytest
import torch

from sam3d.models.attention import attend, attend_with_bias, merge_heads, split_heads


def _softmax_attention(q, k, v, scale, bias=None):
    """By hand: every logit, then softmax over the keys."""
    logits = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    if bias is not None:
        logits = logits + bias
    w = torch.exp(logits - logits.amax(-1, keepdim=True))
    return torch.einsum("bhij,bhjd->bhid", w / w.sum(-1, keepdim=True), v)


def test_heads_split_and_merge_back():
    x = torch.randn(2, 5, 12)
    h = split_heads(x, 3)
    assert h.shape == (2, 3, 5, 4)
    assert torch.equal(h[:, 1, :, :], x[:, :, 4:8])  # head 1 is channels 4..7
    assert torch.equal(merge_heads(h), x)


@pytest.mark.parametrize("reference", [False, True])
def test_attend_equals_softmax_by_hand_with_masks(reference):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 7, 5), torch.randn(2, 3, 9, 5), torch.randn(2, 3, 9, 5)
    scale = 5**-0.5
    torch.testing.assert_close(
        attend(q, k, v, reference=reference), _softmax_attention(q, k, v, scale)
    )
    keep = torch.rand(2, 1, 7, 9) > 0.3
    keep[..., 0] = True  # every query sees at least one key
    bias = torch.where(keep, 0.0, -1e9)
    torch.testing.assert_close(
        attend(q, k, v, mask=keep, reference=reference), _softmax_attention(q, k, v, scale, bias)
    )
    additive = torch.randn(2, 3, 7, 9)
    torch.testing.assert_close(
        attend(q, k, v, mask=additive, scale=0.3, reference=reference),
        _softmax_attention(q, k, v, 0.3, additive),
    )


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("d, e", [(5, 3), (8, 8), (6, 11)])  # widths off and on multiples of 8
def test_the_folded_bias_is_the_product_of_the_extra_channels(reference, d, e):
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 2, 6, d), torch.randn(2, 2, 10, d), torch.randn(2, 2, 10, d)
    qe, ke = torch.randn(2, 2, 6, e), torch.randn(2, 2, 10, e)
    scale = 0.37
    bias = torch.einsum("bhie,bhje->bhij", qe, ke)  # not scaled
    got = attend_with_bias(q, k, v, qe, ke, scale, reference=reference)
    assert got.shape == (2, 2, 6, d)
    torch.testing.assert_close(got, _softmax_attention(q, k, v, scale, bias))
