"""Save / resume through megatron-core dist_checkpointing, atomically.

Layout of `--save DIR`:
    DIR/iter_0000100/        a complete dist_checkpointing directory (model, optimizer, RNG, train state)
    DIR/latest               "100": written last, by rename, so it always names a complete checkpoint

A save writes into DIR/.tmp_iter_0000100, then (rank 0, after every rank finished writing) renames it to
DIR/iter_0000100 and replaces `latest` (write to a temp file, fsync, os.replace). A crash at any point
leaves `latest` naming the previous complete checkpoint; a stale .tmp_* directory is deleted by the
next save. The expert bias is a persistent buffer of the routers, so it travels with the model state.

State saved:
    model{i}        each model chunk's sharded_state_dict (resharding TP/PP/EP/DP on load)
    optimizer       the megatron optimizer's sharded state (distributed optimizer: 'dp_reshardable' by
                    default, 'fully_reshardable' with fully_reshardable=True)
    rng_state       one ShardedObject per (pp, tp, dp) rank: python, numpy, torch, CUDA and megatron's
                    RNG-tracker states
    train_state     iteration, consumed samples/tokens (the data position), schedule step, the config
"""
from __future__ import annotations

import os
import random
import shutil
import time
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_dsv3.compat import dist_checkpoint_writer_processes

LATEST = "latest"
# test hook: sleep this many seconds after the shards are written and before the rename (to kill a save)
_PAUSE_ENV = "MEGATRON_DSV3_SAVE_PAUSE_S"


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def read_latest(root: str) -> Optional[int]:
    """The iteration `latest` names, or None when there is no complete checkpoint."""
    path = os.path.join(root, LATEST)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        text = f.read().strip()
    it = int(text)
    if not os.path.isdir(checkpoint_dir(root, it)):
        raise FileNotFoundError(f"{path} names iteration {it} but {checkpoint_dir(root, it)} is missing")
    return it


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _unwrap(chunk):
    """The model inside megatron's DDP / Float16Module wrappers."""
    while type(chunk).__name__ in ("DistributedDataParallel", "Float16Module", "FullyShardedDataParallel"):
        chunk = chunk.module
    return chunk


OPTIM_FORMAT = os.environ.get("MEGATRON_DSV3_OPTIM_FORMAT")   # debugging override of the format chosen below


def _metadata(fully_reshardable: bool) -> dict:
    from megatron.core import parallel_state as ps
    fmt = OPTIM_FORMAT or ("fully_reshardable" if fully_reshardable else "dp_reshardable")
    return {"distrib_optim_sharding_type": fmt,
            "singleton_local_shards": False, "chained_optim_avoid_prefix": True,
            "dp_cp_group": ps.get_data_parallel_group(with_context_parallel=True)}


