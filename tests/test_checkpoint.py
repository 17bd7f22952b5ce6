import pytest
import torch
from conftest import TINY_SAM

from sam3d.errors import Sam3DError
from sam3d.models.sam.checkpoint import (
    check_encoder_shape,
    detect_sam_variant,
    load_sam_state_dict,
    sam_encoder_shape,
)


def test_reads_official_checkpoint_and_shape(tiny_sam_checkpoint):
    sd = load_sam_state_dict(tiny_sam_checkpoint)
    assert "image_encoder.blocks.0.attn.qkv.weight" in sd
    shape = sam_encoder_shape(sd)
    assert shape == {
        "embed_dim": TINY_SAM["encoder_embed_dim"],
        "depth": TINY_SAM["encoder_depth"],
        "num_heads": TINY_SAM["encoder_num_heads"],
        "patch_size": 16,
    }
    assert detect_sam_variant(sd) == "custom"


def test_vit_b_is_detected(vit_b_sam_checkpoint):
    sd = load_sam_state_dict(vit_b_sam_checkpoint)
    assert detect_sam_variant(sd) == "vit_b"
    with pytest.raises(Sam3DError, match="vit_b encoder .* needs vit_l"):
        check_encoder_shape(sd, embed_dim=1024, depth=24)


def test_wrapped_state_dict_is_accepted(tiny_sam_checkpoint, tmp_path):
    sd = load_sam_state_dict(tiny_sam_checkpoint)
    p = tmp_path / "wrapped.pth"
    torch.save({"model": sd}, p)
    assert load_sam_state_dict(p).keys() == sd.keys()


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        (b"this is not a checkpoint", "not a readable PyTorch checkpoint"),
        ({"encoder.weight": torch.zeros(2)}, "not a Segment Anything checkpoint"),
        ([1, 2, 3], "does not hold a state dict"),
    ],
)
def test_bad_checkpoints_give_clear_errors(tmp_path, content, message):
    p = tmp_path / "ckpt.pth"
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif content is not None:
        torch.save(content, p)
    with pytest.raises(Sam3DError, match=message):
        load_sam_state_dict(p)


