"""Which FP8 path trains, and Transformer Engine's side of it (DeepSeek-V3 section 3.3).

Two backends run the paper's fine-grained recipe (E4M3 everywhere, activations and gradients in 1x128 tiles, weights
in 128x128 blocks, FP32 accumulation):

  "te"      Transformer Engine's Float8BlockScaling recipe on TE's linears: megatron-core enters TE's fp8_autocast
            around each layer when its TransformerConfig says fp8="e4m3", fp8_recipe="blockwise"
            (`transformer_config_fp8`); specs.py then builds the FP8 linears from TE's classes. TE has no grouped
            experts in our layout, so the routed experts are ours (fp8/experts.py) in both backends.
  "native"  our kernels: fp8/linear.py and fp8/experts.py through fp8/gemm.py. Runs wherever torch does (the GEMMs
            are emulated off Hopper), so it is the CPU path.
  "auto"    "te" when Transformer Engine imports, else "native" (FP8Config.backend; --fp8-backend).

Scales: TE's block-scaling recipe rounds every scale to a power of 2 (its default, which megatron-core's recipe
keeps: `make_te_recipe` builds that same recipe, so what runs is what this factory says). The paper uses power-of-2
scales only where it quantises activations once for several consumers (the MoE up-projection input, the activation
gradient before the down-projection, the attention output projection's input); the native path follows the paper.
"""
from __future__ import annotations

from typing import Optional

__all__ = ["resolve_backend", "transformer_config_fp8", "make_te_recipe", "FP8_GEMMS", "describe"]


def resolve_backend(fp8) -> Optional[str]:
    """FP8Config -> None (FP8 off) | "te" | "native"; ValueError when "te" is asked for and TE does not import."""
    if fp8 is None or not fp8.enabled:
        return None
    from megatron_dsv3.compat import HAVE_TE
    if fp8.backend == "te" and not HAVE_TE:
        raise ValueError("FP8Config.backend 'te' (--fp8-backend te) needs Transformer Engine, which does not import "
                         "here; use --fp8-backend native (or auto)")
    if fp8.backend == "auto":
        return "te" if HAVE_TE else "native"
    return fp8.backend


def transformer_config_fp8(fp8) -> dict:
    """megatron-core TransformerConfig fields for the TE backend (empty otherwise: the native path needs none)."""
    if resolve_backend(fp8) != "te":
        return {}
    return {"fp8": fp8.format, "fp8_recipe": "blockwise"}


def make_te_recipe(fp8):
    """TE's Float8BlockScaling configured from FP8Config: E4M3 forward and backward, 1-D (1x128) blocks for
    activations and gradients, 2-D (128x128) for weights, split (FP32) accumulation in all three GEMMs. TE fixes
    the block at 128, so FP8Config.act_tile and weight_block must be 128."""
    from transformer_engine.common.recipe import Float8BlockScaling, Format

    if (fp8.act_tile, fp8.weight_block) != (128, 128):
        raise ValueError(f"FP8Config.act_tile / weight_block must be 128 for Transformer Engine's block scaling, got "
                         f"{fp8.act_tile} / {fp8.weight_block}")
    fmt = {"e4m3": Format.E4M3}[fp8.format]
    return Float8BlockScaling(fp8_format=fmt, x_block_scaling_dim=1, w_block_scaling_dim=2, grad_block_scaling_dim=1)


# What runs in FP8, by module, for the trainer's log line (module names as FP8Config.bf16_modules spells them)
FP8_GEMMS = {
    "linear_q_down_proj": "MLA W^DQ", "linear_q_up_proj": "MLA W^UQ/W^QR", "linear_q_proj": "MLA W^Q",
    "linear_kv_down_proj": "MLA W^DKV/W^KR", "linear_kv_up_proj": "MLA W^UK/W^UV", "linear_proj": "MLA W^O",
    "dense_mlp": "dense MLP", "shared_experts": "shared experts", "experts": "routed experts", "eh_proj": "MTP M_k",
}


def describe(cfg) -> str:
    """One line: which GEMMs run in FP8 and through which backend (or that FP8 is off)."""
    backend = resolve_backend(cfg.fp8)
    if backend is None:
        return "FP8: off (BF16 GEMMs)"
    on = [v for k, v in FP8_GEMMS.items() if k not in cfg.fp8.bf16_modules]
    off = [k for k in cfg.fp8.bf16_modules]
    experts = "routed experts native" if "experts" not in cfg.fp8.bf16_modules and backend == "te" else ""
    return (f"FP8: {backend} backend ({experts + '; ' if experts else ''}E4M3, 1x128 activations, 128x128 weights, "
            f"FP32 accumulation) for Fprop/Dgrad/Wgrad of {', '.join(on) or 'nothing'}; BF16: {', '.join(off)}")
