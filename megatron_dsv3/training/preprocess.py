"""jsonl / text -> megatron-core indexed dataset (`<prefix>_<key>_document.bin/.idx`), the format
`GPTDataset` reads. The command line is tools/preprocess_data.py.

Inputs: `.jsonl` (one JSON object per line; the text under `json_key`) or plain text (documents
separated by blank lines). With `split_sentences`, each document is stored as its sentences
(nltk Punkt); when no pretrained Punkt model is installed (nltk data cannot be downloaded on
these machines) Punkt is trained on the input itself with `PunktTrainer`, which learns the
abbreviations ("e.g.", "Dr.") of that corpus.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
from typing import Iterable, Iterator, List, Optional, Sequence

import numpy as np

PUNKT_TRAIN_CHARS = 20_000_000     # Punkt learns abbreviations well from a few MB


def unique_tmp_path(path: str) -> str:
    """path + a suffix no other writer (process or call) uses: where a file is written before its rename."""
    import uuid
    return f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def iter_documents(path: str, json_key: str = "text") -> Iterator[str]:
    """The documents of one input file. Bad input raises ValueError naming the file and line."""
    if path.endswith(".jsonl") or path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            lineno = 0
            try:
                for lineno, line in enumerate(f, 1):
                    line = line.strip()
                    if line:
                        yield _document(json.loads(line), json_key, path, lineno)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not a JSON object per line ({e.msg}, column {e.colno})") from e
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno + 1}: not UTF-8 text ({e.reason})") from e
    else:
        with open(path, encoding="utf-8") as f:
            buf: List[str] = []
            lineno = 0
            try:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        buf.append(line)
                    elif buf:
                        yield "".join(buf).strip()
                        buf = []
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno + 1}: not UTF-8 text ({e.reason})") from e
            if buf:
                yield "".join(buf).strip()


def _document(obj, key: str, path: str, lineno: int) -> str:
    if not isinstance(obj, dict):
        raise ValueError(f"{path}:{lineno}: expected a JSON object with a {key!r} string, got a "
                         f"{type(obj).__name__}")
    if key not in obj:
        raise ValueError(f"{path}:{lineno}: no {key!r} key (the line has {sorted(obj)[:5]}); "
                         f"choose the key with --json-key")
    if not isinstance(obj[key], str):
        raise ValueError(f"{path}:{lineno}: {key!r} is a {type(obj[key]).__name__}, not a string")
    return obj[key]


def sentence_splitter(paths: Sequence[str], json_key: str = "text", language: str = "english"):
    """A Punkt tokenizer: the installed pretrained model if there is one, else trained on `paths`."""
    import nltk
    from nltk.tokenize.punkt import PunktSentenceTokenizer, PunktTrainer
    try:
        nltk.data.find(f"tokenizers/punkt_tab/{language}/")
        from nltk.tokenize import PunktTokenizer
        return PunktTokenizer(language)
    except (LookupError, ImportError):
        pass
    trainer = PunktTrainer()
    trainer.INCLUDE_ALL_COLLOCS = True
    seen = 0
    for p in paths:
        for doc in iter_documents(p, json_key):
            trainer.train(doc, finalize=False)
            seen += len(doc)
            if seen >= PUNKT_TRAIN_CHARS:
                break
    trainer.finalize_training()
    return PunktSentenceTokenizer(trainer.get_params())


class _Encoder:
    """Per worker: tokenizer and splitter are built once (the splitter's parameters are pickled in)."""

    def __init__(self, tokenizer, splitter, append_eod: bool):
        self.tokenizer, self.splitter, self.append_eod = tokenizer, splitter, append_eod

    def __call__(self, text: str):
        parts = self.splitter.tokenize(text) if self.splitter is not None else [text]
        ids = [self.tokenizer.tokenize(p) for p in parts]
        ids = [x for x in ids if x]
        if self.append_eod and ids:
            ids[-1] = ids[-1] + [self.tokenizer.eod]
        return ids, len(text.encode("utf-8"))


_worker_encoder: Optional[_Encoder] = None


def _init_worker(encoder, parent_pid):
    global _worker_encoder
    from megatron_dsv3.launch import die_with_parent
    die_with_parent(parent_pid)       # a killed preprocess takes its pool with it
    _worker_encoder = encoder


def _encode(text):
    return _worker_encoder(text)


def preprocess(inputs: Sequence[str], output_prefix: str, tokenizer, *, json_key: str = "text",
               split_sentences: bool = False, append_eod: bool = True, workers: int = 1,
               chunksize: int = 64, progress: bool = True) -> dict:
    """Tokenize `inputs` into `<output_prefix>_<json_key>_{document|sentence}.bin/.idx`.
    Returns {"prefix", "documents", "tokens", "bytes"}."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    for p in inputs:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: no such input file")
    splitter = sentence_splitter(inputs, json_key) if split_sentences else None
    level = "sentence" if split_sentences else "document"
    prefix = f"{output_prefix}_{json_key}_{level}"
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size + 1 < 65500 else np.int32
    # a name of this call's own: two runs building the same dataset at once (parallel trainings on a fresh cache)
    # each write their own files and rename them; the contents are the same, the last rename wins
    tmp = unique_tmp_path(prefix)
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    encoder = _Encoder(tokenizer, splitter, append_eod)
    docs = tokens = nbytes = 0

    def texts() -> Iterable[str]:
        for p in inputs:
            yield from iter_documents(p, json_key)

    pool = mp.get_context("fork").Pool(workers, _init_worker, (encoder, os.getpid())) if workers > 1 else None
    results = pool.imap(_encode, texts(), chunksize) if pool else map(encoder, texts())
    if progress:
        from tqdm import tqdm
        results = tqdm(results, desc=f"tokenizing -> {os.path.basename(prefix)}", unit=" docs", mininterval=1.0)
    try:
        for ids, b in results:
            nbytes += b
            if not ids:
                continue
            builder.add_document(np.concatenate([np.asarray(x, dtype=np.int64) for x in ids]), [len(x) for x in ids])
            docs += 1
            tokens += sum(len(x) for x in ids)
        if pool:
            pool.close()
        builder.finalize(tmp + ".idx")
    except BaseException:             # nothing half-written is left behind
        if pool:
            pool.terminate()
        if not builder.data_file.closed:
            builder.data_file.close()
        for f in (tmp + ".bin", tmp + ".idx"):
            if os.path.exists(f):
                os.remove(f)
        raise
    finally:
        if pool:
            pool.join()
    # rename last: a prefix that exists is complete
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")
    return {"prefix": prefix, "documents": docs, "tokens": tokens, "bytes": nbytes}
