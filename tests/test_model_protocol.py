"""The model protocol: what a ModelKind declares is what its model does, every model keeps
the config its constructor got, one trainable_parameters type, and Sam3D composes any
VolumeEncoder (the seam another backbone plugs into)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sam3d.errors import Sam3DError
from sam3d.models.checkpoint import legacy_model_kind
from sam3d.models.registry import ModelKind, build_model, get_kind, kinds_where, model_kinds

SMALL = {
    "sam3d": "tiny",
    "click_unet": "tiny",
    "sammed3d": "tiny",
    "topolora": {"sam": "tiny", "image_size": 64},
    "samus": {"sam": "tiny", "image_size": 64, "cnn_width": 8},
    "desam": {"sam": "tiny", "image_size": 64, "tap_blocks": [0, 1, 2], "pdmm_width": 16},
}


@pytest.fixture(scope="module", params=sorted(SMALL))
def built(request):
    torch.manual_seed(0)
    return request.param, build_model(request.param, SMALL[request.param]).eval()


def test_every_registered_kind_is_covered_here():
    assert set(model_kinds()) == set(SMALL)


def test_the_declared_input_is_what_the_forward_takes(built):
    from sam3d.models.export import example_input, inference_view

    kind, model = built
    k = get_kind(kind)
    view = inference_view(model)
    x = example_input(view)
    side = getattr(model, k.input_side)
    assert x.shape == (1, k.input_channels) + (side,) * k.spatial_dims
    if k.input_range is not None:
        lo, hi = k.input_range
        assert lo <= float(x.min()) and float(x.max()) <= hi
        assert float(x.max()) > lo + 0.9 * (hi - lo)  # spread over the range, not 0..1 of 255
    with torch.no_grad():
        out = view(x)
    assert out.shape[0] == 1 and torch.isfinite(out).all()
    # a view is wrapped exactly when the kind says its forward needs clicks
    assert (view is not model) == k.prompt_required


def test_samus_takes_unit_range_images():
    # SAMUS's input is grey in [0, 1] (REFERENCE.md section 3), not SAM's 0..255
    assert get_kind("samus").input_range == (0.0, 1.0)
    assert get_kind("topolora").input_range == (0.0, 255.0)


def test_the_tables_read_from_the_registry():
    from sam3d.apps.export import EXPORTS

    assert kinds_where(prompt="points2d") == ["samus"]
    for kind, spec in EXPORTS.items():
        assert spec.bundle == get_kind(kind).bundle
        assert spec.promptable == get_kind(kind).prompt_required
    assert EXPORTS["sam3d"].bundle == "kits" and EXPORTS["sam3d"].promptable
    assert EXPORTS["topolora"].bundle == "retina" and not EXPORTS["topolora"].promptable


def test_a_kind_with_an_unknown_prompt_is_refused():
    with pytest.raises(ValueError, match="prompt must be one of"):
        ModelKind("x", "planar", "m:f", "X", "x", "clicks", 1, None, "img_size")


def test_config_is_set_by_the_constructor_and_rebuilds_the_model(built):
    kind, model = built
    assert isinstance(model.config, dict) and model.config
    again = build_model(kind, model.config)
    assert again.config == model.config
    assert {k: v.shape for k, v in again.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }


def test_trainable_parameters_are_named_groups_of_exactly_the_trainable_ones(built):
    _, model = built
    groups = model.trainable_parameters()
    assert isinstance(groups, list) and all(set(g) == {"name", "params"} for g in groups)
    listed = [id(p) for g in groups for p in g["params"]]
    assert len(listed) == len(set(listed))  # each once
    assert set(listed) == {id(p) for p in model.parameters() if p.requires_grad}
    torch.optim.AdamW(groups, lr=1e-3)  # what an optimizer takes as it is


def test_legacy_checkpoints_name_their_kind_explicitly():
    assert legacy_model_kind("tiny") == "sam3d"
    assert legacy_model_kind({"crop_size": 32, "sam": "tiny"}) == "sam3d"
    assert legacy_model_kind({"sam": "tiny", "image_size": 64}) == "topolora"
    with pytest.raises(Sam3DError, match="names no model kind"):
        legacy_model_kind({"image_size": 64})


def test_sam3d_composes_any_volume_encoder():
    from sam3d.models.sam.checkpoint import LoadReport
    from sam3d.models.volumetric.backbone import VolumeEncoder
    from sam3d.models.volumetric.decoder3d import MLADecoder3D
    from sam3d.models.volumetric.prompt3d import PromptEncoder3D
    from sam3d.models.volumetric.sam3d import Sam3D

    class ConvEncoder(VolumeEncoder):
        """A minimal VolumeEncoder (not SAM's ViT): two levels at 1/8 of the crop."""

        voxels_per_token, out_channels, num_levels = 8, 16, 2

        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv3d(1, 16, 8, stride=8)
            self.deep = nn.Conv3d(16, 16, 3, padding=1)

        def forward(self, x):
            a = self.stem(x)
            return [a, self.deep(a)]

        def load_pretrained(self, state):
            self.stem.weight.data.copy_(state["stem.weight"])
            return LoadReport(used=["stem.weight"], new=["stem.bias", "deep.weight", "deep.bias"])

        def freeze_pretrained(self):
            self.stem.weight.requires_grad_(False)

    torch.manual_seed(0)
    enc = ConvEncoder()
    model = Sam3D(
        enc,
        PromptEncoder3D(dim=16, depth=1, num_heads=2, mlp_dim=32, num_queries=2),
        MLADecoder3D(in_dim=16, dim=8, num_classes=2, num_levels=enc.num_levels),
        crop_size=32,
        config={"name": "conv"},
    )
    x = torch.randn(1, 1, 32, 32, 32)
    points = torch.tensor([[[16.0, 10.0, 20.0]]])
    with torch.no_grad():
        logits = model(x, points)
        features = model.encode(x)
        again = model.decode(features, points)
    assert logits.shape == (1, 2, 32, 32, 32) and torch.equal(logits, again)
    assert features.prompt_map.shape == (1, 16, 4, 4, 4)
    with pytest.raises(ValueError, match="multiples of 8"):
        model.encode(torch.randn(1, 1, 28, 32, 32))
    with pytest.raises(TypeError, match="VolumeEncoder"):
        Sam3D(nn.Identity(), model.prompt_encoder, model.decoder, 32)
