"""Megatron-LM integration: our model, flags and once-per-global-batch hooks inside Megatron-LM's own
`pretrain()`. Followed releases (pretrain_gpt.py and megatron/training/training.py read for the contracts):
Megatron-LM tag core_v0.16.1 (commit 55ac7082, megatron-core 0.16.1) and tag core_v0.19.0 (commit 5be96267, whose
megatron/training is the one the megatron-core 0.19.2 wheel ships; run on an H200: docs/megatron_lm.md). From
core_v0.18 on, pretrain_gpt.py parses the arguments itself and hands pretrain() a config container; the launcher
follows whichever form the checkout has.

Three ways in, none of which needs a patched Megatron-LM:

1. The launcher (recommended):
       python -m megatron_dsv3.megatron_lm --megatron-lm /path/to/Megatron-LM <Megatron-LM flags> --dsv3-preset dsv3-671b
   imports Megatron-LM's pretrain_gpt.py as a module (its forward_step, dataset provider and embedding-rank
   rule) and calls `pretrain()` with our builder and `extra_args_provider`.
2. Your own script: `pretrain(..., partial(model_provider_module.model_provider, dsv3_builder), ...,
   extra_args_provider=megatron_dsv3.megatron_lm.extra_args_provider)`; or `model_provider` below, which has
   the plain (pre_process, post_process, vp_stage) signature of older Megatron-LM scripts.
3. pretrain_gpt.py itself, after patches/<release>/0001-pretrain_gpt-dsv3-builder.patch (a convenience).

Hooks (installed by `extra_args_provider`, i.e. as soon as Megatron-LM parses its arguments, before
setup_model_and_optimizer):
* `get_megatron_optimizer` in megatron.training.training is wrapped so that the optimizer it returns runs
  `after_global_batch` right after each `optimizer.step()` (once per global batch, never in evaluation) with the
  step's `update_successful`: our after-step routine (training/hooks.py: the expert-bias update, skipped when the
  optimizer skipped its step; the MTP lambda of the next batch), and the TensorBoard scalars (MTP loss per depth,
  per-layer MaxVio, bias spread, balance loss) on the writer rank — the same routine our trainer runs.
* The model's TransformerConfig gets moe_router_enable_expert_bias=False: megatron's own bias update would
  otherwise find our routers' `expert_bias` buffers and update them a second time.
* `get_forward_backward_func` in megatron.training.training (train() and evaluate() call it by that module global,
  imported from megatron.core.pipeline_parallel, in core_v0.16.1 and core_v0.19.0) is wrapped: with
  --dsv3-pipeline-schedule dualpipe|dualpipev it returns `forward_backward_megatron_lm` (DualPipe/DualPipeV,
  pipeline/megatron_schedule.py), else Megatron-LM's own.

DualPipe(V) in Megatron-LM's loop (--dsv3-pipeline-schedule). Megatron-LM builds one model per rank when no
virtual stages are set; our provider then returns the rank's two chunks (`ModelChunks`, placed by the schedule:
V shape or mirrored stages, layers numbered globally), which get_model keeps as its list of chunks (wrapped,
DDP'd and checkpointed one by one, as with virtual stages). Each chunk's forward_step_func call runs in the
chunk's pipeline role (`_stage_role`: megatron-core's parallel_state says first/last/middle stage for that chunk,
so pretrain_gpt's get_batch reads what the chunk needs), and the loss reports are moved to the last pipeline rank,
where train_step and evaluate read them (the streams end on rank 0 under DualPipeV). Refused in one line naming
the flag: PP < 2, odd PP for dualpipe, virtual stages, --overlap-grad-reduce, --overlap-moe-expert-parallel-comm,
--pipeline-model-parallel-layout, --variable-seq-lengths, too few micro-batches, --reset-position-ids with more
than 2 stages.

Flags Megatron-LM must be given for our model: --num-layers/--hidden-size/--num-attention-heads/--seq-length/
--max-position-embeddings as the preset (they override it), --untie-embeddings-and-output-weights,
--position-embedding-type none, --normalization RMSNorm, --swiglu, --disable-bias-linear, --num-experts N
(Megatron-LM requires it for --expert-model-parallel-size > 1; it must equal the preset's), and
--mtp-num-layers D with pipeline parallelism (Megatron-LM only sends the tokens to the last stage when it
knows there is MTP there). Everything DeepSeek-specific comes from --dsv3-preset and the --dsv3-* flags.
"""
from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from functools import partial
from typing import Optional

