"""The GPU fast-path table in one command: our BF16 stack and its parts beside megatron-core + Transformer Engine.

    python bench/bench_stack.py --rounds 3 --out bench/results.md            # H200: every part, ours and the peer
    python bench/bench_stack.py --parts moe,stack --impls ours --rounds 1    # a subset
    python bench/bench_stack.py --smoke                                       # CPU: tiny sizes, ours only (a test runs it)

Parts, at DeepSeek-V3 width (hidden 7168, 128 heads, MLA q/kv ranks 1536/512, 32 routed experts top-8 in 8 groups
top-4 + 1 shared, expert FFN 2048, dense FFN 18432, vocab 129280), micro-batch 1 x seq 4096, bf16, forward+backward:
  stack      4 layers (1 dense + 3 MoE) + embedding, final norm, output head and cross entropy; MTP off
  dense      one dense TransformerLayer (MLA + SwiGLU MLP)
  moe_layer  one MoE TransformerLayer (MLA + DeepSeekMoE)
  mla        the attention block alone (MLA projections, rope, core attention)
  moe        the MoE block alone (router, routed and shared experts)
Implementations: `ours` (build_model / specs.py, local backend) and `mcore-te` (megatron-core's own GPTModel and
layers from get_gpt_decoder_layer_specs with Transformer Engine: TE linears and fused attention, MLA, TEGroupedMLP,
permute and router fusion, alltoall dispatcher at EP=1), skipped with a note where TE does not import. The other
`ours-*` names are A/B switches of one piece each (NAMES below says which; several join with "+", e.g.
ours-fa4+cublas-wgrad), each the alternative to what runs by default: ours-fa4 (a tie with cuDNN alone),
ours-cublas-wgrad (the routed experts' weight gradients as before quack), ours-dense-embedding-grad (the word
embedding's gradient made dense, as before its row-by-row accumulation). FlashAttention-4 and quack come from
bench/fetch_fa4.sh.

Hygiene (the same peer measured 221-265 ms depending on what ran before it in one process): every (part, impl, round)
is a fresh `--child` process; the order of impls alternates per round; per process the median of `--iters` steps after
`--warmup`; the table gives every round's median and their median. Columns: ms, model TFLOP/s (megatron_dsv3.accounting:
3 x (activated matmul FLOPs + causal attention)) and its share of the H200's measured bf16 matmul rate (779), peak GiB,
and the bytes one forward keeps for backward per token per layer (allocated after the forward minus before, output
excluded, over tokens and layers). `--profile PART` adds, for one step of each implementation, the GPU's idle time
inside the step (where it waited for the host) and the top CUDA kernels; `--trace DIR` keeps those steps' traces.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATMUL_TFLOPS = 779.0
PARTS = ("stack", "dense", "moe_layer", "mla", "moe")
TITLES = {"stack": "4 layers (1 dense + 3 MoE) + embedding, head, loss", "dense": "dense layer (MLA + MLP)",
          "moe_layer": "MoE layer (MLA + DeepSeekMoE)", "mla": "MLA alone", "moe": "DeepSeekMoE alone"}
IMPLS = ("ours", "mcore-te", "ours-fp8", "mcore-te-fp8", "ours-recompute", "ours-fp8-hostloop", "ours-fp8-nocache",
         "ours-fp8-fpropcache", "ours-fp8-restep", "ours-unfused-expert-wgrad", "ours-dense-embedding-grad",
         "ours-fa4", "ours-quack-wgrad", "ours-cublas-wgrad", "ours-fp8-bf16experts")
NAMES = {"ours": "ours BF16", "mcore-te": "megatron-core + TE BF16",
         "ours-fp8": "ours FP8 (native; FP8Config's defaults: Triton grouped GEMMs)",
         "ours-recompute": "ours BF16, the paper's recomputation (norms + MLA up-projections)",
         "mcore-te-fp8": "megatron-core + TE FP8 (Float8BlockScaling)",
         "ours-fp8-hostloop": "ours FP8 (native), one cuBLAS GEMM per expert (FP8Config.grouped_gemm='host_loop')",
         "ours-fp8-bf16experts": "ours FP8 (native) for every linear but the routed experts, which stay BF16 "
                                 "(FP8Config.bf16_modules + experts: cuBLAS block-scaled GEMMs where they beat bf16, "
                                 "the grouped BF16 GEMMs where the Triton FP8 ones do not)",
         "ours-fp8-nocache": "ours FP8 (native), weights quantised at each use (FP8Config.weight_cache=False: no FP8 "
                             "weight copies kept, 2 bytes a parameter less)",
         "ours-fp8-fpropcache": "ours FP8 (native), Fprop's FP8 weight copy kept, Dgrad's a byte transpose of it "
                                "(FP8Config.weight_cache='fprop': 1 byte a parameter less)",
         "ours-fp8-restep": "ours FP8 (native), the FP8 weight copies made again every step, as after an optimizer "
                            "step (one micro-batch a step; the other FP8 rows, ours and TE's, reuse them as the "
                            "micro-batches after the first of a step do)",
         "ours-unfused-expert-wgrad": "ours BF16, experts' weight gradients by autograd + add (GroupedExperts.fuse_wgrad "
                                      "False)",
         "ours-dense-embedding-grad": "ours BF16, the word embedding's gradient made dense by F.embedding's backward "
                                      "(DSV3Model.embedding_row_grad False, as before embedding_grad.py)",
         "ours-fa4": "ours BF16, MLA's attention core through FlashAttention-4 (SDPAttention backends 'fa4' first; "
                     "needs flash-attn-4: bench/fetch_fa4.sh)",
         "ours-quack-wgrad": "ours BF16, the routed experts' weight gradients in one quack grouped GEMM with "
                             "accumulation for any buffer (GroupedExperts.wgrad = 'quack'; the default 'auto' takes "
                             "it for bf16 buffers where quack imports: bench/fetch_fa4.sh)",
         "ours-cublas-wgrad": "ours BF16, the routed experts' weight gradients one cuBLAS GEMM per expert "
                              "(GroupedExperts.wgrad = 'cublas', as before quack)"}


SWITCHES = ("unfused-expert-wgrad", "dense-embedding-grad", "fa4", "quack-wgrad", "cublas-wgrad")


def impl_name(impl: str) -> str:
    """The table's words for an implementation; a '+' combination of switches lists each one's."""
    if impl in NAMES:
        return NAMES[impl]
    return "ours BF16 with: " + "; ".join(NAMES["ours-" + n][len("ours BF16, "):] for n in switches_of(impl))


def bench_config(smoke: bool, num_layers: int = 4):
    from megatron_dsv3.config import DSV3Config
    if smoke:
        return DSV3Config.from_preset("tiny").replace(num_layers=num_layers, params_dtype="float32",
                                                      moe={"first_k_dense_replace": 1}, mtp={"num_layers": 0})
    return DSV3Config.from_preset("dsv3-671b").replace(
        num_layers=num_layers, recompute_norms=False, mla={"recompute_up_proj": False},
        moe=dict(num_experts=32, n_group=8, topk_group=4, top_k=8, first_k_dense_replace=1),
        mtp={"num_layers": 0})


def peer_transformer_config(cfg, fp8: bool = False):
    """megatron-core's own DeepSeek-V3 configuration at the same sizes: MLATransformerConfig through our one bridge,
    plus its MoE fields (bench_layers.mcore_moe_transformer_config) and the fusions a TE user turns on; fp8: TE's
    block-wise recipe (E4M3, 1x128 / 128x128), which TransformerBlock enters per layer."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_layers import mcore_moe_transformer_config
    tc = mcore_moe_transformer_config(cfg, grouped_gemm=True, fusion=True)
    fields = dict(moe_layer_freq=[0 if i < cfg.moe.first_k_dense_replace else 1 for i in range(cfg.num_layers)],
                  bias_activation_fusion=True, bias_dropout_fusion=True, masked_softmax_fusion=True,
                  persist_layer_norm=True, apply_rope_fusion=False, cross_entropy_loss_fusion=True,
                  gradient_accumulation_fusion=False, bf16=True)
    if fp8:
        fields.update(fp8="e4m3", fp8_recipe="blockwise")
    for k, v in fields.items():
        if hasattr(tc, k):
            setattr(tc, k, v)
    return tc


