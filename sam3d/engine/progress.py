"""A per-iteration progress bar for a whole training run: loss, last validation score, ETA."""

from __future__ import annotations

import sys
from typing import Any

from ignite.engine import Events

from sam3d.engine.distributed import is_rank0


def _loss_of(output: Any) -> float | None:
    out = output[0] if isinstance(output, list) and output else output
    if isinstance(out, dict) and "loss" in out:
        return float(out["loss"])
    return None


class TrainingProgress:
    """tqdm over every iteration of the run (not per epoch): running loss (EMA 0.9), the
    validator's key metric when it has one, steps per second and the ETA of the whole run.

    Args:
        validator: the evaluator whose ``key_metric_name`` is shown after each validation.
        smoothing: the loss EMA weight of the past.
        disable: no bar (e.g. ranks other than 0: off there by default).
    """

    def __init__(
        self, validator: Any = None, smoothing: float = 0.9, disable: bool | None = None
    ) -> None:
        self.validator = validator
        self.smoothing = float(smoothing)
        self.disable = (not is_rank0()) if disable is None else bool(disable)
        self.bar = None
        self.loss: float | None = None
        self.score: str = "-"

    def attach(self, engine: Any) -> None:
        if self.disable:
            return
        engine.add_event_handler(Events.STARTED, self._open)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._step)
        engine.add_event_handler(Events.COMPLETED, self._close)
        if self.validator is not None:
            self.validator.add_event_handler(Events.COMPLETED, self._validated)

    def _open(self, engine: Any) -> None:
        from tqdm.auto import tqdm

        total = int(engine.state.max_epochs) * int(engine.state.epoch_length)
        done = (int(engine.state.epoch) if engine.state.epoch else 0) * int(
            engine.state.epoch_length
        )
        self.bar = tqdm(
            total=total, initial=done, desc="training", unit="it", dynamic_ncols=True,
            file=sys.stderr,
        )  # fmt: skip

    def _step(self, engine: Any) -> None:
        loss = _loss_of(engine.state.output)
        if loss is not None:
            s = self.smoothing
            self.loss = loss if self.loss is None else s * self.loss + (1 - s) * loss
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                epoch=engine.state.epoch,
                loss="-" if self.loss is None else f"{self.loss:.3f}",
                val=self.score,
                refresh=False,
            )

    def _validated(self, validator: Any) -> None:
        name = getattr(validator.state, "key_metric_name", None)
        if name and name in validator.state.metrics:
            self.score = f"{float(validator.state.metrics[name]):.3f}"

    def _close(self, engine: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
