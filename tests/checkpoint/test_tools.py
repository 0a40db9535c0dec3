"""tools/convert_checkpoint.py and tools/verify_checkpoint.py as a user runs them (in this process, one worker).

Covers: the converter runs in one process whatever the model (no target-layout flags: the dist checkpoint
is layout-free), --workers is bounded; --dtype follows the source; output directories get the user's umask;
bad input ends with one `error: ...` line naming the file, status 2, nothing left behind (--debug: traceback).
"""
import importlib.util
import json
import os
import shutil

import pytest
import torch

from tests.checkpoint.conftest import write_hf

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _one_error_line(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def test_convert_and_verify_cli(hf_tiny, tmp_path, capsys):
    convert, verify = _tool("convert_checkpoint"), _tool("verify_checkpoint")
    mc, back = str(tmp_path / "mcore"), str(tmp_path / "hf")
    assert convert.main(["hf-to-mcore", hf_tiny["fp8"], mc, "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "wrote megatron-core dist checkpoint" in out and "in 1 process(es)" in out and "loads at any" in out
    assert convert.main(["mcore-to-hf", mc, back, "--dtype", "fp8", "--max-shard-size", "300K"]) == 0
    assert "safetensors file(s) + index + config.json" in capsys.readouterr().out
    # refused: output exists
    assert convert.main(["mcore-to-hf", mc, back]) == 2
    _one_error_line(capsys, "exists; pass overwrite=True (--overwrite)")
    # logits of the dist checkpoint against HF on the dequantised FP8 weights
    assert verify.main([hf_tiny["fp8"], mc, "--prompts", "2", "--seq", "16", "--max-abs", "1e-3",
                        "--max-kl", "1e-8"]) == 0
    assert "mean KL" in capsys.readouterr().out


def test_no_target_layout_flags_and_workers_are_bounded(hf_tiny, tmp_path, capsys, monkeypatch):
    """README's `--pp 16 --ep 64` started 1,024 local processes; the output never depended on it."""
    convert = _tool("convert_checkpoint")
    for cmd in ("hf-to-mcore", "mcore-to-hf"):
        assert convert.main([cmd, hf_tiny["bf16"], str(tmp_path / "x"), "--pp", "16", "--ep", "64"]) == 2
        _one_error_line(capsys, "--pp/--ep: there is no target layout", "layout-free", "--workers N")
    with pytest.raises(SystemExit):
        convert.main(["hf-to-mcore", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "layout-free" in help_text and "default 1" in help_text
    # 8 experts x 2 layers: 3 workers do not divide the model; 32 exceed it; both before any process starts
    assert convert.main(["hf-to-mcore", hf_tiny["bf16"], str(tmp_path / "x"), "--workers", "3"]) == 2
    _one_error_line(capsys, "--workers 3")
    assert convert.main(["hf-to-mcore", hf_tiny["bf16"], str(tmp_path / "x"), "--workers", "32"]) == 2
    _one_error_line(capsys, "--workers 32", "at most 16 workers")
    from megatron_dsv3.checkpoint import convert as C
    monkeypatch.setattr(C, "max_local_ranks", lambda: 2)
    assert convert.main(["hf-to-mcore", hf_tiny["bf16"], str(tmp_path / "x"), "--workers", "4"]) == 2
    _one_error_line(capsys, "would start 4 processes on this host (at most 2)")
    assert not os.path.exists(tmp_path / "x") and os.listdir(tmp_path) == []


@pytest.fixture(scope="module")
def fp32_round_trip(hf_tiny, tmp_path_factory):
    """A float32 HF checkpoint -> hf-to-mcore -> mcore-to-hf, no --dtype, under umask 022."""
    convert = _tool("convert_checkpoint")
    root = tmp_path_factory.mktemp("fp32")
    src = write_hf(str(root / "fp32"), hf_tiny["tensors"], hf_tiny["config"].to_hf(), dtype=torch.float32)
    mc, back = str(root / "mc"), str(root / "back")
    old = os.umask(0o022)
    try:
        assert convert.main(["hf-to-mcore", src, mc]) == 0
        assert convert.main(["mcore-to-hf", mc, back]) == 0
    finally:
        os.umask(old)
    return {"src": src, "mc": mc, "back": back}


def test_dtype_follows_the_source_and_dirs_follow_the_umask(hf_tiny, fp32_round_trip, tmp_path):
    from megatron_dsv3.checkpoint import convert as C
    from megatron_dsv3.checkpoint.safetensors_io import HFCheckpoint
    src, mc, back = fp32_round_trip["src"], fp32_round_trip["mc"], fp32_round_trip["back"]
    assert C.source_params_dtype(HFCheckpoint(hf_tiny["bf16"])) == "bfloat16"     # config.json "dtype"
    assert C.source_params_dtype(HFCheckpoint(hf_tiny["fp8"])) == "bfloat16"      # FP8: bf16
    assert json.load(open(os.path.join(mc, C.CONFIG_FILE)))["params_dtype"] == "float32"   # torch_dtype
    assert json.load(open(os.path.join(back, "config.json")))["torch_dtype"] == "float32"  # the checkpoint's
    ck, ref = HFCheckpoint(back), HFCheckpoint(src)
    for n in ("model.layers.1.mlp.experts.3.up_proj.weight", "model.layers.2.eh_proj.weight", "lm_head.weight"):
        assert ck.raw(n).dtype == torch.float32 and torch.equal(ck.raw(n), ref.raw(n)), n
    for d in (mc, os.path.join(mc, "release"), back):
        assert os.stat(d).st_mode & 0o777 == 0o755, (d, oct(os.stat(d).st_mode))
    # a config.json that names no dtype: bfloat16
    bare = str(tmp_path / "bare")
    shutil.copytree(hf_tiny["bf16"], bare)
    cfg = json.load(open(os.path.join(bare, "config.json")))
    cfg.pop("dtype", None), cfg.pop("torch_dtype", None)
    json.dump(cfg, open(os.path.join(bare, "config.json"), "w"))
    assert C.source_params_dtype(HFCheckpoint(bare)) == "bfloat16"


def test_bad_input_is_one_line_status_2_nothing_written(hf_tiny, fp32_round_trip, tmp_path, capsys, monkeypatch):
    convert, verify = _tool("convert_checkpoint"), _tool("verify_checkpoint")
    out = str(tmp_path / "out")
    missing = str(tmp_path / "no-such-dir")
    assert convert.main(["hf-to-mcore", missing, out]) == 2
    _one_error_line(capsys, missing, "not a directory")
    assert convert.main(["mcore-to-hf", missing, out]) == 2
    _one_error_line(capsys, missing)
    assert verify.main([missing, hf_tiny["bf16"]]) == 2
    _one_error_line(capsys, missing)
    # config.json: broken JSON, a wrong type
    bad = str(tmp_path / "bad")
    shutil.copytree(hf_tiny["bf16"], bad)
    with open(os.path.join(bad, "config.json"), "w") as f:
        f.write('{"hidden_size": 160,')
    assert convert.main(["hf-to-mcore", bad, out]) == 2
    _one_error_line(capsys, os.path.join(bad, "config.json"), "not valid JSON")
    cfg = hf_tiny["config"].to_hf()
    json.dump(dict(cfg, hidden_size="160"), open(os.path.join(bad, "config.json"), "w"))
    assert convert.main(["hf-to-mcore", bad, out]) == 2
    _one_error_line(capsys, os.path.join(bad, "config.json"))
    # a damaged megatron-core checkpoint: the file is named
    mc = fp32_round_trip["mc"]
    present = set(os.listdir(os.path.join(mc, "release")))
    assert {"__0_0.distcp", ".metadata"} <= present, present
    for damaged, cut in (("__0_0.distcp", True), (".metadata", False), ("metadata.json", False),
                         ("common.pt", False)):
        if damaged not in present:      # megatron-core 0.19 writes no common.pt for this model
            continue
        d = str(tmp_path / f"mc-{damaged}")
        shutil.copytree(mc, d)
        f = os.path.join(d, "release", damaged)
        data = open(f, "rb").read()
        open(f, "wb").write(data[: len(data) // 2] if cut else b"\x80garbage{")
        capsys.readouterr()
        assert convert.main(["mcore-to-hf", d, out]) == 2, damaged
        _one_error_line(capsys, f)
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out")], os.listdir(tmp_path)   # no temp dirs
    # --debug / MEGATRON_DSV3_DEBUG=1: the traceback
    from megatron_dsv3.checkpoint.safetensors_io import CheckpointError
    with pytest.raises(CheckpointError):
        convert.main(["hf-to-mcore", missing, out, "--debug"])
    monkeypatch.setenv("MEGATRON_DSV3_DEBUG", "1")
    with pytest.raises(CheckpointError):
        convert.main(["hf-to-mcore", missing, out])


def test_workers_spread_the_work_and_give_the_same_export(fp32_round_trip, tmp_path, capsys):
    from megatron_dsv3.checkpoint.safetensors_io import HFCheckpoint
    convert = _tool("convert_checkpoint")
    two = str(tmp_path / "two")
    assert convert.main(["mcore-to-hf", fp32_round_trip["mc"], two, "--workers", "2"]) == 0   # EP=2: 2 processes
    assert "in 2 process(es)" in capsys.readouterr().out
    a, b = HFCheckpoint(fp32_round_trip["back"]), HFCheckpoint(two)
    assert sorted(a.keys()) == sorted(b.keys())
    assert all(torch.equal(a.raw(k), b.raw(k)) for k in a.keys())
