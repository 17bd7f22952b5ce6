"""scripts/bench_interactive.py end to end on tiny sets: both held-out sets generated,
every checkpoint scored on each, the CSV, summary and labelled plot written."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("bench_interactive", ROOT / "scripts" /
                                                  "bench_interactive.py")  # fmt: skip
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_both_sets_every_checkpoint_and_the_outputs(tmp_path):
    from sam3d.data.pipelines import load_dataset_preset
    from sam3d.models.checkpoint import save_trained
    from sam3d.models.registry import build_model

    torch.manual_seed(0)
    ck = save_trained(tmp_path / "u.pt", build_model("click_unet", "tiny"),
                      dataset=load_dataset_preset("kits"))  # fmt: skip
    out = tmp_path / "bench"
    summary = _script().main([
        "--checkpoint", str(ck), "--n", "1", "--clicks", "2", "--max-lesions", "1",
        "--family-kwargs", json.dumps({"shape_vox": [40, 40, 20], "n_lesions": 1}),
        "--heldout-kwargs", json.dumps({"fov_mm": [50, 50, 30], "n_lesions": 1}),
        "--out", str(out), "--device", "cpu",
    ])  # fmt: skip
    labels = list(summary["sets"])
    assert len(labels) == 2
    assert labels[0].startswith("training-family held-out (synth")
    assert labels[1].startswith("second-generator held-out (heldout")
    for label in labels:
        res = summary["sets"][label]["u.pt"]
        assert res["n_lesions"] == 1 and len(res["curve"]) == 2
        assert set(res["noc"]) == {"0.8", "0.85", "0.9"}
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [r["set"] for r in rows] == labels and rows[0]["checkpoint"] == str(ck)
    assert {"dice_1", "dice_2", "noc_80", "noc_85", "noc_90", "positive_inside"} <= set(rows[0])
    assert (out / "curves.png").stat().st_size > 1000
    meta = json.loads((out / "data" / "heldout_90210_1" / "dataset.json").read_text())
    assert meta["phantom"]["kind"] == "heldout"
