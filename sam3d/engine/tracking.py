"""MLflow: one run per training, shared by the trainer's and evaluator's handlers.

Tracking never stops a training. Metrics are kept in :attr:`MLflowRun.pending` until
they are sent; a training sends an epoch's metrics only *after* ``last.pt`` (which holds
them) is written (:class:`~sam3d.engine.checkpointing.TrainingCheckpoint`), so a kill at
any point neither loses an epoch nor logs one twice: a resumed run sends what ``last.pt``
holds, skipping what the server already has. When the server is down, each attempt is
bounded (MLflow's HTTP retries are capped), a warning is logged once per outage, and the
metrics wait for the next attempt (after ``retry_interval_s``), the end of training, or
the next start of the bundle.
"""

from __future__ import annotations

import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.handlers import MLFlowHandler
from monai.utils import path_to_sqlite_uri, path_to_uri

from sam3d.engine.distributed import is_rank0
from sam3d.engine.options import as_bool
from sam3d.engine.resume import atomic_torch_save, read_resume_state
from sam3d.errors import Sam3DError

logger = logging.getLogger("sam3d.engine")


def run_name(bundle: str, step: str = "train", preset: Any = None) -> str:
    """A run name that says what ran and when: ``echo-train-tiny-20261207-235901``.

    ``preset``: a preset name or a model settings dict (its ``name``, else its SAM preset
    and input side); MLflow's own random names repeat across bundles, because every bundle
    seeds Python's ``random`` before the run is created.
    """
    if isinstance(preset, Mapping):
        sam = preset.get("name") or preset.get("sam")
        side = preset.get("image_size") or preset.get("img_size")
        preset = "-".join(str(v) for v in (sam, side) if v)
    parts = [bundle, step, str(preset) if preset else "", time.strftime("%Y%m%d-%H%M%S")]
    return "-".join(p.replace(" ", "_") for p in parts if p)


