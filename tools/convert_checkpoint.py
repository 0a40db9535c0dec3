#!/usr/bin/env python
"""Convert DeepSeek-V2/V3 checkpoints between Hugging Face (BF16 or FP8) and megatron-core.

  hf-to-mcore HF_DIR OUT [--dtype bf16|fp32|fp16] [--workers N]   dist checkpoint (torch_dist)
  mcore-to-hf MCORE_DIR OUT [--dtype bf16|fp8|fp32|fp16] [--workers N] [--ema]  HF safetensors + index + config.json
  hf-to-hf    HF_DIR OUT [--dtype bf16|fp8|fp32|fp16]                re-shard / (de)quantise, no model

The megatron-core dist checkpoint is layout-free: it stores global tensors and megatron-core reshards it
on load, so the same OUT loads into any later TP/PP/EP (the trainer's --load, Megatron-LM's
--ckpt-format torch_dist). There is no target layout to give. A conversion runs in ONE process by default;
--workers N spreads the memory and work over N local processes (gloo; experts split first, then pipeline
stages; at most max(8, CPUs)), and under `torchrun --nproc-per-node N` (several hosts for a model larger
than one host's memory) the N ranks of the job share it the same way.
--dtype defaults to the source's own: hf-to-mcore the checkpoint's config.json torch_dtype (FP8 checkpoints
and configs naming none: bf16), mcore-to-hf the checkpoint's parameter dtype.

Output directories are written completely or not at all (with the user's umask); an existing one is
refused unless --overwrite. Bad input ends with one `error: ...` line and exit status 2; --debug (or
MEGATRON_DSV3_DEBUG=1) shows the traceback instead.
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
    try:
        return int(float(arg[:-1]) * units[arg[-1].upper()]) if arg[-1:].upper() in units else int(arg)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{arg!r} is not a size (e.g. 5G, 500M, 1000000)")


def _positive(arg: str) -> int:
    try:
        n = int(arg)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{arg!r} is not a positive integer")
    return n


def _print(*args) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks (also MEGATRON_DSV3_DEBUG=1)")
    sub = p.add_subparsers(dest="cmd", required=True)
    what = {"hf-to-mcore": "HF checkpoint -> megatron-core dist checkpoint (torch_dist). The output is layout-free: "
                           "it loads at any TP/PP/EP, so no target layout is given. One process unless --workers.",
            "mcore-to-hf": "megatron-core dist checkpoint (ours, the trainer's, Megatron-LM's torch_dist) -> HF "
                           "safetensors + index + config.json. One process unless --workers.",
            "hf-to-hf": "HF -> HF: re-shard and/or (de)quantise, one tensor at a time, no model."}
    for name in ("hf-to-mcore", "mcore-to-hf", "hf-to-hf"):
        s = sub.add_parser(name, description=what[name], help=what[name].split(".")[0])
        s.add_argument("src")
        s.add_argument("out")
        s.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
        s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks (also MEGATRON_DSV3_DEBUG=1)")
        if name != "hf-to-hf":
            for flag in ("--tp", "--pp", "--ep"):       # earlier releases' flags: refused with the reason
                s.add_argument(flag, dest="layout_" + flag[2:], default=None, help=argparse.SUPPRESS)
            s.add_argument("--workers", type=_positive, default=None,
                           help="local processes sharing the work and memory (default 1; under torchrun: its "
                                "ranks). Does not change the output: the dist checkpoint is layout-free")
        if name == "hf-to-mcore":
            s.add_argument("--dtype", choices=sorted(PARAM_DTYPES), default=None,
                           help="parameter dtype (default: the checkpoint's config.json torch_dtype; FP8: bf16)")
            s.add_argument("--no-mtp", action="store_true",
                           help="build without MTP (checkpoints saved by transformers have no MTP layer)")
        else:
            s.add_argument("--dtype", choices=["bf16", "fp8", "fp16", "fp32"], default=None,
                           help="fp8: e4m3 + 128x128 weight_scale_inv as the published checkpoints "
                                "(default: the source's dtype)")
            s.add_argument("--max-shard-size", type=_size, default=5 * 2 ** 30, help="e.g. 5G (default)")
            if name == "mcore-to-hf":
                s.add_argument("--ema", action="store_true",
                               help="write the EMA of the parameters (a trainer checkpoint saved with --ema-decay) "
                                    "instead of the weights")
    return p


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    debug = getattr(a, "debug", False) or os.environ.get("MEGATRON_DSV3_DEBUG", "") not in ("", "0")
    try:
        return _convert(a)
    except (ValueError, OSError) as e:   # bad input (CheckpointError is a ValueError): one line, nothing written
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2


def _convert(a) -> int:
    given = [f"--{k[7:]}" for k in ("layout_tp", "layout_pp", "layout_ep") if getattr(a, k, None) is not None]
    if given:
        raise ValueError(f"{'/'.join(given)}: there is no target layout to give: the dist checkpoint is layout-free "
                         f"(it loads at any TP/PP/EP); drop {' '.join(given)}, and use --workers N to spread the "
                         f"conversion over N processes")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:      # under torchrun: every rank runs the conversion
        import torch.distributed as dist
        from datetime import timedelta
        if a.workers is not None and a.workers != int(os.environ["WORLD_SIZE"]):
            raise ValueError(f"--workers {a.workers} under torchrun with {os.environ['WORLD_SIZE']} ranks: "
                             f"leave --workers out, the ranks are the workers")
        dist.init_process_group("gloo", timeout=timedelta(hours=4))
    from megatron_dsv3.checkpoint import convert as C
    t0 = time.time()
    if a.cmd == "hf-to-mcore":
        info = C.hf_to_mcore(a.src, a.out, params_dtype=PARAM_DTYPES.get(a.dtype), workers=a.workers,
                             overwrite=a.overwrite, show_progress=True, drop_mtp=a.no_mtp)
        _print(f"wrote megatron-core dist checkpoint {a.out}/release (+ latest_checkpointed_iteration.txt, "
               f"{C.CONFIG_FILE}; {info['params_dtype']}; loads at any TP/PP/EP) from {info['hf_tensors']} HF "
               f"tensors in {info['world_size']} process(es)")
    elif a.cmd == "mcore-to-hf":
        info = C.mcore_to_hf(a.src, a.out, a.dtype, workers=a.workers, overwrite=a.overwrite,
                             max_shard_bytes=a.max_shard_size, show_progress=True, ema=a.ema)
        _print(f"wrote {info['tensors']}{' EMA' if a.ema else ''} tensors ({info['bytes'] / 1e9:.3f} GB, {info['dtype']}) in "
               f"{info['files']} safetensors file(s) + index + config.json to {a.out} in {info['world_size']} "
               f"process(es)")
    else:
        info = C.hf_to_hf(a.src, a.out, a.dtype, overwrite=a.overwrite, max_shard_bytes=a.max_shard_size,
                          show_progress=True)
        _print(f"wrote {info['tensors']} tensors ({info['bytes'] / 1e9:.3f} GB, {info['dtype']}) in "
               f"{info['files']} safetensors file(s) + index + config.json to {a.out}")
    _print(json.dumps({"seconds": round(time.time() - t0, 1), **{k: v for k, v in info.items()
                                                                if isinstance(v, (int, float, str, list))}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
