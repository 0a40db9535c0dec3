"""Command-line flags of the trainer (Megatron-LM's names where Megatron-LM has the flag) and THE bridge
flags -> DSV3Config, used by the trainer and by the Megatron-LM integration (megatron_lm.py) alike.

Two groups:
* `add_model_args`: what selects and overrides the model (`--preset`, sizes, MTP/MoE/YaRN settings).
* `add_training_args`: parallelism, batch, schedule, data, checkpoints, logging. Megatron-LM defines
  these itself; `megatron_dsv3.megatron_lm.extra_args_provider` adds only the `--dsv3-*` flags.

Where the model comes from (`model_config_from_args`), first match wins:
  1. the checkpoint `--load` names (its dsv3_config.json: the trainer's, the converter's output);
  2. `--load-hf DIR`'s config.json (MTP depth from the tensors present, seq-length bounded by
     max_position_embeddings, the dtype config.json names);
  3. `--model-config` / `--hf-config` / `--preset` (default tiny).
Model flags the user typed then apply; on a loaded model a flag that would change its architecture is a
one-line error naming the flag and both values. Every flag defaults to None where the model or
`TRAIN_DEFAULTS` supplies the value, so that what the user typed wins. FP8 is not architecture: it is on exactly
when this run says `--fp8` (Megatron-LM's --fp8-format is per run too), a checkpoint trained in FP8 resumes in BF16
without it, which is said in one line.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import List, Optional, Sequence, Tuple

from megatron_dsv3.config import FP8_ALWAYS_BF16, FP8_MODULES, PRESETS, DSV3Config, YaRNConfig

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
              weight_decay=0.1, bias_update_rate=None, adam_moments_dtype="fp32"),
    # the paper's optimizer state (section 3.3.3): BF16 moments, FP32 master weights and gradients. The smaller
    # presets keep megatron-core's FP32 moments: there the moments are a small share of the memory, and FP32 is
    # the numerics their golden curves and tests were measured with
    "dsv3-671b": dict(adam_moments_dtype="bf16"),
}


def parse_schedule(text: Optional[str]) -> Optional[Tuple[Tuple[float, float], ...]]:
    """'0:0.3,10e12:0.1' -> ((0, 0.3), (1e13, 0.1)); a bare number is a constant."""
    if text is None:
        return None
    parts = [p for p in str(text).split(",") if p.strip()]
    try:
        if len(parts) == 1 and ":" not in parts[0]:
            return ((0, float(parts[0])),)
        out = []
        for p in parts:
            t, v = p.split(":")
            out.append((float(t), float(v)))
    except ValueError:
        raise ValueError(f"schedule {text!r}: expected 'tokens:value,tokens:value,...' or one number") from None
    return tuple(out)


def add_model_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("model (megatron_dsv3)")
    g.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="model preset (default: the --load/--load-hf checkpoint's model, else tiny)")
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
    g.add_argument("--recompute-norms", action="store_true",
                   help="recompute the layers' RMSNorms in backward instead of keeping their outputs (section 3.2.2; "
                        "on in the dsv3-671b preset)")
    g.add_argument("--recompute-granularity", default=None, choices=["full"],
                   help="megatron-core full-layer activation recomputation (long context)")
    g.add_argument("--recompute-method", default="uniform", choices=["uniform", "block"])
    g.add_argument("--recompute-num-layers", type=int, default=1)
    g.add_argument("--fp8", action="store_true",
                   help="FP8 training (paper section 3.3): the MLA projections, dense MLP, shared and routed experts "
                        "in E4M3 (1x128 activation tiles, 128x128 weight blocks, FP32 accumulation); embedding, head, "
                        "router, norms and attention core stay BF16")
    g.add_argument("--fp8-backend", default=None, choices=["auto", "te", "native"],
                   help="with --fp8: te = Transformer Engine's block-scaling recipe on TE linears, native = our "
                        "kernels (fp8/), auto (default) = te when Transformer Engine imports, else native")
    g.add_argument("--fp8-bf16-modules", default=None, metavar="LIST",
                   help="with --fp8: comma list of modules kept in BF16 besides the paper's (embedding, output head, "
                        "router, norms, attention core), from: " + ", ".join(FP8_MODULES))
    g.add_argument("--bf16", action="store_true", default=None, help="bf16 params (default on GPU)")
    g.add_argument("--fp32", dest="bf16", action="store_false", help="fp32 params (default on CPU)")
    g.add_argument("--transformer-impl", default="local", choices=["local", "te"], help="module backend")
    return p


def add_training_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-virtual-stages-per-pipeline-rank", dest="virtual_pipeline_model_parallel_size", type=int,
                   default=None, help="interleaved 1F1B: model chunks per pipeline rank")
    g.add_argument("--pipeline-schedule", default=None, choices=["1f1b", "interleaved", "dualpipe", "dualpipev"],
                   help="1f1b, interleaved (megatron-core's; the default with --num-virtual-stages-per-pipeline-rank), "
                        "dualpipe or dualpipev (paper section 3.2.1: two model chunks per rank, "
                        "megatron_dsv3/pipeline/megatron_schedule.py)")
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
    g.add_argument("--deterministic-mode", action="store_true",
                   help="bit-reproducible runs (Megatron-LM's flag): torch's deterministic algorithms, attention "
                        "instead of cuDNN's (whose backward sums dQ with atomics) through FlashAttention-4's "
                        "deterministic backward where flash-attn-4 imports (~1.2x cuDNN's time), else SDPA's "
                        "efficient kernel in its deterministic form (~7x), CUBLAS_WORKSPACE_CONFIG=:4096:8, "
                        "NCCL_ALGO=Ring and NVTE_ALLOW_NONDETERMINISTIC_ALGO=0 unless already set")

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
    g.add_argument("--adam-moments-dtype", default=None, choices=["fp32", "bf16"],
                   help="dtype of Adam's two moments; master weights and gradients stay FP32 (paper section 3.3.3: "
                        "bf16; default bf16 for --preset dsv3-671b, else fp32). With Transformer Engine megatron-core's "
                        "precision-aware optimizer, without it our AdamW (training/optimizer.py)")
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="indexed-dataset prefixes, optionally weighted: 'w1 p1 w2 p2' (default: the built-in "
                        "docstring corpus)")
    g.add_argument("--split", default="98,2,0", help="train,valid,test proportions")
    g.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json / directory holding one")
    g.add_argument("--data-cache-path", default=None)
    from megatron_dsv3.training.fim import probability
    g.add_argument("--fim-rate", type=probability, default=0.0,
                   help="fraction of documents in fill-in-middle form <|fim_begin|>pre<|fim_hole|>suf<|fim_end|>"
                        "middle<eos>, per document before packing (paper: 0.1; default 0: off)")
    g.add_argument("--fim-spm-rate", type=probability, default=0.0,
                   help="fraction of the FIM documents in suffix-prefix-middle order (default 0: all PSM)")

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
    g.add_argument("--debug", action="store_true",
                   help="show Python tracebacks for user errors too (also: MEGATRON_DSV3_DEBUG=1)")

    g = p.add_argument_group("EMA of the parameters (paper section 3.2.3)")
    g.add_argument("--ema-decay", type=float, default=None,
                   help="keep ema = d * ema + (1 - d) * params in host memory after every step, asynchronously; "
                        "saved with the checkpoints (default: off)")
    g.add_argument("--eval-ema", action="store_true", help="evaluate with the EMA weights (needs --ema-decay)")
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsv3-train", description="Train a DeepSeek-V3-style model on megatron-core.")
    add_model_args(p)
    add_training_args(p)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Flags -> args with `args.model_config_resolved` (the DSV3Config to build) and `args.notes` (lines the
    trainer prints). Raises ValueError (one line, naming the flag) for user mistakes, before anything heavy."""
    args = build_parser().parse_args(argv)
    args.notes = []
    on_gpu = _on_gpu(args)
    cfg = model_config_from_args(args, on_gpu=on_gpu)
    given_rate = args.bias_update_rate
    fill_defaults(args, cfg.name)
    if given_rate is None and args.bias_update_rate is not None and args.model_source is None:
        # a preset's training default (tiny: gamma 0.01); a loaded model keeps the gamma it was trained with
        cfg = cfg.replace(moe={"bias_update_rate": parse_schedule(args.bias_update_rate)})
    check_args(args, cfg)
    args.model_config_resolved = cfg
    return args


