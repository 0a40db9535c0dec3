#!/usr/bin/env python
"""Compare a converted checkpoint with the Hugging Face original: logits on random-token prompts.

  verify_checkpoint.py HF_DIR OURS [--prompts 4 --seq 32 --seed 0] [--max-abs 1e-3 --max-kl 1e-6]

OURS is a megatron-core dist checkpoint written by convert_checkpoint.py hf-to-mcore, or an HF directory
(e.g. one written by mcore-to-hf) loaded through load_hf. Both sides run in float32 on this host
(TP=PP=EP=1); an FP8 HF_DIR is compared after dequantisation. Exit status 1 when a threshold is exceeded,
2 with one `error: ...` line for bad input (--debug or MEGATRON_DSV3_DEBUG=1: the traceback).
"""
import argparse
import json
import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hf_dir")
    p.add_argument("ours")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-abs", type=float, default=None, help="fail above this max |logit difference|")
    p.add_argument("--max-kl", type=float, default=None, help="fail above this mean KL(p_hf || p_ours)")
    p.add_argument("--debug", action="store_true", help="show tracebacks (also MEGATRON_DSV3_DEBUG=1)")
    a = p.parse_args(argv)
    from megatron_dsv3.checkpoint.verify import verify
    try:
        r = verify(a.hf_dir, a.ours, a.prompts, a.seq, a.seed)
    except (ValueError, OSError) as e:     # bad input (CheckpointError is a ValueError): one line
        if a.debug or os.environ.get("MEGATRON_DSV3_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{a.prompts} prompts x {a.seq} random tokens: max |dlogit| {r['max_abs']:.3e} "
          f"(logits up to {r['ref_max_abs']:.3g}, relative {r['max_rel']:.3e}), mean KL {r['kl']:.3e}")
    print(json.dumps(r))
    bad = (a.max_abs is not None and r["max_abs"] > a.max_abs) or (a.max_kl is not None and r["kl"] > a.max_kl)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
