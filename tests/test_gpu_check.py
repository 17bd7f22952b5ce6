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
