"""MTP speculative decoding (megatron_dsv3/mtp/speculative.py): the output equals plain greedy decoding token for
token, whatever the drafts (the MTP module's, always-right oracle drafts, always-wrong drafts), and the pass count
follows the acceptances: passes = 1 + drafts, tokens = passes + accepted."""
import pytest
import torch

from megatron_dsv3.config import DSV3Config
from megatron_dsv3.mtp.speculative import greedy_decode, speculative_decode

N = 30


@pytest.fixture
def model(mcore_single):
    from megatron_dsv3.model import build_model
    torch.manual_seed(0)
    return build_model(DSV3Config.from_preset("tiny"), device="cpu", seed=3).eval()


PROMPT = [72, 101, 108, 108, 111, 32]


def _check_counts(res):
    assert res.passes == 1 + res.drafts
    assert len(res.tokens) <= res.passes + res.accepted


def test_mtp_drafts_give_the_greedy_output(model):
    plain = greedy_decode(model, PROMPT, N)
    spec = speculative_decode(model, PROMPT, N)
    assert spec.tokens == plain.tokens and len(plain.tokens) == N and plain.passes == N
    _check_counts(spec)
    assert spec.drafts > 0


def test_oracle_and_wrong_drafts(model):
    plain = greedy_decode(model, PROMPT, N + 2).tokens
    P = len(PROMPT)
    V = model.vocab_size

    def oracle(m, x, hidden, next_token):               # the true t_{m+2}
        return plain[x.shape[1] + 1 - P]

    def wrong(m, x, hidden, next_token):
        return (plain[x.shape[1] + 1 - P] + 1) % V

    right = speculative_decode(model, PROMPT, N, draft_fn=oracle)
    assert right.tokens == plain[:N] and right.acceptance_rate == 1.0
    assert right.passes == 1 + (N - 1 + 1) // 2         # two tokens per pass after the first
    bad = speculative_decode(model, PROMPT, N, draft_fn=wrong)
    assert bad.tokens == plain[:N] and bad.accepted == 0 and bad.passes == N
    for r in (right, bad):
        _check_counts(r)


def test_needs_an_mtp_module(mcore_single):
    from megatron_dsv3.model import build_model
    m = build_model(DSV3Config.from_preset("tiny", mtp={"num_layers": 0}), device="cpu", seed=0).eval()
    with pytest.raises(ValueError, match="MTP"):
        speculative_decode(m, PROMPT, 3)
