#!/usr/bin/env bash
# The device check of the GPU path (bench/gpu_check.py's docstring says what each step measures).
#   bash bench/gpu_check.sh [OUT]           one H100/H200, no internet, no vLLM: ~8 minutes
#   bash bench/gpu_check.sh OUT --smoke     the same steps on CPU with tiny sizes (tests/test_bench.py)
# Needs torch, transformers, tokenizers and bm25s (requirements.txt); prints OUT/report.json at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/gpu_check}
SMOKE=${2:-}
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ "$SMOKE" = "--smoke" ]; then
    SIZES=(--sft-steps 3 --sft-batch 4 --prompts-per-step 2 --group-size 2 --max-new-tokens 16)
    T=2048; STEP=(--tiny --batch 2 --seq 256 --prompt 64 --steps 1 --warmup 1 --peak-tflops 1.0)
else
    SIZES=(--sft-steps 20 --sft-batch 32 --prompts-per-step 16 --group-size 8 --max-new-tokens 256)
    T=32768; STEP=()
fi
rm -rf "$OUT" && mkdir -p "$OUT"
$PY bench/gpu_check.py prepare --out "$OUT" $SMOKE
RUN=(-m torch.distributed.run --nproc_per_node=1 --master_port=29541 train.py --model "$OUT/model"
     --data "$OUT/train.jsonl" --sft-data "$OUT/sft.jsonl" --retriever "bm25:$OUT/corpus.jsonl" --topk 1
     --reward outcome --kl-beta 0.001 --engine hf --max-turns 2 --max-context 2048 --grpo-steps 4
     --save-every 1 --keep-zero-adv --out "$OUT/run" "${SIZES[@]}")
$PY "${RUN[@]}" --stop-after 2 2>&1 | tee "$OUT/train_1.log"
$PY "${RUN[@]}" --resume 2>&1 | tee "$OUT/train_2.log"
$PY bench/gpu_check.py logprobs --out "$OUT" --tokens $T $SMOKE
$PY bench/bench_train_step.py "${STEP[@]}" --json "$OUT/train_step.json"
$PY bench/gpu_check.py report --out "$OUT"
