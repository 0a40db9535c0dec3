"""tools/convert_checkpoint.py and tools/verify_checkpoint.py end to end (in this process, TP=PP=EP=1)."""
import importlib.util
import os


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_convert_and_verify_cli(hf_tiny, tmp_path, capsys):
    convert, verify = _tool("convert_checkpoint"), _tool("verify_checkpoint")
    mc, back = str(tmp_path / "mcore"), str(tmp_path / "hf")
    assert convert.main(["hf-to-mcore", hf_tiny["fp8"], mc, "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "wrote megatron-core dist checkpoint" in out and "TPxPPxEP=1x1x1" in out
    assert convert.main(["mcore-to-hf", mc, back, "--dtype", "fp8", "--max-shard-size", "300K"]) == 0
    assert "safetensors file(s) + index + config.json" in capsys.readouterr().out
    # refused: output exists
    assert convert.main(["mcore-to-hf", mc, back]) == 2
    assert "exists; pass overwrite=True (--overwrite)" in capsys.readouterr().err
    # logits of the dist checkpoint against HF on the dequantised FP8 weights
    assert verify.main([hf_tiny["fp8"], mc, "--prompts", "2", "--seq", "16", "--max-abs", "1e-3",
                        "--max-kl", "1e-8"]) == 0
    assert "mean KL" in capsys.readouterr().out
    # a bad layout: a clear message, exit status 2, nothing written
    assert convert.main(["hf-to-mcore", hf_tiny["bf16"], str(tmp_path / "x"), "--ep", "3"]) == 2
    assert "num_experts (8) must be divisible" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")
