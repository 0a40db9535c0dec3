"""Run code under torch.distributed (gloo, 127.0.0.1) with megatron-core's parallel state, on CPU.

`run_distributed(fn, world_size, tp=, pp=, ep=)` spawns one process per rank from a forkserver that
has already imported torch and megatron-core (so a rank costs a fork, not a 6 s import), applies the
CPU shim in each rank, initialises parallel_state, calls `fn(rank, **kwargs)` and returns every
rank's result. Any rank's exception fails the call with that rank's traceback; a hang fails it at
`timeout`. `fn` must be a module-level function (it is pickled by name).
"""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import queue as queue_mod
import socket
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, List, Optional

import torch

_PRELOAD = ["torch", "megatron.core.parallel_state", "megatron.core.tensor_parallel",
            "megatron.core.transformer.transformer_block", "megatron_dsv3.mcore_cpu"]
_ctx = None


class DistributedTestError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context():
    global _ctx
    if _ctx is None:
        if torch.cuda.is_available():
            # a forkserver that imported megatron-core may have touched CUDA; ranks must start clean
            _ctx = mp.get_context("spawn")
        else:
            _ctx = mp.get_context("forkserver")
            _ctx.set_forkserver_preload(_PRELOAD)
    return _ctx


def init_parallel_state(tp: int = 1, pp: int = 1, ep: int = 1, cp: int = 1, etp: int = 1,
                        vpp: Optional[int] = None, seed: int = 1234) -> None:
    """parallel_state on an already-initialised default process group, then megatron's RNG seeds."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron_dsv3.mcore_cpu import apply_cpu_shim

    apply_cpu_shim()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp,
                                 expert_model_parallel_size=ep, expert_tensor_parallel_size=etp)
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_parallel_state() -> None:
    from megatron.core import parallel_state as ps
    ps.destroy_model_parallel()


@contextmanager
def single_process(tp: int = 1, pp: int = 1, ep: int = 1, seed: int = 1234, backend: str = "gloo"):
    """World size 1 (gloo) + parallel_state in this process; restores the previous state on exit."""
    import torch.distributed as dist
    own = not dist.is_initialized()
    if own:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    init_parallel_state(tp, pp, ep, seed=seed)
    try:
        yield
    finally:
        destroy_parallel_state()
        if own:
            dist.destroy_process_group()


def _rank_main(rank, world_size, port, sizes, fn, kwargs, q, timeout):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), TORCHDYNAMO_DISABLE="1")
    torch.set_num_threads(1)
    import warnings
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")  # ranks' stderr is not captured
    import torch.distributed as dist
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timedelta(seconds=timeout))
        init_parallel_state(**sizes)
        out = fn(rank, **kwargs)
        buf = io.BytesIO()
        torch.save(out, buf)
        q.put(("ok", rank, buf.getvalue()))
    except BaseException:  # report every failure, including SystemExit from a rank
        q.put(("err", rank, traceback.format_exc()))
    finally:
        try:
            destroy_parallel_state()
            dist.destroy_process_group()
        except Exception:
            pass


def run_distributed(fn: Callable[..., Any], world_size: int, *, tp: int = 1, pp: int = 1, ep: int = 1, cp: int = 1,
                    etp: int = 1, vpp: Optional[int] = None, seed: int = 1234, timeout: float = 180,
                    **kwargs) -> List[Any]:
    """fn(rank, **kwargs) on `world_size` gloo ranks; returns the per-rank results in rank order."""
    for attempt in range(3):
        try:
            return _run_once(fn, world_size, tp=tp, pp=pp, ep=ep, cp=cp, etp=etp, vpp=vpp, seed=seed,
                             timeout=timeout, **kwargs)
        except DistributedTestError as e:
            # the free port was taken between choosing and binding it (other processes on the machine): retry
            if attempt == 2 or "address already in use" not in str(e).lower():
                raise


def _run_once(fn, world_size, *, tp, pp, ep, cp, etp, vpp, seed, timeout, **kwargs):
    if world_size % (tp * pp * cp) != 0:
        raise ValueError(f"world_size {world_size} is not divisible by tp*pp*cp = {tp * pp * cp}")
    ctx = _context()
    q = ctx.Queue()
    port = free_port()
    sizes = dict(tp=tp, pp=pp, ep=ep, cp=cp, etp=etp, vpp=vpp, seed=seed)
    # not daemonic: megatron's checkpoint writer starts a multiprocessing Manager inside a rank;
    # every rank is joined or terminated below
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, sizes, fn, kwargs, q, timeout))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DistributedTestError(f"timed out after {timeout:.0f} s; ranks finished: {sorted(results)}, "
                                           f"failed: {sorted(errors)}" + _fmt(errors))
            try:
                status, rank, payload = q.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in errors]
                for r in dead:
                    errors[r] = f"rank {r} died with exit code {procs[r].exitcode}"
                if errors:  # one rank failed: the others would wait on it forever
                    break
                continue
            if status == "ok":
                results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            else:
                errors[rank] = payload
                break
    finally:
        for p in procs:
            p.join(timeout=0.5 if errors else 10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    if errors:
        raise DistributedTestError(f"{len(errors)} of {world_size} ranks failed" + _fmt(errors))
    return [results[r] for r in range(world_size)]


def _fmt(errors) -> str:
    return "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
