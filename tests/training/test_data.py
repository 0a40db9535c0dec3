"""Tokenizers, preprocessing (jsonl/text -> indexed dataset, Punkt trained on the corpus, workers), the GPT
dataset builder over the result, and the docstring corpus builder."""
import json
import os

import numpy as np
import pytest

from megatron_dsv3.training.preprocess import iter_documents, preprocess, sentence_splitter
from megatron_dsv3.training.tokenizer import ByteTokenizer, build_tokenizer

TEXT = ("Dr. Smith trained the model on 2048 GPUs. The loss fell, e.g. from 6.1 to 2.0 in a day. "
        "Mr. Jones checked the router bias. It moved by the same amount on every rank.")


def test_byte_tokenizer_round_trip():
    tok = build_tokenizer("byte")
    ids = tok.tokenize("héllo wörld ✓")
    assert max(ids) < 256 and tok.detokenize(ids + [tok.eod, tok.pad]) == "héllo wörld ✓"
    assert tok.vocab_size == 262 and {tok.eod, tok.pad, tok.bos} == {256, 257, 258}   # + 3 FIM ids (test_fim.py)


def test_hf_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<unk>": 0, "</s>": 1, "hello": 2, "world": 3}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    tok = build_tokenizer(str(tmp_path))
    assert tok.tokenize("hello world") == [2, 3] and tok.eod == 1
    assert tok.pad == tok.vocab_size == 4          # no pad token of its own: one past the vocabulary


def test_punkt_trained_on_the_corpus_keeps_abbreviations(tmp_path):
    path = tmp_path / "c.jsonl"
    with open(path, "w") as f:
        for i in range(300):   # a corpus where "Dr." and "e.g." recur mid-sentence
            f.write(json.dumps({"text": f"Dr. Smith ran job {i} today. It used e.g. eight nodes. Mr. Jones agreed."}) + "\n")
    split = sentence_splitter([str(path)])
    sents = split.tokenize(TEXT)
    assert sents[0] == "Dr. Smith trained the model on 2048 GPUs."
    assert any(s.startswith("The loss fell, e.g. from") for s in sents) and len(sents) == 4


def test_preprocess_jsonl_and_text_with_workers(tmp_path, mcore_single):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    jl = tmp_path / "a.jsonl"
    docs = [f"Document {i}. " + TEXT * (1 + i % 3) for i in range(40)]
    jl.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    txt = tmp_path / "b.txt"
    txt.write_text("first doc line one\nline two\n\nsecond doc\n")
    assert list(iter_documents(str(txt))) == ["first doc line one\nline two", "second doc"]

    tok = ByteTokenizer()
    one = preprocess([str(jl)], str(tmp_path / "w1"), tok, workers=1, progress=False)
    two = preprocess([str(jl)], str(tmp_path / "w2"), tok, workers=2, progress=False)
    assert one["documents"] == 40 and one["tokens"] == two["tokens"] == sum(len(d.encode()) + 1 for d in docs)
    assert open(one["prefix"] + ".bin", "rb").read() == open(two["prefix"] + ".bin", "rb").read()
    ds = IndexedDataset(one["prefix"])
    assert len(ds) == 40 and ds[3].tolist() == tok.tokenize(docs[3]) + [tok.eod]

    sent = preprocess([str(jl), str(txt)], str(tmp_path / "s"), tok, split_sentences=True, workers=2, progress=False)
    assert sent["prefix"].endswith("_text_sentence") and sent["documents"] == 42
    sds = IndexedDataset(sent["prefix"])
    assert len(sds) > 42 * 2                       # several sentences per document
    assert sds.document_indices[-1] == len(sds)