def _layer_specs_peer(tc):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_layer_specs
    return get_gpt_decoder_layer_specs(tc, use_transformer_engine=True)


def _switch(name: str, dev):
    """One BF16 A/B switch -> (class, attributes to set on each of its modules) or None for a class-level flag."""
    if name == "unfused-expert-wgrad":
        from megatron_dsv3.moe.experts import GroupedExperts
        return GroupedExperts, {"fuse_wgrad": False}
    if name == "quack-wgrad":
        from megatron_dsv3.fused_wgrad import quack_gemm_add_inplace
        from megatron_dsv3.moe.experts import GroupedExperts
        if dev.type == "cuda" and quack_gemm_add_inplace() is None:
            raise RuntimeError("ours-quack-wgrad: quack does not import here (bench/fetch_fa4.sh)")
        return GroupedExperts, {"wgrad": "quack"}
    if name == "cublas-wgrad":
        from megatron_dsv3.moe.experts import GroupedExperts
        return GroupedExperts, {"wgrad": "cublas"}
    if name == "fa4":
        from megatron_dsv3.mla.core_attention import DEFAULT_CUDA_BACKENDS, SDPAttention, flash_attn_4
        if dev.type == "cuda" and flash_attn_4() is None:
            raise RuntimeError("ours-fa4: flash_attn.cute does not import here (bench/fetch_fa4.sh)")
        return SDPAttention, {"backends": ("fa4",) + DEFAULT_CUDA_BACKENDS}
    if name == "dense-embedding-grad":
        from megatron_dsv3.model import DSV3Model
        DSV3Model.embedding_row_grad = False           # this child process builds one model
        return None
    raise ValueError(name)


