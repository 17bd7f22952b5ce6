"""A tqdm progress bar with an ETA for any ignite engine of a bundle (training iterations,
evaluation cases, inference over a datalist).

``{"_target_": "sam3d.engine.ProgressBar", "desc": "training"}`` in a trainer's,
evaluator's or inferer's handler list. One bar covers the whole run (every remaining
epoch of a training, so the ETA is the training's, resumed runs included), shows the
running loss when the engine's output has one (and, given a ``validator``, its last key
metric), and closes when the run ends or is terminated (a failing run's bar is closed by
the next start). Only rank 0 draws it.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from sam3d.engine.distributed import is_rank0


def _loss_of(output: Any) -> float | None:
    """The ``loss`` of an engine's output (a dict, or a list of per-sample dicts)."""
    item = output[0] if isinstance(output, (list, tuple)) and output else output
    if not isinstance(item, dict) or "loss" not in item:
        return None
    try:
        value = float(item["loss"])
    except (TypeError, ValueError, RuntimeError):
        return None
    return value if math.isfinite(value) else None


class ProgressBar:
    """Attach a tqdm bar to an ignite engine: one step per iteration, the whole run.

    Args:
        desc: the bar's label ("training", "evaluation", "inference").
        unit: what one iteration is ("step", "case", "batch").
        leave: keep the finished bar on screen (an evaluator run inside a training
            passes ``False`` so validation bars do not pile up).
        enabled: ``False`` draws nothing (also off on ranks other than 0).
        smoothing: tqdm's rate smoothing (0: the average since the start, the steadiest
            ETA for steps of even cost).
        validator: an evaluator whose key metric the bar shows after each validation.
    """

    def __init__(
        self,
        desc: str = "training",
        unit: str = "step",
        leave: bool = True,
        enabled: bool = True,
        smoothing: float = 0.1,
        validator: Any = None,
    ) -> None:
        self.desc = desc
        self.unit = unit
        self.leave = leave
        self.enabled = bool(enabled)
        self.smoothing = smoothing
        self.validator = validator
        self.bar: Any = None
        self._loss: float | None = None
        self._score: str | None = None

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        if not (self.enabled and is_rank0()):
            return
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._step)
        # Not on EXCEPTION_RAISED: an ignite handler of that event swallows the exception.
        for event in (Events.COMPLETED, Events.TERMINATE):
            engine.add_event_handler(event, self._close)
        if self.validator is not None:
            self.validator.add_event_handler(Events.COMPLETED, self._validated)

    def total_of(self, engine: Any) -> int | None:
        """Iterations left in this run: every remaining epoch (a resumed training starts
        at its saved iteration), or ``None`` when the data has no length."""
        state = engine.state
        length = state.epoch_length
        if length is None or state.max_epochs is None:
            return None
        return max(0, int(state.max_epochs) * int(length) - int(state.iteration))

    def _start(self, engine: Any) -> None:
        from tqdm.auto import tqdm

        self._close(engine)
        self._loss = None
        self.bar = tqdm(
            total=self.total_of(engine),
            desc=self.desc,
            unit=self.unit,
            leave=self.leave,
            dynamic_ncols=True,
            smoothing=self.smoothing,
            file=sys.stderr,
        )

    def _step(self, engine: Any) -> None:
        if self.bar is None:
            return
        self.bar.update(1)
        loss = _loss_of(engine.state.output)
        if loss is not None:
            self._loss = loss if self._loss is None else 0.9 * self._loss + 0.1 * loss
            postfix = {"loss": f"{self._loss:.4f}"}
            if engine.state.max_epochs and engine.state.max_epochs > 1:
                postfix["epoch"] = f"{engine.state.epoch}/{engine.state.max_epochs}"
            if self._score is not None:
                postfix["val"] = self._score
            self.bar.set_postfix(postfix, refresh=False)

    def _validated(self, validator: Any) -> None:
        name = getattr(validator.state, "key_metric_name", None)
        if name and name in validator.state.metrics:
            self._score = f"{float(validator.state.metrics[name]):.3f}"

    def _close(self, engine: Any, *_: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
