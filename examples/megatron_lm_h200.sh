#!/usr/bin/env bash
# Megatron-LM's own pretrain_gpt.py with our model, flags and hooks, on one GPU:
#   python -m megatron_dsv3.megatron_lm --megatron-lm $MLM <pretrain_gpt.py flags> --dsv3-*
# 1. preprocesses the quick start's corpus (Python standard-library docstrings, byte tokens; no download) into
#    Megatron's indexed dataset with tools/preprocess_data.py;
# 2. trains ITERS iterations of a small MoE + MTP model (the tiny preset's features) with --save;
# 3. resumes from that checkpoint for MORE iterations;
# 4. prints the TensorBoard scalars (first / last value of each tag) and tokens/s from Megatron-LM's log.
# Results and the exact release: docs/megatron_lm.md.
#
#   examples/megatron_lm_h200.sh              # MEGATRON_LM_PATH (default ./.mlm) holds pretrain_gpt.py,
#                                             # gpt_builders.py and model_provider.py of Megatron-LM core_v0.19.0
# Where .whl/ holds the megatron-core wheel (the H200 machine), it is installed into /tmp/site first; the wheel
# ships megatron/training too, so only those three scripts come from the Megatron-LM checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MLM=${MEGATRON_LM_PATH:-$ROOT/.mlm}
RUN=${RUN_DIR:-/tmp/megatron_lm_run}
ITERS=${ITERS:-60}
MORE=${MORE:-10}
if [ -n "${DRY_RUN:-}" ]; then   # DRY_RUN=1: the model and its memory estimate, nothing launched (as every example)
  TORCHDYNAMO_DISABLE=1 python3 -m megatron_dsv3.training.memory --preset tiny --num-layers 4 --hidden-size 256 \
    --num-attention-heads 4 --seq-length 256 --micro-batch-size 8 --global-batch-size 32
  echo "DRY_RUN: not launching"; exit 0
fi
[ -f "$MLM/pretrain_gpt.py" ] || { echo "error: MEGATRON_LM_PATH ($MLM) holds no pretrain_gpt.py"; exit 2; }

if ls .whl/megatron_core-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$ROOT:$MLM${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$ROOT:$MLM${PYTHONPATH:+:$PYTHONPATH}
fi
export TORCHDYNAMO_DISABLE=1 PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore::UserWarning,ignore::SyntaxWarning}   # "no Transformer Engine / Apex" x 10
rm -rf "$RUN" && mkdir -p "$RUN/data"
python3 -c 'import torch, megatron.core as m; print(f"torch {torch.__version__}, megatron-core {m.__version__}, "
  f"GPU {torch.cuda.get_device_name() if torch.cuda.is_available() else None}")'
echo "Megatron-LM scripts: $MLM ($(head -c 300 "$MLM/RELEASE" 2>/dev/null || echo 'release not recorded'))"

echo "== --help lists the --dsv3-* flags"
python3 -m megatron_dsv3.megatron_lm --megatron-lm "$MLM" --help > "$RUN/help.txt"
grep -o -- '--dsv3-[a-z-]*' "$RUN/help.txt" | sort -u | tr '\n' ' '; echo

echo "== preprocess"
python3 tools/preprocess_data.py --input default --output-prefix "$RUN/data/docs" --workers 8 2>&1 | grep -v "it/s\]\|docs/s\]" || true

