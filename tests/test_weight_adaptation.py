"""Weight adaptation against independent expectations: SAM's position tables resized to
another input side (a bicubic written out by hand, segment_anything's own run-time
``get_rel_pos``), LoRA dropout (each update input either dropped or scaled, by hand) and
SAMUS's two half-weight joins (REFERENCE.md section 3: ``x += 0.5 * MLP adapter`` and
``x + 0.5 * CNN features`` into the neck).

The SAM here is ``asymmetric_tiny_sam_checkpoint`` (tests/conftest.py): its position
embedding and relative-position tables are non-zero and differ along each axis, so a
table zeroed, left unresized or transposed changes the numbers. docs/RELEASING.md lists
the mutants this file must catch.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from segment_anything.modeling.image_encoder import get_rel_pos
from torch import nn

from sam3d.models.sam.build import build_sam
from sam3d.models.sam.checkpoint import load_sam_state_dict
from sam3d.models.sam.lora import LoRALinear

A = -0.75  # the cubic convolution kernel's parameter in PyTorch's (and OpenCV's) bicubic


def _cubic_weights(t: float) -> list[float]:
    """Keys' cubic convolution weights of the four neighbours ``i0 - 1 .. i0 + 2``."""

    def near(x: float) -> float:  # |x| <= 1
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def bicubic_by_hand(a: np.ndarray, out: int) -> np.ndarray:
    """Resize the first two axes of ``a`` (``n x n x C``) to ``out x out``: half-pixel
    centres (``align_corners=False``), border samples repeated, no antialiasing."""
    n = a.shape[0]

    def axis(x: np.ndarray) -> np.ndarray:
        rows = []
        for o in range(out):
            src = (o + 0.5) * n / out - 0.5
            i0 = math.floor(src)
            w = _cubic_weights(src - i0)
            idx = [min(max(i0 + d, 0), n - 1) for d in (-1, 0, 1, 2)]
            rows.append(sum(wk * x[i] for wk, i in zip(w, idx)))
        return np.stack(rows)

    a = axis(a.astype(np.float64))
    return axis(a.transpose(1, 0, 2)).transpose(1, 0, 2)


@pytest.fixture(scope="module")
def sam_state(asymmetric_tiny_sam_checkpoint) -> dict[str, torch.Tensor]:
    return load_sam_state_dict(asymmetric_tiny_sam_checkpoint)


def test_the_fixture_has_non_zero_non_symmetric_tables(sam_state):
    pos = sam_state["image_encoder.pos_embed"][0]
    assert pos.abs().min() >= 0 and pos.abs().mean() > 0.3
    assert not torch.allclose(pos, pos.transpose(0, 1), atol=0.1)
    h, w = (
        sam_state["image_encoder.blocks.1.attn.rel_pos_h"],
        sam_state["image_encoder.blocks.1.attn.rel_pos_w"],
    )
    assert h.abs().mean() > 0.3 and not torch.allclose(h, w, atol=0.1)
    assert not torch.allclose(h, h.flip(0), atol=0.1)  # a reversed table would show


@pytest.mark.parametrize("side", [256, 512])
def test_position_embedding_is_resized_as_the_bicubic_by_hand(
    asymmetric_tiny_sam_checkpoint, sam_state, side
):
    sam = build_sam("tiny", asymmetric_tiny_sam_checkpoint, image_size=side)
    got = sam.image_encoder.pos_embed.detach()[0].double().numpy()
    grid = side // 16
    assert got.shape[:2] == (grid, grid)
    expected = bicubic_by_hand(sam_state["image_encoder.pos_embed"][0].numpy(), grid)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert np.abs(got).mean() > 0.3  # not zeroed


@pytest.mark.parametrize("side", [256, 512])
def test_resized_rel_pos_gives_segment_anythings_run_time_bias(
    asymmetric_tiny_sam_checkpoint, sam_state, side
):
    """segment_anything interpolates a table to ``2 g - 1`` rows at run time
    (``get_rel_pos``); the table we resize at load must give the same bias for every
    (query, key) pair of the ``g x g`` grid, and the windowed blocks keep theirs."""
    sam = build_sam("tiny", asymmetric_tiny_sam_checkpoint, image_size=side)
    g = side // 16
    ours = sam.state_dict()
    for i, blk in enumerate(sam.image_encoder.blocks):
        for axis in ("h", "w"):
            key = f"image_encoder.blocks.{i}.attn.rel_pos_{axis}"
            if blk.window_size == 0:  # global: g x g tokens
                assert ours[key].shape[0] == 2 * g - 1, key
                torch.testing.assert_close(
                    get_rel_pos(g, g, ours[key]), get_rel_pos(g, g, sam_state[key]),
                    rtol=0, atol=1e-6,
                )  # fmt: skip
            else:  # 14 x 14 windows whatever the input side
                assert torch.equal(ours[key], sam_state[key]), key


