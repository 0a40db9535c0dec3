"""The trainer: megatron-core parts put together in the order of one global batch.

    setup:  process groups (gloo on CPU, nccl on GPU; world size 1 under plain `python`) -> parallel_state
            -> model chunks (build_model per virtual stage) -> megatron DDP -> distributed optimizer
            (ZeRO-1) -> datasets -> checkpoint (resume, or --load-hf, or fresh)
    step:   schedules (LR, batch size, MTP lambda, bias gamma at the tokens seen)
            -> get_forward_backward_func() over the micro-batches (finalize_model_grads reduces grads)
            -> optimizer.step() (clips the global grad norm)
            -> apply_expert_bias_update(): ONE all-reduce of the routers' token counts, the bias moves by
               +-gamma identically on every rank; once per global batch, whatever the accumulation
    around: evaluation, logs, atomic checkpoints, a greedy sample and the expert-load summary at the end.

The same code runs on one CPU process and under torchrun on GPUs. On CPU the megatron-core shim is
applied in this process (every torchrun worker runs this code, so each applies it).
"""
from __future__ import annotations

import math
import os
import time
from datetime import timedelta
from functools import partial
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_dsv3.training import checkpointing
from megatron_dsv3.training.arguments import check_world, config_from_args, parallel_state_sizes
from megatron_dsv3.training.data import build_datasets, default_blend, micro_batches, parse_blend
from megatron_dsv3.training.logger import TrainLogger, device_peak_tflops, flops_per_token
from megatron_dsv3.training.schedules import BatchRamp, LRSchedule, num_microbatches
from megatron_dsv3.training.tokenizer import build_tokenizer


# ---- process groups ------------------------------------------------------------------------------------------
# --deterministic-mode's environment, as Megatron-LM's (megatron/training/determinism.py): the defaults, and the
# values accepted where the launcher set one already
DETERMINISTIC_ENV = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8",      # cuBLAS: a fixed workspace configuration
                     "NCCL_ALGO": "Ring",                       # NCCL: a fixed reduction order
                     "NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0"}   # Transformer Engine's attention
DETERMINISTIC_ACCEPTED = {"CUBLAS_WORKSPACE_CONFIG": (":4096:8", ":16:8"),
                          "NCCL_ALGO": ("Ring", "CollnetDirect", "CollnetChain", "^NVLS"),   # each comma token
                          "NVTE_ALLOW_NONDETERMINISTIC_ALGO": ("0",)}


def check_deterministic_env(env=None) -> None:
    """A one-line ValueError naming the variable where the environment already holds a value that is not
    bit-reproducible (NCCL's Tree: its reduction order is not fixed across runs)."""
    env = os.environ if env is None else env
    for k, ok in DETERMINISTIC_ACCEPTED.items():
        v = env.get(k)
        if not v:
            continue
        parts = v.split(",") if k == "NCCL_ALGO" else [v]
        if any(x.strip() not in ok for x in parts):
            raise ValueError(f"--deterministic-mode: {k}={v} is not bit-reproducible; unset it (default "
                             f"{DETERMINISTIC_ENV[k]}) or use {' / '.join(ok)}")


def enable_deterministic_mode() -> dict:
    """--deterministic-mode, before any CUDA, cuBLAS or NCCL work: torch's deterministic algorithms (errors, not
    warnings, for an op without a deterministic form: SDPA's efficient backward then runs without splitting the
    keys) and the environment above where the launcher has not set it. SDPAttention sees the torch setting and
    leaves cuDNN's attention out (core_attention.py). Returns the environment as used."""
    check_deterministic_env()
    torch.use_deterministic_algorithms(True)
    used = {}
    for k, v in DETERMINISTIC_ENV.items():
        if not os.environ.get(k):          # unset or empty: the default
            os.environ[k] = v
        used[k] = os.environ[k]
    return used


