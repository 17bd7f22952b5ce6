#!/usr/bin/env bash
# Every CUDA-only test and every GPU benchmark in one call, figures in one JSON file.
#
#   bash scripts/gpu_check.sh [OUT_DIR]              # on a CUDA machine: < 8 minutes on one GPU
#   bash scripts/gpu_check.sh --cpu-smoke [OUT_DIR]  # tiny sizes on the CPU (the test suite)
#   bash scripts/gpu_check.sh --sammed3d-checkpoint sam_med3d_turbo.pth [OUT_DIR]
#
# --sammed3d-checkpoint PATH also scores a real SAM-Med3D checkpoint (official .pth or
# sam3d's format) with scripts/score_sammed3d.py: Dice after 1..5 iterative clicks on CT
# phantoms, click times. No weights can be downloaded by this project, so without the
# option the step is recorded as "skipped".
#
# Steps: the CUDA tests (pytest -k cuda: every test that needs a GPU has "cuda" in its name
# and skips without one), then scripts/bench_model.py, bench_inference.py, bench_metrics.py,
# bench_topolora.py, bench_train_phantoms.py (a short budget), each system's reference
# recipe through its bundle (recipe_kits / _retina / _echo / _prostate), bench_samus.py,
# bench_desam.py, bench_serve.py when they exist (a missing script is recorded as
# "missing", not an error). Each step has its own time limit; its exit code, seconds,
# JSON figures (scripts with --json / --out) and the tail of its output go into
# OUT_DIR/gpu_check.json (default outputs/gpu_check). The script exits non-zero when a step
# failed, after writing the JSON.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
SAMMED3D_CKPT=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cpu-smoke) MODE=cpu-smoke; shift ;;
        --sammed3d-checkpoint)
            SAMMED3D_CKPT="${2:-}"
            if [[ -z "$SAMMED3D_CKPT" || ! -f "$SAMMED3D_CKPT" ]]; then
                echo "gpu_check: --sammed3d-checkpoint: file not found: ${SAMMED3D_CKPT:-(none)}" >&2
                exit 2
            fi
            shift 2 ;;
        *) break ;;
    esac
done
OUT="${1:-outputs/gpu_check}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STEPS_FILE="$OUT/steps.tsv"
: >"$STEPS_FILE"

if [[ "$MODE" == gpu ]]; then
    if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        echo "gpu_check: no CUDA GPU here (use --cpu-smoke for the tiny CPU run)" >&2
        exit 2
    fi
fi

# run NAME LIMIT_S JSON_FILE CMD...: one step, recorded in steps.tsv
run() {
    local name="$1" limit="$2" json="$3"
    shift 3
    local log="$OUT/$name.log" t0 t1 rc
    echo "gpu_check: $name: $*"
    t0=$(date +%s%N)
    timeout "$limit" "$@" >"$log" 2>&1
    rc=$?
    t1=$(date +%s%N)
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( (t1 - t0) / 1000000 ))" "$json" "$log" "$*" \
        >>"$STEPS_FILE"
    echo "gpu_check: $name: exit $rc"
}

# optional NAME SCRIPT LIMIT_S ARGS...: a benchmark another change may not have landed yet
optional() {
    local name="$1" script="$2" limit="$3"
    shift 3
    if [[ -f "$script" ]]; then
        run "$name" "$limit" "" "$PY" "$script" "$@"
    else
        printf '%s\tmissing\t0\t\t\t%s\n' "$name" "$script" >>"$STEPS_FILE"
        echo "gpu_check: $name: $script not here, skipped"
    fi
}

if [[ "$MODE" == gpu ]]; then
    run cuda_tests 240 "" "$PY" -m pytest -q -k cuda tests
    run bench_model 120 "$OUT/bench_model.json" \
        "$PY" scripts/bench_model.py --device cuda --json "$OUT/bench_model.json"
    run bench_inference 90 "" "$PY" scripts/bench_inference.py --device cuda
    run bench_metrics 60 "" "$PY" scripts/bench_metrics.py --device cuda
    run bench_topolora 90 "$OUT/bench_topolora.json" \
        "$PY" scripts/bench_topolora.py --device cuda --json "$OUT/bench_topolora.json"
    run bench_train_phantoms 150 "$OUT/train_phantoms/results_vit_b_cuda.json" \
        "$PY" scripts/bench_train_phantoms.py --device cuda --preset vit_b --budget-s 30 \
        --checkpoints-s 10 20 30 --n-cases 12 --out "$OUT/train_phantoms"
    optional bench_samus scripts/bench_samus.py 60 --device cuda
    optional bench_desam scripts/bench_desam.py 60 memory --device cuda
    optional bench_serve scripts/bench_serve.py 60 --device cuda --max-seconds 40
    # each system's seed setting through its bundle with the REFERENCE recipe
    # (bundles/<name>/reference.json, docs/REFERENCES.md section 7) at the real input
    # sizes, then our default with the same seed and budget (scripts/bench_recipes.py);
    # SAM weights from $SAM_VIT_B when set (random otherwise)
    SAM_ARGS=()
    [[ -n "${SAM_VIT_B:-}" ]] && SAM_ARGS=(--sam-checkpoint "$SAM_VIT_B")
    run recipe_kits 120 "" "$PY" -m monai.bundle run \
        --config_file "['bundles/kits/train.json','bundles/kits/reference.json']" \
        --bundle_root "$OUT/recipe_kits" --preset vit_b --max_epochs 2 --phantom_cases 6 \
        --num_workers 2 --mlflow_enabled false --resume false \
        ${SAM_VIT_B:+--sam_checkpoint "$SAM_VIT_B"}
    run recipe_retina 120 "$OUT/recipe_retina.json" "$PY" scripts/bench_recipes.py \
        --bundle retina --recipes reference default --preset vit_b --image-size 1024 \
        --size 512 --cases 10 --epochs 2 --reference-scoring "${SAM_ARGS[@]}" \
        --json "$OUT/recipe_retina.json"
    run recipe_echo 120 "$OUT/recipe_echo.json" "$PY" scripts/bench_recipes.py \
        --bundle echo --recipes reference default --preset vit_b --size 256 --cases 20 \
        --epochs 3 "${SAM_ARGS[@]}" --json "$OUT/recipe_echo.json"
    run recipe_prostate 150 "$OUT/recipe_prostate.json" "$PY" scripts/bench_recipes.py \
        --bundle prostate --recipes reference default --preset vit_b --image-size 1024 \
        --size 256 --cases 3 --epochs 3 --eval-mode grid --reference-scoring "${SAM_ARGS[@]}" \
        --json "$OUT/recipe_prostate.json"
    # the CPU headline row of docs/BENCHMARKS.md (DeSAM cross-site), on the GPU (last:
    # the longest optional step; a run cut short loses only it)
    optional bench_desam_sites scripts/bench_desam.py 150 sites --device cuda --preset tiny \
        --size 128 --cases 6 --in-plane 64 --slices 8 --steps 2000 --batch 4 --grid 9 \
        --pdmm-width 256 --json "$OUT/bench_desam_sites.json"
    if [[ -n "$SAMMED3D_CKPT" ]]; then
        run score_sammed3d 240 "$OUT/score_sammed3d.json" "$PY" scripts/score_sammed3d.py \
            --checkpoint "$SAMMED3D_CKPT" --device cuda --cases 8 --clicks 5 \
            --json "$OUT/score_sammed3d.json"
    fi