import torch

from megatron_dsv3.config import PRESETS, DSV3Config

# the Megatron-LM tags the launcher was checked against, with their commits
MEGATRON_LM_RELEASES = {"core_v0.16.1": "55ac7082517c3878ae653c07c09c534b8aed49f6",
                        "core_v0.19.0": "5be9626709af2722333bf54797c954c09edeada3"}

_ARGS = None          # set_args() for callers without megatron.training (tests, other launchers)
_CONFIG: Optional[DSV3Config] = None   # the config the model was built with (read by the hooks)
_HOOKED = False


# ---- flags ------------------------------------------------------------------------------------------------------
def extra_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the --dsv3-* flags (no name Megatron-LM uses) and installs the training hooks."""
    g = parser.add_argument_group("megatron_dsv3")
    g.add_argument("--dsv3-preset", default="dsv3-671b", choices=sorted(PRESETS),
                   help="feature configs (MLA, MoE, MTP, YaRN) of this preset; sizes come from Megatron-LM's flags")
    g.add_argument("--dsv3-config", default=None, help="a DSV3Config JSON (DSV3Config.to_dict()) instead of a preset")
    g.add_argument("--dsv3-hf-config", default=None, help="a Hugging Face config.json instead of a preset")
    g.add_argument("--dsv3-bias-update-rate", default=None,
                   help="expert-bias gamma by tokens seen, 'tokens:value,...' (paper: '0:0.001,14.3e12:0')")
    g.add_argument("--dsv3-mtp-loss-weight", default=None,
                   help="MTP lambda by tokens seen, 'tokens:value,...' (paper: '0:0.3,10e12:0.1')")
    g.add_argument("--dsv3-seq-aux-loss-coeff", type=float, default=None, help="alpha of the sequence-wise loss")
    g.add_argument("--dsv3-init-method-std", type=float, default=None, help="default: the preset's (0.006)")
    g.add_argument("--dsv3-yarn-original-max-position-embeddings", type=int, default=None)
    g.add_argument("--dsv3-yarn-beta-fast", type=float, default=None)
    g.add_argument("--dsv3-yarn-beta-slow", type=float, default=None)
    g.add_argument("--dsv3-fp8-bf16-modules", default=None, metavar="LIST",
                   help="with --fp8-format e4m3: comma list of modules kept in BF16 besides the paper's list")
    g.add_argument("--dsv3-recompute-mla-up-proj", action="store_true")
    g.add_argument("--dsv3-recompute-norms", action="store_true", help="recompute RMSNorms in backward (3.2.2)")
    g.add_argument("--dsv3-pipeline-schedule", default=None, choices=["dualpipe", "dualpipev"],
                   help="DeepSeek-V3's bidirectional pipeline (section 3.2.1) as Megatron-LM's forward_backward_func: "
                        "two model chunks per rank placed by the schedule (default: Megatron-LM's own schedules)")
    _escape_stray_percent(parser)
    install_hooks()
    return parser


def _escape_stray_percent(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM core_v0.19.0's --moe-paged-stash-buffer-size-factor-cuda help says "10%)", which argparse
    reads as a format directive: --help itself then dies with a ValueError. Escape such strays."""
    for a in parser._actions:
        if a.help and "%" in a.help:
            try:
                a.help % dict(vars(a), prog=parser.prog)
            except (ValueError, TypeError, KeyError):
                a.help = a.help.replace("%", "%%")


def _get(args, name, default=None):
    return getattr(args, name, default)