def init_distributed(args, cfg) -> torch.device:
    """Default process group + megatron-core parallel_state at cfg.parallel's sizes (reused when the caller made
    them already)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    if getattr(args, "deterministic_mode", False):
        env = enable_deterministic_mode()
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
        if rank == 0:
            print("deterministic mode: torch deterministic algorithms, attention through FlashAttention-4's "
                  "deterministic backward where it imports (else without cuDNN's kernel), "
                  + ", ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    use_cuda = torch.cuda.is_available() and not args.cpu
    if use_cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")   # megatron's torch.compile costs 20 s cold on CPU
        from megatron_dsv3.mcore_cpu import apply_cpu_shim
        apply_cpu_shim(force=True)      # also --cpu on a GPU host
        device = torch.device("cpu")
    if not dist.is_initialized():
        timeout = timedelta(minutes=args.distributed_timeout_minutes)
        backend = "nccl" if use_cuda else "gloo"
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:       # torchrun / srun
            dist.init_process_group(backend, timeout=timeout)
        else:                                                          # plain `python`: a world of one
            from megatron_dsv3.launch import free_port
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                    timeout=timeout)
    import dataclasses
    sizes = parallel_state_sizes(dataclasses.asdict(cfg.parallel))
    check_world(args, cfg, dist.get_world_size())
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(**sizes)
    else:
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size(),
                ps.get_expert_model_parallel_world_size())
        want = (sizes["tensor_model_parallel_size"], sizes["pipeline_model_parallel_size"],
                sizes["expert_model_parallel_size"])
        if have != want:
            raise ValueError(f"parallel_state is initialised with (TP, PP, EP) = {have}, the flags ask for {want}")
    # Megatron-LM's seeding: one stream per pipeline stage; tensor-parallel streams inside the tracker
    seed = args.seed + 100 * ps.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return device


def _chunk_flags(vp_stage, vp_size):
    from megatron.core import parallel_state as ps
    pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return pre, post


def _default_builder(cfg, pre_process, post_process, vp_stage=None, backend="local", recompute=None, device=None,
                     seed=None, **placement):
    """placement: DualPipe(V)'s placement= and shared_embedding= (pipeline/megatron_schedule.py build_chunks)."""
    from megatron_dsv3.model import build_model
    kw = dict(placement)
    if recompute:   # megatron-core's full-layer recomputation, set on the model's TransformerConfig
        kw["transformer_config"] = cfg.to_transformer_config(**recompute)
    # built and initialised on the trainer's device, from --seed (the torch seed is offset per pipeline stage)
    return build_model(cfg, pre_process=pre_process, post_process=post_process, vp_stage=vp_stage, backend=backend,
                       device=device, seed=seed, **kw)


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token loss [b, s] -> (sum, tokens, report): megatron-core averages over the tokens of each
    micro-batch and over the micro-batches; the report sums [loss, tokens] for the global-batch mean."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.float().reshape(-1)
    loss = torch.sum(losses * mask)
    n = mask.sum().to(torch.int)
    return loss, n, {"lm loss": torch.cat([loss.detach().view(1), n.detach().float().view(1)])}


def forward_step(data_iterator, model):
    b = next(data_iterator)
    out = model(b["tokens"], b["position_ids"], None, labels=b["labels"], loss_mask=b["loss_mask"])
    return out, partial(loss_func, b["loss_mask"])


def device_memory(device) -> dict:
    """{allocated, max_allocated, reserved, max_reserved} in GiB on a CUDA device since the start (Megatron-LM's
    memory report), {} elsewhere."""
    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return {}
    g = 2.0 ** 30
    return {"allocated": torch.cuda.memory_allocated(device) / g,
            "max_allocated": torch.cuda.max_memory_allocated(device) / g,
            "reserved": torch.cuda.memory_reserved(device) / g,
            "max_reserved": torch.cuda.max_memory_reserved(device) / g}


