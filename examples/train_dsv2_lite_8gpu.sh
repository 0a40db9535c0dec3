#!/usr/bin/env bash
# DeepSeek-V2-Lite (15.7B total, 2.4B activated; 64 routed experts top-6, 2 shared) on one node of 8 GPUs:
# expert parallel 8 (8 experts per GPU), data parallel 8 with the distributed optimizer (ZeRO-1), no TP/PP.
#   DATA=/data/my_text_document TOKENIZER=/models/DeepSeek-V2-Lite examples/train_dsv2_lite_8gpu.sh
# Start from the published weights with LOAD_HF=/models/DeepSeek-V2-Lite (converted on load).
# Prepare data with: python tools/preprocess_data.py --input corpus.jsonl --output-prefix /data/my \
#                        --tokenizer /models/DeepSeek-V2-Lite --workers 32
set -euo pipefail
# DRY_RUN=1: print the resolved configuration and the per-GPU memory estimate (against GPU, default H100),
# then stop; needs no DATA or TOKENIZER
if [ -z "${DRY_RUN:-}" ]; then
  : "${DATA:?set DATA to an indexed-dataset prefix (tools/preprocess_data.py)}"
  : "${TOKENIZER:?set TOKENIZER to a directory holding tokenizer.json}"
fi
DATA="${DATA:-unset-DATA}" TOKENIZER="${TOKENIZER:-unset-TOKENIZER}"
NGPU="${NGPU:-8}"
GPU="${GPU:-H100}"
CKPT="${CKPT:-checkpoints/dsv2-lite}"
FLAGS=(
  --preset dsv2-lite --bf16
  --expert-model-parallel-size 8
  --seq-length 4096 --micro-batch-size 1 --global-batch-size 512
  --train-iters 20000 --lr 4.2e-4 --min-lr 4.2e-5 --lr-warmup-iters 2000 --lr-decay-style cosine
  --weight-decay 0.1 --clip-grad 1.0
  --data-path "$DATA" --tokenizer "$TOKENIZER" --split 99,1,0
  --save "$CKPT" --load "$CKPT" --save-interval 1000 --eval-interval 1000 --eval-iters 10
  --log-interval 10 --tensorboard-dir "$CKPT/tensorboard"
  ${LOAD_HF:+--load-hf "$LOAD_HF"}
  "$@"
)
python -m megatron_dsv3.training.memory "${FLAGS[@]}" --world-size "$NGPU" --gpu "$GPU"
[ -n "${DRY_RUN:-}" ] && { echo "DRY_RUN: not launching"; exit 0; }
export CUDA_DEVICE_MAX_CONNECTIONS=1
exec torchrun --standalone --nproc_per_node "$NGPU" -m megatron_dsv3.train "${FLAGS[@]}"