def _rng_state():
    from megatron.core import tensor_parallel
    return {"random": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(s) -> None:
    from megatron.core import tensor_parallel
    random.setstate(s["random"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(s["tracker"])


def _rng_sharded(data):
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    shape = (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
             ps.get_data_parallel_world_size(with_context_parallel=True))
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank(with_context_parallel=True))
    return ShardedObject("rng_state", data, shape, offset, replica_id=0)


def _model_sharded_state_dict(chunk, md):
    model = _unwrap(chunk)
    try:  # the conversion code's version fixes the MTP modules' TP/EP sharding (a ModuleList megatron treats as replicated)
        from megatron_dsv3.checkpoint.convert import model_sharded_state_dict
    except ImportError:  # pragma: no cover
        return model.sharded_state_dict(metadata=md)
    return model_sharded_state_dict(model)


def _sharded_state_dict(chunks, optimizer, train_state, *, is_loading: bool, with_optim: bool, with_rng: bool,
                        fully_reshardable: bool) -> dict:
    md = _metadata(fully_reshardable)
    sd = {}
    for i, c in enumerate(chunks):
        sd[f"model{i}"] = _model_sharded_state_dict(c, md)
    if with_optim and optimizer is not None:
        model_sd = sd["model0"] if len(chunks) == 1 else {f"model{i}": sd[f"model{i}"] for i in range(len(chunks))}
        sd["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=md)
    if with_rng:
        sd["rng_state"] = _rng_sharded(_rng_state() if not is_loading else None)
    if train_state is not None:
        sd["train_state"] = train_state
    return sd


def _has_state(optimizer) -> bool:
    return any(len(getattr(o, "optimizer", None).state) > 0 for o in getattr(optimizer, "chained_optimizers", [optimizer])
               if getattr(o, "optimizer", None) is not None)


def save_checkpoint(root: str, iteration: int, chunks: List[torch.nn.Module], optimizer, train_state: dict,
                    fully_reshardable: bool = False) -> str:
    """Collective: every rank calls it. Returns the final directory."""
    from megatron.core import dist_checkpointing

    final, tmp = checkpoint_dir(root, iteration), os.path.join(root, f".tmp_iter_{iteration:07d}")
    if _rank() == 0:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):          # stale partial saves of crashed runs
            if name.startswith(".tmp_iter_"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    # a fresh optimizer (no step taken yet) has no state to save; megatron cannot describe it either
    with_optim = optimizer is not None and _has_state(optimizer)
    sd = _sharded_state_dict(chunks, optimizer, dict(train_state, iteration=iteration, has_optimizer=with_optim),
                             is_loading=False, with_optim=with_optim, with_rng=True,
                             fully_reshardable=fully_reshardable)
    with dist_checkpoint_writer_processes():
        dist_checkpointing.save(sd, tmp)
    _barrier()
    if os.environ.get(_PAUSE_ENV):
        time.sleep(float(os.environ[_PAUSE_ENV]))
    if _rank() == 0:
        if os.path.isdir(final):               # re-saving the same iteration: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_atomic(os.path.join(root, LATEST), str(iteration))
    _barrier()
    return final


@torch.no_grad()
def _materialize_optimizer_state(optimizer) -> None:
    """Give a fresh torch Adam its state tensors (and `step`) so that megatron's sharded_state_dict can describe
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
def _restore_adam_step(optimizer, loaded_optimizer_sd) -> None:
    """megatron-core 0.16 with torch's AdamW (no TE / apex): the 'dp_reshardable' load copies the moments but
    leaves each parameter's `step` at what the optimizer had before the load. Put back the saved count
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


def load_checkpoint(root: str, chunks: List[torch.nn.Module], optimizer, *, load_optim: bool = True,
                    load_rng: bool = True, fully_reshardable: bool = False, iteration: Optional[int] = None) -> Optional[dict]:
    """Collective. Loads `latest` (or `iteration`) into the chunks (and optimizer); restores RNG states.
    Returns the saved train_state, or None when `root` holds no complete checkpoint."""
    from megatron.core import dist_checkpointing

    it = read_latest(root) if iteration is None else iteration
    if it is None:
        return None
    path = checkpoint_dir(root, it)
    common = dist_checkpointing.load_common_state_dict(path)
    load_optim = load_optim and (common.get("train_state") or {}).get("has_optimizer", True)
    if load_optim and optimizer is not None:
        _materialize_optimizer_state(optimizer)
    sd = _sharded_state_dict(chunks, optimizer, None, is_loading=True, with_optim=load_optim, with_rng=load_rng, fully_reshardable=fully_reshardable)
    loaded = dist_checkpointing.load(sd, path)
    for i, c in enumerate(chunks):
        _unwrap(c).load_state_dict(loaded[f"model{i}"], strict=True)
    if load_optim and optimizer is not None:
        with torch.no_grad():   # fp32 params: the optimizer's shards are views of the parameters
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_step(optimizer, loaded["optimizer"])
    if load_rng and loaded.get("rng_state") is not None:
        _set_rng_state(loaded["rng_state"])
    state = dict(common.get("train_state") or loaded.get("train_state") or {})
    state.setdefault("iteration", it)
    return state