class Trainer:
    def __init__(self, args, model_builder: Optional[Callable] = None):
        self.args = args
        self.cfg = config_from_args(args)
        self.device = init_distributed(args, self.cfg)
        from megatron.core import parallel_state as ps
        self.ps = ps
        self.rank = dist.get_rank()
        self.is_writer = self.rank == dist.get_world_size() - 1     # last stage holds the loss
        for note in getattr(args, "notes", ()):
            self._log0(note)
        self._saved = set()                    # iterations whose state (this run's) is saved under --save
        self._check_save_dir()
        self.dp = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        self.tokenizer = build_tokenizer(args.tokenizer)
        if self.tokenizer.vocab_size > self.cfg.vocab_size:
            raise ValueError(f"tokenizer vocabulary ({self.tokenizer.vocab_size}) exceeds the model's "
                             f"vocab_size ({self.cfg.vocab_size}); pass --vocab-size")
        self.ramp = BatchRamp(args.global_batch_size, *(args.rampup_batch_size or (None,)))
        self.lr_schedule = LRSchedule(
            max_lr=args.lr, min_lr=args.min_lr, warmup=args.lr_warmup_iters, hold=args.lr_hold_iters,
            decay=args.lr_decay_iters, style=args.lr_decay_style,
            tail=tuple((int(float(s)), float(v)) for s, v in
                       (x.split(":") for x in (args.lr_tail.split(",") if args.lr_tail else []))))
        self.iteration = 0
        self.consumed_samples = 0
        self.history: List[dict] = []          # per step: iteration, loss, lr, grad_norm (read by tests)
        self.eval_history: List[dict] = []
        self.load_stats: Dict[str, dict] = {}  # per router: accumulated token counts (the summary at the end)
        recompute = None
        if args.recompute_granularity:
            recompute = dict(recompute_granularity=args.recompute_granularity,
                             recompute_method=args.recompute_method, recompute_num_layers=args.recompute_num_layers)
        self._build_model(model_builder or partial(_default_builder, backend=args.transformer_impl,
                                                   recompute=recompute, device=self.device, seed=args.seed))
        self._build_optimizer()
        self._build_data()
        self.ema = None                        # host EMA of the parameters (--ema-decay, training/ema.py)
        if getattr(args, "ema_decay", None):
            from megatron_dsv3.training.ema import ParameterEMA
            self.ema = ParameterEMA(self.chunks, args.ema_decay)
        self._load()

    # ---- setup -------------------------------------------------------------------------------------------
    def _build_model(self, builder):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ps, a = self.ps, self.args
        vp = ps.get_virtual_pipeline_model_parallel_world_size()
        chunks = []
        if self.cfg.parallel.pipeline_schedule in ("dualpipe", "dualpipev"):
            # two chunks per rank placed by the schedule (V shape / mirrored stages)
            from megatron_dsv3.pipeline.megatron_schedule import build_chunks
            chunks = [m.to(self.device) for m in build_chunks(
                self.cfg, partial(builder, self.cfg, vp_stage=None), ps.get_pipeline_model_parallel_rank())]
        for i in range(0 if chunks else vp or 1):
            vp_stage = i if vp else None
            pre, post = _chunk_flags(vp_stage, vp)
            m = builder(self.cfg, pre_process=pre, post_process=post, vp_stage=vp_stage)
            chunks.append(m.to(self.device))   # the default builder builds there; a custom one may not
        self.model_config = tc = chunks[0].config
        # our routers update their bias in apply_expert_bias_update; megatron-core's finalize_model_grads
        # would try its own update for modules with an `expert_bias` attribute (DeepSeekMoE has one)
        tc.moe_router_enable_expert_bias = False
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=a.overlap_grad_reduce,
            overlap_param_gather=a.overlap_param_gather, use_distributed_optimizer=a.use_distributed_optimizer,
            check_for_nan_in_grad=False, bucket_size=None if not a.overlap_grad_reduce else 40_000_000)
        self.chunks = [DistributedDataParallel(config=c.config, ddp_config=ddp_cfg, module=c,
                                               disable_bucketing=i > 0) for i, c in enumerate(chunks)]
        for c in self.chunks:
            c.broadcast_params()
        self.n_params = sum(p.numel() for c in chunks for p in c.parameters())

    def _build_optimizer(self):
        from megatron.core.distributed import finalize_model_grads
        from megatron_dsv3.training.optimizer import build_optimizer

        a, tc = self.args, self.model_config
        bf16 = self.cfg.params_dtype == "bfloat16"
        oc = dict(optimizer="adam", lr=a.lr, min_lr=a.min_lr, weight_decay=a.weight_decay,
                  adam_beta1=a.adam_beta1, adam_beta2=a.adam_beta2, adam_eps=a.adam_eps,
                  clip_grad=a.clip_grad, bf16=bf16, params_dtype=self.cfg.torch_dtype,
                  use_distributed_optimizer=a.use_distributed_optimizer,
                  overlap_param_gather=a.overlap_param_gather)
        # FP32 master weights and gradients always; the moments in --adam-moments-dtype (training/optimizer.py)
        self.optimizer = build_optimizer(oc, self.chunks, getattr(a, "adam_moments_dtype", None) or "fp32")
        tc.finalize_model_grads_func = finalize_model_grads
        tc.grad_scale_func = self.optimizer.scale_loss
        if a.overlap_grad_reduce:
            tc.no_sync_func = [c.no_sync for c in self.chunks] if len(self.chunks) > 1 else self.chunks[0].no_sync

    def _build_data(self):
        a = self.args
        blend = parse_blend(a.data_path) or default_blend(self.tokenizer, a.data_cache_path)
        train_samples = self.ramp.samples_for(a.train_iters)
        valid_samples = a.eval_iters * a.global_batch_size if a.eval_iters else 0   # the same set each time
        self.train_ds, self.valid_ds, _ = build_datasets(
            blend, self.tokenizer, self.cfg.seq_length, a.seed, a.split, [train_samples, valid_samples, 0],
            a.data_cache_path, fim_rate=getattr(a, "fim_rate", 0.0), fim_spm_rate=getattr(a, "fim_spm_rate", 0.0))
        if getattr(a, "fim_rate", 0.0):
            self._log0(f"fill-in-middle: {a.fim_rate:g} of the documents, {a.fim_spm_rate:g} of those in SPM order, "
                       f"before packing")

    def _load(self):
        """--load (a trainer checkpoint: resume; model weights of the converter / Megatron-LM: start from them),
        else --load-hf, else random weights. A missing --load directory starts fresh (parse_args said so)."""
        a = self.args
        state = None
        if a.load:
            state = checkpointing.load_checkpoint(
                a.load, self.chunks, self.optimizer, load_optim=not (a.no_load_optim or a.finetune),
                load_rng=not (a.no_load_rng or a.finetune), log=self._log0, ema=self.ema)
        if state is not None and state["kind"] == "trainer" and not a.finetune:
            self.iteration = state["iteration"]
            self.consumed_samples = state["consumed_samples"]
            if a.save and os.path.abspath(a.save) == os.path.abspath(a.load):
                self._saved.add(self.iteration)      # this state is on disk where --save points
            self._log0(f"resumed from {state['path']} at iteration {self.iteration} "
                       f"(consumed samples {self.consumed_samples}"
                       f"{'' if state['optimizer_loaded'] else '; optimizer state not loaded'})")
            was, now = state.get("adam_moments_dtype", "fp32"), getattr(a, "adam_moments_dtype", None) or "fp32"
            if state["optimizer_loaded"] and was != now:
                self._log0(f"Adam moments saved in {was}, continued in {now} (--adam-moments-dtype)")
        elif state is not None:
            self._log0(f"loaded model weights from {state['path']} ({'--finetune: ' if a.finetune else ''}"
                       f"starting at iteration 0 with a fresh optimizer)")
        if state is None and a.load_hf:
            from megatron_dsv3.checkpoint import load_hf
            for c in self.chunks:
                load_hf(c.module, a.load_hf, show_progress=self.is_writer and a.progress_bar)
            self._log0(f"loaded Hugging Face weights from {a.load_hf}")
        if (state is not None and not state["optimizer_loaded"]) or (state is None and a.load_hf):
            # weights changed under the optimizer: its fp32 main copies must follow
            self.optimizer.reload_model_params()
        if self.ema is not None:
            if state is not None and state["ema_loaded"]:
                self._log0(f"EMA of the parameters (decay {self.ema.decay:g}) resumed from {state['path']}")
            else:
                self.ema.reset_from_params()
                if state is not None or a.load_hf:
                    self._log0(f"EMA of the parameters (decay {self.ema.decay:g}): the checkpoint holds none; "
                               f"starting it from the loaded weights")

    def _check_save_dir(self):
        """--save must not hold another model's checkpoints (they would be mistaken for this run's); one of this
        model that this run did not load from is replaced as the run saves, which is said here."""
        a = self.args
        if not a.save:
            return
        try:
            found = checkpointing.find_checkpoint(a.save)
        except checkpointing.CheckpointUnusable:
            return                              # a directory without checkpoints: nothing to confuse
        if found is None or (a.load and os.path.abspath(a.load) == os.path.abspath(a.save)):
            return
        from megatron_dsv3.config import DSV3Config
        from megatron_dsv3.training.arguments import model_differences
        if found.config is not None:
            diffs = model_differences(DSV3Config.from_dict(found.config), self.cfg)
            if diffs:
                what = "; ".join(f"{f} {theirs} here, {ours} there" for f, _, ours, theirs in diffs[:4])
                raise ValueError(f"--save {a.save} holds checkpoints of another model ({what}); choose another "
                                 f"--save directory")
        self._log0(f"note: --save {a.save} already holds {found.describe()} of this model, not loaded (no --load "
                   f"{a.save}); this run's saves replace same-numbered ones and 'latest'")

    # ---- helpers -------------------------------------------------------------------------------------------
    def _log0(self, msg):
        if self.is_writer:
            print(msg, flush=True)

    @property
    def tokens_seen(self) -> int:
        return self.consumed_samples * self.cfg.seq_length

    def _set_lr(self, lr: float):
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_mult", 1.0)
            g["weight_decay"] = self.args.weight_decay * g.get("wd_mult", 1.0)

    def _iterators(self, batches):
        its = [iter(batches) for _ in self.chunks]
        return its if len(its) > 1 else its[0]

    def _run(self, dataset, consumed, gbs, forward_only):
        from megatron_dsv3.pipeline.megatron_schedule import get_forward_backward_func

        a = self.args
        m = num_microbatches(gbs, a.micro_batch_size, self.dp)
        batches = micro_batches(dataset, consumed, gbs, a.micro_batch_size, self.dp_rank, self.dp, self.device)
        fb = get_forward_backward_func(self.cfg.parallel.pipeline_schedule)
        return fb(forward_step_func=forward_step, data_iterator=self._iterators(batches),
                  model=self.chunks if len(self.chunks) > 1 else self.chunks[0], num_microbatches=m,
                  seq_length=self.cfg.seq_length, micro_batch_size=a.micro_batch_size, forward_only=forward_only)

    def _reduce_loss(self, losses) -> float:
        """Token-mean loss of the global batch, on every rank (computed where the streams end: the last stage,
        rank 0 under DualPipeV, ranks 0 and PP-1 under DualPipe; summed over the pipeline there)."""
        ps = self.ps
        t = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.cfg.parallel.pipeline_schedule in ("dualpipe", "dualpipev"):
            if losses:
                t = torch.stack([x["lm loss"].double() for x in losses]).sum(0).to(self.device)
            dist.all_reduce(t, group=ps.get_data_parallel_group(with_context_parallel=True))
            dist.all_reduce(t, group=ps.get_pipeline_model_parallel_group())
            return float(t[0] / t[1].clamp(min=1))
        if ps.is_pipeline_last_stage(ignore_virtual=True) and losses:
            t = torch.stack([x["lm loss"].double() for x in losses]).sum(0).to(self.device)
            dist.all_reduce(t, group=ps.get_data_parallel_group(with_context_parallel=True))
        if ps.get_pipeline_model_parallel_world_size() > 1:
            dist.broadcast(t, src=ps.get_pipeline_model_parallel_last_rank(),
                           group=ps.get_pipeline_model_parallel_group())
        return float(t[0] / t[1].clamp(min=1))

    def _stage_metrics(self, local: dict) -> dict:
        """Merge a per-stage dict over the pipeline stages (small; only at log steps)."""
        ps = self.ps
        if ps.get_pipeline_model_parallel_world_size() == 1:
            return local
        out = [None] * ps.get_pipeline_model_parallel_world_size()
        dist.all_gather_object(out, local, group=ps.get_pipeline_model_parallel_group())
        merged = {}
        for d in out:
            merged.update(d or {})
        return merged

    # ---- one global batch ----------------------------------------------------------------------------------
    def train_step(self) -> dict:
        from megatron_dsv3.mtp.loss import set_mtp_loss_weight
        from megatron_dsv3.training.hooks import after_optimizer_step

        a, cfg = self.args, self.cfg
        gbs = self.ramp.batch_size_at(self.consumed_samples)
        lr = self.lr_schedule.lr_at(self.iteration, a.train_iters)
        self._set_lr(lr)
        lam = cfg.mtp.loss_weight_at(self.tokens_seen)
        set_mtp_loss_weight(self.chunks, lam)       # also set by after_optimizer_step; a resumed run starts here
        gamma = cfg.moe.bias_rate_at(self.tokens_seen)

        for c in self.chunks:
            c.train()
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = self._run(self.train_ds, self.consumed_samples, gbs, forward_only=False)
        if self.ema is not None:
            self.ema.before_optimizer_step()       # the last EMA snapshot is taken before the weights change
        ok, grad_norm, _ = self.optimizer.step()
        # aux-loss-free balancing (skipped with a skipped step), the next batch's MTP lambda, the EMA
        tokens_before = self.tokens_seen
        router_metrics = after_optimizer_step(self.chunks, cfg, tokens_before, tokens_before + gbs * cfg.seq_length, ok,
                                              ema=self.ema)
        gamma = gamma if ok else 0.0
        for name, m in router_metrics.items():
            s = self.load_stats.setdefault(name, {"layer": m["layer_number"], "counts": 0})
            s["counts"] = s["counts"] + m["tokens_per_expert"].double()
            s["bias_spread"] = m["bias_spread"]
            s["max_vio_last"] = m["max_vio"]
        self.consumed_samples += gbs
        self.iteration += 1
        loss = self._reduce_loss(losses)
        rec = {"iteration": self.iteration, "loss": loss, "lr": lr, "batch_size": gbs, "mtp_lambda": lam,
               "bias_rate": gamma, "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
               "skipped": not ok, "routers": router_metrics}
        self.history.append(rec)
        return rec

    @torch.no_grad()
    def evaluate(self) -> Optional[float]:
        """Validation loss; with --eval-ema of the EMA weights (swapped in, the training weights put back)."""
        a = self.args
        if not a.eval_iters or self.valid_ds is None:
            return None
        if getattr(a, "eval_ema", False) and self.ema is not None:
            with self.ema.swapped_in():
                return self._evaluate()
        return self._evaluate()

    def _evaluate(self) -> float:
        a = self.args
        from megatron_dsv3.mtp.loss import mtp_loss_report
        for c in self.chunks:
            c.eval()
        total = torch.zeros(2, dtype=torch.float64)
        for i in range(a.eval_iters):
            losses = self._run(self.valid_ds, i * a.global_batch_size, a.global_batch_size, forward_only=True)
            loss = self._reduce_loss(losses)
            total += torch.tensor([loss, 1.0], dtype=torch.float64)
        mtp_loss_report(self.chunks, reset=True)   # drop the MTP sums of the evaluation forwards
        for c in self.chunks:
            c.train()
        val = float(total[0] / total[1])
        self.eval_history.append({"iteration": self.iteration, "loss": val})
        return val

    def save(self):
        a = self.args
        checkpointing.save_checkpoint(
            a.save, self.iteration, self.chunks, self.optimizer,
            {"consumed_samples": self.consumed_samples, "tokens": self.tokens_seen, "config": self.cfg.to_dict(),
             "adam_moments_dtype": getattr(a, "adam_moments_dtype", None) or "fp32",
             "tokenizer": dict(self.tokenizer.unique_identifiers)}, ema=self.ema)
        self._saved.add(self.iteration)
        self._log0(f"saved checkpoint {checkpointing.checkpoint_dir(a.save, self.iteration)}")

    # ---- the run -------------------------------------------------------------------------------------------
    def train(self) -> dict:
        from megatron_dsv3.mtp.loss import mtp_loss_report

        a, cfg, ps = self.args, self.cfg, self.ps
        if self.is_writer:
            self._print_banner()
        log = TrainLogger(a.tensorboard_dir, self.is_writer, a.train_iters, a.progress_bar, initial=self.iteration)
        self.logger = log
        if cfg.fp8.enabled and log.writer is not None:      # which GEMMs ran in FP8, beside the curves
            from megatron_dsv3.fp8.recipe import describe
            log.writer.add_text("fp8", describe(cfg), self.iteration)
        fpt = flops_per_token(cfg, cfg.seq_length)
        peak = a.peak_tflops or device_peak_tflops(self.device)
        world = dist.get_world_size()
        first_val = self.evaluate() if self.iteration == 0 and a.eval_interval else None
        if first_val is not None:
            log.print(f"iteration {self.iteration:6d} | validation loss {first_val:.4f}")
            log.scalars(self.iteration, {"val/loss": first_val})
        window = {"t0": time.perf_counter(), "tokens": 0, "steps": 0, "loss": 0.0}
        stop = a.train_iters if a.exit_interval is None else min(a.train_iters, a.exit_interval)
        while self.iteration < stop:
            rec = self.train_step()
            window["tokens"] += rec["batch_size"] * cfg.seq_length
            window["steps"] += 1
            window["loss"] += rec["loss"]
            log.step({"loss": f"{rec['loss']:.3f}"})
            it = self.iteration
            if it % a.log_interval == 0 or it == stop:
                dt = time.perf_counter() - window["t0"]
                tok_s = window["tokens"] / max(dt, 1e-9)
                tflops = tok_s * fpt / world / 1e12
                mtp = mtp_loss_report(self.chunks, reset=True,
                                      group=ps.get_data_parallel_group(with_context_parallel=True))
                routers = self._stage_metrics({n: {k: v for k, v in m.items() if k != "tokens_per_expert"}
                                               for n, m in rec["routers"].items()})
                mtp = self._stage_metrics(mtp)
                s = {"train/loss": rec["loss"], "train/lr": rec["lr"], "train/grad_norm": rec["grad_norm"],
                     "train/batch_size": rec["batch_size"], "train/mtp_lambda": rec["mtp_lambda"],
                     "train/bias_update_rate": rec["bias_rate"], "perf/tokens_per_s": tok_s,
                     "perf/tflops_per_device": tflops, "perf/mfu": tflops / peak if peak else None,
                     "train/tokens": self.tokens_seen}
                mem = device_memory(self.device)
                if mem:       # GPU: what this rank's step peaked at (allocated; reserved = the caching allocator's)
                    s.update({f"memory/{k}_gib": v for k, v in mem.items()})
                for k, v in mtp.items():
                    s[f"train/mtp_loss_depth{k}"] = v
                aux = [m["aux_loss"] for m in routers.values() if m.get("aux_loss") is not None]
                if aux:
                    s["train/seq_balance_loss"] = sum(aux) / len(aux)
                for m in routers.values():
                    n = m["layer_number"]
                    s[f"moe/max_vio/layer{n}"] = m["max_vio"]
                    s[f"moe/bias_spread/layer{n}"] = m["bias_spread"]
                    if m.get("aux_loss") is not None:
                        s[f"moe/seq_balance_loss/layer{n}"] = m["aux_loss"]
                log.scalars(it, s)
                maxvio = max((m["max_vio"] for m in routers.values()), default=float("nan"))
                mtp_s = " ".join(f"mtp{k} {v:.4f}" for k, v in sorted(mtp.items()))
                mfu_s = f" | MFU {100 * tflops / peak:.1f}%" if peak else ""
                log.print(f"iteration {it:6d}/{a.train_iters} | loss {window['loss'] / window['steps']:.4f} | "
                          f"{mtp_s + ' | ' if mtp_s else ''}lr {rec['lr']:.3e} | grad norm {rec['grad_norm']:.3f} | "
                          f"batch {rec['batch_size']} | MaxVio {maxvio:.3f} | {tok_s:,.0f} tok/s | "
                          f"{tflops:.3f} TFLOP/s/dev{mfu_s}"
                          + (f" | peak {mem['max_allocated']:.1f} GiB (reserved {mem['max_reserved']:.1f})"
                             if mem else ""))
                window = {"t0": time.perf_counter(), "tokens": 0, "steps": 0, "loss": 0.0}
            if a.eval_interval and (it % a.eval_interval == 0 or it == a.train_iters):
                val = self.evaluate()
                if val is not None:
                    log.print(f"iteration {it:6d} | validation loss {val:.4f}")
                    log.scalars(it, {"val/loss": val})
                window["t0"] = time.perf_counter()
            if a.save and a.save_interval and it % a.save_interval == 0 and it < a.train_iters:
                self.save()
        if a.save and a.save_final and self.iteration == a.train_iters:
            if self.iteration in self._saved:
                log.print(f"checkpoint of iteration {self.iteration} already in {a.save}: not saved again")
            else:
                self.save()
        log.close()
        return {"history": self.history, "eval": self.eval_history}

    def _print_banner(self):
        a, cfg = self.args, self.cfg
        pc = cfg.parameter_counts()
        print(f"megatron_dsv3 trainer | preset {cfg.name} | {pc['total'] / 1e6:.2f}M parameters "
                  f"({pc['activated'] / 1e6:.2f}M activated, MTP {pc['mtp'] / 1e6:.2f}M) | device {self.device.type} | "
                  f"world {dist.get_world_size()} (TP {a.tensor_model_parallel_size} PP {a.pipeline_model_parallel_size} "
                  f"EP {a.expert_model_parallel_size} DP {self.dp}) | {cfg.params_dtype}")
        print(f"  {a.train_iters} steps x {a.global_batch_size} x {cfg.seq_length} tokens "
                  f"(micro-batch {a.micro_batch_size}) | lr {a.lr:g} -> {a.min_lr:g} ({a.lr_decay_style}, warmup "
                  f"{a.lr_warmup_iters}) | Adam moments {getattr(a, 'adam_moments_dtype', None) or 'fp32'} | tokenizer "
                  f"{type(self.tokenizer).__name__} | train samples {len(self.train_ds)}")
        if cfg.fp8.enabled:
            from megatron_dsv3.fp8.recipe import describe
            print(f"  {describe(cfg)}")

    # ---- after training ------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompt: str, n_tokens: int) -> Optional[str]:
        """Greedy decoding (no KV cache: the whole sequence each step); PP = 1 only."""
        if self.ps.get_pipeline_model_parallel_world_size() > 1 or n_tokens <= 0:
            return None
        model = self.chunks[0].module
        model.eval()
        ids = [self.tokenizer.bos] if getattr(self.tokenizer, "bos", None) is not None else []
        ids += self.tokenizer.tokenize(prompt)
        out = []
        for _ in range(n_tokens):
            x = torch.tensor([ids[-self.cfg.seq_length:]], device=self.device)
            pos = torch.arange(x.shape[1], device=self.device).unsqueeze(0)
            logits = model(x, pos, None, runtime_gather_output=True)            # [1, s, V]
            nxt = int(logits[0, -1, :self.tokenizer.vocab_size].float().argmax())
            if nxt == self.tokenizer.eod:
                break
            ids.append(nxt)
            out.append(nxt)
        model.train()
        return (prompt + self.tokenizer.detokenize(out)).rstrip()

    def expert_load_summary(self) -> str:
        """Per MoE layer: load share of the least and most used expert over the run, MaxVio over the run
        (max load / mean load - 1, paper section 4.5.2), the last batch's MaxVio and the bias spread."""
        stats = self._stage_metrics({n: {"layer": s["layer"], "counts": s["counts"].tolist(),
                                         "bias_spread": s["bias_spread"], "max_vio_last": s["max_vio_last"]}
                                     for n, s in self.load_stats.items()})
        lines = ["expert load (routed tokens per expert, whole run):",
                 "  layer | experts | min share | max share | MaxVio(run) | MaxVio(last batch) | bias spread"]
        for s in sorted(stats.values(), key=lambda s: s["layer"] or 0):
            c = torch.tensor(s["counts"], dtype=torch.float64)
            if c.sum() == 0:
                continue
            share = c / c.sum()
            vio = float(c.max() / c.mean() - 1)
            name = f"{s['layer']} MTP" if (s["layer"] or 0) > self.cfg.num_layers else str(s["layer"])
            lines.append(f"  {name:>5} | {len(c):7d} | {float(share.min()):9.3f} | {float(share.max()):9.3f} | "
                         f"{vio:11.3f} | {s['max_vio_last']:18.3f} | {s['bias_spread']:.4f}")
        return "\n".join(lines)


def run(args, model_builder: Optional[Callable] = None) -> Trainer:
    """Train as the flags say; print the sample and the expert-load summary at the end."""
    t = Trainer(args, model_builder)
    t.train()
    sample = t.generate(args.prompt, args.generate_tokens) if args.generate_tokens else None  # collective over TP
    summary = t.expert_load_summary()                                                        # collective over PP
    if t.is_writer:
        if t.eval_history:
            first, last = t.eval_history[0]["loss"], t.eval_history[-1]["loss"]
            print(f"validation loss {first:.4f} -> {last:.4f} (change {last - first:+.4f})", flush=True)
        if sample is not None:
            print(f"sample (greedy, {args.generate_tokens} tokens max):\n{sample}", flush=True)
        print(summary, flush=True)
    return t