def _on_gpu(args) -> bool:
    import torch
    return torch.cuda.is_available() and not getattr(args, "cpu", False)


def fill_defaults(args: argparse.Namespace, model_name: Optional[str] = None) -> argparse.Namespace:
    name = model_name or getattr(args, "preset", None) or "tiny"
    d = TRAIN_DEFAULTS.get(name, TRAIN_DEFAULTS["*"])
    for k, v in {**TRAIN_DEFAULTS["*"], **d}.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    for flag in ("train_iters", "global_batch_size"):
        if getattr(args, flag) is None:
            raise ValueError(f"--{flag.replace('_', '-')} is required for model {name!r} (only --preset tiny has "
                             f"training defaults)")
    return args


def check_world(args: argparse.Namespace, cfg: DSV3Config, world: int) -> int:
    """The layout against the number of processes; returns the data-parallel size. Before any model is built."""
    par = cfg.parallel
    model_parallel = par.tensor_model_parallel_size * par.pipeline_model_parallel_size * par.context_parallel_size
    if world % model_parallel:
        raise ValueError(f"{world} process(es) cannot hold --tensor-model-parallel-size x "
                         f"--pipeline-model-parallel-size x --context-parallel-size = {model_parallel}")
    dp = world // model_parallel
    if (dp * par.tensor_model_parallel_size) % par.expert_model_parallel_size:
        raise ValueError(f"--expert-model-parallel-size {par.expert_model_parallel_size} must divide data-parallel "
                         f"x tensor-parallel size ({dp} x {par.tensor_model_parallel_size})")
    if args.global_batch_size % (args.micro_batch_size * dp):
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
                         f"{args.micro_batch_size} x data-parallel size {dp}")
    if par.pipeline_schedule in ("dualpipe", "dualpipev"):
        from megatron_dsv3.pipeline.megatron_schedule import check_microbatches
        ramp = getattr(args, "rampup_batch_size", None)
        for gbs in sorted({args.global_batch_size, *(range(ramp[0], args.global_batch_size, ramp[1]) if ramp else ())}):
            if gbs % (args.micro_batch_size * dp) == 0:
                check_microbatches(par.pipeline_schedule, par.pipeline_model_parallel_size,
                                   gbs // (args.micro_batch_size * dp),
                                   f"--global-batch-size {gbs} / (--micro-batch-size {args.micro_batch_size} x "
                                   f"data-parallel size {dp})")
    return dp


