"""Streaming safetensors writer/reader, HF -> HF re-writing, and every bad input with its message."""
import json
import os
import shutil

import pytest
import torch
from safetensors import safe_open

from megatron_dsv3.checkpoint import convert as C
from megatron_dsv3.checkpoint.safetensors_io import (INDEX, CheckpointError, HFCheckpoint, ShardedSafetensorsWriter,
                                                     output_dir)


def _read_dir(path):
    with open(os.path.join(path, INDEX)) as f:
        wm = json.load(f)["weight_map"]
    out = {}
    for k, fn in wm.items():
        with safe_open(os.path.join(path, fn), "pt") as f:
            out[k] = f.get_tensor(k)
    return out


def _bytes_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8),
                                                                     b.view(-1).view(torch.uint8))


def test_writer_streams_shards_readable_by_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    ts = {"a": torch.randn(100, 7, generator=g), "b": torch.randn(3, generator=g).bfloat16(),
          "c": torch.randn(64, 64, generator=g).to(torch.float8_e4m3fn), "d": torch.arange(5),
          "e": torch.tensor([True, False]), "f": torch.randn(0, 4, generator=g), "g": torch.randn(2, 3, generator=g).t()}
    w = ShardedSafetensorsWriter(str(tmp_path), max_shard_bytes=4096)
    for k, v in ts.items():
        w.add(k, v)
    wm = w.finish()
    files = sorted(set(wm.values()))
    assert len(files) == 3 and files[0] == "model-00001-of-00003.safetensors"
    assert not [f for f in os.listdir(tmp_path) if f.startswith("part-")]
    back = _read_dir(str(tmp_path))
    assert set(back) == set(ts) and all(_bytes_equal(back[k], ts[k].contiguous()) for k in ts)
    idx = json.load(open(tmp_path / INDEX))
    assert idx["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in ts.values())


def test_hf_to_hf_fp8_dequant_and_requant_round_trip(hf_tiny, tmp_path):
    """FP8 -> FP32 (dequantised) -> FP8 gives the same bytes and scales; FP8 -> BF16 is the dequantised values."""
    fp32 = str(tmp_path / "fp32")
    C.hf_to_hf(hf_tiny["fp8"], fp32, dtype="fp32")
    back = str(tmp_path / "fp8")
    info = C.hf_to_hf(fp32, back, dtype="fp8", max_shard_bytes=300_000)
    a, b = _read_dir(hf_tiny["fp8"]), _read_dir(back)
    assert set(a) == set(b) and info["files"] >= 2
    for k in a:
        assert _bytes_equal(a[k], b[k]), k
    cfg_a = json.load(open(os.path.join(hf_tiny["fp8"], "config.json")))
    cfg_b = json.load(open(os.path.join(back, "config.json")))
    assert cfg_b["quantization_config"] == cfg_a["quantization_config"]
    assert "quantization_config" not in json.load(open(os.path.join(fp32, "config.json")))
    src = HFCheckpoint(hf_tiny["fp8"])
    d = _read_dir(fp32)
    n = "model.layers.2.mlp.experts.5.down_proj.weight"         # the MTP layer's expert
    assert src.is_fp8(n) and torch.equal(d[n], src.get(n))
    assert d["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32


# ---- bad input: each a clear message, nothing half-written ------------------------------------------
def _copy(hf_tiny, tmp_path, which="bf16"):
    dst = str(tmp_path / f"src-{which}")
    shutil.copytree(hf_tiny[which], dst)
    return dst


def _convert(src, tmp_path):
    out = str(tmp_path / "out")
    C.hf_to_hf(src, out)
    return out


def test_bad_missing_shard(hf_tiny, tmp_path):
    src = _copy(hf_tiny, tmp_path)
    os.remove(os.path.join(src, "model-00002-of-00007.safetensors"))
    with pytest.raises(CheckpointError, match=r"shard file\(s\) listed in .* are missing: model-00002-of-00007"):
        _convert(src, tmp_path)
    assert not os.path.exists(tmp_path / "out")


def test_bad_index_entry_without_tensor(hf_tiny, tmp_path):
    src = _copy(hf_tiny, tmp_path)
    idx = json.load(open(os.path.join(src, INDEX)))
    wm = idx["weight_map"]
    wm["model.layers.0.mlp.up_proj.weight"] = next(f for f in sorted(set(wm.values()))
                                                   if f != wm["model.layers.0.mlp.up_proj.weight"])
    json.dump(idx, open(os.path.join(src, INDEX), "w"))
    with pytest.raises(CheckpointError, match=r"tensor\(s\) the index places in this file are not in it, "
                                              r"e.g. 'model.layers.0.mlp.up_proj.weight'"):
        _convert(src, tmp_path)


def test_bad_missing_tensor_in_index(hf_tiny, tmp_path):
    src = _copy(hf_tiny, tmp_path)
    idx = json.load(open(os.path.join(src, INDEX)))
    del idx["weight_map"]["model.layers.2.enorm.weight"]
    json.dump(idx, open(os.path.join(src, INDEX), "w"))
    with pytest.raises(CheckpointError, match=r"missing from the index, e.g. 'model.layers.2.enorm.weight'"):
        _convert(src, tmp_path)


def _rewrite(src, fn):
    """Rewrite the checkpoint's tensors through fn(name, tensor) -> {name: tensor} (one shard)."""
    ts = _read_dir(src)
    for f in os.listdir(src):
        if f.endswith(".safetensors") or f == INDEX:
            os.remove(os.path.join(src, f))
    w = ShardedSafetensorsWriter(src)
    for k in sorted(ts):
        for n, t in fn(k, ts[k]).items():
            w.add(n, t)
    w.finish()


def test_bad_shape_for_config(hf_tiny, tmp_path):
    src = _copy(hf_tiny, tmp_path)
    _rewrite(src, lambda k, t: {k: t[:-1] if k == "model.layers.1.self_attn.kv_b_proj.weight" else t})
    with pytest.raises(CheckpointError, match=r"'model.layers.1.self_attn.kv_b_proj.weight' has shape \(255, 64\), "
                                              r"but config.json implies \(256, 64\)"):
        _convert(src, tmp_path)


def test_bad_fp8_weight_without_scale(hf_tiny, tmp_path):
    src = _copy(hf_tiny, tmp_path, "fp8")
    _rewrite(src, lambda k, t: {} if k == "model.layers.0.self_attn.o_proj.weight_scale_inv" else {k: t})
    with pytest.raises(CheckpointError, match=r"FP8 weight 'model.layers.0.self_attn.o_proj.weight' has no scale "
                                              r"'model.layers.0.self_attn.o_proj.weight_scale_inv'"):
        _convert(src, tmp_path)


def test_bad_config_not_deepseek(hf_tiny, tmp_path):
    src = _copy(hf_tiny, tmp_path)
    cfg = json.load(open(os.path.join(src, "config.json")))
    json.dump(dict(cfg, model_type="llama"), open(os.path.join(src, "config.json"), "w"))
    with pytest.raises(CheckpointError, match=r"config.json: not a DeepSeek-V2/V3 config: .*model_type 'llama'"):
        _convert(src, tmp_path)


def test_bad_truncated_safetensors(hf_tiny, tmp_path):
    src = _copy(hf_tiny, tmp_path)
    f = os.path.join(src, "model-00003-of-00007.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - 1000)
    with pytest.raises(CheckpointError, match=r"model-00003-of-00007.safetensors: cannot read safetensors file "
                                              r"\(truncated or corrupt\?\)"):
        _convert(src, tmp_path)


def test_bad_layout_does_not_divide(hf_tiny):
    cfg = hf_tiny["config"]
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be divisible by "
                                         r"ParallelConfig.tensor_model_parallel_size \(3\)"):
        C.target_config(cfg, tp=3)
    with pytest.raises(ValueError, match=r"num_experts \(8\) must be divisible by .*expert_model_parallel_size \(3\)"):
        C.target_config(cfg, ep=3)
    with pytest.raises(ValueError, match=r"cannot be placed on pipeline_model_parallel_size \(3\)"):
        C.target_config(cfg, pp=3)


def test_bad_existing_output_dir(hf_tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"exists; pass overwrite=True \(--overwrite\)"):
        C.hf_to_hf(hf_tiny["bf16"], str(out))
    assert (out / "keep.txt").exists()
    C.hf_to_hf(hf_tiny["bf16"], str(out), overwrite=True)
    assert not (out / "keep.txt").exists() and (out / INDEX).exists()


def test_failure_leaves_nothing_half_written(hf_tiny, tmp_path, monkeypatch):
    calls = []
    orig = ShardedSafetensorsWriter.add

    def failing_add(self, name, t):
        calls.append(name)
        if len(calls) == 20:
            raise RuntimeError("disk full (simulated)")
        return orig(self, name, t)

    monkeypatch.setattr(ShardedSafetensorsWriter, "add", failing_add)
    with pytest.raises(RuntimeError, match="simulated"):
        C.hf_to_hf(hf_tiny["bf16"], str(tmp_path / "out"), max_shard_bytes=10_000)
    assert os.listdir(tmp_path) == []                       # neither the target nor the temporary directory


def test_output_dir_context(tmp_path):
    with output_dir(str(tmp_path / "x")) as d:
        open(os.path.join(d, "f"), "w").write("1")
        assert not (tmp_path / "x").exists()
    assert (tmp_path / "x" / "f").read_text() == "1"


def test_row_reads_equal_cut_full_reads(hf_tiny):
    """get(rows=...) reads only a TP rank's rows; BF16 and FP8 (block-aligned and not) equal the cut full tensor."""
    for which in ("bf16", "fp8"):
        ck = HFCheckpoint(hf_tiny[which])
        for name, rows in (("model.layers.0.self_attn.q_b_proj.weight", (128, 192)),    # FP8: aligned
                           ("model.layers.0.self_attn.q_b_proj.weight", (96, 192)),     # FP8: not aligned
                           ("model.layers.0.mlp.gate_proj.weight", (0, 160)),
                           ("model.embed_tokens.weight", (126, 251))):
            assert torch.equal(ck.get(name, rows=rows), ck.get(name)[rows[0]:rows[1]]), (which, name, rows)
