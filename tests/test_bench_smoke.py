"""bench/bench_layers.py --smoke on CPU (tiny preset, float32, 2 iterations): every variant of ours runs and the
megatron-core MoELayer builds (0.16.1 here: its grouped-GEMM experts need the grouped_gemm package, so that row is
an error and the SequentialMLP row runs)."""
import importlib.util
import os
import sys

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_layers.py")


def _load():
    spec = importlib.util.spec_from_file_location("bench_layers", _PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # its dataclass looks its module up while the file executes
    spec.loader.exec_module(mod)
    return mod


def test_bench_smoke(tmp_path):
    out = tmp_path / "results.md"
    rows = _load().main(["--smoke", "--out", str(out)])
    text = out.read_text()

    ours = [r for r in rows if r.owner == "ours"]
    assert {r.status for r in ours} == {"ok"}, [(r.part, r.variant, r.notes) for r in ours if r.status != "ok"]
    assert all(r.ms > 0 and r.flops > 0 for r in ours)
    parts = {(r.part, r.variant) for r in ours}
    for want in ("model, 2 layers", "dense layer", "MoE layer", "MLASelfAttention alone", "core attention alone",
                 "MoE alone"):
        assert any(p.startswith(want) for p, _ in parts), want
    assert ("MoE alone (router + experts + shared)", "DeepSeekMoE") in parts

    mcore_moe = [r for r in rows if r.owner == "megatron-core" and "MoELayer" in r.variant]
    assert mcore_moe and any(r.status == "ok" and r.ms > 0 for r in mcore_moe), [(r.variant, r.notes) for r in mcore_moe]

    assert "| DeepSeekMoE | ours | ok |" in text and "megatron-core MoELayer" in text
    assert "- megatron-core: " in text and "- torch: " in text and "- device: CPU" in text


def test_mla_breakdown_smoke(tmp_path, monkeypatch):
    """bench/mla_breakdown.py --smoke on CPU: every row measured (a positive time), the table written with its
    device and commit; bad sizes refused by name."""
    import pytest
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)      # the reference kernels: the rows, not the interpreter
    path = os.path.join(os.path.dirname(_PATH), "mla_breakdown.py")
    spec = importlib.util.spec_from_file_location("mla_breakdown", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "mla.md"
    text = mod.main(["--smoke", "--out", str(out)])
    assert out.read_text() == text and "- device: CPU" in text
    rows = [line.split(" | ") for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = [r[0][2:] for r in rows]
    for want in ("the block, synchronised steps", "q_down", "kv_down", "as one GEMM", "q_up", "kv_up", "o_proj",
                 "core attention", "q/k/v assembly", "RMSNorm over"):
        assert any(n.startswith(want) or want in n for n in names), (want, names)
    assert all(float(r[1]) > 0 for r in rows)
    with pytest.raises(SystemExit):
        mod.main(["--smoke", "--seq", "0"])
