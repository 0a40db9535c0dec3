"""Peak host memory of the streaming path on a generated checkpoint of > 2 GB.

What is measured: `hf_to_hf` (re-sharding a BF16 checkpoint into 1 GB shards) in a fresh subprocess,
peak RSS from /proc/self/status VmHWM. That is the reader (one safe_open per tensor, see safetensors_io.py) and the
writer (tensor bytes streamed to disk, shards assembled by chunked copies) with no model around them,
which is all HF -> Megatron and Megatron -> HF add to the rank's model itself. The checkpoint is
generated as sparse files (headers only), so making it costs no disk time.
Bound: peak RSS < 25% of the checkpoint size (measured: ~0.3 GB for 2.3 GB, of which ~0.25 GB is the
interpreter with torch imported; the conversion itself adds about two of its largest tensors).
"""
import json
import math
import os
import struct
import subprocess
import sys

from megatron_dsv3.checkpoint import mapping as M
from megatron_dsv3.checkpoint.safetensors_io import INDEX
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


def _generate(path, shard_bytes=512 * 2 ** 20):
    """Sparse shard files: header written, data left as a hole (reads as zeros). Creating 2.3 GB takes no
    disk time, while reading it through safe_open maps and copies every byte as a real checkpoint would."""
    cfg = DSV3Config.from_hf(BIG_HF)
    shards, cur, size, largest = [], [], 0, 0
    for name, shape in sorted(M.expected_hf_shapes(cfg).items()):
        dtype = "F32" if name.endswith("e_score_correction_bias") else "BF16"
        n = math.prod(shape) * (4 if dtype == "F32" else 2)
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, dtype, shape, size, size + n))
        size += n
        largest = max(largest, n)
    shards.append(cur)
    weight_map, total = {}, 0
    for i, entries in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header = {"__metadata__": {"format": "pt"}}
        header.update({n: {"dtype": d, "shape": list(s), "data_offsets": [b, e]} for n, d, s, b, e in entries})
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(path, fname), "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + entries[-1][4])
        weight_map.update({n: fname for n, *_ in entries})
        total += entries[-1][4]
    with open(os.path.join(path, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(BIG_HF, f)
    return total, largest


def test_peak_rss_of_streaming_conversion_is_bounded(tmp_path):
    src, out = str(tmp_path / "big"), str(tmp_path / "resharded")
    os.makedirs(src)
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
