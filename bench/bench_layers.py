"""Forward+backward speed of our layers and their parts, beside megatron-core's own MoE layer.

    python bench/bench_layers.py --preset proxy-1gpu --seq 4096 --mb 1 --out bench/results.md   # CUDA, bf16
    python bench/bench_layers.py --smoke --out /tmp/smoke.md                                   # CPU, tiny, fp32

Every variant runs in its own try/except: a failure becomes an "error" row and the next variant runs.
Rows (see bench/README.md): a 2-layer model (1 dense + 1 MoE layer, embedding, head, loss; MTP off), one
dense and one MoE TransformerLayer from specs.get_layer_spec, MLASelfAttention alone, core attention under
several SDPA kernel orders, DeepSeekMoE alone, megatron-core's MoELayer (local spec) with the same sizes.
Model FLOPs come from megatron_dsv3.accounting (training = 3 x forward, causal attention); "limit ms" is those
FLOPs at the measured bf16 matmul ceiling of the H200 (780 TFLOP/s, shared/gpu/README.md).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import os
import subprocess
import sys
import time
import traceback
from typing import Callable, List, Optional

import torch

if not torch.cuda.is_available():
    # megatron-core's MoE is torch.compile-wrapped: 20+ s cold on CPU, and it never pays there
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    import torch._dynamo
    torch._dynamo.config.disable = True

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

PEAK_TFLOPS = 989.0            # H200 dense bf16 tensor-core spec
MATMUL_CEILING_TFLOPS = 780.0  # measured bf16 matmul 8192^3 on the H200 (shared/gpu/README.md)


@dataclasses.dataclass
class Row:
    part: str
    variant: str
    owner: str                      # "ours" | "megatron-core"
    flops: Optional[float] = None   # model FLOPs of one forward+backward step
    tokens: int = 0                 # tokens of one step
    ms: Optional[float] = None      # per forward+backward step
    peak_gib: Optional[float] = None
    status: str = "ok"              # "ok" | "error" | "skipped"
    notes: str = ""

    def tflops(self) -> Optional[float]:
        return None if self.ms is None or not self.flops else self.flops / (self.ms * 1e-3) / 1e12

    def limit_ms(self) -> Optional[float]:
        return None if not self.flops else self.flops / (MATMUL_CEILING_TFLOPS * 1e12) * 1e3


class Bench:
    def __init__(self, device: torch.device, warmup: int, iters: int, budget_s: float):
        self.device, self.warmup, self.iters = device, warmup, iters
        self.cuda = device.type == "cuda"
        self.deadline = time.monotonic() + budget_s
        self.rows: List[Row] = []
        self.on_row: Callable[[], None] = lambda: None   # called after every row (writes the partial table)

    def _sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def _time_ms(self, step: Callable[[], None]) -> float:
        for _ in range(self.warmup):
            step()
        self._sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(self.iters):
                step()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / self.iters
        t = time.perf_counter()
        for _ in range(self.iters):
            step()
        return (time.perf_counter() - t) * 1e3 / self.iters

    def _cleanup(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def run(self, row: Row, build: Callable[[], Callable[[], None]]) -> Row:
        """build() -> step(); step() does one forward+backward. Errors become the row's status."""
        self.rows.append(row)
        if time.monotonic() > self.deadline:
            row.status, row.notes = "skipped", "time budget spent (--budget-s)"
            print(f"[skip] {row.part} / {row.variant}: time budget spent", flush=True)
            self.on_row()
            return row
        step = None
        t0 = time.monotonic()
        try:
            self._cleanup()
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
            step = build()
            row.ms = self._time_ms(step)
            if self.cuda:
                row.peak_gib = torch.cuda.max_memory_allocated() / 2**30
        except Exception as e:  # one variant's failure must not stop the others
            row.status = "error"
            msg = (str(e).strip().splitlines() or [""])[0][:240]
            row.notes = (row.notes + "; " if row.notes else "") + f"{type(e).__name__}: {msg}"
            print(f"[error] {row.part} / {row.variant}:", file=sys.stderr, flush=True)
            traceback.print_exc()
        finally:
            step = None
            self._cleanup()
        tf = row.tflops()
        print(f"[{row.status}] {row.part} / {row.variant}: "
              f"{'-' if row.ms is None else f'{row.ms:.2f} ms'}"
              f"{'' if tf is None else f', {tf:.1f} TFLOP/s'} ({time.monotonic() - t0:.1f} s) {row.notes}",
              flush=True)
        self.on_row()
        return row


