"""Per-GPU memory estimate from the config alone (no model built): what the launch shells print before
they start, to catch a layout that cannot fit.

Counted per pipeline stage (the largest is reported):
* weights       local parameters x bytes of the parameter dtype (bf16: 2);
* gradients     megatron DDP's grad buffer (fp32: 4 bytes per local parameter);
* optimizer     ZeRO-1: fp32 master weights + Adam's two moments, divided over the data-parallel ranks that
                hold the same parameters (dense: DP, experts: expert-DP = DP*TP/(EP*ETP)); the moments take what
                --adam-moments-dtype stores (training/optimizer.py): 4 bytes each in fp32, 2 in bf16 (the paper,
                section 3.3.3; the default of --preset dsv3-671b);
* activations   per layer and token: what backward needs (bf16), from the layer's shapes; 1F1B keeps
                PP - stage micro-batches in flight on a stage; the paper's recomputation (section 3.2.2) drops
                the RMSNorm outputs, the latent norms' outputs and the attention core's q, k, v; full
                recomputation keeps only layer inputs; plus the fp32
                logits of one micro-batch on the last stage. With --fp8 the routed experts keep what fp8/experts.py
                keeps: their input and the SwiGLU input in FP8 with 1x128 FP32 scales (1 + 4/128 bytes an element),
                the SwiGLU output recomputed, against input, SwiGLU input and output in BF16. The other FP8 linears
                keep an FP8 copy of an input that mostly has another BF16 consumer too (norm, attention core):
                not counted. FP8 leaves weights, gradients and optimizer state as they are (BF16/FP32 masters);
                with FP8Config.weight_cache (default) the weights of the FP8 GEMMs also keep two FP8 copies for
                the step (blocks and transposed blocks, fp8/weight_cache.py): counted under weights, 2 bytes per
                FP8 parameter (+ a float32 scale per 128x128 block).
Communication buffers, the allocator's fragmentation and the CUDA context (~2-5 GB in practice) are not
modelled: leave that much headroom.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, Optional

from megatron_dsv3.accounting import attention_params, mlp_params

GiB = 1024 ** 3


def _fp8_linear_params(cfg, moe_layer: bool) -> float:
    """Local parameters of one layer's GEMMs that run in FP8 (FP8Config.bf16_modules names those kept in BF16)."""
    h, H, m, moe = cfg.hidden_size, cfg.num_attention_heads, cfg.mla, cfg.moe
    tp, ep, etp = (cfg.parallel.tensor_model_parallel_size, cfg.parallel.expert_model_parallel_size,
                   cfg.parallel.expert_tensor_parallel_size)
    sizes = {"linear_kv_down_proj": h * (m.kv_lora_rank + m.qk_rope_head_dim),
             "linear_kv_up_proj": m.kv_lora_rank * H * (m.qk_nope_head_dim + m.v_head_dim) / tp,
             "linear_proj": H * m.v_head_dim * h / tp}
    if m.q_lora_rank is None:
        sizes["linear_q_proj"] = h * H * m.qk_head_dim / tp
    else:
        sizes.update(linear_q_down_proj=h * m.q_lora_rank, linear_q_up_proj=m.q_lora_rank * H * m.qk_head_dim / tp)
    if moe_layer:
        sizes["experts"] = moe.num_experts / ep * mlp_params(h, moe.expert_ffn_hidden_size) / etp
        sizes["shared_experts"] = mlp_params(h, moe.num_shared_experts * moe.expert_ffn_hidden_size) / tp
    else:
        sizes["dense_mlp"] = mlp_params(h, moe.dense_ffn_hidden_size) / tp
    return sum(v for k, v in sizes.items() if k not in cfg.fp8.bf16_modules)