def config_from_megatron_args(args) -> DSV3Config:
    """DSV3Config from Megatron-LM's parsed args: feature configs from --dsv3-*, sizes and parallelism from
    Megatron-LM's own flags (the ones Megatron-LM itself reads for data, schedules and checkpoints), through the
    trainer's bridge (training/arguments.py)."""
    import json
    from megatron_dsv3.training.arguments import apply_model_flags, model_flag_values, parallel_from_args
    if _get(args, "dsv3_config"):
        with open(args.dsv3_config) as f:
            cfg = DSV3Config.from_dict(json.load(f))
    elif _get(args, "dsv3_hf_config"):
        cfg = DSV3Config.from_hf(args.dsv3_hf_config)
    else:
        cfg = DSV3Config.from_preset(_get(args, "dsv3_preset") or "dsv3-671b")
    values = model_flag_values(args, prefix="dsv3_")
    fmt, recipe = _get(args, "fp8"), _get(args, "fp8_recipe")
    if fmt:   # Megatron-LM's --fp8-format (args.fp8) and --fp8-recipe: the paper's recipe is the one FP8 path
        if (fmt, recipe) != ("e4m3", "blockwise"):
            raise ValueError(f"--fp8-format {fmt} --fp8-recipe {recipe}: DeepSeek-V3 trains in FP8 as E4M3 with "
                             f"block-wise scaling (section 3.3); use --fp8-format e4m3 --fp8-recipe blockwise")
        values["fp8"] = True              # backend auto: Transformer Engine's recipe where TE imports, else ours
    vocab = _get(args, "padded_vocab_size") or _get(args, "vocab_size")
    values["vocab_size"] = vocab or None
    lw = values["mtp_loss_weight"]
    if lw is None and _get(args, "mtp_loss_scaling_factor") is not None and _get(args, "mtp_num_layers"):
        values["mtp_loss_weight"] = f"0:{float(args.mtp_loss_scaling_factor)}"
    values["bf16"] = None
    cfg = apply_model_flags(cfg, values, keep_dtype=True)
    dtype = _get(args, "params_dtype")
    if dtype is None:
        dtype = torch.bfloat16 if _get(args, "bf16") else torch.float16 if _get(args, "fp16") else torch.float32
    top = {"params_dtype": str(dtype).replace("torch.", "")}
    if vocab:
        top["make_vocab_size_divisible_by"] = 1          # Megatron-LM padded it already
    n_exp = _get(args, "num_experts")
    if n_exp is not None and n_exp != cfg.moe.num_experts:
        raise ValueError(f"--num-experts {n_exp} differs from the model's {cfg.moe.num_experts} (--dsv3-preset "
                         f"{_get(args, 'dsv3_preset')}); pass the model's count or leave it out")
    par = parallel_from_args(args, prefix="dsv3_")
    if par["pipeline_schedule"] in _DUALPIPE:
        check_dualpipe_args(args, par)
    cfg = cfg.replace(**top, parallel=par)
    stages = len(cfg.pipeline_layers()) if par["pipeline_schedule"] in _DUALPIPE else par["pipeline_model_parallel_size"]
    if _get(args, "reset_position_ids") and stages > 2:
        # Megatron-LM's get_batch gives middle pipeline stages no position_ids: their MLA would use 0..s-1
        raise ValueError("--reset-position-ids with more than 2 pipeline stages (--pipeline-model-parallel-size; "
                         "--dsv3-pipeline-schedule dualpipev has 2 per rank): Megatron-LM gives middle pipeline "
                         "stages no position_ids, so their rope would ignore the document resets; use 2 stages or "
                         "leave out --reset-position-ids")
    if cfg.mtp.num_layers and par["pipeline_model_parallel_size"] > 1 and _get(args, "mtp_num_layers") is None:
        raise ValueError("MTP with pipeline parallelism under Megatron-LM needs --mtp-num-layers "
                         f"{cfg.mtp.num_layers}: without it Megatron-LM's get_batch gives the last stage no tokens")
    return cfg


_DUALPIPE = ("dualpipe", "dualpipev")


