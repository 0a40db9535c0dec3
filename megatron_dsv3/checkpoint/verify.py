"""Does a converted checkpoint compute what the Hugging Face one does? Logits on random-token prompts.

The reference is `transformers`' DeepseekV3/V2ForCausalLM in float32 loading the HF directory (an FP8
checkpoint is first dequantised into a temporary float32 copy: transformers' FP8 path needs a GPU).
Ours is `build_model` at TP=PP=EP=1 in this process, loaded from an HF directory (load_hf) or a
megatron-core dist checkpoint (load_mcore). Meant for models that fit one host's memory twice.
"""
from __future__ import annotations

import os
import tempfile
from typing import Dict

import torch


def is_mcore_dir(path: str) -> bool:
    """A dist checkpoint (ours, Megatron-LM's or the trainer's), as opposed to an HF directory."""
    return any(os.path.exists(os.path.join(path, f))
               for f in ("dsv3_config.json", "latest_checkpointed_iteration.txt", "latest", "metadata.json"))


def hf_reference_model(hf_dir: str, workdir: str):
    """transformers' model in float32 on the checkpoint's (dequantised) weights."""
    from transformers import AutoModelForCausalLM
    from megatron_dsv3.checkpoint.convert import hf_to_hf
    from megatron_dsv3.checkpoint.safetensors_io import HFCheckpoint
    if HFCheckpoint(hf_dir).fp8:
        dq = os.path.join(workdir, "dequantised")
        hf_to_hf(hf_dir, dq, dtype="fp32")
        hf_dir = dq
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return model.eval()


def our_model(path: str, config=None):
    """build_model (TP=PP=EP=1, float32) loaded from an HF directory or a dist checkpoint. Needs
    megatron-core's parallel_state initialised (megatron_dsv3.launch.single_process)."""
    from megatron_dsv3.checkpoint.convert import _build_model, load_hf, load_mcore, read_mcore_config, reading_config
    from megatron_dsv3.checkpoint.safetensors_io import HFCheckpoint
    if is_mcore_dir(path):
        cfg = config or read_mcore_config(path)
    else:
        cfg = config or HFCheckpoint(path).config
    cfg = reading_config(cfg, params_dtype="float32")
    model = _build_model(cfg)
    if is_mcore_dir(path):
        load_mcore(model, path)
    else:
        load_hf(model, path)
    return model.eval(), cfg


@torch.no_grad()
def compare_logits(hf_model, model, vocab_size: int, prompts: int = 4, seq: int = 32,
                   seed: int = 0) -> Dict[str, float]:
    """Max abs / max relative logit difference and mean KL(p_hf || p_ours) on random-token prompts."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab_size, (prompts, seq), generator=g)
    ref = hf_model(tokens).logits.float()
    ours = model(tokens)
    ours = (ours[0] if isinstance(ours, tuple) else ours)[..., :vocab_size].float()
    if ours.shape != ref.shape:      # [s, b, V] from a model that keeps megatron's layout
        ours = ours.transpose(0, 1)
    diff = (ours - ref).abs()
    lp, lq = torch.log_softmax(ref.double(), -1), torch.log_softmax(ours.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean()
    return {"max_abs": diff.max().item(), "max_rel": (diff.max() / ref.abs().max()).item(),
            "kl": kl.item(), "ref_max_abs": ref.abs().max().item(), "prompts": prompts, "seq": seq}


def verify(hf_dir: str, ours: str, prompts: int = 4, seq: int = 32, seed: int = 0) -> Dict[str, float]:
    """Load both sides (ours: an HF directory or a dist checkpoint) and compare their logits."""
    from megatron_dsv3.launch import single_process
    with tempfile.TemporaryDirectory() as work:
        ref = hf_reference_model(hf_dir, work)
        with single_process():
            model, cfg = our_model(ours)
            return compare_logits(ref, model, cfg.vocab_size, prompts, seq, seed)
