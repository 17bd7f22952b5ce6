"""No model is chosen on test data: every bundle's training, validation and test lists, as
its own configs build them, are disjoint by case; validation comes from the training cases.

A bundle takes part by having ``train.json`` (``train#dataset#data``,
``validate#dataset#data``) and ``evaluate.json`` (``validate#dataset#data`` = the test
split), and a ``dataset_dir`` that an empty folder fills with phantoms.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
SMALL = {
    "kits": {"phantom_cases": 6, "phantom_kwargs": {"shape_vox": [24, 24, 16]}},
    "retina": {"phantom_cases": 6, "phantom_size": [48, 48]},
    "prostate": {
        "phantom": {
            "n_per_site": 4,
            "in_plane_vox": 24,
            "n_slices": 4,
            "seed": 0,
            "sites": ["A", "B"],
        }
    },
}


def _bundles() -> list[str]:
    return sorted(
        p.name
        for p in BUNDLES.iterdir()
        if (p / "train.json").is_file() and (p / "evaluate.json").is_file()
    )


def _lists(bundle: str, dataset_dir: Path) -> dict[str, list[str]]:
    root = BUNDLES / bundle
    out = {}
    for split, files, key in (
        ("training", ["train.json"], "train#dataset#data"),
        ("validation", ["train.json"], "validate#dataset#data"),
        ("test", ["train.json", "evaluate.json"], "validate#dataset#data"),
    ):
        parser = ConfigParser()
        parser.read_config([str(root / f) for f in files])
        parser.update({"bundle_root": str(dataset_dir.parent), "dataset_dir": str(dataset_dir)})
        parser.update(SMALL.get(bundle, {}))
        for expr in parser.get("initialize", []) or []:
            if "ensure_dataset" in str(expr) or "phantom" in str(expr):
                parser.get_parsed_content("initialize")
                break
        cases = parser.get_parsed_content(key)
        out[split] = sorted(str(Path(c["image"]).resolve()) for c in cases)
    return out


@pytest.mark.parametrize("bundle", _bundles())
def test_bundle_splits_are_disjoint_and_validation_is_carved_from_training(bundle, tmp_path):
    data = tmp_path / "data"
    lists = _lists(bundle, data)
    assert all(lists.values()), {k: len(v) for k, v in lists.items()}
    train, val, test = (set(lists[k]) for k in ("training", "validation", "test"))
    assert not train & val and not train & test and not val & test
    # the same lists again: seeded, not a fresh shuffle per call
    assert _lists(bundle, data) == lists


@pytest.mark.parametrize("bundle", _bundles())
def test_a_dataset_without_a_validation_list_validates_on_carved_training_cases(bundle, tmp_path):
    data = tmp_path / "data"
    first = _lists(bundle, data)  # generates the phantoms and their dataset.json
    index = data / "dataset.json"
    spec = json.loads(index.read_text())
    # e.g. DRIVE: train + test (a dataset may also come without a validation list)
    spec["training"] = spec["training"] + spec.pop("validation", [])
    index.write_text(json.dumps(spec))
    lists = _lists(bundle, data)
    assert lists["test"] == first["test"]
    assert lists["validation"] and set(lists["validation"]) <= set(
        first["training"] + first["validation"]
    )
    assert not set(lists["validation"]) & set(lists["training"])
    assert not set(lists["validation"]) & set(lists["test"])
