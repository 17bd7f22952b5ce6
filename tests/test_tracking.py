"""Tracking and checkpoints of a training under kills and a dying MLflow server.

A minimal MONAI training (a 1x1x1 conv, two epochs' worth of iterations on random
volumes) carries the bundles' own handlers: :class:`MLflowRunHandler` on the trainer
and the evaluator, and :class:`TrainingCheckpoint`. Kills are simulated by raising a
``BaseException`` at each point between an epoch's metrics and its ``last.pt``; a
resumed training must leave every epoch's metrics in the run exactly once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from sam3d.engine import MLflowRun, MLflowRunHandler, TrainingCheckpoint
from sam3d.engine import checkpointing as checkpointing_module

MAX_EPOCHS = 3
METRICS = ("train_loss", "val_score")


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not even ``except Exception``)."""


def _training(ckpt_dir: Path, run: MLflowRun, max_epochs: int = MAX_EPOCHS):
    """A SupervisedTrainer + evaluator with the bundles' tracking and checkpoint handlers."""
    from ignite.metrics import Average
    from monai.data import DataLoader
    from monai.engines import SupervisedEvaluator, SupervisedTrainer
    from monai.handlers import ValidationHandler, from_engine

    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 1, 1)
    data = [{"image": torch.rand(1, 4, 4, 4), "label": torch.rand(1, 4, 4, 4)} for _ in range(2)]
    loader = DataLoader(data, batch_size=1)
    evaluator = SupervisedEvaluator(
        device="cpu",
        val_data_loader=loader,
        network=net,
        key_val_metric={
            "val_score": Average(output_transform=lambda out: float(out[0]["pred"].mean()))
        },
        val_handlers=[MLflowRunHandler(run, iteration_log=False, epoch_log=True)],
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    trainer = SupervisedTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=loader,
        network=net,
        optimizer=opt,
        loss_function=torch.nn.MSELoss(),
        key_train_metric={
            "train_loss": Average(output_transform=from_engine(["loss"], first=True))
        },
        train_handlers=[
            ValidationHandler(validator=evaluator, interval=1, epoch_level=True),
            MLflowRunHandler(
                run,
                iteration_log=False,
                epoch_log=True,
                close_on_complete=True,
                experiment_param={"lr": 0.1},
            ),  # fmt: skip
            # no evaluator: last.pt only (a best model.pt needs a registered model kind)
            TrainingCheckpoint(ckpt_dir, net, opt, preset={"name": "conv"}, mlflow_run=run),
        ],
    )
    return trainer


def _run(uri: str, ckpt_dir: Path, **kw) -> MLflowRun:
    return MLflowRun(
        tracking_uri=uri, experiment_name="hardening", resume_file=ckpt_dir / "last.pt",
        max_epochs=MAX_EPOCHS, **kw,
    ).check()  # fmt: skip


def _histories(uri: str) -> dict[str, list[tuple[int, float]]]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("hardening")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run_id = runs[0].info.run_id
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in METRICS
    }


def _steps(hist: dict[str, list[tuple[int, float]]]) -> dict[str, list[int]]:
    return {k: [s for s, _ in v] for k, v in hist.items()}


