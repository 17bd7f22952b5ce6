"""Every registered model kind builds from its tiny preset, saves in the one trained format and
comes back through the one loader with identical weights and outputs."""

from __future__ import annotations

import pytest
import torch

from sam3d.errors import Sam3DError
from sam3d.models.checkpoint import load_trained, read_trained, save_trained
from sam3d.models.registry import build_model, get_kind, kind_of, model_kinds


def _perturb(model: torch.nn.Module) -> None:
    """Move every weight off its initial value so a reload that re-initialises is caught."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))


def _example(kind: str, model: torch.nn.Module) -> tuple[tuple, dict]:
    """A small input the kind's forward takes."""
    g = torch.Generator().manual_seed(1)
    if get_kind(kind).wing == "volumetric":
        n = model.crop_size
        x = torch.randn(1, 1, n, n, n, generator=g)
        return (x,), {"points": torch.tensor([[[n / 2, n / 2, n / 2]]]),
                      "point_labels": torch.ones(1, 1, dtype=torch.long)}  # fmt: skip
    size = int(model.config.get("image_size", 64))
    return (torch.rand(1, 3, size, size, generator=g) * 255,), {}


def test_the_registry_lists_both_wings():
    kinds = model_kinds()
    assert {"sam3d", "topolora"} <= set(kinds)
    assert {get_kind(k).wing for k in kinds} == {"volumetric", "planar"}
    with pytest.raises(Sam3DError, match="unknown model kind 'nope'"):
        get_kind("nope")


@pytest.mark.parametrize("kind", model_kinds())
def test_every_kind_round_trips_through_the_one_loader(kind, tmp_path):
    model = build_model(kind, "tiny").eval()
    assert kind_of(model) == kind and model.config
    _perturb(model)
    path = save_trained(tmp_path / "model.pt", model, meta={"epoch": 3}, dataset={"name": "x"})
    obj = read_trained(path)
    assert obj["model"] == kind and obj["meta"] == {"epoch": 3}
    loaded, meta = load_trained(path)
    assert type(loaded) is type(model) and meta["model"] == kind
    assert meta["epoch"] == 3 and meta["dataset"] == {"name": "x"}
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    args, kwargs = _example(kind, model)
    with torch.no_grad():
        assert torch.equal(model(*args, **kwargs), loaded(*args, **kwargs))
    other = next(k for k in model_kinds() if k != kind)
    with pytest.raises(Sam3DError, match=f"holds a {kind} model, not {other}"):
        load_trained(path, kind=other)


def test_a_checkpoint_without_a_config_is_refused(tmp_path):
    model = build_model("topolora", "tiny")
    model.config = None
    with pytest.raises(Sam3DError, match="no config to rebuild"):
        save_trained(tmp_path / "m.pt", model)
