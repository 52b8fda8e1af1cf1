#!/usr/bin/env bash
# The GPU checks in one run, for a session lent a GPU machine (one command of at
# most 10 minutes; its image's python3 holds torch, safetensors, numpy, Pillow):
#   1. the CUDA tests (batched Karcher on the GPU against the CPU loop, kernels);
#   2. bench_merge on CUDA, unrelated then related sources: our svd and karcher
#      merges over the WHOLE LoRA in one call each (karcher batched by shape, the
#      default on CUDA) against the dense baselines, then every method per module.
# Issue 11's targets read from 2.: karcher ≤ 2× svd (unrelated), ≤ 1.5× (related).
#
#   bash bench/device_check.sh                 # on the GPU machine; logs under $OUT or ./device_check
#   DEVICE=cpu QUICK=1 bash bench/device_check.sh   # a smoke run of the script here (minutes)
# Each step has its own time limit, so one slow step still leaves the others' logs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
LOGS=${OUT:-device_check}
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1

$PY -c "import torch, sys; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda',
torch.cuda.is_available() and torch.cuda.get_device_name())" 2>&1 | tee "$LOGS/env.txt"

if [ -n "${QUICK:-}" ]; then
    sample=(--per-shape 1 --modules 2 --batch-modules 2)     # the script's plumbing, not figures
    full=()
else
    sample=(--per-shape 1 --batch-modules 16)   # the loop side of loop-vs-batched: 16 modules, not 64
    full=(--full svd karcher)                  # the whole-LoRA karcher is batched by 64 (run.KARCHER_BATCH)
fi

# limits: 90 + 300 + 170 s, inside a device call's 600 (run it with timeout_s ≈ 590)
timeout 90 $PY -m pytest -q -rs -p no:cacheprovider tests/test_karcher.py tests/test_kernel_matrix.py \
    -k "cuda or batched" 2>&1 | tee "$LOGS/tests.txt"

for kind in unrelated related; do
    extra=() limit=300
    [ "$kind" = related ] && extra=(--related 0.3) limit=170
    timeout "${BENCH_LIMIT:-$limit}" $PY bench/bench_merge.py --device "$DEVICE" --skip-kohya --skip-threads --skip-workers \
        "${sample[@]}" "${full[@]}" "${extra[@]}" 2>&1 | tee "$LOGS/bench_merge_$kind.txt"
    echo "bench_merge $kind: exit ${PIPESTATUS[0]}" | tee -a "$LOGS/status.txt"
done
