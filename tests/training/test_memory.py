"""training/memory.py counts what is really held: Adam's moments at the bytes the optimizer stores them in, and the
routed experts' FP8 activations at what fp8/experts.py keeps for backward (measured here, not restated)."""
import pytest
import torch

from megatron_dsv3.config import DSV3Config
from megatron_dsv3.training.memory import FP8_TILE_BYTES, activation_bytes_per_token, estimate_memory, main


def test_optimizer_bytes_per_moment_follow_the_dtype():
    cfg = DSV3Config.from_preset("dsv3-671b").replace(
        parallel={"pipeline_model_parallel_size": 16, "expert_model_parallel_size": 64,
                  "num_layers_in_first_pipeline_stage": 3, "num_layers_in_last_pipeline_stage": 2})
    fp32 = estimate_memory(cfg, 1, 128, moment_bytes=4)
    bf16 = estimate_memory(cfg, 1, 128, moment_bytes=2)
    assert bf16["optimizer"] / fp32["optimizer"] == pytest.approx((4 + 2 * 2) / (4 + 2 * 4))     # master + 2 moments
    assert bf16["weights"] == fp32["weights"] and bf16["activations"] == fp32["activations"]


def _saved_bytes(fn, *args, exclude=()):
    """Bytes autograd keeps for backward while fn(*args) runs, tensors in `exclude` (the weights) not counted."""
    skip = {t.data_ptr() for t in exclude}
    seen = {}

    def pack(t):
        if t.data_ptr() not in skip:
            seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(seen.values())


def test_fp8_routed_expert_bytes_are_what_fp8_experts_keeps():
    """Per routed token the estimate counts (h + 2f) x (1 + 4/128) bytes in FP8 (x and the SwiGLU input with their
    tile scales) and (h + 2f) x 2 in BF16 (x and h1; the SwiGLU output is made again in backward); fp8_expert_mlp's saved tensors on 4 experts x 128 tokens, h = 256,
    f = 128, match within 2% (the grouped 128x1 column tiles pad each expert's rows to 128: none here)."""
    from megatron_dsv3.fp8.experts import fp8_expert_mlp
    from megatron_dsv3.moe.experts import GroupedExperts
    h, f, E, n = 256, 128, 4, 128
    g = torch.Generator().manual_seed(0)
    x = torch.randn(E * n, h, generator=g, dtype=torch.bfloat16, requires_grad=True)
    w1 = torch.randn(E, h, 2 * f, generator=g, dtype=torch.bfloat16, requires_grad=True)
    w2 = torch.randn(E, f, h, generator=g, dtype=torch.bfloat16, requires_grad=True)
    counts = torch.full((E,), n, dtype=torch.int64)
    fp8 = _saved_bytes(fp8_expert_mlp, x, counts, w1, w2, exclude=(w1, w2, counts))
    bf16 = _saved_bytes(GroupedExperts.expert_mlp, None, x, counts, w1, w2, exclude=(w1, w2, counts))

    cfg = DSV3Config.from_preset("tiny").replace(hidden_size=h, moe={"expert_ffn_hidden_size": f, "top_k": 1})
    est_fp8 = activation_bytes_per_token(cfg, True, False, fp8=True) - activation_bytes_per_token(cfg, True, False,
                                                                                                  fp8=False)
    per_token_bf16 = (h + 2 * f) * 2                  # x, h1 (the GPU's grouped path makes a = SwiGLU(h1) again)
    per_token_fp8 = est_fp8 + per_token_bf16          # the estimate's FP8 routed-expert bytes per routed token
    assert per_token_fp8 == pytest.approx((h + 2 * f) * FP8_TILE_BYTES)
    assert fp8 / (E * n) == pytest.approx(per_token_fp8, rel=0.02), (fp8 / (E * n), per_token_fp8)
    # the BF16 side the estimate replaces is a lower bound of what the CPU's padded BF16 experts keep (x, h1 and a:
    # 1552 bytes a token measured against (h + 3f) x 2 = 1280, silu(gate) kept apart): the FP8 saving is not overstated
    assert bf16 / (E * n) >= (h + 3 * f) * 2 >= per_token_bf16


def test_main_prints_the_moments_dtype(capsys):
    base = ["--preset", "dsv3-671b", "--pipeline-model-parallel-size", "16", "--expert-model-parallel-size", "64",
            "--decoder-first-pipeline-num-layers", "3", "--decoder-last-pipeline-num-layers", "2",
            "--train-iters", "10", "--global-batch-size", "2048", "--world-size", "2048", "--gpu", "H800"]
    main(base)
    paper = capsys.readouterr().out
    main(base + ["--adam-moments-dtype", "fp32", "--micro-batch-size", "2"])     # does not fit: the advice
    fp32 = capsys.readouterr().out
    main(base + ["--fp8"])
    fp8 = capsys.readouterr().out
    assert "BF16 moments" in paper and "FP32 moments" in fp32      # dsv3-671b's default: the paper's BF16
    assert "BF16 Adam moments as the paper (--adam-moments-dtype bf16)" in fp32
    assert "fits H800 (71.4 GiB" in paper and "WARNING" not in paper   # the paper's layout fits (estimated)
    assert "--fp8" in fp32 and "being built" not in fp32 + paper
    assert "(routed experts in FP8)" in fp8 and "FP8 training as the paper" not in fp8


