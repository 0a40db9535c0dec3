"""DualPipe and DualPipeV as megatron-core pipeline schedules: `forward_backward_dualpipe(v)` take the arguments of
megatron-core's `forward_backward_pipelining_*` and return what they return, and the model placement they need.

Design note.
  * One engine. The op lists are schedule.py's (`build_schedule`, `forward_only` in evaluation), performed by
    dualpipe.py's `_Step`; `_MegatronStep` only replaces how one chunk's forward is computed: megatron's contract
    `forward_step_func(data_iterator, model) -> (output, loss_func)`, with the stage input given through
    `model.set_input_tensor`, and megatron-core's own `forward_step_calc_loss` on a stream's last stage (loss
    normalisation, the MoE/MTP loss scales, the per-micro-batch loss dicts returned). `config.grad_scale_func`
    scales the loss as megatron's `backward_step` does.
  * Overlap (overlap=True, the default). A chunk whose model has Figure 4's sub-stages (`DSV3Model.supports_overlap`:
    a DeepSeekMoE layer, no full-layer recompute) runs its training forwards as `overlap_pieces` recorded by
    overlap.ChunkRun, so an FB op interleaves one micro-batch's forward with the other's backward, each all-to-all
    in flight while the other computes (dualpipe.py `forward_backward`); B, B(split_w) and W run the segments.
    megatron's contract is kept: forward_step_func is called once per micro-batch (it reads the data and calls the
    model as usual), but during that call the model's forward only records its arguments (`_Capture`) and returns
    an empty placeholder; the schedule then runs `overlap_pieces(same arguments)` and hands the real output to
    forward_step_calc_loss with the loss_func it got. So forward_step_func must return the model's output as it is
    (megatron-LM's and our trainer's do); a wrapper's dtype cast of the last stage's output (Float16Module) is
    repeated on the real one. Other chunks, and arguments forward() cannot split (packed sequences), run F then B.
  * Micro-batches. DualPipeV: one stream, micro-batch g enters at rank 0. DualPipe: micro-batches 0..M/2-1 enter
    at rank 0 (stream 0), M/2..M-1 at rank PP-1 (stream 1). A chunk's forwards of a stream come in order, so each
    data iterator is read through a tape: the forward of micro-batch g gets the g-th item, whichever chunk asks
    first; an iterator that was read advances by exactly num_microbatches per call, as under megatron-core's
    schedules (one read by nobody, e.g. None on middle stages, is never touched).
  * Placement (`chunk_placement`). DualPipeV: chunk 0 of rank r is model stage r, chunk 1 stage 2PP-1-r, the model
    cut into 2PP stages (DSV3Config.pipeline_layers); rank 0 holds the first stage (embedding) and the last
    (final norm, head, MTP). DualPipe: chunk 0 of rank r is stage r, chunk 1 stage PP-1-r, PP stages; ranks 0 and
    PP-1 both hold the first and the last stage. Wherever the last stage is, the first is on the same rank, so
    MTP uses that chunk's word embeddings (`shared_embedding`) instead of megatron's tied copy and its embedding
    group: nothing to all-reduce across ranks, and `finalize_model_grads` is called with that group switched off.
    A chunk's layers are numbered globally (`StageLayers`), so checkpoints are the sequential model's, whatever
    the schedule.
  * DualPipe's mirrored copies (stage s on rank s and on rank PP-1-s) see different micro-batches. After the
    step each pair exchanges its gradients (megatron DDP's `main_grad`, where the grads accumulate) and the
    routers' token counts and adds them (a + b on one side, b + a on the other: bit-identical), before
    `finalize_model_grads` reduces over data parallelism. The copies then take the same optimizer step and the
    same expert-bias update. The mirror copies (chunk 1) store their tensors as non-main replicas in checkpoints.
  * Not supported (refused): DDP's overlap_grad_reduce (the deferred W's would race the bucket reductions);
    variable sequence lengths; encoder-decoder models.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from megatron_dsv3.pipeline import overlap as _overlap
from megatron_dsv3.pipeline.comm import PipeComm
from megatron_dsv3.pipeline.dualpipe import _Step
from megatron_dsv3.pipeline.schedule import build_schedule, forward_only as forward_only_ops, layout

__all__ = ["forward_backward_dualpipe", "forward_backward_dualpipev", "get_forward_backward_func",
           "check_microbatches", "supports_overlap", "chunk_placement", "ChunkPlacement", "StageLayers",
           "DUALPIPE_SCHEDULES"]

DUALPIPE_SCHEDULES = ("dualpipe", "dualpipev")


# ---- placement ----------------------------------------------------------------------------------------------------
def check_microbatches(variant: str, pp_size: int, num_microbatches: int, what: str = "num_microbatches") -> None:
    """What the schedule needs of the micro-batch count, as a one-line error naming `what` (the flags)."""
    m = num_microbatches
    if variant == "dualpipe" and (m % 2 or m < 2 * pp_size):
        raise ValueError(f"--pipeline-schedule dualpipe needs an even number of micro-batches >= 2 x "
                         f"--pipeline-model-parallel-size ({2 * pp_size}; half enter at each end), got {what} = {m}")
    if variant == "dualpipev" and m < 2 * pp_size:
        raise ValueError(f"--pipeline-schedule dualpipev needs >= 2 x --pipeline-model-parallel-size "
                         f"({2 * pp_size}) micro-batches, got {what} = {m}")


@dataclass(frozen=True)
class StageLayers:
    """megatron-core's `pipeline_model_parallel_layout` seam, answering for one model chunk: it holds the decoder
    layers first .. first+count-1 of the whole model. megatron-core asks the layout (instead of its PP/VPP
    arithmetic) for a block's layer offset and size everywhere (TransformerBlock, TransformerLayer.layer_number,
    MTP, the sharded state dict), so one object per chunk places any stage on any rank."""
    first: int
    count: int

    def get_layer_offset(self, layer_type=None, vp_stage=None, pp_rank=None, **kw) -> int:
        return self.first

    def get_num_layers_to_build(self, layer_type=None, vp_stage=None, pp_rank=None, **kw) -> int:
        return self.count

    def get_layer_id_list(self, layer_type=None, vp_stage=None, pp_rank=None, **kw) -> List[int]:
        return list(range(self.first, self.first + self.count))


@dataclass(frozen=True)
class ChunkPlacement:
    stage: int            # model stage of this chunk (0 .. n_stages-1, in the model's order)
    n_stages: int
    pre_process: bool     # the embedding
    post_process: bool    # final norm, output head, MTP
    layers: StageLayers
    mirror: bool          # DualPipe's second copy of a stage (chunk 1): a non-main replica in checkpoints


def stage_of(variant: str, pp_rank: int, pp_size: int, chunk: int) -> int:
    if variant == "dualpipe":
        return (pp_rank, pp_size - 1 - pp_rank)[chunk]
    return (pp_rank, 2 * pp_size - 1 - pp_rank)[chunk]


def chunk_placement(cfg, pp_rank: int, chunk: int) -> ChunkPlacement:
    """Where chunk `chunk` (0 or 1) of pipeline rank `pp_rank` sits under cfg.parallel.pipeline_schedule."""
    par = cfg.parallel
    variant, pp = par.pipeline_schedule, par.pipeline_model_parallel_size
    if variant not in DUALPIPE_SCHEDULES:
        raise ValueError(f"chunk_placement is for pipeline_schedule dualpipe|dualpipev, got {variant!r}")
    sizes = cfg.pipeline_layers()                    # 2PP stages for DualPipeV, PP for DualPipe
    s = stage_of(variant, pp_rank, pp, chunk)
    return ChunkPlacement(stage=s, n_stages=len(sizes), pre_process=s == 0, post_process=s == len(sizes) - 1,
                          layers=StageLayers(sum(sizes[:s]), sizes[s]), mirror=variant == "dualpipe" and chunk == 1)


def build_chunks(cfg, build: Callable[..., nn.Module], pp_rank: int) -> List[nn.Module]:
    """The two chunks of `pp_rank`: build(pre_process=, post_process=, placement=, shared_embedding=) each. The
    chunk with the embedding is built first; the one with the head and MTP (on the same rank) shares it."""
    places = [chunk_placement(cfg, pp_rank, c) for c in (0, 1)]
    order = sorted((0, 1), key=lambda c: not places[c].pre_process)
    out: List[Optional[nn.Module]] = [None, None]
    embedding = None
    for c in order:
        p = places[c]
        out[c] = build(pre_process=p.pre_process, post_process=p.post_process, placement=p,
                       shared_embedding=embedding if p.post_process and not p.pre_process else None)
        if p.pre_process:
            embedding = _unwrap(out[c]).embedding
    return out


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


# ---- the schedule ---------------------------------------------------------------------------------------------------
class _Tape:
    """Items of one data iterator by micro-batch index, read on demand."""

    def __init__(self, it: Iterator):
        self.it, self.items = it, []

    def get(self, g: int):
        while len(self.items) <= g:
            self.items.append(next(self.it))
        return self.items[g]

    def finish(self, m: int) -> None:
        if self.items:
            self.get(m - 1)


class _Once:
    """The iterator forward_step_func gets for micro-batch g: next() is the tape's g-th item."""

    def __init__(self, tape: _Tape, g: int):
        self.tape, self.g = tape, g

    def __iter__(self):
        return self

    def __next__(self):
        return self.tape.get(self.g)


