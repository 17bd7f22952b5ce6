import fnmatch
from pathlib import Path

import pytest
import torch
from conftest import TINY_SAM, requires_cuda

from sam3d.errors import Sam3DError
from sam3d.models import (
    Sam3D,
    build_sam3d,
    count_parameters,
    load_sam3d_checkpoint,
    save_sam3d_checkpoint,
)
from sam3d.models.volumetric.sam3d import PRESET_DIR, resolve_preset


@pytest.fixture(scope="module")
def tiny() -> Sam3D:
    torch.manual_seed(0)
    return build_sam3d("tiny").eval()


def _clicks(*pts, labels=None):
    p = torch.tensor([pts], dtype=torch.float32)
    lab = torch.tensor([labels or [1] * len(pts)])
    return p, lab


def test_tiny_preset_matches_the_tiny_sam():
    cfg = resolve_preset("tiny")
    assert cfg["embed_dim"] == TINY_SAM["encoder_embed_dim"]
    assert cfg["depth"] == TINY_SAM["encoder_depth"]
    assert cfg["num_heads"] == TINY_SAM["encoder_num_heads"]
    assert cfg["global_attn_indexes"] == TINY_SAM["encoder_global_attn_indexes"]
    assert build_sam3d("tiny").crop_size == cfg["crop_size"] == 32


@pytest.mark.parametrize("shape", [(32, 32, 32), (16, 32, 24), (48, 16, 32)])
def test_output_shapes(tiny, shape):
    x = torch.randn(1, 1, *shape)
    p, lab = _clicks((5.0, 6.0, 7.0), (1.0, 2.0, 3.0), labels=[1, 0])
    with torch.no_grad():
        out = tiny(x, p, lab)
    assert out.shape == (1, 2, *shape)
    assert torch.isfinite(out).all()


def test_sides_not_multiple_of_the_token_are_refused(tiny):
    with pytest.raises(ValueError, match="multiples of 4"):
        tiny.encode(torch.randn(1, 1, 30, 32, 32))


def test_decoding_leaves_the_cached_features_unchanged(tiny):
    # encode once, prompt many: decoding neither changes the features nor keeps state
    x = torch.randn(1, 1, 32, 32, 32)
    a, b = _clicks((4.0, 5.0, 6.0)), _clicks((20.0, 3.0, 11.0), (7.0, 7.0, 7.0))
    with torch.no_grad():
        feats = tiny.encode(x)
        before = (feats.prompt_map.clone(), feats.context.clone())
        first = tiny.decode(feats, *a)
        other = tiny.decode(feats, *b)
        again = tiny.decode(feats, *a)
    assert torch.equal(feats.prompt_map, before[0]) and torch.equal(feats.context, before[1])
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-4


def test_features_of_one_item_can_be_selected_and_moved(tiny):
    x = torch.randn(2, 1, 32, 32, 32)
    p, lab = _clicks((12.0, 13.0, 14.0))
    with torch.no_grad():
        feats = tiny.encode(x)
        both = tiny.decode(feats, p.expand(2, -1, -1), lab.expand(2, -1))
        second = tiny.decode(feats.select(1).to(torch.float32), p, lab)
    torch.testing.assert_close(second, both[1:], rtol=1e-4, atol=1e-5)
    assert feats.prompt_map.shape == (2, 32, 8, 8, 8)
    assert feats.context.shape == (2, 16, 16, 16, 16)


def test_negative_click_changes_the_output(tiny):
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        feats = tiny.encode(x)
        only_pos = tiny.decode(feats, *_clicks((10.0, 10.0, 10.0)))
        with_neg = tiny.decode(
            feats, *_clicks((10.0, 10.0, 10.0), (25.0, 25.0, 25.0), labels=[1, 0])
        )
        as_pos = tiny.decode(feats, *_clicks((10.0, 10.0, 10.0), (25.0, 25.0, 25.0), labels=[1, 1]))
    assert (only_pos - with_neg).abs().max() > 1e-4
    assert (as_pos - with_neg).abs().max() > 1e-4


