"""Command-line flags of the trainer (Megatron-LM's names where Megatron-LM has the flag) and the
bridge flags -> DSV3Config.

Two groups:
* `add_model_args`: what selects and overrides the model (`--preset`, sizes, MTP/MoE/YaRN settings).
* `add_training_args`: parallelism, batch, schedule, data, checkpoints, logging. Megatron-LM defines
  these itself; `megatron_dsv3.megatron_lm.extra_args_provider` adds only the `--dsv3-*` flags.

Every flag defaults to None where the preset or `TRAIN_DEFAULTS` supplies the value, so that what
the user typed wins over the preset and the preset over the generic default.
"""
from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence, Tuple

from megatron_dsv3.config import PRESETS, DSV3Config, YaRNConfig

# Per-preset training defaults (the quick start runs `--preset tiny` with nothing else).
TRAIN_DEFAULTS = {
    "tiny": dict(train_iters=600, micro_batch_size=8, global_batch_size=16, lr=3e-3, min_lr=3e-4,
                 lr_warmup_iters=30, eval_interval=100, eval_iters=8, log_interval=50, generate_tokens=120,
                 weight_decay=0.1,
                 # gamma 0.01 instead of the paper's 0.001: 600 steps are too few for 0.001 to balance the
                 # experts (MaxVio over the run ~2 with 0.001, ~0.1 with 0.01)
                 bias_update_rate="0:0.01"),
    "*": dict(train_iters=None, micro_batch_size=1, global_batch_size=None, lr=2.2e-4, min_lr=2.2e-5,
              lr_warmup_iters=2000, eval_interval=1000, eval_iters=10, log_interval=10, generate_tokens=0,
              weight_decay=0.1, bias_update_rate=None),
}


def parse_schedule(text: Optional[str]) -> Optional[Tuple[Tuple[float, float], ...]]:
    """'0:0.3,10e12:0.1' -> ((0, 0.3), (1e13, 0.1)); a bare number is a constant."""
    if text is None:
        return None
    parts = [p for p in str(text).split(",") if p.strip()]
    if len(parts) == 1 and ":" not in parts[0]:
        return ((0, float(parts[0])),)
    out = []
    for p in parts:
        t, v = p.split(":")
        out.append((float(t), float(v)))
    return tuple(out)


def add_model_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("model (megatron_dsv3)")
    g.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model preset (default: tiny)")
    g.add_argument("--model-config", default=None, help="DSV3Config as JSON (DSV3Config.to_dict()); overrides --preset")
    g.add_argument("--hf-config", default=None, help="a Hugging Face config.json (or its directory); overrides --preset")
    g.add_argument("--num-layers", type=int, default=None)
    g.add_argument("--hidden-size", type=int, default=None)
    g.add_argument("--num-attention-heads", type=int, default=None)
    g.add_argument("--seq-length", type=int, default=None)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--vocab-size", type=int, default=None, help="model vocabulary (default: the preset's)")
    g.add_argument("--init-method-std", type=float, default=None)
    g.add_argument("--mtp-num-layers", type=int, default=None, help="MTP depth D (0 disables MTP)")
    g.add_argument("--mtp-loss-weight", default=None,
                   help="lambda by tokens seen, 'tokens:value,...' (paper: '0:0.3,10e12:0.1')")
    g.add_argument("--bias-update-rate", default=None,
                   help="expert-bias gamma by tokens seen, 'tokens:value,...' (paper: '0:0.001,14.3e12:0')")
    g.add_argument("--seq-aux-loss-coeff", type=float, default=None, help="alpha of the sequence-wise balance loss")
    g.add_argument("--rotary-scaling-factor", type=float, default=None, help="YaRN scale s (paper: 40)")
    g.add_argument("--original-max-position-embeddings", type=int, default=None,
                   help="context the rope was trained at (paper: 4096)")
    g.add_argument("--beta-fast", type=float, default=None, help="YaRN beta (paper: 32)")
    g.add_argument("--beta-slow", type=float, default=None, help="YaRN alpha (paper: 1)")
    g.add_argument("--mscale", type=float, default=None, help="YaRN mscale; sqrt(t) = 0.1 ln(s) + 1 with mscale 1")
    g.add_argument("--mscale-all-dim", type=float, default=None)
    g.add_argument("--no-yarn", action="store_true", help="plain rope (no YaRN)")
    g.add_argument("--recompute-mla-up-proj", action="store_true",
                   help="recompute RMSNorm + MLA up-projections in backward (paper section 3.2.2)")
    g.add_argument("--recompute-granularity", default=None, choices=["full"],
                   help="megatron-core full-layer activation recomputation (long context)")
    g.add_argument("--recompute-method", default="uniform", choices=["uniform", "block"])
    g.add_argument("--recompute-num-layers", type=int, default=1)
    g.add_argument("--fp8", action="store_true", help="FP8 mixed precision (paper section 3.3), when available")
    g.add_argument("--bf16", action="store_true", default=None, help="bf16 params (default on GPU)")
    g.add_argument("--fp32", dest="bf16", action="store_false", help="fp32 params (default on CPU)")
    g.add_argument("--transformer-impl", default="local", choices=["local", "te"], help="module backend")
    return p


def add_training_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None)
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None)
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-tensor-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--no-distributed-optimizer", dest="use_distributed_optimizer", action="store_false",
                   help="plain data parallel Adam instead of ZeRO-1 (the distributed optimizer is the default)")
    g.add_argument("--overlap-grad-reduce", action="store_true")
    g.add_argument("--overlap-param-gather", action="store_true")
    g.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10)

    g = p.add_argument_group("batch and schedule")
    g.add_argument("--micro-batch-size", type=int, default=None)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--rampup-batch-size", nargs=3, type=int, default=None, metavar=("START", "INCREMENT", "SAMPLES"),
                   help="batch-size ramp-up (paper: 3072 -> 15360 over 469B tokens)")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--min-lr", type=float, default=None)
    g.add_argument("--lr-warmup-iters", type=int, default=None)
    g.add_argument("--lr-hold-iters", type=int, default=0, help="steps at --lr after warmup before the decay")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="decay length (default: to --train-iters)")
    g.add_argument("--lr-decay-style", default="cosine", choices=["cosine", "linear", "constant"])
    g.add_argument("--lr-tail", default=None, help="'step:lr,...' stages after the decay (paper's last 500B tokens)")
    g.add_argument("--weight-decay", type=float, default=None)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="indexed-dataset prefixes, optionally weighted: 'w1 p1 w2 p2' (default: the built-in "
                        "docstring corpus)")
    g.add_argument("--split", default="98,2,0", help="train,valid,test proportions")
    g.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json / directory holding one")
    g.add_argument("--data-cache-path", default=None)

    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true", help="load weights only; start at iteration 0")
    g.add_argument("--load-hf", default=None, help="start from a Hugging Face DeepSeek-V2/V3 checkpoint directory")
    g.add_argument("--no-save-final", dest="save_final", action="store_false")

    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=None)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=None)
    g.add_argument("--generate-tokens", type=int, default=None, help="greedy sample printed after training")
    g.add_argument("--prompt", default="The ")
    g.add_argument("--no-progress-bar", dest="progress_bar", action="store_false")
    g.add_argument("--peak-tflops", type=float, default=None, help="per-device peak for MFU (default: by device)")
    g.add_argument("--exit-interval", type=int, default=None, help="stop (without the final save) after this step")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv3-train", description="Train a DeepSeek-V3-style model on megatron-core.")
    add_model_args(p)
    add_training_args(p)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    return fill_defaults(args)


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    d = TRAIN_DEFAULTS.get(args.preset, TRAIN_DEFAULTS["*"])
    for k, v in {**TRAIN_DEFAULTS["*"], **d}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.train_iters is None:
        raise SystemExit(f"--train-iters is required with --preset {args.preset}")
    if args.global_batch_size is None:
        raise SystemExit(f"--global-batch-size is required with --preset {args.preset}")
    return args