def run_name_default(experiment_name: str) -> str:
    """``<experiment>-<YYYYmmdd-HHMMSS>``, when a bundle gives no run name."""
    return f"{experiment_name}-{time.strftime('%Y%m%d-%H%M%S')}"


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
        retry_interval_s: float = 30.0,
    ) -> None:
        self.enabled = as_bool(enabled, "mlflow_enabled") and is_rank0()
        env = os.environ.get("MLFLOW_TRACKING_URI")
        uri = env or tracking_uri or path_to_sqlite_uri(os.path.abspath(str(default_store)))
        if uri.startswith("file:") or "://" not in uri:
            raise Sam3DError(
                f"tracking_uri {uri!r} is not usable: pass http://HOST:PORT of an MLflow server "
                "or sqlite:///PATH/mlruns.db (MLflow no longer supports plain folders)."
            )
        self.tracking_uri = uri
        self.experiment_name = experiment_name
        # MLflow's random names repeat: every bundle seeds Python's random before the run
        self.run_name = run_name or run_name_default(experiment_name)
        self.resume_file = resume_file
        self.max_epochs = max_epochs
        self.timeout_s = float(timeout_s)
        self.retry_interval_s = float(retry_interval_s)
        self._run_id: str | None = None
        self._client: Any = None
        # metrics not yet sent: dicts {run_id, key, value, timestamp, step, checked}; checked
        # False = it may have reached the server before a kill (look before sending)
        self.pending: list[dict[str, Any]] = []
        self.deferred = False  # a TrainingCheckpoint sends after writing last.pt
        self._retry_at = 0.0
        self._outage: str | None = None
        self._previous_handlers: dict[int, Any] = {}

    # -- resilient calls ---------------------------------------------------------

    def _bound_http_retries(self) -> None:
        """Cap MLflow's HTTP retries (default: minutes of back-off) unless the user set them."""
        if self.tracking_uri.startswith(("http://", "https://")):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(self.timeout_s))))

    @property
    def offline(self) -> bool:
        """True while the last attempt failed and the next is not due yet."""
        return self._outage is not None and time.monotonic() < self._retry_at

    def guard(self, what: str, fn: Callable[..., Any], *args: Any, force: bool = False, **kw: Any):
        """``fn(*args, **kw)``; a tracking failure is logged (once per outage), never raised.

        Returns ``(True, result)`` or ``(False, None)``; while :attr:`offline` (and not
        ``force``), nothing is tried.
        """
        if self.offline and not force:
            return False, None
        pool = logging.getLogger("urllib3.connectionpool")  # one line per retry otherwise
        level = pool.level
        pool.setLevel(logging.ERROR)
        try:
            result = fn(*args, **kw)
        except Exception as e:  # MlflowException, connection errors, HTTP errors
            self._retry_at = time.monotonic() + self.retry_interval_s
            if self._outage is None:
                reason = " ".join(str(e).split())[:200]
                logger.warning(
                    f"mlflow: {what} failed ({type(e).__name__}: {reason}); training goes on, "
                    f"metrics are kept and sent when {self.tracking_uri} answers again (at the "
                    "latest at the end, or on resume)"
                )
            self._outage = what
            return False, None
        finally:
            pool.setLevel(level)
        return True, result

    def record(self, metrics: Mapping[str, Any], step: int) -> None:
        """Keep metrics of ``step`` for sending (now, unless :attr:`deferred`)."""
        if not self.enabled:
            return
        now = int(time.time() * 1000)
        ok, run_id = (
            (True, self._run_id)
            if self._run_id
            else self.guard("opening the run", getattr, self, "run_id")
        )
        for key, value in metrics.items():
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue  # MONAI's default epoch log only sends numbers, too
            self.pending.append(
                {
                    "run_id": run_id if ok else None,  # None: the run of this training
                    "key": str(key),
                    "value": value,
                    "timestamp": now,
                    "step": int(step),
                    "checked": True,
                }
            )
        if not self.deferred:
            self.flush()

    def restore(self, pending: Sequence[Mapping[str, Any]] | None) -> None:
        """Take back metrics saved with a checkpoint; they may have been sent already."""
        known = {(m["run_id"], m["key"], m["step"]) for m in self.pending}
        for m in pending or []:
            if (m["run_id"], m["key"], m["step"]) not in known:
                self.pending.append({**dict(m), "checked": False})

    def snapshot(self) -> list[dict[str, Any]]:
        """The unsent metrics as plain data (for ``last.pt``)."""
        return [{k: v for k, v in m.items() if k != "checked"} for m in self.pending]

    def flush(self, force: bool = False) -> bool:
        """Send every pending metric; True when none is left. Never raises."""
        if not self.enabled or not self.pending:
            return True
        n = len(self.pending)
        ok, _ = self.guard("sending metrics", self._send_pending, force=force)
        if ok and self._outage is not None:  # metrics reached the server: the outage is over
            logger.warning(f"mlflow: {self.tracking_uri} answers again; sent {n} kept metrics")
            self._outage = None
        return ok

    def _send_pending(self) -> None:
        from mlflow.entities import Metric

        by_run: dict[str, list[dict[str, Any]]] = {}
        for m in self.pending:
            if m["run_id"] is None:
                m["run_id"] = self.run_id
            by_run.setdefault(m["run_id"], []).append(m)
        for run_id, items in by_run.items():
            unchecked = {m["key"] for m in items if not m["checked"]}
            have = {
                (key, h.step)
                for key in unchecked
                for h in self.client.get_metric_history(run_id, key)
            }
            todo = [m for m in items if m["checked"] or (m["key"], m["step"]) not in have]
            for i in range(0, len(todo), 500):  # the server's batch limit is 1000
                batch = [
                    Metric(m["key"], m["value"], m["timestamp"], m["step"])
                    for m in todo[i : i + 500]
                ]
                self.client.log_batch(run_id, metrics=batch, params=[], tags=[])
            self.pending = [m for m in self.pending if m["run_id"] != run_id]

    def _deliver_leftovers(self) -> None:
        """Metrics a finished training could not send (kept in its ``last.pt``): send them."""
        from sam3d.models.checkpoint import read_checkpoint

        path = Path(self.resume_file) if self.resume_file else None
        if path is None or not path.is_file():
            return
        state = read_checkpoint(path, "resume checkpoint")
        left = state.get("mlflow_pending") if isinstance(state, dict) else None
        if not left:
            return
        self.restore(left)
        if self.flush(force=True) and read_resume_state(path, self.max_epochs) is None:
            state["mlflow_pending"] = []  # finished training: nothing else will rewrite it
            atomic_torch_save(state, path)
            logger.warning(f"mlflow: sent {len(left)} metrics that {path} still held")

    @property
    def artifact_location(self) -> str | None:
        if self.tracking_uri.startswith("sqlite:///"):
            return path_to_uri(Path(self.tracking_uri[len("sqlite:///") :]).parent / "mlruns")
        return None

    def check(self) -> MLflowRun:
        """Fail now, with a clear message, if the tracking store cannot be reached or the
        resume checkpoint cannot be read (a corrupt or pickled-code ``last.pt``)."""
        if self.resume_file:
            read_resume_state(self.resume_file, self.max_epochs)
        if not self.enabled:
            return self
        self._bound_http_retries()
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
        self._deliver_leftovers()
        self.guard("settling the previous run", self._settle_previous, force=True)
        return self

    def _settle_previous(self) -> None:
        """The run of the previous training in this bundle root, if MLflow still shows it
        ``RUNNING``: a finished training (its ``last.pt`` complete; the server was down when
        it ended) is marked ``FINISHED``, one that stopped part-way and is not resumed now
        ``KILLED``. A resumable one is left to :attr:`run_id`, which reopens it."""
        from sam3d.models.checkpoint import read_checkpoint

        path = Path(self.resume_file) if self.resume_file else None
        if path is None or not path.is_file():
            return
        state = read_checkpoint(path, "resume checkpoint")
        previous = state.get("mlflow_run_id") if isinstance(state, dict) else None
        if not previous:
            return
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(previous)
        except MlflowException:
            return  # another store, or deleted
        if run.info.status != "RUNNING":
            return
        if read_resume_state(path, self.max_epochs) is not None:
            return  # this start resumes it
        finished = int(state.get("epoch", 0)) >= int(state.get("max_epochs", 0) or 0)
        status = "FINISHED" if finished else "KILLED"
        self.client.set_terminated(previous, status)
        logger.warning(
            f"mlflow: run {previous} of the previous training was left RUNNING; now {status}"
        )

    def _on_signal(self, signum: int, frame: Any) -> None:
        """SIGTERM / SIGHUP / SIGINT: mark the run KILLED, then do what the signal did."""
        import signal

        if self._run_id is not None:
            self.guard("marking the run KILLED", self.client.set_terminated, self._run_id,
                       "KILLED", force=True)  # fmt: skip
            logger.warning(f"mlflow: run {self._run_id} marked KILLED (signal {signum})")
        previous = self._previous_handlers.get(signum, signal.SIG_DFL)
        signal.signal(signum, previous)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            os.kill(os.getpid(), signum)

    def release_signals(self) -> None:
        """Give the signals back to their previous handlers (the run has ended)."""
        import signal

        for sig, previous in self._previous_handlers.items():
            if signal.getsignal(sig) == self._on_signal:
                signal.signal(sig, previous)
        self._previous_handlers.clear()

    def _install_signal_handlers(self) -> None:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        for name in ("SIGTERM", "SIGHUP", "SIGINT"):
            sig = getattr(signal, name, None)
            if sig is None or sig in self._previous_handlers:
                continue
            previous = signal.getsignal(sig)
            if previous == signal.SIG_IGN or previous is None:
                continue
            self._previous_handlers[sig] = previous
            signal.signal(sig, self._on_signal)

    @property
    def client(self) -> Any:
        if self._client is None:
            import mlflow

            self._bound_http_retries()
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
                self._install_signal_handlers()
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
        self._install_signal_handlers()
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
            ok, run = self.run.guard("opening the run", self.client.get_run, self.run.run_id)
            if not ok:
                return
            self.cur_run = run
        self.run.guard("logging parameters", super().start, engine)

    def _log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        from monai.utils import flatten_dict

        self.run.record(flatten_dict(metrics), step or 0)

    def complete(self) -> None:
        # a training's metrics go out after last.pt (TrainingCheckpoint), not when its
        # evaluator completes a validation; the end of training flushes in close()
        if self.run.enabled and not self.run.deferred:
            self.run.flush(force=True)
        if self.cur_run is not None and self.artifacts:
            self.run.guard("logging artifacts", super().complete, force=True)

    def close(self) -> None:
        if self.run.enabled:
            self.run.flush(force=True)
        if self.cur_run is not None:
            ok, _ = self.run.guard("closing the run", super().close, force=True)
            if ok:
                self.run.release_signals()
            self.cur_run = None
        else:
            self._dispose_sqlite_store()
