"""The dense mask prompt of Sam3D: a no-op until trained, off in the reference presets,
old checkpoints load, and once trained it changes the logits and receives gradients."""

from __future__ import annotations

import logging

import pytest
import torch

from sam3d.models.checkpoint import load_trained_weights
from sam3d.models.volumetric.mask_prompt3d import MaskPrompt3D, mask_prompt_from_logits
from sam3d.models.volumetric.sam3d import (
    build_sam3d,
    load_sam3d_checkpoint,
    save_sam3d_checkpoint,
)


def _clicks():
    points = torch.tensor([[[10.0, 12.0, 14.0], [20.0, 5.0, 9.0]]])
    return points, torch.tensor([[1, 0]])


def _blob(side: int = 32) -> torch.Tensor:
    g = torch.stack(torch.meshgrid(*[torch.arange(side)] * 3, indexing="ij")).float()
    return (((g - 12.0) ** 2).sum(0) < 36.0).float()[None, None]


def _pair(seed: int = 0):
    torch.manual_seed(seed)
    ref = build_sam3d("tiny").eval()
    torch.manual_seed(seed)
    with_mask = build_sam3d("tiny", mask_prompt=True).eval()
    return ref, with_mask


def test_reference_presets_have_no_mask_prompt_and_refuse_one():
    ref = build_sam3d("tiny")
    assert ref.mask_prompt is None
    assert not any(k.startswith("mask_prompt.") for k in ref.state_dict())
    feats = ref.encode(torch.randn(1, 1, 32, 32, 32))
    with pytest.raises(ValueError, match="no mask prompt"):
        ref.decode(feats, *_clicks(), mask_prompt=_blob())


def test_untrained_mask_prompt_is_an_exact_no_op():
    ref, with_mask = _pair()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        expected = ref(x, *_clicks())
        feats = with_mask.encode(x)
        # the reference weights are the same draws: the module comes after them
        torch.testing.assert_close(with_mask.decode(feats, *_clicks()), expected)
        for mask in (_blob(), torch.ones(1, 1, 32, 32, 32), torch.zeros(1, 1, 32, 32, 32)):
            out = with_mask.decode(feats, *_clicks(), mask_prompt=mask)
            torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_trained_mask_prompt_changes_logits_and_gets_gradients():
    _, model = _pair()
    model.train()
    x = torch.randn(1, 1, 32, 32, 32)
    feats = model.encode(x)
    # the zero-initialised projections still receive a gradient (their input is not zero)
    out = model.decode(feats, *_clicks(), mask_prompt=_blob())
    out[:, 1].mean().backward()
    for proj in (model.mask_prompt.token_proj, model.mask_prompt.fine_proj):
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        for proj in (model.mask_prompt.token_proj, model.mask_prompt.fine_proj):
            proj.weight.normal_(0, 0.1)
        a = model.decode(feats, *_clicks(), mask_prompt=_blob())
        b = model.decode(feats, *_clicks(), mask_prompt=torch.zeros(1, 1, 32, 32, 32))
        c = model.decode(feats, *_clicks())
    assert (a - b).abs().max() > 1e-3 and (a - c).abs().max() > 1e-3


def test_mask_prompt_shapes_follow_the_token_grid():
    mp = MaskPrompt3D(token_dim=32, fine_dim=16, voxels_per_token=4)
    tokens, fine = mp(torch.rand(2, 1, 32, 24, 16))
    assert tokens.shape == (2, 32, 8, 6, 4)  # one value per 4^3 voxels, like the prompt map
    assert fine.shape == (2, 16, 16, 12, 8)  # the decoder's fused map: two per token edge
    with pytest.raises(ValueError, match="multiples of 4"):
        mp(torch.rand(1, 1, 30, 32, 32))
    with pytest.raises(ValueError, match="B x 1"):
        mp(torch.rand(1, 2, 32, 32, 32))


def test_mask_prompt_from_logits_is_the_detached_foreground_probability():
    logits = torch.tensor([[0.0, 0.0], [0.0, 2.0]]).T.reshape(1, 2, 2, 1, 1).requires_grad_()
    prob = mask_prompt_from_logits(logits)
    assert prob.shape == (1, 1, 2, 1, 1) and not prob.requires_grad
    torch.testing.assert_close(prob.flatten(), torch.tensor([0.5, 1 / (1 + torch.e**-2)]))


