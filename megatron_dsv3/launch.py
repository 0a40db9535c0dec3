"""Ranks on one host: gloo on 127.0.0.1 with megatron-core's parallel state, for the tools and the trainer.

`run_ranks(fn, world_size, tp=, pp=, ep=)` starts one process per rank, applies the CPU shim in each,
initialises parallel_state, calls `fn(rank, **kwargs)` and returns every rank's result (rank order).
A rank's failure fails the call: a ValueError / OSError raised by a rank (bad input: CheckpointError,
FileNotFoundError...) is raised again here as the same exception, with the rank's traceback as a note;
anything else is a `RankFailure` carrying the traceback. A hang fails at `timeout`.
`fn` must be a module-level function (it is pickled by name).

On CPU the ranks are forked from a forkserver that has torch and megatron-core imported already (a
rank costs a fork, not a 6 s import); with CUDA they are spawned (a forkserver that imported megatron-core
may have touched CUDA). No helper process outlives the launcher: every rank kills itself when the launcher
exits (`exit_with`), after which the forkserver and multiprocessing's resource tracker exit by themselves, so
a launcher killed by SIGKILL leaves nothing running.

`free_port()`, `init_parallel_state()` and `single_process()` are the one-process pieces the trainer,
the converters and `verify` use. The test harness (megatron_dsv3/testing.py) is built on this module,
never the other way round.
"""
from __future__ import annotations

import ctypes
import io
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import socket
import sys
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, List, Optional

import torch

_PRELOAD = ["torch", "megatron.core.parallel_state", "megatron.core.tensor_parallel",
            "megatron.core.transformer.transformer_block", "megatron_dsv3.mcore_cpu"]
_PR_SET_PDEATHSIG = 1
_ctx = None


class RankFailure(RuntimeError):
    """A rank failed with something other than bad input (its traceback is in the message), died, or hung."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent(parent_pid: Optional[int] = None) -> bool:
    """Have the kernel SIGKILL this process when its parent exits (Linux prctl PR_SET_PDEATHSIG).

    For helper processes that would otherwise be re-parented to init and keep running (a multiprocessing
    server or worker blocked on a pipe its dead parent will never write). If the parent is already gone
    (`parent_pid` given and no longer our parent) the process exits at once. Returns False where the
    platform has no prctl (then nothing is done)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)      # the parent died between fork and prctl: the signal will never come
    return True


def exit_with(pid: int) -> None:
    """SIGKILL this process as soon as process `pid` exits (a daemon thread waiting on a pidfd; polling once
    a second where there is none). For ranks forked by the forkserver: their parent is the forkserver, which
    itself stays alive while they do (they hold its liveness pipe), so PR_SET_PDEATHSIG alone would keep
    both running after the launcher is killed."""
    import threading

    def kill_self():
        os.kill(os.getpid(), signal.SIGKILL)

    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        kill_self()
    except (AttributeError, OSError):
        fd = None

    def watch():
        if fd is not None:
            import select
            select.select([fd], [], [])          # readable once the process has exited
        else:
            while True:
                time.sleep(1.0)
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                except PermissionError:
                    pass
        kill_self()

    threading.Thread(target=watch, name=f"exit-with-{pid}", daemon=True).start()


def _context():
    global _ctx
    if _ctx is None:
        if torch.cuda.is_available():
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


def _rank_main(rank, world_size, port, sizes, fn, kwargs, q, timeout, launcher_pid):
    exit_with(launcher_pid)      # a SIGKILLed launcher takes its ranks with it (then the forkserver exits too)
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
    except BaseException as e:  # report every failure, including SystemExit from a rank
        tb = traceback.format_exc()
        exc = None
        if isinstance(e, (ValueError, OSError)):
            try:
                import pickle
                exc = pickle.dumps(e)
                pickle.loads(exc)
            except Exception:
                exc = None
        q.put(("err", rank, (tb, exc)))
    finally:
        try:
            destroy_parallel_state()
            dist.destroy_process_group()
        except Exception:
            pass


def run_ranks(fn: Callable[..., Any], world_size: int, *, tp: int = 1, pp: int = 1, ep: int = 1, cp: int = 1,
              etp: int = 1, vpp: Optional[int] = None, seed: int = 1234, timeout: float = 180,
              **kwargs) -> List[Any]:
    """fn(rank, **kwargs) on `world_size` gloo ranks of this host; returns the per-rank results in rank order."""
    for attempt in range(3):
        try:
            return _run_once(fn, world_size, tp=tp, pp=pp, ep=ep, cp=cp, etp=etp, vpp=vpp, seed=seed,
                             timeout=timeout, **kwargs)
        except RankFailure as e:
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
    # not daemonic: megatron's checkpoint writer starts child processes inside a rank;
    # every rank is joined or terminated below
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, sizes, fn, kwargs, q, timeout, os.getpid()))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors, raised = {}, {}, {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RankFailure(f"timed out after {timeout:.0f} s; ranks finished: {sorted(results)}, "
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
                errors[rank], exc = payload
                if exc is not None:
                    raised[rank] = exc
                break
    finally:
        for p in procs:
            p.join(timeout=0.5 if errors else 10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    if raised:      # bad input found by a rank: the same exception here, with where it happened
        import pickle
        rank = min(raised)
        e = pickle.loads(raised[rank])
        e.add_note(f"raised on rank {rank} of {world_size}:\n{errors[rank]}")
        raise e
    if errors:
        raise RankFailure(f"{len(errors)} of {world_size} ranks failed" + _fmt(errors))
    return [results[r] for r in range(world_size)]


def _fmt(errors) -> str:
    return "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
