"""scripts/gpu_check.sh on the CPU at tiny sizes (``--cpu-smoke``), so the one-call GPU
check cannot rot: every step runs, and its figures land in one JSON file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_smoke_writes_every_step_into_one_json(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--cpu-smoke", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert proc.returncode == 0, (proc.stdout[-3000:], report["failed"])
    steps = report["steps"]
    expected = {"cuda_tests", "bench_model", "bench_inference", "bench_metrics",
                "bench_topolora", "bench_train_phantoms", "recipe_echo"}  # fmt: skip
    assert expected <= set(steps) and report["mode"] == "cpu-smoke"
    assert all(steps[name]["status"] == "ok" for name in expected)
    # scripts that write JSON have their figures inside the one report
    assert steps["bench_model"]["figures"]
    curves = steps["bench_train_phantoms"]["figures"]["models"]
    assert set(curves) == {"sam3d", "unet_clicks"}
    assert [p["budget_s"] for p in curves["sam3d"]["curve"]] == [2.0, 4.0]
    # the reference recipe ran through the echo bundle and was scored
    assert [r["recipe"] for r in steps["recipe_echo"]["figures"]["rows"]] == ["reference"]
    # benchmarks of other changes are optional: present and run, or recorded as missing
    for name in ("bench_samus", "bench_desam", "bench_serve"):
        script = REPO / "scripts" / f"{name}.py"
        assert steps[name]["status"] == ("ok" if script.is_file() else "missing")


def test_gpu_check_refuses_to_run_the_gpu_mode_without_cuda(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr


def test_gpu_check_refuses_a_missing_sammed3d_checkpoint_before_any_step(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    missing = tmp_path / "sam_med3d_turbo.pth"
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--sammed3d-checkpoint", str(missing),
         str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and f"file not found: {missing}" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_gpu_check_scores_a_sammed3d_checkpoint_in_the_smoke_mode(tmp_path):
    """The --sammed3d-checkpoint step alone (the other steps stubbed): it runs
    scripts/score_sammed3d.py and its figures land in the one JSON."""
    from sam3d.data.pipelines import load_dataset_preset
    from sam3d.models.checkpoint import save_trained
    from sam3d.models.registry import build_model

    ckpt = save_trained(
        tmp_path / "sammed3d_tiny.pt", build_model("sammed3d", "tiny"),
        dataset=load_dataset_preset("sammed3d"),
    )  # fmt: skip
    script = (REPO / "scripts" / "gpu_check.sh").read_text()
    # keep only the option parsing, the sammed3d step and the collector
    start = script.index("    run cuda_tests 120")
    end = script.index('fi\n\nif [[ -z "$SAMMED3D_CKPT" ]]')
    stub = tmp_path / "gpu_check_sammed3d.sh"
    stub.write_text(
        (script[:start] + script[end:]).replace('cd "$(dirname "$0")/.."', f'cd "{REPO}"')
    )
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        ["bash", str(stub), "--cpu-smoke", "--sammed3d-checkpoint", str(ckpt),
         str(tmp_path / "out")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert proc.returncode == 0, (proc.stdout[-3000:], report["failed"])
    step = report["steps"]["score_sammed3d"]
    assert step["status"] == "ok"
    assert len(step["figures"]["mean_dice_per_click"]) == 2
