"""Validation by simulated clicks during training: the click curve of the validation split.

The kits bundle's evaluator scores one click per case (the key metric that picks the best
checkpoint); :class:`ClickCurveValidation` adds what interactive segmentation reports,
with the protocol of :mod:`sam3d.inference.interactive` (first click at the lesion's
deepest voxel, each next one at the deepest voxel of the largest error, through
``ClickSession``, the previous mask fed back): Dice after 1..``n_clicks`` clicks, NoC@85
and the share of positive clicks inside the mask, on the lesions of the validation split.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from ignite.engine import Events

from sam3d.engine.distributed import is_rank0, unwrap

logger = logging.getLogger("sam3d.engine")


class ClickCurveValidation:
    """Every ``interval`` epochs (and after the last), score the network by clicks.

    Args:
        dataset_json: the MSD-style ``dataset.json`` whose ``validation`` split is scored
            (the phantoms' and MSD datasets'); None or missing: the handler says so once and
            does nothing.
        dataset: the dataset preset the session preprocesses with (training's).
        n_clicks: clicks per lesion.
        max_lesions: at most this many lesions (in order).
        interval: epochs between evaluations.
        network: the network to score (default the trainer's).

    Results go to ``engine.state.metrics`` (``val_click_dice_1`` .. ``_n``, ``val_click_noc85``,
    ``val_click_pos_inside``) and to the log, one line each time.
    """

    def __init__(
        self,
        dataset_json: str | Path | None,
        dataset: Any,
        n_clicks: int = 5,
        max_lesions: int | None = 12,
        interval: int = 1,
        network: Any = None,
    ) -> None:
        self.dataset_json = Path(dataset_json) if dataset_json else None
        self.dataset = dataset
        self.n_clicks = int(n_clicks)
        self.max_lesions = max_lesions
        self.interval = max(1, int(interval))
        self.network = network
        self.history: list[dict[str, float]] = []

    def attach(self, engine: Any) -> None:
        if not is_rank0() or self.n_clicks < 1:
            return
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self._last)

    def _last(self, engine: Any) -> None:
        if engine.state.epoch % self.interval:
            self(engine)

    def __call__(self, engine: Any) -> None:
        import torch

        from sam3d.inference.interactive import evaluate_clicks, lesion_cases

        if self.dataset_json is None or not self.dataset_json.is_file():
            if not self.history:
                logger.warning("click validation: no dataset.json with a validation split")
                self.history.append({})
            return
        cases = lesion_cases(self.dataset_json, "validation", limit=self.max_lesions)
        if not cases:
            return
        net = unwrap(self.network if self.network is not None else engine.network)
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                ev = evaluate_clicks(
                    net, cases, n_clicks=self.n_clicks, dataset=self.dataset,
                    device=next(net.parameters()).device, label="validation",
                )  # fmt: skip
        finally:
            net.train(was_training)
        metrics = {f"val_click_dice_{k}": float(v) for k, v in enumerate(ev.curve, start=1)}
        noc = ev.noc.get(0.85, math.nan)
        metrics.update(val_click_noc85=float(noc), val_click_pos_inside=ev.positive_inside)
        engine.state.metrics.update(metrics)
        self.history.append({"epoch": float(engine.state.epoch), **metrics})
        message = f"epoch {engine.state.epoch}: click validation: {ev.summary()}"
        logger.info(message)
        print(f"[kits] {message}", flush=True)