class _Params:
    """What the engine asks of a chunk in backward: its parameters, plus a shared embedding's (MTP's)."""

    def __init__(self, chunk: nn.Module, extra: Sequence[nn.Parameter]):
        self.chunk, self.extra = chunk, list(extra)

    def parameters(self):
        return list(self.chunk.parameters()) + self.extra


class _Capture:
    """While forward_step_func runs, the model's forward only records its arguments and returns an empty tensor;
    the computation then runs as the model's overlap pieces (module doc, "Overlap")."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.args: Optional[tuple] = None
        self.kwargs: Dict[str, Any] = {}
        p = next(model.parameters())
        self.placeholder = torch.empty(0, dtype=p.dtype, device=p.device)

    def _record(self, *args, **kwargs):
        if self.args is not None:
            raise RuntimeError("forward_step_func called the model twice in one micro-batch")
        self.args, self.kwargs = args, kwargs
        return self.placeholder

    def __enter__(self) -> "_Capture":
        self.model.forward = self._record          # an instance attribute: found before the class's forward
        return self

    def __exit__(self, *exc) -> None:
        del self.model.forward
        if exc[0] is None and self.args is None:
            raise RuntimeError("forward_step_func did not call the model")

    def like_returned(self, output: torch.Tensor, returned) -> torch.Tensor:
        """What a wrapper between the schedule and the model did to the placeholder's dtype (megatron's
        Float16Module: float32 on the last stage), done to the real output."""
        if (isinstance(returned, torch.Tensor) and returned.is_floating_point()
                and returned.dtype != self.placeholder.dtype):
            return output.to(returned.dtype)
        return output


class _MegatronStep(_Step):
    """_Step with megatron-core's forward contract (module doc)."""

    def __init__(self, *args, models, forward_step_func, tapes, config, num_microbatches, collect_non_loss_data,
                 first_mb_of_stream, overlap_chunks=(False, False), **kw):
        super().__init__(*args, **kw)
        self.models, self.forward_step_func, self.tapes = models, forward_step_func, tapes
        self.config, self.num_microbatches = config, num_microbatches
        self.collect_non_loss_data = collect_non_loss_data
        self.first_mb_of_stream = first_mb_of_stream
        self.overlap_chunks = [bool(o) and self.training for o in overlap_chunks]
        self.data_store: Dict[int, Any] = {}
        self.whole_b: set = set()            # last-stage B's run whole though the list splits them
        self.recomputing = [norm_recompute_layers(m) > 0 for m in models]
        self.num_tokens = torch.zeros((), dtype=torch.int)

    def _records(self, c: int) -> bool:
        return self.overlap_chunks[c]

    def _forward_steps(self, mb: int, c: int):
        """One chunk's forward of micro-batch mb; with overlap, a generator that yields after each all-to-all it
        posts (the FB pair interleaves it with the other micro-batch's backward)."""
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel.schedules import forward_step_calc_loss
        from megatron.core.utils import get_attr_wrapped_model

        g = self.first_mb_of_stream[self._stream(c)] + mb
        local = self._local_prev(c)
        if self._is_first(c):
            x = None
        elif local is not None:                  # DualPipeV's turn: the other chunk's output, on this rank
            outs = self.outputs[local][mb] if self.training else self.outputs[local].pop(mb)
            x = outs[0].detach()
        else:
            x = self.inputs[c].pop(mb)[0]
        if self.training:
            if x is not None:
                x.requires_grad_()
            self.inputs[c][mb] = [] if x is None else [x]
        model = self.models[c]
        get_attr_wrapped_model(model, "set_input_tensor")([x])
        tape = self.tapes[c]
        it = None if tape is None else _Once(tape, g)
        if self.overlap_chunks[c]:
            inner = _unwrap(model)
            with _Capture(inner) as cap:
                returned, loss_func = self.forward_step_func(it, model)
            pieces = inner.overlap_pieces(*cap.args, **cap.kwargs)
            if pieces is None:                   # arguments forward() cannot split (e.g. packed sequences)
                output = inner(*cap.args, **cap.kwargs)
            else:
                run = _overlap.ChunkRun(pieces, [] if x is None else [x])
                yield from run.forward()
                self.runs[(mb, c)] = run
                (output,) = run.outputs
            output = cap.like_returned(output, returned) if self._is_last(c) else output
        else:
            output, loss_func = self.forward_step_func(it, model)
            if not self._is_last(c) and output.dtype != self.dtype:
                # a wrapper that decides by the rank's real pipeline position (megatron's Float16Module: float32
                # outputs on the last pipeline rank) cast a middle chunk's hidden states: undo it (exact, bf16 ->
                # float32 -> bf16) so the P2P and the next chunk get the pipeline dtype
                output = output.to(self.dtype)
        last = self._is_last(c)
        store: List[Any] = []
        output, n_tokens = forward_step_calc_loss(
            model, output, loss_func, self.config, None, self.collect_non_loss_data, self.num_microbatches, store,
            cp_group_size=parallel_state.get_context_parallel_world_size(), is_last_stage=last)
        if not last:
            self.outputs[c][mb] = [output]
            return
        if store:
            self.data_store[g] = store[0]
        self.num_tokens += n_tokens.cpu().to(torch.int) if isinstance(n_tokens, torch.Tensor) else int(n_tokens)
        if self.training:
            if self.config.grad_scale_func is not None:       # as megatron-core's backward_step
                output = self.config.grad_scale_func(output)
            self.stage_losses[c][mb] = output
            self.outputs[c][mb] = None

    def backward(self, mb: int, c: int, split_w: bool) -> None:
        # the loss of a stream's last stage consumes its logits in place (cross_entropy.py on CUDA; megatron-core's
        # vocab-parallel cross entropy writes its saved softmax in place in backward), so that graph (head, MTP)
        # cannot be walked twice: its backward is never split, its W is a no-op. Neither is a micro-batch's chunk
        # that ran its plain forward while its layers recompute their norms (--recompute-norms): megatron-core's
        # CheckpointWithoutOutput hook refuses autograd.grad, which the split B uses (run as overlap pieces, the
        # norms are recomputed by overlap.py instead, which the split B can run)
        if split_w and (self._is_last(c) or (self.recomputing[c] and (mb, c) not in self.runs)):
            self.whole_b.add((mb, c))
            split_w = False
        super().backward(mb, c, split_w)

    def weight(self, mb: int, c: int) -> None:
        if (mb, c) in self.whole_b:
            self.whole_b.remove((mb, c))
            return
        super().weight(mb, c)