def test_preprocess_of_one_prefix_twice_at_once(tmp_path, monkeypatch):
    """Two builds of the same dataset overlapping (parallel trainings on a fresh cache: a failure seen on the GPU
    machine): the second one runs whole while the first is between writing its files and renaming them. Both
    finish, the dataset is whole, no temporary file is left."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
    jl = tmp_path / "a.jsonl"
    jl.write_text("".join(json.dumps({"text": f"Document {i}. " + TEXT}) + "\n" for i in range(10)))
    finalize, nested = IndexedDatasetBuilder.finalize, []

    def finalize_then_another_build(self, idx_path):
        finalize(self, idx_path)
        if not nested:
            nested.append(None)
            nested[0] = (preprocess([str(jl)], str(tmp_path / "d" / "c"), ByteTokenizer(), progress=False))
    monkeypatch.setattr(IndexedDatasetBuilder, "finalize", finalize_then_another_build)
    first = preprocess([str(jl)], str(tmp_path / "d" / "c"), ByteTokenizer(), progress=False)
    assert nested and first == nested[0] and len(IndexedDataset(first["prefix"])) == 10
    assert sorted(os.listdir(tmp_path / "d")) == ["c_text_document.bin", "c_text_document.idx"]


@pytest.mark.parametrize("workers", [1, 2])
def test_preprocess_bad_input_names_file_and_line_and_leaves_nothing(tmp_path, workers):
    good = json.dumps({"text": "a fine document " * 20}) + "\n"
    cases = {"not-json": (good + good + '{"text": "cut off\n', r"bad.jsonl:3: not a JSON object per line"),
             "no-key": (good + json.dumps({"body": "x"}) + "\n", r"bad.jsonl:2: no 'text' key .*--json-key"),
             "not-str": (good + good + good + json.dumps({"text": 7}) + "\n", r"bad.jsonl:4: 'text' is a int"),
             "array": ("[1, 2]\n", r"bad.jsonl:1: expected a JSON object")}
    for name, (content, message) in cases.items():
        d = tmp_path / name
        d.mkdir()
        (d / "bad.jsonl").write_text(content)
        with pytest.raises(ValueError, match=message):
            preprocess([str(d / "bad.jsonl")], str(d / "out" / "my"), ByteTokenizer(), workers=workers,
                       progress=False)
        left = [str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()]
        assert left == ["bad.jsonl"], (name, left)
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such input file"):
        preprocess([str(tmp_path / "missing.jsonl")], str(tmp_path / "m" / "my"), ByteTokenizer(), progress=False)
    assert not (tmp_path / "m").exists()


def test_preprocess_tool_prints_one_error_line(tmp_path, capsys):
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("preprocess_data", os.path.join(root, "tools", "preprocess_data.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"content": "x"}) + "\n")
    args = ["--input", str(tmp_path / "c.jsonl"), "--output-prefix", str(tmp_path / "o" / "c"), "--workers", "1"]
    assert tool.main(args) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]                                       # above it: the progress bar only
    assert "Traceback" not in err and err.count("error: ") == 1 and last.startswith("error: "), err
    assert "c.jsonl:2: no 'text' key" in last
    assert tool.main(args + ["--json-keys", "content"]) == 2          # Megatron-LM's spelling; line 1 lacks it
    assert "c.jsonl:1: no 'content' key" in capsys.readouterr().err
    assert not [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "c.jsonl"]
    with pytest.raises(ValueError):
        tool.main(args + ["--debug"])


def test_gpt_dataset_over_preprocessed(tiny_data, mcore_single):
    from megatron_dsv3.training.data import build_datasets, micro_batches, parse_blend
    prefix, cache = tiny_data
    assert parse_blend(["0.3", "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    train, valid, test = build_datasets(parse_blend([prefix]), ByteTokenizer(), 32, 1234, "90,10,0", [64, 16, 0], cache)
    assert len(train) >= 64 and len(valid) >= 16 and test is None
    mb = micro_batches(train, 8, 8, 2, dp_rank=1, dp_size=2, device="cpu")
    assert len(mb) == 2 and mb[0]["tokens"].shape == (2, 32)
    # data-parallel rank 1, micro-batch 1 holds samples 8 + 1*2*2 + 1*2 = 14, 15
    assert np.array_equal(mb[1]["tokens"][0].numpy(), np.asarray(train[14]["tokens"]))
    assert np.array_equal(mb[0]["labels"][0, :-1].numpy(), mb[0]["tokens"][0, 1:].numpy())


def test_docstring_corpus(tmp_path, monkeypatch):
    from megatron_dsv3.training import corpus
    root = tmp_path / "lib"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "m.py").write_text('"""' + "Module prose. " * 20 + '"""\n\ndef f():\n    """' + "Function prose. " * 20 +
                                       '"""\n\ndef g():\n    """Short."""\n')
    (root / "pkg" / "bad.py").write_text("def (:\n")
    monkeypatch.setattr(corpus, "_source_roots", lambda: [str(root)])
    out = corpus.build_docstring_corpus(str(tmp_path / "c.jsonl"))
    lines = [json.loads(l)["text"] for l in open(tmp_path / "c.jsonl")]
    assert out["documents"] == 2 == len(lines) and all(len(t) >= corpus.MIN_DOC_CHARS for t in lines)


PREPROCESS_VICTIM = r"""
import sys, time
from megatron_dsv3.training.preprocess import preprocess
from megatron_dsv3.training.tokenizer import ByteTokenizer

class SlowTokenizer(ByteTokenizer):
    def tokenize(self, text):
        time.sleep(300)
        return super().tokenize(text)

preprocess([sys.argv[1]], sys.argv[2], SlowTokenizer(), workers=2, chunksize=1, progress=False)
"""


def test_sigkilled_preprocess_leaves_no_pool_worker(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    import psutil
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(8)))
    proc = subprocess.Popen([sys.executable, "-c", PREPROCESS_VICTIM, str(src), str(tmp_path / "o")])
    workers = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline and proc.poll() is None:
            workers = [c.pid for c in psutil.Process(proc.pid).children()]
            time.sleep(0.2)
        assert len(workers) == 2, "the pool did not start"
        time.sleep(1.0)                                        # the workers are inside tokenize()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 10
        while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in workers) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in workers if psutil.pid_exists(p)
                    and psutil.Process(p).status() != psutil.STATUS_ZOMBIE], "pool workers outlived preprocess"
    finally:
        for p in workers:
            if psutil.pid_exists(p):
                os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