def check_args(args: argparse.Namespace, cfg: DSV3Config) -> None:
    """The cheap checks, before any process group, model or dataset exists."""
    from megatron_dsv3.training.data import parse_blend
    if getattr(args, "deterministic_mode", False):
        from megatron_dsv3.training.loop import check_deterministic_env
        check_deterministic_env()
    for flag in ("micro_batch_size", "global_batch_size", "train_iters"):
        v = getattr(args, flag)
        if v is not None and (v < 0 or (v == 0 and flag != "train_iters")):
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {v}")
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:    # launched (torchrun, srun): the world is known now
        check_world(args, cfg, int(os.environ["WORLD_SIZE"]))
    blend = parse_blend(args.data_path)
    for prefix in (blend[0] if blend else []):
        missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
        if missing:
            raise ValueError(f"--data-path {prefix}: {missing[0]} does not exist (give the prefix "
                             f"tools/preprocess_data.py printed, without .bin/.idx)")
    if args.tokenizer not in (None, "", "byte") and not os.path.exists(args.tokenizer):
        raise ValueError(f"--tokenizer {args.tokenizer}: no such file or directory ('byte' for the built-in one)")
    schedule = cfg.parallel.pipeline_schedule
    if schedule in ("dualpipe", "dualpipev") and getattr(args, "overlap_grad_reduce", False):
        raise ValueError(f"--overlap-grad-reduce with --pipeline-schedule {schedule}: the gradients are reduced "
                         f"after the schedule (weight gradients are deferred); leave out --overlap-grad-reduce")
    if getattr(args, "adam_moments_dtype", None) not in (None, "fp32"):
        from megatron_dsv3.training.optimizer import moments_plan
        moments_plan(args.adam_moments_dtype, getattr(args, "use_distributed_optimizer", True))   # one line if not here
    ema = getattr(args, "ema_decay", None)
    if ema is not None and not 0.0 < ema < 1.0:
        raise ValueError(f"--ema-decay must be in (0, 1) (e.g. 0.999), got {ema:g}")
    if getattr(args, "eval_ema", False) and ema is None:
        raise ValueError("--eval-ema evaluates with the EMA weights: give --ema-decay too")
    if ema is not None and getattr(args, "overlap_param_gather", False):
        raise ValueError("--ema-decay with --overlap-param-gather: the parameters are gathered only in the next "
                         "forward pass, after the EMA's snapshot; leave out --overlap-param-gather")
    for flag in ("save", "tensorboard_dir", "data_cache_path"):
        v = getattr(args, flag, None)
        if v and os.path.exists(v) and not os.path.isdir(v):
            raise ValueError(f"--{flag.replace('_', '-')} {v}: exists and is not a directory")


