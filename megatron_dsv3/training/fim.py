"""Fill-in-Middle (DeepSeek-V3 section 4.1, after DeepSeek-Coder): at rate `fim_rate` a document becomes

    PSM:  <|fim_begin|> prefix <|fim_hole|> suffix <|fim_end|> middle <|eos_token|>
    SPM:  <|fim_begin|> <|fim_hole|> suffix <|fim_end|> prefix middle <|eos_token|>   (at rate `fim_spm_rate`
          among the FIM documents; variant 2 of Bavarian et al. 2022, as Megatron-LM writes it)

Design:
* Document level, before packing. `FIMDocuments` wraps the indexed dataset that GPTDataset packs: a FIM
  document is 3 tokens longer and says so in `sequence_lengths`, so megatron-core's sample index is built over
  the transformed documents and every sample still holds seq_length+1 tokens, none dropped or padded.
  Megatron-LM's GPTFIMDataset instead permutes each EOD-separated piece of an already packed sample and cuts
  the result back to length (a FIM piece is a fragment of a document; tokens are lost).
* The .bin/.idx stay as preprocessed: the same data trains with and without FIM. `FIMGPTDataset` has its
  own index cache (class name and the FIM rates enter megatron-core's cache hash); `--fim-rate 0` uses
  plain GPTDataset, bit-identical to no FIM at all.
* Stateless draws: whether document d is FIM, SPM and its two split points are a hash of (seed, d), not a
  stream that depends on the order samples are read (Megatron-LM's np_rng does). Any rank, worker, resume
  or epoch sees the same transform of a document; another seed gives other draws. d is the document's
  number in its .idx, so in a blend of several datasets the n-th documents of each share their draws.
* Token-level split. The indexed data holds token ids, and the packing needs each FIM document's length
  (n + 3) before any sample is read; a character-level split re-tokenizes, which changes the length and
  needs the tokenizer at sample time. With the byte tokenizer a token is a byte, ~a character. With a BPE
  tokenizer the hole never falls inside a token (DeepSeek-Coder's character split teaches that too).
* The two split points are uniform over the n+1 boundaries of the document's n tokens before its EOD (the
  EOD stays last); any of prefix, middle, suffix may be empty. Validation documents get FIM like training.
* Whole documents only: a dataset preprocessed with --split-sentences (one sequence per sentence) is refused.
* Recoverable: `restore` turns a FIM document back into the original (prefix + middle + suffix + EOD).
  A document whose own text holds the FIM token ids (a tokenizer.json that parses them out of raw text)
  cannot be parsed back unambiguously; the byte tokenizer cannot produce them from text.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np


def probability(text: str) -> float:
    """argparse type for --fim-rate / --fim-spm-rate."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a probability in [0, 1]")
    return v


# ---- stateless draws: splitmix64(splitmix64(splitmix64(seed) + document) + stream) -------------------------
_DRAW_FIM, _DRAW_SPM, _DRAW_A, _DRAW_B = range(4)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)      # uint64 arrays wrap silently
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform(seed: int, docs, stream: int) -> np.ndarray:
    """U[0, 1) per document: a pure function of (seed, document id, stream)."""
    key = _splitmix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))
    ids = np.atleast_1d(np.asarray(docs, dtype=np.int64)).astype(np.uint64)
    h = _splitmix64(_splitmix64(key + ids) + np.uint64(stream))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