KILL_POINTS = ["after_metrics_before_last_pt", "after_last_pt_before_logging", "after_logging"]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_kill_at_any_point_of_an_epoch_logs_every_epoch_once(tmp_path, monkeypatch, point):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    ckpt = tmp_path / "models"
    real_write, real_save = checkpointing_module.atomic_torch_save, TrainingCheckpoint.save
    kill_epoch = 2

    def write(obj, path):
        if obj["epoch"] == kill_epoch and point == "after_metrics_before_last_pt":
            raise Killed
        real_write(obj, path)
        if obj["epoch"] == kill_epoch and point == "after_last_pt_before_logging":
            raise Killed

    def save(self, trainer):
        real_save(self, trainer)  # writes last.pt, then sends the epoch's metrics
        if trainer.state.epoch == kill_epoch and point == "after_logging":
            raise Killed

    monkeypatch.setattr(checkpointing_module, "atomic_torch_save", write)
    monkeypatch.setattr(TrainingCheckpoint, "save", save)
    with pytest.raises(Killed):
        _training(ckpt, _run(uri, ckpt)).run()
    logged_before_kill = [1, 2] if point == "after_logging" else [1]
    assert _steps(_histories(uri)) == {k: logged_before_kill for k in METRICS}

    monkeypatch.setattr(checkpointing_module, "atomic_torch_save", real_write)
    monkeypatch.setattr(TrainingCheckpoint, "save", real_save)
    trainer = _training(ckpt, _run(uri, ckpt))
    trainer.run()
    assert trainer.state.epoch == MAX_EPOCHS
    hist = _histories(uri)
    assert _steps(hist) == {k: [1, 2, 3] for k in METRICS}, hist
    # the final last.pt still lists the last epoch's metrics (written before they were
    # sent); the next start finds them logged already, sends nothing and clears the list
    assert torch.load(ckpt / "last.pt", weights_only=True)["epoch"] == MAX_EPOCHS
    _run(uri, ckpt)
    assert _histories(uri) == hist
    assert torch.load(ckpt / "last.pt", weights_only=True)["mlflow_pending"] == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(tmp_path: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:port in its own process group (its workers too)."""
    exe = Path(sys.executable).parent / "mlflow"
    proc = subprocess.Popen(
        [str(exe), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", str(tmp_path / "artifacts"), "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            _kill_server(proc)
            pytest.fail("the mlflow server did not start within 120 s")
        time.sleep(0.5)


def _kill_server(proc: subprocess.Popen | None) -> None:
    """SIGKILL the server's process group (the server and the workers it started)."""
    if proc is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        pass


@pytest.mark.slow
def test_training_survives_a_tracking_server_killed_mid_run(tmp_path, caplog):
    """The server dies after epoch 1: training goes on at full speed, warns once, and the
    next start (the server back) sends what the final last.pt kept: every epoch once."""
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    ckpt = tmp_path / "models"
    server = _start_server(tmp_path, port)
    try:
        run = _run(uri, ckpt, retry_interval_s=30.0)
        trainer = _training(ckpt, run)
        from ignite.engine import Events

        epoch_times: list[float] = []

        @trainer.on(Events.EPOCH_COMPLETED)
        def _kill(engine):
            epoch_times.append(time.monotonic())
            if engine.state.epoch == 1:
                _kill_server(server)

        with caplog.at_level(logging.WARNING, logger="sam3d.engine"):
            trainer.run()  # must not raise
        assert trainer.state.epoch == MAX_EPOCHS
        assert max(b - a for a, b in zip(epoch_times, epoch_times[1:])) < 60.0
        failures = [r for r in caplog.records if "training goes on" in r.getMessage()]
        assert len(failures) == 1, [r.getMessage() for r in caplog.records]
        left = torch.load(ckpt / "last.pt", weights_only=True)["mlflow_pending"]
        assert {m["step"] for m in left} == {2, 3}

        server = _start_server(tmp_path, port)  # back, on the same store
        _run(uri, ckpt)  # the next start of the bundle sends them
        hist = _histories(uri)
        assert _steps(hist) == {k: [1, 2, 3] for k in METRICS}, hist
        assert torch.load(ckpt / "last.pt", weights_only=True)["mlflow_pending"] == []
        _run(uri, ckpt)  # and only once
        assert _steps(_histories(uri)) == {k: [1, 2, 3] for k in METRICS}
    finally:
        _kill_server(server)


def test_metrics_wait_while_the_store_fails_and_go_out_once_it_answers(tmp_path, monkeypatch):
    """Bounded: while offline nothing is tried; the first success sends everything once."""
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    run = MLflowRun(tracking_uri=uri, experiment_name="hardening", retry_interval_s=3600)
    run.check()
    calls = {"n": 0}
    real = run.client.log_batch

    def failing(*a, **k):
        calls["n"] += 1
        raise ConnectionError("server gone")

    monkeypatch.setattr(run.client, "log_batch", failing)
    run.record({"train_loss": 1.0}, 1)
    run.record({"train_loss": 0.5}, 2)  # offline: not tried again
    assert calls["n"] == 1 and run.offline and len(run.pending) == 2
    monkeypatch.setattr(run.client, "log_batch", real)
    assert run.flush(force=True) and run.pending == []
    hist = run.client.get_metric_history(run.run_id, "train_loss")
    assert sorted((m.step, m.value) for m in hist) == [(1, 1.0), (2, 0.5)]


def _status(uri: str, run_id: str) -> str:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri).get_run(run_id).info.status


def test_a_signal_marks_the_run_killed_and_then_does_what_it_did(tmp_path):
    import signal

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        run = _run(uri, tmp_path)
        run_id = run.run_id  # created: the handler is installed
        os.kill(os.getpid(), signal.SIGTERM)
        assert _status(uri, run_id) == "KILLED"
        assert seen == [signal.SIGTERM]  # the previous handler still ran
        assert signal.getsignal(signal.SIGTERM) is not run._on_signal
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_next_start_settles_a_run_left_running(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    for epoch, expected in ((MAX_EPOCHS, "FINISHED"), (1, "KILLED")):
        run = _run(uri, tmp_path)
        run_id = run.run_id
        run.release_signals()
        assert client.get_run(run_id).info.status == "RUNNING"
        # the training stopped (finished, or part-way and now replaced) with the run open
        state = {"epoch": epoch, "max_epochs": MAX_EPOCHS, "mlflow_run_id": run_id}
        torch.save(state, tmp_path / "last.pt")
        again = MLflowRun(
            tracking_uri=uri, experiment_name="hardening", resume_file=tmp_path / "last.pt",
            max_epochs=epoch if expected == "KILLED" else MAX_EPOCHS,
        ).check()  # fmt: skip
        assert client.get_run(run_id).info.status == expected
        again.release_signals()
        (tmp_path / "last.pt").unlink()


def test_runs_get_names_that_say_what_ran():
    import re

    from sam3d.engine.tracking import run_name

    assert re.fullmatch(r"echo-train-tiny-\d{8}-\d{6}", run_name("echo", "train", "tiny"))
    name = run_name("retina", "evaluate", {"sam": "vit_b", "image_size": 1024})
    assert name.startswith("retina-evaluate-vit_b-1024-")
    assert MLflowRun(enabled=False, experiment_name="sam3d_echo").run_name.startswith("sam3d_echo-")