def norm_recompute_layers(model: nn.Module) -> int:
    """Layers of a chunk recomputing a norm with megatron-core's selective "layernorm" recompute
    (DSV3Config.recompute_norms): run through their plain forward, their B cannot be split (autograd.grad)."""
    return sum(1 for m in _unwrap(model).modules()
               if getattr(m, "recompute_pre_mlp_layernorm", False) or getattr(m, "recompute_input_layernorm", False))


def _say_once(models: Sequence[nn.Module], variant: str, overlapped: Sequence[bool]) -> None:
    """One line at the first step, never silently: what --recompute-norms costs this schedule where a chunk does
    not run as overlap pieces (overlap off, or a stage without MoE layers)."""
    inner = [_unwrap(m) for m in models]
    if any(getattr(m, "_dsv3_schedule_noted", False) for m in inner):
        return
    for m in inner:
        object.__setattr__(m, "_dsv3_schedule_noted", True)
    plain = [c for c, m in enumerate(models) if norm_recompute_layers(m) and not overlapped[c]]
    if plain and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        print(f"note: {variant} with --recompute-norms: chunks not run as overlap pieces (overlap off, or no MoE "
              f"layer) run their backward unsplit (no weight-gradient deferral: megatron-core's norm recompute "
              f"refuses autograd.grad)", flush=True)