def test_activation_estimate_matches_the_h200_measurement():
    """The per-layer activation estimate at V3 width (32 experts top-8 + 1 shared, bf16) against what
    bench/bench_stack.py measured kept on the H200 (2026-11-29, session 4, commit 01f49bf; bytes per token after the
    forward minus before, so without the block's input): MLA alone (the attention module: its input is the norm
    output) 172,584 B/token, with the paper's recomputation 37,504; DeepSeekMoE alone 234,056 (then keeping the
    SwiGLU output, k * f * 2 = 32,768, which the grouped experts make again for dW2 since, and megatron's GLU
    temporaries of the shared expert, 2 f * 2 = 8,192, which mlp.SwiGLUMLP does not keep: 193,096 measured on
    2026-11-30, session 5, commit b6f2638); the 4-layer stack
    523,496 without and 359,736 B/token/layer with the recomputation (norms + MLA up-projections).
    Earlier code measured there, for the record: MLA alone 181,032 (RMSNorm kept a float32 copy of x and the
    normalised x, 6 bytes an element where it keeps 2 now), DeepSeekMoE 377,512 (the router's float32 input copy and
    the expert output rows kept for the gates' gradient, both gone), a recompute saving of 98,224 (q, k, v stayed)."""
    from megatron_dsv3.training.memory import attention_elements_per_token, mlp_bytes_per_token
    cfg = DSV3Config.from_preset("dsv3-671b").replace(
        recompute_norms=False, mla={"recompute_up_proj": False},
        moe=dict(num_experts=32, n_group=8, topk_group=4, top_k=8, first_k_dense_replace=1))
    rec = cfg.replace(recompute_norms=True, mla={"recompute_up_proj": True})
    h = cfg.hidden_size
    mla = attention_elements_per_token(cfg, False) * 2 - 2 * (2 * h)          # less the input and the norm output
    mla_rec = attention_elements_per_token(rec, True) * 2 - 2 * h             # less the input (no norm output kept)
    moe = mlp_bytes_per_token(cfg, True) - 2 * (2 * h)                        # less the input and the pre-MLP norm output
    assert mla == pytest.approx(172_584, rel=0.01)
    assert mla_rec == pytest.approx(37_504, rel=0.02)
    f = cfg.moe.expert_ffn_hidden_size
    assert moe == pytest.approx(234_056 - 8 * f * 2 - 2 * f * 2, rel=0.01)  # SwiGLU outputs remade/not kept since
    assert moe == pytest.approx(193_096, rel=0.005)      # measured so on 2026-11-30 (session 5, commit b6f2638)
    # the paper's recomputation drops both norm outputs, the latent norms' outputs and q, k, v: on the stack
    saved = activation_bytes_per_token(cfg, True, False) - activation_bytes_per_token(rec, True, True)
    latents = cfg.mla.q_lora_rank + cfg.mla.kv_lora_rank
    qkv = cfg.num_attention_heads * (2 * cfg.mla.qk_head_dim + cfg.mla.v_head_dim)
    assert saved == 2 * (2 * h) + 2 * (latents + qkv)
    assert saved == activation_bytes_per_token(cfg, False, False) - activation_bytes_per_token(rec, False, True)
    assert saved == pytest.approx(523_496 - 359_736, rel=1e-3)


def test_fit_report_names_only_the_switches_that_lower_the_estimate(monkeypatch):
    """A layout that does not fit: the report lists what lowers the estimate, each with its number and whether it
    alone fits; FP8 (smaller activations, +2 bytes a parameter of weight copies) is left out where it raises it --
    it was once offered under "what would fit" at 5130 GiB against 3882."""
    from megatron_dsv3.training import memory
    cfg = DSV3Config.from_preset("dsv3-671b").replace(
        parallel={"pipeline_model_parallel_size": 16, "expert_model_parallel_size": 64,
                  "num_layers_in_first_pipeline_stage": 3, "num_layers_in_last_pipeline_stage": 2})
    kw = dict(moment_bytes=4)
    est = estimate_memory(cfg, 1, 128, **kw)["total"]
    alts = {"moments": estimate_memory(cfg, 1, 128, moment_bytes=2)["total"],
            "recompute": estimate_memory(cfg, 1, 128, moment_bytes=4, recompute_full=True)["total"],
            "fp8": estimate_memory(cfg, 1, 128, moment_bytes=4, fp8=True)["total"]}
    cap = (est + min(alts["moments"], alts["recompute"])) / 2          # between the best switch and as configured
    monkeypatch.setitem(memory.GPU_MEMORY_GIB, "TEST", cap)
    text = memory.fit_report(cfg, 1, 128, "TEST", **kw)
    assert text.startswith("WARNING: the estimate") and "Lower (estimated): " in text, text
    for name, flag in (("moments", "--adam-moments-dtype bf16"), ("recompute", "--recompute-granularity full"),
                       ("fp8", "--fp8")):
        assert (flag in text) == (alts[name] < est), (name, alts[name], est, text)
    best = "--adam-moments-dtype bf16" if alts["moments"] < alts["recompute"] else "--recompute-granularity full"
    assert f"{best}): " in text and text.split(f"{best}): ", 1)[1].split(";")[0].rstrip(".").endswith(", fits"), text
    monkeypatch.setitem(memory.GPU_MEMORY_GIB, "TEST", 1.0)
    assert "fits" not in memory.fit_report(cfg, 1, 128, "TEST", **kw).split("Lower")[1]
    # every expert on every GPU (no EP): FP8's weight copies outweigh its smaller activations -- not offered
    flat = DSV3Config.from_preset("dsv3-671b")
    assert estimate_memory(flat, 1, 2048, moment_bytes=2, fp8=True)["total"] > \
        estimate_memory(flat, 1, 2048, moment_bytes=2)["total"]
    text = memory.fit_report(flat, 1, 2048, "H800", moment_bytes=2)
    assert "--fp8" not in text and "--recompute-granularity full" in text, text