def check_dualpipe_args(args, par: dict) -> None:
    """What --dsv3-pipeline-schedule dualpipe|dualpipev needs of Megatron-LM's flags, as one-line errors naming them."""
    from megatron_dsv3.pipeline.megatron_schedule import check_microbatches
    name, pp = par["pipeline_schedule"], par["pipeline_model_parallel_size"]
    what = f"--dsv3-pipeline-schedule {name}"
    if pp < 2:
        raise ValueError(f"{what} needs --pipeline-model-parallel-size >= 2, got {pp}")
    if name == "dualpipe" and pp % 2:
        raise ValueError(f"{what} needs an even --pipeline-model-parallel-size (stage s and PP-1-s share a rank), "
                         f"got {pp}")
    refused = (("overlap_grad_reduce", "--overlap-grad-reduce", "the gradients are reduced after the schedule "
                "(weight gradients are deferred to the bubbles)"),
               ("overlap_moe_expert_parallel_comm", "--overlap-moe-expert-parallel-comm", "that is megatron-core's "
                "combined-1F1B overlap; DualPipe overlaps the all-to-alls itself (Figure 4)"),
               ("pipeline_model_parallel_layout", "--pipeline-model-parallel-layout", "the schedule places the "
                "layers itself (V shape / mirrored stages); use --decoder-first/last-pipeline-num-layers"),
               ("variable_seq_lengths", "--variable-seq-lengths", "the P2P shapes are fixed"))
    for attr, flag, why in refused:
        if _get(args, attr):
            raise ValueError(f"{flag} with {what}: {why}; leave out {flag}")
    gbs, mbs, dp = _get(args, "global_batch_size"), _get(args, "micro_batch_size"), _get(args, "data_parallel_size")
    if gbs and mbs and dp:
        ramp = _get(args, "rampup_batch_size")
        sizes = {gbs}
        if ramp:
            start, inc = int(ramp[0]), int(ramp[1])
            sizes |= set(range(start, gbs, inc)) if inc > 0 else {start}
        for b in sorted(sizes):
            if b % (mbs * dp) == 0:
                check_microbatches(name, pp, b // (mbs * dp), f"--global-batch-size {b} / (--micro-batch-size "
                                                              f"{mbs} x data-parallel size {dp})")


class ModelChunks(list):
    """The two chunks of a DualPipe(V) rank, returned by the model provider where Megatron-LM's get_model expects
    one model (no virtual stages): get_model sets model_type on what it gets (passed on to each chunk) and keeps
    a list as the list of chunks, which is what the rest of Megatron-LM's loop iterates."""

    def __setattr__(self, name, value):
        for chunk in self:
            setattr(chunk, name, value)
        super().__setattr__(name, value)


# ---- model ------------------------------------------------------------------------------------------------------
def dsv3_builder(args, pre_process, post_process, vp_stage=None, config=None, pg_collection=None):
    """Drop-in for pretrain_gpt's gpt_builder (same signature). `config` (a TransformerConfig Megatron-LM may
    pass) is ignored: the model's config comes from DSV3Config.to_transformer_config()."""
    global _CONFIG
    from megatron_dsv3.model import build_model
    cfg = config_from_megatron_args(args)
    impl = _get(args, "transformer_impl", "local")
    backend = "te" if impl == "transformer_engine" else "local"
    # the init is a function of (seed, global name) only: the same on every stage whatever Megatron-LM's per-stage
    # torch seed offset (init.py)
    seed = _get(args, "seed", 1234)
    _CONFIG = cfg
    if cfg.parallel.pipeline_schedule in _DUALPIPE:
        # both chunks of this rank, placed by the schedule (pre/post_process follow the placement, not this rank)
        from megatron.core import parallel_state as ps

        from megatron_dsv3.pipeline.megatron_schedule import build_chunks
        pp = getattr(pg_collection, "pp", None) if pg_collection is not None else None
        pp_rank = pp.rank() if pp is not None else ps.get_pipeline_model_parallel_rank()
        chunks = build_chunks(cfg, lambda **kw: build_model(cfg, backend=backend, pg_collection=pg_collection,
                                                            seed=seed, **kw), pp_rank)
        for m in chunks:
            m.config.moe_router_enable_expert_bias = False
        return ModelChunks(chunks)
    model = build_model(cfg, pre_process=pre_process, post_process=post_process, backend=backend,
                        pg_collection=pg_collection, vp_stage=vp_stage, seed=seed)
    model.config.moe_router_enable_expert_bias = False    # our routers update their bias in after_global_batch
    return model


def set_args(args) -> None:
    """Give model_provider its args when megatron.training (Megatron-LM) is not what parsed them."""
    global _ARGS
    _ARGS = args