def supports_overlap(model: nn.Module) -> bool:
    """Whether a chunk (megatron-wrapped or not) can run its training forwards as Figure 4's overlap pieces."""
    fn = getattr(_unwrap(model), "supports_overlap", None)
    return bool(fn is not None and fn() and hasattr(_unwrap(model), "overlap_pieces"))


class _NoGroup:
    """A process group of one: megatron-core's finalize_model_grads skips a reduction over it (get_pg_size 1)."""

    def size(self) -> int:
        return 1

    def rank(self) -> int:
        return 0


def _finalize_groups():
    """megatron-core's groups, without the embedding group (MTP shares the embedding on the same rank)."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    pgc = ProcessGroupCollection.use_mpu_process_groups()
    pgc.embd = _NoGroup()
    pgc.pos_embd = None
    return pgc


def _by_dtype(tensors: List[torch.Tensor]) -> List[Tuple[torch.dtype, List[torch.Tensor]]]:
    out: Dict[torch.dtype, List[torch.Tensor]] = {}
    for t in tensors:
        out.setdefault(t.dtype, []).append(t)
    return sorted(out.items(), key=lambda kv: str(kv[0]))


def _exchange_add(comm: PipeComm, peer: int, mine: List[List[torch.Tensor]], theirs: List[List[torch.Tensor]]):
    """For each i: tensors mine[i] go to `peer`, and the peer's mine[i] is added into our theirs[i] (the same
    tensors in the same order there). One batch, one flat message per (i, dtype)."""
    batch = comm.batch()
    received = []
    for send, recv in zip(mine, theirs):
        for _, ts in _by_dtype(send):
            batch.send([torch.cat([t.reshape(-1) for t in ts])], peer)
        for dt, ts in _by_dtype(recv):
            received.append((ts, batch.recv([(sum(t.numel() for t in ts),)], dt, peer)[0]))
    batch.commit()
    for targets, buf in received:
        for t, part in zip(targets, buf.split([t.numel() for t in targets])):
            t.add_(part.view_as(t))


def _grad_tensors(chunk: nn.Module) -> List[torch.Tensor]:
    out = []
    for p in chunk.parameters():
        if not p.requires_grad:
            continue
        g = getattr(p, "main_grad", None)
        if g is None:                             # a module without megatron DDP: plain .grad
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            g = p.grad
        out.append(g)
    return out


def _router_counts(chunk: nn.Module) -> List[torch.Tensor]:
    from megatron_dsv3.moe.router import routers_of
    return [r.tokens_per_expert for _, r in routers_of([chunk])]


def reduce_mirrored_copies(models: Sequence[nn.Module], comm: PipeComm, peer: int) -> None:
    """DualPipe: chunk c += the peer's chunk 1-c (the same stage), for the gradients and the routers' token
    counts of this step."""
    _exchange_add(comm, peer, [_grad_tensors(models[0]), _grad_tensors(models[1])],
                  [_grad_tensors(models[1]), _grad_tensors(models[0])])
    _exchange_add(comm, peer, [_router_counts(models[0]), _router_counts(models[1])],
                  [_router_counts(models[1]), _router_counts(models[0])])


def _forward_backward(variant: str, *, forward_step_func, data_iterator, model, num_microbatches: int,
                      seq_length: int, micro_batch_size: int, decoder_seq_length: Optional[int] = None,
                      forward_only: bool = False, collect_non_loss_data: bool = False,
                      first_val_step: Optional[bool] = None, adjust_tensor_shapes_fn=None, pg_collection=None,
                      overlap: bool = True, **unused) -> List[Any]:
    from megatron.core import parallel_state
    from megatron.core.utils import get_model_config

    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if len(models) != 2:
        raise ValueError(f"{variant}: model must be the rank's two chunks (megatron_dsv3.pipeline."
                         f"megatron_schedule.build_chunks), got {len(models)}")
    if adjust_tensor_shapes_fn is not None:
        raise ValueError(f"{variant}: adjust_tensor_shapes_fn is not supported")
    if any(getattr(getattr(m, "ddp_config", None), "overlap_grad_reduce", False) for m in models) and not forward_only:
        raise ValueError(f"{variant}: DDP overlap_grad_reduce is not supported (--overlap-grad-reduce)")
    config = get_model_config(models[0])
    if getattr(config, "variable_seq_lengths", False):
        raise ValueError(f"{variant}: variable_seq_lengths is not supported")
    pp_group = pg_collection.pp if pg_collection is not None else parallel_state.get_pipeline_model_parallel_group()
    device = next(p.device for m in models for p in m.parameters())
    comm = PipeComm(pp_group, None, device)
    rank, pp, m = comm.rank, comm.size, num_microbatches
    check_microbatches(variant, pp, m)
    lay = layout(variant, pp, m)
    ops = build_schedule(variant, rank, pp, m)
    if forward_only:
        ops = forward_only_ops(ops)

    tp = parallel_state.get_tensor_model_parallel_world_size()
    s = seq_length // tp if getattr(config, "sequence_parallel", False) else seq_length
    shapes = [(s // parallel_state.get_context_parallel_world_size(), micro_batch_size, config.hidden_size)]
    dtype = config.pipeline_dtype or config.params_dtype

    iters = data_iterator if isinstance(data_iterator, (list, tuple)) else [data_iterator, data_iterator]
    tape_of: Dict[int, _Tape] = {}
    tapes = [None if it is None else tape_of.setdefault(id(it), _Tape(it)) for it in iters]
    first_mb = [0, m // 2] if variant == "dualpipe" else [0]

    shared = []
    for c in (0, 1):                # MTP's embedding is the other chunk's: its gradient flows into that parameter
        inner = _unwrap(models[c])
        emb = getattr(inner, "_shared_embedding", None)
        shared.append([p for p in emb.parameters()] if emb is not None else [])
    holders = [_Params(models[c], shared[c]) for c in (0, 1)]

    step = _MegatronStep(lay, rank, holders, comm, shapes, dtype, not forward_only, {}, {},
                         criterion=forward_step_func, return_outputs=False, reduce_mirror_grads=False,
                         models=models, forward_step_func=forward_step_func, tapes=tapes, config=config,
                         num_microbatches=m, collect_non_loss_data=collect_non_loss_data, first_mb_of_stream=first_mb,
                         overlap_chunks=[overlap and not forward_only and supports_overlap(c) for c in models])
    if not forward_only:
        _say_once(models, variant, step.overlap_chunks)
    grad = nullcontext() if not forward_only else torch.no_grad()
    with grad:
        step.run(ops)
    for t in tape_of.values():
        t.finish(m)

    if not forward_only:
        if variant == "dualpipe":
            reduce_mirrored_copies(models, comm, pp - 1 - rank)
        if config.finalize_model_grads_func is not None:
            num_tokens = None
            if getattr(config, "calculate_per_token_loss", False):
                num_tokens = step.num_tokens.to(device)
                torch.distributed.all_reduce(num_tokens, group=pp_group)   # the losses sit on 1 or 2 ranks
            config.finalize_model_grads_func(models, num_tokens, pg_collection=_finalize_groups())
    return [step.data_store[g] for g in sorted(step.data_store)]


def forward_backward_dualpipe(**kwargs) -> List[Any]:
    """megatron-core forward_backward_func running DualPipe (model: [chunk 0 = stage r, chunk 1 = stage PP-1-r]);
    overlap=False: F then B in every FB op (module doc).
    Returns the loss dicts of the micro-batches whose stream ends on this rank (ranks 0 and PP-1), in order."""
    return _forward_backward("dualpipe", **kwargs)


def forward_backward_dualpipev(**kwargs) -> List[Any]:
    """megatron-core forward_backward_func running DualPipeV (model: [chunk 0 = stage r, chunk 1 = stage 2PP-1-r]);
    overlap=False: F then B in every FB op (module doc).
    Returns all micro-batches' loss dicts on rank 0 (where the V ends), [] elsewhere."""
    return _forward_backward("dualpipev", **kwargs)


def get_forward_backward_func(schedule: str = "1f1b"):
    """The forward_backward_func for a ParallelConfig.pipeline_schedule: ours for dualpipe|dualpipev, else
    megatron-core's (1F1B, interleaved with virtual stages, or no pipelining at PP 1)."""
    if schedule == "dualpipe":
        return forward_backward_dualpipe
    if schedule == "dualpipev":
        return forward_backward_dualpipev
    from megatron.core.pipeline_parallel import get_forward_backward_func as mcore
    return mcore()