# ---- building blocks ---------------------------------------------------------------------------------

def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _train_step(module: torch.nn.Module, inputs, grad_out: torch.Tensor, call=None):
    """One forward+backward of module on fixed inputs with a fixed output gradient (grads set to None first)."""
    call = call or (lambda m, xs: m(*xs))

    def step():
        module.zero_grad(set_to_none=True)
        for x in inputs:
            x.grad = None
        _first(call(module, inputs)).backward(grad_out)
    return step


def _hidden(s: int, b: int, h: int, dtype, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(s, b, h, generator=g, dtype=torch.float32).to(device=device, dtype=dtype).requires_grad_()


def _grad(shape, dtype, device, seed: int = 1) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float32) * 1e-2).to(device=device, dtype=dtype)


def model_config(cfg):
    """2 layers (1 dense + 1 MoE), MTP off: the unit the model rows time."""
    return cfg.replace(num_layers=2, moe={"first_k_dense_replace": 1}, mtp={"num_layers": 0})


def mcore_moe_transformer_config(cfg, grouped_gemm: bool, fusion: bool = False):
    """megatron-core MoE fields for the same DeepSeekMoE: sigmoid router with expert bias, group-limited top-k,
    top-k scaling, shared expert, sequence-wise aux loss, alltoall dispatcher (EP=1), fp32 router.
    Fields a megatron-core release lacks are dropped by make_transformer_config."""
    moe = cfg.moe
    return cfg.to_transformer_config(
        num_moe_experts=moe.num_experts, moe_router_topk=moe.top_k, moe_ffn_hidden_size=moe.expert_ffn_hidden_size,
        moe_shared_expert_intermediate_size=(moe.num_shared_experts * moe.expert_ffn_hidden_size) or None,
        moe_shared_expert_overlap=False,
        moe_router_num_groups=moe.n_group if moe.n_group > 1 else None,
        moe_router_group_topk=moe.topk_group if moe.n_group > 1 else None,
        moe_router_topk_scaling_factor=moe.routed_scaling_factor,
        moe_router_score_function=moe.score_function,
        moe_router_enable_expert_bias=moe.expert_bias and moe.score_function == "sigmoid",
        moe_router_bias_update_rate=moe.bias_rate_at(0),
        moe_router_pre_softmax=False, moe_router_dtype="fp32",
        moe_router_load_balancing_type="seq_aux_loss", moe_aux_loss_coeff=moe.seq_aux_loss_coeff,
        moe_token_dispatcher_type="alltoall", moe_grouped_gemm=grouped_gemm,
        moe_permute_fusion=fusion, moe_router_fusion=fusion)


