"""Everything that depends on the megatron-core / Transformer Engine / apex version, in one place.

Supported: megatron-core 0.16.1 (the newest for Python 3.11) through 0.19.x. Nothing else in the
package imports version-dependent megatron-core names directly.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import multiprocessing as mp
import inspect
import os


import torch
import torch.nn.functional as F

from megatron.core import package_info

MCORE_VERSION = tuple(int(x) for x in package_info.__version__.split(".")[:2])


def _te_importable() -> bool:
    if importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
        return True
    except Exception:  # a CPU machine: the wheel is there, its CUDA libraries are not
        return False


HAVE_TE: bool = _te_importable()
HAVE_APEX: bool = importlib.util.find_spec("apex") is not None


def get_process_group_collection(pg_collection=None):
    """The given collection, or megatron-core's default groups from parallel_state."""
    if pg_collection is not None:
        return pg_collection
    from megatron.core.process_groups_config import ProcessGroupCollection
    return ProcessGroupCollection.use_mpu_process_groups()


def _fields_of(cls) -> set:
    return {f.name for f in dataclasses.fields(cls)}


def make_transformer_config(cfg, **overrides):
    """DSV3Config -> megatron-core MLATransformerConfig (the single bridge).

    Our modules read their feature configs from the spec; this config carries what megatron-core's
    own parts (linears, TransformerLayer/Block, DDP, optimizer, schedules) read. MoE fields are
    filled for Megatron-LM users' logging and FLOP counts, but megatron-core's MoE is not built.
    """
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    par, mla, moe = cfg.parallel, cfg.mla, cfg.moe
    dtype = cfg.torch_dtype
    y = mla.yarn
    kw = dict(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=moe.dense_ffn_hidden_size, kv_channels=mla.qk_head_dim,
        hidden_dropout=0.0, attention_dropout=mla.attention_dropout, layernorm_epsilon=cfg.norm_eps,
        normalization="RMSNorm", add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu,
        bias_activation_fusion=False, masked_softmax_fusion=False, persist_layer_norm=False,
        bias_dropout_fusion=False, apply_rope_fusion=False, init_method_std=cfg.init_method_std,
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        expert_model_parallel_size=par.expert_model_parallel_size,
        expert_tensor_parallel_size=par.expert_tensor_parallel_size,
        context_parallel_size=par.context_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
        sequence_parallel=par.sequence_parallel,
        num_layers_in_first_pipeline_stage=par.num_layers_in_first_pipeline_stage,
        num_layers_in_last_pipeline_stage=par.num_layers_in_last_pipeline_stage,
        params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        # for a module built directly from this config (tests, benches): megatron-core's own init, on the host.
        # build_model replaces both on its copy (allocation only, on the model's device, then megatron_dsv3.init)
        use_cpu_initialization=True, perform_initialization=True,
        # MLA
        multi_latent_attention=True, q_lora_rank=mla.q_lora_rank, kv_lora_rank=mla.kv_lora_rank,
        qk_head_dim=mla.qk_nope_head_dim, qk_pos_emb_head_dim=mla.qk_rope_head_dim, v_head_dim=mla.v_head_dim,
        rotary_base=mla.rope_theta, rope_type="yarn" if y else "rope",
        rotary_scaling_factor=y.factor if y else 1.0,
        original_max_position_embeddings=y.original_max_position_embeddings if y else cfg.max_position_embeddings,
        beta_fast=y.beta_fast if y else 32.0, beta_slow=y.beta_slow if y else 1.0,
        mscale=y.mscale if y else 1.0, mscale_all_dim=y.mscale_all_dim if y else 0.0,
        # MoE (informational for megatron-core; our DeepSeekMoE reads MoEConfig)
        num_moe_experts=moe.num_experts, moe_router_topk=moe.top_k, moe_ffn_hidden_size=moe.expert_ffn_hidden_size,
        moe_shared_expert_intermediate_size=(moe.num_shared_experts * moe.expert_ffn_hidden_size) or None,
        moe_router_num_groups=moe.n_group if moe.n_group > 1 else None,
        moe_router_group_topk=moe.topk_group if moe.n_group > 1 else None,
        moe_router_topk_scaling_factor=moe.routed_scaling_factor, moe_router_score_function=moe.score_function,
        # False: megatron-core's finalize_model_grads would otherwise move our routers' bias itself;
        # ours moves once per global batch in megatron_dsv3.moe.router.apply_expert_bias_update
        moe_router_enable_expert_bias=False,
        moe_router_pre_softmax=False, moe_token_dispatcher_type="alltoall",
        moe_layer_freq=[0] * moe.first_k_dense_replace + [1] * (cfg.num_layers - moe.first_k_dense_replace),
        mtp_num_layers=cfg.mtp.num_layers or None,
    )
    if not cfg.scaled_output_init:
        # paper section 4.2: every weight N(0, init_method_std), the output projections (linear_proj, dense and
        # shared linear_fc2, experts' weight2) too; megatron-core would divide their std by sqrt(2 * num_layers)
        kw["output_layer_init_method"] = functools.partial(torch.nn.init.normal_, mean=0.0, std=cfg.init_method_std)
    if par.sequence_parallel and par.tensor_model_parallel_size > 1:
        kw["sequence_parallel"] = True
    if cfg.recompute_norms:
        # megatron-core's TransformerLayer discards input_layernorm / pre_mlp_layernorm outputs after their
        # consumer's forward and recomputes them before its backward (CheckpointWithoutOutput), any consumer class
        kw.update(recompute_granularity="selective", recompute_modules=["layernorm"])
        fix_checkpoint_without_output_fp8()
    if par.virtual_pipeline_model_parallel_size:
        # Megatron-LM's setting for the interleaved schedule (its --overlap-p2p-communication default). Batched
        # P2P there puts a send-next and a send-prev into one batch; at PP=2 both go to the same rank and are
        # matched in posting order, so activations and gradients swap: NCCL on 2 H200s gave 7e-4 on the first
        # loss and 4e-1 by step 20 (bench/results.md), gloo swapped micro-batches. Megatron-LM refuses PP=2
        # interleaving without the overlap for that reason.
        kw.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    elif not torch.cuda.is_available():
        kw["batch_p2p_comm"] = False   # gloo: one isend/irecv at a time (no batched P2P there to gain from)
    kw.update(overrides)
    known = _fields_of(MLATransformerConfig)
    dropped = {k for k in kw if k not in known}
    for k in dropped:  # fields a given megatron-core release does not have
        kw.pop(k)
    return MLATransformerConfig(**kw)


