"""Exponential moving average of the parameters, kept in host memory (paper section 3.2.3).

    ema_t = decay * ema_{t-1} + (1 - decay) * theta_t        after every successful optimizer step t

Design note. The paper keeps the EMA "in CPU memory and updated asynchronously after each training step", so
that it costs no device memory and no step time. Here:
  * `ParameterEMA` holds an fp32 host copy of this rank's parameters (its TP/PP/EP part of every model chunk;
    replicated over data-parallel ranks like the model weights), in pinned memory on CUDA.
  * `update()` (called only from training/hooks.py `after_optimizer_step`, and only when the step happened) takes
    a snapshot of the parameters and returns; the arithmetic (two foreach ops) runs in a background thread. On
    CUDA the snapshot is a device->host copy (non_blocking, on a side stream that waits for the optimizer's
    stream, into pinned staging buffers) and the thread waits for its event; on CPU it is a memcpy made in
    update() itself (a copy in the thread would have to be waited for before the next step: measured slower,
    the thread needs the GIL while the training thread holds it).
  * The only points that wait: `before_optimizer_step()` (CUDA: the next step may change the parameters only
    after the snapshot's copy; a stream wait on its event, no host stall), and `wait()` before the next update,
    a save, an evaluation with the EMA.
  * Checkpoints: `sharded_state_dict(chunks)` is the model's own sharded state dict restricted to parameters,
    each ShardedTensor (or factory) re-keyed `ema.<key>` with the EMA as data: the same global shapes and
    offsets as the model, so the EMA reshards on load at any TP/PP/EP like the weights (layout-free).
  * Cost (bench/bench_ema.py, bench/ema_cuda_check.py): the training thread pays the snapshot's launch (CPU tiny
    preset: ~1.8 ms of a ~470 ms step); it waits longer only when one host update takes longer than a step. The
    host update runs at ~0.7 ns per parameter on an H200 host (805M bf16 params: ~580 ms), so a rank whose steps
    are shorter than that stalls (measured: 59 ms synthetic step -> 504 ms); at DeepSeek-V3 scale (well under 1B
    parameters per rank, steps of seconds) it is hidden.
  * The EMA of bf16 parameters is taken of the bf16 values the model computes with (not of the optimizer's fp32
    main copies, which the distributed optimizer shards over DP); it is accumulated in fp32.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Dict, List, Optional

import torch

EMA_PREFIX = "ema."


def _unwrap(chunk):
    while type(chunk).__name__ in ("DistributedDataParallel", "Float16Module", "FullyShardedDataParallel"):
        chunk = chunk.module
    return chunk


def ema_sharded_state_dict(model, tensors: Dict[str, torch.Tensor]) -> dict:
    """The model's sharded state dict (checkpoint/convert.py model_sharded_state_dict) restricted to the names in
    `tensors` (parameter names), with each entry's data replaced by tensors[name] and its key prefixed `ema.`."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
    from megatron_dsv3.checkpoint.convert import model_sharded_state_dict

    out = {}
    for name, sh in model_sharded_state_dict(_unwrap(model)).items():
        if name not in tensors:
            continue                             # buffers (expert bias), _extra_state: not averaged
        t = tensors[name]
        if isinstance(sh, ShardedTensor):
            out[name] = dataclasses.replace(sh, key=EMA_PREFIX + sh.key, data=t, dtype=t.dtype)
        elif isinstance(sh, ShardedTensorFactory):
            out[name] = dataclasses.replace(sh, key=EMA_PREFIX + sh.key, data=t)
        else:
            raise TypeError(f"EMA of {name}: unexpected sharded entry {type(sh).__name__}")
    missing = set(tensors) - set(out)
    if missing:
        raise KeyError(f"EMA: parameters without a sharded state dict entry: {sorted(missing)[:4]}")
    return out


