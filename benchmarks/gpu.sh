#!/usr/bin/env bash
# The GPU tier of the tests and the GPU benchmarks, in one go, on a machine with CUDA, torch and
# Triton already installed (their versions are the machine's: hosl is built without build isolation):
#
#     bash benchmarks/gpu.sh OUTDIR 2>&1 | tee OUTDIR/gpu.log
#
# Writes into OUTDIR what the Triton kernels compile to (inspect_kernels.jsonl), the records of
# bench_noise on CUDA and of bench_memory on CUDA (OPT-125M and OPT-1.3B shapes, with their plots). Each step is bounded by a timeout and a failing step does not
# stop the next; the exit status is the number of failed steps.
set -uo pipefail
out="$(realpath -m "${1:?usage: bash benchmarks/gpu.sh OUTDIR}")"
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
py="${PYTHON:-python3}"
failed=0
step() {
    echo "=== $1 ($(date -u +%T))"
    shift
    "$@" || { echo "=== FAILED (exit $?): $*"; failed=$((failed + 1)); }
}

step "build hosl" "$py" -m pip install -q --no-build-isolation --no-deps .
step "the machine" nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
step "what hosl can do here" bash -c "cd / && $py -m hosl"
step "the compiled kernels (sm_90)" bash -c "$py benchmarks/inspect_kernels.py --json > '$out/inspect_kernels.jsonl'"
step "tests marked gpu" timeout 300 "$py" -m pytest -q -m gpu -p no:cacheprovider tests
step "bench_noise on CUDA" timeout 200 "$py" benchmarks/bench_noise.py --device cuda --out "$out"
step "bench_memory OPT-125M on CUDA" timeout 300 "$py" benchmarks/bench_memory.py --device cuda --jobs 6 \
    --out "$out" --work /tmp/hosl_bench_memory
step "bench_memory OPT-1.3B on CUDA" timeout 400 "$py" benchmarks/bench_memory.py --device cuda --jobs 4 \
    --model opt-1.3b --out "$out" --work /tmp/hosl_bench_memory
echo "=== done ($(date -u +%T)): $failed failed"
exit "$failed"
