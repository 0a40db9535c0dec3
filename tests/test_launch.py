"""megatron_dsv3/launch.py: the rank launcher production code uses (the converters, verify, the trainer).

Production code never imports the test harness; a launcher killed by SIGKILL leaves no rank running;
bad input found on a rank comes back as the same exception (the tools print it as one line).
"""
import ast
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from megatron_dsv3.checkpoint.safetensors_io import CheckpointError
from megatron_dsv3.launch import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imports(path):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_production_code_does_not_import_the_test_harness():
    offenders = []
    for top in ("megatron_dsv3", "tools"):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                path = os.path.join(d, f)
                if f.endswith(".py") and path != os.path.join(ROOT, "megatron_dsv3", "testing.py"):
                    if "megatron_dsv3.testing" in set(_imports(path)):
                        offenders.append(os.path.relpath(path, ROOT))
    assert offenders == [], f"import megatron_dsv3.launch instead of the test harness in {offenders}"


def _bad_input_on_rank_one(rank):
    if rank == 1:
        raise CheckpointError("/some/ckpt/__1_0.distcp: truncated")
    return rank


def test_a_ranks_bad_input_is_raised_as_itself():
    with pytest.raises(CheckpointError, match=r"__1_0.distcp: truncated") as e:
        run_ranks(_bad_input_on_rank_one, 2, timeout=120)
    assert "raised on rank 1 of 2" in "".join(e.value.__notes__)


def _write_pid_and_sleep(rank, directory):
    with open(os.path.join(directory, f"rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(300)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux")
def test_sigkilled_launcher_leaves_no_rank_running(tmp_path):
    script = ("import sys; sys.path.insert(0, %r)\n"
              "from megatron_dsv3.launch import run_ranks\n"
              "from tests.test_launch import _write_pid_and_sleep\n"
              "run_ranks(_write_pid_and_sleep, 2, timeout=600, directory=%r)\n") % (ROOT, str(tmp_path))
    launcher = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT)
    pids = []
    try:
        deadline = time.monotonic() + 120
        while len(pids) < 2 and time.monotonic() < deadline and launcher.poll() is None:
            pids = [int(open(p).read()) for p in (tmp_path / "rank0.pid", tmp_path / "rank1.pid")
                    if p.exists() and p.read_text()]
            time.sleep(0.2)
        assert len(pids) == 2, "the ranks did not start"
        helpers = [c.pid for c in psutil.Process(launcher.pid).children(recursive=True)]   # forkserver, tracker
        pids += [h for h in helpers if h not in pids]
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [p for p in pids if _alive(p)] == [], "ranks or helpers outlived their SIGKILLed launcher"
    finally:
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
