"""LoRA: injection by name pattern, parameter count, merge equivalence."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sam3d.errors import Sam3DError
from sam3d.models.sam.lora import (
    LoRALinear,
    count_lora_parameters,
    inject_lora,
    lora_parameters,
    merge_lora,
)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"lin1": nn.Linear(12, 20), "lin2": nn.Linear(20, 12)}) for _ in range(3)
        )
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        for b in self.blocks:
            x = x + b["lin2"](torch.relu(b["lin1"](x)))
        return self.head(x)


def _trained_model(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    model = MLP()
    inject_lora(model, ["blocks.*.lin1", "blocks.*.lin2"], rank=4, alpha=8.0)
    with torch.no_grad():  # B starts at zero; give it values as training would
        for p in lora_parameters(model):
            p.normal_(0, 0.3)
    return model.eval()


def test_inject_wraps_only_matching_layers_and_counts():
    torch.manual_seed(0)
    model = MLP()
    names = inject_lora(model, ["*.lin1", "blocks.*.lin2"], rank=4, alpha=8.0)
    assert names == [f"blocks.{i}.lin1" for i in range(3)] + [f"blocks.{i}.lin2" for i in range(3)]
    assert isinstance(model.blocks[1]["lin2"], LoRALinear)
    assert isinstance(model.head, nn.Linear) and not isinstance(model.head, LoRALinear)
    # rank * (in + out) per layer: lin1 4*(12+20), lin2 4*(20+12)
    assert count_lora_parameters(model) == 3 * (4 * 32 + 4 * 32)
    # base weights frozen, LoRA factors trainable
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(("lora_" in n) or n.startswith("head.") for n in trainable)
    assert model.blocks[0]["lin1"].scale == 2.0


def test_injected_model_starts_as_the_base_model():
    torch.manual_seed(0)
    model = MLP().eval()
    x = torch.randn(5, 12)
    before = model(x)
    inject_lora(model, ["*.lin1", "*.lin2"], rank=2, alpha=4.0)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_lora_forward_matches_the_definition():
    torch.manual_seed(0)
    base = nn.Linear(6, 3)
    layer = LoRALinear(base, rank=2, alpha=6.0)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(4, 6)
    expected = x @ base.weight.T + base.bias + 3.0 * (x @ layer.lora_a.T @ layer.lora_b.T)
    torch.testing.assert_close(layer(x), expected)


def test_merge_gives_the_same_outputs_and_plain_linears():
    model = _trained_model()
    x = torch.randn(7, 12)
    expected = model(x)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    # the merged state dict has the original key names and loads into the plain model
    MLP().load_state_dict(model.state_dict(), strict=True)


def test_gradients_reach_only_lora_factors():
    model = _trained_model()
    for p in model.head.parameters():
        p.requires_grad_(False)
    model(torch.randn(3, 12)).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in name), name


def test_dropout_only_acts_on_the_update():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8), rank=2, alpha=2.0, dropout=0.5).train()
    x = torch.randn(4, 8)
    # with B = 0 the update vanishes, so dropout cannot change the output
    torch.testing.assert_close(layer(x), layer.base(x))


def test_unknown_target_is_a_user_error():
    with pytest.raises(Sam3DError, match="matches no nn.Linear"):
        inject_lora(MLP(), ["*.qkv"])
