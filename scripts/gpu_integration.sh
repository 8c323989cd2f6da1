#!/usr/bin/env bash
# Framework runs on a GPU machine: install carried wheels (megatron-core, wandb, deepspeed) from
# .wheels/, build ep_train._C, run the Megatron GPU parity tests, the MoE-layer benchmark, a GPU
# training recipe with the deepep and alltoall dispatchers, and the DeepSpeed benchmark when present.
# Logs under $OUT (or ./gpu_logs).  Usage: bash scripts/gpu_integration.sh [megatron] [train] [deepspeed]
# (the parts to run; all three by default).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_logs}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-32}" EP_TRAIN_QUIET=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_SILENT=true
PARTS="${*:-megatron train deepspeed}"
want() { [[ " $PARTS " == *" $1 "* ]]; }
start=$(date +%s)
stamp() { echo "== $1 after $(( $(date +%s) - start )) s"; }
if [ -d .wheels ]; then
    python -m pip install -q --no-index --find-links .wheels "megatron-core==0.19.2" wandb 2>&1 | tail -3
    if ls .wheels/deepspeed-*.tar.gz >/dev/null 2>&1; then
        DS_BUILD_OPS=0 python -m pip install -q --no-index --find-links .wheels --no-build-isolation deepspeed 2>&1 | tail -3
    fi
fi
python -c "import megatron.core as m; print('megatron-core', m.__version__)"
stamp install
python setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
stamp build
if want megatron; then
    timeout 200 python -m pytest -q tests/gpu/test_megatron_gpu.py 2>&1 | tee "$OUT/megatron_tests.log" | tail -15
    stamp megatron-tests
    timeout 180 python benchmarks/bench_moe_layer.py --profile 10 2>&1 | tee "$OUT/bench_moe_layer.log" | tail -80
    stamp bench-moe-layer
    # With shared experts (DeepSeek-V3's 2048): each dispatcher overlaps them its own way.
    timeout 150 python benchmarks/bench_moe_layer.py --shared 2048 --chunks 2>&1 | tee "$OUT/bench_moe_layer_shared.log" | tail -8
    stamp bench-moe-layer-shared
fi
n=$(python -c "import torch; print(torch.cuda.device_count())")
want train && for d in deepep alltoall; do
    timeout 120 python -m ep_train.train --recipe recipes/mixtral_like_1node.yaml --set moe.dispatcher=$d \
        --set train.steps=8 --set launch.nproc=$n --set parallel.expert_model_parallel_size=$n \
        --set log.wandb_dir="$OUT/runs" --set log.wandb_mode=offline 2>&1 | grep -v -i warn | tee "$OUT/train_$d.log" | tail -14
    stamp "train-$d"
done
if want deepspeed && python -c "import deepspeed" 2>/dev/null; then
    export DS_ACCELERATOR=cuda
    timeout 240 python -m pytest -q -s tests/gpu/test_deepspeed_gpu.py 2>&1 | tee "$OUT/deepspeed_tests.log" | tail -12
    stamp deepspeed-tests
    timeout 300 python benchmarks/bench_deepspeed_moe.py --steps 8 --warmup 3 2>&1 | tee "$OUT/bench_deepspeed.log" | tail -12
    stamp bench-deepspeed
fi
