"""compat.dist_checkpoint_writer_processes: megatron-core's dist_checkpointing writer leaves no process behind.

Guards megatron-core 0.16-0.19, whose filesystem_async collects the writer workers' results through a
module-level multiprocessing Manager (a server process never stopped: a SIGKILLed trainer left it running,
re-parented to init, ~300-400 MB). One process saves a dist checkpoint inside the context and is SIGKILLed
with a writer-like child still running (forked inside the context, as megatron's workers are mid-save):
nothing it started may survive it.
"""
import inspect
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VICTIM = r"""
import multiprocessing as mp, os, sys, time, torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
from megatron_dsv3.compat import dist_checkpoint_writer_processes
from megatron_dsv3.launch import single_process
with single_process():
    with dist_checkpoint_writer_processes():
        worker = mp.get_context("fork").Process(target=time.sleep, args=(300,), daemon=True)  # a worker mid-save
        worker.start()
        os.makedirs(sys.argv[1] + "/ckpt")
        dist_checkpointing.save({"w": ShardedTensor.from_rank_offsets("w", torch.arange(4096.0))}, sys.argv[1] + "/ckpt")
    with open(sys.argv[1] + "/saved.tmp", "w") as f:
        f.write(str(worker.pid))
    os.replace(sys.argv[1] + "/saved.tmp", sys.argv[1] + "/saved")
    time.sleep(300)
"""


def _alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_megatron_core_writer_still_starts_a_manager():
    """What the workaround replaces is still there in this megatron-core (else remove the workaround)."""
    from megatron.core import package_info
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    assert hasattr(filesystem_async, "_results_queue"), package_info.__version__
    # 0.16: _get_write_results_queue; 0.19: get_write_results_queue (same module-level Manager queue)
    getter = getattr(filesystem_async, "_get_write_results_queue", None) or filesystem_async.get_write_results_queue
    assert "Manager()" in inspect.getsource(getter), package_info.__version__


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_sigkill_after_a_save_leaves_no_child_running(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", VICTIM, str(tmp_path)], cwd=ROOT,
                            env=dict(os.environ, TORCHDYNAMO_DISABLE="1"))
    children = []
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "saved").exists() and proc.poll() is None and time.monotonic() < deadline:
            children += [c.pid for c in psutil.Process(proc.pid).children(recursive=True) if c.pid not in children]
            time.sleep(0.2)
        assert (tmp_path / "saved").exists(), f"the save did not finish (exit status {proc.poll()})"
        assert os.path.exists(tmp_path / "ckpt" / "metadata.json")
        worker = int((tmp_path / "saved").read_text())
        children += [c.pid for c in psutil.Process(proc.pid).children(recursive=True) if c.pid not in children]
        assert worker in children
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [(p, " ".join(psutil.Process(p).cmdline())[:80]) for p in children if _alive(p)]
        assert left == [], "children outlived the SIGKILLed saver"
    finally:
        for p in children:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
