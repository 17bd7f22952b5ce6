import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention as SamAttention

from sam3d.models.volumetric.encoder3d import (
    ImageEncoder3D,
    PatchEmbed3D,
    WindowAttention3D,
    upsample_fold_matrix,
)


def _tiny_encoder(**kw) -> ImageEncoder3D:
    args = dict(
        embed_dim=16,
        depth=2,
        num_heads=2,
        global_attn_indexes=[1],
        crop_size=16,
        window_size=2,
        shift_size=1,
        adapter_dim=8,
        neck_blocks=[1, 2],
        neck_dim=8,
    )
    args.update(kw)
    torch.manual_seed(0)
    enc = ImageEncoder3D(**args)
    with torch.no_grad():  # SAM's position and rel-pos start at zero; make them matter
        for name, p in enc.named_parameters():
            if "pos_embed" in name or "rel_pos" in name:
                p.normal_(0, 0.5)
    return enc


def _slow_patch_embedding(x, w2d, b2d, wd, bd):
    """The anchor's three steps, written out: x4 upsample, 2D conv per slice, depth conv."""
    up = F.interpolate(x, scale_factor=4, mode="trilinear", align_corners=False)[:, 0]
    up3 = torch.stack([up] * 3, dim=1)  # SAM's three repeated channels: B x 3 x H x W x D
    slices = [F.conv2d(up3[..., k], w2d, b2d, stride=16) for k in range(up3.shape[-1])]
    s = torch.stack(slices, dim=-1)  # B x C x h x w x 4D
    depth = s.shape[-1] // 16
    out = torch.stack(
        [(s[..., 16 * t : 16 * t + 16] * wd[None, :, None, None, :]).sum(-1) for t in range(depth)],
        dim=-1,
    )
    return out + bd[None, :, None, None, None]


def test_fold_matrix_reproduces_linear_upsampling():
    m, pad_lo, pad_hi = upsample_fold_matrix(16, 4)
    assert m.shape == (16, 6) and (pad_lo, pad_hi) == (1, 1)
    sig = torch.randn(1, 1, 12, dtype=torch.float64)
    up = F.interpolate(sig, scale_factor=4, mode="linear", align_corners=False)[0, 0]
    padded = F.pad(sig, (1, 1), mode="replicate")[0, 0]
    for t in range(3):  # every patch, borders included
        assert torch.allclose(up[16 * t : 16 * t + 16], m @ padded[4 * t : 4 * t + 6])