@pytest.mark.parametrize("kind", ["topolora", "desam"])
def test_planar_builders_load_the_resized_tables(asymmetric_tiny_sam_checkpoint, sam_state, kind):
    from sam3d.models.registry import build_model

    config = {"sam": "tiny", "image_size": 256}
    if kind == "desam":
        config["tap_blocks"] = [0, 1, 2]  # the tiny SAM has two global blocks
    model = build_model(kind, config, sam_checkpoint=asymmetric_tiny_sam_checkpoint)
    enc = model.sam.image_encoder if kind == "topolora" else model.image_encoder
    expected = bicubic_by_hand(sam_state["image_encoder.pos_embed"][0].numpy(), 16)
    np.testing.assert_allclose(enc.pos_embed.detach()[0].double().numpy(), expected, atol=1e-5)
    rel = enc.blocks[1].attn.rel_pos_w.detach()  # block 1 is global in the tiny SAM
    key = "image_encoder.blocks.1.attn.rel_pos_w"
    torch.testing.assert_close(get_rel_pos(16, 16, rel), get_rel_pos(16, 16, sam_state[key]))


def _identity_lora(dim: int, dropout: float) -> LoRALinear:
    """A LoRA layer whose update is the (dropped-out) input itself: A = B = I, alpha = rank."""
    layer = LoRALinear(nn.Linear(dim, dim), rank=dim, alpha=float(dim), dropout=dropout)
    with torch.no_grad():
        layer.lora_a.copy_(torch.eye(dim))
        layer.lora_b.copy_(torch.eye(dim))
    return layer


def test_lora_dropout_drops_or_rescales_each_update_input_by_hand():
    torch.manual_seed(0)
    layer = _identity_lora(16, dropout=0.5).train()
    x = torch.randn(256, 16).sign() * (1 + torch.rand(256, 16))  # no zero entries
    with torch.no_grad():
        update = layer(x) - layer.base(x)
    dropped = update.abs() < 1e-5
    kept = (update - x / 0.5).abs() < 1e-4  # inverted dropout: kept inputs scaled 1 / (1 - p)
    assert bool((dropped | kept).all())
    assert 0.4 < float(dropped.float().mean()) < 0.6  # p = 0.5 of 4096 entries
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x) - layer.base(x), x)  # no dropout in eval


def test_topolora_hands_lora_dropout_to_every_adapted_layer():
    from sam3d.models.planar.topolora import build_topolora_sam

    torch.manual_seed(0)
    model = build_topolora_sam("tiny", image_size=64, lora_dropout=0.5)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 2 * 4  # lin1 and lin2 of the tiny SAM's four blocks
    with torch.no_grad():
        for m in layers:
            m.lora_b.normal_(0, 0.5)
    x = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        a, b = model.train()(x), model(x)
        c, d = model.eval()(x), model(x)
    assert not torch.allclose(a, b)  # dropout draws differ between training passes
    assert torch.equal(c, d)


@pytest.fixture(scope="module")
def samus(asymmetric_tiny_sam_checkpoint):
    from sam3d.models.planar.samus import build_samus

    torch.manual_seed(0)
    return build_samus("tiny", asymmetric_tiny_sam_checkpoint, image_size=64, cnn_width=8).eval()


def test_samus_mlp_adapter_joins_the_block_at_half_weight(samus):
    """The adapter made a constant ``v`` (zero weights, bias ``v``): the block's output moves
    by exactly ``0.5 v`` and its CNN features not at all."""
    block = samus.sam.image_encoder.global_blocks()[0]
    torch.manual_seed(1)
    x, cnn = torch.randn(1, 8, 8, 64), torch.randn(1, 8, 8, 64)
    v = torch.randn(64)
    ad = block.mlp_adapter
    saved = {k: t.clone() for k, t in ad.state_dict().items()}
    try:
        with torch.no_grad():
            for p in ad.parameters():
                p.zero_()
            base, cnn0 = block(x, cnn)
            ad.up.bias.copy_(v)
            moved, cnn1 = block(x, cnn)
    finally:
        ad.load_state_dict(saved)
    torch.testing.assert_close(moved - base, (0.5 * v).expand_as(base), rtol=0, atol=1e-5)
    assert torch.equal(cnn0, cnn1)


def test_samus_encoder_adds_half_the_cnn_features_before_the_neck(samus):
    enc = samus.sam.image_encoder
    seen = {}
    last = enc.blocks[-1]
    assert last in enc.global_blocks()  # the tiny SAM's last block is global: (x, cnn) out
    hooks = [
        last.register_forward_hook(lambda m, i, o: seen.update(last=o)),
        enc.neck.register_forward_hook(lambda m, i, o: seen.update(neck_in=i[0])),
    ]
    try:
        with torch.no_grad():
            enc(torch.rand(1, 3, 64, 64))
    finally:
        for h in hooks:
            h.remove()
    x, cnn = seen["last"]
    assert cnn.abs().mean() > 0.01  # the CNN branch contributes
    expected = (x + 0.5 * cnn).permute(0, 3, 1, 2)
    torch.testing.assert_close(seen["neck_in"], expected, rtol=0, atol=1e-6)
