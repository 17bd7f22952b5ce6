"""SAMUS around segment_anything: exact counts, shapes, what trains, SAM's weights at load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sam3d.errors import Sam3DError
from sam3d.models.checkpoint import load_trained, save_trained
from sam3d.models.planar.samus import CrossBranchAttention, SamusBlock, build_samus, samus_config
from sam3d.models.sam.checkpoint import load_sam_state_dict


@pytest.fixture(scope="module")
def tiny(tiny_sam_checkpoint):
    torch.manual_seed(0)
    return build_samus("tiny", tiny_sam_checkpoint, image_size=256, cnn_width=16)


@pytest.mark.slow
def test_vit_b_counts_match_the_reference_exactly():
    counts = build_samus(**samus_config("vit_b")).parameter_counts()
    # REFERENCE.md section 3, measured on the public reference code with random weights
    assert counts["total"] == 133_323_568
    assert counts["trainable"] == 39_653_120
    assert counts["cnn_branch"] == 2_142_272
    assert counts["pos_adapter"] == 5_309_952
    assert counts["input_adapter"] == 295_872
    assert counts["cross_attn"] == 4 * 2_362_368
    assert counts["refine"] == 4 * 5_309_952
    assert counts["mlp_adapter"] == 4 * 295_872
    assert counts["global_rel_pos"] == 4 * 2 * 63 * 64  # 127 -> 63 rows, head dim 64
    assert counts["prompt_encoder"] == 6_220 and counts["mask_decoder"] == 4_058_340


def test_only_the_trainable_set_gets_gradients(tiny_sam_checkpoint):
    tiny = build_samus("tiny", tiny_sam_checkpoint, image_size=256, cnn_width=16)
    with torch.no_grad():  # a random SAM's position embedding is zero (so would be its grad)
        tiny.sam.image_encoder.pos_embed.normal_()
    x = torch.rand(2, 1, 64, 48)
    points = torch.tensor([[[[30.0, 20.0]]], [[[10.0, 5.0]]]])
    labels = torch.ones(2, 1, 1, dtype=torch.long)
    tiny.train()
    tiny.zero_grad()
    tiny(x, points, labels).square().mean().backward()
    new = ("input_adapter", "pos_adapter", "cnn_branch", "cross_attn", "refine", "mlp_adapter")
    for name, p in tiny.named_parameters():
        global_rel = ".rel_pos_" in name and isinstance(
            tiny.sam.image_encoder.blocks[int(name.split(".")[3])], SamusBlock
        )
        expect = any(f".{n}." in name for n in new) or global_rel
        assert p.requires_grad == expect, name
        if expect:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_patch_embedding_and_position_adapter_give_32x32_tokens(tiny, tiny_sam_checkpoint):
    enc = tiny.sam.image_encoder
    x = tiny.preprocess(torch.rand(1, 1, 256, 256))
    with torch.no_grad():
        tokens = enc.tokens(x)
        pos = enc.pos_adapter(enc.pos_embed)
    assert tokens.shape == (1, 32, 32, 64) and pos.shape == (1, 32, 32, 64)
    # token (i, j) before the adapters: SAM's 16x16 patch conv at (8i, 8j) of the 264 image
    sam = load_sam_state_dict(tiny_sam_checkpoint)
    w, b = sam["image_encoder.patch_embed.proj.weight"], sam["image_encoder.patch_embed.proj.bias"]
    big = F.interpolate(x, size=(264, 264), mode="bilinear", align_corners=False)
    by_hand = torch.zeros(32, 32, 64)
    for i in range(32):
        for j in range(32):
            patch = big[0, :, 8 * i : 8 * i + 16, 8 * j : 8 * j + 16]
            by_hand[i, j] = torch.einsum("ochw,chw->o", w, patch) + b
    with torch.no_grad():  # tokens = input adapter(patch conv) + adapted position
        torch.testing.assert_close(
            enc.tokens(x) - pos, enc.input_adapter(by_hand[None]), rtol=1e-4, atol=1e-4
        )


def test_logits_come_back_at_the_native_size_one_mask_per_prompt(tiny):
    x = torch.rand(1, 1, 96, 80)  # non-square: an H/W swap would show
    points = torch.tensor([[[[40.0, 30.0], [0.0, 0.0]], [[70.0, 60.0], [10.0, 70.0]]]])
    labels = torch.tensor([[[1, -1], [1, 0]]])
    with torch.no_grad():
        out = tiny(x, points, labels)
        single = tiny(x, points[:, 1], labels[:, 1])  # B x N x 2: one prompt
    assert out.shape == (1, 2, 96, 80) and out.dtype == torch.float32
    assert single.shape == (1, 1, 96, 80)
    assert torch.allclose(out[:, 1:], single, atol=1e-5)  # prompts are decoded independently
    assert not torch.allclose(out[:, 0], out[:, 1])
    with pytest.raises(ValueError, match="points must be"):
        tiny(x, points[..., :1], labels)


def test_clicks_map_pixel_centres_into_the_256_frame(tiny):
    # pixel (row 0, col 0) of a 100 x 50 image: centre (0.5, 0.5) -> (0.5*256/50, 0.5*256/100)
    xy = tiny.to_input_frame(torch.tensor([[0.0, 0.0], [99.0, 49.0]]), (100, 50))
    assert torch.allclose(xy[0], torch.tensor([0.5 * 256 / 50 - 0.5, 0.5 * 256 / 100 - 0.5]))
    assert torch.allclose(xy[1], torch.tensor([255.5 - 128 / 50, 255.5 - 128 / 100]))
    same = tiny.to_input_frame(torch.tensor([[12.0, 200.0]]), (256, 256))
    assert torch.allclose(same, torch.tensor([[200.0, 12.0]]))  # native 256: only (r,c)->(x,y)


def test_sam_weights_are_kept_and_global_rel_pos_resized_at_load(tiny, tiny_sam_checkpoint):
    sam = load_sam_state_dict(tiny_sam_checkpoint)
    ours = tiny.sam.state_dict()
    for key in (
        "image_encoder.blocks.0.attn.qkv.weight",
        "image_encoder.neck.0.weight",
        "image_encoder.pos_embed",
        "mask_decoder.iou_prediction_head.layers.0.weight",
        "prompt_encoder.point_embeddings.1.weight",
        "image_encoder.blocks.0.attn.rel_pos_h",  # a windowed block's: unchanged
    ):
        assert torch.equal(ours[key], sam[key]), key
    old = sam["image_encoder.blocks.1.attn.rel_pos_w"]  # global block 1: 127 x 32
    assert old.shape == (127, 32) and ours["image_encoder.blocks.1.attn.rel_pos_w"].shape == (
        63,
        32,
    )
    expect = F.interpolate(old.t()[None], size=63, mode="linear", align_corners=False)[0].t()
    assert torch.allclose(ours["image_encoder.blocks.1.attn.rel_pos_w"], expect)


def test_cross_branch_attention_equals_explicit_softmax_attention():
    torch.manual_seed(1)
    att = CrossBranchAttention(16, num_heads=4)
    x, cnn = torch.randn(2, 3, 5, 16), torch.randn(2, 3, 5, 16)
    q = att.q(x).reshape(2, 15, 4, 4).transpose(1, 2)
    k = att.k(cnn).reshape(2, 15, 4, 4).transpose(1, 2)
    v = att.v(cnn).reshape(2, 15, 4, 4).transpose(1, 2)
    ref = ((q @ k.transpose(-1, -2)) / 2.0).softmax(-1) @ v  # scale 1/sqrt(head_dim 4)
    ref = att.proj(ref.transpose(1, 2).reshape(2, 3, 5, 16))
    assert torch.allclose(att(x, cnn), ref, atol=1e-5)


def test_trained_checkpoint_round_trip_through_the_registry(tiny, tmp_path):
    with torch.no_grad():
        tiny.sam.image_encoder.cnn_branch.stem.conv.weight.add_(0.1)  # not SAM's init any more
    path = save_trained(tmp_path / "model.pt", tiny, meta={"epoch": 3})
    model, meta = load_trained(path, kind="samus")
    assert meta["epoch"] == 3 and model.config == tiny.config
    x, p, lab = (
        torch.rand(1, 1, 40, 56),
        torch.tensor([[[[20.0, 20.0]]]]),
        torch.ones(1, 1, 1).long(),
    )
    with torch.no_grad():
        assert torch.allclose(model(x, p, lab), tiny(x, p, lab), atol=1e-5)
    with pytest.raises(Sam3DError, match="not topolora"):
        load_trained(path, kind="topolora")


def test_bad_sizes_are_refused(tiny_sam_checkpoint):
    with pytest.raises(Sam3DError, match="multiple of 8"):
        build_samus("tiny", tiny_sam_checkpoint, image_size=100)
    with pytest.raises(Sam3DError, match="cannot be pooled"):
        build_samus("tiny", tiny_sam_checkpoint, image_size=192)  # 24 tokens: 64/24
