"""Evaluate / inference / fine-tuning read a trained model.pt through sam3d.engine.trained."""

from __future__ import annotations

import pytest
import torch

from sam3d.engine.trained import describe_preset, init_from, trained_checkpoint
from sam3d.errors import Sam3DError
from sam3d.models.checkpoint import save_trained
from sam3d.models.registry import build_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(1)
    model = build_model("topolora", "tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # differs from a fresh build
    path = tmp_path_factory.mktemp("trained") / "model.pt"
    save_trained(path, model)
    return path, model


def test_fine_tuning_takes_the_weights_and_nothing_else(saved):
    path, model = saved
    torch.manual_seed(2)
    fresh = build_model("topolora", "tiny")
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    assert init_from(fresh, None) is fresh and init_from(fresh, "") is fresh
    assert all(torch.equal(before[k], v) for k, v in fresh.state_dict().items())
    init_from(fresh, path, "topolora")
    want = model.state_dict()
    assert all(torch.equal(want[k], v) for k, v in fresh.state_dict().items())
    assert any(not torch.equal(before[k], v) for k, v in fresh.state_dict().items())


def test_the_checkpoint_is_refused_in_one_line_when_it_cannot_be_used(saved, tmp_path):
    path, _ = saved
    with pytest.raises(Sam3DError, match="no trained model at .*train first"):
        trained_checkpoint(tmp_path / "missing.pt", "samus")
    with pytest.raises(Sam3DError, match="holds a topolora model; this bundle needs samus"):
        trained_checkpoint(path, "samus")
    other = build_model("topolora", {"sam": "tiny", "image_size": 64, "lora_rank": 2})
    with pytest.raises(Sam3DError, match="does not fit this network"):
        init_from(other, path, "topolora")
    obj = trained_checkpoint(path, "topolora")
    assert obj["model"] == "topolora" and obj["preset"]["sam"] == "tiny"
    assert describe_preset(obj["preset"]) == f"SAM 'tiny', input {obj['preset']['image_size']}"