@dataclass(frozen=True)
class FIM:
    rate: float                  # fraction of documents transformed (paper: 0.1)
    spm_rate: float              # fraction of those in SPM order (paper: PSM only, 0)
    seed: int                    # --seed
    begin: int                   # <|fim_begin|>
    hole: int                    # <|fim_hole|>
    end: int                     # <|fim_end|>
    eod: int                     # <|eos_token|>

    @classmethod
    def from_tokenizer(cls, tokenizer, rate: float, spm_rate: float, seed: int) -> "FIM":
        begin, hole, end = tokenizer.fim_ids()      # names --fim-rate and the file when they are missing
        return cls(rate, spm_rate, seed, begin, hole, end, tokenizer.eod)

    def chosen(self, docs) -> np.ndarray:
        """Which documents are FIM (vectorised: the whole dataset at index-build time)."""
        return uniform(self.seed, docs, _DRAW_FIM) < self.rate

    def segments(self, doc: int, n: int, has_eod: bool) -> List[Tuple[int, int, Optional[int]]]:
        """The FIM document as (start, stop, token) pieces: token None = original tokens [start, stop) of
        the n before the EOD; else one special token."""
        a, b = sorted(int(uniform(self.seed, doc, s)[0] * (n + 1)) for s in (_DRAW_A, _DRAW_B))
        tok = lambda t: (0, 1, t)   # noqa: E731
        if uniform(self.seed, doc, _DRAW_SPM)[0] < self.spm_rate:
            parts = [tok(self.begin), tok(self.hole), (b, n, None), tok(self.end), (0, b, None)]
        else:
            parts = [tok(self.begin), (0, a, None), tok(self.hole), (b, n, None), tok(self.end), (a, b, None)]
        if has_eod:
            parts.append((n, n + 1, None))
        return [p for p in parts if p[1] > p[0]]

    def transform(self, doc: int, tokens: Sequence[int]) -> np.ndarray:
        """The whole document as training sees it (the reference FIMDocuments.get slices)."""
        tokens = np.asarray(tokens)
        if not self.chosen(doc)[0]:
            return tokens.astype(np.int64)
        has_eod = len(tokens) > 0 and int(tokens[-1]) == self.eod
        segs = self.segments(doc, len(tokens) - has_eod, has_eod)
        return np.concatenate([tokens[s:e] if t is None else [t] for s, e, t in segs]).astype(np.int64)

    def restore(self, tokens: Sequence[int]) -> np.ndarray:
        """The original document of a transformed one (PSM or SPM); a document that is not FIM is returned as is.
        PSM  B pre H suf E mid  -> pre mid suf;  SPM  B H suf E pre mid  -> pre mid suf: both are A + C + B."""
        t = np.asarray(tokens, dtype=np.int64)
        if len(t) == 0 or t[0] != self.begin:
            return t
        tail = 1 if t[-1] == self.eod else 0
        hole = 1 + int(np.flatnonzero(t[1:] == self.hole)[0])
        end = hole + 1 + int(np.flatnonzero(t[hole + 1:] == self.end)[0])
        a, b, c = t[1:hole], t[hole + 1:end], t[end + 1:len(t) - tail]
        return np.concatenate([a, c, b, t[len(t) - tail:]])


class FIMDocuments:
    """An IndexedDataset whose chosen documents read as their FIM transform (what GPTDataset packs)."""

    def __init__(self, indexed, fim: FIM):
        docs = indexed.document_indices
        if len(docs) - 1 != len(indexed.sequence_lengths):
            raise ValueError(f"--fim-rate works on whole documents, and {indexed.path_prefix} stores sentences "
                             f"(preprocessed with --split-sentences); preprocess it without")
        self.indexed, self.fim = indexed, fim
        self.is_fim = fim.chosen(np.arange(len(indexed.sequence_lengths)))
        # the sample index is built from these: 3 specials more per FIM document
        self.sequence_lengths = (indexed.sequence_lengths + 3 * self.is_fim).astype(np.int32)

    def __getattr__(self, name):          # path_prefix, document_indices, index, ... of the wrapped dataset
        if name == "indexed":             # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.indexed, name)

    def __len__(self) -> int:
        return len(self.indexed)

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.get(idx)

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens [offset, offset + length) of document idx as transformed; reads only what it returns."""
        idx, offset = int(idx), int(offset)
        if not self.is_fim[idx]:
            return self.indexed.get(idx, offset=offset, length=length)
        n = int(self.indexed.sequence_lengths[idx])
        stop = int(self.sequence_lengths[idx]) if length is None else offset + int(length)
        has_eod = n > 0 and int(self.indexed.get(idx, offset=n - 1, length=1)[0]) == self.fim.eod
        out, pos = [], 0
        for s, e, tok in self.fim.segments(idx, n - has_eod, has_eod):
            lo, hi = max(offset, pos), min(stop, pos + e - s)      # this piece's overlap, in output positions
            if lo < hi:
                out.append(np.array([tok]) if tok is not None else
                           self.indexed.get(idx, offset=s + lo - pos, length=hi - lo))
            pos += e - s
        return np.concatenate(out).astype(np.int64) if out else np.zeros(0, dtype=np.int64)


def _dataset_classes():
    """FIMGPTDatasetConfig, FIMGPTDataset: megatron-core's GPT dataset over FIMDocuments. Built on first use
    (importing megatron-core costs seconds; the trainer's flags import this module) and reachable as module
    attributes, so that they pickle."""
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    @dataclass
    class FIMGPTDatasetConfig(GPTDatasetConfig):
        fim_rate: float = 0.0          # fraction of documents in FIM form
        fim_spm_rate: float = 0.0      # fraction of the FIM documents in SPM order

    class FIMGPTDataset(GPTDataset):
        @staticmethod
        def build_low_level_dataset(dataset_path: str, config) -> FIMDocuments:
            fim = FIM.from_tokenizer(config.tokenizer, config.fim_rate, config.fim_spm_rate, config.random_seed)
            return FIMDocuments(GPTDataset.build_low_level_dataset(dataset_path, config), fim)

        @staticmethod
        def _key_config_attributes() -> List[str]:   # another FIM setting has another index cache
            return GPTDataset._key_config_attributes() + ["fim_rate", "fim_spm_rate"]

    for c in (FIMGPTDatasetConfig, FIMGPTDataset):
        c.__qualname__ = c.__name__
        globals()[c.__name__] = c


def __getattr__(name):
    if name in ("FIMGPTDataset", "FIMGPTDatasetConfig"):
        _dataset_classes()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
