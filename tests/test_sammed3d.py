"""SAM-Med3D against its published model code (medim, the reference) and through our loader.

medim builds SAM-Med3D with random weights (``pretrained=False``, no network: the tests
forbid sockets while it builds); its state dict goes into ours through
:func:`load_official`, and every output must agree within 1e-5 in float32 on the CPU.
"""

from __future__ import annotations

import argparse
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sam3d.errors import Sam3DError
from sam3d.models.registry import build_model, kind_of
from sam3d.models.volumetric.sammed3d.build import build_sammed3d
from sam3d.models.volumetric.sammed3d.checkpoint import load_official, read_official
from sam3d.models.volumetric.sammed3d.model import foreground_zscore

medim = pytest.importorskip("medim")

TOL = 1e-5
# the tiny preset's shape in medim's builder arguments
TINY_MEDIM = dict(
    encoder_embed_dim=48,
    encoder_depth=2,
    encoder_num_heads=4,
    encoder_global_attn_indexes=[1],
    prompt_embed_dim=48,
    image_size=32,
    vit_patch_size=8,
)


def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Move every weight (zero-initialised tables included) by N(0, 0.02), ViT's init scale.

    (Ten times more blows the published encoder's activations up to ~70, where float32's
    own rounding of either implementation exceeds 1e-5.)"""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))


def _pair(monkeypatch, preset: str = "tiny", **medim_kwargs):
    _no_network(monkeypatch)
    torch.manual_seed(0)
    ref = medim.create_model("SAM-Med3D", pretrained=False, **medim_kwargs).eval()
    monkeypatch.undo()
    _randomise(ref)
    ours = build_sammed3d(preset, input_norm="none").eval()
    report = load_official(ours, ref.state_dict())
    assert report.complete and len(report.loaded) == len(ours.state_dict())
    return ref, ours


@pytest.fixture(scope="module")
def tiny_pair():
    mp = pytest.MonkeyPatch()
    try:
        yield _pair(mp, **TINY_MEDIM)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def tiny_embeddings(tiny_pair):
    """medim's image embedding and our features of the same two crops."""
    ref, ours = tiny_pair
    with torch.no_grad():
        return ref.image_encoder(_crop(32)), ours.encode(_crop(32))


def _crop(n: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 1, n, n, n, generator=torch.Generator().manual_seed(3))


# clicks in the crop's voxel (tensor-axis) order; -1 pads a shorter click list
PROMPTS = {
    "one click": (torch.tensor([[[5.0, 20.0, 11.0]], [[30.0, 2.0, 17.0]]]), [[1], [1]]),
    "several clicks": (
        torch.tensor(
            [
                [[5.0, 20.0, 11.0], [16.0, 16.0, 16.0], [30, 1, 8]],
                [[2.0, 9.0, 27.0], [12, 30, 3], [0, 0, 0]],
            ]
        ),  # fmt: skip
        [[1, 0, 1], [1, 1, -1]],
    ),
}