def accepts_kwarg(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


_writer_parent = None         # pid of the process inside dist_checkpoint_writer_processes (its forks die with it)
_fork_hook_installed = False


def _writer_child_after_fork() -> None:
    if _writer_parent is not None:
        from megatron_dsv3.launch import die_with_parent
        die_with_parent(_writer_parent)


@contextlib.contextmanager
def dist_checkpoint_writer_processes():
    """Around a synchronous `dist_checkpointing.save` (the converter's and the trainer's): its writer forks
    one worker per file bucket, which Python forbids in daemonic processes (other spawners' ranks): lift the
    flag for the call.

    megatron-core 0.16-0.19 collect the workers' results through a module-level `multiprocessing.Manager()`
    queue (filesystem_async._get_write_results_queue): a server process that is started once and never
    stopped, so a trainer killed by SIGKILL leaves it running (re-parented to init, ~300-400 MB when forked
    from a trainer), and spawning it costs 5-15 s on a small host. In a synchronous save the queue is written
    and read by this same process, so a plain in-process `queue.Queue` does the job with no helper process:
    it is put in place for the call and the previous value restored. The forked workers are joined before
    save returns; while the call runs every process forked from this one dies with it (PR_SET_PDEATHSIG), so
    a kill mid-save leaves none behind either. Touches megatron-core's private `_results_queue`."""
    global _writer_parent, _fork_hook_installed
    import queue
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    cfg = mp.current_process()._config
    daemon = cfg.get("daemon")
    cfg["daemon"] = False
    has_queue = hasattr(filesystem_async, "_results_queue")
    before = getattr(filesystem_async, "_results_queue", None)
    if has_queue:
        filesystem_async._results_queue = queue.Queue()
    if not _fork_hook_installed:
        os.register_at_fork(after_in_child=_writer_child_after_fork)
        _fork_hook_installed = True
    outer = _writer_parent
    _writer_parent = os.getpid()
    try:
        yield
    finally:
        _writer_parent = outer
        if has_queue:
            filesystem_async._results_queue = before
        if daemon is not None:
            cfg["daemon"] = daemon


@contextlib.contextmanager
def torch_adamw_class(cls):
    """Around megatron-core's get_megatron_optimizer (0.16-0.19, neither Transformer Engine nor apex): it builds
    `torch.optim.AdamW`, looked up at call time; `cls` (a subclass, so megatron's isinstance checks for torch's AdamW
    still hold) is built instead. None: nothing changes. Restored on exit."""
    if cls is None:
        yield
        return
    import megatron.core.optimizer as mo
    if not getattr(mo, "USING_PYTORCH_OPTIMIZER", False) or not issubclass(cls, torch.optim.AdamW):
        raise RuntimeError(f"{cls.__name__} replaces torch's AdamW, which megatron-core builds only without "
                           f"Transformer Engine and apex")
    before = torch.optim.AdamW
    torch.optim.AdamW = cls
    try:
        yield
    finally:
        torch.optim.AdamW = before


@contextlib.contextmanager
def torch_adam_step_hidden(optimizer):
    """Around `DistributedOptimizer.load_state_dict` of a 'fully_reshardable' state (megatron-core 0.16.1, torch's
    Adam, i.e. without Transformer Engine / apex): `load_parameter_state_from_fully_reshardable` skips the saved
    "step" entries but `_set_main_param_and_optimizer_states` then copies every key of the parameter's state,
    "step" included (KeyError 'step'). While this instance's setter runs, the "step" tensors are out of the torch
    optimizer's state; they are put back after; the caller restores the saved count (restore_torch_adam_step)."""
    hidden, patched = [], []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        setter = getattr(opt, "_set_main_param_and_optimizer_states", None)
        if inner is None or setter is None:
            continue

        def without_step(*a, _setter=setter, _inner=inner, **k):
            for st in _inner.state.values():   # the load re-created them before the parameter states: once is enough
                if "step" in st:
                    hidden.append((st, st.pop("step")))
            return _setter(*a, **k)
        opt._set_main_param_and_optimizer_states = without_step
        patched.append(opt)
    try:
        yield
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states
        for st, step in hidden:
            st.setdefault("step", step)


@torch.no_grad()
def materialize_torch_adam_state(optimizer) -> None:
    """megatron-core 0.16.1-0.19 with torch's Adam (no Transformer Engine / apex), before loading an optimizer state:
    give a fresh torch Adam its state tensors (and `step`) so that megatron's sharded_state_dict can describe
    what to load: without Transformer Engine / apex, DistributedOptimizer.state_dict() reads `step` from the
    torch optimizer's state, which a fresh optimizer does not have yet. One step with zero gradients and lr 0
    changes no parameter; the loaded state replaces all of it."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if inner is None or len(inner.state) > 0:
            continue
        lrs = [g["lr"] for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"] = 0.0
            for p in g["params"]:
                p.grad = torch.zeros_like(p)
        inner.step()
        inner.zero_grad(set_to_none=True)
        for g, lr in zip(inner.param_groups, lrs):
            g["lr"] = lr


def _saved_steps(tree) -> set:
    """The Adam step counts stored in the optimizer's param_groups of a loaded state dict."""
    out = set()
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == "param_groups" and isinstance(v, list):
                out |= {g["step"] for g in v if isinstance(g, dict) and g.get("step") is not None}
            else:
                out |= _saved_steps(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            out |= _saved_steps(v)
    return out


@torch.no_grad()
def restore_torch_adam_step(optimizer, loaded_optimizer_sd) -> None:
    """megatron-core 0.16.1-0.19 with torch's AdamW (no TE / apex): the loads ('dp_reshardable',
    'fully_reshardable') copy the moments but leave each parameter's `step` at what the optimizer had before. Put back the saved count
    (Adam's bias correction depends on it; without this a resumed run differs from the second step on)."""
    steps = _saved_steps(loaded_optimizer_sd)
    if len(steps) != 1:
        return
    step = float(steps.pop())
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        for st in (inner.state.values() if inner is not None else ()):
            if "step" in st:
                st["step"] = torch.tensor(step, dtype=torch.float32, device=st["step"].device)


def load_optimizer_state(optimizer, loaded_optimizer_sd) -> None:
    """megatron's optimizer.load_state_dict with the torch-Adam workarounds above (the caller ran
    materialize_torch_adam_state before building the sharded state dict it loaded)."""
    with torch.no_grad(), torch_adam_step_hidden(optimizer):   # fp32 params: the shards are views of them
        optimizer.load_state_dict(loaded_optimizer_sd)
    restore_torch_adam_step(optimizer, loaded_optimizer_sd)


def fix_checkpoint_without_output_fp8() -> None:
    """megatron-core 0.16.1-0.19.2: `CheckpointWithoutOutput(fp8=False)` sets `self.fp8 = fp8 is not None` (always
    True), then reads Transformer Engine's FP8GlobalStateManager: a NameError without TE, so the selective
    "layernorm" recompute cannot run there. Without TE, `fp8` becomes what was passed (FP8 needs TE anyway).
    Idempotent; a no-op where TE imports."""
    from megatron.core.tensor_parallel import random as mrandom
    cls = mrandom.CheckpointWithoutOutput
    if getattr(mrandom, "HAVE_TE", False) or getattr(cls, "_dsv3_fp8_fixed", False):
        return
    orig = cls.__init__

    def __init__(self, fp8=False):
        orig(self, fp8)
        self.fp8 = bool(fp8)
    cls.__init__ = __init__
    cls._dsv3_fp8_fixed = True

