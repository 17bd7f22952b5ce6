"""`sam3d segment` and `sam3d segment-batch`: outputs, user errors, sharding, resuming."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sam3d.cli import main
from sam3d.data.phantoms import make_ct_phantom

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _phantom(path, seed=0, orientation="LPS", shape=(24, 24, 12)):
    ph = make_ct_phantom(
        seed, shape_vox=shape, spacing_mm=(1.25, 1.25, 2.5), orientation=orientation
    )
    nib.save(nib.Nifti1Image(ph.image_hu.astype(np.int16), ph.affine), path)
    return ph


def _segment(image, ckpt, out, *extra):
    args = ["segment", str(image), "--checkpoint", str(ckpt), "--out", str(out), "--no-grow"]
    return main([*args, *extra])


def test_segment_writes_mask_and_preview(tmp_path, trained_tiny_sam3d_checkpoint, capsys):
    image = tmp_path / "case.nii.gz"
    ph = _phantom(image, orientation="oblique")
    out, preview = tmp_path / "out" / "mask.nii.gz", tmp_path / "out" / "preview.png"
    rc = _segment(
        image, trained_tiny_sam3d_checkpoint, out, "--click", "12,11,6", "--preview", str(preview)
    )
    assert rc == 0, capsys.readouterr().err
    got = nib.load(out)
    assert got.shape == ph.image_hu.shape
    np.testing.assert_allclose(got.affine, nib.load(image).affine, atol=1e-6)
    assert set(np.unique(np.asarray(got.dataobj))) <= {0, 1}
    assert preview.read_bytes()[:8] == PNG_MAGIC
    assert "wrote" in capsys.readouterr().out

    # the same click in world millimetres gives the same file contents
    world = (ph.affine @ np.array([12.0, 11.0, 6.0, 1.0]))[:3]
    out_w = tmp_path / "out" / "mask_world.nii.gz"
    click = ",".join(f"{v:.6f}" for v in world)
    assert _segment(image, trained_tiny_sam3d_checkpoint, out_w, "--world", f"--click={click}") == 0
    np.testing.assert_array_equal(np.asarray(nib.load(out_w).dataobj), np.asarray(got.dataobj))


@pytest.mark.parametrize(
    "case, message",
    [
        ("click_outside", "outside the image"),
        ("world_click_outside", "outside the image"),
        ("missing_checkpoint", "checkpoint not found"),
        ("corrupt_image", "cannot read"),
        ("truncated_image", "cannot read"),
        ("image_2d", "3D volume is required"),
        ("missing_image", "not found"),
        ("output_under_a_file", "is not a folder"),
        ("unknown_device", "device"),
    ],
)
def test_bad_input_gives_one_message_exit_2_and_no_file(
    tmp_path, trained_tiny_sam3d_checkpoint, capsys, case, message
):
    image = tmp_path / "case.nii.gz"
    _phantom(image)
    ckpt, click = trained_tiny_sam3d_checkpoint, ["--click", "3,3,3"]
    if case == "click_outside":
        click = ["--click", "3,24,3"]
    elif case == "world_click_outside":
        click = ["--world", "--click", "0,0,100000"]
    elif case == "missing_checkpoint":
        ckpt = tmp_path / "nope.pt"
    elif case == "corrupt_image":
        image.write_bytes(b"this is not a NIfTI file at all" * 10)
    elif case == "truncated_image":
        image.write_bytes(image.read_bytes()[:300])
    elif case == "image_2d":
        nib.save(nib.Nifti1Image(np.zeros((16, 16), np.float32), np.eye(4)), image)
    elif case == "missing_image":
        image = tmp_path / "absent.nii.gz"
    out, preview = tmp_path / "out" / "mask.nii.gz", tmp_path / "out" / "preview.png"
    if case == "output_under_a_file":
        (tmp_path / "out").write_text("a file, not a folder")
        out = tmp_path / "out" / "sub" / "mask.nii.gz"
    elif case == "unknown_device":
        click += ["--device", "cuda:0" if not torch.cuda.is_available() else "tpu"]
    rc = _segment(image, ckpt, out, *click, "--preview", str(preview))
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sam3d segment: error:"), err
    assert message in lines[0]
    assert "Traceback" not in err
    assert not out.exists() and not preview.exists()
    assert not (tmp_path / "out").is_dir() or not any((tmp_path / "out").iterdir())


def test_segment_batch_shards_across_ranks_and_resumes(
    tmp_path, trained_tiny_sam3d_checkpoint, monkeypatch, capsys
):
    cases = []
    for i in range(3):
        _phantom(tmp_path / f"case_{i}.nii.gz", seed=i, shape=(16, 16, 8))
        cases.append({"image": f"case_{i}.nii.gz", "points": [[8, 8, 4]], "point_labels": [1]})
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"test": cases}))
    out_dir = tmp_path / "masks"
    args = ["segment-batch", str(datalist), "--checkpoint", trained_tiny_sam3d_checkpoint]
    args += ["--out-dir", str(out_dir), "--no-grow"]
    outputs = [out_dir / f"case_{i}_seg.nii.gz" for i in range(3)]

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(args) == 0
    assert [p.exists() for p in outputs] == [True, False, True]
    monkeypatch.setenv("RANK", "1")
    assert main(args) == 0
    assert all(p.exists() for p in outputs)
    for p in outputs:
        assert nib.load(p).shape == (16, 16, 8)

    # an interrupted batch: one output missing; a rerun writes only that one
    mtimes = {p: p.stat().st_mtime_ns for p in outputs}
    outputs[1].unlink()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    capsys.readouterr()
    assert main(args) == 0
    assert "1 written, 2 already done" in capsys.readouterr().out
    assert outputs[1].exists()
    assert outputs[0].stat().st_mtime_ns == mtimes[outputs[0]]
    assert outputs[2].stat().st_mtime_ns == mtimes[outputs[2]]


def test_demo_segment_step_writes_mask_and_preview(tmp_path, trained_tiny_sam3d_checkpoint):
    from sam3d.data.phantoms import write_phantom_dataset
    from sam3d.demo import DemoState, step_segment
    from sam3d.inference import WindowGrowth

    state = DemoState(out=tmp_path)
    state.outputs["dataset_json"] = write_phantom_dataset(
        "ct", tmp_path / "phantoms", n=3, seed=0, shape_vox=(40, 40, 16), n_lesions=1
    )
    state.outputs["checkpoint"] = trained_tiny_sam3d_checkpoint
    state.extras["segment_growth"] = WindowGrowth(enabled=False)
    step_segment(state)
    # the demo segments each held-out case with a tumour (here: the one test case)
    ((image, click),) = state.extras["segment_clicks"]
    stem = Path(image).name.removesuffix(".nii.gz")
    mask, preview = state.outputs[f"segment_{stem}"], state.outputs[f"preview_{stem}"]
    assert mask == tmp_path / f"segment_{stem}.nii.gz" and preview.read_bytes()[:8] == PNG_MAGIC
    label_path = str(image).replace("imagesTr", "labelsTr")
    assert np.asarray(nib.load(label_path).dataobj)[click] == 2, "the click is not in a tumour"
    ref, got = nib.load(image), nib.load(mask)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got.affine, ref.affine, atol=1e-6)