class ParameterEMA:
    """fp32 host EMA of the parameters of `model_chunks` (megatron DDP-wrapped or bare modules)."""

    def __init__(self, model_chunks, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--ema-decay must be in (0, 1), got {decay:g}")
        self.decay = float(decay)
        chunks = model_chunks if isinstance(model_chunks, (list, tuple)) else [model_chunks]
        self.models = [_unwrap(c) for c in chunks]
        self.params: List[List[tuple]] = [list(m.named_parameters()) for m in self.models]
        flat = [p for ps in self.params for _, p in ps]
        self.cuda = any(p.is_cuda for p in flat)
        pin = self.cuda and torch.cuda.is_available()
        self.ema = [[torch.empty(p.shape, dtype=torch.float32, pin_memory=pin) for _, p in ps] for ps in self.params]
        # staging buffers of the snapshot (CUDA: pinned, in the parameter dtype so the copy is a plain DMA)
        self._stage = [torch.empty(p.shape, dtype=p.dtype, pin_memory=pin) for p in flat]
        self._stream = torch.cuda.Stream(device=flat[0].device) if self.cuda else None
        self._copied_event = None               # CUDA: the snapshot's copy done
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self.updates = 0                        # updates applied since the EMA was (re)started or loaded
        self.reset_from_params()

    # ---- the one state change ------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self) -> None:
        """ema = decay * ema + (1 - decay) * param, asynchronously. Call after a successful optimizer step."""
        self.wait()
        flat = [p for ps in self.params for _, p in ps]
        if self.cuda:
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                for s, p in zip(self._stage, flat):
                    s.copy_(p.detach(), non_blocking=True)
                self._copied_event = torch.cuda.Event()
                self._copied_event.record(self._stream)
        else:
            torch._foreach_copy_(self._stage, [p.detach() for p in flat])
        self._thread = threading.Thread(target=self._apply, name="ema-update", daemon=True)
        self._thread.start()

    def _apply(self) -> None:
        try:
            with torch.no_grad():
                if self.cuda:
                    self._copied_event.synchronize()
                ema = [e for es in self.ema for e in es]
                stage = [s if s.dtype == torch.float32 else s.float() for s in self._stage]
                torch._foreach_mul_(ema, self.decay)
                torch._foreach_add_(ema, stage, alpha=1.0 - self.decay)
            self.updates += 1
        except BaseException as e:  # noqa: BLE001  re-raised in the training thread by wait()
            self._error = e

    # ---- synchronisation -----------------------------------------------------------------------------------
    def before_optimizer_step(self) -> None:
        """The next optimizer step may change the parameters only once the snapshot is taken."""
        if self.cuda and self._copied_event is not None:
            torch.cuda.current_stream().wait_event(self._copied_event)   # device-side: no host stall
        self._raise()

    def wait(self) -> None:
        """Until the pending update is applied (before the next update, a save, an evaluation)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise()

    def _raise(self):
        if self._error is not None:
            e, self._error = self._error, None
            raise RuntimeError(f"EMA update failed: {type(e).__name__}: {e}") from e

    # ---- (re)start, checkpoint, evaluation -------------------------------------------------------------------
    @torch.no_grad()
    def reset_from_params(self) -> None:
        """Start the EMA from the current parameters (fresh runs, checkpoints without an EMA)."""
        self.wait()
        for es, ps in zip(self.ema, self.params):
            for e, (_, p) in zip(es, ps):
                e.copy_(p.detach())
        self.updates = 0

    def tensors(self, i: int) -> Dict[str, torch.Tensor]:
        """Chunk i's EMA by parameter name (call wait() first)."""
        return {n: e for (n, _), e in zip(self.params[i], self.ema[i])}

    def sharded_state_dict(self) -> dict:
        self.wait()
        return {f"ema{i}": ema_sharded_state_dict(m, self.tensors(i)) for i, m in enumerate(self.models)}

    @torch.no_grad()
    def load_state_dict(self, loaded: dict) -> None:
        """From dist_checkpointing.load of sharded_state_dict()."""
        self.wait()
        for i in range(len(self.models)):
            got = loaded[f"ema{i}"]
            for n, e in self.tensors(i).items():
                e.copy_(got[n])
        self.updates = 0

    @contextlib.contextmanager
    def swapped_in(self):
        """The EMA in the parameters for the duration (evaluation); the training values are put back exactly
        (kept on the host in their own dtype meanwhile)."""
        self.wait()
        saved = []
        with torch.no_grad():
            for es, ps in zip(self.ema, self.params):
                for e, (_, p) in zip(es, ps):
                    saved.append(p.detach().to("cpu", copy=True))
                    p.copy_(e)
        try:
            yield
        finally:
            with torch.no_grad():
                it = iter(saved)
                for ps in self.params:
                    for _, p in ps:
                        p.copy_(next(it))
