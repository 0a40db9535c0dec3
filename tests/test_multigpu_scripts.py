"""bench/multigpu_parity.py and bench/multigpu_throughput.py stay runnable: the parity script on 2 gloo CPU ranks
(torchrun), tiny sizes, 2 steps, two layouts (EP 2 and PP 2 with DualPipeV), its table saying ok for both, with the
checkpoint of each resumed under the other; bad flags are one-line errors naming the flag."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")


def _run(script, *args, timeout=120):
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)   # keep a megatron-core given by it
    env = dict(os.environ, PYTHONPATH=path, TORCHDYNAMO_DISABLE="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(BENCH, script), *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)


def test_parity_on_two_gloo_ranks(tmp_path):
    out = tmp_path / "parity.md"
    r = _run("multigpu_parity.py", "--gpus", "2", "--cpu", "--smoke", "--steps", "2", "--layouts",
             "ep2,pp2-dualpipev,ep4", "--workdir", str(tmp_path / "work"), "--out", str(out))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {line.split("|")[2].strip(): line for line in out.read_text().splitlines() if line.startswith("| tiny")}
    assert set(rows) == {"ep2", "pp2-dualpipev", "ep4"}
    for layout, under in (("ep2", "pp2-dualpipev"), ("pp2-dualpipev", "ep2")):
        cells = [c.strip() for c in rows[layout].split("|")]
        assert cells[8] == "ok", rows[layout]
        assert cells[5] == "yes" and cells[6].startswith(f"ok under {under}"), rows[layout]
    assert "needs 4 GPUs" in rows["ep4"]
    assert "2 gloo CPU ranks" in out.read_text()


@pytest.mark.parametrize("script, args, message", [
    ("multigpu_parity.py", ["--gpus", "2", "--cpu", "--layouts", "pp3"], "--layouts: unknown layout 'pp3'"),
    ("multigpu_parity.py", ["--gpus", "2", "--cpu", "--runs", "tiny:fp16"], "--runs: 'tiny:fp16'"),
    ("multigpu_parity.py", ["--gpus", "0", "--cpu"], "--gpus must be >= 1"),
    ("multigpu_throughput.py", ["--gpus", "2", "--cpu", "--impls", "ours,theirs"], "--impls: unknown implementation"),
])
def test_bad_flags_are_one_line_errors(script, args, message):
    r = _run(script, *args, timeout=60)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert message in last, r.stderr


def test_a_resume_the_budget_never_ran_is_not_a_failure():
    """Seen on 2 H200s: a layout whose checkpoint the next (budget-skipped) layout never loaded was FAILED."""
    sys.path.insert(0, BENCH)
    from multigpu_parity import compare
    rank = {"loss": [2.0, 1.5, 1.2, 1.1], "bias_digest": [{"1": "a"}] * 4, "bias_final": {"1": [0.0]},
            "wall_s": 1.0, "step_s": [0.1] * 4, "iterations": [1, 2, 3, 4]}
    ref = [dict(rank)]
    job = {"under": "pp2-interleaved", "key": "tiny:fp32|pp2-1f1b|resume"}
    row = compare("tiny:fp32", "pp2-1f1b", ref, [dict(rank), dict(rank)], job, None, 4)
    assert row["status"] == "ok" and row["resume"].startswith("not run (budget"), row
    bad = compare("tiny:fp32", "pp2-1f1b", ref, [dict(rank), dict(rank)], job, {"error": "boom"}, 4)
    assert bad["status"] == "FAILED" and "boom" in bad["resume"], bad
