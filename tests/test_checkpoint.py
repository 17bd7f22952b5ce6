import pytest
import torch
from conftest import TINY_SAM

from sam3d.checkpoint import (
    check_encoder_shape,
    detect_sam_variant,
    load_sam_state_dict,
    sam_encoder_shape,
)
from sam3d.errors import Sam3DError


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


def test_pickled_code_is_refused(tmp_path):
    # weights_only=True must refuse arbitrary objects rather than execute them.
    p = tmp_path / "evil.pth"
    torch.save({"image_encoder.pos_embed": torch.zeros(1), "x": Sam3DError("boom")}, p)
    with pytest.raises(Sam3DError):
        load_sam_state_dict(p)
