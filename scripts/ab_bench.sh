#!/usr/bin/env bash
# Same-machine A/B of kernel sources: build ep_train._C as the tree is (A) and run a command, then
# rebuild with each FILE replaced by its ALT (B) and run it again; the files are restored at the end,
# but ep_train._C stays B's build: rebuild (python setup.py build_ext --inplace) before other runs.
# For drift between the two builds, run the pair twice in the order A B B A by hand.
# Both runs print into $OUT (or ./gpu_logs) as ab_A.log and ab_B.log.
# Usage: bash scripts/ab_bench.sh FILE ALT [FILE ALT ...] -- COMMAND...
#   e.g. bash scripts/ab_bench.sh ep_train/csrc/kernels/low_latency.cu /tmp/old.cu -- \
#            python benchmarks/bench_low_latency.py --tokens 1 128
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_logs}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-16}" EP_TRAIN_QUIET=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
files=() alts=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    [ $# -ge 2 ] || { echo "ab_bench: FILE without ALT: $1" >&2; exit 2; }
    [ -f "$1" ] && [ -f "$2" ] || { echo "ab_bench: no such file: $1 or $2" >&2; exit 2; }
    files+=("$1") alts+=("$2")
    shift 2
done
[ "${1:-}" = "--" ] && [ $# -ge 2 ] && [ ${#files[@]} -gt 0 ] || {
    echo "usage: bash scripts/ab_bench.sh FILE ALT [FILE ALT ...] -- COMMAND..." >&2
    exit 2
}
shift
backup="$(mktemp -d)"
restore() { for i in "${!files[@]}"; do cp "$backup/$i" "${files[$i]}"; done; }
for i in "${!files[@]}"; do cp "${files[$i]}" "$backup/$i"; done
trap restore EXIT
build() { python setup.py build_ext --inplace >>"$OUT/ab_build.log" 2>&1 || { tail -30 "$OUT/ab_build.log"; exit 1; }; }
build
echo "== A (tree as it is)"
"$@" 2>&1 | tee "$OUT/ab_A.log"
for i in "${!files[@]}"; do cp "${alts[$i]}" "${files[$i]}"; done
build
echo "== B (${alts[*]})"
"$@" 2>&1 | tee "$OUT/ab_B.log"