# ---- the model: where it comes from ---------------------------------------------------------------------------
# Fields that make a model what it is (a loaded checkpoint's value must not change), with the flag that sets them.
ARCHITECTURE = (
    ("num_layers", "--num-layers"), ("hidden_size", "--hidden-size"),
    ("num_attention_heads", "--num-attention-heads"), ("vocab_size", "--vocab-size"), ("norm_eps", None),
    ("mla.q_lora_rank", None), ("mla.kv_lora_rank", None), ("mla.qk_nope_head_dim", None),
    ("mla.qk_rope_head_dim", None), ("mla.v_head_dim", None), ("mla.rope_theta", None),
    ("mla.rope_interleave", None),
    ("moe.num_experts", None), ("moe.num_shared_experts", None), ("moe.top_k", None),
    ("moe.expert_ffn_hidden_size", None), ("moe.dense_ffn_hidden_size", None),
    ("moe.first_k_dense_replace", None), ("moe.n_group", None), ("moe.topk_group", None),
    ("moe.group_score_topk", None), ("moe.routed_scaling_factor", None), ("moe.score_function", None),
    ("moe.norm_topk_prob", None), ("moe.expert_bias", None), ("mtp.num_layers", "--mtp-num-layers"),
)


def _field(cfg, path: str):
    for p in path.split("."):
        cfg = getattr(cfg, p)
    return cfg


def model_differences(a: DSV3Config, b: DSV3Config) -> List[Tuple[str, Optional[str], object, object]]:
    """(field, flag, a's value, b's value) for every architecture field where a and b differ."""
    return [(f, flag, _field(a, f), _field(b, f)) for f, flag in ARCHITECTURE if _field(a, f) != _field(b, f)]


def _refuse_differences(diffs, source: str, other: str) -> None:
    if diffs:
        parts = [f"{flag or f} {theirs} (checkpoint: {ours})" for f, flag, ours, theirs in diffs]
        raise ValueError(f"{source} holds another model than {other}: {'; '.join(parts)}; leave them out "
                         f"to use the checkpoint's model")