else
    if [[ -n "$SAMMED3D_CKPT" ]]; then
        run score_sammed3d 300 "$OUT/score_sammed3d.json" "$PY" scripts/score_sammed3d.py \
            --checkpoint "$SAMMED3D_CKPT" --device cpu --cases 1 --clicks 2 \
            --json "$OUT/score_sammed3d.json"
    fi
    run cuda_tests 120 "" "$PY" -m pytest -q -k cuda tests/test_cldice.py
    # one torch thread: on a shared CPU several threads are much slower (oversubscription)
    run bench_model 300 "$OUT/bench_model.json" \
        "$PY" scripts/bench_model.py --device cpu --preset tiny --batch 1 --repeats 1 \
        --warmup 0 --no-reference --threads 1 --json "$OUT/bench_model.json"
    run bench_inference 300 "" "$PY" scripts/bench_inference.py --device cpu --preset tiny \
        --shape 40 40 24 --spacing 1.5 1.5 2.0 --further-clicks 1 --no-reference --threads 1
    run bench_metrics 120 "" "$PY" scripts/bench_metrics.py --device cpu --size 24 24 12 \
        --repeats 1 --skip-cldice --skip-monai
    run bench_topolora 300 "$OUT/bench_topolora.json" \
        "$PY" scripts/bench_topolora.py --device cpu --preset tiny --batch 1 --size 64 \
        --steps 1 --warmup 0 --only fused --json "$OUT/bench_topolora.json"
    run bench_train_phantoms 200 "$OUT/train_phantoms/results_tiny_cpu.json" \
        "$PY" scripts/bench_train_phantoms.py --device cpu --preset tiny --budget-s 4 \
        --checkpoints-s 2 4 --n-cases 5 --shape 40 40 24 --spacing 1.5 1.5 2.0 \
        --num-workers 0 --models sam3d unet_clicks --out "$OUT/train_phantoms"
    # the reference recipe's path through a bundle (tiny, random SAM, one epoch)
    run recipe_echo 300 "$OUT/recipe_echo.json" "$PY" scripts/bench_recipes.py \
        --bundle echo --recipes reference --preset tiny --size 64 --cases 5 --epochs 1 \
        --device cpu --json "$OUT/recipe_echo.json"
    for s in samus desam serve; do
        optional "bench_$s" "scripts/bench_$s.py" 60 --help
    done
fi

if [[ -z "$SAMMED3D_CKPT" ]]; then
    printf '%s\tskipped\t0\t\t\t%s\n' score_sammed3d "no --sammed3d-checkpoint given" >>"$STEPS_FILE"
fi

"$PY" - "$OUT" "$MODE" <<'EOF'
"""Collect the steps into one JSON file."""
import json, platform, sys
from pathlib import Path

out, mode = Path(sys.argv[1]), sys.argv[2]
try:
    import torch
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
except Exception as e:  # torch missing: still write what ran
    device = f"unknown ({e})"
steps, failed = {}, []
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, seconds, json_file, log, command = line.split("\t")
    step = {"command": command, "seconds": round(float(seconds) / 1000, 1)}
    if rc in ("missing", "skipped"):
        step["status"] = rc
    else:
        step["exit_code"] = int(rc)
        step["status"] = "ok" if rc == "0" else ("timeout" if rc == "124" else "failed")
        if rc != "0":
            failed.append(name)
        text = Path(log).read_text(errors="replace") if log and Path(log).is_file() else ""
        step["output_tail"] = text.splitlines()[-40:]
        if json_file and Path(json_file).is_file():
            step["figures"] = json.loads(Path(json_file).read_text())
    steps[name] = step
result = {"mode": mode, "device": device, "host": platform.node(), "steps": steps,
          "failed": failed}
(out / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
print(f"gpu_check: wrote {out / 'gpu_check.json'} ({len(steps)} steps, failed: {failed or 'none'})")
sys.exit(1 if failed else 0)
EOF