def test_batch_with_different_click_counts_equals_single_runs(tiny):
    x = torch.randn(2, 1, 32, 32, 32)
    p0, l0 = _clicks((3.0, 4.0, 5.0), (20.0, 21.0, 22.0), (9.0, 9.0, 30.0), labels=[1, 0, 1])
    p1, l1 = _clicks((16.0, 16.0, 16.0))
    points = torch.zeros(2, 3, 3)
    labels = torch.full((2, 3), -1)
    points[0], labels[0] = p0[0], l0[0]
    points[1, :1], labels[1, :1] = p1[0], l1[0]
    with torch.no_grad():
        batch = tiny(x, points, labels)
        torch.testing.assert_close(batch[:1], tiny(x[:1], p0, l0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batch[1:], tiny(x[1:], p1, l1), rtol=1e-4, atol=1e-5)


def test_gradients_reach_exactly_the_trainable_parameters():
    torch.manual_seed(0)
    model = build_sam3d("tiny", freeze_sam=True).train()
    x = torch.randn(1, 1, 32, 32, 32)
    out = model(x, *_clicks((8.0, 9.0, 10.0), (20.0, 20.0, 4.0), labels=[1, 0]))
    out.square().mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {
        n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }
    assert with_grad == trainable
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(model.get_parameter(n).grad is None for n in frozen)
    # The anchor's recipe: only SAM's patch conv, position, attention and MLP weights freeze.
    suffixes = ("qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "rel_pos_h", "rel_pos_w")
    for n in frozen:
        assert n.startswith("encoder.")
        assert n.endswith(suffixes) or ".mlp." in n or n == "encoder.pos_embed", n


def _frozen(model: torch.nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if not p.requires_grad}


def test_sam_weights_freeze_only_when_loaded_from_a_sam_checkpoint(tiny_sam_checkpoint, caplog):
    """``freeze_sam="auto"``: random SAM weights train; loaded ones freeze; overrides win."""
    import logging

    sam_names = {n for n in _frozen(build_sam3d("tiny", freeze_sam=True))}
    assert "encoder.blocks.0.attn.qkv.weight" in sam_names and "encoder.pos_embed" in sam_names
    with caplog.at_level(logging.INFO, logger="sam3d.models.volumetric.sam3d"):
        random_init = build_sam3d("tiny")
    assert random_init.preset["freeze_sam"] == "auto"
    assert _frozen(random_init) == set() and random_init.sam_frozen is False
    assert "random initialisation" in caplog.text and "trainable" in caplog.text
    loaded = build_sam3d("tiny", sam_checkpoint=tiny_sam_checkpoint)
    assert _frozen(loaded) == sam_names and loaded.sam_frozen is True
    assert loaded.load_report.sam_frozen is True
    assert "SAM weights frozen" in loaded.load_report.summary()
    unfrozen = build_sam3d("tiny", sam_checkpoint=tiny_sam_checkpoint, freeze_sam=False)
    assert _frozen(unfrozen) == set() and "SAM weights trainable" in unfrozen.load_report.summary()
    with pytest.raises(Sam3DError, match="freeze_sam"):
        build_sam3d("tiny", freeze_sam="sometimes")


def test_tiny_trains_on_the_cpu():
    """A few AdamW steps on a sphere with a click in it lower the loss."""
    torch.manual_seed(0)
    model = build_sam3d("tiny").train()
    grid = torch.stack(torch.meshgrid(*[torch.arange(16.0)] * 3, indexing="ij"))
    sphere = ((grid - 8).square().sum(0) < 16).long()
    x = (sphere.float() + 0.1 * torch.randn(16, 16, 16))[None, None]
    target = sphere[None]
    p, lab = _clicks((8.0, 8.0, 8.0))
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(x, p, lab), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_vit_b_parameter_count_matches_the_reference():
    # the reference's counts are with SAM's weights loaded, hence frozen
    model = build_sam3d("vit_b", freeze_sam=True)
    counts = count_parameters(model)
    assert abs(counts["trainable"] - 25.46e6) < 0.05 * 25.46e6
    parts = {
        name: count_parameters(getattr(model, name))["trainable"]
        for name in ("encoder", "prompt_encoder", "decoder")
    }
    # docs/REFERENCES.md section 1: encoder 15.21M, prompt encoder 3.16M, decoder 7.09M trainable
    for name, ref in (("encoder", 15.21e6), ("prompt_encoder", 3.16e6), ("decoder", 7.09e6)):
        assert abs(parts[name] - ref) < 0.05 * ref, (name, parts[name])
    # SAM ViT-B's image encoder without its 2D neck (~85.7M) is in the model, frozen or not
    assert counts["total"] > 85e6 + counts["trainable"] - 1e6


def test_presets_are_json_and_build_the_same_class():
    names = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
    assert {"vit_b", "vit_l", "vit_h", "tiny"} <= set(names)
    for name in ("vit_l", "vit_h"):
        cfg = resolve_preset(PRESET_DIR / f"{name}.json")
        assert len(cfg["neck_blocks"]) == 4 and cfg["neck_blocks"][-1] == cfg["depth"]


def test_unknown_presets_and_options_give_clear_errors():
    with pytest.raises(Sam3DError, match="unknown model preset 'vit_q'"):
        build_sam3d("vit_q")
    with pytest.raises(Sam3DError, match="unknown model option"):
        build_sam3d("tiny", windowsize=3)


def test_checkpoint_round_trip(tiny, tmp_path, monkeypatch):
    path = save_sam3d_checkpoint(
        tiny,
        tmp_path / "models" / "model.pt",
        meta={"epoch": 3},
        dataset={"name": "kits", "window_hu": [-54, 247]},
    )
    # atomic_write's temporary file is ".model.pt.<random>.pt" beside the target
    names = []
    real_save = torch.save
    monkeypatch.setattr(
        torch, "save", lambda obj, f: names.append(Path(f).name) or real_save(obj, f)
    )
    save_sam3d_checkpoint(
        tiny, path, meta={"epoch": 3}, dataset={"name": "kits", "window_hu": [-54, 247]}
    )
    assert len(names) == 1 and fnmatch.fnmatch(names[0], ".model.pt.*")
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]  # dotfiles included
    model, meta = load_sam3d_checkpoint(path)
    assert meta == {"epoch": 3, "dataset": {"name": "kits", "window_hu": [-54, 247]}}
    assert model.preset == tiny.preset and not model.training
    x = torch.randn(1, 1, 32, 32, 32)
    p, lab = _clicks((7.0, 8.0, 9.0))
    with torch.no_grad():
        torch.testing.assert_close(model(x, p, lab), tiny(x, p, lab))


def test_checkpoint_with_preset_name_is_accepted(tiny, tmp_path):
    path = tmp_path / "named.pt"
    torch.save({"preset": "tiny", "state_dict": tiny.state_dict(), "dataset": {"name": "x"}}, path)
    model, meta = load_sam3d_checkpoint(path)
    assert meta == {"dataset": {"name": "x"}}
    assert model.crop_size == 32


def test_foreign_checkpoints_give_clear_errors(tiny, tiny_sam_checkpoint, tmp_path):
    with pytest.raises(Sam3DError, match="not found"):
        load_sam3d_checkpoint(tmp_path / "missing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(Sam3DError, match="not a readable Sam3D checkpoint"):
        load_sam3d_checkpoint(garbage)
    with pytest.raises(Sam3DError, match="not a Sam3D checkpoint"):
        load_sam3d_checkpoint(tiny_sam_checkpoint)
    wrong = tmp_path / "wrong.pt"
    torch.save({"preset": "vit_b", "state_dict": tiny.state_dict()}, wrong)
    with pytest.raises(Sam3DError, match="do not fit preset 'vit_b'"):
        load_sam3d_checkpoint(wrong)


@requires_cuda
def test_cuda_bf16_runs_on_fused_attention_kernels_and_tracks_float32():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    model = build_sam3d("tiny").cuda().eval()
    x = torch.randn(2, 1, 32, 32, 32, device="cuda")
    p = torch.tensor([[[5.0, 6.0, 7.0], [20.0, 9.0, 3.0]]] * 2, device="cuda")
    lab = torch.tensor([[1, 0], [1, -1]], device="cuda")
    with torch.no_grad():
        ref = model(x, p, lab)
        # no math fallback allowed: flash / memory-efficient kernels must take our shapes
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                low = model(x, p, lab)
    assert low.shape == ref.shape
    assert (low.float() - ref).abs().mean() < 0.1 * ref.abs().mean()


@requires_cuda
def test_cuda_training_step_with_checkpointing_matches_without():
    torch.manual_seed(0)
    x = torch.randn(1, 1, 32, 32, 32, device="cuda")
    p, lab = _clicks((8.0, 9.0, 10.0))
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = build_sam3d("tiny", use_checkpoint=flag).cuda().train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(x, p.cuda(), lab.cuda())
        out.float().square().mean().backward()
        grads.append(model.encoder.blocks[0].adapter.linear1.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-2, atol=1e-4)
