#!/usr/bin/env python
"""MTP speculative decoding on a trained checkpoint: acceptance rate and speedup against plain greedy decoding.

  speculative_decode.py CKPT [--tokens 128] [--prompts 8] [--tokenizer byte]

CKPT: the trainer's --save directory (or a converter output); the model comes from its dsv3_config.json.
Prompts: the first 48 characters of standard-library docstrings (or --prompt, repeatable).
Both decoders run here (TP = PP = 1, float32 on CPU / the checkpoint's dtype on CUDA), in the same process,
alternating per prompt; each prompt's two outputs must be identical token for token (exit status 1 otherwise).
Reports: acceptance rate of the MTP drafts, tokens per model pass, and wall-clock speedup (no KV cache: every
pass reads the whole sequence, so the pass ratio is the speedup an incremental decoder would see, roughly).
"""
import argparse
import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _prompts(n: int):
    import inspect
    import textwrap
    out = []
    for mod in ("json", "os.path", "collections", "itertools", "functools", "argparse", "pathlib", "re", "shutil",
                "subprocess", "textwrap", "typing", "dataclasses", "logging"):
        m = __import__(mod, fromlist=["_"])
        for _, obj in inspect.getmembers(m):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if doc and len(doc) > 80:
                out.append(textwrap.dedent(doc)[:48])
                break
        if len(out) >= n:
            break
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpt")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt", action="append", default=None)
    p.add_argument("--tokenizer", default="byte")
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)
    import torch
    from megatron_dsv3.config import DSV3Config
    from megatron_dsv3.training.checkpointing import find_checkpoint
    from megatron_dsv3.training.tokenizer import build_tokenizer
    try:
        found = find_checkpoint(a.ckpt)
        if found is None or found.config is None:
            raise ValueError(f"{a.ckpt}: no checkpoint with a dsv3_config.json")
        tok = build_tokenizer(a.tokenizer)
    except (ValueError, OSError) as e:
        if a.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    from megatron_dsv3.checkpoint.convert import load_mcore
    from megatron_dsv3.launch import single_process
    from megatron_dsv3.model import build_model
    from megatron_dsv3.mtp.speculative import greedy_decode, speculative_decode
    cfg = DSV3Config.from_dict(found.config)
    cuda = torch.cuda.is_available()
    if not cuda:
        cfg = cfg.replace(params_dtype="float32")
    prompts = a.prompt or _prompts(a.prompts)
    rows, same = [], True
    with single_process():
        model = build_model(cfg, device="cuda" if cuda else "cpu", init=False)
        load_mcore(model, a.ckpt)
        model.eval()
        greedy_decode(model, [0, 1, 2], 4)                 # warm-up: the first passes pay one-time costs
        for text in prompts:
            ids = ([tok.bos] if getattr(tok, "bos", None) is not None else []) + tok.tokenize(text)
            g = greedy_decode(model, ids, a.tokens, eos=tok.eod)
            s = speculative_decode(model, ids, a.tokens, eos=tok.eod)
            same &= g.tokens == s.tokens
            rows.append((text, g, s))
            print(f"{text[:40]!r:44} tokens {len(g.tokens):4d} | accepted {s.accepted:3d}/{s.drafts:3d} "
                  f"({100 * s.acceptance_rate:5.1f}%) | passes {g.passes} -> {s.passes} | "
                  f"{g.seconds:.2f} s -> {s.seconds:.2f} s | identical {g.tokens == s.tokens}", flush=True)
    acc = sum(s.accepted for _, _, s in rows) / max(1, sum(s.drafts for _, _, s in rows))
    gp, sp = sum(g.passes for _, g, _ in rows), sum(s.passes for _, _, s in rows)
    gt, st = sum(g.seconds for _, g, _ in rows), sum(s.seconds for _, _, s in rows)
    print(f"all: acceptance {100 * acc:.1f}% | tokens per pass {gp / sp:.2f}x | wall {gt / st:.2f}x | "
          f"outputs identical: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
