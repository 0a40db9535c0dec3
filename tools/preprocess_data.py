#!/usr/bin/env python
"""jsonl / text -> megatron-core indexed dataset (.bin/.idx) for `--data-path`.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/my \
        --tokenizer /path/to/DeepSeek-V3 --workers 8 [--split-sentences]
    # writes data/my_text_document.bin/.idx; train with --data-path data/my_text_document

--tokenizer byte (the default) needs no file; a directory with tokenizer.json (DeepSeek-V3's own) or the
file itself uses that tokenizer. --split-sentences uses nltk Punkt, trained on the input when no
pretrained Punkt data is installed. `--input default` writes the quick start's corpus (Python
standard-library docstrings, see megatron_dsv3/training/corpus.py) and tokenizes it.
Bad input (a line that is not JSON, a missing --json-key, a non-string value) ends with one
`error: FILE:LINE: ...` line and exit status 2, and leaves no partial .bin/.idx behind.
"""
import argparse
import os
import sys
import time


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help=".jsonl or text files (or 'default')")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json / directory holding one")
    p.add_argument("--json-key", "--json-keys", dest="json_key", default="text",
                   help="the jsonl key holding each document's text (default: text)")
    p.add_argument("--split-sentences", action="store_true")
    p.add_argument("--no-append-eod", dest="append_eod", action="store_false")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--debug", action="store_true", help="show tracebacks (also MEGATRON_DSV3_DEBUG=1)")
    a = p.parse_args(argv)
    try:
        _run(a)
    except (ValueError, OSError) as e:   # bad input: one line naming the file (and line); nothing left behind
        if a.debug or os.environ.get("MEGATRON_DSV3_DEBUG", "") not in ("", "0"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _run(a) -> dict:
    from megatron_dsv3.training.corpus import build_docstring_corpus
    from megatron_dsv3.training.preprocess import preprocess
    from megatron_dsv3.training.tokenizer import build_tokenizer

    inputs = list(a.input)
    if inputs == ["default"]:
        inputs = [a.output_prefix + ".jsonl"]
        print(build_docstring_corpus(inputs[0]))
    t0 = time.time()
    out = preprocess(inputs, a.output_prefix, build_tokenizer(a.tokenizer), json_key=a.json_key,
                     split_sentences=a.split_sentences, append_eod=a.append_eod, workers=a.workers,
                     chunksize=a.chunk_size)
    dt = time.time() - t0
    print(f"wrote {out['prefix']}.bin/.idx: {out['documents']} documents, {out['tokens']} tokens, "
          f"{out['bytes'] / 1e6:.1f} MB in {dt:.1f} s ({out['bytes'] / 1e6 / max(dt, 1e-9):.1f} MB/s)")
    return out


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
