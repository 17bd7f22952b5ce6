"""Best and last checkpoints of a training, and resume from the last one."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sam3d.engine.distributed import is_rank0, unwrap
from sam3d.engine.options import as_bool
from sam3d.engine.resume import atomic_torch_save, read_resume_state
from sam3d.models.checkpoint import save_trained

if TYPE_CHECKING:
    from sam3d.engine.tracking import MLflowRun

logger = logging.getLogger("sam3d.engine")


class TrainingCheckpoint:
    """Best and last checkpoints of a training, and resume from the last one.

    - ``<ckpt_dir>/model.pt``: the trained-checkpoint format of every model
      (:func:`sam3d.models.checkpoint.save_trained`) of the epoch with the best
      ``key_metric`` (the highest; the lowest with ``key_metric_mode="min"``, as for a
      validation loss), read back by :func:`sam3d.models.checkpoint.load_trained`;
    - ``<ckpt_dir>/last.pt``: network, optimizer, scheduler, epoch, iteration, best metric,
      the MLflow run id and the metrics not yet sent, after every epoch; the epoch's
      metrics are sent only after it is written (no epoch lost or logged twice by a kill).

    Both are written atomically by rank 0 only. At the trainer's start, a resumable
    ``last.pt`` (see :func:`read_resume_state`) restores all of it on every rank.
    Attach after the validation and LR-scheduler handlers (the configs' handler order).
    """

    def __init__(
        self,
        ckpt_dir: str | Path,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any | None = None,
        evaluator: Any | None = None,
        key_metric: str = "val_mean_dice",
        preset: str | dict | None = None,
        meta: dict | None = None,
        mlflow_run: MLflowRun | None = None,
        resume: bool = True,
        key_metric_mode: str = "max",
    ) -> None:
        if key_metric_mode not in ("max", "min"):
            from sam3d.errors import Sam3DError  # (local: the module's imports are moving)

            raise Sam3DError(f"key_metric_mode must be 'max' or 'min', got {key_metric_mode!r}")
        # "min": the lowest value is best (a validation loss); stored negated in best_metric
        self.sign = 1.0 if key_metric_mode == "max" else -1.0
        self.ckpt_dir = Path(ckpt_dir)
        self.network, self.optimizer, self.lr_scheduler = network, optimizer, lr_scheduler
        self.evaluator, self.key_metric = evaluator, key_metric
        self.preset, self.meta = preset, dict(meta or {})
        self.mlflow_run, self.resume = mlflow_run, as_bool(resume, "resume")
        if mlflow_run is not None:
            mlflow_run.deferred = True  # metrics go out after last.pt holds them (see save)
        self.best_metric, self.best_epoch = -math.inf, 0
        self._validated: tuple[int, float] | None = None

    @property
    def best_path(self) -> Path:
        return self.ckpt_dir / "model.pt"

    @property
    def last_path(self) -> Path:
        return self.ckpt_dir / "last.pt"

    def attach(self, trainer: Any) -> None:
        from ignite.engine import Events

        self._trainer = trainer
        trainer.add_event_handler(Events.STARTED, self.load)
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._on_validated)

    def _on_validated(self, evaluator: Any) -> None:
        value = evaluator.state.metrics.get(self.key_metric)
        if value is not None:
            self._validated = (int(self._trainer.state.epoch), self.sign * float(value))

    def load(self, trainer: Any) -> None:
        state = read_resume_state(self.last_path, trainer.state.max_epochs) if self.resume else None
        if state is None:
            return
        unwrap(self.network).load_state_dict(state["network"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state.get("lr_scheduler") is not None:
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        trainer.state.epoch = int(state["epoch"])
        trainer.state.iteration = int(state["iteration"])
        self.best_metric = float(state.get("best_metric", -math.inf))
        self.best_epoch = int(state.get("best_epoch", 0))
        if self.mlflow_run is not None and self.mlflow_run.enabled:
            self.mlflow_run.restore(state.get("mlflow_pending"))
        logger.warning(
            f"resume: continuing from {self.last_path} after epoch {trainer.state.epoch} "
            f"(iteration {trainer.state.iteration}, best {self.key_metric} "
            f"{self.sign * self.best_metric:.4f} at epoch {self.best_epoch})"
        )

    def _config(self) -> dict | None:
        """What the registry rebuilds the network from: its builder's config, else ``preset``."""
        config = getattr(unwrap(self.network), "config", None)
        return config if config else (self.preset if isinstance(self.preset, dict) else None)

    def save(self, trainer: Any) -> None:
        if not is_rank0():
            return
        epoch = int(trainer.state.epoch)
        run = self.mlflow_run if self.mlflow_run is not None and self.mlflow_run.enabled else None
        sd = {k: v.detach().cpu() for k, v in unwrap(self.network).state_dict().items()}
        if self._validated is not None and self._validated[0] == epoch:
            value = self._validated[1]
            if not math.isnan(value) and value > self.best_metric:
                self.best_metric, self.best_epoch = value, epoch
                meta = {**self.meta, "epoch": epoch, self.key_metric: self.sign * value}
                save_trained(
                    self.best_path,
                    unwrap(self.network),
                    config=self._config(),
                    meta=meta,
                    dataset=meta.get("dataset"),
                )
                logger.info(
                    f"checkpoint: new best {self.key_metric} {self.sign * value:.4f} "
                    f"-> {self.best_path}"
                )
        atomic_torch_save(
            {
                "network": sd,
                "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": (
                    None if self.lr_scheduler is None else self.lr_scheduler.state_dict()
                ),
                "epoch": epoch,
                "iteration": int(trainer.state.iteration),
                "max_epochs": int(trainer.state.max_epochs),
                "best_metric": float(self.best_metric),
                "best_epoch": int(self.best_epoch),
                "mlflow_run_id": None if self.mlflow_run is None else self.mlflow_run.active_run_id,
                "preset": self.preset,
                "meta": self.meta,
                # this epoch's metrics (and any the server did not take yet): a kill before
                # they are sent loses nothing, a resume sends what the server lacks
                "mlflow_pending": [] if run is None else run.snapshot(),
            },
            self.last_path,
        )
        if run is not None:
            run.flush()
