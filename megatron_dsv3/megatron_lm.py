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
    g.add_argument("--dsv3-recompute-mla-up-proj", action="store_true")
    g.add_argument("--dsv3-recompute-norms", action="store_true", help="recompute RMSNorms in backward (3.2.2)")
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
    par = parallel_from_args(args)
    cfg = cfg.replace(**top, parallel=par)
    if _get(args, "reset_position_ids") and par["pipeline_model_parallel_size"] > 2:
        # Megatron-LM's get_batch gives middle pipeline stages no position_ids: their MLA would use 0..s-1
        raise ValueError("--reset-position-ids with --pipeline-model-parallel-size > 2: Megatron-LM gives middle "
                         "pipeline stages no position_ids, so their rope would ignore the document resets; use "
                         "pipeline size <= 2 or leave out --reset-position-ids")
    if cfg.mtp.num_layers and par["pipeline_model_parallel_size"] > 1 and _get(args, "mtp_num_layers") is None:
        raise ValueError("MTP with pipeline parallelism under Megatron-LM needs --mtp-num-layers "
                         f"{cfg.mtp.num_layers}: without it Megatron-LM's get_batch gives the last stage no tokens")
    return cfg


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
    model = build_model(cfg, pre_process=pre_process, post_process=post_process, backend=backend,
                        pg_collection=pg_collection, vp_stage=vp_stage, seed=_get(args, "seed", 1234))
    model.config.moe_router_enable_expert_bias = False    # our routers update their bias in after_global_batch
    _CONFIG = cfg
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


def install_hooks() -> bool:
    """Wrap megatron.training.training.get_megatron_optimizer (setup_model_and_optimizer calls it by that module
    global; idempotent). False when Megatron-LM is absent."""
    global _HOOKED
    if _HOOKED:
        return True
    try:
        import megatron.training.training as T
    except ImportError:
        return False
    T.get_megatron_optimizer = _optimizer_factory_with_dsv3(T.get_megatron_optimizer)
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
