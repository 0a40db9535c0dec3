"""Tokenizers with the small surface megatron-core's GPT dataset needs: .eod, .pad, .vocab_size,
.unique_identifiers, plus tokenize/detokenize for preprocessing and sampling.

* `ByteTokenizer`: UTF-8 bytes (ids 0..255) and six specials; needs no file and no download, so the
  quick start works anywhere. Its 262 ids fit the `tiny` preset's vocabulary of 384.
* `HFTokenizer`: a Hugging Face `tokenizer.json` from a local directory or file (DeepSeek-V3's own),
  through the `tokenizers` package that ships with `transformers`.

Both carry the fill-in-middle tokens (`fim_begin`, `fim_hole`, `fim_end`; None where a tokenizer.json has
none) that training/fim.py writes; `fim_ids()` returns them or says why --fim-rate cannot use this tokenizer.
"""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import List, Sequence


# DeepSeek-V3's tokenizer.json spells them with fullwidth bars and U+2581; other tokenizers with ASCII
FIM_TOKENS = {"fim_begin": ("<｜fim▁begin｜>", "<|fim_begin|>"), "fim_hole": ("<｜fim▁hole｜>", "<|fim_hole|>"),
              "fim_end": ("<｜fim▁end｜>", "<|fim_end|>")}


class ByteTokenizer:
    """Bytes 0..255, then <eod>=256, <pad>=257, <bos>=258, <|fim_begin|>=259, <|fim_hole|>=260, <|fim_end|>=261."""

    def __init__(self):
        self.eod = 256
        self.pad = 257
        self.bos = 258
        self.fim_begin, self.fim_hole, self.fim_end = 259, 260, 261
        self.vocab_size = 262
        self.unique_identifiers = OrderedDict([("class", "ByteTokenizer"), ("vocab_size", self.vocab_size)])

    def fim_ids(self):
        return self.fim_begin, self.fim_hole, self.fim_end

    def tokenize(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizer.json` (plus `tokenizer_config.json` beside it, if present, for the eos/pad names)."""

    def __init__(self, path: str):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("a tokenizer.json needs the `tokenizers` package (pip install transformers); "
                              "or use --tokenizer byte") from e
        file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no tokenizer.json at {path!r}")
        self._tok = Tokenizer.from_file(file)
        cfg_file = os.path.join(os.path.dirname(file), "tokenizer_config.json")
        cfg = json.load(open(cfg_file)) if os.path.isfile(cfg_file) else {}

        def _name(v):
            return v.get("content") if isinstance(v, dict) else v

        eos = _name(cfg.get("eos_token")) or next(
            (t for t in ("<｜end▁of▁sentence｜>", "</s>", "<|endoftext|>", "<eos>") if self._tok.token_to_id(t) is not None),
            None)
        if eos is None or self._tok.token_to_id(eos) is None:
            raise ValueError(f"cannot find the end-of-document token of {file}; name it as eos_token in "
                             f"tokenizer_config.json")
        self.eod = self._tok.token_to_id(eos)
        pad = _name(cfg.get("pad_token"))
        # GPTDataset masks pad ids out of the loss; with no pad token of its own use one id past the vocabulary
        self.pad = self._tok.token_to_id(pad) if pad and self._tok.token_to_id(pad) is not None else None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        if self.pad is None or self.pad == self.eod:
            self.pad = self.vocab_size
        bos = _name(cfg.get("bos_token"))
        self.bos = self._tok.token_to_id(bos) if bos else None
        self.file = file
        for attr, spellings in FIM_TOKENS.items():
            setattr(self, attr, next((self._tok.token_to_id(t) for t in spellings
                                      if self._tok.token_to_id(t) is not None), None))
        self.unique_identifiers = OrderedDict([("class", "HFTokenizer"), ("path", os.path.abspath(file)),
                                               ("vocab_size", self.vocab_size)])

    def fim_ids(self):
        missing = [spellings[0] for attr, spellings in FIM_TOKENS.items() if getattr(self, attr) is None]
        if missing:
            raise ValueError(f"--fim-rate needs the fill-in-middle tokens of the tokenizer, and {self.file} lacks "
                             f"{' '.join(missing)} (also accepted: {' '.join(FIM_TOKENS[a][1] for a in FIM_TOKENS)}); "
                             f"use DeepSeek-V3's tokenizer.json, or --fim-rate 0")
        return self.fim_begin, self.fim_hole, self.fim_end

    def tokenize(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) < self.vocab_size])


def build_tokenizer(spec: str = "byte"):
    """'byte' (the default, no file) or a path to a tokenizer.json / a directory that holds one."""
    if spec in (None, "", "byte"):
        return ByteTokenizer()
    return HFTokenizer(spec)