@pytest.mark.parametrize("shape", [(8, 8, 8), (8, 12, 16)])
def test_folded_patch_embedding_equals_reference_formulation(shape):
    torch.manual_seed(0)
    pe = PatchEmbed3D(embed_dim=8).double()
    with torch.no_grad():
        pe.proj.bias.normal_()
        pe.slice_embed.bias.normal_()
    x = torch.randn(2, 1, *shape, dtype=torch.float64)
    expected = _slow_patch_embedding(
        x, pe.proj.weight, pe.proj.bias, pe.slice_embed.weight.flatten(1), pe.slice_embed.bias
    ).permute(0, 2, 3, 4, 1)
    fast = pe(x)
    assert fast.shape == (2, *(s // 4 for s in shape), 8)
    torch.testing.assert_close(fast, expected, rtol=0, atol=1e-12)
    pe.reference = True
    torch.testing.assert_close(pe(x), expected, rtol=0, atol=1e-12)


def test_folded_patch_embedding_trains_the_depth_conv_only():
    pe = PatchEmbed3D(embed_dim=8)
    pe.proj.requires_grad_(False)
    pe(torch.randn(1, 1, 8, 8, 8)).sum().backward()
    assert pe.proj.weight.grad is None
    assert pe.slice_embed.weight.grad is not None and pe.slice_embed.weight.grad.abs().sum() > 0


def _our_attention(dim, heads, window, table_len, shift=0):
    torch.manual_seed(1)
    attn = WindowAttention3D(dim, heads, window, shift=shift, rel_pos_size=table_len).double()
    with torch.no_grad():
        for p in (attn.rel_pos_h, attn.rel_pos_w, attn.rel_pos_d):
            p.normal_()
    return attn


@pytest.mark.parametrize("reference", [False, True])
@pytest.mark.parametrize("axes", ["hw", "hd"])
def test_window_attention_matches_sam_2d_attention(reference, axes):
    """A one-token-thick 3D grid is SAM's 2D attention (the third axis is padding, masked)."""
    dim, heads, ws = 16, 2, 4
    ours = _our_attention(dim, heads, ws, table_len=27)
    ours.reference = reference
    sam = SamAttention(dim, heads, use_rel_pos=True, input_size=(ws, ws)).double()
    sam.qkv.load_state_dict(ours.qkv.state_dict())
    sam.proj.load_state_dict(ours.proj.state_dict())
    second = ours.rel_pos_w if axes == "hw" else ours.rel_pos_d
    # SAM interpolates 27-entry tables to 2 * 4 - 1 on use, as we do.
    sam.rel_pos_h = torch.nn.Parameter(ours.rel_pos_h.detach().clone())
    sam.rel_pos_w = torch.nn.Parameter(second.detach().clone())
    x2d = torch.randn(2, ws, ws, dim, dtype=torch.float64)
    x3d = x2d[:, :, :, None] if axes == "hw" else x2d[:, :, None]
    out = ours(x3d)
    out = out[:, :, :, 0] if axes == "hw" else out[:, :, 0]
    torch.testing.assert_close(out, sam(x2d), rtol=0, atol=1e-10)


@pytest.mark.parametrize("grid", [(4, 4, 4), (6, 5, 8), (8, 8, 8)])
@pytest.mark.parametrize("shift", [0, 2])
def test_fused_window_attention_equals_explicit(grid, shift):
    attn = _our_attention(16, 2, 4, table_len=127, shift=shift)
    x = torch.randn(2, *grid, 16, dtype=torch.float64)
    fast = attn(x)
    attn.reference = True
    torch.testing.assert_close(fast, attn(x), rtol=0, atol=1e-10)


def test_shifted_window_keeps_regions_apart():
    """With window = grid and shift 2, a token never mixes with tokens of another region."""
    attn = _our_attention(8, 1, 4, table_len=27, shift=2)
    x = torch.randn(1, 4, 4, 4, 8, dtype=torch.float64)
    base = attn(x)
    # Token (0, 0, 0) rolls to (2, 2, 2): its region holds the tokens (0..1)^3 only;
    # changing a token of another region (e.g. (3, 3, 3)) must not move it.
    x2 = x.clone()
    x2[0, 3, 3, 3] += 5.0
    torch.testing.assert_close(attn(x2)[0, 0, 0, 0], base[0, 0, 0, 0], rtol=0, atol=1e-12)
    x3 = x.clone()
    x3[0, 1, 1, 1] += 5.0
    assert not torch.allclose(attn(x3)[0, 0, 0, 0], base[0, 0, 0, 0])


@pytest.mark.parametrize("shape", [(16, 16, 16), (8, 16, 24), (20, 12, 16)])
def test_encoder_output_shapes(shape):
    enc = _tiny_encoder()
    maps = enc(torch.randn(2, 1, *shape))
    assert len(maps) == 2
    for m in maps:
        assert m.shape == (2, 8, *(s // 4 for s in shape))
        assert torch.isfinite(m).all()


def test_encoder_reference_mode_equals_fast_mode():
    enc = _tiny_encoder().double()
    x = torch.randn(1, 1, 16, 16, 12, dtype=torch.float64)
    fast = enc(x)
    enc.set_reference(True)
    for a, b in zip(fast, enc(x)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)


def test_activation_checkpointing_gives_the_same_gradients():
    x = torch.randn(1, 1, 16, 16, 16)
    grads = []
    # none, every block, the first block only
    for flag, n_ckpt in ((False, 0), (True, 2), (1, 1)):
        enc = _tiny_encoder(use_checkpoint=flag)
        assert enc.checkpointed_blocks == n_ckpt
        sum(m.square().mean() for m in enc(x)).backward()
        grads.append({n: p.grad.clone() for n, p in enc.named_parameters() if p.requires_grad})
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for n in grads[0]:
            torch.testing.assert_close(other[n], grads[0][n], rtol=1e-4, atol=1e-6)


def test_sam_weights_are_frozen_the_rest_trains():
    enc = _tiny_encoder()
    frozen = {n for n, p in enc.named_parameters() if not p.requires_grad}
    assert "patch_embed.proj.weight" in frozen and "pos_embed" in frozen
    assert "blocks.0.attn.qkv.weight" in frozen and "blocks.1.mlp.lin2.bias" in frozen
    assert "blocks.0.attn.rel_pos_h" in frozen and "blocks.0.attn.rel_pos_d" not in frozen
    for trainable in ("patch_embed.slice_embed.weight", "depth_embed", "blocks.0.norm1.weight"):
        assert trainable not in frozen
    assert not any(n.startswith(("necks.", "blocks.0.adapter.")) for n in frozen)


def test_position_embedding_pools_sam_grid_and_adds_depth():
    enc = _tiny_encoder()
    pos = enc.position_embedding((4, 4, 4))[0]
    pooled = F.avg_pool2d(enc.pos_embed.permute(0, 3, 1, 2), 16)[0].permute(1, 2, 0)
    torch.testing.assert_close(pos, pooled[:, :, None] + enc.depth_embed[0][None, None])
    assert enc.position_embedding((6, 5, 3)).shape == (1, 6, 5, 3, 16)


def test_bf16_autocast_runs_close_to_float32():
    enc = _tiny_encoder()
    x = torch.randn(1, 1, 16, 16, 16)
    ref = enc(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = enc(x)
    for a, b in zip(ref, low):
        assert b.dtype in (torch.bfloat16, torch.float32)
        assert (a - b.float()).abs().mean() < 0.1 * a.abs().mean()


def _anchor_block(blk, x):
    """A 3DSAM-adapter block written out the anchor's way: explicit windows, the Swin mask
    from region slices (-100 between regions), explicit attention with decomposed rel-pos."""
    from segment_anything.modeling.image_encoder import get_rel_pos

    ad, at = blk.adapter, blk.attn
    a = F.relu(ad.linear1(x))
    a = F.relu(ad.conv(a.permute(0, 4, 1, 2, 3))).permute(0, 2, 3, 4, 1)
    x = x + F.relu(ad.linear2(a))
    shortcut = x
    x = blk.norm1(x)
    b, h, w, d, c = x.shape
    ws, sh, nh = at.window_size, at.shift, at.num_heads
    mask = None
    if sh:
        x = torch.roll(x, shifts=(-sh, -sh, -sh), dims=(1, 2, 3))
        img = torch.zeros(h, w, d)
        cuts = (slice(0, -ws), slice(-ws, -sh), slice(-sh, None))
        cnt = 0
        for s1 in cuts:
            for s2 in cuts:
                for s3 in cuts:
                    img[s1, s2, s3] = cnt
                    cnt += 1
        mw = (
            img.view(h // ws, ws, w // ws, ws, d // ws, ws)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(-1, ws**3)
        )
        mask = (mw[:, None, :] != mw[:, :, None]).double() * -100.0
    win = x.view(b, h // ws, ws, w // ws, ws, d // ws, ws, c).permute(0, 1, 3, 5, 2, 4, 6, 7)
    win = win.reshape(-1, ws**3, c)
    bw, n = win.shape[:2]
    qkv = at.qkv(win).reshape(bw, n, 3, nh, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q * at.scale) @ k.transpose(-2, -1)
    rq = q.reshape(bw, nh, ws, ws, ws, -1)
    rh, rw, rd = (get_rel_pos(ws, ws, t) for t in (at.rel_pos_h, at.rel_pos_w, at.rel_pos_d))
    attn = attn.view(bw, nh, ws, ws, ws, ws, ws, ws)
    attn = attn + torch.einsum("bnhwdc,hkc->bnhwdk", rq, rh)[..., :, None, None]
    attn = attn + torch.einsum("bnhwdc,wkc->bnhwdk", rq, rw)[..., None, :, None]
    attn = attn + torch.einsum("bnhwdc,dkc->bnhwdk", rq, rd)[..., None, None, :]
    attn = attn.reshape(bw, nh, n, n)
    if mask is not None:
        attn = (attn.view(b, -1, nh, n, n) + mask[None, :, None]).view(bw, nh, n, n)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(bw, n, c)
    out = at.proj(out).view(b, h // ws, w // ws, d // ws, ws, ws, ws, c)
    x = out.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, h, w, d, c)
    if sh:
        x = torch.roll(x, shifts=(sh, sh, sh), dims=(1, 2, 3))
    x = shortcut + x
    return x + blk.mlp(blk.norm2(x))


@pytest.mark.parametrize("block", [0, 1])  # block 0 shifts, block 1 does not
def test_block_equals_the_anchor_block_written_out(block):
    enc = _tiny_encoder(window_size=4, shift_size=2).double()
    blk = enc.blocks[block]
    x = torch.randn(2, 8, 8, 8, 16, dtype=torch.float64)
    torch.testing.assert_close(blk(x), _anchor_block(blk, x), rtol=0, atol=1e-10)
