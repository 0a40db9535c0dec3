"""bench/bench_stack.py --smoke on CPU (tiny preset, float32, seq 32): each (part, implementation) in its own
process writes a row with a time, the A/B of the experts' fused weight gradient included."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_stack_smoke(tmp_path):
    out = tmp_path / "stack.md"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_stack.py"), "--smoke", "--parts", "moe,stack",
                        "--impls", "ours,ours-unfused-expert-wgrad", "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env=dict(os.environ, TORCHDYNAMO_DISABLE="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    for part in ("DeepSeekMoE alone", "4 layers"):
        for impl in ("ours BF16 |", "ours BF16, experts' weight gradients by autograd + add"):
            rows = [l for l in text.splitlines() if l.startswith(f"| {part}") and impl in l]
            assert len(rows) == 1, (part, impl, text)
            ms = float(rows[0].split("|")[4])
            assert ms > 0, rows[0]
    header = [l for l in text.splitlines() if l.startswith("- device:")]
    assert header and "torch " in header[0] and re.search(r"commit \S+", header[0]), text[:500]
