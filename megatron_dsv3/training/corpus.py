"""The quick start's corpus, built from text every machine that can run this package already has:
the docstrings of the Python standard library (English prose about programming, written by many
people over 30 years), read from the `.py` sources with `ast` (nothing is imported or executed).
If a trimmed Python ships no sources, torch's docstrings (a required dependency) are used instead.

Why not ship a file: the machines this runs on cannot download, a shipped corpus would be either
too small to show learning or megabytes in the repository, and the stdlib is always there. The
output is deterministic for a given Python version (sorted files, documents shuffled by a fixed
hash), so runs on the same machine are comparable.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
from typing import Iterator, List, Optional

MIN_DOC_CHARS = 120          # shorter docstrings are mostly signatures ("Return self.")
ENOUGH_BYTES = 500_000       # the stdlib gives ~1.5 MB; torch is read only when it gives less than this


def _source_roots() -> List[str]:
    roots = [sysconfig.get_paths()["stdlib"]]
    try:
        import torch
        roots.append(os.path.dirname(torch.__file__))
    except ImportError:  # pragma: no cover
        pass
    return roots


def _py_files(root: str) -> Iterator[str]:
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3", "ensurepip"}
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in skip)
        for f in sorted(files):
            if f.endswith(".py"):
                yield os.path.join(d, f)


def _docstrings(path: str) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_DOC_CHARS:
                yield doc


def build_docstring_corpus(out_path: str, max_bytes: int = 6_000_000) -> dict:
    """Write a jsonl of {"text": docstring} documents; returns {"documents", "bytes", "source"}."""
    docs, size, source = [], 0, None
    for root in _source_roots():
        seen = set()
        for path in _py_files(root):
            for doc in _docstrings(path):
                h = hashlib.sha1(doc.encode()).hexdigest()
                if h in seen:
                    continue
                seen.add(h)
                docs.append((h, doc))
                size += len(doc.encode())
        if size >= ENOUGH_BYTES:
            source = root
            break
    if not docs:
        raise RuntimeError(f"no docstrings found under {_source_roots()}; pass --data-path with your own data")
    docs.sort()                         # a fixed shuffle: the order of the sha1 of each document
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    from megatron_dsv3.training.preprocess import unique_tmp_path
    tmp, n, written = unique_tmp_path(out_path), 0, 0     # concurrent builders each rename their own file
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for _, doc in docs:
                if written >= max_bytes:
                    break
                f.write(json.dumps({"text": doc}) + "\n")
                n += 1
                written += len(doc.encode())
        os.replace(tmp, out_path)
    finally:                            # nothing half-written is left behind
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"documents": n, "bytes": written, "source": source or _source_roots()[-1]}


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "megatron_dsv3")


def default_data_prefix(tokenizer, cache_dir: Optional[str] = None, workers: int = 1) -> str:
    """Build (once) the docstring corpus and its indexed dataset for this tokenizer; returns the prefix."""
    from megatron_dsv3.training.preprocess import preprocess

    cache_dir = cache_dir or default_cache_dir()
    tag = hashlib.sha1(json.dumps(tokenizer.unique_identifiers, default=str).encode()).hexdigest()[:8]
    prefix = os.path.join(cache_dir, f"docstrings_{tag}_text_document")
    if os.path.exists(prefix + ".bin") and os.path.exists(prefix + ".idx"):
        return prefix
    jsonl = os.path.join(cache_dir, "docstrings.jsonl")
    if not os.path.exists(jsonl):
        build_docstring_corpus(jsonl)
    preprocess([jsonl], os.path.join(cache_dir, f"docstrings_{tag}"), tokenizer, workers=workers, progress=False)
    return prefix


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="Write the standard-library docstring corpus as jsonl.")
    p.add_argument("--out", default="data/docstrings.jsonl")
    p.add_argument("--max-bytes", type=int, default=6_000_000)
    a = p.parse_args()
    print(build_docstring_corpus(a.out, a.max_bytes))
