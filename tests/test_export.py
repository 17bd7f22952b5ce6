"""Exported inference networks give the eager network's logits: TorchScript, torch.export,
ONNX (where onnx / onnxruntime are installed); the image-only view and its state dict."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sam3d.engine import CentreClickNetwork
from sam3d.models import export as E
from sam3d.models.registry import build_model

KINDS = {"sam3d": "tiny", "topolora": {"sam": "tiny", "image_size": 64}}


@pytest.fixture(scope="module", params=sorted(KINDS))
def view(request):
    torch.manual_seed(0)
    model = build_model(request.param, KINDS[request.param])
    with torch.no_grad():  # perturb the zero-initialised parts so they matter
        for name, p in model.named_parameters():
            if "adapter" in name or "lora" in name:
                p.add_(torch.randn_like(p) * 0.05)
    v = E.inference_view(model)
    x = E.example_input(v)
    with torch.no_grad():
        ref = v(x)
    return request.param, v, x, ref


def test_example_inputs_and_views():
    sam3d = build_model("sam3d", "tiny")
    v = E.inference_view(sam3d)
    assert isinstance(v, CentreClickNetwork) and not v.training
    assert E.example_input(v).shape == (1, 1, 32, 32, 32)
    planar = build_model("topolora", KINDS["topolora"])
    assert E.inference_view(planar) is planar
    x = E.example_input(planar)
    assert x.shape == (1, 3, 64, 64) and 0 <= float(x.min()) and float(x.max()) <= 255


def test_torchscript_logits_equal_eager(view, tmp_path):
    kind, v, x, ref = view
    module, how = E.to_torchscript(v, x, tmp_path / "model.ts")
    assert how == "trace"  # neither model scripts today (see sam3d/models/export.py)
    loaded = torch.jit.load(str(tmp_path / "model.ts"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref, rtol=0, atol=1e-5)
        other = x.flip(-1) * 0.5  # same shape, other values: not a constant folded in
        torch.testing.assert_close(loaded(other), v(other), rtol=0, atol=1e-5)


def test_torch_export_logits_equal_eager(view, tmp_path):
    kind, v, x, ref = view
    E.to_torch_export(v, x, tmp_path / "model.pt2")
    program = torch.export.load(str(tmp_path / "model.pt2"))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), ref, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(
    not E.onnx_available() or importlib.util.find_spec("onnxruntime") is None,
    reason="onnx, onnxscript and onnxruntime are not installed (pip install sam3d-med[export])",
)
def test_onnx_logits_equal_eager(view, tmp_path):
    import onnxruntime

    kind, v, x, ref = view
    path = E.to_onnx(v, x, tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["pred"], {"image": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), ref, rtol=0, atol=1e-4)


class _Echo(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(2.0))
        self.crop_size = 8

    def forward(self, image, points, point_labels):
        self.points, self.point_labels = points, point_labels
        return image * self.w


def test_centre_click_network_passes_clicks_through_and_keeps_the_state_dict():
    inner = _Echo()
    net = CentreClickNetwork(inner)
    pts, lab = torch.tensor([[[1.0, 2.0, 3.0]]]), torch.tensor([[0]])
    net(torch.ones(1, 1, 4, 4, 4), points=pts, point_labels=lab)
    assert inner.points is pts and inner.point_labels is lab
    net(torch.ones(1, 1, 4, 4, 2))
    assert inner.points.tolist() == [[[1.5, 1.5, 0.5]]] and inner.point_labels.tolist() == [[1]]
    assert net.crop_size == 8  # attributes of the wrapped network
    assert list(net.state_dict()) == ["w"]  # no "network." prefix
    other = CentreClickNetwork(_Echo())
    other.load_state_dict({"w": torch.tensor(5.0)})
    assert float(other.network.w) == 5.0
    outer = torch.nn.Sequential(other)  # nested: keys keep the outer prefix only
    assert list(outer.state_dict()) == ["0.w"]
    outer.load_state_dict({"0.w": torch.tensor(7.0)})
    assert float(other.network.w) == 7.0