def build_mcore_moe_layer(cfg, grouped_gemm: bool, pg_collection, spec: str = "local", fusion: bool = False):
    """megatron-core's MoELayer as its GPT layer spec builds it (0.16: a ModuleSpec; 0.19: a partial).
    spec "local": get_gpt_layer_local_spec; "te": get_gpt_layer_with_transformer_engine_spec (needs TE)."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    tc = mcore_moe_transformer_config(cfg, grouped_gemm, fusion)
    spec_fn = (gpt_layer_specs.get_gpt_layer_local_spec if spec == "local"
               else gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec)
    kwargs = {"normalization": "RMSNorm"} if spec == "local" else {}
    mlp = spec_fn(num_experts=cfg.moe.num_experts, moe_grouped_gemm=grouped_gemm, **kwargs).submodules.mlp
    if isinstance(mlp, ModuleSpec):
        layer = build_module(mlp, config=tc, pg_collection=pg_collection)
    else:  # megatron-core >= 0.19: functools.partial(MoELayer, submodules=...)
        layer = mlp(config=tc, pg_collection=pg_collection)
    if hasattr(layer, "set_layer_number"):
        layer.set_layer_number(1)
    return layer


def _versions():
    out = {"torch": torch.__version__}
    try:
        from megatron.core import package_info
        out["megatron-core"] = package_info.__version__
    except Exception as e:  # pragma: no cover
        out["megatron-core"] = f"? ({e})"
    try:
        out["megatron_dsv3 commit"] = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"],
                                                     capture_output=True, text=True, timeout=10).stdout.strip() or "?"
    except Exception:
        out["megatron_dsv3 commit"] = "?"
    return out


# ---- the benchmark -----------------------------------------------------------------------------------

def run_all(cfg, seq: int, mb: int, bench: Bench) -> None:
    from megatron.core.transformer.spec_utils import build_module

    from megatron_dsv3 import accounting as acc
    from megatron_dsv3.compat import HAVE_TE, get_process_group_collection
    from megatron_dsv3.mla.core_attention import DEFAULT_CUDA_BACKENDS, SDPAttention
    from megatron_dsv3.model import build_model
    from megatron_dsv3.moe.experts import can_use_grouped_mm
    from megatron_dsv3.specs import get_layer_spec, get_mla_spec, get_moe_spec

    dev, dtype = bench.device, cfg.torch_dtype
    s, b, h, T = seq, mb, cfg.hidden_size, seq * mb
    m, moe = cfg.mla, cfg.moe
    pg = get_process_group_collection(None)
    tc = cfg.to_transformer_config()

    attn_core = acc.attention_flops_per_token(cfg, s)                               # forward, per token
    attn_mm = 2.0 * acc.attention_matmul_params(cfg)
    moe_mm = 2.0 * (acc.layer_matmul_params(cfg, True) - acc.attention_matmul_params(cfg))
    dense_mm = 2.0 * (acc.layer_matmul_params(cfg, False) - acc.attention_matmul_params(cfg))

    # 1. the model: embedding, 1 dense + 1 MoE layer, final norm, head, cross entropy
    mcfg = model_config(cfg)

    def build_model_step():
        model = build_model(mcfg).to(dev).train()
        g = torch.Generator(device="cpu").manual_seed(0)
        ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g).to(dev)
        labels = torch.roll(ids, -1, dims=1)

        def step():
            model.zero_grad(set_to_none=True)
            model(ids, labels=labels).float().mean().backward()
        return step
    bench.run(Row("model, 2 layers (1 dense + 1 MoE) + embedding/head/loss", "build_model, MTP off", "ours",
                  flops=acc.flops_per_token(mcfg, s, include_mtp=False) * T, tokens=T), build_model_step)

    # 2. whole layers through megatron-core's TransformerLayer
    for moe_layer, name, mm in ((False, "dense layer (MLA + dense MLP)", dense_mm),
                                (True, "MoE layer (MLA + DeepSeekMoE)", moe_mm)):
        def build_layer(moe_layer=moe_layer):
            layer = build_module(get_layer_spec(cfg, moe_layer=moe_layer, backend="local"), config=tc,
                                 layer_number=1 + int(moe_layer), pg_collection=pg).to(dev).train()
            return _train_step(layer, [_hidden(s, b, h, dtype, dev)], _grad((s, b, h), dtype, dev),
                               call=lambda mod, xs: mod(hidden_states=xs[0], attention_mask=None))
        bench.run(Row(name, "TransformerLayer + get_layer_spec(local)", "ours",
                      flops=3 * (attn_mm + attn_core + mm) * T, tokens=T), build_layer)

    # 3. MLA alone (norms, projections, rope, core attention) under two kernel orders
    for variant, backends in (("SDPA cuDNN first (default)", DEFAULT_CUDA_BACKENDS),
                              ("SDPA torch default priority", ())):
        def build_mla(backends=backends):
            attn = build_module(get_mla_spec(cfg, "local"), config=tc, layer_number=1, pg_collection=pg)
            attn = attn.to(dev).train()
            attn.core_attention.backends = tuple(backends)
            return _train_step(attn, [_hidden(s, b, h, dtype, dev)], _grad((s, b, h), dtype, dev))
        bench.run(Row("MLASelfAttention alone", variant, "ours", flops=3 * (attn_mm + attn_core) * T, tokens=T),
                  build_mla)

    # 4. core attention softmax(q k^T) v alone: q/k d_h + d_h^R, v d_v, causal
    n, dqk, dv = cfg.num_attention_heads, m.qk_head_dim, m.v_head_dim
    for variant, backends in (("SDPA cuDNN first (our default)", DEFAULT_CUDA_BACKENDS),
                              ("SDPA cuDNN only", ("cudnn",)),
                              ("SDPA torch default priority", ()),
                              ("SDPA efficient only", ("efficient",))):
        def build_core(backends=backends):
            core = SDPAttention(tc, 1, softmax_scale=m.softmax_scale(), k_channels=dqk, v_channels=dv,
                                backends=backends).train()
            q = _hidden(s, b, n * dqk, dtype, dev, 2).detach().view(s, b, n, dqk).requires_grad_()
            k = _hidden(s, b, n * dqk, dtype, dev, 3).detach().view(s, b, n, dqk).requires_grad_()
            v = _hidden(s, b, n * dv, dtype, dev, 4).detach().view(s, b, n, dv).requires_grad_()
            return _train_step(core, [q, k, v], _grad((s, b, n * dv), dtype, dev))
        bench.run(Row("core attention alone (SDPAttention)", variant, "ours", flops=3 * attn_core * T, tokens=T,
                      notes=f"q/k {dqk}, v {dv}, {n} heads, causal"), build_core)

    # 5. the MoE layer alone: ours, then megatron-core's with the same sizes
    moe_flops = 3 * moe_mm * T
    sizes = (f"{moe.num_experts} experts top-{moe.top_k}, {moe.n_group} groups top-{moe.topk_group}, "
             f"{moe.num_shared_experts} shared, ffn {moe.expert_ffn_hidden_size}")
    ours_row = Row("MoE alone (router + experts + shared)", "DeepSeekMoE", "ours", flops=moe_flops, tokens=T)

    def build_ours_moe():
        layer = build_module(get_moe_spec(cfg, "local"), config=tc, layer_number=2, pg_collection=pg)
        layer = layer.to(dev).train()
        x = _hidden(s, b, h, dtype, dev)
        fast = can_use_grouped_mm(x, layer.experts.weight1, layer.experts.weight2)
        ours_row.notes = f"experts: {'torch._grouped_mm' if fast else 'padded bmm'}; {sizes}"
        return _train_step(layer, [x], _grad((s, b, h), dtype, dev))
    bench.run(ours_row, build_ours_moe)

    mcore_rows = []
    for grouped in (True, False):
        row = Row("MoE alone (router + experts + shared)", f"megatron-core MoELayer, local spec, "
                  f"moe_grouped_gemm={grouped}", "megatron-core", flops=moe_flops, tokens=T)

        def build_mcore(grouped=grouped, row=row):
            layer = build_mcore_moe_layer(cfg, grouped, pg, "local").to(dev).train()
            row.notes = (f"experts: {type(getattr(layer, 'experts', None)).__name__}, alltoall dispatcher, "
                         f"EP=1; {sizes}")
            return _train_step(layer, [_hidden(s, b, h, dtype, dev)], _grad((s, b, h), dtype, dev))
        bench.run(row, build_mcore)
        mcore_rows.append(row)
        if grouped and row.status == "ok" and "SequentialMLP" in row.notes:
            # the local spec built the per-expert loop anyway (0.19 without TE): the False variant is the same
            break

    # megatron-core's fast experts (TEGroupedMLP) exist only with Transformer Engine
    te_row = Row("MoE alone (router + experts + shared)", "megatron-core MoELayer, TE spec, moe_grouped_gemm=True",
                 "megatron-core", flops=moe_flops, tokens=T)
    if HAVE_TE and bench.cuda:
        def build_mcore_te():
            layer = build_mcore_moe_layer(cfg, True, pg, "te").to(dev).train()
            te_row.notes = (f"experts: {type(getattr(layer, 'experts', None)).__name__}, alltoall dispatcher, "
                            f"EP=1; {sizes}")
            return _train_step(layer, [_hidden(s, b, h, dtype, dev)], _grad((s, b, h), dtype, dev))
        bench.run(te_row, build_mcore_te)
        mcore_rows.append(te_row)
    else:
        te_row.status, te_row.notes = "skipped", "not run: Transformer Engine does not import here"
        bench.rows.append(te_row)
    for row in mcore_rows:
        if row.status == "ok" and ours_row.status == "ok" and ours_row.ms:
            row.notes += f"; {row.ms / ours_row.ms:.2f}x the time of DeepSeekMoE"

    bench.rows.append(Row("MLASelfAttention alone", "megatron-core MLASelfAttention", "megatron-core", status="skipped",
                          notes="not run: megatron-core's MLA needs Transformer Engine"
                                + ("" if HAVE_TE else " (not importable here)")
                                + "; its local DotProductAttention rejects k_channels/v_channels"))


# ---- output ------------------------------------------------------------------------------------------

def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def to_markdown(rows: List[Row], header: dict, cuda: bool) -> str:
    lines = ["# megatron_dsv3 layer benchmark", ""]
    lines += [f"- {k}: {v}" for k, v in header.items()]
    lines += ["", "ms: one forward+backward (CUDA events, mean over iterations after warmup). Model FLOPs: "
              "megatron_dsv3.accounting (3 x forward matmul FLOPs of the activated weights + causal attention). "
              f"MFU: vs {PEAK_TFLOPS:.0f} TFLOP/s (H200 dense bf16 spec) and vs {MATMUL_CEILING_TFLOPS:.0f} "
              f"(measured bf16 matmul ceiling); limit ms = model FLOPs / {MATMUL_CEILING_TFLOPS:.0f} TFLOP/s.", ""]
    lines.append("| part | variant | by | status | ms fwd+bwd | limit ms @780 | tokens/s | model TFLOP/s | "
                 "MFU vs 989 | of 780 | peak GiB | notes |")
    lines.append("|" + "---|" * 12)
    for r in rows:
        tf = r.tflops()
        tok_s = None if r.ms is None or not r.tokens else r.tokens / (r.ms * 1e-3)
        mfu = None if tf is None or not cuda else 100 * tf / PEAK_TFLOPS
        of780 = None if tf is None or not cuda else 100 * tf / MATMUL_CEILING_TFLOPS
        cells = [r.part, r.variant, r.owner, r.status, _fmt(r.ms, ".2f"), _fmt(r.limit_ms(), ".3g"),
                 _fmt(tok_s, ",.0f"), _fmt(tf, ".1f" if cuda else ".4f"),
                 "-" if mfu is None else f"{mfu:.1f}%", "-" if of780 is None else f"{of780:.1f}%",
                 _fmt(r.peak_gib, ".2f"), r.notes.replace("|", "/").replace("\n", " ")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _init_distributed(stack: contextlib.ExitStack, backends: List[str]) -> str:
    """World size 1 + megatron-core parallel_state (TP=PP=EP=1) with the first backend that starts."""
    import torch.distributed as dist

    from megatron_dsv3.testing import single_process
    for backend in backends:
        try:
            stack.enter_context(single_process(seed=1234, backend=backend))
            return f"{backend}, world size 1, TP=PP=EP=1"
        except Exception:
            traceback.print_exc()
            try:
                from megatron.core import parallel_state
                parallel_state.destroy_model_parallel()
            except Exception:
                pass
            if dist.is_initialized():
                dist.destroy_process_group()
    raise RuntimeError(f"could not initialise torch.distributed with any of {backends}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="proxy-1gpu")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--mb", type=int, default=1, help="micro-batch size")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=170.0,
                   help="variants not started within this many seconds are recorded as skipped")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check: tiny preset, float32, seq <= 64, 1 warmup + 2 iterations")
    p.add_argument("--out", default=None, help="markdown file to write the table to")
    return p.parse_args(argv)


def main(argv=None) -> List[Row]:
    threads = torch.get_num_threads()
    try:
        return _main(parse_args(argv))
    finally:
        torch.set_num_threads(threads)   # main() may run inside a test process


def _main(args) -> List[Row]:
    from megatron_dsv3.config import DSV3Config

    cuda = torch.cuda.is_available() and not args.smoke
    if args.smoke:
        cfg = DSV3Config.from_preset("tiny").replace(params_dtype="float32")
        args.seq, args.warmup, args.iters = min(args.seq, 64), 1, 2
        torch.set_num_threads(1)   # tiny ops: threads only contend
    else:
        cfg = DSV3Config.from_preset(args.preset)
        if cuda:
            cfg = cfg.replace(params_dtype="bfloat16")
    cfg = cfg.replace(seq_length=args.seq, max_position_embeddings=max(cfg.max_position_embeddings, args.seq))
    if cuda:
        torch.cuda.set_device(0)
        torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")

    header = {"date (UTC)": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
              "device": torch.cuda.get_device_name(0) if cuda else "CPU", **_versions(),
              "CUDA": torch.version.cuda if cuda else "-",
              "preset": cfg.name, "dtype": cfg.params_dtype, "seq x mb": f"{args.seq} x {args.mb}",
              "warmup / iterations": f"{args.warmup} / {args.iters}"}
    bench = Bench(device, args.warmup, args.iters, args.budget_s)

    def write(final: bool = False) -> str:
        text = to_markdown(bench.rows, header if final else {**header, "status": "partial (run in progress)"}, cuda)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
        return text

    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        bench.on_row = write
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        header["torch.distributed"] = _init_distributed(stack, ["nccl", "gloo"] if cuda else ["gloo"])
        try:
            run_all(cfg, args.seq, args.mb, bench)
        except Exception as e:  # setup outside the per-variant guards: still write what was measured
            traceback.print_exc()
            bench.rows.append(Row("benchmark setup", "run_all", "ours", status="error",
                                  notes=f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:240]}"))
        header["wall time"] = f"{time.monotonic() - t0:.0f} s"
        print(write(final=True), flush=True)   # before the process-group teardown
    return bench.rows


if __name__ == "__main__":
    main()
