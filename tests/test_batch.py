"""``segment-batch`` under kills and bad cases: no temporaries, no missing outputs.

A kill is simulated by raising a ``BaseException`` while an output is being written
(half a file on disk) or between the mask's and the preview's move into place; the
rerun must remove the temporaries, redo exactly the unfinished cases and leave every
case with all its outputs.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch

import sam3d.data.io as io_module
from sam3d.cli import main
from sam3d.data.phantoms import make_ct_phantom

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Killed(BaseException):
    """Stands for SIGKILL."""


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> str:
    from sam3d.data.pipelines import load_dataset_preset
    from sam3d.models import build_sam3d, save_sam3d_checkpoint

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("batch_ckpt") / "model.pt"
    model = build_sam3d("tiny", crop_size=16).eval()  # a 16^3 window keeps the batch quick
    save_sam3d_checkpoint(model, path, meta={}, dataset=load_dataset_preset("kits"))
    return str(path)


def _cases(folder, n=3):
    folder.mkdir()
    for i in range(n):
        ph = make_ct_phantom(i, shape_vox=(16, 16, 8), spacing_mm=(1.5, 1.5, 3.0))
        nib.save(nib.Nifti1Image(ph.image_hu.astype(np.int16), ph.affine), folder / f"c{i}.nii.gz")
    return folder


def _batch(src, out, ckpt, *extra):
    return main(["segment-batch", str(src), "--checkpoint", ckpt, "--out-dir", str(out),
                 "--no-grow", "--device", "cpu", "--previews", *extra])  # fmt: skip


def _expected(out, n=3):
    return sorted([f"c{i}_seg.nii.gz" for i in range(n)] + [f"c{i}_seg.png" for i in range(n)])


def test_a_kill_during_a_write_leaves_no_temporary_after_the_rerun(
    tmp_path, small_checkpoint, monkeypatch, capsys
):
    src, out = _cases(tmp_path / "in"), tmp_path / "out"
    real_replace = io_module.os.replace
    calls = {"n": 0}

    def half_written(tmp, target):
        calls["n"] += 1
        if calls["n"] == 3:  # the second case's mask: half a file on disk, then the kill
            data = open(tmp, "rb").read()
            open(tmp, "wb").write(data[: len(data) // 2])
            raise Killed
        real_replace(tmp, target)

    monkeypatch.setattr(io_module.os, "replace", half_written)
    with pytest.raises(Killed):
        _batch(src, out, small_checkpoint)
    # what a SIGKILL leaves: the first case done, the second's temporaries (BaseException
    # cleanup ran here, so put one back as a killed process would leave it)
    (out / ".c1_seg.nii.gz.sam3d-tmp-dead.nii.gz").write_bytes(b"\x1f\x8b half")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "c0_seg.nii.gz",
        "c0_seg.png",
    ]
    monkeypatch.setattr(io_module.os, "replace", real_replace)
    capsys.readouterr()
    assert _batch(src, out, small_checkpoint) == 0
    assert "2 written, 1 already done, 0 failed" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == _expected(out)  # no temporaries
    for i in range(3):
        assert nib.load(out / f"c{i}_seg.nii.gz").shape == (16, 16, 8)
        assert (out / f"c{i}_seg.png").read_bytes()[:8] == PNG_MAGIC


def test_a_kill_between_mask_and_preview_redoes_the_case(
    tmp_path, small_checkpoint, monkeypatch, capsys
):
    src, out = _cases(tmp_path / "in", n=2), tmp_path / "out"
    real_replace = io_module.os.replace

    def killed_after_mask(tmp, target):
        real_replace(tmp, target)
        if str(target).endswith("c1_seg.nii.gz"):
            raise Killed

    monkeypatch.setattr(io_module.os, "replace", killed_after_mask)
    with pytest.raises(Killed):
        _batch(src, out, small_checkpoint)
    assert (out / "c1_seg.nii.gz").exists() and not (out / "c1_seg.png").exists()
    monkeypatch.setattr(io_module.os, "replace", real_replace)
    capsys.readouterr()
    assert _batch(src, out, small_checkpoint) == 0
    # a mask without its preview is not done: the case is redone, its preview appears
    assert "1 written, 1 already done, 0 failed" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == _expected(out, n=2)


def test_bad_cases_are_reported_and_the_batch_goes_on(tmp_path, small_checkpoint, capsys):
    src, out = _cases(tmp_path / "in", n=2), tmp_path / "out"
    ph = make_ct_phantom(5, shape_vox=(16, 16, 8), spacing_mm=(1.5, 1.5, 3.0))
    thin = ph.image_hu[:, :, 3:4].astype(np.int16)  # one slice: segmented, previewed
    nib.save(nib.Nifti1Image(thin, ph.affine), src / "b_thin.nii.gz")
    (src / "a_corrupt.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 not really gzip")
    nib.save(nib.Nifti1Image(np.zeros((16, 16), np.int16), np.eye(4)), src / "a_flat.nii.gz")
    rc = _batch(src, out, small_checkpoint)
    captured = capsys.readouterr()
    assert rc == 2
    assert "3 written, 0 already done, 2 failed (of 5 cases" in captured.out
    # tqdm's bar aside: one line per failed case, and the summary
    err = [ln for ln in captured.err.strip().splitlines() if "segment [rank" not in ln]
    assert len(err) == 3 and "Traceback" not in captured.err  # one line per failure + summary
    assert any("a_corrupt.nii.gz" in ln and "cannot read" in ln for ln in err)
    assert any("a_flat.nii.gz" in ln and "2D image" in ln for ln in err)
    assert err[-1] == "sam3d segment-batch: error: 2 case(s) failed"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(_expected(out, n=2) + ["b_thin_seg.nii.gz", "b_thin_seg.png"])


def test_dataset_chooses_the_intensity_preset_like_segment(
    tmp_path, small_checkpoint, capsys, monkeypatch
):
    import sam3d.inference.batch as batch_module
    from sam3d.data.pipelines import load_dataset_preset

    seen = {}
    real = batch_module.segment_batch

    def spy(model, dataset, *a, **k):
        seen["dataset"] = dataset
        return real(model, dataset, *a, **k)

    monkeypatch.setattr(batch_module, "segment_batch", spy)
    src = _cases(tmp_path / "in", n=1)
    assert _batch(src, tmp_path / "out", small_checkpoint, "--dataset", "lits") == 0
    out = capsys.readouterr().out
    assert "intensity preset 'lits' (from --dataset)" in out
    assert seen["dataset"]["window_hu"] == load_dataset_preset("lits")["window_hu"]
    assert _batch(src, tmp_path / "out2", small_checkpoint) == 0
    assert "intensity preset 'kits' (from the checkpoint)" in capsys.readouterr().out
    assert seen["dataset"]["window_hu"] == load_dataset_preset("kits")["window_hu"]
    # an unknown preset: one line, exit 2, nothing written
    assert _batch(src, tmp_path / "out3", small_checkpoint, "--dataset", "mri") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sam3d segment-batch: error:")
    assert not (tmp_path / "out3").exists()
