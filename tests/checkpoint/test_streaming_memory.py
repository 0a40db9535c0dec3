"""Peak host memory of the streaming path on a generated checkpoint of > 2 GB.

What is measured: `hf_to_hf` (re-sharding a BF16 checkpoint into 1 GB shards) in a fresh subprocess,
peak RSS from /proc/self/status VmHWM. That is the reader (one safe_open per tensor, see safetensors_io.py) and the
writer (tensor bytes streamed to disk, shards assembled by chunked copies) with no model around them,
which is all HF -> Megatron and Megatron -> HF add to the rank's model itself. The checkpoint is
generated tensor by tensor with the same writer, never held in memory.
Bound: peak RSS < 25% of the checkpoint size (measured: ~0.3 GB for 2.3 GB, of which ~0.25 GB is the
interpreter with torch imported; the conversion itself adds about two of its largest tensors).
"""
import json
import os
import subprocess
import sys
import time

import torch

from megatron_dsv3.checkpoint import mapping as M
from megatron_dsv3.checkpoint.safetensors_io import INDEX, ShardedSafetensorsWriter
from megatron_dsv3.config import DSV3Config

BIG_HF = dict(model_type="deepseek_v3", vocab_size=32000, hidden_size=1024, intermediate_size=4096,
              moe_intermediate_size=4096, num_hidden_layers=1, num_attention_heads=8, n_shared_experts=1,
              n_routed_experts=40, num_experts_per_tok=4, n_group=1, topk_group=1, first_k_dense_replace=0,
              q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
              max_position_embeddings=4096, num_nextn_predict_layers=1, topk_method="noaux_tc",
              scoring_func="sigmoid")

_CHILD = r"""
import json, sys, time
def hwm():  # peak RSS of this process image (ru_maxrss would carry the forking parent's peak across exec)
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
from megatron_dsv3.checkpoint.convert import hf_to_hf
base = hwm()
t = time.time()
info = hf_to_hf(sys.argv[1], sys.argv[2], dtype="bf16", max_shard_bytes=2 ** 30)
print(json.dumps(dict(info, base=base, peak=hwm(), seconds=time.time() - t)))
"""


def _generate(path):
    cfg = DSV3Config.from_hf(BIG_HF)
    w = ShardedSafetensorsWriter(path, max_shard_bytes=512 * 2 ** 20)
    largest = 0
    for i, (name, shape) in enumerate(sorted(M.expected_hf_shapes(cfg).items())):
        dtype = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        t = torch.full(shape, float(i % 97) / 97, dtype=dtype)
        largest = max(largest, t.numel() * t.element_size())
        w.add(name, t)
    w.finish()
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(BIG_HF, f)
    return w.total_bytes, largest


def test_peak_rss_of_streaming_conversion_is_bounded(tmp_path):
    src, out = str(tmp_path / "big"), str(tmp_path / "resharded")
    size, largest = _generate(src)
    assert size >= 2 * 10 ** 9
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd()] + sys.path))
    r = subprocess.run([sys.executable, "-c", _CHILD, src, out], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"\ncheckpoint {size / 1e9:.2f} GB, largest tensor {largest / 1e6:.0f} MB, peak RSS {info['peak'] / 1e6:.0f} MB "
          f"(interpreter {info['base'] / 1e6:.0f} MB), {info['seconds']:.1f} s")
    assert info["bytes"] == size and info["files"] >= 3
    assert info["peak"] < 0.25 * size
    assert info["peak"] - info["base"] < 4 * largest + 64 * 2 ** 20    # a few tensors' worth, not the model
    with open(os.path.join(out, INDEX)) as f:
        assert json.load(f)["metadata"]["total_size"] == size
