#!/usr/bin/env python
"""Convert DeepSeek-V2/V3 checkpoints between Hugging Face (BF16 or FP8) and megatron-core.

  hf-to-mcore HF_DIR OUT --tp 2 --pp 2 --ep 2 [--dtype bf16|fp32]   dist checkpoint (loads at any layout later)
  mcore-to-hf MCORE_DIR OUT [--dtype bf16|fp8|fp32] [--tp --pp --ep] HF safetensors + index + config.json
  hf-to-hf    HF_DIR OUT --dtype bf16|fp8|fp32                         re-shard / (de)quantise, no model

The --tp/--pp/--ep of a conversion only say how many processes share the work and memory (spawned on
this host with gloo, or the ranks of `torchrun --nproc-per-node N` if launched with it, N = PP x lcm(TP, EP));
the dist checkpoint itself is layout-free. Output directories are written completely or not at all; an existing one is refused
unless --overwrite.
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PARAM_DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def _size(arg: str) -> int:
    units = {"K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30}
    return int(float(arg[:-1]) * units[arg[-1].upper()]) if arg[-1].upper() in units else int(arg)


def _print(*args) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args)


def _world(a) -> int:
    from megatron_dsv3.checkpoint.convert import world_size_for
    return world_size_for(getattr(a, "tp", 1), getattr(a, "pp", 1), getattr(a, "ep", 1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("hf-to-mcore", "mcore-to-hf", "hf-to-hf"):
        s = sub.add_parser(name)
        s.add_argument("src")
        s.add_argument("out")
        s.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
        if name != "hf-to-hf":
            s.add_argument("--tp", type=int, default=1)
            s.add_argument("--pp", type=int, default=1)
            s.add_argument("--ep", type=int, default=1)
        if name == "hf-to-mcore":
            s.add_argument("--dtype", choices=sorted(PARAM_DTYPES), default="bf16", help="parameter dtype")
            s.add_argument("--no-mtp", action="store_true",
                           help="build without MTP (checkpoints saved by transformers have no MTP layer)")
        else:
            s.add_argument("--dtype", choices=["bf16", "fp8", "fp32"], default="bf16",
                           help="fp8: e4m3 + 128x128 weight_scale_inv as the published checkpoints")
            s.add_argument("--max-shard-size", type=_size, default=5 * 2 ** 30, help="e.g. 5G (default)")
    a = p.parse_args(argv)

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:      # under torchrun: every rank runs the conversion
        import torch.distributed as dist
        from datetime import timedelta
        dist.init_process_group("gloo", timeout=timedelta(hours=4))
        if dist.get_world_size() != _world(a):
            print(f"error: torchrun started {dist.get_world_size()} ranks; TPxPPxEP={a.tp}x{a.pp}x{a.ep} needs "
                  f"{_world(a)}", file=sys.stderr)
            return 2
    from megatron_dsv3.checkpoint import convert as C
    t0 = time.time()
    try:
        if a.cmd == "hf-to-mcore":
            info = C.hf_to_mcore(a.src, a.out, a.tp, a.pp, a.ep, params_dtype=PARAM_DTYPES[a.dtype],
                                 overwrite=a.overwrite, show_progress=True, drop_mtp=a.no_mtp)
            _print(f"wrote megatron-core dist checkpoint {a.out}/release (+ latest_checkpointed_iteration.txt, "
                  f"{C.CONFIG_FILE}) from {info['hf_tensors']} HF tensors on {info['world_size']} rank(s) "
                  f"TPxPPxEP={a.tp}x{a.pp}x{a.ep}; parameters per rank: {info['numel_per_rank']}")
        elif a.cmd == "mcore-to-hf":
            info = C.mcore_to_hf(a.src, a.out, a.dtype, a.tp, a.pp, a.ep, overwrite=a.overwrite,
                                 max_shard_bytes=a.max_shard_size, show_progress=True)
            _print(f"wrote {info['tensors']} tensors ({info['bytes'] / 1e9:.3f} GB, {a.dtype}) in {info['files']} "
                  f"safetensors file(s) + index + config.json to {a.out}")
        else:
            info = C.hf_to_hf(a.src, a.out, a.dtype, overwrite=a.overwrite, max_shard_bytes=a.max_shard_size,
                              show_progress=True)
            _print(f"wrote {info['tensors']} tensors ({info['bytes'] / 1e9:.3f} GB, {a.dtype}) in {info['files']} "
                  f"safetensors file(s) + index + config.json to {a.out}")
    except (ValueError, FileExistsError) as e:   # CheckpointError is a ValueError: bad input, clear message
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print(json.dumps({"seconds": round(time.time() - t0, 1), **{k: v for k, v in info.items()
                                                                if isinstance(v, (int, float, str, list))}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