def test_old_checkpoints_load(tmp_path, caplog):
    ref, _ = _pair(1)
    path = save_sam3d_checkpoint(ref, tmp_path / "old.pt", meta={"note": "before mask prompt"})
    model, _ = load_sam3d_checkpoint(path)
    assert model.mask_prompt is None  # the stored preset has no mask prompt
    # the same weights into a network built with a mask prompt: loads, and the prompt is a
    # no-op (its projections zeroed, whatever they held), with a warning
    torch.manual_seed(5)
    target = build_sam3d("tiny", mask_prompt=True).eval()
    with torch.no_grad():
        target.mask_prompt.token_proj.weight.fill_(1.0)
    with caplog.at_level(logging.WARNING):
        load_trained_weights(target, path)
    assert "mask prompt" in caplog.text
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            target(x, *_clicks(), mask_prompt=_blob()), ref(x, *_clicks()), rtol=0, atol=0
        )


def test_new_checkpoints_keep_the_trained_mask_prompt(tmp_path):
    _, model = _pair(2)
    with torch.no_grad():
        model.mask_prompt.fine_proj.weight.normal_(0, 0.1)
    path = save_sam3d_checkpoint(model, tmp_path / "new.pt")
    loaded, _ = load_sam3d_checkpoint(path)
    assert loaded.mask_prompt is not None
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x, *_clicks(), mask_prompt=_blob()), model(x, *_clicks(), mask_prompt=_blob())
        )


class _MaskEcho(torch.nn.Module):
    """Stand-in whose decode records the mask prompt it got and predicts a 3-voxel ball at
    each positive click, united with the previous mask (so the prompt visibly carries)."""

    def __init__(self, crop_size: int = 16) -> None:
        super().__init__()
        self.crop_size = crop_size
        self.prompts: list = []

    def encode(self, images):
        return images.clone()

    def decode(self, features, points, point_labels, mask_prompt=None):
        self.prompts.append(None if mask_prompt is None else mask_prompt.clone())
        side = features.shape[2:]
        g = torch.stack(torch.meshgrid(*[torch.arange(s) for s in side], indexing="ij")).float()
        fg = torch.zeros(features.shape[0], 1, *side)
        for b in range(features.shape[0]):
            for p, lab in zip(points[b], point_labels[b]):
                if int(lab) == 1:
                    ball = ((g - p[:, None, None, None]) ** 2).sum(0) <= 9.0
                    fg[b, 0] = torch.maximum(fg[b, 0], ball.float())
        if mask_prompt is not None:
            fg = torch.maximum(fg, (mask_prompt > 0.5).float())
        return torch.cat([1 - 2 * fg, 2 * fg - 1], dim=1) * 5.0


def test_click_session_feeds_the_previous_mask_back():
    from monai.data import MetaTensor

    from sam3d.inference import ClickSession, WindowGrowth

    image = MetaTensor(torch.zeros(1, 16, 16, 16), affine=torch.eye(4))
    model = _MaskEcho(16)
    session = ClickSession(model, image, "kits", device="cpu", growth=WindowGrowth(enabled=False))
    first = session.click((5, 5, 5)).clone().numpy()  # the session rewrites its mask in place
    assert model.prompts == [None]  # a first click has no previous mask
    second = session.click((11, 11, 11)).numpy()
    prompt = model.prompts[-1]
    assert prompt is not None and prompt.shape == (1, 1, 16, 16, 16)
    # the prompt is the first click's probability on the window
    assert (prompt[0, 0].numpy() > 0.5).sum() == first.sum() > 0
    assert second[5, 5, 5] and second[11, 11, 11]
    # undo goes back to the first mask; a new click then gets the first mask again
    session.undo()
    session.click((11, 5, 5))
    torch.testing.assert_close(model.prompts[-1], prompt)


def test_click_session_gives_no_mask_prompt_to_a_reference_sam3d():
    from monai.data import MetaTensor

    from sam3d.inference import ClickSession, WindowGrowth

    model = build_sam3d("tiny").eval()  # decode refuses a mask prompt: none may come
    image = MetaTensor(torch.randn(1, 32, 32, 32) * 50, affine=torch.eye(4))
    session = ClickSession(model, image, "kits", device="cpu", growth=WindowGrowth(enabled=False))
    session.click((16, 16, 16))
    session.click((20, 16, 16), positive=False)
    assert not session.predictor.takes_mask_prompt
