"""Losses for both paths: soft clDice (2D/3D) and the combinations the papers train with.

- :class:`SoftClDiceLoss`: clDice on soft skeletons (Shit et al. 2021). The clDice
  losses of older MONAI releases (the ones the anchors used) drop channel 0 and so
  return exactly zero for a single-channel (sigmoid) output; here a single channel is
  always the foreground, and with several (softmax) channels the background channel
  is left out unless asked. (MONAI 1.6's reworked ``SoftclDiceLoss`` also handles one
  channel; ours keeps the reference's batch-global sums and works on 2D and 3D.)
- :class:`BCEDiceClDiceLoss`: BCE + soft Dice + lambda * soft clDice on one sigmoid
  channel (TopoLoRA-SAM: weights 1, 1, 0.5; 10 skeleton iterations).
- :class:`DeSAMLoss`: DeSAM's Dice + CE (sigmoid) on the mask plus lambda * L1 (or MSE)
  between predicted and target IoU; no IoU term for whole-box prompts.
- ``DiceCELoss``: MONAI's Dice + cross-entropy, re-exported for the volumetric path
  (3DSAM-adapter trains with Dice + CE on the two-class softmax output).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss
from monai.networks import one_hot

from sam3d.errors import Sam3DError

__all__ = ["BCEDiceClDiceLoss", "DeSAMLoss", "DiceCELoss", "SoftClDiceLoss", "soft_skeleton"]


def _soft_erode(x: torch.Tensor) -> torch.Tensor:
    """Soft erosion: the minimum of 1-D min-pools along each spatial axis (a cross)."""
    d = x.ndim - 2
    pool = F.max_pool2d if d == 2 else F.max_pool3d
    outs = []
    for axis in range(d):
        k = [1] * d
        k[axis] = 3
        pad = [0] * d
        pad[axis] = 1
        outs.append(-pool(-x, kernel_size=tuple(k), stride=1, padding=tuple(pad)))
    return torch.stack(outs).amin(0)


def _soft_dilate(x: torch.Tensor) -> torch.Tensor:
    """Soft dilation: a 3^d max-pool."""
    pool = F.max_pool2d if x.ndim == 4 else F.max_pool3d
    return pool(x, kernel_size=3, stride=1, padding=1)


def soft_skeleton(x: torch.Tensor, iterations: int = 10) -> torch.Tensor:
    """Soft skeleton of probabilities ``B x C x spatial`` (2D or 3D), same shape.

    ``skel = relu(x - open(x))``, then for each of ``iterations`` erosions
    ``skel += relu(delta - skel * delta)`` with ``delta = relu(x_k - open(x_k))``.
    """
    if x.ndim not in (4, 5):
        raise Sam3DError(f"soft_skeleton needs B x C x H x W[ x D] input, got {tuple(x.shape)}.")
    skel = F.relu(x - _soft_dilate(_soft_erode(x)))
    for _ in range(iterations):
        x = _soft_erode(x)
        delta = F.relu(x - _soft_dilate(_soft_erode(x)))
        skel = skel + F.relu(delta - skel * delta)
    return skel


class SoftClDiceLoss(torch.nn.Module):
    """``1 - clDice`` on soft skeletons of prediction and target.

    Args:
        iterations: soft-skeleton iterations (about the largest radius in voxels).
        smooth: added to numerators and denominators.
        sigmoid / softmax: apply it to the input first (give logits then).
        include_background: with several channels, keep channel 0. Ignored for one
            channel, which is always the foreground.
        to_onehot_y: the target is ``B x 1`` labels to one-hot into C channels.
        per_image: False (default): sums over the whole batch, ``smooth`` added to every
            numerator and denominator (the clDice paper's code). True: TopoLoRA-SAM's
            (Seglab's ``cldice_loss``): Tprec / Tsens per image with ``smooth`` in their
            denominators only, ``(2 Tprec Tsens + smooth) / (Tprec + Tsens + smooth)``,
            ``1 -`` its mean over the batch (give ``smooth=1e-6`` for the reference's).

    Input ``B x C x spatial``; target ``B x C x spatial`` or ``B x 1 x spatial``.
    ``iterations`` counts the erosions after the first opening: ours with ``k`` equals
    Seglab's ``soft_skeletonize`` with ``k + 1`` (its loop opens before it erodes).
    """

    def __init__(
        self,
        iterations: int = 10,
        smooth: float = 1.0,
        sigmoid: bool = False,
        softmax: bool = False,
        include_background: bool = False,
        to_onehot_y: bool = False,
        per_image: bool = False,
    ) -> None:
        super().__init__()
        if sigmoid and softmax:
            raise Sam3DError("SoftClDiceLoss: choose sigmoid or softmax, not both.")
        self.per_image = bool(per_image)
        self.iterations = iterations
        self.smooth = smooth
        self.sigmoid = sigmoid
        self.softmax = softmax
        self.include_background = include_background
        self.to_onehot_y = to_onehot_y

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        p = input
        if self.sigmoid:
            p = torch.sigmoid(p)
        if self.softmax:
            p = torch.softmax(p, dim=1)
        n_ch = p.shape[1]
        t = target.to(p.dtype)
        if self.to_onehot_y and n_ch > 1:
            t = one_hot(target.long(), num_classes=n_ch)
        if t.shape != p.shape:
            raise Sam3DError(
                f"SoftClDiceLoss: target {tuple(t.shape)} does not match input {tuple(p.shape)}."
            )
        if n_ch > 1 and not self.include_background:
            p, t = p[:, 1:], t[:, 1:]
        skel_p = soft_skeleton(p, self.iterations)
        skel_t = soft_skeleton(t, self.iterations)
        if self.per_image:
            dims = tuple(range(1, p.ndim))
            eps = self.smooth
            tprec = (skel_p * t).sum(dims) / (skel_p.sum(dims) + eps)
            tsens = (skel_t * p).sum(dims) / (skel_t.sum(dims) + eps)
            return 1.0 - ((2.0 * tprec * tsens + eps) / (tprec + tsens + eps)).mean()
        tprec = ((skel_p * t).sum() + self.smooth) / (skel_p.sum() + self.smooth)
        tsens = ((skel_t * p).sum() + self.smooth) / (skel_t.sum() + self.smooth)
        return 1.0 - 2.0 * tprec * tsens / (tprec + tsens)


class BCEDiceClDiceLoss(torch.nn.Module):
    """``w_bce * BCE + w_dice * soft Dice + lambda_cldice * soft clDice`` on sigmoid logits.

    Input: logits ``B x 1 x spatial``; target: ``B x 1 x spatial`` in {0, 1}.
    ``iterations``, ``smooth``, ``per_image``: :class:`SoftClDiceLoss`'s (TopoLoRA-SAM's
    own: 9, 1e-6, True; see docs/REFERENCES.md).
    """

    def __init__(
        self,
        lambda_cldice: float = 0.5,
        lambda_bce: float = 1.0,
        lambda_dice: float = 1.0,
        iterations: int = 10,
        smooth: float = 1.0,
        per_image: bool = False,
    ) -> None:
        super().__init__()
        self.lambda_cldice = lambda_cldice
        self.lambda_bce = lambda_bce
        self.lambda_dice = lambda_dice
        self.dice = DiceLoss(sigmoid=True)
        self.cldice = SoftClDiceLoss(
            iterations=iterations, smooth=smooth, sigmoid=True, per_image=per_image
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = target.to(input.dtype)
        loss = self.lambda_bce * F.binary_cross_entropy_with_logits(input, t)
        loss = loss + self.lambda_dice * self.dice(input, t)
        if self.lambda_cldice:
            loss = loss + self.lambda_cldice * self.cldice(input, t)
        return loss


class BCEDiceLoss(torch.nn.Module):
    """``lambda_bce * BCE(pos_weight) + lambda_dice * soft Dice`` on sigmoid logits.

    SAMUS's loss (0.2 BCE with ``pos_weight`` 2 + 0.8 Dice). Input: logits
    ``B x K x spatial`` (one channel per prompted structure); target alike in {0, 1}.

    ``dice``: ``"per_case"`` (default): per case and channel, then averaged (MONAI's
    ``DiceLoss``); ``"batch_squared"``: SAMUS's ``MaskDiceLoss``, one Dice over the whole
    batch with squared denominators, ``1 - (2 sum(p t) + 1e-5) / (sum(p^2) + sum(t^2) +
    1e-5)``. A target larger than the logits (the reference's 128 x 128 low-res logits
    against a full-size mask) is resized to them first, nearest as PIL does.
    """

    def __init__(
        self,
        lambda_bce: float = 0.2,
        lambda_dice: float = 0.8,
        pos_weight: float = 2.0,
        dice: str = "per_case",
    ) -> None:
        super().__init__()
        if dice not in ("per_case", "batch_squared"):
            raise Sam3DError(f"dice must be 'per_case' or 'batch_squared', got {dice!r}")
        self.lambda_bce, self.lambda_dice = float(lambda_bce), float(lambda_dice)
        self.pos_weight, self.dice_mode = float(pos_weight), dice
        self.dice = DiceLoss(sigmoid=True)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        t = target.to(input.dtype)
        if t.shape[2:] != input.shape[2:]:
            t = F.interpolate(t, size=tuple(input.shape[2:]), mode="nearest-exact")
        pw = torch.tensor(self.pos_weight, dtype=input.dtype, device=input.device)
        bce = F.binary_cross_entropy_with_logits(input, t, pos_weight=pw)
        if self.dice_mode == "batch_squared":
            p = torch.sigmoid(input)
            smooth = 1e-5
            dice = 1 - (2 * (p * t).sum() + smooth) / ((p * p).sum() + (t * t).sum() + smooth)
        else:
            dice = self.dice(input, t)
        return self.lambda_bce * bce + self.lambda_dice * dice


class DeSAMLoss(torch.nn.Module):
    """``DiceCE(logits, mask) + lambda_iou * L1(iou_pred, iou_target)`` (the reference's).

    ``pred`` is DeSAM's ``(logits N x 1 x s x s, iou N x 1)``; ``target`` the mask
    ``N x 1 x s x s`` or ``(mask, iou_target N x 1)``; with no IoU target (whole-box
    prompts) only DiceCE is computed. ``iou_loss``: ``"l1"`` (reference default) or ``"mse"``.
    """

    def __init__(self, lambda_iou: float = 1.0, iou_loss: str = "l1") -> None:
        super().__init__()
        if iou_loss not in ("l1", "mse"):
            raise Sam3DError(f"iou_loss must be 'l1' or 'mse', got {iou_loss!r}")
        self.dicece = DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")
        self.lambda_iou, self.iou_loss = float(lambda_iou), iou_loss

    def forward(self, pred, target) -> torch.Tensor:
        logits, iou = pred if isinstance(pred, (tuple, list)) else (pred, None)
        mask, iou_target = target if isinstance(target, (tuple, list)) else (target, None)
        loss = self.dicece(logits.float(), mask.float())
        if iou is not None and iou_target is not None and self.lambda_iou:
            fn = F.l1_loss if self.iou_loss == "l1" else F.mse_loss
            loss = loss + self.lambda_iou * fn(iou.float(), iou_target.float().view_as(iou))
        return loss