def switches_of(impl: str):
    """'ours-fa4+quack-wgrad' -> ['fa4', 'quack-wgrad']: BF16 A/B switches, alone or several at once; None otherwise."""
    if not impl.startswith("ours-"):
        return None
    names = impl[len("ours-"):].split("+")
    return names if all(n in SWITCHES for n in names) else None


def _ours_with(part, cfg, dev, pg, names):
    """Our build of `part` with the named switches on (attributes set on every module of their classes)."""
    sets = [x for x in (_switch(n, dev) for n in names) if x is not None]
    out = build(part, "ours", cfg, dev, pg)
    for m in out[0].modules():
        for cls, attrs in sets:
            if isinstance(m, cls):
                for k, v in attrs.items():
                    setattr(m, k, v)
    return out


def build(part: str, impl: str, cfg, dev, pg):
    """-> (module, call(module) -> tensor to backprop, layers counted)."""
    if switches_of(impl):
        return _ours_with(part, cfg, dev, pg, switches_of(impl))
    if impl == "ours-fp8-restep":         # an optimizer step between steps: the weights' FP8 copies dropped
        from megatron_dsv3.fp8.weight_cache import drop_caches
        mod, loss_of, layers = build(part, "ours-fp8", cfg, dev, pg)
        return mod, (lambda m: (drop_caches(m), loss_of(m))[1]), layers
    import torch
    from megatron.core.transformer.spec_utils import build_module

    fp8_extra = {}
    if impl == "ours-fp8-hostloop":       # the routed experts' FP8 GEMMs one cuBLAS call per expert (offsets on the host)
        impl, fp8_extra = "ours-fp8", {"grouped_gemm": "host_loop"}
    if impl == "ours-fp8-bf16experts":    # FP8 where cuBLAS's block-scaled GEMMs run, the routed experts BF16
        from megatron_dsv3.config import FP8_ALWAYS_BF16
        impl, fp8_extra = "ours-fp8", {"bf16_modules": FP8_ALWAYS_BF16 + ("experts",)}
    if impl == "ours-fp8-nocache":        # no per-step FP8 weight copies (what 1 micro-batch a step pays for nothing)
        impl, fp8_extra = "ours-fp8", {"weight_cache": False}
    if impl == "ours-fp8-fpropcache":     # one FP8 copy per weight kept, the transposed one made per backward
        impl, fp8_extra = "ours-fp8", {"weight_cache": "fprop"}
    fp8 = impl.endswith("-fp8")
    impl = impl[:-4] if fp8 else impl
    if fp8 and impl == "ours":
        cfg = cfg.replace(fp8={"enabled": True, "backend": "native", **fp8_extra})
    if impl == "ours-recompute":          # section 3.2.2, as the dsv3-671b preset (bench_config turns it off)
        impl, cfg = "ours", cfg.replace(recompute_norms=True, mla={"recompute_up_proj": True})

    s, h = cfg.seq_length, cfg.hidden_size
    if part == "stack":
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (1, s), generator=g).to(dev)
        labels = torch.roll(ids, -1, dims=1)
        if impl == "ours":
            from megatron_dsv3.model import build_model
            model = build_model(cfg, device=dev)
            return model, lambda m: m(ids, labels=labels).float().mean(), cfg.num_layers
        from megatron.core.models.gpt import GPTModel
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
        tc = peer_transformer_config(cfg, fp8)
        model = GPTModel(tc, get_gpt_decoder_block_spec(tc, use_transformer_engine=True), cfg.vocab_size, s,
                         position_embedding_type="rope").to(dev)
        pos = torch.arange(s, device=dev).unsqueeze(0)
        return model, lambda m: m(ids, pos, None, labels=labels).float().mean(), cfg.num_layers
    x = (torch.randn(s, 1, h, generator=torch.Generator().manual_seed(1)) * 0.5).to(dev, cfg.torch_dtype)
    x.requires_grad_(True)
    if impl == "ours":
        from megatron_dsv3.specs import get_layer_spec, get_mla_spec, get_moe_spec
        tc = cfg.to_transformer_config()
        if part == "mla":
            mod = build_module(get_mla_spec(cfg, "local"), config=tc, layer_number=1, pg_collection=pg)
        elif part == "moe":
            mod = build_module(get_moe_spec(cfg, "local"), config=tc, layer_number=2, pg_collection=pg)
        else:
            moe = part == "moe_layer"
            mod = build_module(get_layer_spec(cfg, moe_layer=moe, backend="local"), config=tc,
                               layer_number=1 + int(moe), pg_collection=pg)
    else:
        tc = peer_transformer_config(cfg, fp8)
        dense_spec, moe_spec = _layer_specs_peer(tc)[0], _layer_specs_peer(tc)[-1]
        if part == "mla":
            mod = build_module(dense_spec.submodules.self_attention, config=tc, layer_number=1, pg_collection=pg)
        elif part == "moe":
            mlp = moe_spec.submodules.mlp
            mod = build_module(mlp, config=tc, pg_collection=pg) if hasattr(mlp, "module") else mlp(
                config=tc, pg_collection=pg)
            if hasattr(mod, "set_layer_number"):
                mod.set_layer_number(2)
        else:
            spec = moe_spec if part == "moe_layer" else dense_spec
            mod = build_module(spec, config=tc, layer_number=2 if part == "moe_layer" else 1, pg_collection=pg)
    mod = mod.to(dev)
    if fp8 and impl == "ours":               # as build_model does: FP8Config's weight cache and grouped backend
        from megatron_dsv3.fp8.weight_cache import configure
        configure(mod, cfg.fp8)
    if part in ("dense", "moe_layer"):
        call = lambda m: m(hidden_states=x, attention_mask=None)
    else:
        call = lambda m: m(x) if part == "moe" else m(x, None)
    if fp8 and impl == "mcore-te":
        # outside a TransformerBlock nothing enters TE's FP8 autocast: enter it around the call, as the block does
        from megatron.core.fp8_utils import get_fp8_context
        plain = call

        def call(m):
            with get_fp8_context(tc):
                return plain(m)
    return mod, lambda m: _first(call(m)), 1


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def child(a) -> dict:
    sys.path.insert(0, REPO)
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    t0 = time.perf_counter()
    import torch
    from megatron_dsv3.compat import get_process_group_collection
    from timing import time_steps
    from megatron_dsv3.testing import single_process

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(0)
    cfg = bench_config(a.smoke, 4 if a.part == "stack" else 2)
    cfg = cfg.replace(seq_length=a.seq)
    with single_process(backend="nccl" if cuda else "gloo"):
        torch.manual_seed(0)
        t1 = time.perf_counter()
        mod, loss_of, layers = build(a.part, a.impl, cfg, dev, get_process_group_collection(None))
        mod.train()
        t2 = time.perf_counter()
        go = None

        def step():
            nonlocal go
            out = loss_of(mod)
            if go is None:
                go = torch.randn_like(out) if out.dim() else torch.ones_like(out)
            out.backward(go)

        times = time_steps(step, a.warmup, a.iters)
        t3 = time.perf_counter()
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0.0
        kept = 0
        if cuda:   # what one forward keeps for backward (grads already allocated, so they do not count)
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            out = loss_of(mod)
            kept = torch.cuda.memory_allocated() - before - out.numel() * out.element_size()
            out.backward(go)
            del out
        prof = None
        if a.profile:
            from torch.profiler import ProfilerActivity, profile
            from timing import gpu_idle
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=acts, with_stack=bool(a.trace)) as p:
                step()
                if cuda:
                    torch.cuda.synchronize()
            prof = p.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=40,
                                          max_name_column_width=70)
            prof = gpu_idle(p.events()) + "\n" + prof
            if a.trace:
                os.makedirs(a.trace, exist_ok=True)
                p.export_chrome_trace(os.path.join(a.trace, f"{a.part}_{a.impl}.json"))
    from megatron_dsv3 import accounting as acc
    T = a.seq
    attn = 3 * (2.0 * acc.attention_matmul_params(cfg) + acc.attention_flops_per_token(cfg, a.seq))
    moe_mm = 3 * 2.0 * (acc.layer_matmul_params(cfg, True) - acc.attention_matmul_params(cfg))
    dense_mm = 3 * 2.0 * (acc.layer_matmul_params(cfg, False) - acc.attention_matmul_params(cfg))
    flops = T * {"stack": 3 * acc.flops_per_token(cfg, a.seq, include_mtp=False) / 3,
                 "dense": attn + dense_mm, "moe_layer": attn + moe_mm, "mla": attn, "moe": moe_mm}[a.part]
    ms = statistics.median(times)
    return {"ms": ms, "all_ms": times, "peak_gib": peak, "kept_bytes_per_token_layer": kept / T / layers,
            "tflops": flops / (ms * 1e-3) / 1e12, "device": torch.cuda.get_device_name(0) if cuda else "CPU",
            "torch": torch.__version__, "profile": prof,
            # where a process's time goes (seconds): imports and process groups, the build, warmup + timed steps
            "phases_s": {"setup": round(t1 - t0, 1), "build": round(t2 - t1, 1), "steps": round(t3 - t2, 1)}}


