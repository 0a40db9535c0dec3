"""Fill-in-Middle (training/fim.py): the exact PSM/SPM token layout, every document recoverable from the packed
samples, the rate, determinism per seed, --fim-rate 0 = today's batches, the tokenizers' FIM tokens, and the
trainer with --fim-rate."""
import json
import math

import numpy as np
import pytest

from megatron_dsv3.training.fim import FIM, FIMDocuments, uniform
from megatron_dsv3.training.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
CODE = "def add(a, b):\n    return a + b\n\n\nprint(add(2, 3))  # ✓\n"


def _fim(rate=1.0, spm=0.0, seed=1234, tok=TOK):
    return FIM.from_tokenizer(tok, rate, spm, seed)


def _split_psm(t, f):
    """PSM layout -> (prefix, suffix, middle): asserts there is exactly one of each special, EOD last."""
    t = list(t)
    assert t[0] == f.begin and t[-1] == f.eod and t.count(f.begin) == t.count(f.hole) == t.count(f.end) == 1
    h, e = t.index(f.hole), t.index(f.end)
    assert 0 < h < e
    return t[1:h], t[h + 1:e], t[e + 1:-1]


def test_psm_layout_is_exact():
    f = _fim()
    body = TOK.tokenize(CODE)
    n = len(body)
    seen_a, seen_b = set(), set()
    for doc in range(400):
        t = f.transform(doc, body + [TOK.eod])
        assert len(t) == n + 1 + 3
        pre, suf, mid = _split_psm(t, f)
        a, b = len(pre), n - len(suf)               # the two split points
        assert 0 <= a <= b <= n
        assert t.tolist() == [f.begin, *body[:a], f.hole, *body[b:], f.end, *body[a:b], TOK.eod]
        seen_a.add(a), seen_b.add(b)
    # the points cover the document, ends included (empty prefix / suffix happen)
    assert 0 in seen_a and n in seen_b and len(seen_a) > n // 2 and len(seen_b) > n // 2


def test_spm_layout_is_exact():
    f = _fim(spm=1.0)
    body = TOK.tokenize(CODE)
    n = len(body)
    for doc in range(200):
        t = f.transform(doc, body + [TOK.eod]).tolist()
        assert t[:2] == [f.begin, f.hole] and t[-1] == TOK.eod and t.count(f.end) == 1 and len(t) == n + 4
        e = t.index(f.end)
        suf, pre_mid = t[2:e], t[e + 1:-1]
        assert pre_mid + suf == body                 # SPM: <begin><hole> suf <end> prefix middle <eos>


def test_document_without_eod_and_empty_document():
    f = _fim()
    t = f.transform(7, [1, 2, 3])
    assert t[0] == f.begin and len(t) == 6 and t[-1] != f.eod and f.restore(t).tolist() == [1, 2, 3]
    assert f.transform(7, [TOK.eod]).tolist() == [f.begin, f.hole, f.end, TOK.eod]


def test_restore_inverts_every_transform():
    """Random documents, PSM and SPM mixed: restore(transform(d)) == d; documents left alone are unchanged."""
    rng = np.random.default_rng(0)
    f = _fim(rate=0.5, spm=0.5)
    kinds = {"psm": 0, "spm": 0, "plain": 0}
    for doc in range(3000):
        body = rng.integers(0, 256, int(rng.integers(0, 40))).tolist()
        orig = body + [TOK.eod]
        t = f.transform(doc, orig)
        if t[0] != f.begin:
            assert t.tolist() == orig
            kinds["plain"] += 1
        else:
            kinds["spm" if uniform(f.seed, doc, 1)[0] < f.spm_rate else "psm"] += 1
        assert f.restore(t).tolist() == orig
    assert min(kinds.values()) > 300, kinds


def test_rate_within_binomial_bound():
    n, rate, spm = 200_000, 0.1, 0.3
    f = _fim(rate=rate, spm=spm)
    chosen = f.chosen(np.arange(n))
    k = int(chosen.sum())
    assert abs(k - n * rate) < 5 * math.sqrt(n * rate * (1 - rate)), k      # 5 sigma
    is_spm = uniform(f.seed, np.flatnonzero(chosen), 1) < spm               # the SPM draw of the chosen ones
    assert abs(is_spm.sum() - k * spm) < 5 * math.sqrt(k * spm * (1 - spm))
    # the split points: min and max of two uniforms, means 1/3 and 2/3 of the document
    m, n_tok = 2000, 999
    pts = []
    for d in range(m):
        pre, suf, _ = _split_psm(_fim(seed=d).transform(d, [0] * n_tok + [TOK.eod]), f)
        pts.append((len(pre), n_tok - len(suf)))
    pts = np.array(pts) / (n_tok + 1)
    sd = math.sqrt(1 / 18 / m)                       # the variance of min (and max) of two U(0,1) is 1/18
    assert abs(pts[:, 0].mean() - 1 / 3) < 5 * sd and abs(pts[:, 1].mean() - 2 / 3) < 5 * sd


