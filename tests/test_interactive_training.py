"""Interactive training: the simulated user's click on a known error, the rounds under
no_grad (gradients from the last round only), the encoder once per crop, the reference
mode selectable, and a short training that learns to use the corrections."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import SimpleInferer

from sam3d.data.clicks import deepest_error_click
from sam3d.engine.interactive import (
    InteractiveClickInferer,
    click_training_mode,
    next_clicks,
    training_inferer,
    training_prepare_batch,
)
from sam3d.errors import Sam3DError
from sam3d.models.volumetric.sam3d import build_sam3d

# ----------------------------------------------------------------- the simulated user


def test_click_goes_to_the_deepest_voxel_of_the_largest_miss():
    gt = np.zeros((20, 20, 20), dtype=bool)
    gt[2:9, 2:9, 2:9] = True  # a 7^3 cube the prediction misses: centre (5, 5, 5)
    gt[12:15, 12:15, 12:15] = True  # a 3^3 cube, also missed, but smaller
    pred = np.zeros_like(gt)
    point, label = deepest_error_click(gt, pred)
    assert point.tolist() == [5, 5, 5] and label == 1


def test_click_in_a_leak_is_negative_at_its_centre():
    gt = np.zeros((20, 20, 20), dtype=bool)
    gt[2:5, 2:5, 2:5] = True
    pred = gt.copy()
    pred[10:19, 4:13, 4:13] = True  # a 9^3 leak: deepest (and only there) at (14, 8, 8)
    point, label = deepest_error_click(gt, pred)
    assert point.tolist() == [14, 8, 8] and label == 0
    # exact prediction: no click
    assert deepest_error_click(gt, gt) is None


def test_click_in_a_partly_segmented_object_is_in_the_missed_part():
    gt = np.zeros((24, 12, 12), dtype=bool)
    gt[2:22, 2:10, 2:10] = True  # a 20 x 8 x 8 bar
    pred = np.zeros_like(gt)
    pred[2:8, 2:10, 2:10] = True  # only its first 6 slices found: miss is rows 8..21
    point, label = deepest_error_click(gt, pred)
    assert label == 1 and 8 <= point[0] <= 21
    # depth 4 (the bar's half width) is reached in rows 11..18; first in C order: 11
    assert point.tolist() == [11, 5, 5]


def test_next_clicks_per_batch_item_and_padding_when_exact():
    target = torch.zeros(2, 1, 10, 10, 10)
    target[:, :, 3:8, 3:8, 3:8] = 1
    logits = torch.zeros(2, 2, 10, 10, 10)
    logits[:, 0] = 1.0  # everything background
    logits[1, 1] = 2 * target[1, 0] - 0.5  # item 1 exact
    points, labels = next_clicks(target, logits)
    assert points.shape == (2, 1, 3) and labels.tolist() == [[1], [-1]]
    assert points[0, 0].tolist() == [5.0, 5.0, 5.0]


# --------------------------------------------------------------------- the rounds


class _Recorder(torch.nn.Module):
    """A promptable net whose decode output is a fixed function of the features; it counts
    encoder calls and records every decode's clicks, mask prompt and grad mode."""

    def __init__(self, side: int = 12) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0))
        self.mask_prompt = object()  # "has a mask prompt"
        self.encodes = 0
        self.calls: list[dict] = []

    def encode(self, images):
        self.encodes += 1
        return images * self.w

    def decode(self, features, points, point_labels, mask_prompt=None):
        self.calls.append(
            {
                "n": points.shape[1],
                "labels": point_labels.clone(),
                "mask": None if mask_prompt is None else mask_prompt.clone(),
                "grad": torch.is_grad_enabled(),
            }
        )
        # predicts background everywhere: the user keeps clicking in the miss
        return torch.cat([features, features * 0 - 1], dim=1)