# the tiny preset's features (MLA, 8 routed + shared experts top-2, sigmoid router with expert bias, 1 MTP depth)
# at 4 layers x 256; byte tokens (vocab 262: eod 256, pad 257; Megatron pads it to 384)
ARGS=(
  --transformer-impl local --bf16
  --num-layers 4 --hidden-size 256 --num-attention-heads 4 --seq-length 256 --max-position-embeddings 256
  --untie-embeddings-and-output-weights --position-embedding-type none --normalization RMSNorm --swiglu
  --disable-bias-linear --num-experts 8 --no-gradient-accumulation-fusion
  --moe-router-load-balancing-type none   # our routers own the balance loss: no zero-valued megatron tag
  --micro-batch-size 8 --global-batch-size 32
  --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 5 --lr-decay-iters $((ITERS + MORE))
  --weight-decay 0.1 --clip-grad 1.0 --seed 1234
  --tokenizer-type NullTokenizer --vocab-size 262 --null-tokenizer-eod-id 256 --null-tokenizer-pad-id 257
  --data-path "$RUN/data/docs_text_document" --split 98,2,0
  --log-interval 5 --eval-interval 30 --eval-iters 2
  --save "$RUN/ckpt" --load "$RUN/ckpt" --save-interval 1000
  --tensorboard-dir "$RUN/tb" --log-timers-to-tensorboard
  --dsv3-preset tiny --dsv3-bias-update-rate 0:0.001 --dsv3-mtp-loss-weight 0:0.3
)
launch() {   # one process on GPU 0 (torchrun's environment, without torchrun)
  local name=$1 rc; shift
  set +eo pipefail
  RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=${MASTER_PORT:-29500} \
    python3 -m megatron_dsv3.megatron_lm --megatron-lm "$MLM" "${ARGS[@]}" "$@" 2>&1 | tee "$RUN/$name.log" \
    | grep --line-buffered -E "iteration +[0-9]+/|saving checkpoint|successfully saved|loading distributed|successfully loaded|validation loss|Error|error:"
  rc=${PIPESTATUS[0]}
  set -eo pipefail
  [ "$rc" = 0 ] || { echo "error: the $name run failed with status $rc (log: $RUN/$name.log)"; tail -40 "$RUN/$name.log"; exit 1; }
}
echo "== train $ITERS iterations, save"
launch train --train-iters "$ITERS"
echo "== resume from the checkpoint for $MORE more"
# the checkpoint's schedule (lr decay over ITERS + MORE, weight decay over the first run's samples): without this
# Megatron-LM refuses the load, as its weight-decay span follows --train-iters
launch resume --train-iters $((ITERS + MORE)) --use-checkpoint-opt_param-scheduler

echo "== TensorBoard and log"
python3 - "$RUN" "$ITERS" <<'EOF'
import glob, re, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
run, saved_at = sys.argv[1], int(sys.argv[2])
scalars = {}
for path in sorted(glob.glob(f"{run}/tb/events.out.tfevents.*")):
    ea = EventAccumulator(path, size_guidance={"scalars": 0})
    ea.Reload()
    for tag in ea.Tags()["scalars"]:
        scalars.setdefault(tag, []).extend((e.step, e.value) for e in ea.Scalars(tag))
ours = ("mtp", "moe/", "seq-wise", "expert bias")
print(f"{len(scalars)} scalar tags in {run}/tb")
for tag in sorted(scalars, key=lambda t: (not t.startswith(ours), t)):
    if "timer" in tag or tag.endswith(("vs samples", "vs tokens")) or "-time" in tag:
        continue
    pts = sorted(set(scalars[tag]))
    at_save = [p for p in pts if p[0] <= saved_at][-1:] if pts[-1][0] > saved_at else []
    print(f"  {tag:30s} n={len(pts):3d} " + "  ".join(f"step {s:3d}: {v:<10.6g}" for s, v in [pts[0]] + at_save + [pts[-1]]))
for name in ("train", "resume"):
    text = open(f"{run}/{name}.log").read()
    rows = re.findall(r"iteration\s+(\d+)/\s*\d+ .*?elapsed time per iteration \(ms\): ([\d.]+) .*?global batch size:\s+(\d+) .*?lm loss: ([\d.E+-]+)", text)
    seq = int(re.search(r"seq_length \.+ (\d+)", text).group(1))
    if rows:
        it, _, gbs, loss = rows[-1]
        steady = sorted(float(r[1]) for r in rows[2:] or rows)     # the first two intervals hold the warm-up
        ms = steady[len(steady) // 2]
        print(f"{name}: logged iterations {rows[0][0]}..{it}, lm loss {float(rows[0][3]):.4f} -> {float(loss):.4f}, "
              f"median {ms:.1f} ms/iteration (intervals from iteration {rows[min(2, len(rows) - 1)][0]}) = "
              f"{int(gbs) * seq / (ms / 1e3):,.0f} tokens/s ({gbs} x {seq} tokens/iteration)")
    for pat in (r"successfully saved checkpoint.*", r"successfully loaded checkpoint.*", r"could not find the metadata file.*"):
        for m in re.findall(pat, text):
            print(f"  {name}: {m.strip()}")
EOF