def test_draws_are_per_seed_and_document_not_per_call_order():
    a, b = _fim(rate=0.5, seed=1), _fim(rate=0.5, seed=2)
    docs = np.arange(5000)
    assert np.array_equal(a.chosen(docs), _fim(rate=0.5, seed=1).chosen(docs[::-1])[::-1])
    assert 0.4 < np.mean(a.chosen(docs) != b.chosen(docs)) < 0.6              # another seed: independent draws
    body = list(range(100)) + [TOK.eod]
    first = [a.transform(d, body).tolist() for d in range(50)]
    assert [a.transform(d, body).tolist() for d in reversed(range(50))][::-1] == first


# ---- the dataset: FIM before packing ------------------------------------------------------------------------
def _build(tiny_data, seed=1234, seq=32, samples=1600, cache=None, **fim):
    from megatron_dsv3.training.data import build_datasets, parse_blend
    prefix, default_cache = tiny_data
    return build_datasets(parse_blend([prefix]), TOK, seq, seed, "100,0,0", [samples, 0, 0], cache or default_cache,
                          **fim)[0]


def _text(ds, i):
    return ds._query_document_sample_shuffle_indices(i)[0]


def test_every_document_is_recoverable_from_the_packed_samples(tiny_data, mcore_single):
    """Read every sample (two epochs of 120 documents, ~40K tokens); in the order they were packed they are the
    FIM-transformed documents back to back, seq_length+1 tokens each, nothing dropped or padded; parsing each
    document out of them gives back the original."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    prefix, _ = tiny_data
    seq = 32
    ds = _build(tiny_data, seq=seq, fim_rate=0.5, fim_spm_rate=0.5)
    assert type(ds).__name__ == "FIMGPTDataset" and isinstance(ds.dataset, FIMDocuments)
    f, raw = ds.dataset.fim, IndexedDataset(prefix)
    n = len(ds)
    inverse = np.argsort(np.asarray(ds.shuffle_index[:n]))           # packing order -> dataset index
    texts = [_text(ds, int(inverse[r])) for r in range(n)]
    assert all(len(t) == seq + 1 for t in texts) and TOK.pad not in np.concatenate(texts)
    stream = np.concatenate([t[:-1] for t in texts] + [texts[-1][-1:]])
    expected = np.concatenate([f.transform(int(d), raw[int(d)]) for d in ds.document_index])
    assert np.array_equal(stream, expected[:len(stream)])            # the sample index counts the +3
    cuts = np.flatnonzero(stream == TOK.eod) + 1
    docs = np.split(stream, cuts)[:-1]                               # the documents complete in the stream
    assert len(docs) >= 2 * 120 - 2
    n_fim = 0
    for d, tokens in zip(ds.document_index, docs):
        orig = raw[int(d)]
        n_fim += tokens[0] == f.begin
        assert np.array_equal(f.restore(tokens), orig), int(d)
        assert (tokens[0] == f.begin) == ds.dataset.is_fim[int(d)] and len(tokens) == len(orig) + 3 * (tokens[0] == f.begin)
    assert 0.3 < n_fim / len(docs) < 0.7


def test_samples_are_deterministic_per_seed(tiny_data, mcore_single, tmp_path):
    one = _build(tiny_data, cache=str(tmp_path / "a"), fim_rate=0.3)
    two = _build(tiny_data, cache=str(tmp_path / "b"), fim_rate=0.3)
    idx = list(range(0, len(one), 13))
    assert all(np.array_equal(_text(one, i), _text(two, i)) for i in idx)
    assert all(np.array_equal(_text(one, i), _text(one, i)) for i in reversed(idx))   # order does not matter
    other = _build(tiny_data, seed=99, cache=str(tmp_path / "c"), fim_rate=0.3)
    assert not np.array_equal(one.dataset.is_fim, other.dataset.is_fim)
    assert sum(np.array_equal(_text(one, i), _text(other, i)) for i in idx) < len(idx) // 4


def test_fim_rate_zero_is_todays_dataset(tiny_data, mcore_single, tmp_path):
    """--fim-rate 0 builds megatron-core's GPTDataset exactly as before; the FIM dataset at rate 0 packs the same."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron_dsv3.training.data import micro_batches
    from megatron_dsv3.training.fim import FIMGPTDataset, FIMGPTDatasetConfig
    prefix, cache = tiny_data
    kw = dict(random_seed=1234, sequence_length=32, blend=([prefix], None), split="100,0,0", tokenizer=TOK,
              reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
              path_to_cache=str(tmp_path / "old"), mmap_bin_files=True)
    old = BlendedMegatronDatasetBuilder(GPTDataset, [64, 0, 0], lambda: True, GPTDatasetConfig(**kw)).build()[0]
    new = _build(tiny_data, samples=64, cache=str(tmp_path / "new"), fim_rate=0.0)
    assert type(new) is GPTDataset
    at_zero = BlendedMegatronDatasetBuilder(FIMGPTDataset, [64, 0, 0], lambda: True, FIMGPTDatasetConfig(
        **{**kw, "path_to_cache": str(tmp_path / "zero")}, fim_rate=0.0)).build()[0]
    for ds in (new, at_zero):
        for consumed in (0, 16, 48):
            for a, b in zip(micro_batches(old, consumed, 16, 4, 0, 1, "cpu"), micro_batches(ds, consumed, 16, 4, 0, 1, "cpu")):
                assert all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a)


