"""Low-rank adaptation (LoRA) of chosen ``nn.Linear`` layers: inject, count, merge.

``LoRALinear`` computes ``y = base(x) + (alpha / rank) * B(A(dropout(x)))`` with the
base layer frozen, ``A`` (rank x in) Kaiming-uniform and ``B`` (out x rank) zero, so an
injected model computes exactly what it did before until ``B`` is trained.
``merge_lora`` folds ``(alpha / rank) * B @ A`` into the base weight and puts plain
``nn.Linear`` layers back, so a merged model has the original key names and cost.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sam3d.errors import Sam3DError


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update.

    Args:
        base: the layer to adapt (its parameters are frozen in place).
        rank: rank ``r`` of the update.
        alpha: scaling numerator; the update is scaled by ``alpha / rank``.
        dropout: dropout probability on the update's input (0 disables it).
    """

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        kw = {"dtype": base.weight.dtype, "device": base.weight.device}
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **kw))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises weights
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        """The update ``scale * B @ A`` as an ``out x in`` matrix."""
        return self.scale * (self.lora_b @ self.lora_a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``... x in`` -> ``... x out``."""
        update = F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)
        return self.base(x) + self.scale * update

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing this layer's function (in eval mode)."""
        w = self.base.weight
        out = nn.Linear(
            self.in_features, self.out_features, bias=self.base.bias is not None,
            device=w.device, dtype=w.dtype,
        )  # fmt: skip
        out.weight.copy_(w + self.delta_weight().to(w.dtype))
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        out.weight.requires_grad_(self.base.weight.requires_grad)
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def inject_lora(
    model: nn.Module,
    targets: Sequence[str],
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.0,
) -> list[str]:
    """Wrap every ``nn.Linear`` whose dotted name matches a glob in ``targets`` in a LoRALinear.

    Patterns are ``fnmatch`` globs on the full module name, e.g. ``"*.mlp.lin1"``.
    Returns the wrapped names; raises :class:`Sam3DError` if a pattern matches no
    linear layer (a misspelt target would otherwise silently train nothing).
    """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    wrapped: list[str] = []
    for pattern in targets:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            raise Sam3DError(f"LoRA target {pattern!r} matches no nn.Linear layer of the model")
        wrapped.extend(h for h in hits if h not in wrapped)
    for name in wrapped:
        _set_submodule(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return wrapped


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """The ``(name, LoRALinear)`` pairs of a model."""
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            yield name, m


def lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The low-rank factors ``A`` and ``B`` of every LoRA layer."""
    for _, m in lora_layers(model):
        yield m.lora_a
        yield m.lora_b


def count_lora_parameters(model: nn.Module) -> int:
    """Number of LoRA parameters: ``rank * (in + out)`` per wrapped layer."""
    return sum(p.numel() for p in lora_parameters(model))


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight, in place; returns ``model``.

    Afterwards the model holds plain ``nn.Linear`` layers under their original names
    (so its state dict loads into the un-adapted architecture) and, in eval mode,
    computes the same outputs as before merging.
    """
    for name, m in list(lora_layers(model)):
        _set_submodule(model, name, m.merged())
    return model
