"""What every registered model shares (see :mod:`sam3d.models.registry` for the protocol).

:func:`parameter_groups` is the one return type of ``model.trainable_parameters()``:
named optimizer parameter groups, ``[{"name": part, "params": [...]}, ...]``, which a
``torch.optim`` optimizer takes as they are (the extra ``name`` key is kept in
``optimizer.param_groups``) and which name what trains.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn


def parameter_groups(**parts: nn.Module | Iterable[nn.Parameter]) -> list[dict[str, Any]]:
    """``[{"name": part, "params": [trainable parameters]}, ...]`` in the order given; parts
    without a trainable parameter are left out, and a parameter is listed once only."""
    seen: set[int] = set()
    groups = []
    for name, part in parts.items():
        params = part.parameters() if isinstance(part, nn.Module) else part
        kept = [p for p in params if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in kept)
        if kept:
            groups.append({"name": name, "params": kept})
    return groups


def group_dict(groups: list[dict[str, Any]]) -> dict[str, list[nn.Parameter]]:
    """``{name: params}`` of :func:`parameter_groups`' output."""
    return {g["name"]: g["params"] for g in groups}