def test_sentence_level_dataset_is_refused(tmp_path, mcore_single):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from megatron_dsv3.training.data import build_datasets
    b = IndexedDatasetBuilder(str(tmp_path / "s.bin"), dtype=np.uint16)
    for _ in range(20):                   # what --split-sentences stores: one sequence per sentence
        b.add_document(np.array([5, 6, 7, 8, 9, TOK.eod]), [2, 4])
    b.finalize(str(tmp_path / "s.idx"))
    with pytest.raises(ValueError, match="--fim-rate works on whole documents.*--split-sentences"):
        build_datasets([[str(tmp_path / "s")], None], TOK, 8, 1, "100,0,0", [8, 0, 0], str(tmp_path), fim_rate=0.1)


# ---- tokenizers ---------------------------------------------------------------------------------------------
def test_byte_tokenizer_fim_ids():
    tok = ByteTokenizer()
    assert tok.fim_ids() == (259, 260, 261) and tok.vocab_size == 262
    assert len({tok.eod, tok.pad, tok.bos, *tok.fim_ids()}) == 6 and max(tok.fim_ids()) < tok.vocab_size
    assert tok.detokenize(tok.tokenize("a") + list(tok.fim_ids())) == "a"
    from megatron_dsv3.config import DSV3Config
    assert tok.vocab_size <= DSV3Config.from_preset("tiny").vocab_size        # still fits the tiny model


def _hf_tokenizer(d, specials):
    pytest.importorskip("tokenizers")
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    vocab = {"<unk>": 0, "<｜end▁of▁sentence｜>": 1, "def": 2, "f": 3}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.add_special_tokens([AddedToken(s, special=True) for s in specials])
    d.mkdir()
    t.save(str(d / "tokenizer.json"))
    from megatron_dsv3.training.tokenizer import build_tokenizer
    return build_tokenizer(str(d))


def test_hf_tokenizer_fim_tokens_both_spellings_and_clear_error(tmp_path):
    v3 = _hf_tokenizer(tmp_path / "v3", ["<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>"])   # DeepSeek-V3's spelling
    assert v3.fim_ids() == (5, 4, 6) and v3.eod == 1
    ascii_ = _hf_tokenizer(tmp_path / "ascii", ["<|fim_begin|>", "<|fim_hole|>", "<|fim_end|>"])
    assert ascii_.fim_ids() == (4, 5, 6)
    f = _fim(tok=v3)
    assert (f.begin, f.hole, f.end, f.eod) == (5, 4, 6, 1)
    partial = _hf_tokenizer(tmp_path / "partial", ["<｜fim▁begin｜>"])
    with pytest.raises(ValueError, match=r"--fim-rate .*partial/tokenizer.json lacks <｜fim▁hole｜> <｜fim▁end｜>"):
        partial.fim_ids()
    none = _hf_tokenizer(tmp_path / "none", [])
    assert none.fim_begin is None
    with pytest.raises(ValueError, match="--fim-rate"):
        FIM.from_tokenizer(none, 0.1, 0.0, 1)


def test_flags():
    from megatron_dsv3.training.arguments import build_parser
    p = build_parser()
    a = p.parse_args([])
    assert a.fim_rate == 0.0 and a.fim_spm_rate == 0.0
    a = p.parse_args(["--fim-rate", "0.1", "--fim-spm-rate", "0.5"])
    assert (a.fim_rate, a.fim_spm_rate) == (0.1, 0.5)
    with pytest.raises(SystemExit):
        p.parse_args(["--fim-rate", "1.5"])


def test_trainer_two_steps_with_fim(tiny_data, mcore_single, tmp_path, capsys):
    from megatron_dsv3.training.arguments import parse_args
    from megatron_dsv3.training.data import micro_batches
    from megatron_dsv3.training.loop import Trainer
    from tests.training.conftest import trainer_argv
    prefix, _ = tiny_data
    t = Trainer(parse_args(trainer_argv(prefix, str(tmp_path), "--fim-rate", "0.5", "--fim-spm-rate", "0.5", iters=2)))
    assert type(t.train_ds).__name__ == "FIMGPTDataset" and type(t.valid_ds).__name__ == "FIMGPTDataset"
    assert "fill-in-middle: 0.5 of the documents, 0.5 of those in SPM order" in capsys.readouterr().out
    seen = np.concatenate([b["tokens"].numpy().ravel() for g in (0, 8)
                           for b in micro_batches(t.train_ds, g, 8, 2, 0, 1, "cpu")])
    assert np.isin(TOK.fim_ids(), seen).all()                        # the two steps' batches hold FIM documents
    t.train()
    assert t.iteration == 2 and len(t.history) == 2 and all(math.isfinite(h["loss"]) for h in t.history)
