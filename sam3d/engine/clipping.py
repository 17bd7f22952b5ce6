"""Gradient-norm clipping between ``backward`` and ``optimizer.step`` for MONAI trainers."""

from __future__ import annotations

from typing import Any

import torch
from monai.engines.utils import IterationEvents

from sam3d.engine.options import as_bool


class GradientClipping:
    """Clip the gradient norm right before each optimizer step of a ``SupervisedTrainer``.

    Understands MONAI's ``accumulation_steps`` (clips only on the iterations that step)
    and unscales AMP gradients first, so ``max_norm`` is in true gradient units.
    ``per_group``: clip each optimizer parameter group to ``max_norm`` on its own
    (3DSAM-adapter clips its encoder, prompt encoder and decoder separately), instead of
    the norm over all of them.
    """

    def __init__(self, max_norm: float = 1.0, per_group: bool = False) -> None:
        self.max_norm = float(max_norm)
        self.per_group = as_bool(per_group, "per_group")

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def _will_step(self, engine: Any) -> bool:
        acc = int(getattr(engine, "accumulation_steps", 1) or 1)
        if acc <= 1:
            return True
        length = engine.state.epoch_length
        it = engine.state.iteration - 1
        local = it % length if length is not None else it
        return (local + 1) % acc == 0 or (length is not None and local + 1 == length)

    def __call__(self, engine: Any) -> None:
        if not self._will_step(engine):
            return
        if getattr(engine, "amp", False) and getattr(engine, "scaler", None) is not None:
            engine.scaler.unscale_(engine.optimizer)
        opt = engine.optimizer
        groups = [[p for p in g["params"] if p.grad is not None] for g in opt.param_groups]
        for params in groups if self.per_group else [[p for g in groups for p in g]]:
            if params:
                torch.nn.utils.clip_grad_norm_(params, self.max_norm)
