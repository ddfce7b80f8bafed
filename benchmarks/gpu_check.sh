#!/usr/bin/env bash
# The CUDA checks of fit3d_hf in one script, within 8 minutes on one GPU:
#   1. gsplat importable with its CUDA kernels: installed from a local wheel when the machine has
#      no network (GSPLAT_WHEEL_DIR, default shared/wheels), else from PyPI (gsplat 1.5.x);
#   2. the `cuda`-marked tests (gsplat parity with the torch rasterizer, ...);
#   3. lifting it/s with gsplat on a ScanNet++-sized procedural room (876x584, D = 64, 100k+
#      Gaussians), and the torch backend on the CPU at the demo's size for comparison;
#   4. one bf16 fine-tuning step of ViT-S/14 at 574x868 (benchmarks/finetune_step.py).
# Every step has its own time limit; the log and the numbers go to $OUT (default
# benchmarks/results/gpu_check), the numbers also to stdout. Without a GPU the CUDA steps are
# skipped with a message and the CPU parts run at a small size, so the script can be tried anywhere.
#
#   bash benchmarks/gpu_check.sh                  # from the repository root
#   GSPLAT_WHEEL_DIR=/wheels PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
OUT="${OUT:-benchmarks/results/gpu_check}"
WHEELS="${GSPLAT_WHEEL_DIR:-shared/wheels}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
started=$(date +%s)
failed=0

say() { echo "$*" | tee -a "$LOG"; }
# step NAME SECONDS COMMAND...: run with a time limit, log everything, remember failures.
step() {
    local name="$1" limit="$2"
    shift 2
    say ""
    say "== $name (limit ${limit}s, $(($(date +%s) - started))s elapsed)"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ]; then
        say "!! $name: exit status $rc$([ "$rc" -eq 124 ] && echo ' (time limit)')"
        failed=1
    fi
    return 0
}

say "fit3d_hf GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
say "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'); $(nproc) cores; load $(cut -d' ' -f1-3 /proc/loadavg)"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())" 2>&1 | tee -a "$LOG"
if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    GPU=1
else
    GPU=0
    say "no CUDA device: the CUDA steps are skipped; the CPU parts run at a small size"
fi

# 1. gsplat with CUDA kernels (the PyPI package compiles them on first use: nvcc and ninja needed).
if ! "$PYTHON" -c "import gsplat" 2>/dev/null; then
    if ls "$WHEELS"/gsplat-*.whl >/dev/null 2>&1; then
        step "install gsplat from $WHEELS" 300 "$PYTHON" -m pip install --no-index --find-links "$WHEELS" "gsplat>=1.5,<1.6"
    elif timeout 10 "$PYTHON" -m pip download --no-deps -q -d /tmp/fit3d-pip-probe "gsplat>=1.5,<1.6" >/dev/null 2>&1; then
        step "install gsplat from PyPI" 300 "$PYTHON" -m pip install "gsplat>=1.5,<1.6"
    else
        say "!! gsplat is not installed, there is no wheel in $WHEELS and no network: set GSPLAT_WHEEL_DIR"
        failed=1
    fi
fi
if [ "$GPU" = 1 ]; then
    step "gsplat CUDA kernels" 240 "$PYTHON" -c "
import torch, gsplat
from gsplat.cuda._backend import _C
print('gsplat', gsplat.__version__, 'kernels', 'loaded' if _C is not None else 'MISSING')
assert _C is not None"
fi

# 2. The cuda-marked tests (they skip themselves without a GPU).
if [ "$GPU" = 1 ]; then
    step "pytest -m cuda" 180 "$PYTHON" -m pytest -m cuda -q -rs -p no:cacheprovider tests
fi

# 3. Lifting speed: gsplat on a ScanNet++-sized room, the torch backend on the CPU at the demo's size.
if [ "$GPU" = 1 ]; then
    step "lift, gsplat, 876x584, 100k+ Gaussians" 200 "$PYTHON" benchmarks/lift_speed.py --device cuda --backend gsplat \
        --height 584 --width 876 --views 16 --init_points 120000 --max_gaussians 200000 --steps 300 \
        --json "$OUT/lift_gsplat.json"
fi
cpu_steps=$([ "$GPU" = 1 ] && echo 100 || echo 20)
step "lift, torch backend on the CPU, 160x120, 8k Gaussians" 120 "$PYTHON" benchmarks/lift_speed.py --device cpu \
    --backend torch --steps "$cpu_steps" --json "$OUT/lift_cpu.json"

# 4. One bf16 fine-tuning step of ViT-S/14 at 574x868 (medians of 3 after 2 warm-up steps).
if [ "$GPU" = 1 ]; then
    step "fine-tuning step, ViT-S/14, 574x868, bf16" 120 "$PYTHON" benchmarks/finetune_step.py --preset dinov2_small \
        --height 574 --width 868 --batch_size 2 --steps 3 --mixed_precision bf16
else
    step "fine-tuning step, ViT-S/14, 112x112 on the CPU (the CUDA size is skipped)" 120 "$PYTHON" \
        benchmarks/finetune_step.py --preset dinov2_small --height 112 --width 112 --batch_size 1 --steps 1
fi

say ""
say "done in $(($(date +%s) - started))s; log: $LOG"
if [ "$failed" -ne 0 ]; then
    say "SOME STEPS FAILED (see above)"
    exit 1
fi
