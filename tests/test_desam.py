"""DeSAM (PRIM + PDMM around segment_anything), its prompt modes and the embedding cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam3d.data.embedding_cache import (
    CachedSliceDataset,
    EmbeddingCache,
    encoder_fingerprint,
    sample_training_point,
)
from sam3d.losses import DeSAMLoss
from sam3d.models.planar.desam import (
    DeSAM,
    build_desam,
    desam_preset,
    mask_decoder_parameter_count,
    remove_small_regions,
    select_grid_mask,
)
from sam3d.models.registry import build_model, kind_of

SIDE, MASK = 128, 32  # the tiny preset at a 128 input (its 256 works too): quick on a CPU
TINY = {**desam_preset("tiny"), "image_size": SIDE}


@pytest.fixture(scope="module")
def tiny() -> DeSAM:
    torch.manual_seed(0)
    return build_desam(**TINY).eval()


def _images(n: int, side: int = SIDE, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, side, side, generator=g) * 255


# --------------------------------------------------------------------------- model


@pytest.mark.slow
def test_vit_b_counts_match_the_reference_exactly():
    torch.manual_seed(0)
    model = build_desam(**desam_preset("vit_b"))  # random weights, SAM's 1024 input
    counts = model.parameter_counts()
    # REFERENCE.md section 4, measured on yifangao112/DeSAM
    assert counts["mask_decoder"] == 11_521_444
    assert counts["pdmm"] == 7_463_104
    assert counts["transformer"] == 3_291_264
    assert counts["iou_head"] == 132_612
    assert counts["image_encoder"] == 89_670_912
    assert model.tap_blocks == [2, 5, 8] and model.mask_size == 256
    # the decoder-only count used for ViT-H agrees with the built model's
    assert mask_decoder_parameter_count(768) == counts["mask_decoder"]


def test_vit_h_decoder_count_matches_the_reference_exactly():
    # The decoder depends on the encoder only through its width (the taps' channels):
    # counting it alone avoids building the 632M-parameter ViT-H encoder.
    assert mask_decoder_parameter_count(1280) == 13_815_204
    # hand count of the width dependence: each tap branch's first block has a 3x3 conv
    # and a 1x1 skip from C channels to 256 / 128 / 64
    assert 13_815_204 - 11_521_444 == (1280 - 768) * (256 + 128 + 64) * (9 + 1)


def test_registry_rebuilds_desam_from_its_config(tiny):
    assert kind_of(tiny) == "desam"
    again = build_model("desam", tiny.config)
    assert isinstance(again, DeSAM) and again.config == tiny.config
    assert again.state_dict().keys() == tiny.state_dict().keys()


def test_encode_taps_and_neck_equal_sams_encoder(tiny):
    x = tiny.preprocess(_images(1))
    feats = tiny.encode(x)
    assert [tuple(f.shape[1:]) for f in feats] == tiny.feature_shapes()
    with torch.no_grad():
        torch.testing.assert_close(feats[3], tiny.image_encoder(x), rtol=0, atol=0)
        # a tap is the block output, read independently through a forward hook
        seen = {}

        def keep(module, inputs, output):
            seen["b1"] = output.permute(0, 3, 1, 2)

        h = tiny.image_encoder.blocks[1].register_forward_hook(keep)
        tiny.image_encoder(x)
        h.remove()
    torch.testing.assert_close(feats[1], seen["b1"], rtol=0, atol=0)


def test_prim_is_sams_transformer_and_iou_head(tiny_sam_checkpoint):
    from sam3d.models.sam.build import build_sam

    sam = build_sam("tiny", tiny_sam_checkpoint, SIDE)
    model = build_desam("tiny", tiny_sam_checkpoint, SIDE, tap_blocks=[0, 1, 2], pdmm_width=32)
    feats = model.encode(model.preprocess(_images(2)))
    points = torch.tensor([[[40.0, 60.0]], [[100.0, 10.0]]])
    labels = torch.ones(2, 1)
    _, iou = model.decode(feats, points, labels)
    with torch.no_grad():
        sparse, dense = sam.prompt_encoder(points=(points, labels.int()), boxes=None, masks=None)
        ious = [
            sam.mask_decoder(
                image_embeddings=feats[3][i : i + 1],
                image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse[i : i + 1],
                dense_prompt_embeddings=dense[i : i + 1],
                multimask_output=False,
            )[1]
            for i in range(2)
        ]
    torch.testing.assert_close(iou, torch.cat(ious), rtol=1e-5, atol=1e-6)


def test_only_the_mask_decoder_gets_gradients(tiny):
    model = build_desam(**TINY).train()
    feats = model.encode(model.preprocess(_images(2)))
    pts = torch.tensor([[[30.0, 30.0]], [[100.0, 70.0]]])
    logits, iou = model(feats, pts, torch.ones(2, 1), return_iou=True)
    target = torch.zeros_like(logits)
    target[..., 5:15, 5:15] = 1
    DeSAMLoss()((logits, iou), (target, torch.tensor([[1.0], [0.0]]))).backward()
    for name, p in model.named_parameters():
        in_decoder = name.startswith("mask_decoder.")
        if p.requires_grad:
            assert in_decoder, name
            assert p.grad is not None, name  # no dead trainable weight (DDP-safe)
        else:
            assert p.grad is None, name
    frozen = {n for n, p in model.mask_decoder.named_parameters() if not p.requires_grad}
    # frozen inside the decoder: SAM's mask head, equal-width 1x1 skips, deep-supervision head
    assert all(
        n.startswith(("output_upscaling", "output_hypernetworks_mlps"))
        or ".conv3." in n
        or n.startswith("pimm.seg_outputs.0")
        for n in frozen
    )
    assert any(n.startswith("mask_decoder.pimm.") and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if p.requires_grad)  # fmt: skip


def test_tap_branch_once_per_image_equals_once_per_prompt(tiny):
    feats = tiny.encode(tiny.preprocess(_images(2, seed=1)))
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(6, 2, 2, generator=g) * SIDE  # 3 prompts per image, 2 points each
    lab = torch.tensor([[1, 0]] * 6)
    with torch.no_grad():
        once, iou_once = tiny.decode(feats, pts, lab)
        again, iou_again = tiny.decode(feats, pts, lab, invariant_once=False)
        # and each prompt alone, its image alone: the batched call changes nothing
        single = torch.cat(
            [
                tiny.decode(
                    [f[i // 3 : i // 3 + 1] for f in feats], pts[i : i + 1], lab[i : i + 1]
                )[0]
                for i in range(6)
            ]  # fmt: skip
        )
    assert once.shape == (6, 1, MASK, MASK) and iou_once.shape == (6, 1)
    torch.testing.assert_close(once, again, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(iou_once, iou_again)
    torch.testing.assert_close(once, single, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- prompt modes


def test_select_grid_mask_ranks_by_iou_and_prefers_masks_the_clean_up_left_alone():
    logits = -torch.ones(4, 64, 64)
    logits[0, 10:40, 10:40] = 1  # a square with a 4 px hole: the clean-up fills it
    logits[0, 20:22, 20:22] = -1
    logits[1, 0:5, 0:5] = 1  # best IoU, 25 px, its only island: kept, but "changed"
    logits[2, 30:60, 30:60] = 1  # clean, but its IoU is under the threshold
    logits[3, 44:62, 2:20] = 1  # clean, lowest IoU above the threshold
    iou = torch.tensor([0.9, 0.95, 0.4, 0.6])
    # 1000 px at 256^2 is 62.5 px at 64^2: candidates 0 and 1 change, 3 does not
    mask, score = select_grid_mask(logits, iou, 0.5, 1000)
    assert score == pytest.approx(0.6) and torch.equal(mask, logits[3] > 0)
    # without candidate 3 the best IoU of the changed ones wins, as the clean-up left it
    mask, score = select_grid_mask(logits[:3], iou[:3], 0.5, 1000)
    assert score == pytest.approx(0.95) and torch.equal(mask, logits[1] > 0)
    # without the minimum region there is no clean-up: the best IoU wins
    mask, score = select_grid_mask(logits, iou, 0.5, 0)
    assert score == pytest.approx(0.95) and mask.sum() == 25
    # box NMS: a near copy of the best box with a lower IoU is suppressed
    dup = torch.cat([logits[1:2], logits[1:2]])
    dup[1, 0, 0] = -1
    mask, score = select_grid_mask(dup, torch.tensor([0.7, 0.8]), 0.5, 0)
    assert score == pytest.approx(0.8) and mask.sum() == 24
    # nothing above the threshold: an empty mask
    mask, score = select_grid_mask(logits, iou, 0.99, 0)
    assert np.isnan(score) and not mask.any()


def test_remove_small_regions_matches_a_hand_case():
    m = np.zeros((8, 8), bool)
    m[1:6, 1:6] = True
    m[3, 3] = False  # 1 px hole
    m[7, 7] = True  # 1 px island, two pixels off the square's corner (5, 5)
    filled, changed = remove_small_regions(m, 2, "holes")
    assert changed and filled[3, 3] and filled.sum() == m.sum() + 1
    out, changed = remove_small_regions(filled, 2, "islands")
    expected = np.zeros((8, 8), bool)
    expected[1:6, 1:6] = True
    assert changed and (out == expected).all()
    m[6, 6] = True  # a diagonal bridge: 8-connected it joins the island to the square
    assert not remove_small_regions(m | filled, 2, "islands")[1]
    # every island small: the largest is kept (SAM's rule)
    two = np.zeros((8, 8), bool)
    two[0, 0], two[4:6, 4:6] = True, True
    out, changed = remove_small_regions(two, 10, "islands")
    assert changed and out.sum() == 4 and not out[0, 0]
    with pytest.raises(Exception, match="holes"):
        remove_small_regions(two, 10, "edges")


def _random_candidates(rng: np.random.Generator, n: int, side: int) -> torch.Tensor:
    """``n`` logit maps of blobs, specks and holes, some duplicated (NMS has work to do)."""
    yy, xx = np.mgrid[:side, :side]
    out = []
    for _ in range(n):
        if out and rng.random() < 0.25:  # a near duplicate of an earlier candidate
            m = out[rng.integers(len(out))].copy()
            m[rng.random((side, side)) < 0.02] *= -1
            out.append(m)
            continue
        cy, cx, r = rng.uniform(0, side, 2).tolist() + [rng.uniform(2, side / 3)]
        m = np.where((yy - cy) ** 2 + (xx - cx) ** 2 < r**2, 1.0, -1.0)
        m[rng.random((side, side)) < rng.uniform(0, 0.05)] *= -1  # specks and pinholes
        if rng.random() < 0.2:
            m[:] = -1.0  # an empty candidate
        out.append(m)
    return torch.as_tensor(np.stack(out), dtype=torch.float32)


def _reference_top(logits, iou, iou_threshold, min_area, nms_threshold=0.7):
    """The reference's pipeline (DeSAM's AMG, one crop, top record), composed of
    segment_anything's own functions: IoU filter, > 0.5 after sigmoid, box NMS by IoU,
    ``postprocess_small_regions``, first record."""
    from segment_anything.automatic_mask_generator import SamAutomaticMaskGenerator
    from segment_anything.utils.amg import (
        MaskData,
        batched_mask_to_box,
        mask_to_rle_pytorch,
        rle_to_mask,
    )
    from torchvision.ops import batched_nms

    data = MaskData(masks=logits.clone(), iou_preds=iou.clone())
    data.filter(data["iou_preds"] > iou_threshold)
    if len(data["iou_preds"]) == 0:
        return None
    data["masks"] = torch.sigmoid(data["masks"]) > 0.5
    data["boxes"] = batched_mask_to_box(data["masks"])
    data["rles"] = mask_to_rle_pytorch(data["masks"])
    del data["masks"]
    n = len(data["rles"])
    data.filter(
        batched_nms(data["boxes"].float(), data["iou_preds"], torch.zeros(n), nms_threshold)
    )
    data.to_numpy()
    if min_area > 0:
        data = SamAutomaticMaskGenerator.postprocess_small_regions(data, min_area, nms_threshold)
    return rle_to_mask(data["rles"][0]), float(data["iou_preds"][0])


def test_grid_selection_equals_segment_anythings_amg_post_processing():
    pytest.importorskip("cv2", reason="segment_anything's clean-up needs OpenCV (test extra)")
    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(60):
        side = int(rng.choice([32, 64]))
        logits = _random_candidates(rng, int(rng.integers(1, 12)), side)
        iou = torch.as_tensor(rng.uniform(0.2, 1.0, len(logits)), dtype=torch.float32)
        min_region_px = float(rng.choice([0, 1000, 4000]))
        ref = _reference_top(logits, iou, 0.5, min_region_px * side * side / 256**2)
        mask, score = select_grid_mask(logits, iou, 0.5, min_region_px)
        if ref is None:
            assert np.isnan(score) and not mask.any(), trial
            continue
        assert score == pytest.approx(ref[1]), trial
        assert np.array_equal(mask.numpy(), ref[0]), trial
        checked += 1
    assert checked > 40


def test_remove_small_regions_equals_segment_anythings():
    pytest.importorskip("cv2", reason="segment_anything's clean-up needs OpenCV (test extra)")
    from segment_anything.utils.amg import remove_small_regions as sam_remove

    rng = np.random.default_rng(1)
    for trial in range(100):
        m = rng.random((24, 24)) < rng.uniform(0.05, 0.95)
        area = float(rng.choice([1, 3, 8, 30, 200]))
        for mode in ("holes", "islands"):
            ours, changed = remove_small_regions(m, area, mode)
            theirs, their_changed = sam_remove(m, area, mode)
            assert changed == their_changed and np.array_equal(ours, theirs), (trial, mode)


def test_grid_mode_returns_one_mask_per_image_from_the_top_iou_point(tiny):
    feats = tiny.encode(tiny.preprocess(_images(2, seed=2)))
    masks, scores = tiny.segment_grid(feats, n_per_side=3, iou_threshold=-1e9, min_region_px=0)
    assert masks.shape == (2, MASK, MASK) and masks.dtype == torch.bool and scores.shape == (2,)
    grid = tiny.grid_points(3)
    assert grid.shape == (9, 2) and float(grid.min()) > 0 and float(grid.max()) < SIDE
    for i in range(2):  # recompute every grid prompt on its own; the top-IoU one is kept
        one = [f[i : i + 1] for f in feats]
        cands = [tiny.decode(one, p[None, None], torch.ones(1, 1)) for p in grid]
        ious = torch.tensor([float(c[1].detach()) for c in cands])
        order = torch.argsort(ious, descending=True).tolist()
        k = next((k for k in order if (cands[k][0][0, 0] > 0).any()), None)
        if k is None:
            assert not masks[i].any()
        else:
            assert float(scores[i]) == pytest.approx(float(ious[k]), abs=1e-5)
            assert torch.equal(masks[i], cands[k][0][0, 0] > 0)


def test_box_and_point_modes(tiny):
    images = _images(2, seed=3)
    box = tiny.segment(images, "box")
    pts = tiny.segment(images, "points", torch.tensor([[[50.0, 50.0]]] * 2), torch.ones(2, 1))
    assert box.shape == pts.shape == (2, MASK, MASK)
    assert torch.equal(tiny.whole_box(2)[0], torch.tensor([0.0, 0.0, SIDE, SIDE]))


# --------------------------------------------------------------------------- cache


def _slices(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 3, SIDE, SIDE), dtype=np.uint8)
    labels = np.zeros((n, MASK, MASK), np.uint8)
    for i in range(n):
        r, c = rng.integers(2, 16, 2)
        labels[i, r : r + 8, c : c + 10] = 1
    return images, labels


def _encode_fn(model: DeSAM):
    return lambda batch: model.encode(model.preprocess(torch.as_tensor(batch).float()))


def _cache(root, model, n, dtype="float16"):
    return EmbeddingCache(
        root, [f"s{i}" for i in range(n)], model.feature_shapes(), (MASK, MASK),
        encoder_fingerprint(model), dtype,
    )  # fmt: skip


def test_cache_stores_float16_maps_and_reports_its_size(tiny, tmp_path):
    images, labels = _slices(3)
    cache = _cache(tmp_path, tiny, 3)
    report = cache.build(lambda i: (images[i], labels[i]), _encode_fn(tiny), 2, progress=False)
    assert report.computed == 3 and report.reused == 0
    assert report.bytes_per_entry == (3 * 64 + 256) * (SIDE // 16) ** 2 * 2  # float16
    assert report.size_bytes >= 3 * report.bytes_per_entry
    live = tiny.encode(tiny.preprocess(torch.as_tensor(images[1:2]).float()))
    for got, want in zip(cache.features(1), live):
        # float16 rounding of the float32 maps (batched BLAS may move a value by one ulp)
        torch.testing.assert_close(got, want[0].half().float(), rtol=2**-10, atol=1e-3)
    assert torch.equal(cache.label(2)[0], torch.as_tensor(labels[2]).float())
    # reopened: everything is reused, nothing recomputed
    again = _cache(tmp_path, tiny, 3).build(
        lambda i: (images[i], labels[i]), _encode_fn(tiny), progress=False
    )
    assert again.reused == 3 and again.computed == 0
    # the store is plain .npy: numpy reads it without sam3d
    arr = np.load(tmp_path / "features.npy", mmap_mode="r")
    assert arr.shape == (3, 3 * 64 + 256, SIDE // 16, SIDE // 16) and arr.dtype == np.float16


def test_truncated_corrupt_and_stale_rows_are_detected_and_recomputed(tiny, tmp_path):
    images, labels = _slices(4, seed=1)
    load = lambda i: (images[i], labels[i])  # noqa: E731
    _cache(tmp_path, tiny, 4).build(load, _encode_fn(tiny), progress=False)
    want = [c for c in _cache(tmp_path, tiny, 4).features(3)]
    path = tmp_path / "features.npy"
    offset = np.load(path, mmap_mode="r").offset  # bytes of the .npy header
    row = (3 * 64 + 256) * (SIDE // 16) ** 2 * 2
    with open(path, "r+b") as f:  # cut the file inside the last row
        f.truncate(path.stat().st_size - 1000)
    with open(path, "r+b") as f:  # overwrite a few bytes in the middle of row 1
        f.seek(offset + row + row // 2)
        f.write(b"\x00" * 64)
    images[0, 0, 0, 0] ^= 1  # the input of row 0 changed: its row is stale
    cache = _cache(tmp_path, tiny, 4)
    assert cache.status(3) == "corrupt" and cache.status(1) == "corrupt"
    with pytest.raises(Exception, match="not built"):
        cache.features(3)
    report = cache.build(load, _encode_fn(tiny), progress=False)
    assert report.computed == 3 and report.reused == 1
    assert report.reasons == {"corrupt": 2, "stale": 1}
    for got, w in zip(cache.features(3), want):
        torch.testing.assert_close(got, w, rtol=0, atol=0)
    assert cache.verify() == {"ok": 4}


def test_a_changed_encoder_invalidates_the_cache_and_builds_resume(tiny, tmp_path):
    images, labels = _slices(4, seed=2)
    load = lambda i: (images[i], labels[i])  # noqa: E731
    enc = _encode_fn(tiny)
    calls = []

    def failing(batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise KeyboardInterrupt  # interrupted after the first batch of 2
        return enc(batch)

    with pytest.raises(KeyboardInterrupt):
        _cache(tmp_path, tiny, 4).build(load, failing, batch_size=2, progress=False)
    resumed = _cache(tmp_path, tiny, 4).build(load, enc, batch_size=2, progress=False)
    assert resumed.reused == 2 and resumed.computed == 2  # continued where it stopped
    other = build_desam(**TINY)  # other random encoder weights
    assert encoder_fingerprint(other) != encoder_fingerprint(tiny)
    rebuilt = _cache(tmp_path, other, 4).build(load, _encode_fn(other), progress=False)
    assert rebuilt.computed == 4


def test_training_point_is_inside_or_outside_with_its_iou_target():
    mask = np.zeros((16, 16), bool)
    mask[4:8, 4:8] = True
    rng = np.random.default_rng(0)
    draws = [sample_training_point(mask, rng) for _ in range(200)]
    assert all(mask[p] == inside for p, inside in draws)
    assert 60 < sum(inside for _, inside in draws) < 140  # about half inside
    assert sample_training_point(np.zeros((4, 4), bool), rng)[1] is False


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_training_from_the_cache_equals_training_on_live_encoder_outputs(tiny, tmp_path, dtype):
    images, labels = _slices(4, seed=3)
    cache = _cache(tmp_path, tiny, 4, dtype)
    # one image per encoder call on both sides: bit-identical float32 maps to compare
    cache.build(lambda i: (images[i], labels[i]), _encode_fn(tiny), 1, progress=False)
    data = CachedSliceDataset(cache, input_size=SIDE, seed=0)
    prompts = [data[i] for i in range(4)]  # the same prompts for both runs

    def train(from_cache: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = build_desam(**TINY)
        model.load_state_dict(tiny.state_dict())
        model.train()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        loss_fn = DeSAMLoss()
        for step in range(2):
            rows = [2 * step, 2 * step + 1]
            if from_cache:
                feats = [torch.stack([cache.features(r)[k] for r in rows]) for k in range(4)]
            else:
                x = torch.as_tensor(images[rows]).float()
                per_image = [model.encode(model.preprocess(x[j : j + 1])) for j in range(2)]
                feats = [torch.cat(maps) for maps in zip(*per_image)]
                if dtype == "float16":  # the cache's rounding, nothing else
                    feats = [f.half().float() for f in feats]
            pts = torch.stack([prompts[r]["points"] for r in rows])
            target = torch.stack([prompts[r]["label"] for r in rows])
            iou_t = torch.stack([prompts[r]["iou_target"] for r in rows])
            out = model(feats, pts, torch.ones(2, 1), return_iou=True)
            opt.zero_grad()
            loss_fn(out, (target, iou_t)).backward()
            opt.step()
        return {k: v.detach().clone() for k, v in model.mask_decoder.state_dict().items()}

    cached, live = train(True), train(False)
    for k in live:
        torch.testing.assert_close(cached[k], live[k], rtol=1e-5, atol=1e-6, msg=k)
    # training moved the weights: the comparison is not between two untouched models
    start = tiny.mask_decoder.state_dict()
    assert any(not torch.equal(cached[k], start[k]) for k in start if k.startswith("pimm."))