class _RunsCodeWhenUnpickled:
    """Unpickling this calls ``open(marker, "w")``: it creates the marker file."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_is_refused(tmp_path):
    # weights_only=True must refuse arbitrary objects rather than execute them
    marker = tmp_path / "code_ran"
    p = tmp_path / "evil.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1), "x": _RunsCodeWhenUnpickled(marker)}, p)
    with pytest.raises(Sam3DError):
        load_sam_state_dict(p)
    assert not marker.exists()
    # the control: a full unpickle of the same file does run the code
    torch.load(p, weights_only=False)
    assert marker.exists()


# --- 2D -> 3D mapping into Sam3D -------------------------------------------------------


@pytest.fixture(scope="module")
def mapped_tiny(tiny_sam_checkpoint):
    from sam3d.models import build_sam3d

    torch.manual_seed(0)
    return build_sam3d("tiny", sam_checkpoint=tiny_sam_checkpoint), load_sam_state_dict(
        tiny_sam_checkpoint
    )


def test_sam_weights_land_in_the_3d_encoder(mapped_tiny):
    model, sd = mapped_tiny
    enc = model.encoder
    for i in range(TINY_SAM["encoder_depth"]):
        for name in ("attn.qkv.weight", "attn.proj.bias", "mlp.lin1.weight", "norm2.weight"):
            got = enc.get_parameter(f"blocks.{i}.{name}")
            assert torch.equal(got, sd[f"image_encoder.blocks.{i}.{name}"]), (i, name)
        h = sd[f"image_encoder.blocks.{i}.attn.rel_pos_h"]
        w = sd[f"image_encoder.blocks.{i}.attn.rel_pos_w"]
        assert torch.equal(enc.blocks[i].attn.rel_pos_h, h)
        torch.testing.assert_close(enc.blocks[i].attn.rel_pos_d, 0.5 * (h + w))
    # global blocks keep SAM's 127-entry tables, windowed ones 27
    assert (
        enc.blocks[1].attn.rel_pos_h.shape[0] == 127 and enc.blocks[0].attn.rel_pos_h.shape[0] == 27
    )
    assert torch.equal(enc.pos_embed, sd["image_encoder.pos_embed"])
    assert torch.equal(enc.patch_embed.proj.weight, sd["image_encoder.patch_embed.proj.weight"])


def test_load_report_lists_used_ignored_and_new(mapped_tiny):
    model, sd = mapped_tiny
    report = model.load_report
    enc_keys = {k for k in sd if k.startswith("image_encoder.") and ".neck." not in k}
    assert set(report.used) == enc_keys
    assert set(report.ignored) == set(sd) - enc_keys
    assert any(k.startswith("mask_decoder.") for k in report.ignored)
    assert "image_encoder.neck.0.weight" in report.ignored
    new = set(report.new)
    assert "encoder.blocks.0.adapter.linear1.weight" in new
    assert "encoder.blocks.2.attn.rel_pos_d" in new and "encoder.depth_embed" in new
    assert "encoder.patch_embed.slice_embed.weight" in new
    assert any(n.startswith("prompt_encoder.") for n in new)
    assert any(n.startswith("decoder.") for n in new)
    assert "encoder.blocks.0.attn.qkv.weight" not in new
    assert set(report.new) | {"encoder." + k[len("image_encoder.") :] for k in report.used} == {
        n for n, _ in model.named_parameters()
    }
    assert "used" in report.summary()


def test_patch_embedding_agrees_with_sams_own_patch_conv(mapped_tiny):
    """A volume constant along the slice axis: every upsampled slice is the same 2D image, so
    the 3D tokens are SAM's own patch embedding of the x4 image, weighted by the depth conv."""
    from conftest import build_official_sam

    model, _ = mapped_tiny
    sam = build_official_sam(**TINY_SAM)
    img2d = torch.randn(1, 1, 16, 12)  # not square: a swapped H/W would not fit
    vol = img2d[..., None].expand(1, 1, 16, 12, 8)
    up = torch.nn.functional.interpolate(
        img2d, scale_factor=4, mode="bilinear", align_corners=False
    )
    with torch.no_grad():
        sam_tokens = sam.image_encoder.patch_embed(up.expand(1, 3, -1, -1))  # 1 x 4 x 3 x C
        pe = model.encoder.patch_embed
        wd = pe.slice_embed.weight.flatten(1)  # C x 16
        expected = sam_tokens * wd.sum(1) + pe.slice_embed.bias
        ours = pe(vol)  # 1 x 4 x 3 x 2 x C
    for k in range(2):
        torch.testing.assert_close(ours[:, :, :, k], expected, rtol=1e-4, atol=1e-4)


def test_wrong_checkpoints_end_in_clear_errors(tiny_sam_checkpoint, tmp_path):
    from sam3d.models import build_sam3d

    with pytest.raises(Sam3DError, match="custom encoder .* needs embed_dim=64, depth=2"):
        build_sam3d("tiny", sam_checkpoint=tiny_sam_checkpoint, depth=2, neck_blocks=[1, 2])
    with pytest.raises(Sam3DError, match="rel_pos_h has shape .* pick the preset"):
        build_sam3d("tiny", sam_checkpoint=tiny_sam_checkpoint, global_attn_indexes=[0, 2])
    other = tmp_path / "not_sam.pth"
    torch.save({"encoder.weight": torch.zeros(3)}, other)
    with pytest.raises(Sam3DError, match="not a Segment Anything checkpoint"):
        build_sam3d("tiny", sam_checkpoint=other)
    with pytest.raises(Sam3DError, match="not found"):
        build_sam3d("tiny", sam_checkpoint=tmp_path / "missing.pth")


def test_official_vit_b_checkpoint_maps_whole_into_the_vit_b_preset(vit_b_sam_checkpoint):
    from sam3d.models import build_sam3d, count_parameters

    model = build_sam3d("vit_b", sam_checkpoint=vit_b_sam_checkpoint)
    sd = load_sam_state_dict(vit_b_sam_checkpoint)
    enc_keys = {k for k in sd if k.startswith("image_encoder.") and ".neck." not in k}
    assert set(model.load_report.used) == enc_keys
    assert torch.equal(
        model.encoder.blocks[11].attn.qkv.weight, sd["image_encoder.blocks.11.attn.qkv.weight"]
    )
    assert abs(count_parameters(model)["trainable"] - 25.46e6) < 0.05 * 25.46e6
