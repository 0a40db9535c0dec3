"""Speculative greedy decoding with the MTP module as the drafter (DeepSeek-V3 section 5.4.3).

One step runs the main model over the sequence once and the depth-1 MTP module at the last position:
    main   p(t_{n+1} | t_{<=n})           -> t_{n+1} = argmax (exact greedy)
    draft  P^1(t_{n+2} | h_n, Emb(t_{n+1})) -> d_{n+2} = argmax (eq. 21-23 with the just-predicted t_{n+1})
The next step runs the main model over [.., t_{n+1}, d_{n+2}]: its prediction at t_{n+1}'s position verifies the
draft. Accepted: t_{n+2} = d_{n+2}, and the same pass also gives t_{n+3} (and the next draft), so two tokens per
pass; rejected: t_{n+2} is the main model's prediction there, one token per pass, as plain greedy. Every emitted
token is the main model's greedy choice given the true prefix, so the output equals plain greedy decoding token
for token (the test checks it); only the number of model passes changes.

No KV cache (each pass reads the whole sequence, like the trainer's sample): the pass count is the measure;
`decode` also reports wall time. TP = PP = 1 (the model's last stage holds the decoder, the head and MTP).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch

__all__ = ["greedy_decode", "speculative_decode", "DecodeResult"]


@dataclass
class DecodeResult:
    tokens: List[int]                    # the generated tokens (not the prompt)
    passes: int                          # model forward passes
    drafts: int = 0                      # drafts proposed and verified
    accepted: int = 0                    # drafts the main model agreed with
    seconds: float = 0.0
    accept_flags: List[bool] = field(default_factory=list)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafts if self.drafts else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return len(self.tokens) / self.passes if self.passes else 0.0


def _inner(model):
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


@torch.no_grad()
def _main_pass(model, ids: torch.Tensor):
    """ids [1, s] -> (greedy next token at every position [s], h^0 [s, 1, h] after the final norm)."""
    hidden = model.decoder(hidden_states=model.embedding(input_ids=ids, position_ids=None), attention_mask=None)
    logits, _ = model.output_layer(hidden, runtime_gather_output=True)             # [s, 1, V]
    return logits[:, 0, :model.vocab_size].float().argmax(-1), hidden


@torch.no_grad()
def _mtp_draft(model, ids: torch.Tensor, hidden: torch.Tensor, next_token: int) -> int:
    """The depth-1 draft of t_{n+2} at the last position: MTP's input there is Emb(t_{n+1}) = next_token."""
    layer = model.mtp.layers[0]
    shifted = torch.cat([ids[:, 1:], ids.new_tensor([[next_token]])], dim=1)           # t_{i+1} at i
    h1 = layer(hidden, model.embedding(input_ids=shifted, position_ids=None))          # [s, 1, h]  eqs. 21-22
    logits, _ = model.output_layer(layer.final_layernorm(h1[-1:]), runtime_gather_output=True)   # eq. 23
    return int(logits[0, 0, :model.vocab_size].float().argmax())


def greedy_decode(model, prompt: List[int], n_tokens: int, eos: Optional[int] = None) -> DecodeResult:
    """Plain greedy decoding: one pass of the main model (no MTP) per token."""
    model = _inner(model)
    dev = next(model.parameters()).device
    ids, out, passes, t0 = list(prompt), [], 0, time.perf_counter()
    while len(out) < n_tokens:
        nxt, _ = _main_pass(model, torch.tensor([ids], device=dev))
        passes += 1
        tok = int(nxt[-1])
        if tok == eos:
            break
        ids.append(tok)
        out.append(tok)
    return DecodeResult(out, passes, seconds=time.perf_counter() - t0)


def speculative_decode(model, prompt: List[int], n_tokens: int, eos: Optional[int] = None,
                       draft_fn: Optional[Callable] = None) -> DecodeResult:
    """Greedy decoding with MTP drafts (module docstring). draft_fn(model, ids, hidden, next_token) -> draft id
    replaces the MTP drafter (tests use it to force acceptance or rejection)."""
    model = _inner(model)
    if draft_fn is None:
        if getattr(model, "mtp", None) is None:
            raise ValueError("speculative_decode needs a model with an MTP module (MTPConfig.num_layers >= 1)")
        draft_fn = _mtp_draft
    dev = next(model.parameters()).device
    res, t0 = DecodeResult([], 0), time.perf_counter()
    ids = list(prompt)
    draft: Optional[int] = None        # d_{n+2} for the sequence ids + [pending]
    pending: Optional[int] = None      # t_{n+1}, emitted, not yet in a pass's input

    def emit(tok: int) -> bool:
        if tok == eos or len(res.tokens) >= n_tokens:
            return False
        res.tokens.append(tok)
        return True

    # first pass: the prompt alone
    nxt, hidden = _main_pass(model, torch.tensor([ids], device=dev))
    res.passes += 1
    pending = int(nxt[-1])
    if not emit(pending):
        return res
    draft = draft_fn(model, torch.tensor([ids], device=dev), hidden, pending)
    while len(res.tokens) < n_tokens:
        seq = ids + [pending, draft]
        x = torch.tensor([seq], device=dev)
        nxt, hidden = _main_pass(model, x)
        res.passes += 1
        res.drafts += 1
        verified = int(nxt[len(ids)])                    # the main model's t_{n+2}, given t_{<=n+1}
        ok = verified == draft
        res.accept_flags.append(ok)
        ids.append(pending)
        if ok:
            res.accepted += 1
            ids.append(draft)
            if not emit(draft):
                break
            pending = int(nxt[-1])                       # t_{n+3} from the same pass
            if not emit(pending):
                break
            draft = draft_fn(model, x, hidden, pending)
        else:
            pending = verified                           # the pass beyond the rejected draft is discarded
            if not emit(pending):
                break
            # a fresh draft needs h at t_{n+1}'s position: take this pass's, cut before the rejected draft
            x = x[:, :len(ids)]
            draft = draft_fn(model, x, hidden[:len(ids)], pending)
    res.seconds = time.perf_counter() - t0
    return res
