"""Soft clDice and combined losses: values, gradients, and MONAI's single-channel gap."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from scipy import ndimage

from sam3d.losses import BCEDiceClDiceLoss, SoftClDiceLoss, soft_skeleton


def tube_target(shape) -> torch.Tensor:
    t = torch.zeros(1, 1, *shape)
    if len(shape) == 2:
        t[0, 0, shape[0] // 2 - 1 : shape[0] // 2 + 2, 2:-2] = 1
    else:
        t[
            0, 0, shape[0] // 2 - 1 : shape[0] // 2 + 2, shape[1] // 2 - 1 : shape[1] // 2 + 2, 2:-2
        ] = 1
    return t


@pytest.mark.parametrize("shape", [(16, 16), (10, 10, 12)])
def test_single_channel_sigmoid_gives_loss_and_gradient(shape):
    target = tube_target(shape)
    logits = torch.randn(1, 1, *shape, requires_grad=True)
    loss = SoftClDiceLoss(iterations=3, sigmoid=True)(logits, target)
    assert float(loss.detach()) > 0.01
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_perfect_prediction_has_zero_loss_and_worse_is_larger():
    target = tube_target((20, 20))
    assert abs(float(SoftClDiceLoss(iterations=3)(target, target))) < 1e-6
    broken = target.clone()
    broken[..., 8:12] = 0  # cut the tube: topology error
    thick = F.max_pool2d(target, 3, 1, 1)  # same topology, fatter
    lb = float(SoftClDiceLoss(iterations=3)(broken, target))
    lt = float(SoftClDiceLoss(iterations=3)(thick, target))
    assert lb > lt >= 0.0


def test_softmax_two_channels_equals_sigmoid_one_channel():
    torch.manual_seed(0)
    z = torch.randn(2, 1, 12, 12)
    target = (torch.rand(2, 1, 12, 12) > 0.5).float()
    one = SoftClDiceLoss(iterations=2, sigmoid=True)(z, target)
    two_logits = torch.cat([torch.zeros_like(z), z], 1)  # softmax([0, z])[1] = sigmoid(z)
    two = SoftClDiceLoss(iterations=2, softmax=True, to_onehot_y=True)(two_logits, target)
    assert abs(float(one) - float(two)) < 1e-6


def test_soft_skeleton_of_binary_mask_is_thin_and_inside():
    target = torch.zeros(1, 1, 24, 24)
    target[0, 0, 4:20, 8:15] = 1  # 7 px wide bar
    skel = soft_skeleton(target, iterations=5)
    assert bool((skel <= target + 1e-6).all())
    # concentrated near the medial column
    cols = skel[0, 0].sum(0)
    assert int(cols.argmax()) == 11
    ref = ndimage.distance_transform_edt(target[0, 0].numpy())
    assert float(skel[0, 0][torch.from_numpy(ref) >= 3].sum()) >= 0.8 * float(skel.sum())


@pytest.mark.parametrize("shape", [(5, 6), (4, 4, 5)])
def test_gradcheck(shape):
    torch.manual_seed(1)
    x = torch.randn(1, 1, *shape, dtype=torch.float64, requires_grad=True)
    t = (torch.rand(1, 1, *shape, dtype=torch.float64) > 0.5).double()
    loss = SoftClDiceLoss(iterations=2, sigmoid=True)
    assert torch.autograd.gradcheck(lambda v: loss(v, t), (x,), eps=1e-6, atol=1e-5)
    combo = BCEDiceClDiceLoss(lambda_cldice=0.5, iterations=2)
    assert torch.autograd.gradcheck(lambda v: combo(v, t), (x,), eps=1e-6, atol=1e-5)


def test_combined_loss_is_the_weighted_sum():
    torch.manual_seed(2)
    z = torch.randn(2, 1, 16, 16)
    t = (torch.rand(2, 1, 16, 16) > 0.6).float()
    expected = (
        F.binary_cross_entropy_with_logits(z, t)
        + DiceLoss(sigmoid=True)(z, t)
        + 0.5 * SoftClDiceLoss(iterations=10, sigmoid=True)(z, t)
    )
    assert abs(float(BCEDiceClDiceLoss()(z, t)) - float(expected)) < 1e-6
