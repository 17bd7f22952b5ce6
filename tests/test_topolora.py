"""TopoLoRA-SAM against the official segment_anything model."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from segment_anything.build_sam import _build_sam
from segment_anything.modeling.image_encoder import Attention
from segment_anything.utils.transforms import ResizeLongestSide

from sam3d.errors import Sam3DError
from sam3d.models.planar.topolora import (
    SpatialAdapter,
    TopoLoRASam,
    build_topolora_sam,
)
from sam3d.models.protocol import group_dict
from sam3d.models.sam.build import build_sam, resize_sam_state_dict
from sam3d.models.sam.lora import LoRALinear, merge_lora
from sam3d.models.sam.memory import (
    CheckpointedBlock,
    FusedRelPosAttention,
    use_block_checkpointing,
    use_fused_attention,
)
from tests.conftest import TINY_SAM, requires_cuda


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    """A non-square RGB image in 0..255, 1 x 3 x 72 x 60."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (1, 3, 72, 60), generator=g).float()


def _official(path: str):
    return _build_sam(checkpoint=path, **TINY_SAM).eval()


def test_step0_logits_equal_the_official_prompt_free_logits(tiny_sam_checkpoint, image):
    official = _official(tiny_sam_checkpoint)
    model = build_topolora_sam("tiny", sam_checkpoint=tiny_sam_checkpoint).eval()
    with torch.no_grad():
        ours = model(image)
        # ResizeLongestSide.apply_image_torch reads H, W from the wrong axes of a B x C x H x W
        # tensor (segment_anything 1.0), so take its size rule and its interpolation directly
        size = ResizeLongestSide.get_preprocess_shape(72, 60, 1024)
        resized = F.interpolate(image, size, mode="bilinear", align_corners=False, antialias=True)
        out = official([{"image": resized[0], "original_size": (72, 60)}], multimask_output=False)
        expected = official.postprocess_masks(
            out[0]["low_res_logits"], resized.shape[-2:], (72, 60)
        )
    assert ours.shape == (1, 1, 72, 60)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(ours > 0, out[0]["masks"])


def test_only_lora_adapter_and_decoder_get_gradients(tiny_sam_checkpoint, image):
    # a 256 input keeps this CPU test fast; the parameter structure is the same as at 1024
    model = build_topolora_sam("tiny", sam_checkpoint=tiny_sam_checkpoint, image_size=256).train()
    with torch.no_grad():  # a model some steps into training: B and the adapter's last conv != 0
        for _, m in model.named_modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.01)
        model.adapter.up.weight.normal_(0, 0.01)
    model(torch.cat([image, image.flip(-1)])).sigmoid().mean().backward()
    groups = group_dict(model.trainable_parameters())
    assert list(groups) == ["lora", "adapter", "decoder"]  # the prompt encoder is frozen
    allowed = {id(p) for ps in groups.values() for p in ps}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad, "no gradients at all"
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert id(p) in allowed, f"{name} is frozen but got a gradient"
    for part in ("lora", "adapter"):  # every LoRA factor and adapter weight is reached
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in groups[part]), part
    assert any(p.grad is not None for p in groups["decoder"])
    assert not any(p.requires_grad for p in model.sam.prompt_encoder.parameters())
    assert not any(
        p.requires_grad for n, p in model.sam.image_encoder.named_parameters() if "lora_" not in n
    )


def test_vit_b_parameter_counts():
    counts = build_topolora_sam("vit_b").parameter_counts()
    # REFERENCE section 2: 4,929,508 trainable of 94,606,640, matched exactly
    assert counts["trainable"] == 4_929_508
    assert counts["total"] == 94_606_640
    assert counts["lora"] == 12 * 2 * 8 * (768 + 3072)
    assert counts["decoder"] == 4_058_340
    assert counts["trainable"] == counts["lora"] + counts["adapter"] + counts["decoder"]


def test_wrong_checkpoint_size_is_a_user_error(tiny_sam_checkpoint):
    with pytest.raises(Sam3DError, match="needs vit_b"):
        build_topolora_sam("vit_b", sam_checkpoint=tiny_sam_checkpoint)
    with pytest.raises(Sam3DError, match="not found"):
        build_topolora_sam("tiny", sam_checkpoint="/nonexistent/sam.pth")