def _versions() -> dict:
    out = {}
    for name, mod in (("megatron-core", "megatron.core.package_info"), ("transformer-engine", "transformer_engine")):
        code = f"import {mod} as m; print(m.__version__)"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        out[name] = r.stdout.strip() if r.returncode == 0 else "not installed"
    out["commit"] = commit_id()
    return out


def commit_id() -> str:
    """The commit measured: a copy without .git (a device run of `git archive` output) names it in DSV3_COMMIT; never
    a parent directory's."""
    commit = os.environ.get("DSV3_COMMIT")
    if not commit and os.path.isdir(os.path.join(REPO, ".git")):
        commit = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
    return commit or "?"


def _read_state(path, commit: str, error) -> list:
    """The records of a --state file ([] when it does not exist yet); a file of another commit is refused."""
    if not path or not os.path.exists(path):
        return []
    recs = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                _ = (rec["part"], rec["impl"], rec["round"], rec["res"])
            except (ValueError, KeyError, TypeError):
                error(f"--state {path}: line {n} is not a record this script wrote")
            if rec.get("commit") != commit:
                error(f"--state {path} holds results of commit {rec.get('commit')}, this tree is {commit}: "
                      f"give another file")
            recs.append(rec)
    return recs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    p.add_argument("--impls", default="ours,mcore-te", help=f"comma list of {', '.join(IMPLS)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--smoke", action="store_true", help="tiny preset, float32, seq 32, 1 round (CPU check)")
    p.add_argument("--profile", default="", help="comma list of parts whose first run of each implementation prints its GPU idle time and kernel table")
    p.add_argument("--trace", default="", help="with --profile: a folder for each profiled step's Chrome trace "
                   "(CPU ops with Python stacks, CUDA kernels), PART_IMPL.json")
    p.add_argument("--state", default=None, help="JSON-lines file of finished processes: each result is appended as "
                   "it comes, and the (part, impl, round)s already there are not run again, so the same command "
                   "repeated finishes a table that one call's time limit cut (same commit only)")
    p.add_argument("--out", default=None, help="markdown file for the table")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--part", default="stack", help=argparse.SUPPRESS)
    p.add_argument("--impl", default="ours", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(a)), flush=True)
        return
    parts = [x for x in a.parts.split(",") if x]
    impls = [x for x in a.impls.split(",") if x]
    for x in parts:
        if x not in PARTS:
            p.error(f"--parts: unknown part {x!r} (known: {', '.join(PARTS)})")
    for x in impls:
        if x not in IMPLS and not switches_of(x):
            p.error(f"--impls: unknown implementation {x!r} (known: {', '.join(IMPLS)}; and switches joined by "
                    f"'+', e.g. ours-fa4+quack-wgrad)")
    if a.smoke:
        a.seq, a.rounds, a.warmup, a.iters = 32, 1, 1, 2
    vers = _versions()
    if any(x.startswith("mcore-te") for x in impls) and vers["transformer-engine"] == "not installed":
        print("note: Transformer Engine does not import here: the megatron-core + TE rows are skipped", flush=True)
        impls = [x for x in impls if not x.startswith("mcore-te")]
    profile = set(x for x in a.profile.split(",") if x)
    runs = {(part, impl): [] for part in parts for impl in impls}
    info = {}
    profiles = {}
    done = set()
    for rec in _read_state(a.state, vers["commit"], p.error):
        key = (rec["part"], rec["impl"])
        if key in runs and (rec["part"], rec["impl"], rec["round"]) not in done:
            done.add((rec["part"], rec["impl"], rec["round"]))
            runs[key].append(rec["res"])
            if "ms" in rec["res"]:
                info = {k: rec["res"][k] for k in ("device", "torch")}
            if rec.get("profile"):
                profiles[key] = rec["profile"]
    stopped = []                       # SIGTERM (a device call's `timeout`): stop and still write the table
    signal.signal(signal.SIGTERM, lambda signum, frame: stopped.append(signum))
    for r in range(a.rounds):
        for part in parts:
            for impl in (impls if r % 2 == 0 else impls[::-1]):
                if stopped or (part, impl, r) in done:
                    continue
                cmd = [sys.executable, os.path.abspath(__file__), "--child", "--part", part, "--impl", impl,
                       "--warmup", str(a.warmup), "--iters", str(a.iters), "--seq", str(a.seq)]
                if a.smoke:
                    cmd.append("--smoke")
                if part in profile and r == 0:
                    cmd += ["--profile", part] + (["--trace", a.trace] if a.trace else [])
                started = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                wall = time.perf_counter() - started
                line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
                if stopped and not line:
                    continue
                if proc.returncode or not line:
                    res = {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
                else:
                    res = json.loads(line[0][7:])
                    info = {k: res[k] for k in ("device", "torch")}
                    if res.get("profile"):
                        profiles[(part, impl)] = res.pop("profile")
                runs[(part, impl)].append(res)
                if a.state:
                    with open(a.state, "a") as f:
                        f.write(json.dumps({"commit": vers["commit"], "part": part, "impl": impl, "round": r,
                                            "res": res, "profile": profiles.get((part, impl)) if r == 0 else None})
                                + "\n")
                print(part, impl, r, "%.2f ms" % res["ms"] if "ms" in res else res["error"],
                      f"(process {wall:.0f} s: {res.get('phases_s')})", flush=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    lines = [f"# megatron_dsv3 vs megatron-core + Transformer Engine, forward+backward ({now:%Y-%m-%d %H:%M} UTC)", "",
             f"- device: {info.get('device', '?')}; torch {info.get('torch', '?')}; megatron-core "
             f"{vers['megatron-core']}; transformer-engine {vers['transformer-engine']}; commit {vers['commit']}",
             f"- sizes: {'tiny preset, float32 (smoke)' if a.smoke else 'DeepSeek-V3 width, 32 experts top-8 (8 groups top-4) + 1 shared, bf16'}; "
             f"micro-batch 1 x seq {a.seq}",
             f"- {a.rounds} fresh processes per (part, implementation), order alternating per round; each the median "
             f"of {a.iters} steps after {a.warmup} warmup", "",
             "| part | implementation | ms per round | median ms | model TFLOP/s | of 779 | peak GiB | "
             "kept bytes / token / layer | peer BF16 / this |",
             "|---|---|---|---|---|---|---|---|---|"]
    for part in parts:
        med = {}
        for impl in impls:
            ok = [x for x in runs[(part, impl)] if "ms" in x]
            if ok:
                med[impl] = statistics.median(x["ms"] for x in ok)
        for impl in impls:
            rs = runs[(part, impl)]
            ok = [x for x in rs if "ms" in x]
            name = impl_name(impl)
            if not ok:
                why = f"error: {rs[-1].get('error')}" if rs else "not run (stopped by SIGTERM)"
                lines.append(f"| {TITLES[part]} | {name} | {why} | | | | | | |")
                continue
            tf = statistics.median(x["tflops"] for x in ok)
            ratio = (f"**{med['mcore-te'] / med[impl]:.2f}x**" if impl != "mcore-te" and "mcore-te" in med else "")
            lines.append(f"| {TITLES[part]} | {name} | {', '.join('%.1f' % x['ms'] for x in ok)} | {med[impl]:.2f} | "
                         f"{tf:.0f} | {100 * tf / MATMUL_TFLOPS:.0f}% | {max(x['peak_gib'] for x in ok):.2f} | "
                         f"{statistics.median(x['kept_bytes_per_token_layer'] for x in ok):,.0f} | {ratio} |")
    for (part, impl), table in profiles.items():
        lines += ["", f"## Profile of one step: {TITLES[part]}, {impl_name(impl)}", "", "```", table, "```"]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
