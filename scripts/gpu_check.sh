#!/usr/bin/env bash
# The one script run on a GPU machine: build ep_train._C, run the GPU tests, run the benchmarks
# (permutation on one GPU; intranode and low-latency with two or more).  Logs go under $OUT (or
# ./gpu_logs).  compute-sanitizer runs separately: scripts/sanitize.sh.
# Usage: bash scripts/gpu_check.sh [--no-bench]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_logs}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
export MAX_JOBS="${MAX_JOBS:-16}" EP_TRAIN_QUIET=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
nvidia-smi topo -m >>"$OUT/gpu.txt" 2>&1
start=$(date +%s)
python setup.py build_ext --inplace 2>&1 | tee "$OUT/build.log" | grep -E "error|warning: |ptxas" | head -50
status=${PIPESTATUS[0]}
echo "build: exit $status after $(( $(date +%s) - start )) s"
[ "$status" -eq 0 ] || { tail -40 "$OUT/build.log"; exit 1; }
python -c "import ep_train._C as C; print('ep_train._C loaded', C.control_bytes())" || exit 1
timeout 900 python -m pytest -q tests/gpu ${PYTEST_ARGS:-} 2>&1 | tee "$OUT/tests.log" | tail -40
echo "tests: exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s"
if [ "${1:-}" != "--no-bench" ]; then
    timeout 60 python benchmarks/bench_permute.py 2>&1 | tee "$OUT/bench_permute.log" | tail -6
    if [ "$(python -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
        timeout 150 python benchmarks/bench_intranode.py 2>&1 | tee "$OUT/bench.log" | tail -30
        echo "bench: exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s"
        timeout 120 python benchmarks/bench_low_latency.py 2>&1 | tee "$OUT/bench_low_latency.log" | grep -v -i warn | tail -50
        echo "bench_low_latency: exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s"
        # The same kernels on CUDA IPC memory instead of NVSHMEM's (same machine, same run).
        EP_TRAIN_LL_TRANSPORT=ipc timeout 60 python benchmarks/bench_low_latency.py --tokens 128 1 2>&1 \
            | tee "$OUT/bench_low_latency_ipc.log" | grep -v -i warn | tail -28
    fi
fi
