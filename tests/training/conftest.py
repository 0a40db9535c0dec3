"""A small indexed dataset for the trainer tests (made here: no corpus download, no stdlib walk)."""
import json
import os
import random

import pytest

WORDS = ("the a model expert token layer router bias loss batch step gradient pipeline tensor data parallel "
         "attention latent query key value rope scale group node balance update sequence memory weight").split()


def write_corpus(path: str, n_docs: int = 120, seed: int = 0) -> str:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            sents = []
            for _ in range(rng.randint(3, 8)):
                words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
                sents.append(" ".join(words).capitalize() + ".")
            f.write(json.dumps({"text": " ".join(sents)}) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """(prefix, cache_dir) of a byte-tokenized dataset of ~40K tokens."""
    from megatron_dsv3.training.preprocess import preprocess
    from megatron_dsv3.training.tokenizer import ByteTokenizer
    d = tmp_path_factory.mktemp("data")
    jsonl = write_corpus(str(d / "corpus.jsonl"))
    out = preprocess([jsonl], str(d / "corpus"), ByteTokenizer(), workers=1, progress=False)
    cache = d / "cache"
    os.makedirs(cache, exist_ok=True)
    return out["prefix"], str(cache)


def trainer_argv(prefix: str, cache: str, *extra: str, iters: int = 4) -> list:
    """Flags of a fast deterministic CPU run of the tiny preset (gradient accumulation: 2 micro-batches)."""
    return ["--preset", "tiny", "--cpu", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
            "--train-iters", str(iters), "--lr", "2e-3", "--min-lr", "2e-4", "--lr-warmup-iters", "1",
            "--eval-interval", "0", "--eval-iters", "0", "--log-interval", "1000", "--generate-tokens", "0",
            "--no-progress-bar", "--bias-update-rate", "0.01", "--data-path", prefix, "--data-cache-path", cache,
            *extra]
