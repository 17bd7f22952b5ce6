"""A SAM-Med3D checkpoint through the user's paths: ``sam3d segment``, ``segment-batch``,
``ClickSession`` (cached embeddings, the previous mask fed back) and the kits inference
bundle. The model is the tiny preset with random weights, saved in the one trained format
with the ``sammed3d`` dataset preset (1.5 mm grid)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from sam3d.cli import main
from sam3d.data.phantoms import make_ct_phantom
from sam3d.data.pipelines import load_dataset_preset
from sam3d.errors import Sam3DError
from sam3d.inference import ClickSession, load_model_for_inference
from sam3d.inference.windows import WindowGrowth, extract_window
from sam3d.models.checkpoint import save_trained
from sam3d.models.registry import build_model
from sam3d.models.volumetric.sammed3d.model import SamMed3D

NO_GROWTH = WindowGrowth(enabled=False)


@pytest.fixture(scope="module")
def sammed3d_checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    model = build_model("sammed3d", "tiny")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp("sammed3d") / "sammed3d_tiny.pt"
    save_trained(path, model, meta={"epoch": 0}, dataset=load_dataset_preset("sammed3d"))
    return str(path)


@pytest.fixture(scope="module")
def loaded(sammed3d_checkpoint):
    return load_model_for_inference(sammed3d_checkpoint, "cpu")


def _phantom(path, seed=0, orientation="LPS", shape=(24, 24, 12)):
    ph = make_ct_phantom(
        seed, shape_vox=shape, spacing_mm=(1.25, 1.25, 2.5), orientation=orientation
    )
    nib.save(nib.Nifti1Image(ph.image_hu.astype(np.int16), ph.affine), path)
    return ph


def test_the_checkpoint_loads_as_sammed3d_on_its_grid(loaded):
    model, meta = loaded
    assert isinstance(model, SamMed3D) and model.crop_size == 32
    assert meta["dataset"]["spacing_mm"] == [1.5, 1.5, 1.5]
    assert not model.training


def test_a_planar_checkpoint_is_refused_for_volumes(tmp_path):
    path = save_trained(tmp_path / "topolora.pt", build_model("topolora", "tiny"))
    with pytest.raises(Sam3DError, match="a 2D one: use sam3d segment-2d"):
        load_model_for_inference(path, "cpu")


def test_session_caches_the_embedding_and_feeds_the_previous_mask_back(tmp_path, loaded):
    model, meta = loaded
    path = tmp_path / "case.nii.gz"
    _phantom(path, seed=2, orientation="RAS")
    encoder_runs, prompts = [], []
    hook = model.image_encoder.register_forward_hook(lambda *a: encoder_runs.append(1))
    decode = model.decode

    def spy(features, points, point_labels=None, mask_prompt=None):
        prompts.append(None if mask_prompt is None else mask_prompt.clone())
        return decode(features, points, point_labels, mask_prompt)

    model.decode = spy
    try:
        session = ClickSession(model, path, meta["dataset"], device="cpu", growth=NO_GROWTH)
        spacing = np.linalg.norm(np.asarray(session.grid_image.affine)[:3, :3], axis=0)
        np.testing.assert_allclose(spacing, [1.5, 1.5, 1.5])  # the reference's grid
        first = session.click((12, 12, 6)).clone()
        (origin,) = session.windows
        prob_1 = session.prob_grid.clone()
        second = session.click((14, 10, 5)).clone()
        session.click((9, 13, 5), positive=False)
        assert len(encoder_runs) == 1 and session.encode_calls == 1
        # the first click: the reference's zero mask; later ones: the previous prediction
        assert prompts[0] is None
        # the previous probability (half precision) at the window, 0 outside the grid
        r = session.predictor.roi
        padded = torch.zeros([n + 2 * w for n, w in zip(prob_1.shape, r)])
        padded[r[0] : r[0] + prob_1.shape[0], r[1] : r[1] + prob_1.shape[1], r[2] :][
            :, :, : prob_1.shape[2]
        ] = prob_1.half().float()
        expected = padded[tuple(slice(o + w, o + 2 * w) for o, w in zip(origin, r))]
        assert torch.equal(prompts[1], expected[None, None])
        torch.testing.assert_close(session.undo(), second)  # the same prompt again
        torch.testing.assert_close(session.undo(), first)
        assert len(encoder_runs) == 1
    finally:
        hook.remove()
        del model.decode
    # the session's window probability is the model's own output for that crop and click
    crop = extract_window(session.grid_image.as_tensor(), origin, session.predictor.roi)
    click = torch.as_tensor(session._grid_points([(12, 12, 6)]), dtype=torch.float32)
    with torch.no_grad():
        logits = model.decode(model.encode(crop[None]), (click - torch.tensor(origin))[None])
    window = prob_1[tuple(slice(max(o, 0), o + 32) for o in origin)]
    inner = torch.softmax(logits, 1)[0, 1][tuple(slice(-min(o, 0), None) for o in origin)]
    torch.testing.assert_close(
        window, inner[: window.shape[0], : window.shape[1], : window.shape[2]]
    )


def test_sam3d_segment_and_segment_batch(tmp_path, sammed3d_checkpoint, capsys):
    image = tmp_path / "case.nii.gz"
    ph = _phantom(image, orientation="oblique")
    out = tmp_path / "out" / "mask.nii.gz"
    args = ["segment", str(image), "--checkpoint", sammed3d_checkpoint, "--out", str(out)]
    assert main([*args, "--no-grow", "--click", "12,11,6"]) == 0, capsys.readouterr().err
    got = nib.load(out)
    assert got.shape == ph.image_hu.shape
    np.testing.assert_allclose(got.affine, nib.load(image).affine, atol=1e-6)
    model, meta = load_model_for_inference(sammed3d_checkpoint, "cpu")
    session = ClickSession(model, image, meta["dataset"], device="cpu", growth=NO_GROWTH)
    np.testing.assert_array_equal(np.asarray(got.dataobj), session.click((12, 11, 6)).numpy())

    cases = []
    for i in range(2):
        _phantom(tmp_path / f"case_{i}.nii.gz", seed=i, shape=(16, 16, 8))
        cases.append({"image": f"case_{i}.nii.gz", "points": [[8, 8, 4]], "point_labels": [1]})
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"test": cases}))
    batch = ["segment-batch", str(datalist), "--checkpoint", sammed3d_checkpoint]
    assert main([*batch, "--out-dir", str(tmp_path / "masks"), "--no-grow"]) == 0
    for i in range(2):
        assert nib.load(tmp_path / "masks" / f"case_{i}_seg.nii.gz").shape == (16, 16, 8)


def test_kits_inference_bundle_runs_a_sammed3d_checkpoint(tmp_path, loaded, sammed3d_checkpoint):
    from monai.bundle import run

    model, meta = loaded
    path = tmp_path / "oblique.nii.gz"
    _phantom(path, seed=4, orientation="oblique", shape=(20, 20, 10))
    common = dict(
        config_file="bundles/kits/inference.json",
        checkpoint=sammed3d_checkpoint,
        grow_windows=False,
    )
    case = {"image": str(path), "points": [[10, 9, 5]], "point_labels": [1]}
    run(input_dict=case, output_dir=str(tmp_path / "prompted"), **common)
    got = nib.load(tmp_path / "prompted" / "oblique_seg.nii.gz")
    assert got.shape == nib.load(path).shape
    session = ClickSession(model, path, meta["dataset"], device="cpu", growth=NO_GROWTH)
    np.testing.assert_array_equal(np.asarray(got.dataobj), session.click((10, 9, 5)).numpy())


@pytest.mark.slow
def test_an_official_pth_loads_for_inference_with_the_reference_preset(tmp_path):
    import argparse

    from sam3d.models.volumetric.sammed3d.build import build_sammed3d

    torch.manual_seed(0)
    official = build_sammed3d("vit_b_ori")
    path = tmp_path / "sam_med3d_turbo.pth"
    torch.save(
        {"model_state_dict": official.state_dict(), "args": argparse.Namespace(img_size=128)},
        path,
    )
    model, meta = load_model_for_inference(path, "cpu")
    assert isinstance(model, SamMed3D) and model.config["name"] == "vit_b_ori"
    assert model.load_report.complete
    assert meta["dataset"]["name"] == "sammed3d" and meta["dataset"]["spacing_mm"] == [1.5] * 3
    a = official.state_dict()
    assert all(torch.equal(a[k], v) for k, v in model.state_dict().items())


def test_sam3d_serve_clicks_a_sammed3d_checkpoint(tmp_path, loaded):
    """The viewer's HTTP API on a SAM-Med3D model: open, two clicks (the second with the
    first's mask fed back); each mask message equals a ClickSession's mask."""
    import json
    import urllib.request

    from sam3d.serve import create_app
    from sam3d.serve.masks import decode_mask, unpack_message
    from sam3d.serve.server import BackgroundServer

    model, meta = loaded
    path = tmp_path / "small.nii.gz"
    ph = _phantom(path, seed=3, orientation="RAS", shape=(20, 18, 10))

    session = ClickSession(model, path, meta["dataset"], device="cpu")
    app = create_app(model, meta, [path], device="cpu")
    headers = {"Content-Type": "application/json", "X-Sam3d-Token": app.state.token}

    def post(url, body):
        req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.read()

    with BackgroundServer(app) as url:
        sid = json.loads(post(url + "/api/open", {"file": "small.nii.gz"}))["session"]
        for point, positive in (([10, 9, 5], True), ([12, 8, 5], False)):
            body = post(url + f"/api/sessions/{sid}/click", {"point": point, "positive": positive})
            header, bits = unpack_message(body)
            expected = session.click(point, positive=positive).numpy()
            # the message holds the box where the segment changed: equal to the session there
            b = header["box"]
            got = decode_mask(b, bits, ph.image_hu.shape)[b[0] : b[3], b[1] : b[4], b[2] : b[5]]
            np.testing.assert_array_equal(got, expected[b[0] : b[3], b[1] : b[4], b[2] : b[5]])
            assert header["voxels"] == int(expected.sum()) and 0 < expected.sum() < expected.size