def stage_parameters(cfg, stage: int) -> Dict[str, float]:
    """Local parameter counts of one pipeline stage: {"dense": ..., "expert": ..., "fp8": ...} (per GPU); "fp8":
    the parameters of the GEMMs that run in FP8 (when FP8 is on)."""
    par, h, V, moe = cfg.parallel, cfg.hidden_size, cfg.padded_vocab_size, cfg.moe
    tp, ep, etp = par.tensor_model_parallel_size, par.expert_model_parallel_size, par.expert_tensor_parallel_size
    layers = cfg.pipeline_layers()
    first_layer = sum(layers[:stage])
    dense = expert = fp8 = 0.0

    def layer(global_idx: int, moe_layer: bool):
        nonlocal dense, expert, fp8
        fp8 += _fp8_linear_params(cfg, moe_layer)
        dense += attention_params(cfg) / tp + 2 * h
        if moe_layer:
            expert += moe.num_experts / ep * mlp_params(h, moe.expert_ffn_hidden_size) / etp
            dense += mlp_params(h, moe.num_shared_experts * moe.expert_ffn_hidden_size) / tp + moe.num_experts * h
        else:
            dense += mlp_params(h, moe.dense_ffn_hidden_size) / tp

    for i in range(first_layer, first_layer + layers[stage]):
        layer(i, cfg.is_moe_layer(i))
    last = stage == len(layers) - 1
    if stage == 0:
        dense += V * h / tp
    if last:
        dense += V * h / tp + h                                      # output head, final norm
        for _ in range(cfg.mtp.num_layers):
            layer(cfg.num_layers, True)
            dense += 2 * h + 2 * h * h / 1 + h                       # enorm, hnorm, eh_proj, final norm
            fp8 += 2 * h * h if "eh_proj" not in cfg.fp8.bf16_modules else 0
        if cfg.mtp.num_layers and len(layers) > 1:
            dense += V * h / tp                                      # the last stage's embedding copy for MTP
    return {"dense": dense, "expert": expert, "fp8": fp8}


FP8_TILE_BYTES = 1 + 4 / 128          # an e4m3 element and its share of the FP32 scale of its 1x128 tile
FP8_WEIGHT_CACHE_BYTES = 2 * (1 + 4 / 128 ** 2)   # two e4m3 copies of a weight element + their 128x128 block scales


def activation_bytes_per_token(cfg, moe_layer: bool, recompute_up_proj: bool, act_bytes: int = 2,
                               fp8: bool = False) -> float:
    """Bytes one layer keeps for backward per token (its input included). Checked against the H200 at V3 width
    (bench/results.md, 2026-11-29, bf16, 32 experts top-8 + 1 shared; measured = allocated after the forward minus
    before, so without the block's input; tests/training/test_memory.py): MLA alone 172,584 (this estimate less
    input and norm output: 173,184), with the paper's recomputation 37,504 (38,016); DeepSeekMoE alone 234,056
    (225,440: 3.7% under), of which the SwiGLU output (k * f * 2 = 32,768) is no longer kept; the recomputation (norms + MLA up-projections) frees 163,760 B/token/layer on the 4-layer
    stack (523,496 -> 359,736), this estimate 163,840."""
    return (attention_elements_per_token(cfg, recompute_up_proj) * act_bytes
            + mlp_bytes_per_token(cfg, moe_layer, act_bytes, fp8))


def attention_elements_per_token(cfg, recompute_up_proj: bool) -> float:
    """MLA's kept activations per token, in elements of the activation dtype (softmax stats converted)."""
    h, m = cfg.hidden_size, cfg.mla
    tp = cfg.parallel.tensor_model_parallel_size
    H = cfg.num_attention_heads / tp
    norm_out = 0 if cfg.recompute_norms else h                                      # section 3.2.2
    latents = (m.q_lora_rank or 0) + m.kv_lora_rank
    attn = h + norm_out + latents + m.qk_rope_head_dim                           # norm in/out, latents (+ k^R)
    if not recompute_up_proj:
        # the latent norms' outputs (the up-projections' inputs) and q, k, v as the attention core keeps them;
        # section 3.2.2's recompute makes all of them again from the latents (mla/attention.py, RecomputedQKV)
        attn += latents + H * (2 * m.qk_head_dim + m.v_head_dim)
    return attn + H * m.v_head_dim + 2 * H * 2                                    # attention out, fp32 softmax stats