def get_args():
    if _ARGS is not None:
        return _ARGS
    from megatron.training import get_args as megatron_get_args
    return megatron_get_args()


def model_provider(pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None,
                   config=None, pg_collection=None):
    """Megatron-LM's model_provider contract: builds this rank's chunk from the parsed args."""
    return dsv3_builder(get_args(), pre_process, post_process, vp_stage=vp_stage, config=config,
                        pg_collection=pg_collection)


# ---- hooks ------------------------------------------------------------------------------------------------------
def after_global_batch(model_chunks, args, config: Optional[DSV3Config] = None, writer=None,
                       iteration: Optional[int] = None, update_successful: bool = True) -> dict:
    """Once per global batch, after optimizer.step(): our after-step routine (training/hooks.py: the expert-bias
    update, skipped with the step; the MTP lambda of the next batch) and the scalars on Megatron-LM's writer.
    Returns {"routers": per-router metrics, "mtp": {depth: loss}}."""
    from megatron.core import parallel_state as ps

    from megatron_dsv3.mtp.loss import mtp_loss_report
    from megatron_dsv3.training.hooks import after_optimizer_step

    cfg = config or _CONFIG or config_from_megatron_args(args)
    chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    samples = _get(args, "consumed_train_samples", 0) or 0
    gbs = _get(args, "global_batch_size", 0) or 0
    # Megatron-LM counts this batch's samples after train_step returns
    before, after = samples * cfg.seq_length, (samples + gbs) * cfg.seq_length
    routers = after_optimizer_step(chunks, cfg, before, after, update_successful)
    group = ps.get_data_parallel_group(with_context_parallel=True) if ps.model_parallel_is_initialized() else None
    mtp = mtp_loss_report(chunks, reset=True, group=group)
    if writer is not None and iteration is not None:
        for k, v in mtp.items():
            writer.add_scalar(f"mtp loss depth {k}", v, iteration)
        aux = [m["aux_loss"] for m in routers.values() if m.get("aux_loss") is not None]
        if aux:
            writer.add_scalar("seq-wise balance loss", sum(aux) / len(aux), iteration)
        for m in routers.values():
            writer.add_scalar(f"moe/max_vio/layer{m['layer_number']}", m["max_vio"], iteration)
            writer.add_scalar(f"moe/bias_spread/layer{m['layer_number']}", m["bias_spread"], iteration)
        writer.add_scalar("expert bias update rate", cfg.moe.bias_rate_at(before), iteration)
        writer.add_scalar("mtp lambda", cfg.mtp.loss_weight_at(after), iteration)
    return {"routers": routers, "mtp": mtp}


def _step_with_dsv3(optimizer, model_chunks):
    """Wrap this optimizer instance's step(): after it, after_global_batch with its update_successful."""
    orig = optimizer.step

    def step(*a, **k):
        out = orig(*a, **k)
        update_successful = bool(out[0]) if isinstance(out, tuple) else True
        margs = get_args()
        it = (_get(margs, "curr_iteration", 0) or 0) + 1
        writer = None
        if _get(margs, "log_interval") and it % margs.log_interval == 0:
            try:
                from megatron.training.global_vars import get_tensorboard_writer
                writer = get_tensorboard_writer()
            except ImportError:
                writer = None
        after_global_batch(model_chunks, margs, writer=writer, iteration=it, update_successful=update_successful)
        return out
    step.__wrapped__ = orig
    optimizer.step = step
    return optimizer


def _optimizer_factory_with_dsv3(orig):
    """megatron.training.training.get_megatron_optimizer, whose optimizers run our after-step routine."""
    def get_megatron_optimizer(config, model_chunks, *args, **kwargs):
        return _step_with_dsv3(orig(config, model_chunks, *args, **kwargs), model_chunks)
    get_megatron_optimizer.__wrapped__ = orig
    return get_megatron_optimizer


