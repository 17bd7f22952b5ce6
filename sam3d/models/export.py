"""Export a trained network's inference forward: TorchScript, ``torch.export`` and ONNX.

What is exported is the *image-only view* of a model (``view(image) -> logits``): a
kind whose forward needs clicks (``ModelKind.prompt_required`` in
:mod:`sam3d.models.registry`) is wrapped in :class:`sam3d.engine.CentreClickNetwork` (one
positive click at the crop centre when none is given), any other is itself. The example
input is the kind's (``ModelKind.example_input``: channels, side, intensity range). Which format
works for which model (``FORMATS``) is tested in ``tests/test_export.py``:

- Sam3D: ``torch.jit.script`` fails (``F.interpolate`` with an int ``scale_factor`` and
  other dynamic Python), so TorchScript is by ``torch.jit.trace`` at the crop size;
  ``torch.export`` works; ONNX through ``torch.onnx.export`` when ``onnx`` is installed.
- TopoLoRA-SAM: the same (script fails inside ``segment_anything``; trace at one input size).

A traced module is specialised to the example's shape (Sam3D's crop is fixed anyway; a
TopoLoRA-SAM trace resizes any input to the size it was traced at, so trace at the size
you serve).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from sam3d.errors import Sam3DError

FORMATS = ("torchscript", "torch_export", "onnx")


def inference_view(model: torch.nn.Module, kind: str | None = None) -> torch.nn.Module:
    """The image-only view of ``model`` (eval mode): wrapped when its kind needs clicks."""
    from sam3d.engine import CentreClickNetwork
    from sam3d.models.registry import get_kind, kind_of

    if isinstance(model, CentreClickNetwork):
        return model.eval()
    wrap = get_kind(kind or kind_of(model)).prompt_required
    return (CentreClickNetwork(model) if wrap else model).eval()


def example_input(model: torch.nn.Module, size: int | None = None, seed: int = 0) -> torch.Tensor:
    """A seeded random input for (the view of) a registered model: its kind's
    :meth:`~sam3d.models.registry.ModelKind.example_input` (Sam3D ``1 x 1 x c x c x c``
    z-scored; TopoLoRA-SAM and DeSAM ``1 x 3 x s x s`` in 0..255; SAMUS ``1 x 1 x s x s``
    in 0..1), ``size`` or the model's own input side."""
    from sam3d.models.registry import get_kind, kind_of

    net = getattr(model, "network", model)
    return get_kind(kind_of(net)).example_input(net, size, seed)


def to_torchscript(
    view: torch.nn.Module, example: torch.Tensor, path: str | os.PathLike | None = None
) -> tuple[torch.jit.ScriptModule, str]:
    """``torch.jit.script`` when it compiles, else ``torch.jit.trace`` at ``example``.

    Returns the module and the method used (``"script"`` / ``"trace"``); saved to ``path``.
    """
    try:
        module, how = torch.jit.script(view), "script"
    except Exception:  # TorchScript's frontend raises many types on unsupported Python
        with torch.no_grad():
            module, how = torch.jit.trace(view, example, check_trace=False), "trace"
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.jit.save(module, str(path))
    return module, how


def to_torch_export(
    view: torch.nn.Module, example: torch.Tensor, path: str | os.PathLike | None = None
) -> Any:
    """``torch.export.export(view, (example,))``; saved as a ``.pt2`` to ``path``."""
    with torch.no_grad():
        program = torch.export.export(view, (example,))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.export.save(program, str(path))
    return program


def onnx_available() -> bool:
    """``torch.onnx.export`` needs the ``onnx`` and ``onnxscript`` packages."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript"))


def to_onnx(view: torch.nn.Module, example: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write ``view`` as ONNX (input ``image``, output ``pred``) to ``path``."""
    if not onnx_available():
        raise Sam3DError("ONNX export needs the onnx and onnxscript packages (pip install onnx)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(view, (example,), str(path), input_names=["image"], output_names=["pred"])
    return path