def config_from_args(args: argparse.Namespace, on_gpu: bool = False) -> DSV3Config:
    """Preset (or --model-config / --hf-config), then every model flag the user gave."""
    if getattr(args, "model_config", None):
        with open(args.model_config) as f:
            cfg = DSV3Config.from_dict(json.load(f))
    elif getattr(args, "hf_config", None):
        cfg = DSV3Config.from_hf(args.hf_config)
    else:
        cfg = DSV3Config.from_preset(args.preset)
    top = {}
    for flag in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "max_position_embeddings",
                 "vocab_size", "init_method_std"):
        v = getattr(args, flag, None)
        if v is not None:
            top[flag] = v
    if top.get("seq_length") and top["seq_length"] > cfg.max_position_embeddings and "max_position_embeddings" not in top:
        top["max_position_embeddings"] = top["seq_length"]
    bf16 = getattr(args, "bf16", None)
    if bf16 is None:
        bf16 = on_gpu
    top["params_dtype"] = "bfloat16" if bf16 else "float32"

    mla = {}
    if getattr(args, "recompute_mla_up_proj", False):
        mla["recompute_up_proj"] = True
    if getattr(args, "no_yarn", False):
        mla["yarn"] = None
    else:
        yarn = {}
        for flag, field in (("rotary_scaling_factor", "factor"),
                            ("original_max_position_embeddings", "original_max_position_embeddings"),
                            ("beta_fast", "beta_fast"), ("beta_slow", "beta_slow"), ("mscale", "mscale"),
                            ("mscale_all_dim", "mscale_all_dim")):
            v = getattr(args, flag, None)
            if v is not None:
                yarn[field] = v
        if yarn:
            base = cfg.mla.yarn or YaRNConfig()
            mla["yarn"] = YaRNConfig(**{**base.__dict__, **yarn})
    moe = {}
    rate = parse_schedule(getattr(args, "bias_update_rate", None))
    if rate is not None:
        moe["bias_update_rate"] = rate
    if getattr(args, "seq_aux_loss_coeff", None) is not None:
        moe["seq_aux_loss_coeff"] = args.seq_aux_loss_coeff
    mtp = {}
    if getattr(args, "mtp_num_layers", None) is not None:
        mtp["num_layers"] = args.mtp_num_layers
    lw = parse_schedule(getattr(args, "mtp_loss_weight", None))
    if lw is not None:
        mtp["loss_weight"] = lw
    par = dict(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        context_parallel_size=args.context_parallel_size,
        virtual_pipeline_model_parallel_size=args.num_virtual_stages_per_pipeline_rank,
        sequence_parallel=bool(args.sequence_parallel),
        num_layers_in_first_pipeline_stage=args.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=args.decoder_last_pipeline_num_layers,
    )
    if args.num_virtual_stages_per_pipeline_rank:
        par["pipeline_schedule"] = "interleaved"
    fp8 = {"enabled": True} if getattr(args, "fp8", False) else {}
    return cfg.replace(**top, mla=mla, moe=moe, mtp=mtp, parallel=par, fp8=fp8)
