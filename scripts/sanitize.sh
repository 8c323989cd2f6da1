#!/usr/bin/env bash
# compute-sanitizer memcheck over ep_train's kernels on small cases (two or more GPUs): intranode
# dispatch/combine (BF16, FP8, top-k 3..9, hidden 2000/4096/7168, tiny rings, skewed and empty
# routing) and the low-latency kernels.  Only kernels whose name contains "ep_train" are checked, and
# only for memory errors (NCCL probes kernels it has no image for; those API errors are its own).
# Builds ep_train._C first when it is missing.  Logs under $OUT (or ./gpu_logs).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_logs}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export EP_TRAIN_QUIET=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python -c "import ep_train._C" 2>/dev/null || python setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || exit 1
compute-sanitizer --version | tail -1
timeout "${SANITIZE_TIMEOUT:-420}" compute-sanitizer --tool memcheck --target-processes all \
    --kernel-name kns=ep_train --report-api-errors no --error-exitcode 99 --print-limit 20 \
    python -m pytest -q -p no:cacheprovider \
    tests/gpu/test_intranode.py::test_small_cases tests/gpu/test_intranode.py::test_skewed_and_empty_ranks \
    tests/gpu/test_low_latency_gpu.py::test_dispatch_combine_match_torch 2>&1 | tee "$OUT/sanitize.log" | tail -30
echo "sanitize: exit ${PIPESTATUS[0]}"
