import json

import pytest

from sam3d.errors import Sam3DError
from sam3d.presets import CONFIG_DIR, preset_names, read_preset


def test_shipped_presets_are_listed_and_read():
    assert {"tiny", "vit_b", "vit_l", "vit_h"} <= set(preset_names("model"))
    assert set(preset_names("datasets")) == {"kits", "lits", "pancreas", "colon", "sammed3d"}
    # docs/REFERENCES.md section 4b: SAM-Med3D's 1.5 mm grid, its z-score inside the model
    sammed3d = read_preset("datasets", "sammed3d")
    assert sammed3d["spacing_mm"] == [1.5] * 3 and (sammed3d["mean"], sammed3d["std"]) == (0, 1)
    kits = read_preset("datasets", "kits")
    assert kits == json.loads((CONFIG_DIR / "datasets" / "kits.json").read_text())
    # docs/REFERENCES.md section 1: KiTS21 window [-54, 247], mean/SD 59.54 / 55.46, tumour label 2.
    assert kits["window_hu"] == [-54, 247] and kits["tumour_label"] == 2
    assert (kits["mean"], kits["std"]) == (59.54, 55.46)


def test_a_json_path_is_read(tmp_path):
    p = tmp_path / "mine.json"
    p.write_text(json.dumps({"embed_dim": 32}))
    assert read_preset("model", p) == {"embed_dim": 32}


def test_unknown_and_broken_presets_are_user_errors(tmp_path):
    with pytest.raises(Sam3DError, match="unknown model preset 'vit_x'.*tiny"):
        read_preset("model", "vit_x")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(Sam3DError, match="cannot read preset"):
        read_preset("datasets", bad)