def hf_model_config(path: str, notes: Optional[list] = None) -> DSV3Config:
    """The model of a Hugging Face checkpoint directory: its config.json (dtype included), MTP only when its
    tensors are there, training seq-length bounded by max_position_embeddings."""
    from megatron_dsv3.checkpoint.safetensors_io import HFCheckpoint
    ckpt = HFCheckpoint(path)                 # validates config.json, index and shards: a clear error if not
    cfg = ckpt.config
    if cfg.mtp.num_layers and not any(k.startswith(f"model.layers.{cfg.num_layers}.") for k in ckpt.keys()):
        if notes is not None:
            notes.append(f"--load-hf {path}: config.json has num_nextn_predict_layers={cfg.mtp.num_layers} but the "
                         f"checkpoint holds no MTP layer (transformers' save_pretrained drops it): MTP is off")
        cfg = cfg.replace(mtp={"num_layers": 0})
    return cfg.replace(seq_length=min(cfg.seq_length, cfg.max_position_embeddings))


def _chosen_model(args) -> Tuple[Optional[DSV3Config], Optional[str]]:
    """The model the user named with --model-config / --hf-config / --preset (None if none)."""
    if getattr(args, "model_config", None):
        try:
            with open(args.model_config) as f:
                return DSV3Config.from_dict(json.load(f)), f"--model-config {args.model_config}"
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"--model-config {args.model_config}: {e}") from None
    if getattr(args, "hf_config", None):
        return DSV3Config.from_hf(args.hf_config), f"--hf-config {args.hf_config}"
    if getattr(args, "preset", None):
        return DSV3Config.from_preset(args.preset), f"--preset {args.preset}"
    return None, None


def model_config_from_args(args: argparse.Namespace, on_gpu: bool = False) -> DSV3Config:
    """The model to build: a checkpoint's, --load-hf's, or the named one; then the user's flags (module doc)."""
    from megatron_dsv3.training import checkpointing
    notes = getattr(args, "notes", None)
    if notes is None:
        notes = args.notes = []
    base, source = None, None
    found = checkpointing.find_checkpoint(args.load) if getattr(args, "load", None) else None
    if getattr(args, "load", None) and found is None:
        notes.append(f"--load {args.load} does not exist: starting from scratch")
    if found is not None and found.config is not None:
        base, source = DSV3Config.from_dict(found.config), f"--load {args.load}"
        if getattr(args, "load_hf", None) and found.kind == "trainer":
            notes.append(f"--load-hf {args.load_hf} not used: resuming from --load {args.load}")
    elif getattr(args, "load_hf", None):
        base, source = hf_model_config(args.load_hf, notes), f"--load-hf {args.load_hf}"
    chosen, chosen_name = _chosen_model(args)
    if base is None:
        base = chosen if chosen is not None else DSV3Config.from_preset("tiny")
    elif chosen is not None:
        _refuse_differences(model_differences(base, chosen), source, chosen_name + " says")
    args.model_source = source
    cfg = apply_model_flags(base, model_flag_values(args), on_gpu=on_gpu, keep_dtype=source is not None)
    if base.fp8.enabled and not cfg.fp8.enabled:
        notes.append(f"{source or chosen_name}: trained with --fp8; this run trains in BF16 (precision follows this "
                     f"run's flags: add --fp8 to continue in FP8)")
    if source is not None:
        _refuse_differences(model_differences(base, cfg), source, "the model flags say")
    return cfg.replace(parallel=parallel_from_args(args))


# ---- flags -> config, shared with the Megatron-LM integration ---------------------------------------------------
# ParallelConfig field <- args attribute (the trainer's flags and Megatron-LM's parsed args use the same names)
PARALLEL_ARGS = (
    ("tensor_model_parallel_size", "tensor_model_parallel_size"),
    ("pipeline_model_parallel_size", "pipeline_model_parallel_size"),
    ("expert_model_parallel_size", "expert_model_parallel_size"),
    ("expert_tensor_parallel_size", "expert_tensor_parallel_size"),
    ("context_parallel_size", "context_parallel_size"),
    ("virtual_pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size"),
    ("sequence_parallel", "sequence_parallel"),
    ("num_layers_in_first_pipeline_stage", "decoder_first_pipeline_num_layers"),
    ("num_layers_in_last_pipeline_stage", "decoder_last_pipeline_num_layers"),
)
_PARALLEL_DEFAULTS = {"sequence_parallel": False, "virtual_pipeline_model_parallel_size": None,
                      "num_layers_in_first_pipeline_stage": None, "num_layers_in_last_pipeline_stage": None}