def mlp_bytes_per_token(cfg, moe_layer: bool, act_bytes: int = 2, fp8: bool = False) -> float:
    """The MLP block's kept activations per token, in bytes (its input and pre-MLP norm output included)."""
    h, moe = cfg.hidden_size, cfg.moe
    tp = cfg.parallel.tensor_model_parallel_size
    norm_out = 0 if cfg.recompute_norms else h
    if not moe_layer:      # h1 = [gate, up] and a = SwiGLU(h1) (mlp.SwiGLUMLP keeps no more; the shared experts too)
        return (h + norm_out + 3 * moe.dense_ffn_hidden_size / tp) * act_bytes
    f, fs = moe.expert_ffn_hidden_size, moe.num_shared_experts * moe.expert_ffn_hidden_size / tp
    # shared experts (h1 = [gate, up], SwiGLU output), fp32 router scores; per routed copy of a token its float32
    # gate (the experts scale the SwiGLU output by it: the combine keeps no expert output rows, moe/dispatch.py)
    mlp = (h + norm_out + 3 * fs + (moe.num_experts + moe.top_k) * 4 / act_bytes) * act_bytes
    if fp8 and "experts" not in cfg.fp8.bf16_modules:           # x and h1 in FP8 tiles, a recomputed
        return mlp + moe.top_k * (h + 2 * f) * FP8_TILE_BYTES
    # x, h1 = [gate, up]; a = SwiGLU(h1) is made again for dW2 (moe/experts.grouped_swiglu), not kept
    return mlp + moe.top_k * (h + 2 * f) * act_bytes