def test_fused_attention_and_checkpointing_compute_the_same_function(tiny_sam_checkpoint):
    # 512 input: 32 x 32 tokens, so windowed blocks pad 32 -> 42 and global blocks see 1024
    base = build_sam("tiny", tiny_sam_checkpoint, image_size=512).image_encoder
    with torch.no_grad():  # non-zero rel-pos tables so the bias term is really exercised
        for n, p in base.named_parameters():
            if "rel_pos" in n:
                p.normal_(0, 0.3)
    fast = copy.deepcopy(base)
    assert use_fused_attention(fast) == 4 and use_block_checkpointing(fast) == 4
    assert isinstance(fast.blocks[1], CheckpointedBlock)
    assert isinstance(fast.blocks[1].attn, FusedRelPosAttention)
    assert list(fast.state_dict()) == list(base.state_dict())  # same keys, portable checkpoints
    x = torch.randn(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    ref = base(x)
    out = fast(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    ref.square().mean().backward()
    out.square().mean().backward()
    grads = dict(base.named_parameters())
    for name, p in fast.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-3, atol=1e-5, msg=name)


def test_attention_wrapper_alone_matches_window_and_global_attention():
    torch.manual_seed(0)
    for size in ((7, 7), (5, 9)):
        attn = Attention(32, num_heads=4, use_rel_pos=True, input_size=size)
        with torch.no_grad():
            attn.rel_pos_h.normal_()
            attn.rel_pos_w.normal_()
        x = torch.randn(2, *size, 32)
        torch.testing.assert_close(FusedRelPosAttention(attn)(x), attn(x), rtol=1e-5, atol=1e-5)


def test_merged_encoder_loads_into_the_official_encoder(tiny_sam_checkpoint):
    model = build_topolora_sam("tiny", sam_checkpoint=tiny_sam_checkpoint, image_size=256).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.05)
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model.sam.image_encoder(x)
        merge_lora(model.sam.image_encoder)
        official = build_sam("tiny", image_size=256)  # the plain segment_anything modules
        official.image_encoder.load_state_dict(model.sam.image_encoder.state_dict(), strict=True)
        torch.testing.assert_close(official.image_encoder(x), expected, rtol=1e-4, atol=1e-4)


def test_adapter_is_identity_at_start_and_batch_independent():
    torch.manual_seed(0)
    adapter = SpatialAdapter(16).train()
    x = torch.randn(2, 16, 5, 5)
    torch.testing.assert_close(adapter(x), x, rtol=0, atol=0)
    with torch.no_grad():
        adapter.up.weight.normal_()
    alone = adapter(x[:1])  # batch 1 in training mode works and equals the batch-2 result
    torch.testing.assert_close(alone, adapter(x)[:1])
    with pytest.raises(Sam3DError, match="adapter norm"):
        SpatialAdapter(16, norm="instance")


def test_wraps_an_already_built_sam_and_rejects_other_modules(tiny_sam_checkpoint):
    sam = _official(tiny_sam_checkpoint)
    model = build_topolora_sam(sam, lora_rank=4, lora_alpha=4.0)
    assert isinstance(model, TopoLoRASam) and model.sam is sam
    assert model.sam.image_encoder.blocks[0].mlp.lin1.rank == 4
    with pytest.raises(Sam3DError, match="wraps a segment_anything Sam"):
        TopoLoRASam(torch.nn.Linear(2, 2))


def test_smaller_input_resizes_position_tables_like_segment_anything(tiny_sam_checkpoint, image):
    from segment_anything.modeling.image_encoder import get_rel_pos

    from sam3d.models.sam.checkpoint import load_sam_state_dict

    model = build_topolora_sam("tiny", sam_checkpoint=tiny_sam_checkpoint, image_size=256)
    assert model.img_size == 256
    state = load_sam_state_dict(tiny_sam_checkpoint)
    big = state["image_encoder.blocks.1.attn.rel_pos_h"]  # global block: 2 * 64 - 1 rows
    with torch.no_grad():
        big.normal_()  # the random SAM's tables are zero; make the comparison meaningful
    table = resize_sam_state_dict(state, model.sam)["image_encoder.blocks.1.attn.rel_pos_h"]
    assert table.shape == (31, big.shape[1])
    # segment_anything's own run-time resizing: get_rel_pos(16, 16)[i, 0] = resized[i + 15]
    torch.testing.assert_close(table[15:], get_rel_pos(16, 16, big)[:, 0])
    torch.testing.assert_close(table[:16].flip(0), get_rel_pos(16, 16, big)[0, :])
    # windowed blocks keep their 27-row tables; the checkpoint's weights are used as they are
    assert model.sam.image_encoder.blocks[0].attn.rel_pos_h.shape[0] == 27
    torch.testing.assert_close(
        model.sam.mask_decoder.iou_token.weight, state["mask_decoder.iou_token.weight"]
    )
    with torch.no_grad():
        assert model.eval()(image).shape == (1, 1, 72, 60)
    with pytest.raises(Sam3DError, match="multiple of 16"):
        build_topolora_sam("tiny", image_size=100)


@requires_cuda
def test_fused_attention_runs_on_fused_cuda_kernels_in_bf16(tiny_sam_checkpoint):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    base = build_sam("tiny", tiny_sam_checkpoint).image_encoder.cuda()
    with torch.no_grad():
        for n, p in base.named_parameters():
            if "rel_pos" in n:
                p.normal_(0, 0.3)
    fast = copy.deepcopy(base)
    use_fused_attention(fast)
    x = torch.randn(2, 3, 1024, 1024, device="cuda")
    with torch.no_grad():
        ref = base(x)
        # only the flash / memory-efficient kernels: this raises if neither accepts the shapes
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = fast(x)
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