def parallel_from_args(args, prefix: str = "") -> dict:
    """ParallelConfig fields from parsed args (ours or Megatron-LM's; the schedule from --pipeline-schedule, or
    with prefix 'dsv3_' from Megatron-LM's --dsv3-pipeline-schedule)."""
    out = {}
    for field, attr in PARALLEL_ARGS:
        v = getattr(args, attr, None)
        out[field] = _PARALLEL_DEFAULTS.get(field, 1) if v is None else v
    out["sequence_parallel"] = bool(out["sequence_parallel"])
    schedule = getattr(args, prefix + "pipeline_schedule", None)
    if out["virtual_pipeline_model_parallel_size"]:
        if schedule not in (None, "interleaved"):
            raise ValueError(f"--{prefix.replace('_', '-')}pipeline-schedule {schedule} with "
                             f"--num-virtual-stages-per-pipeline-rank: the "
                             f"virtual stages run megatron-core's interleaved 1F1B; leave one of them out")
        schedule = "interleaved"
    out["pipeline_schedule"] = schedule or "1f1b"
    return out


def parallel_state_sizes(par: dict) -> dict:
    """megatron-core initialize_model_parallel's keyword arguments for ParallelConfig fields."""
    return {k: par[k] for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                "virtual_pipeline_model_parallel_size", "context_parallel_size",
                                "expert_model_parallel_size", "expert_tensor_parallel_size")}


def model_flag_values(args, prefix: str = "") -> dict:
    """The model flags the user gave (None = not given), read from our names or, with prefix 'dsv3_', from
    Megatron-LM's --dsv3-* flags; sizes use Megatron-LM's own names in both."""
    g = lambda name: getattr(args, name, None)   # noqa: E731
    p = lambda name: getattr(args, prefix + name, None)   # noqa: E731
    return {
        "num_layers": g("num_layers"), "hidden_size": g("hidden_size"),
        "num_attention_heads": g("num_attention_heads"), "seq_length": g("seq_length"),
        "max_position_embeddings": g("max_position_embeddings"), "vocab_size": g("vocab_size"),
        "init_method_std": p("init_method_std"),
        "bf16": g("bf16"), "recompute_mla_up_proj": bool(p("recompute_mla_up_proj")),
        "recompute_norms": bool(p("recompute_norms")), "no_yarn": bool(g("no_yarn")),
        # Megatron-LM's --rotary-scaling-factor defaults to 1.0 (= not given)
        "yarn": {"factor": g("rotary_scaling_factor") if not prefix or g("rotary_scaling_factor") != 1.0 else None,
                 "original_max_position_embeddings": p("yarn_original_max_position_embeddings") if prefix
                 else g("original_max_position_embeddings"),
                 "beta_fast": p("yarn_beta_fast") if prefix else g("beta_fast"),
                 "beta_slow": p("yarn_beta_slow") if prefix else g("beta_slow"),
                 # Megatron-LM derives --mscale/--mscale-all-dim flags with its own defaults: ours come from the model
                 "mscale": None if prefix else g("mscale"), "mscale_all_dim": None if prefix else g("mscale_all_dim")},
        "bias_update_rate": p("bias_update_rate"), "seq_aux_loss_coeff": p("seq_aux_loss_coeff"),
        "mtp_num_layers": g("mtp_num_layers"), "mtp_loss_weight": p("mtp_loss_weight"), "fp8": bool(g("fp8")),
        "fp8_backend": g("fp8_backend"), "fp8_bf16_modules": p("fp8_bf16_modules"),
        "fp8_bf16_modules_flag": "--dsv3-fp8-bf16-modules" if prefix else "--fp8-bf16-modules",
    }