def estimate_memory(cfg, micro_batch_size: int, data_parallel_size: int, seq_length: Optional[int] = None,
                    recompute_up_proj: Optional[bool] = None, param_bytes: Optional[int] = None,
                    grad_bytes: int = 4, master_bytes: int = 4, moment_bytes: int = 4,
                    recompute_full: bool = False, fp8: Optional[bool] = None) -> Dict[str, float]:
    """GiB per GPU on the fullest pipeline stage: weights, gradients, optimizer, activations, total. moment_bytes:
    bytes per Adam moment (4 fp32, 2 bf16); fp8: FP8 activations of the routed experts (default cfg.fp8.enabled)."""
    fp8 = cfg.fp8.enabled if fp8 is None else fp8
    par = cfg.parallel
    s = seq_length or cfg.seq_length
    pp = par.pipeline_model_parallel_size
    tp, ep, etp = par.tensor_model_parallel_size, par.expert_model_parallel_size, par.expert_tensor_parallel_size
    pbytes = param_bytes or (2 if cfg.params_dtype in ("bfloat16", "float16") else 4)
    rec = cfg.mla.recompute_up_proj if recompute_up_proj is None else recompute_up_proj
    expert_dp = max(1, data_parallel_size * tp // (ep * etp))
    layers = cfg.pipeline_layers()
    best = None
    for stage in range(pp):
        p = stage_parameters(cfg, stage)
        n = p["dense"] + p["expert"]
        opt = (master_bytes + 2 * moment_bytes) * (p["dense"] / data_parallel_size + p["expert"] / expert_dp)
        first = sum(layers[:stage])
        per_token = sum(activation_bytes_per_token(cfg, cfg.is_moe_layer(i), rec, fp8=fp8)
                        for i in range(first, first + layers[stage]))
        if stage == pp - 1:
            per_token += cfg.mtp.num_layers * activation_bytes_per_token(cfg, True, rec, fp8=fp8)
        in_flight = pp - stage                                              # 1F1B warm-up depth
        if recompute_full:   # only each layer's input is kept; one layer's activations live during its backward
            n_layers = layers[stage] + (cfg.mtp.num_layers if stage == pp - 1 else 0)
            one = max(activation_bytes_per_token(cfg, cfg.is_moe_layer(i), rec, fp8=fp8)
                      for i in range(first, first + max(1, layers[stage])))
            act = (n_layers * cfg.hidden_size * 2 * in_flight + one) * s * micro_batch_size
        else:
            act = per_token * s * micro_batch_size * in_flight
        if stage == pp - 1:
            act += s * micro_batch_size * cfg.padded_vocab_size / tp * 4 * (1 + cfg.mtp.num_layers)
        # "fprop" keeps one of the two copies (Dgrad's is made per backward, one layer's worth at a time)
        cache = p["fp8"] * FP8_WEIGHT_CACHE_BYTES * (0.5 if cfg.fp8.weight_cache == "fprop" else 1.0) \
            if fp8 and cfg.fp8.weight_cache else 0.0
        row = {"stage": stage, "params_billion": n / 1e9, "weights": (n * pbytes + cache) / GiB,
               "fp8_weight_cache": cache / GiB, "gradients": n * grad_bytes / GiB,
               "optimizer": opt / GiB, "activations": act / GiB}
        row["total"] = row["weights"] + row["gradients"] + row["optimizer"] + row["activations"]
        if best is None or row["total"] > best["total"]:
            best = row
    return best


def _fmt(gib: float) -> str:
    return f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def describe(cfg, micro_batch_size: int, data_parallel_size: int, **kw) -> str:
    par = cfg.parallel
    pc = cfg.parameter_counts()
    est = estimate_memory(cfg, micro_batch_size, data_parallel_size, **kw)
    world = par.tensor_model_parallel_size * par.pipeline_model_parallel_size * data_parallel_size
    moments = "BF16" if kw.get("moment_bytes", 4) == 2 else "FP32"
    fp8 = kw.get("fp8")
    fp8 = cfg.fp8.enabled if fp8 is None else fp8
    lines = [
        f"model {cfg.name}: {cfg.num_layers} layers (+{cfg.mtp.num_layers} MTP), hidden {cfg.hidden_size}, "
        f"{cfg.moe.num_experts} experts top-{cfg.moe.top_k} ({cfg.moe.num_shared_experts} shared), "
        f"{pc['total'] / 1e9:.3f}B params ({pc['activated'] / 1e9:.3f}B activated), {cfg.params_dtype}",
        f"layout: {world} GPUs = TP {par.tensor_model_parallel_size} x PP {par.pipeline_model_parallel_size} x "
        f"DP {data_parallel_size}; EP {par.expert_model_parallel_size}; layers per stage "
        f"{list(cfg.pipeline_layers())}; seq {cfg.seq_length}, micro-batch {micro_batch_size}",
        f"memory per GPU (fullest stage {est['stage']}: {est['params_billion'] * 1e3:.1f}M local params): "
        f"weights {_fmt(est['weights'])}"
        f"{' (FP8 copies ' + _fmt(est['fp8_weight_cache']) + ')' if est['fp8_weight_cache'] else ''} + grads {_fmt(est['gradients'])} + optimizer {_fmt(est['optimizer'])} "
        f"(FP32 master, {moments} moments) + activations {_fmt(est['activations'])}"
        f"{' (routed experts in FP8)' if fp8 else ''} = {_fmt(est['total'])} (+ buffers and CUDA context, a few GiB)",
    ]
    return "\n".join(lines)


# Memory a process can allocate on each GPU (GiB, torch.cuda.get_device_properties().total_memory):
# an "80 GB" card holds 79.1 GiB.
GPU_MEMORY_GIB = {"H800": 79.1, "H100": 79.1, "A100": 79.1, "A800": 79.1, "H20": 94.9, "H200": 139.8,
                  "B200": 178.4, "A100-40GB": 39.4, "L40S": 44.4}


def fit_report(cfg, micro_batch_size: int, data_parallel_size: int, gpu: str, **kw) -> str:
    """One line when the estimate fits `gpu`; else a WARNING naming the overshoot and the switches that lower the
    estimate (BF16 Adam moments, full recomputation, FP8: its activations are smaller but its per-step FP8 weight
    copies add 2 bytes a parameter, so it is named only where it lowers the total), each with its estimate and
    whether it alone fits."""
    if gpu.upper() not in {k.upper() for k in GPU_MEMORY_GIB}:
        raise ValueError(f"--gpu {gpu!r}: unknown GPU; one of {', '.join(GPU_MEMORY_GIB)}")
    cap = {k.upper(): v for k, v in GPU_MEMORY_GIB.items()}[gpu.upper()]
    est = estimate_memory(cfg, micro_batch_size, data_parallel_size, **kw)["total"]
    if est <= cap:
        return f"fits {gpu} ({_fmt(est)} of {_fmt(cap)}, {_fmt(cap - est)} left for buffers and the CUDA context)"
    switches = []
    if kw.get("moment_bytes", 4) > 2:
        switches.append(("BF16 Adam moments as the paper (--adam-moments-dtype bf16)", dict(kw, moment_bytes=2)))
    if not kw.get("recompute_full"):
        switches.append(("full recomputation (--recompute-granularity full)", dict(kw, recompute_full=True)))
    if not (cfg.fp8.enabled if kw.get("fp8") is None else kw["fp8"]):
        switches.append(("FP8 training as the paper (--fp8)", dict(kw, fp8=True)))
    options = []
    for text, kwa in switches:
        alt = estimate_memory(cfg, micro_batch_size, data_parallel_size, **kwa)["total"]
        if alt < est:
            options.append(f"{text}: {_fmt(alt)}{', fits' if alt <= cap else ''}")
    head = (f"WARNING: the estimate {_fmt(est)} exceeds the {gpu}'s {_fmt(cap)}: this layout does not fit as "
            f"configured.")
    if not options:
        return head + " None of BF16 moments, full recomputation or FP8 lowers it: more GPUs (PP, EP, DP) are needed."
    return head + " Lower (estimated): " + "; ".join(options) + "."


def _resolve(argv):
    """The trainer's flags -> (args, cfg, micro-batch, data-parallel size, estimate_memory's keywords)."""
    from megatron_dsv3.training.arguments import TRAIN_DEFAULTS, build_parser, config_from_args
    p = build_parser()
    p.add_argument("--world-size", type=int, default=None, help="GPUs in the job (default: TP*PP)")
    p.add_argument("--gpu", default=None, help=f"compare with this GPU's memory: {', '.join(GPU_MEMORY_GIB)}")
    args, _ = p.parse_known_args(argv)
    if args.bf16 is None:
        args.bf16 = True
    cfg = config_from_args(args, on_gpu=True)
    par = cfg.parallel
    world = args.world_size or par.tensor_model_parallel_size * par.pipeline_model_parallel_size
    dp = world // (par.tensor_model_parallel_size * par.pipeline_model_parallel_size * par.context_parallel_size)
    moments = args.adam_moments_dtype or {**TRAIN_DEFAULTS["*"], **TRAIN_DEFAULTS.get(cfg.name, {})}["adam_moments_dtype"]
    kw = dict(moment_bytes=2 if moments == "bf16" else 4, recompute_full=args.recompute_granularity == "full")
    return args, cfg, args.micro_batch_size or 1, dp, kw


def estimate_for_flags(argv) -> float:
    """The estimate's total (GiB per GPU) for a run of the trainer with these flags (e.g. to pack several runs onto
    one GPU: bench/fp8_accuracy.py --parallel)."""
    _, cfg, mb, dp, kw = _resolve(argv)
    return estimate_memory(cfg, mb, dp, **kw)["total"]


def main(argv=None) -> int:
    """python -m megatron_dsv3.training.memory <the trainer's flags>: prints the resolved layout and the estimate."""
    args, cfg, mb, dp, kw = _resolve(argv)
    print(describe(cfg, mb, dp, **kw))
    if args.gpu:
        print(fit_report(cfg, mb, dp, args.gpu, **kw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
