"""The reference recipes (``bundles/<name>/reference.json``): each item pinned against a
hand-computed case (docs/REFERENCES.md cites the official code line of each)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from sam3d.apps.echo import LowResInferer
from sam3d.apps.prostate import (
    SliceInferer,
    SliceLossMetric,
    clean_box_masks,
    cubic_resize,
    slice_to_input,
    zero_border,
)
from sam3d.data.clicks import RandStructureClicksd
from sam3d.data.pipelines import REFERENCE_AUGMENTATION, load_dataset_preset, train_transforms
from sam3d.data.planar import RandInverseGammad
from sam3d.engine import GradientClipping, TrainingCheckpoint
from sam3d.losses import BCEDiceLoss, SoftClDiceLoss, soft_skeleton

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def _config(bundle: str, *files: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLES / bundle / f) for f in files])
    return parser


# --------------------------------------------------------------------- TopoLoRA-SAM


def test_soft_skeleton_reaches_a_band_centre_one_erosion_before_seglab():
    # a 5-row band across the whole width (the min-pool pads with +inf: no erosion at
    # the left / right border). Opening x0 = rows 2-6 gives x0 back, x1 = rows 3-5 too,
    # x2 = row 4 opens to nothing: the skeleton is row 4 once x2's delta is added. Ours
    # adds x0's delta, then one per iteration: 2 iterations. Seglab's loop adds x_i's
    # delta for i < iters: 3 iterations. So ours with k equals Seglab's with k + 1.
    band = torch.zeros(1, 1, 9, 8, dtype=torch.float64)
    band[..., 2:7, :] = 1
    assert float(soft_skeleton(band, 1).sum()) == 0.0
    skel = soft_skeleton(band, 2)
    expected = torch.zeros_like(band)
    expected[..., 4, :] = 1
    assert torch.equal(skel, expected)
    # a 1-px line opens to nothing: its skeleton is itself, from the first opening alone
    line = expected.clone()
    assert torch.equal(soft_skeleton(line, 0), line)


def _vessel(pred_row: float, band: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.zeros(1, 1, 9, 9, dtype=torch.float64)
    t[0, 0, 4, 1:8] = 1
    p = torch.zeros_like(t)
    if band is not None:
        p[0, 0, 3:6, 1:8] = band
    p[0, 0, 4, 1:8] = pred_row
    return p, t


def test_reference_cldice_on_a_one_pixel_vessel():
    # target: a 7-px line; prediction: 0.8 on the line, 0.5 in the rows beside it.
    # skel(t) = t (a 1-px line opens to nothing); skel(p): opening the band leaves 0.5,
    # delta 0.3 on the line; the eroded line (0.5 on columns 2-6) opens to nothing:
    # skel = 0.3 + (0.5 - 0.15) = 0.65 there. sum skel(p) = 2 * 0.3 + 5 * 0.65 = 3.85.
    # Tprec = 3.85 / 3.85, Tsens = 7 * 0.8 / 7.
    p, t = _vessel(0.8, band=0.5)
    eps = 1e-6
    tprec, tsens = 3.85 / (3.85 + eps), 5.6 / (7 + eps)
    seglab = 1 - (2 * tprec * tsens + eps) / (tprec + tsens + eps)
    ref = SoftClDiceLoss(iterations=9, smooth=1e-6, per_image=True)(p, t)
    assert float(ref) == pytest.approx(seglab, abs=1e-12)  # 0.111111
    # ours: batch sums, smooth 1 in every numerator and denominator
    tprec, tsens = (3.85 + 1) / (3.85 + 1), (5.6 + 1) / (7 + 1)
    assert float(SoftClDiceLoss(iterations=10)(p, t)) == pytest.approx(
        1 - 2 * tprec * tsens / (tprec + tsens), abs=1e-12
    )  # 0.095890


def test_per_image_cldice_averages_images_where_batch_sums_pool_them():
    # two lines, predicted at 0.8 and at 0.2 (1-px lines are their own skeletons):
    # Tprec = 1 for both; Tsens 0.8 and 0.2 -> clDice 0.8 / 0.9 and 0.2 / 0.6.
    (p1, t), (p2, _) = _vessel(0.8), _vessel(0.2)
    p, t = torch.cat([p1, p2]), torch.cat([t, t])
    per_image = SoftClDiceLoss(iterations=9, smooth=1e-12, per_image=True)(p, t)
    assert float(per_image) == pytest.approx(1 - (1.6 / 1.8 + 0.4 / 1.2) / 2, abs=1e-9)
    pooled = SoftClDiceLoss(iterations=9, smooth=1e-12)(p, t)  # Tsens = 7 / 14
    assert float(pooled) == pytest.approx(1 - 1.0 / 1.5, abs=1e-9)


def test_retina_reference_overlay_sets_seglab_loss_augmentation_and_fp16():
    cfg = _config("retina", "train.json", "reference.json")
    loss = cfg.get_parsed_content("loss")
    assert (loss.cldice.iterations, loss.cldice.smooth, loss.cldice.per_image) == (9, 1e-6, True)
    names = [t["_target_"] for t in cfg["train"]["augmentation"]]
    assert names[:3] == ["RandZoomd", "SpatialPadd", "RandSpatialCropd"]
    assert cfg["train"]["augmentation"][0]["min_zoom"] == 0.8
    assert "RandColorJitterd" in names[5]
    assert cfg.get_parsed_content("train#trainer#amp_kwargs")["dtype"] == torch.float16
    # our default stays as it was
    base = _config("retina", "train.json").get_parsed_content("loss")
    assert (base.cldice.iterations, base.cldice.per_image) == (10, False)


# --------------------------------------------------------------------- SAMUS


def test_samus_batch_dice_has_squared_denominators_over_the_batch():
    # logits 0 -> p = 1/2 everywhere; case 1 all foreground (4 px), case 2 empty.
    logits = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    t = torch.zeros_like(logits)
    t[0] = 1
    bce = 1.5 * math.log(2)  # (pos_weight 2 x 4 px + 4 px) x ln 2 / 8 px
    dice = 1 - (2 * 2 + 1e-5) / (8 * 0.25 + 4 + 1e-5)  # sum p t = 2, sum p^2 = 2, sum t^2 = 4
    ref = BCEDiceLoss(dice="batch_squared")(logits, t)
    assert float(ref) == pytest.approx(0.2 * bce + 0.8 * dice, abs=1e-9)
    # ours: per-case Dice, 1/3 and ~1, averaged
    ours = BCEDiceLoss()(logits, t)
    assert float(ours) == pytest.approx(0.2 * bce + 0.8 * (1 / 3 + 1) / 2, abs=1e-4)


def test_samus_loss_on_low_res_logits_takes_the_mask_nearest_as_pil():
    # a 4 x 4 mask against 2 x 2 logits: PIL's nearest keeps pixels 1 and 3 of each axis
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1::2, 1::2] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    mask[..., 0, 0] = 1  # dropped by the resize
    logits = torch.randn(1, 1, 2, 2)
    loss = BCEDiceLoss(dice="batch_squared")
    assert float(loss(logits, mask)) == pytest.approx(float(loss(logits, mask[..., 1::2, 1::2])))


def test_low_res_inferer_asks_the_network_for_its_low_res_logits():
    seen = {}

    def net(x, **kwargs):
        seen.update(kwargs)
        return x

    LowResInferer()(torch.zeros(1), net, points=1)
    assert seen == {"points": 1, "low_res": True}


def test_samus_low_res_logits_are_the_decoders_own(tiny_sam_checkpoint):
    from sam3d.models.planar.samus import build_samus, samus_config

    net = build_samus(sam_checkpoint=tiny_sam_checkpoint, **samus_config("tiny")).eval()
    x = torch.rand(1, 1, 96, 96)
    pts, lab = torch.tensor([[[[40.0, 50.0]]]]), torch.ones(1, 1, 1, dtype=torch.long)
    with torch.no_grad():
        low = net(x, pts, lab, low_res=True)
        full = net(x, pts, lab)
    assert low.shape[-1] == 4 * net.image_embeddings(net.preprocess(x)).shape[-1]
    up = torch.nn.functional.interpolate(low, size=(96, 96), mode="bilinear")
    assert torch.allclose(up, full, atol=1e-5)


def test_absent_structure_gets_a_background_click_with_label_zero():
    label = np.zeros((2, 8, 8), dtype=np.float32)
    label[0, 2:4, 2:4] = 1  # structure 0 present, structure 1 absent
    t = RandStructureClicksd(keys="label", absent="background")
    t.set_random_state(0)
    out = t({"label": torch.as_tensor(label)})
    assert out["point_labels"].tolist() == [[1], [0]]
    r, c = out["points"][0, 0].long().tolist()
    assert label[0, r, c] == 1
    pad = RandStructureClicksd(keys="label")({"label": torch.as_tensor(label)})
    assert pad["point_labels"].tolist() == [[1], [-1]]


def test_inverse_gamma_is_a_root_truncated_to_eight_bits():
    class Draws:
        def rand(self):
            return 0.0

        def randint(self, lo, hi):
            return 20  # g = 2.0

    t = RandInverseGammad(keys="image", prob=1.0)
    t.R = Draws()
    x = torch.tensor([[[64 / 255, 1.0, 0.0]]])
    y = t({"image": x})["image"]
    # sqrt(64 / 255) x 255 = sqrt(16320) = 127.75 -> 127
    assert torch.allclose(y, torch.tensor([[[127 / 255, 1.0, 0.0]]]))
    draws = RandInverseGammad(keys="image", prob=1.0)
    draws.set_random_state(0)
    gs = set()
    for _ in range(300):
        draws.randomize()
        gs.add(draws.g)
    assert gs == {k / 10 for k in range(10, 25)}  # randint(10, 25) / 10: 1.0 ... 2.4


def test_echo_reference_overlay():
    cfg = _config("echo", "train.json", "reference.json")
    assert cfg.get_parsed_content("loss").dice_mode == "batch_squared"
    assert cfg["learning_rate"] == 0.0005 and cfg["max_epochs"] == 400 and cfg["amp"] is False
    assert cfg["train"]["inferer"]["_target_"] == "sam3d.apps.echo.LowResInferer"
    aug = {a["_target_"].split(".")[-1]: a for a in cfg["train"]["augmentation"]}
    assert aug["RandScaleIntensityFixedMeand"]["factors"] == [-0.2, 1.0]  # contrast 0.8-2.0
    assert aug["RandStructureClicksd"]["absent"] == "background"
    assert "RandInverseGammad" in aug


# --------------------------------------------------------------------- DeSAM


def test_border_zeroing_is_fifty_pixels_of_a_256_mask():
    ones = torch.ones(2, 256, 256, dtype=torch.bool)
    out = zero_border(ones, 50)
    assert int(out[0].sum()) == 156 * 156 and bool(out[0, 50:206, 50:206].all())
    assert int(zero_border(torch.ones(1, 64, 64), 50).sum()) == (64 - 2 * 13) ** 2  # 12.5 -> 13
    assert torch.equal(zero_border(ones, 0), ones)


def test_box_mode_clean_up_fills_small_holes_and_drops_small_islands():
    m = torch.zeros(1, 256, 256, dtype=torch.bool)
    m[0, 100:140, 100:140] = True  # 1600 px: kept
    m[0, 115:125, 115:125] = False  # a 100 px hole: filled
    m[0, 10:30, 10:30] = True  # a 400 px island: dropped
    expected = torch.zeros_like(m)
    expected[0, 100:140, 100:140] = True
    assert torch.equal(clean_box_masks(m, 1000), expected)
    assert torch.equal(clean_box_masks(m, 0), m)


def test_slice_inferer_cleans_box_masks_then_zeroes_the_border():
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def segment(self, x, mode, **_):
            m = torch.zeros(len(x), 256, 256, dtype=torch.bool)
            m[:, :60, :60] = True  # 3600 px at the corner: kept by the clean-up
            m[:, 150:160, 150:160] = True  # 100 px: dropped
            return m

    out = SliceInferer("box", edge_zero_px=50, box_min_region_px=1000)(
        torch.zeros(1, 3, 8, 8), Net()
    )
    assert int(out.sum()) == 10 * 10 and bool(out[0, 50:60, 50:60].all())
    raw = SliceInferer("box")(torch.zeros(1, 3, 8, 8), Net())
    assert int(raw.sum()) == 3600 + 100


def test_bicubic_resize_is_scikit_images_order_3():
    transform = pytest.importorskip("skimage.transform")
    rng = np.random.default_rng(0)
    for shape in ((96, 96), (300, 280)):  # enlarged, and shrunk with anti-aliasing
        img = rng.integers(0, 256, shape).astype(np.uint8)
        ref = transform.resize(img, (256, 256), order=3, preserve_range=True, mode="constant",
                               anti_aliasing=True)  # fmt: skip
        assert np.abs(cubic_resize(img, 256) - ref).max() < 1e-9
    x = slice_to_input(img, 512, 256, "bicubic")
    assert x.shape == (3, 512, 512) and x.dtype == np.uint8
    assert not np.array_equal(x, slice_to_input(img, 512, 256))


def test_validation_loss_is_the_mean_of_each_slices_dicece():
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    logits = [torch.randn(1, 8, 8) * 3 for _ in range(3)]
    masks = [(torch.rand(1, 8, 8) > 0.6).float() for _ in range(3)]
    m = SliceLossMetric()
    m.reset()
    m.update((logits[:2], masks[:2]))
    m.update((logits[2:], masks[2:]))
    loss = DiceCELoss(sigmoid=True, squared_pred=True)
    expected = np.mean([float(loss(lg[None], y[None])) for lg, y in zip(logits, masks)])
    assert m.compute() == pytest.approx(expected, abs=1e-6)


def test_checkpoint_keeps_the_lowest_value_in_min_mode(tmp_path, monkeypatch):
    import sam3d.engine.checkpointing as checkpointing

    saved = []
    monkeypatch.setattr(
        checkpointing, "save_trained", lambda path, net, meta, **_: saved.append(meta)
    )

    class State:
        epoch, iteration, max_epochs = 0, 0, 9

    class Engine:
        state = State()
        metrics: dict = {}

    net = torch.nn.Linear(1, 1)
    ckpt = TrainingCheckpoint(tmp_path, net, torch.optim.SGD(net.parameters(), lr=1.0),
                              key_metric="val_loss", key_metric_mode="min")  # fmt: skip
    trainer, evaluator = Engine(), Engine()
    ckpt._trainer = trainer
    kept = []
    for epoch, value in enumerate([0.5, 0.3, 0.4, 0.2, 0.6], start=1):
        trainer.state.epoch = epoch
        evaluator.state = type("S", (), {"metrics": {"val_loss": value}})()
        ckpt._on_validated(evaluator)
        ckpt.save(trainer)
        kept.append(ckpt.best_epoch)
    assert kept == [1, 2, 2, 4, 4]
    assert [m["val_loss"] for m in saved] == pytest.approx([0.5, 0.3, 0.2])


def test_prostate_reference_overlay():
    cfg = _config("prostate", "train.json", "evaluate.json", "reference.json")
    assert (cfg["interpolation"], cfg["edge_zero_px"], cfg["box_min_region_px"]) == (
        "bicubic", 50, 1000,
    )  # fmt: skip
    assert (cfg["key_metric"], cfg["key_metric_mode"]) == ("val_loss", "min")
    assert cfg["validate"]["prepare_batch"]["mode"] == "points"
    assert "@interpolation" in cfg["run"][0] and "@edge_zero_px" in cfg["run"][0]


# --------------------------------------------------------------------- 3DSAM-adapter


def test_linear_decay_from_one_to_a_hundredth_over_500_iterations():
    cfg = _config("kits", "train.json", "reference.json")
    cfg["optimizer"] = "$torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=@learning_rate)"
    sched = cfg.get_parsed_content("lr_scheduler")
    opt = cfg.get_parsed_content("optimizer")
    lrs = []
    for _ in range(601):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    lr0 = 4e-4
    for k in (0, 1, 250, 499, 500, 600):  # lr0 x (1 - 0.99 k / 500), then 0.01 lr0
        assert lrs[k] == pytest.approx(lr0 * (1 - 0.99 * min(k, 500) / 500), rel=1e-9)
    assert cfg["lr_epoch_level"] is False and cfg["grad_clip_per_group"] is True
    handlers = {h["_target_"]: h for h in _config("kits", "train.json")["train"]["handlers"]}
    assert "@lr_epoch_level" in handlers["LrScheduleHandler"]["epoch_level"]
    clipping = handlers["sam3d.engine.GradientClipping"]
    assert {"per_group": "@grad_clip_per_group"}.items() <= clipping.items()


def test_per_group_clipping_clips_each_group_to_the_norm():
    class Engine:
        amp, scaler = False, None

    def grads():
        a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
        a.grad, b.grad = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 4.0])
        eng = Engine()
        eng.optimizer = torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=1.0)
        return eng, a, b

    eng, a, b = grads()
    GradientClipping(1.0, per_group=True)(eng)
    assert torch.allclose(a.grad, torch.tensor([1.0, 0.0]))  # 3 -> 1
    assert torch.allclose(b.grad, torch.tensor([0.0, 1.0]))  # 4 -> 1
    eng, a, b = grads()
    GradientClipping(1.0)(eng)  # the norm over both, 5 -> 1
    assert torch.allclose(a.grad, torch.tensor([0.6, 0.0]))
    assert torch.allclose(b.grad, torch.tensor([0.0, 0.8]))


def test_kits_reference_optimizer_has_three_groups_and_the_references_augmentation():
    cfg = _config("kits", "train.json", "reference.json")
    cfg["preset"] = "tiny"
    opt = cfg.get_parsed_content("optimizer")
    net = cfg.get_parsed_content("network_def")
    assert len(opt.param_groups) == 3
    assert sum(len(g["params"]) for g in opt.param_groups) == len(
        [p for p in net.parameters() if p.requires_grad]
    )
    chain = train_transforms(load_dataset_preset("kits"), 32, augmentation=REFERENCE_AUGMENTATION)
    aug = next(t for t in chain.transforms if type(t).__name__ == "RandCropAffined")
    assert (aug.zoom_prob, aug.zoom_range) == (0.8, (0.85, 1.25))
    assert (aug.flip_prob, aug.rot90_prob, aug.rotate_prob) == (0.5, 0.5, 0.0)
    # the reference's only intensity augmentation is the shift
    names = {type(t).__name__: t for t in chain.transforms}
    assert names["RandGaussianNoised"].prob == 0.0 and names["RandAdjustContrastd"].prob == 0.0
    assert names["RandShiftIntensityd"].prob == 0.5
    default = train_transforms(load_dataset_preset("kits"), 32)
    aug = next(t for t in default.transforms if type(t).__name__ == "RandCropAffined")
    assert (aug.zoom_prob, aug.rotate_prob, aug.rotate_deg) == (0.8, 0.5, 30.0)