# ---- DualPipe(V) as Megatron-LM's schedule -----------------------------------------------------------------------
@contextmanager
def _stage_role(model):
    """While a chunk's forward_step_func runs: megatron-core's parallel_state answers is_pipeline_first_stage /
    is_pipeline_last_stage (and so Megatron-LM's get_batch, MTP-on-this-rank) for the chunk, not for the rank:
    first for the chunk with the embedding, last for the one with the head and MTP, neither for a middle one. A
    DualPipeV rank 0 holds the first and the last stage, and Megatron-LM's get_batch (with TP > 1) would give
    its last-stage chunk no labels, a middle stage on the last rank labels it does not need."""
    from megatron.core import parallel_state as ps

    place = _unwrap_placement(model)
    if place is None:
        yield
        return
    saved = ps._MPU_PIPELINE_MODEL_PARALLEL_RANK, ps._MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE
    ps.set_pipeline_model_parallel_world_size(3)
    ps.set_pipeline_model_parallel_rank(0 if place.pre_process else 2 if place.post_process else 1)
    try:
        yield
    finally:
        ps._MPU_PIPELINE_MODEL_PARALLEL_RANK, ps._MPU_PIPELINE_MODEL_PARALLEL_WORLD_SIZE = saved


def _unwrap_placement(model):
    """The ChunkPlacement of a (wrapped) DualPipe(V) chunk, None for any other model."""
    from megatron_dsv3.pipeline.megatron_schedule import _unwrap
    return getattr(_unwrap(model), "placement", None)


