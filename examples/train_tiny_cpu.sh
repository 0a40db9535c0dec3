#!/usr/bin/env bash
# The tiny preset (every feature on: MLA+YaRN, 1 dense + 2 MoE layers with groups, a shared expert,
# aux-loss-free balancing, MTP) on one CPU process with the built-in corpus (Python standard-library
# docstrings, built on first use). ~5 minutes on 2 cores. Extra flags are passed through, e.g.
#   examples/train_tiny_cpu.sh --train-iters 600 --tensorboard-dir runs/tiny --save ckpt/tiny --save-interval 100
set -euo pipefail
# DRY_RUN=1: print the resolved configuration and the memory estimate, do not launch
export TORCHDYNAMO_DISABLE=1          # megatron-core's torch.compile-wrapped helpers cost more than they save on CPU
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
FLAGS=(--preset tiny --cpu "$@")
python -m megatron_dsv3.training.memory "${FLAGS[@]}" --fp32 --micro-batch-size 8
[ -n "${DRY_RUN:-}" ] && { echo "DRY_RUN: not launching"; exit 0; }
exec python -m megatron_dsv3.train "${FLAGS[@]}"
