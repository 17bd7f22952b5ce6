"""The kits bundle end to end, as a user runs it: ``python -m monai.bundle run ...``.

Tiny preset, 4 small phantoms (2 train, 1 validation, 1 test), one iteration an epoch.
Trainings run in subprocesses (the user's command, SIGKILL, torchrun); the checks read
what they leave behind: checkpoints, the per-case CSV and the MLflow store or server.
"""

from __future__ import annotations

import json
import math
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

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "kits"
TRAIN = str(BUNDLE / "train.json")
PY = sys.executable
SMALL = "{'shape_vox': [48, 48, 32], 'spacing_mm': [1.5, 1.5, 2.0], 'n_lesions': 1}"
N_CASES = 4  # phantom split 2 / 1 / 1 -> one iteration an epoch at batch 2


def _tiny_args(bundle_root: Path, **extra: object) -> list[str]:
    args = {
        "bundle_root": str(bundle_root),
        "preset": "tiny",
        "num_workers": 0,
        "batch_size": 2,
        "phantom_cases": N_CASES,
        "phantom_kwargs": SMALL,
        **extra,
    }
    out: list[str] = []
    for k, v in args.items():
        out += [f"--{k}", str(v)]
    return out


def _bundle_cmd(bundle_root: Path, config: str = TRAIN, **extra: object) -> list[str]:
    return [
        PY,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        config,
        *_tiny_args(bundle_root, **extra),
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONWARNINGS"] = "ignore"
    return env


def _run(cmd: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def phantom_dir(tmp_path_factory) -> Path:
    from sam3d.data.phantoms import write_phantom_dataset

    out = tmp_path_factory.mktemp("kits_phantoms")
    write_phantom_dataset(
        "ct", out, n=N_CASES, seed=0, shape_vox=(48, 48, 32), spacing_mm=(1.5, 1.5, 2.0),
        n_lesions=1,
    )  # fmt: skip
    return out


def _adam_steps(optimizer_state: dict) -> set[int]:
    return {int(s["step"]) for s in optimizer_state["state"].values()}


@pytest.mark.slow
def test_user_command_generates_phantoms_trains_validates_and_resumes_after_sigkill(tmp_path):
    """The user's command (epochs/preset overridden) on auto-generated phantoms; SIGKILL; rerun."""
    from mlflow import MlflowClient

    from sam3d.models import load_sam3d_checkpoint

    root = tmp_path / "run"
    last = root / "models" / "last.pt"
    cmd = _bundle_cmd(root, max_epochs=2)
    first = subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + 300
        while not last.exists():
            assert first.poll() is None, first.stdout.read()[-4000:]
            assert time.time() < deadline, "no last.pt after 300 s"
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        log_first = first.stdout.read()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == -signal.SIGKILL
    assert "generating 4 synthetic CT phantoms" in log_first
    assert (root / "data" / "phantoms" / "dataset.json").is_file()

    killed = torch.load(last, map_location="cpu", weights_only=True)
    n_done = killed["epoch"]
    assert n_done == 1
    run_id = killed["mlflow_run_id"]
    assert run_id and _adam_steps(killed["optimizer"]) == {n_done}

    second = _run(cmd)
    log = second.stdout + second.stderr
    assert f"resume: continuing from {last} after epoch {n_done}" in log
    assert "generating" not in log  # the phantoms of the first run are reused

    final = torch.load(last, map_location="cpu", weights_only=True)
    assert final["epoch"] == 2 and final["iteration"] == 2
    assert final["mlflow_run_id"] == run_id
    # optimizer and scheduler continued (not restarted): 2 AdamW steps, 2 scheduler steps
    assert _adam_steps(final["optimizer"]) == {2}
    assert final["lr_scheduler"]["last_epoch"] == 2
    assert math.isclose(final["optimizer"]["param_groups"][0]["lr"], 4e-4 * 0.01, rel_tol=1e-6)

    model, meta = load_sam3d_checkpoint(root / "models" / "model.pt")
    assert model.crop_size == 32 and meta["crop_size"] == 32
    assert meta["dataset"]["name"] == "kits" and meta["epoch"] in (1, 2)
    assert (root / "eval" / "config_executed.json").is_file()
    executed = json.loads((root / "eval" / "config_executed.json").read_text())
    assert executed["preset"] == "tiny" and executed["max_epochs"] == 2

    # one MLflow run in the embedded SQLite store, continued across the kill
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'eval' / 'mlruns.db'}")
    exp = client.get_experiment_by_name("sam3d_kits")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["preset"] == "tiny" and run.data.params["crop_size"] == "32"
    for key in ("train_loss", "val_mean_dice", "val_nsd"):
        steps = {m.step for m in client.get_metric_history(run_id, key)}
        assert steps == {1, 2}, (key, steps)
    for m in client.get_metric_history(run_id, "val_nsd"):
        assert 0.0 <= m.value <= 1.0

    # evaluate.json scores the best checkpoint on the test split, one CSV row per case
    from monai.bundle import run

    run(
        config_file=[TRAIN, str(BUNDLE / "evaluate.json")], logging_file=False,
        bundle_root=str(root), num_workers=0,
    )  # fmt: skip
    spec = json.loads((root / "data" / "phantoms" / "dataset.json").read_text())
    rows = (root / "eval" / "metrics_test.csv").read_text().strip().splitlines()
    assert rows[0] == "case,dice,nsd"
    assert [r.split(",")[0] for r in rows[1:]] == [Path(e["image"]).name for e in spec["test"]]
    for r in rows[1:]:
        assert all(0.0 <= float(v) <= 1.0 for v in r.split(",")[1:])


@pytest.mark.slow
def test_training_logs_one_run_to_a_real_mlflow_server(tmp_path, phantom_dir):
    from mlflow import MlflowClient

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [str(Path(PY).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--default-artifact-root", str(tmp_path / "artifacts"), "--workers", "1"],
        cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, "mlflow server exited"
            assert time.time() < deadline, "mlflow server did not start in 120 s"
            time.sleep(0.5)
        root = tmp_path / "run"
        _run(_bundle_cmd(root, max_epochs=1, dataset_dir=phantom_dir, tracking_uri=uri))

        client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name("sam3d_kits")
        runs = client.search_runs([exp.experiment_id])
        assert len(runs) == 1
        run = runs[0]
        assert run.info.status == "FINISHED"
        assert run.info.run_name.startswith("tiny-kits-")
        params = run.data.params
        assert params["preset"] == "tiny"
        assert params["dataset_preset"] == "kits"
        assert params["dataset_dir"] == str(phantom_dir)
        assert float(params["learning_rate"]) == 4e-4
        assert params["crop_size"] == "32" and params["seed"] == "0"
        metrics = run.data.metrics
        assert set(metrics) >= {"train_loss", "val_mean_dice", "val_nsd"}
        assert 0.0 <= metrics["val_mean_dice"] <= 1.0 and 0.0 <= metrics["val_nsd"] <= 1.0
        names = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"model.pt", "config_executed.json"} <= names
        local = client.download_artifacts(run.info.run_id, "config_executed.json", str(tmp_path))
        assert json.loads(Path(local).read_text())["tracking_uri"] == uri
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_unreachable_tracking_server_fails_at_start_with_a_clear_message(tmp_path, phantom_dir):
    from monai.bundle import run

    port = _free_port()  # nothing listens there
    root = tmp_path / "run"
    start = time.time()
    with pytest.raises(SystemExit) as exc:
        run(
            config_file=TRAIN, bundle_root=str(root), preset="tiny",
            dataset_dir=str(tmp_path / "nothing_generated"),
            tracking_uri=f"http://127.0.0.1:{port}", logging_file=False,
        )  # fmt: skip
    assert exc.value.code == 2
    assert time.time() - start < 60
    assert not (tmp_path / "nothing_generated").exists()  # failed before any data work
    assert not (root / "models").exists()


@pytest.mark.slow
def test_torchrun_two_processes_gloo(tmp_path, phantom_dir):
    from mlflow import MlflowClient

    root = tmp_path / "run"
    configs = f"['{TRAIN}','{BUNDLE / 'multi_gpu_train.json'}']"
    cmd = [
        str(Path(PY).parent / "torchrun"), "--nproc_per_node", "2", "--master_port",
        str(_free_port()), "-m", "monai.bundle", "run", "--config_file", configs,
        *_tiny_args(root, max_epochs=1, dataset_dir=phantom_dir, batch_size=1),
    ]  # fmt: skip
    proc = _run(cmd)
    log = proc.stdout + proc.stderr
    state = torch.load(root / "models" / "last.pt", map_location="cpu", weights_only=True)
    # 2 training cases, 2 ranks, batch 1: one iteration an epoch on each rank
    assert state["epoch"] == 1 and state["iteration"] == 1
    assert (root / "models" / "model.pt").is_file()
    assert log.count("Metrics -- val_mean_dice") == 1  # only rank 0 reports
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'eval' / 'mlruns.db'}")
    exp = client.get_experiment_by_name("sam3d_kits")
    assert len(client.search_runs([exp.experiment_id])) == 1  # only rank 0 logs


def test_metadata_and_network_io_verify():
    from monai.bundle import verify_metadata, verify_net_in_out

    verify_metadata(
        meta_file=str(BUNDLE / "metadata.json"),
        filepath=str(BUNDLE / "schema" / "meta_schema.json"),
    )
    points = torch.tensor([[[15.5, 15.5, 15.5], [2.0, 3.0, 4.0]]])
    labels = torch.tensor([[1, 0]])
    # the tiny preset's crop; the metadata states vit_b's 128^3
    verify_net_in_out(
        net_id="network_def", meta_file=str(BUNDLE / "metadata.json"), config_file=TRAIN,
        device="cpu", extra_forward_args={"points": points, "point_labels": labels},
        **{"preset": "tiny", "_meta_#network_data_format#inputs#image#spatial_shape": [32] * 3},
    )  # fmt: skip
    # the image-only view for tools that call network(image)
    verify_net_in_out(
        net_id="network_io", meta_file=str(BUNDLE / "metadata.json"), config_file=TRAIN,
        device="cpu",
        **{"preset": "tiny", "_meta_#network_data_format#inputs#image#spatial_shape": [32] * 3},
    )  # fmt: skip


def test_metadata_verify_rejects_a_missing_key(tmp_path):
    from monai.bundle import verify_metadata

    meta = json.loads((BUNDLE / "metadata.json").read_text())
    del meta["network_data_format"]["outputs"]["pred"]["num_channels"]
    bad = tmp_path / "metadata.json"
    bad.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="num_channels"):
        verify_metadata(meta_file=str(bad), filepath=str(BUNDLE / "schema" / "meta_schema.json"))