def _moved(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device)
    if isinstance(obj, dict):
        return {k: _moved(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_moved(v, device) for v in obj)
    return obj


def _to_last_pipeline_rank(variant: str, reports: list, pp_group, device) -> list:
    """The micro-batches' loss reports where Megatron-LM's train_step and evaluate read them: on the last pipeline
    rank, in micro-batch order (the streams end on rank 0 under DualPipeV, on ranks PP-1 and 0 under DualPipe)."""
    import torch.distributed as dist
    n = dist.get_world_size(pp_group)
    everyone = [None] * n
    dist.all_gather_object(everyone, _moved(reports, "cpu"), group=pp_group)
    if dist.get_rank(pp_group) != n - 1:
        return []
    order = [n - 1, 0] if variant == "dualpipe" else [0]
    return [_moved(r, device) for src in order for r in everyone[src]]


def forward_backward_megatron_lm(variant: str, *, forward_step_func, model, pg_collection=None, **kwargs) -> list:
    """megatron_schedule's forward_backward_dualpipe(v) in Megatron-LM's loop (the function our
    get_forward_backward_func hands train_step and evaluate): forward_step_func runs in its chunk's pipeline role
    (_stage_role), and the loss reports come back on the last pipeline rank."""
    from megatron.core import parallel_state as ps

    from megatron_dsv3.pipeline import megatron_schedule as MS

    def forward_step(data_iterator, chunk, *a, **kw):
        with _stage_role(chunk):
            return forward_step_func(data_iterator, chunk, *a, **kw)
    fb = MS.forward_backward_dualpipe if variant == "dualpipe" else MS.forward_backward_dualpipev
    reports = fb(forward_step_func=forward_step, model=model, pg_collection=pg_collection, **kwargs)
    pp_group = getattr(pg_collection, "pp", None) or ps.get_pipeline_model_parallel_group()
    chunks = model if isinstance(model, (list, tuple)) else [model]
    device = next(p.device for c in chunks for p in c.parameters())
    return _to_last_pipeline_rank(variant, reports, pp_group, device)


def _schedule_factory_with_dsv3(orig):
    """megatron.training.training.get_forward_backward_func: ours under --dsv3-pipeline-schedule, else
    Megatron-LM's (any arguments it is called with: core_v0.19 passes schedule_pg_collection=)."""
    def get_forward_backward_func(*args, **kwargs):
        variant = _get(get_args(), "dsv3_pipeline_schedule")
        if variant in _DUALPIPE:
            return partial(forward_backward_megatron_lm, variant)
        return orig(*args, **kwargs)
    get_forward_backward_func.__wrapped__ = orig
    return get_forward_backward_func


def install_hooks() -> bool:
    """Wrap megatron.training.training's get_megatron_optimizer (setup_model_and_optimizer calls it by that module
    global) and get_forward_backward_func (train and evaluate call it so; core_v0.16.1 and core_v0.19.0 alike);
    idempotent. False when Megatron-LM is absent."""
    global _HOOKED
    if _HOOKED:
        return True
    try:
        import megatron.training.training as T
    except ImportError:
        return False
    T.get_megatron_optimizer = _optimizer_factory_with_dsv3(T.get_megatron_optimizer)
    T.get_forward_backward_func = _schedule_factory_with_dsv3(T.get_forward_backward_func)
    _HOOKED = True
    return True


# ---- the launcher -----------------------------------------------------------------------------------------------
def _run_pretrain(P, provider, pretrain) -> None:
    """Megatron-LM's pretrain() with our builder, in whichever of its two forms the checkout has:
    core_v0.18+ parses first (parse_and_validate_args) and takes a PretrainConfigContainer, whose model=None
    makes setup_model_and_optimizer build through model_provider; core_v0.16-0.17 parse inside pretrain()."""
    import inspect
    import warnings

    from megatron.core.enums import ModelType
    common = dict(train_valid_test_dataset_provider=P.train_valid_test_datasets_provider,
                  model_provider=provider, model_type=ModelType.encoder_or_decoder,
                  forward_step_func=P.forward_step, get_embedding_ranks=P.get_embedding_ranks)
    if "cfg_container" not in inspect.signature(pretrain).parameters:
        pretrain(extra_args_provider=extra_args_provider, args_defaults=_ARGS_DEFAULTS, **common)
        return
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args
    args = parse_and_validate_args(extra_args_provider=extra_args_provider, args_defaults=_ARGS_DEFAULTS)
    if hasattr(P, "set_startup_timestamps") and hasattr(P, "_PROGRAM_START_TIME"):
        P.set_startup_timestamps(program_start=P._PROGRAM_START_TIME, main_entry=P._PROGRAM_START_TIME)
    with warnings.catch_warnings():     # "use a ModelConfig instead of a model provider": ours is the provider
        warnings.simplefilter("ignore", UserWarning)
        cfg = pretrain_cfg_container_from_args(args, None)
    pretrain(cfg, **common)


_ARGS_DEFAULTS = {"tokenizer_type": "HuggingFaceTokenizer"}     # DeepSeek-V3's tokenizer.json


def use_prebuilt_dataset_helpers() -> None:
    """Megatron-LM's initialize_megatron runs `make` in megatron/core/datasets to build the dataset index helpers
    and exits when it fails. A megatron-core installed from its wheel ships them built (helpers_cpp) but no
    Makefile, so that make always fails: skip it when the built module imports."""
    try:
        import megatron.core.datasets.helpers_cpp  # noqa: F401
        import megatron.core.datasets.utils as U
    except ImportError:
        return                          # a source checkout: Megatron-LM builds them as usual
    U.compile_helpers = lambda: None


def main(argv=None) -> None:
    """python -m megatron_dsv3.megatron_lm --megatron-lm PATH <Megatron-LM flags> <--dsv3-* flags>"""
    argv = list(sys.argv[1:] if argv is None else argv)
    path = os.environ.get("MEGATRON_LM_PATH")
    if "--megatron-lm" in argv:
        i = argv.index("--megatron-lm")
        if i + 1 >= len(argv):
            raise SystemExit("error: --megatron-lm needs the path of a Megatron-LM checkout")
        path = argv[i + 1]
        del argv[i:i + 2]
    if not path or not os.path.isfile(os.path.join(path, "pretrain_gpt.py")):
        raise SystemExit(f"error: --megatron-lm / MEGATRON_LM_PATH must name a Megatron-LM checkout holding "
                         f"pretrain_gpt.py (release {' or '.join(MEGATRON_LM_RELEASES)}); got {path!r}")
    sys.path.insert(0, os.path.abspath(path))
    sys.argv = [os.path.join(path, "pretrain_gpt.py")] + argv
    import pretrain_gpt as P                           # noqa: E402  (Megatron-LM's script, as a module)
    from megatron.training import pretrain
    P.train_valid_test_datasets_provider.is_distributed = True
    use_prebuilt_dataset_helpers()
    _run_pretrain(P, partial(P.model_provider, dsv3_builder), pretrain)


if __name__ == "__main__":
    main()
