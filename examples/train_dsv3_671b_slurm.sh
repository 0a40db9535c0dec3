#!/usr/bin/env bash
#SBATCH --job-name=dsv3-671b
#SBATCH --nodes=256
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=128
#SBATCH --exclusive
#
# DeepSeek-V3 671B as the paper trained it (sections 3.1-3.2, 4.2): 2048 GPUs = 256 nodes x 8,
# PP 16 (61 layers as 3 + 14x4 + 2: the first stage carries the embedding, the last the head and the MTP
# module), EP 64 across 8 nodes (4 routed experts per GPU), ZeRO-1 data parallel 128 (distributed optimizer),
# no tensor parallelism. Memory settings from section 3.2.2: recompute RMSNorm + MLA up-projections
# (--recompute-mla-up-proj --recompute-norms, both on in the preset too); the MTP module and the main head
# share one pipeline stage (the last);
# Adam moments in BF16 (the estimate below counts them so; megatron-core needs TE's FusedAdam for it).
# Schedule of section 4.2 (steps computed by megatron_dsv3.training.schedules.paper_schedule):
# batch 3072 -> 15360 over 469B tokens, LR warmup 2K steps to 2.2e-4, constant to 10T tokens, cosine to
# 2.2e-5 over 4.3T, 2.2e-5 for 333B, 7.3e-6 for the last 167B; bias gamma 0.001 then 0 for the last 500B;
# MTP lambda 0.3 then 0.1 after 10T; AdamW(0.9, 0.95), weight decay 0.1, clip 1.0; 4K context, plain RoPE
# (YaRN comes with the long-context phases, docs/long_context.md).
# Not yet wired into this trainer: DualPipe (megatron-core's 1F1B runs instead) and FP8 (add --fp8 once
# the FP8 code lands); EMA of the weights on CPU is not implemented.
#
#   DATA="0.7 /data/web_text_document 0.3 /data/code_text_document" TOKENIZER=/models/DeepSeek-V3 \
#     sbatch examples/train_dsv3_671b_slurm.sh
#
# NCCL environment (InfiniBand + NVLink clusters; adjust the interface names to yours):
#   NCCL_IB_HCA          the IB HCAs NCCL may use (e.g. mlx5_0,mlx5_1,...); NCCL_IB_GID_INDEX=3 on RoCE
#   NCCL_SOCKET_IFNAME   the interface for NCCL's bootstrap (e.g. bond0 / eth0), not docker/lo
#   NCCL_IB_TIMEOUT=22, NCCL_IB_RETRY_CNT=7   survive transient link errors on long runs
#   NCCL_NVLS_ENABLE=0   NVLink SHARP (multicast) off: buffers it needs are large and it is not required
#   NCCL_P2P_LEVEL=NVL   intra-node traffic over NVLink
#   NCCL_ASYNC_ERROR_HANDLING / TORCH_NCCL_ASYNC_ERROR_HANDLING=1   fail fast instead of hanging on a dead rank
#   CUDA_DEVICE_MAX_CONNECTIONS=1   megatron-core's comm/compute overlap ordering
#   NCCL_DEBUG=WARN (INFO once to see the chosen transports)
set -euo pipefail
# DRY_RUN=1: print the resolved configuration and the per-GPU memory estimate (against GPU, default H800),
# then stop; needs no DATA, TOKENIZER or Slurm variables (256 nodes assumed outside a job)
if [ -z "${DRY_RUN:-}" ]; then
  : "${DATA:?set DATA to indexed-dataset prefixes, optionally weighted}"
  : "${TOKENIZER:?set TOKENIZER to the DeepSeek-V3 tokenizer directory}"
fi
DATA="${DATA:-unset-DATA}" TOKENIZER="${TOKENIZER:-unset-TOKENIZER}"
NODES="${SLURM_JOB_NUM_NODES:-256}"
GPU="${GPU:-H800}"
CKPT="${CKPT:-/checkpoints/dsv3-671b}"

export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}" NCCL_IB_RETRY_CNT="${NCCL_IB_RETRY_CNT:-7}"
export NCCL_NVLS_ENABLE=0 NCCL_P2P_LEVEL=NVL TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export CUDA_DEVICE_MAX_CONNECTIONS=1
export NCCL_SOCKET_IFNAME="${NCCL_SOCKET_IFNAME:-^lo,docker}"

read -r ITERS HOLD DECAY TAIL RAMP < <(python - <<'PY'
from megatron_dsv3.training.schedules import paper_schedule
s = paper_schedule(4096)
tail = ",".join(f"{a}:{b}" for a, b in s["tail"])
print(s["train_iters"], s["hold"], s["decay"], tail, " ".join(map(str, s["rampup"])))
PY
)
FLAGS=(
  --preset dsv3-671b --bf16 --no-yarn
  --pipeline-model-parallel-size 16 --decoder-first-pipeline-num-layers 3 --decoder-last-pipeline-num-layers 2
  --expert-model-parallel-size 64 --tensor-model-parallel-size 1
  --recompute-mla-up-proj --recompute-norms
  --seq-length 4096 --micro-batch-size 1 --global-batch-size 15360 --rampup-batch-size $RAMP
  --train-iters "$ITERS" --lr 2.2e-4 --min-lr 2.2e-5 --lr-warmup-iters 2000 --lr-hold-iters "$HOLD"
  --lr-decay-iters "$DECAY" --lr-decay-style cosine --lr-tail "$TAIL"
  --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --adam-moments-dtype bf16
  --bias-update-rate 0:0.001,14.3e12:0 --mtp-loss-weight 0:0.3,10e12:0.1 --seq-aux-loss-coeff 0.0001
  --data-path $DATA --tokenizer "$TOKENIZER" --split 999,1,0
  --save "$CKPT" --load "$CKPT" --save-interval 500 --eval-interval 1000 --eval-iters 8
  --log-interval 1 --tensorboard-dir "$CKPT/tensorboard" --overlap-grad-reduce
  "$@"
)
python -m megatron_dsv3.training.memory "${FLAGS[@]}" --world-size $((NODES * 8)) --gpu "$GPU"
echo "schedule: $ITERS steps, hold $HOLD, decay $DECAY, tail $TAIL, ramp-up $RAMP"

[ -n "${DRY_RUN:-}" ] && { echo "DRY_RUN: not launching"; exit 0; }
MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
srun --kill-on-bad-exit=1 torchrun --nnodes "$NODES" --nproc_per_node 8 \
  --rdzv_id "$SLURM_JOB_ID" --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:29500" \
  -m megatron_dsv3.train "${FLAGS[@]}"