def fp8_bf16_modules(text: str, fp8: bool, flag: str = "--fp8-bf16-modules") -> Tuple[str, ...]:
    """The flag's comma list -> module names (FP8_MODULES, each once), or a one-line error naming the flag."""
    if not fp8:
        raise ValueError(f"{flag} {text} needs " + ("--fp8-format e4m3" if flag.startswith("--dsv3") else "--fp8"))
    names = tuple(dict.fromkeys(m.strip() for m in text.split(",") if m.strip()))
    unknown = [m for m in names if m not in FP8_MODULES]
    if unknown or not names:
        raise ValueError(f"{flag} {text}: {'unknown module(s) ' + ', '.join(unknown) if unknown else 'no module'}; "
                         f"choose from {', '.join(FP8_MODULES)} (the embedding, output head, router, norms and "
                         f"attention core are always BF16)")
    return names


def apply_model_flags(cfg: DSV3Config, v: dict, on_gpu: bool = False, keep_dtype: bool = False) -> DSV3Config:
    """cfg with the given flag values (model_flag_values) applied. params_dtype: --bf16/--fp32 when given, else
    the loaded model's (keep_dtype), else bf16 on GPU and fp32 on CPU."""
    top = {k: v[k] for k in ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                             "max_position_embeddings", "vocab_size", "init_method_std") if v.get(k) is not None}
    if top.get("seq_length") and top["seq_length"] > cfg.max_position_embeddings and "max_position_embeddings" not in top:
        top["max_position_embeddings"] = top["seq_length"]
    if v.get("recompute_norms"):
        top["recompute_norms"] = True
    if v.get("bf16") is not None:
        top["params_dtype"] = "bfloat16" if v["bf16"] else "float32"
    elif not keep_dtype:
        top["params_dtype"] = "bfloat16" if on_gpu else "float32"
    mla = {}
    if v.get("recompute_mla_up_proj"):
        mla["recompute_up_proj"] = True
    yarn = {k: x for k, x in (v.get("yarn") or {}).items() if x is not None}
    if v.get("no_yarn"):
        mla["yarn"] = None
    elif yarn:
        base = cfg.mla.yarn or YaRNConfig()
        mla["yarn"] = YaRNConfig(**{**base.__dict__, **yarn})
    moe = {}
    rate = parse_schedule(v.get("bias_update_rate"))
    if rate is not None:
        moe["bias_update_rate"] = rate
    if v.get("seq_aux_loss_coeff") is not None:
        moe["seq_aux_loss_coeff"] = v["seq_aux_loss_coeff"]
    mtp = {}
    if v.get("mtp_num_layers") is not None:
        mtp["num_layers"] = v["mtp_num_layers"]
    lw = parse_schedule(v.get("mtp_loss_weight"))
    if lw is not None:
        mtp["loss_weight"] = lw
    if v.get("fp8_backend") and not v.get("fp8"):
        raise ValueError(f"--fp8-backend {v['fp8_backend']} needs --fp8")
    # precision is the run's choice, as Megatron-LM's per-run --fp8-format: FP8 on exactly when the flag says so,
    # whatever the loaded model's config recorded (its other FP8Config fields, the BF16 module list, are kept)
    fp8 = {"enabled": bool(v.get("fp8")), "backend": v.get("fp8_backend") or "auto"}
    if v.get("fp8_bf16_modules") is not None:
        fp8["bf16_modules"] = FP8_ALWAYS_BF16 + fp8_bf16_modules(v["fp8_bf16_modules"], bool(v.get("fp8")),
                                                                 v.get("fp8_bf16_modules_flag", "--fp8-bf16-modules"))
    cfg = cfg.replace(**top, mla=mla, moe=moe, mtp=mtp, fp8=fp8)
    if cfg.fp8.enabled:
        from megatron_dsv3.fp8.recipe import resolve_backend
        resolve_backend(cfg.fp8)          # --fp8-backend te without Transformer Engine: refused here, one line
    return cfg


def config_from_args(args: argparse.Namespace, on_gpu: bool = False) -> DSV3Config:
    """The model config parse_args resolved (or resolve it now, for args built another way)."""
    cfg = getattr(args, "model_config_resolved", None)
    return cfg if cfg is not None else model_config_from_args(args, on_gpu=on_gpu)
