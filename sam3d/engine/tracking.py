"""MLflow: one run per training, shared by the trainer's and evaluator's handlers."""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from monai.handlers import MLFlowHandler
from monai.utils import path_to_sqlite_uri, path_to_uri

from sam3d.engine.checkpointing import read_resume_state
from sam3d.engine.distributed import is_rank0
from sam3d.errors import Sam3DError

logger = logging.getLogger("sam3d.engine")


class MLflowRun:
    """The one MLflow run of a training, shared by the trainer's and evaluator's handlers.

    Args:
        tracking_uri: an ``http(s)://`` server, a ``sqlite:///`` file, or None/"" for a
            SQLite store at ``default_store``. ``MLFLOW_TRACKING_URI`` in the environment wins
            (as in MONAI's ``MLFlowHandler``).
        experiment_name / run_name: where the run goes and what it is called.
        resume_file: the training's ``last.pt``; if resumable, its run id is reopened.
        max_epochs: the training's length (decides whether ``last.pt`` is resumable).
        enabled: False turns tracking off (also off on ranks > 0).

    :meth:`check` (run it before building datasets) fails at once, with one sentence, when
    a server cannot be reached; :attr:`run_id` creates or reopens the run on first use.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment_name: str = "sam3d",
        run_name: str | None = None,
        resume_file: str | Path | None = None,
        max_epochs: int | None = None,
        enabled: bool = True,
        default_store: str | Path = "eval/mlruns.db",
        timeout_s: float = 5.0,
    ) -> None:
        self.enabled = bool(enabled) and is_rank0()
        env = os.environ.get("MLFLOW_TRACKING_URI")
        uri = env or tracking_uri or path_to_sqlite_uri(os.path.abspath(str(default_store)))
        if uri.startswith("file:") or "://" not in uri:
            raise Sam3DError(
                f"tracking_uri {uri!r} is not usable: pass http://HOST:PORT of an MLflow server "
                "or sqlite:///PATH/mlruns.db (MLflow no longer supports plain folders)."
            )
        self.tracking_uri = uri
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.resume_file = resume_file
        self.max_epochs = max_epochs
        self.timeout_s = float(timeout_s)
        self._run_id: str | None = None
        self._client: Any = None

    @property
    def artifact_location(self) -> str | None:
        if self.tracking_uri.startswith("sqlite:///"):
            return path_to_uri(Path(self.tracking_uri[len("sqlite:///") :]).parent / "mlruns")
        return None

    def check(self) -> MLflowRun:
        """Fail now, with a clear message, if the tracking store cannot be reached."""
        if not self.enabled:
            return self
        if self.tracking_uri.startswith(("http://", "https://")):
            url = self.tracking_uri.rstrip("/") + "/health"
            try:
                with urllib.request.urlopen(url, timeout=self.timeout_s) as r:
                    ok = r.status == 200
            except (urllib.error.URLError, OSError, ValueError) as e:
                reason = getattr(e, "reason", e)
                raise Sam3DError(
                    f"the MLflow tracking server at {self.tracking_uri} cannot be reached "
                    f"({reason}); start it, fix --tracking_uri, or drop it to log into the "
                    "local SQLite store."
                ) from None
            if not ok:
                raise Sam3DError(
                    f"the MLflow tracking server at {self.tracking_uri} is not healthy."
                )
        elif self.tracking_uri.startswith("sqlite:///"):
            db = Path(self.tracking_uri[len("sqlite:///") :])
            db.parent.mkdir(parents=True, exist_ok=True)
        logger.info(f"mlflow: tracking into {self.tracking_uri} ({self.experiment_name!r})")
        return self

    @property
    def client(self) -> Any:
        if self._client is None:
            import mlflow

            env = os.environ.get("MLFLOW_TRACKING_URI")
            self._client = mlflow.MlflowClient(tracking_uri=None if env else self.tracking_uri)
        return self._client

    @property
    def active_run_id(self) -> str | None:
        """The run id if the run was started (None when tracking is off or not started yet)."""
        return self._run_id

    @property
    def run_id(self) -> str:
        """Create the run, or reopen the one recorded in a resumable ``last.pt``."""
        if self._run_id is not None:
            return self._run_id
        if not self.enabled:
            raise RuntimeError("MLflow tracking is disabled on this process")
        from mlflow.exceptions import MlflowException

        state = read_resume_state(self.resume_file, self.max_epochs) if self.resume_file else None
        previous = state.get("mlflow_run_id") if state else None
        if previous:
            try:
                run = self.client.get_run(previous)
                self.client.update_run(previous, status="RUNNING")
                self._run_id = run.info.run_id
                logger.warning(f"mlflow: resuming run {self._run_id}")
                return self._run_id
            except MlflowException:
                logger.warning(f"mlflow: run {previous} of {self.resume_file} not found; new run")
        exp = self.client.get_experiment_by_name(self.experiment_name)
        exp_id = (
            exp.experiment_id
            if exp is not None
            else self.client.create_experiment(
                self.experiment_name, artifact_location=self.artifact_location
            )
        )
        run = self.client.create_run(exp_id, run_name=self.run_name)
        self._run_id = run.info.run_id
        logger.info(f"mlflow: run {self._run_id} ({run.info.run_name})")
        return self._run_id


class MLflowRunHandler(MLFlowHandler):
    """MONAI's ``MLFlowHandler`` logging into the shared :class:`MLflowRun` (not a new one)."""

    def __init__(self, run: MLflowRun, **kwargs: Any) -> None:
        self.run = run
        if not run.enabled:  # ranks > 0 or tracking off: no client, no store access
            return
        if "MLFLOW_TRACKING_URI" in os.environ:
            kwargs["tracking_uri"] = None
        else:
            kwargs["tracking_uri"] = run.tracking_uri
        kwargs.setdefault("experiment_name", run.experiment_name)
        kwargs.setdefault("artifact_location", run.artifact_location)
        super().__init__(**kwargs)

    def attach(self, engine: Any) -> None:
        if self.run.enabled:
            super().attach(engine)

    def start(self, engine: Any) -> None:
        if self.cur_run is None:
            self.cur_run = self.client.get_run(self.run.run_id)
        super().start(engine)