def _reference_step(ref, emb, points, labels, low_res):
    sparse, dense = ref.prompt_encoder(points=[points, labels], boxes=None, masks=low_res)
    logits, _ = ref.mask_decoder(
        image_embeddings=emb,
        image_pe=ref.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    return sparse, dense, logits


def test_medim_builds_without_network(monkeypatch):
    _no_network(monkeypatch)
    with pytest.raises(AssertionError, match="network access attempted"):
        socket.create_connection(("huggingface.co", 443))
    model = medim.create_model("SAM-Med3D", pretrained=False, **TINY_MEDIM)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_image_embedding_equals_medim(tiny_embeddings):
    a, feats = tiny_embeddings
    b = feats.embedding
    assert a.shape == b.shape == (2, 48, 4, 4, 4)
    assert (a - b).abs().max() <= TOL


@pytest.mark.parametrize("with_mask", [False, True], ids=["no mask", "previous mask"])
@pytest.mark.parametrize("prompt", list(PROMPTS))
def test_prompts_and_mask_logits_equal_medim(tiny_pair, tiny_embeddings, prompt, with_mask):
    ref, ours = tiny_pair
    emb, feats = tiny_embeddings
    points, labels = PROMPTS[prompt]
    labels = torch.tensor(labels)
    g = torch.Generator().manual_seed(5)
    low = 3 * torch.randn(2, 1, 16, 16, 16, generator=g) if with_mask else None
    with torch.no_grad():
        s_ref, d_ref, l_ref = _reference_step(ref, emb, points, labels, low)
        s, d = ours.prompt_encoder(points, labels, low)
        logits = ours.decode_low_res(feats, points, labels, low)
        pe_ref, pe = ref.prompt_encoder.get_dense_pe(), ours.prompt_encoder.dense_pe()
    assert s.shape == s_ref.shape and d.shape == d_ref.shape
    assert (s - s_ref).abs().max() <= TOL and (d - d_ref).abs().max() <= TOL
    assert (pe - pe_ref).abs().max() <= TOL
    assert logits.shape == l_ref.shape == (2, 1, 16, 16, 16)
    assert (logits - l_ref).abs().max() <= TOL
    assert l_ref.abs().max() > 1e-3  # not trivially zero


def test_iterative_clicks_follow_the_reference_inference(tiny_pair):
    """utils/infer_utils.py: zeros as the first mask, then each step's low-res logits fed
    back with all clicks so far; the mask upsampled trilinearly. ``decode`` with the
    previous probability as ``mask_prompt`` gives the same first step exactly."""
    ref, ours = tiny_pair
    x = _crop(32, batch=1)
    clicks = torch.tensor([[[10.0, 12.0, 20.0], [25.0, 5.0, 9.0], [3.0, 30.0, 16.0]]])
    labels = torch.tensor([[1, 0, 1]])
    with torch.no_grad():
        emb, feats = ref.image_encoder(x), ours.encode(x)
        low_ref = torch.zeros(1, 1, 16, 16, 16)
        low = ours.empty_mask(1, "cpu")
        for n in range(1, 4):
            _, _, low_ref = _reference_step(ref, emb, clicks[:, :n], labels[:, :n], low_ref)
            low = ours.decode_low_res(feats, clicks[:, :n], labels[:, :n], low)
            assert (low - low_ref).abs().max() <= TOL
        first = ours.decode(feats, clicks[:, :1], labels[:, :1])
        _, _, first_ref = _reference_step(
            ref, emb, clicks[:, :1], labels[:, :1], torch.zeros(1, 1, 16, 16, 16)
        )
    up = F.interpolate(first_ref, size=(32, 32, 32), mode="trilinear", align_corners=False)
    assert first.shape == (1, 2, 32, 32, 32)
    assert (first[:, 1] - up[:, 0]).abs().max() <= TOL and not first[:, 0].any()
    # softmax over our two channels is the reference's sigmoid
    prob = torch.softmax(first, dim=1)[:, 1]
    assert torch.allclose(prob, torch.sigmoid(up[:, 0]), atol=1e-6)


def test_a_probability_mask_prompt_reaches_the_decoder(tiny_pair):
    _, ours = tiny_pair
    x = _crop(32, batch=1)
    pts, lab = torch.tensor([[[16.0, 16.0, 16.0]]]), torch.ones(1, 1, dtype=torch.long)
    prev = torch.zeros(1, 1, 32, 32, 32)
    prev[..., 8:24, 8:24, 8:24] = 1.0
    with torch.no_grad():
        feats = ours.encode(x)
        plain = ours.decode(feats, pts, lab)
        fed = ours.decode(feats, pts, lab, mask_prompt=prev)
        low = ours.low_res_prompt(prev)
        direct = ours.decode_low_res(feats, pts, lab, low)
    assert low.shape == (1, 1, 16, 16, 16)
    assert low[0, 0, 8, 8, 8] > 9 and low[0, 0, 0, 0, 0] < -9  # logit(1 - 1e-4), logit(1e-4)
    assert (fed - plain).abs().max() > 1e-3
    up = F.interpolate(direct, size=(32, 32, 32), mode="trilinear", align_corners=False)
    assert torch.allclose(fed[:, 1:], up, atol=1e-6)


def _counts(model: torch.nn.Module) -> dict[str, int]:
    return {
        name: sum(p.numel() for p in module.parameters())
        for name, module in model.named_modules()
        if name and list(module.parameters())
    }


def test_parameter_counts_equal_module_by_module(tiny_pair):
    ref, ours = tiny_pair
    ref_counts, our_counts = _counts(ref), _counts(ours)
    # every module of the reference that holds weights has its namesake with the same count
    assert ref_counts == {k: our_counts[k] for k in ref_counts}
    assert sum(p.numel() for p in ref.parameters()) == sum(p.numel() for p in ours.parameters())


@pytest.mark.slow
def test_the_published_size_equals_medim(monkeypatch):
    ref, ours = _pair(monkeypatch, "vit_b_ori")
    assert sum(p.numel() for p in ours.parameters()) == 100_509_232
    assert _counts(ref) == {k: _counts(ours)[k] for k in _counts(ref)}
    x = _crop(128, batch=1)
    points, labels = torch.tensor([[[64.0, 40.0, 90.0], [70, 80, 20]]]), torch.tensor([[1, 0]])
    low = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        emb = ref.image_encoder(x)
        feats = ours.encode(x)
        assert (emb - feats.embedding).abs().max() <= TOL
        _, _, l_ref = _reference_step(ref, emb, points, labels, low)
        assert (ours.decode_low_res(feats, points, labels, low) - l_ref).abs().max() <= TOL


# -- the loader ---------------------------------------------------------------------


def test_official_pth_loads_with_a_report(tiny_pair, tmp_path):
    ref, _ = tiny_pair
    state = {f"module.{k}": v for k, v in ref.state_dict().items()}  # saved from DDP
    state["module.pixel_mean"] = torch.zeros(3, 1, 1)
    path = tmp_path / "sam_model_best.pth"
    torch.save(
        {
            "epoch": 3,
            "model_state_dict": state,
            "args": argparse.Namespace(img_size=32, click_type="random"),
            "losses": [0.5, 0.4],
        },
        path,
    )
    model = build_sammed3d("tiny", checkpoint=path)
    assert model.load_report.complete, model.load_report.summary()
    a = ref.state_dict()
    assert all(torch.equal(a[k], v) for k, v in model.state_dict().items())


def test_the_report_names_missing_unexpected_and_misfit_keys(tiny_pair):
    ref, _ = tiny_pair
    state = dict(ref.state_dict())
    del state["mask_decoder.iou_token.weight"]
    state["image_encoder.extra.weight"] = torch.zeros(3)
    state["image_encoder.pos_embed"] = torch.zeros(1, 2, 2, 2, 48)
    model = build_sammed3d("tiny")
    with pytest.raises(Sam3DError) as e:
        load_official(model, state)
    msg = str(e.value)
    assert "1 missing (mask_decoder.iou_token.weight)" in msg
    assert "1 unexpected (image_encoder.extra.weight)" in msg
    assert "image_encoder.pos_embed: (1, 2, 2, 2, 48) vs (1, 4, 4, 4, 48)" in msg
    report = load_official(model, state, strict=False)
    assert report.missing == ["mask_decoder.iou_token.weight"]
    assert report.unexpected == ["image_encoder.extra.weight"]
    assert torch.equal(
        model.state_dict()["mask_decoder.iou_prediction_head.layers.0.weight"],
        ref.state_dict()["mask_decoder.iou_prediction_head.layers.0.weight"],
    )


def test_foreign_files_are_refused_in_one_line(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"model": {"encoder.weight": torch.zeros(2)}}, path)
    with pytest.raises(Sam3DError, match="is not a SAM-Med3D checkpoint"):
        read_official(path)


# -- normalisation, registry --------------------------------------------------------


def test_foreground_zscore_is_torchio_znormalization_over_voxels_above_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 6, 6, 6, generator=g) * 300 + 40
    out = foreground_zscore(x)
    for b in range(2):
        v = x[b].numpy()
        fg = v[v > 0]
        expected = (v - fg.mean()) / fg.std(ddof=1)
        np.testing.assert_allclose(out[b].numpy(), expected, rtol=1e-5, atol=1e-5)
    flat = torch.full((1, 1, 4, 4, 4), -5.0)
    assert torch.equal(foreground_zscore(flat), flat)


def test_encode_normalises_each_crop_with_the_preset():
    model = build_model("sammed3d", "tiny").eval()
    assert kind_of(model) == "sammed3d" and model.config["input_norm"] == "foreground_zscore"
    x = _crop(32, batch=1) * 200 + 100
    with torch.no_grad():
        a = model.encode(x).embedding
        b = model.image_encoder(foreground_zscore(x))
        c = model.image_encoder(x)
    assert torch.equal(a, b) and (a - c).abs().max() > 1e-3
    with pytest.raises(ValueError, match="32"):
        model.encode(torch.zeros(1, 1, 16, 16, 16))