@pytest.mark.slow
def test_demo_train_step_trains_the_bundle_into_the_demo_folder(tmp_path, phantom_dir):
    from sam3d.demo import DemoState, step_train
    from sam3d.models import load_sam3d_checkpoint

    state = DemoState(out=tmp_path)
    state.outputs["dataset_json"] = phantom_dir / "dataset.json"
    state.extras["train_epochs"] = 1
    step_train(state)
    checkpoint = tmp_path / "kits_bundle_run" / "models" / "model.pt"
    assert state.outputs["checkpoint"] == checkpoint
    model, meta = load_sam3d_checkpoint(checkpoint)
    assert model.preset["name"] == "tiny" and meta["epoch"] == 1
    assert (tmp_path / "kits_bundle_run" / "eval" / "mlruns.db").is_file()


def _missing_properties(workflow) -> list[str]:
    """Required workflow properties whose config id is absent (without initializing)."""
    return [
        name
        for name, prop in workflow.properties.items()
        if prop.get("required") and prop.get("id") and prop["id"] not in workflow.parser
    ]


def test_configs_define_monai_workflow_properties():
    from monai.bundle import ConfigWorkflow

    train = ConfigWorkflow(config_file=TRAIN, workflow_type="train", logging_file=False)
    assert _missing_properties(train) == []
    ids = {n: p["id"].replace("::", "#") for n, p in train.properties.items() if p.get("id")}
    assert ids["trainer"] == "train#trainer" and ids["train_dataset"] == "train#dataset"
    assert train.parser.get("train#trainer#max_epochs") == "@max_epochs"
    for optional in ("network_def", "evaluator", "val_interval", "val_handlers"):
        assert ids[optional] in train.parser, optional
    evaluate = ConfigWorkflow(
        config_file=[TRAIN, str(BUNDLE / "evaluate.json")], workflow_type="infer",
        logging_file=False,
    )  # fmt: skip
    assert _missing_properties(evaluate) == []
    multi = ConfigWorkflow(
        config_file=[TRAIN, str(BUNDLE / "multi_gpu_train.json")], workflow_type="train",
        logging_file=False,
    )  # fmt: skip
    assert _missing_properties(multi) == []
    assert multi.parser.get("train#dataloader#shuffle") is False
    assert multi.parser.get("train#dataloader#sampler") == "@train#sampler"
