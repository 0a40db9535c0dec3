"""Save / resume through megatron-core dist_checkpointing, atomically.

Layout of `--save DIR`:
    DIR/iter_0000100/        a complete dist_checkpointing directory (model, optimizer, RNG, train state)
    DIR/iter_0000100/dsv3_config.json   the model's DSV3Config (read before anything is built)
    DIR/latest               "100": written last, by rename, so it always names a complete checkpoint

`find_checkpoint(DIR)` also recognises the converter's (and Megatron-LM's) layout,
DIR/latest_checkpointed_iteration.txt + DIR/release (or DIR/iter_*), and a bare dist checkpoint directory:
those hold model weights only, which `load_checkpoint` loads as a fine-tuning start (iteration 0, fresh
optimizer and RNG).

A save writes into DIR/.tmp_iter_0000100, then (rank 0, after every rank finished writing) renames it to
DIR/iter_0000100 and replaces `latest` (write to a temp file, fsync, os.replace). A crash at any point
leaves `latest` naming the previous complete checkpoint; a stale .tmp_* directory is deleted by the
next save. The expert bias is a persistent buffer of the routers, so it travels with the model state.

State saved:
    model{i}        each model chunk's sharded_state_dict (resharding TP/PP/EP/DP on load)
    optimizer       the megatron optimizer's sharded state (distributed optimizer: 'dp_reshardable' by
                    default, 'fully_reshardable' with fully_reshardable=True)
    ema             with --ema-decay: the EMA of the parameters (training/ema.py), the model's sharded tensors
                    re-keyed `ema.<key>` (reshards like the model); train_state["has_ema"] says it is there
    rng_state       one ShardedObject per (pp, tp, dp) rank: python, numpy, torch, CUDA and megatron's
                    RNG-tracker states
    train_state     iteration, consumed samples/tokens (the data position), the config, the layout it was
                    saved at (the optimizer state is saved 'fully_reshardable' by default, so it reloads at
                    any TP/PP/EP/DP; the RNG states belong to the saving layout and are skipped elsewhere)
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_dsv3.compat import dist_checkpoint_writer_processes, load_optimizer_state, materialize_torch_adam_state

LATEST = "latest"
CONFIG_FILE = "dsv3_config.json"          # the converter writes the same name (checkpoint/convert.py)
MEGATRON_TRACKER = "latest_checkpointed_iteration.txt"
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


class CheckpointUnusable(ValueError):
    """A user-named checkpoint that cannot be used: a directory without one, a damaged file, another model, an
    optimizer state that does not reshard (a ValueError: the trainer's one-line error)."""


@dataclass(frozen=True)
class Found:
    """A checkpoint `--load` names."""
    kind: str                 # "trainer": ours (model, optimizer, RNG, train state) | "weights": model only
    path: str                 # the dist_checkpointing directory itself
    iteration: int
    config: Optional[dict]    # DSV3Config.to_dict() of the model, None when the checkpoint does not say

    def describe(self) -> str:
        what = "trainer checkpoint" if self.kind == "trainer" else "model weights (converter / Megatron-LM layout)"
        return f"{what} {self.path} (iteration {self.iteration})"


def _read_config(*dirs: str) -> Optional[dict]:
    for d in dirs:
        p = os.path.join(d, CONFIG_FILE)
        if os.path.isfile(p):
            with open(p) as f:
                return json.load(f)
    return None


def find_checkpoint(root: str) -> Optional[Found]:
    """What `root` holds: None when the directory does not exist (a fresh start); CheckpointUnusable when it
    exists but holds no checkpoint. Cheap: reads tracker files and dsv3_config.json, imports nothing heavy."""
    if not os.path.exists(root):
        return None
    if not os.path.isdir(root):
        raise CheckpointUnusable(f"--load {root}: not a directory")
    it = read_latest(root)
    if it is not None:
        path = checkpoint_dir(root, it)
        return Found("trainer", path, it, _read_config(path) or _config_from_common(path))
    tracker = os.path.join(root, MEGATRON_TRACKER)
    if os.path.isfile(tracker):
        text = open(tracker).read().strip()
        path = os.path.join(root, "release" if text == "release" else f"iter_{int(text):07d}")
        if not os.path.isfile(os.path.join(path, "metadata.json")):
            raise CheckpointUnusable(f"--load {root}: {MEGATRON_TRACKER} names {text!r} but {path} holds no "
                                     f"dist checkpoint (no metadata.json)")
        return Found("weights", path, 0 if text == "release" else int(text), _read_config(root, path))
    if os.path.isfile(os.path.join(root, "metadata.json")):
        return Found("weights", root, 0, _read_config(root, os.path.dirname(root)))
    raise CheckpointUnusable(f"--load {root}: the directory holds no checkpoint (no '{LATEST}' or "
                             f"'{MEGATRON_TRACKER}' file, no dist checkpoint); leave out --load to start from scratch")


def _config_from_common(path: str) -> Optional[dict]:
    """Checkpoints saved before dsv3_config.json existed keep the config in the common state dict."""
    from megatron.core import dist_checkpointing
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except Exception as e:  # noqa: BLE001  (any read failure: say which file)
        raise CheckpointUnusable(f"--load: cannot read {path} ({type(e).__name__}: {e})") from e
    return (common.get("train_state") or {}).get("config")


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


def _metadata(fully_reshardable: bool) -> dict:
    from megatron.core import parallel_state as ps
    fmt = "fully_reshardable" if fully_reshardable else "dp_reshardable"
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


def current_layout() -> dict:
    """The parallel layout of this process's parallel_state (what RNG states and optimizer buckets depend on)."""
    from megatron.core import parallel_state as ps
    return {"tp": ps.get_tensor_model_parallel_world_size(), "pp": ps.get_pipeline_model_parallel_world_size(),
            "ep": ps.get_expert_model_parallel_world_size(),
            "vpp": ps.get_virtual_pipeline_model_parallel_world_size() or 1,
            "dp": ps.get_data_parallel_world_size(with_context_parallel=True)}


def save_checkpoint(root: str, iteration: int, chunks: List[torch.nn.Module], optimizer, train_state: dict,
                    fully_reshardable: bool = True, ema=None) -> str:
    """Collective: every rank calls it. Returns the final directory. fully_reshardable=False saves the
    distributed optimizer's state in megatron's faster 'dp_reshardable' form, which reloads only at the same
    TP/PP/EP (load_checkpoint says so)."""
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
    fmt = "fully_reshardable" if fully_reshardable else "dp_reshardable"
    train_state = dict(train_state, iteration=iteration, has_optimizer=with_optim, layout=current_layout(),
                       optimizer_format=fmt, has_ema=ema is not None)
    sd = _sharded_state_dict(chunks, optimizer, train_state,
                             is_loading=False, with_optim=with_optim, with_rng=True,
                             fully_reshardable=fully_reshardable)
    if ema is not None:
        sd["ema"] = ema.sharded_state_dict()      # waits for a pending update
    with dist_checkpoint_writer_processes():
        dist_checkpointing.save(sd, tmp)
    _barrier()
    if os.environ.get(_PAUSE_ENV):
        time.sleep(float(os.environ[_PAUSE_ENV]))
    if _rank() == 0:
        if train_state.get("config") is not None:
            with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
                json.dump(train_state["config"], f, indent=1)
        if os.path.isdir(final):               # re-saving the same iteration: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        _write_atomic(os.path.join(root, LATEST), str(iteration))
    _barrier()
    return final


def _cause(e: BaseException) -> str:
    """'Type: first line' of what went wrong, looking through torch.distributed.checkpoint's CheckpointException,
    whose own text is only 'CheckpointException ranks:dict_keys([0])' (failures: {rank: (exception, traceback)})."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        inner = next(iter(failures.values()))
        inner = inner[0] if isinstance(inner, tuple) else inner
        if isinstance(inner, BaseException):
            e = inner
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def load_checkpoint(root: str, chunks: List[torch.nn.Module], optimizer, *, load_optim: bool = True,
                    load_rng: bool = True, iteration: Optional[int] = None, log=print, ema=None) -> Optional[dict]:
    """Collective. Loads what `root` holds (find_checkpoint; `iteration` picks another of the trainer's) into the
    chunks, and for the trainer's own checkpoints the optimizer and RNG states too. Returns the saved train_state
    (plus "kind"), or None when `root` does not exist.

    At another layout than the saving one: the model and a 'fully_reshardable' optimizer state reshard; the RNG
    states (one per saving rank) are not restored, which `log` says; a 'dp_reshardable' optimizer state at another
    TP/PP/EP is refused with a message naming --no-load-optim. `ema` (a ParameterEMA) is loaded when the
    checkpoint holds one ("ema_loaded" in the result); otherwise the caller restarts it from the weights."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException as TorchCheckpointException

    found = find_checkpoint(root)
    if found is None:
        return None
    path = found.path if iteration is None else checkpoint_dir(root, iteration)
    try:
        common = dist_checkpointing.load_common_state_dict(path)
    except (CheckpointingException, OSError, RuntimeError, EOFError, TorchCheckpointException) as e:
        # megatron-core >= 0.17 reads the common state through torch.distributed.checkpoint, whose
        # CheckpointException (a BaseException) wraps a damaged file's EOFError with its traceback
        raise CheckpointUnusable(f"--load {root}: cannot read {path} ({_cause(e)})") from e
    saved = dict(common.get("train_state") or {})
    if found.kind == "weights":
        load_optim = load_rng = False
    load_optim = load_optim and saved.get("has_optimizer", True)
    here = current_layout()
    there = saved.get("layout")
    fmt = saved.get("optimizer_format", "dp_reshardable")
    moved = there is not None and there != here
    if load_optim and moved and fmt != "fully_reshardable" and _distributed(optimizer) and \
            any(there.get(k) != here[k] for k in ("tp", "pp", "ep", "vpp")):
        raise CheckpointUnusable(
            f"--load {root}: the optimizer state was saved in megatron's 'dp_reshardable' form at "
            f"{_fmt_layout(there)}, which reloads only at the same TP/PP/EP (this run: {_fmt_layout(here)}); "
            f"resume at that layout, or pass --no-load-optim to start the optimizer afresh")
    if load_rng and moved:
        log(f"RNG states not restored: saved at {_fmt_layout(there)}, running at {_fmt_layout(here)} (the data "
            f"order does not depend on them)")
        load_rng = False
    if load_optim and optimizer is not None:
        materialize_torch_adam_state(optimizer)
    sd = _sharded_state_dict(chunks, optimizer, None, is_loading=True, with_optim=load_optim, with_rng=load_rng,
                             fully_reshardable=fmt == "fully_reshardable")
    load_ema = ema is not None and bool(saved.get("has_ema"))
    if load_ema:
        sd["ema"] = ema.sharded_state_dict()
    try:
        loaded = dist_checkpointing.load(sd, path)
    except CheckpointingException as e:
        raise CheckpointUnusable(f"--load {root}: {path} does not fit this model "
                                 f"({(str(e).splitlines() or [''])[0][:300]})") from e
    except (Exception, TorchCheckpointException) as e:  # noqa: BLE001  a damaged shard: torch's CheckpointException
        # (a BaseException) wrapping EOFError / UnpicklingError, ...
        raise CheckpointUnusable(f"--load {root}: cannot read {path}, a file of it is damaged ({_cause(e)})") from e
    for i, c in enumerate(chunks):
        _unwrap(c).load_state_dict(loaded[f"model{i}"], strict=True)
    if load_optim and optimizer is not None:
        load_optimizer_state(optimizer, loaded["optimizer"])
    if load_rng and loaded.get("rng_state") is not None:
        _set_rng_state(loaded["rng_state"])
    if load_ema:
        ema.load_state_dict(loaded["ema"])
    state = dict(saved or loaded.get("train_state") or {})
    state.setdefault("iteration", found.iteration if iteration is None else iteration)
    state.setdefault("consumed_samples", 0)
    state.update(kind=found.kind, path=path, optimizer_loaded=bool(load_optim and optimizer is not None),
                 ema_loaded=load_ema)
    return state


def _distributed(optimizer) -> bool:
    return any(type(o).__name__ == "DistributedOptimizer" for o in getattr(optimizer, "chained_optimizers", [optimizer]))


def _fmt_layout(l: dict) -> str:
    return " ".join(f"{k.upper()}{l.get(k)}" for k in ("tp", "pp", "ep", "vpp", "dp"))