def test_rounds_under_no_grad_encoder_once_mask_prompt_fed_back():
    net = _Recorder()
    inferer = InteractiveClickInferer(max_rounds=4, seed=3)
    images = torch.rand(2, 1, 12, 12, 12)
    target = torch.zeros(2, 1, 12, 12, 12)
    target[:, :, 2:10, 2:10, 2:10] = 1
    points = torch.tensor([[[5.0, 5.0, 5.0]], [[6.0, 6.0, 6.0]]])
    labels = torch.ones(2, 1, dtype=torch.long)
    for _ in range(6):  # several draws of the round count
        net.calls.clear()
        net.encodes = 0
        out = inferer(images, net, points=points, point_labels=labels, target=target)
        rounds = inferer.last_rounds
        assert 1 <= rounds <= 4 and len(net.calls) == rounds
        assert net.encodes == 1  # once per crop, whatever the rounds
        # only the last decode builds a graph; earlier ones run under no_grad
        assert [c["grad"] for c in net.calls] == [False] * (rounds - 1) + [True]
        # one more click a round, each a positive one in the miss
        assert [c["n"] for c in net.calls] == list(range(1, rounds + 1))
        assert (net.calls[-1]["labels"] == 1).all()
        # the first round has no mask prompt, the later ones the previous probability
        assert net.calls[0]["mask"] is None
        for c in net.calls[1:]:
            assert c["mask"].shape == (2, 1, 12, 12, 12)
            assert torch.allclose(c["mask"], torch.full_like(c["mask"], 0.0), atol=0.3)
        assert out.requires_grad
    assert {inferer.last_rounds for _ in range(1)}  # drawn, reproducible by seed


def test_gradients_come_from_the_last_round_only():
    torch.manual_seed(0)
    model = build_sam3d("tiny", mask_prompt=True)
    with torch.no_grad():  # a trained-like mask prompt, so the earlier rounds matter
        model.mask_prompt.fine_proj.weight.normal_(0, 0.05)
        model.mask_prompt.token_proj.weight.normal_(0, 0.05)
    images = torch.randn(1, 1, 32, 32, 32)
    target = torch.zeros(1, 1, 32, 32, 32)
    target[:, :, 10:20, 10:20, 10:20] = 1
    points, labels = torch.tensor([[[14.0, 15.0, 16.0]]]), torch.ones(1, 1, dtype=torch.long)
    inferer = InteractiveClickInferer(max_rounds=3, seed=0)
    while True:
        out = inferer(images, model, points=points, point_labels=labels, target=target)
        if inferer.last_rounds == 3:
            break
    out[:, 1].mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # the same last round by hand: rounds 1-2 replayed without a graph, round 3 with one
    model.zero_grad()
    feats = model.encode(images)
    with torch.no_grad():
        from sam3d.models.volumetric.mask_prompt3d import mask_prompt_from_logits

        p, lab, mask = points, labels, None
        for _ in range(2):
            logits = model.decode(feats, p, lab, mask_prompt=mask)
            mask = mask_prompt_from_logits(logits)
            c, cl = next_clicks(target, logits)
            p, lab = torch.cat([p, c], 1), torch.cat([lab, cl], 1)
    expected = model.decode(feats, p, lab, mask_prompt=mask)
    torch.testing.assert_close(out, expected)
    expected[:, 1].mean().backward()
    for n, p_ in model.named_parameters():
        if p_.grad is not None:
            torch.testing.assert_close(grads[n], p_.grad, rtol=1e-4, atol=1e-6)


def test_reference_mode_is_selectable_and_names_are_checked():
    assert isinstance(training_inferer("reference"), SimpleInferer)
    assert isinstance(training_inferer("interactive", max_rounds=2), InteractiveClickInferer)
    assert "target" in training_prepare_batch("interactive").extra_keys
    assert "target" not in training_prepare_batch("reference").extra_keys
    assert click_training_mode("Interactive") == "interactive"
    with pytest.raises(Sam3DError, match="click_training must be one of"):
        click_training_mode("random")


def test_without_a_mask_prompt_module_rounds_use_clicks_only():
    model = build_sam3d("tiny")  # the reference: no mask prompt
    inferer = InteractiveClickInferer(max_rounds=3, seed=1)
    images = torch.randn(1, 1, 32, 32, 32)
    target = torch.zeros(1, 1, 32, 32, 32)
    target[:, :, 8:24, 8:24, 8:24] = 1
    out = inferer(
        images, model, points=torch.tensor([[[16.0, 16.0, 16.0]]]),
        point_labels=torch.ones(1, 1, dtype=torch.long), target=target,
    )  # fmt: skip
    assert out.shape == (1, 2, 32, 32, 32)
