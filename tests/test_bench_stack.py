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
                        "--impls", "ours,ours-unfused-expert-wgrad", "--out", str(out),
                        "--profile", "moe", "--trace", str(tmp_path / "trace")],
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
    # --profile: one step of each implementation profiled (the GPU idle line says none ran on CPU), its trace kept
    assert text.count("GPU idle: no CUDA kernels recorded") == 2, text
    assert sorted(os.listdir(tmp_path / "trace")) == sorted(
        f"moe_{i}.json" for i in ("ours", "ours-unfused-expert-wgrad"))
    header = [l for l in text.splitlines() if l.startswith("- device:")]
    assert header and "torch " in header[0] and re.search(r"commit \S+", header[0]), text[:500]


def test_idle_gaps():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from timing import idle_gaps
    # kernels busy 0-10, 12-20 (overlapping 15-18), 50-60 us: two gaps, 10-12 (2 us, under the 5 us floor) and 20-50
    kernels = [(0, 10), (12, 20), (15, 18), (50, 60)]
    host = [(0, 25, "router"), (25, 45, "plan"), (45, 70, "experts")]
    text = idle_gaps(kernels, host)
    first = text.splitlines()[0]
    assert "span 0.06 ms" in first and "busy 0.03 ms" in first and "idle 0.03 ms in 1 gaps" in first, text
    ops = [l.split() for l in text.splitlines()[1:]]
    assert [o[1] for o in ops] == ["plan", "router", "experts"], text       # 20, 5, 5 us of the 30 us gap
    assert [float(o[0]) for o in ops] == [0.02, 0.005, 0.005], text
    assert idle_gaps([], host).startswith("GPU idle: no CUDA kernels")


def test_state_file_resumes_a_cut_table(tmp_path):
    """--state: a second call with the same file runs only what the first did not, and the table has both; a file
    of another commit is refused in one line."""
    state, out = tmp_path / "state.jsonl", tmp_path / "t.md"
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", DSV3_COMMIT="abc1234")

    def run(impls, **kw):
        return subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_stack.py"), "--smoke", "--parts",
                               "moe", "--impls", impls, "--state", str(state), "--out", str(out)],
                              cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(env, **kw))
    r = run("ours")
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(state.read_text().splitlines()) == 1
    r = run("ours,ours-unfused-expert-wgrad")
    assert r.returncode == 0, r.stderr[-2000:]
    ran = [l.split()[1] for l in r.stdout.splitlines() if l.startswith("moe ")]
    assert ran == ["ours-unfused-expert-wgrad"], r.stdout           # "ours" came from the file
    rows = [l for l in out.read_text().splitlines() if l.startswith("| DeepSeekMoE alone")]
    assert len(rows) == 2 and all(float(l.split("|")[4]) > 0 for l in rows), rows
    r = run("ours", DSV3_COMMIT="fffffff")
    assert r.returncode == 2 and "holds results of commit abc1234" in r.stderr.strip().splitlines()[-1], r.stderr


def test_restep_row_remakes_the_fp8_weight_copies_every_step(mcore_single):
    """`ours-fp8-restep` drops the weights' FP8 copies before each step (as the trainer's after-optimizer-step hook
    does), so every step quantises its weights again; `ours-fp8` keeps them from the first step on."""
    import importlib.util

    import torch

    from megatron_dsv3.compat import get_process_group_collection
    from megatron_dsv3.fp8.weight_cache import ATTR
    spec = importlib.util.spec_from_file_location("bench_stack", os.path.join(ROOT, "bench", "bench_stack.py"))
    bs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bs)
    cfg = bs.bench_config(True, 2).replace(seq_length=16)
    for impl, remade in (("ours-fp8-restep", True), ("ours-fp8", False)):
        torch.manual_seed(0)
        mod, loss_of, _ = bs.build("moe", impl, cfg, torch.device("cpu"), get_process_group_collection(None))
        copies, alive = [], []              # the copies kept alive, so that no id is reused
        for _ in range(2):
            loss_of(mod).sum().backward()
            alive.append([v[1] for p in mod.parameters() for v in getattr(p, ATTR, {}).values()])
            copies.append({id(x) for x in alive[-1]})
        assert copies[0] and (copies[0].isdisjoint(copies[1]) if remade else copies[0] == copies[1]), impl


def test_switches_combine_and_set_their_attributes(mcore_single):
    """'ours-a+b' turns on each named A/B switch in one build (each attribute set on every module of its class);
    anything else is not a combination (and --impls refuses it)."""
    import importlib.util

    import torch

    from megatron_dsv3.compat import get_process_group_collection
    from megatron_dsv3.mla.core_attention import SDPAttention
    from megatron_dsv3.moe.experts import GroupedExperts
    spec = importlib.util.spec_from_file_location("bench_stack", os.path.join(ROOT, "bench", "bench_stack.py"))
    bs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bs)
    assert bs.switches_of("ours-fa4+cublas-wgrad") == ["fa4", "cublas-wgrad"]
    assert bs.switches_of("ours-fa4+bogus") is None and bs.switches_of("mcore-te") is None
    assert "FlashAttention-4" in bs.impl_name("ours-fa4+cublas-wgrad")
    cfg = bs.bench_config(True, 2).replace(seq_length=16)
    mod, _, _ = bs.build("moe_layer", "ours-fa4+cublas-wgrad", cfg, torch.device("cpu"),
                         get_process_group_collection(None))
    cores = [m for m in mod.modules() if isinstance(m, SDPAttention)]
    experts = [m for m in mod.modules() if isinstance(m, GroupedExperts)]
    assert cores and all(m.backends[0] == "fa4" for m in cores)
    assert experts and all(m.wgrad == "cublas" for m in experts)
    assert GroupedExperts.wgrad == "auto"   # instances only
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_stack.py"), "--smoke", "--impls",
                        "ours-fa4+bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown implementation 'ours-fa4+bogus'" in r.stderr
