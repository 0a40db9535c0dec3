"""DualPipe and DualPipeV executors: drop-ins for deepseek-ai/DualPipe v1.0 that perform schedule.py's op lists.

Design note.
  * Schedule as data. `step()` asks `schedule.build_schedule` for this rank's ops (`schedule.forward_only` of them
    when autograd is off, as DeepSeek's `step()` under `torch.no_grad()`) and performs them in order; one engine
    (`_Step`) serves both variants, guided only by `Layout.routes` (where a chunk's input comes from, where its output
    goes, which chunk is a stream's first or last stage). The two classes differ only in which ranks feed data,
    labels and get results back, as DeepSeek's do.
  * Communication. A maximal run of Send*/Recv* ops between two compute ops is one `batch_isend_irecv`, posted when
    reached and waited for before the next compute op (schedule.py's semantics, DeepSeek's `_commit_and_wait_comm`).
    P2P goes through `comm.PipeComm`: explicit group, rank mapping, and the device of the modules' parameters; gloo
    and NCCL alike.
  * No shared mutable state. Everything a step needs lives in its `_Step` object; there is no WeightGradStore.
    `set_p2p_tensor_shapes` / `set_p2p_tensor_dtype` (module functions, DeepSeek's names) set the defaults that
    instances constructed AFTERWARDS copy; each instance also has methods of the same names, and constructor
    keywords, that set its own. Call the module functions before constructing (DeepSeek's examples do).
  * Zero-bubble backward split. B(split_w) computes only the gradient of the chunk's input,
    `torch.autograd.grad(outputs, inputs, output_grads, retain_graph=True)`; the graph (with what W needs) stays
    alive, and W(mb, chunk) later runs `torch.autograd.backward(outputs, output_grads, inputs=params)`, which
    accumulates into `.grad` through AccumulateGrad exactly as a plain backward does. A full B (and the B of an FB
    pair) is one `torch.autograd.backward` over inputs and parameters together. Works for any module, no custom
    autograd Functions. Cost: W traverses the chunk's graph again from its outputs down to the parameters, so on the
    input side it repeats part of B's work; capturing the gradients at the parameters' consumer nodes during B (as
    torch.distributed.pipelining's stage_backward_weight does) would make W only the weight GEMMs: a later step.
  * FB (the overlapped forward & backward pair): with `overlap` (the default) and chunks that expose sub-stages
    (overlap.py: LayerStack of DeepSeek-V3 MoE layers), every training forward of such a chunk is recorded segment
    by segment (overlap.ChunkRun), and FB interleaves the forward of one micro-batch with the backward of the other
    in Figure 4's order, each all-to-all in flight while the other micro-batch computes; B, B(split_w) and W of a
    recorded chunk run its segments in reverse. Other chunks (plain MLP stages), forward-only steps and
    overlap=False: F then B, one after the other.
  * DualPipe's two copies of each stage. `ReduceMirrorGrads(peer)` sends this rank's gradients of both chunks to the
    mirror rank PP-1-r and adds the mirror's: chunk 0 (stage r) += peer's chunk 1 (stage r), and vice versa. a + b
    == b + a in IEEE arithmetic, so both copies end bit-identical. Only this step's contribution is exchanged: a
    `.grad` already present when the step starts (gradient accumulation over steps) is set aside and added back
    after the exchange. It is opt-in (`DualPipe(..., reduce_mirror_grads=True)`): the default is DeepSeek's
    package's behaviour, whose `step()` leaves the mirrored copies unreduced and whose users sum them themselves
    (its example all-gathers the grads and adds the mirror's); a default True would make such ported code add the
    mirror twice. Our trainer and Megatron-LM do not use this class: megatron_schedule.py exchanges main_grad and
    the routers' token counts itself (reduce_mirrored_copies).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from megatron_dsv3.pipeline import overlap as _overlap
from megatron_dsv3.pipeline.comm import CommBatch, PipeComm
from megatron_dsv3.pipeline.schedule import (COMM_OPS, FB, B, F, Layout, Op, RecvActivation, RecvGrad,
                                             ReduceMirrorGrads, SendActivation, SendGrad, W, build_schedule,
                                             forward_only, layout)

__all__ = ["DualPipe", "DualPipeV", "set_p2p_tensor_shapes", "set_p2p_tensor_dtype"]

# DeepSeek-compatible defaults, copied by instances at construction (never read by a running step)
_compat_defaults: Dict[str, Any] = {"shapes": None, "dtype": None}


def set_p2p_tensor_shapes(shapes: Sequence[Tuple[int, ...]]) -> None:
    """Default shapes of the tensors passed between stages (one micro-batch), for instances constructed afterwards."""
    _compat_defaults["shapes"] = [tuple(s) for s in shapes]


def set_p2p_tensor_dtype(dtype: torch.dtype) -> None:
    """Default dtype of the tensors passed between stages, for instances constructed afterwards."""
    _compat_defaults["dtype"] = dtype


def _as_list(x) -> List[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def _scatter(tensors: Sequence[Optional[torch.Tensor]], n: int, dim: int) -> List[Tuple]:
    """n micro-batches of the given tensors (None stays None), split along dim as DeepSeek's `scatter`."""
    parts = [[None] * n if t is None else list(t.tensor_split(n, dim=dim)) for t in tensors]
    return [tuple(p[i] for p in parts) for i in range(n)]


def _gather(micro: List[List[torch.Tensor]], dim: int):
    out = tuple(torch.cat(ts, dim=dim) for ts in zip(*micro))
    return out[0] if len(out) == 1 else out


class _Step:
    """One step of one rank: performs `ops` on `modules` (chunk c = modules[c]) as placed by `lay`.

    data[s] / labels[s]: per micro-batch tuples for the streams that start / end on this rank. After `run()`,
    losses[s] / outputs[s] hold the results of the streams ending here.
    """

    def __init__(self, lay: Layout, rank: int, modules: Sequence[nn.Module], comm: PipeComm,
                 shapes: Sequence[Tuple[int, ...]], dtype: torch.dtype, training: bool,
                 data: Dict[int, List[Tuple]], labels: Dict[int, List[Tuple]], criterion: Optional[Callable],
                 return_outputs: bool, reduce_mirror_grads: bool, overlap: bool = False,
                 overlap_order: str = "figure4"):
        self.lay, self.rank, self.modules, self.comm = lay, rank, modules, comm
        # overlap.py's sub-stages of each chunk (None: F then B), and the recorded forwards awaiting their backward
        self.overlap_order = overlap_order
        self.pieces = [_overlap.overlap_pieces(m) if overlap and training else None for m in modules]
        self.runs: Dict[Tuple[int, int], _overlap.ChunkRun] = {}
        self.shapes, self.dtype, self.training = shapes, dtype, training
        self.data, self.labels, self.criterion = data, labels, criterion
        self.return_outputs, self.reduce_mirror_grads = return_outputs, reduce_mirror_grads
        n = len(modules)
        self.hops = [lay.hop(rank, c) for c in range(n)]                       # (stream, position)
        self.inputs: List[Dict[int, List[torch.Tensor]]] = [{} for _ in range(n)]
        self.outputs: List[Dict[int, List[torch.Tensor]]] = [{} for _ in range(n)]
        self.output_grads: List[Dict[int, List[torch.Tensor]]] = [{} for _ in range(n)]
        self.input_grads: List[Dict[int, List[torch.Tensor]]] = [{} for _ in range(n)]
        self.stage_losses: List[Dict[int, torch.Tensor]] = [{} for _ in range(n)]
        self.pending_w: Dict[Tuple[int, int], Tuple[List[torch.Tensor], List[Optional[torch.Tensor]]]] = {}
        self.losses: Dict[int, List[torch.Tensor]] = {}
        self.results: Dict[int, List[List[torch.Tensor]]] = {}

    # ---- where a chunk sits
    def _stream(self, c: int) -> int:
        return self.hops[c][0]

    def _is_first(self, c: int) -> bool:
        return self.hops[c][1] == 0

    def _is_last(self, c: int) -> bool:
        s, i = self.hops[c]
        return i == len(self.lay.routes[s]) - 1

    def _local_prev(self, c: int) -> Optional[int]:
        hop = self.lay.prev_hop(self.rank, c)
        return hop[1] if hop is not None and hop[0] == self.rank else None

    # ---- the loop
    def run(self, ops: Sequence[Op]) -> None:
        batch = self.comm.batch()
        for op in ops:
            if isinstance(op, COMM_OPS):
                self._post(batch, op)
                continue
            batch.commit()
            if isinstance(op, F):
                self.forward(op.mb, op.chunk)
            elif isinstance(op, B):
                self.backward(op.mb, op.chunk, op.split_w)
            elif isinstance(op, W):
                self.weight(op.mb, op.chunk)
            elif isinstance(op, FB):
                self.forward_backward(op.f_mb, op.f_chunk, op.b_mb, op.b_chunk)
            elif isinstance(op, ReduceMirrorGrads):
                if self.reduce_mirror_grads:
                    self.reduce_mirror(op.peer)
            else:
                raise TypeError(f"unknown op {op!r}")
        batch.commit()
        if self.pending_w:
            raise RuntimeError(f"rank {self.rank}: W never run for {sorted(self.pending_w)}")

    def _post(self, batch: CommBatch, op: Op) -> None:
        c, mb = op.chunk, op.mb
        if isinstance(op, SendActivation):
            tensors = self.outputs[c][mb]
            if not self.training:
                del self.outputs[c][mb]          # forward-only: nothing else reads it
            self._check_shapes(tensors, op)
            batch.send(tensors, op.peer)
        elif isinstance(op, RecvActivation):
            self.inputs[c][mb] = batch.recv(self.shapes, self.dtype, op.peer)
        elif isinstance(op, SendGrad):
            batch.send(self.input_grads[c].pop(mb), op.peer)
        else:
            assert isinstance(op, RecvGrad)
            self.output_grads[c][mb] = batch.recv(self.shapes, self.dtype, op.peer)

    def _check_shapes(self, tensors: List[torch.Tensor], op: Op) -> None:
        got = [tuple(t.shape) for t in tensors]
        if got != [tuple(s) for s in self.shapes] or any(t.dtype != self.dtype for t in tensors):
            raise ValueError(f"rank {self.rank}: chunk {op.chunk} of micro-batch {op.mb} sends shapes {got} "
                             f"({[t.dtype for t in tensors]}), but the p2p tensor shapes/dtype are "
                             f"{self.shapes} ({self.dtype}): set_p2p_tensor_shapes / set_p2p_tensor_dtype")

    # ---- compute
    def forward(self, mb: int, c: int) -> None:
        for _ in self._forward_steps(mb, c):
            pass

    def _forward_steps(self, mb: int, c: int):
        """forward() as a generator: yields after each all-to-all it posts (a chunk recorded by overlap.py)."""
        s = self._stream(c)
        local = self._local_prev(c)
        if self._is_first(c):
            inputs = [t.to(self.comm.device) if isinstance(t, torch.Tensor) else t for t in self.data[s][mb]]
        elif local is not None:                   # DualPipeV's turn: the other chunk's output, on this rank
            outs = self.outputs[local][mb] if self.training else self.outputs[local].pop(mb)
            inputs = [t.detach() for t in outs]
        else:
            inputs = self.inputs[c].pop(mb)
        if self.training:
            inputs = [t.requires_grad_() if (not self._is_first(c) and isinstance(t, torch.Tensor)
                                             and t.is_floating_point()) else t for t in inputs]
            self.inputs[c][mb] = inputs
        if self.pieces[c] is not None:
            run = _overlap.ChunkRun(self.pieces[c], inputs)
            yield from run.forward()
            self.runs[(mb, c)] = run
            outputs = list(run.outputs)
        else:
            outputs = _as_list(self.modules[c](*inputs))
        if self._is_last(c):
            if self.criterion is not None:
                self.stage_losses[c][mb] = self.criterion(*outputs, *self.labels[s][mb])
            if self.return_outputs:
                self.results.setdefault(s, {})[mb] = [o.detach() for o in outputs]
            if self.training:
                self.outputs[c][mb] = outputs if self.criterion is None else None
        else:
            self.outputs[c][mb] = outputs

    def _roots(self, mb: int, c: int) -> Tuple[List[torch.Tensor], List[Optional[torch.Tensor]]]:
        """What the backward of (mb, c) starts from: the loss on a stream's last stage, else outputs and their grads."""
        if self._is_last(c):
            if self.criterion is None:
                raise ValueError("training needs a criterion on the ranks holding a stream's last stage")
            self.outputs[c].pop(mb)
            return [self.stage_losses[c][mb]], [None]
        outputs = self.outputs[c].pop(mb)
        grads = self.output_grads[c].pop(mb)
        pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
        return [o for o, _ in pairs], [g for _, g in pairs]

    def backward(self, mb: int, c: int, split_w: bool) -> None:
        for _ in self._backward_steps(mb, c, split_w):
            pass

    def _backward_steps(self, mb: int, c: int, split_w: bool):
        """backward() as a generator: yields after each reverse all-to-all it posts (a chunk recorded by overlap.py)."""
        roots, grads = self._roots(mb, c)
        inputs = self.inputs[c].pop(mb)
        xs = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
        run = self.runs.pop((mb, c), None)
        if run is not None:      # segment by segment; the inputs' gradients land in x.grad either way
            for x in xs:
                x.grad = None
            yield from run.backward(roots, grads, split_w)
            if split_w:
                self.pending_w[(mb, c)] = run
            gx = [x.grad for x in xs]
        elif split_w:
            # backward for input only; the retained graph is what W needs
            gx = torch.autograd.grad(roots, xs, grads, retain_graph=True, allow_unused=True) if xs else ()
            self.pending_w[(mb, c)] = (roots, grads)
        else:
            for x in xs:
                x.grad = None
            # no inputs=: the chunk's inputs are detached leaves, so its graph reaches only them and its (and a
            # shared embedding's) parameters; and a recompute hook that refuses autograd.grad / inputs= (megatron-
            # core's CheckpointWithoutOutput, --recompute-norms) runs here
            torch.autograd.backward(roots, grads)
            gx = [x.grad for x in xs]
        if self._is_last(c):
            self.stage_losses[c][mb] = self.stage_losses[c][mb].detach()
        if self._is_first(c):
            return
        it = iter(gx)
        dx = []
        for t in inputs:
            g = next(it) if isinstance(t, torch.Tensor) and t.requires_grad else None
            dx.append(torch.zeros_like(t) if g is None else g)
        local = self._local_prev(c)
        if local is not None:
            self.output_grads[local][mb] = dx
        else:
            self.input_grads[c][mb] = dx

    def weight(self, mb: int, c: int) -> None:
        pending = self.pending_w.pop((mb, c))
        params = [p for p in self.modules[c].parameters() if p.requires_grad]
        if isinstance(pending, _overlap.ChunkRun):
            pending.weight(params)
            return
        roots, grads = pending
        if params:
            torch.autograd.backward(roots, grads, inputs=params)

    def _records(self, c: int) -> bool:
        """Whether chunk c's training forwards are recorded segment by segment (overlap.ChunkRun)."""
        return self.pieces[c] is not None

    def forward_backward(self, f_mb: int, f_chunk: int, b_mb: int, b_chunk: int) -> None:
        """F(f_mb, f_chunk) and B(b_mb, b_chunk). Overlapped (paper Figure 4, overlap.py) when either side is a
        recorded chunk: each side runs until it has posted an all-to-all, then the other, the backward first. Else
        F then B (through forward()/backward(), which a subclass may replace)."""
        if self.training and (self._records(f_chunk) or (b_mb, b_chunk) in self.runs):
            _overlap.run_interleaved(self._forward_steps(f_mb, f_chunk),
                                     self._backward_steps(b_mb, b_chunk, split_w=False), self.overlap_order)
            return
        self.forward(f_mb, f_chunk)
        if self.training:
            self.backward(b_mb, b_chunk, split_w=False)

    def reduce_mirror(self, peer: int) -> None:
        """Chunk c's gradients += the peer's chunk 1-c gradients (the same stage): one flat message per chunk and
        dtype each way. Both sides add the same two numbers, so the copies stay bit-identical."""
        def groups(c):  # [(dtype, params of chunk c in parameters() order)]
            out: Dict[torch.dtype, List[nn.Parameter]] = {}
            for p in self.modules[c].parameters():
                if p.requires_grad:
                    out.setdefault(p.dtype, []).append(p)
            return sorted(out.items(), key=lambda kv: str(kv[0]))

        batch = self.comm.batch()
        received = []
        for c in (0, 1):
            for _, ps in groups(c):
                batch.send([torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                       for p in ps])], peer)
            for dt, ps in groups(1 - c):     # the peer's chunk c is our chunk 1-c
                received.append((ps, batch.recv([(sum(p.numel() for p in ps),)], dt, peer)[0]))
        batch.commit()
        for ps, buf in received:
            for p, part in zip(ps, buf.split([p.numel() for p in ps])):
                part = part.view_as(p)
                if p.grad is None:
                    p.grad = part.clone()
                else:
                    p.grad.add_(part)

    def finish(self) -> None:
        for s in range(len(self.lay.routes)):
            for c, (cs, _) in enumerate(self.hops):
                if cs == s and self._is_last(c):
                    if self.criterion is not None:
                        self.losses[s] = [self.stage_losses[c][mb].detach()
                                          for mb in range(self.lay.microbatches[s])]


class _Engine:
    """What DualPipe and DualPipeV share: modules, communication, p2p shapes, grad bookkeeping, running a step."""

    def __init__(self, variant: str, modules: Sequence[nn.Module], batch_dim: int,
                 process_group: Optional[dist.ProcessGroup], rank_mapping: Optional[Sequence[int]],
                 p2p_tensor_shapes, p2p_tensor_dtype, reduce_mirror_grads: bool, overlap: bool = True):
        if len(modules) != 2:
            raise ValueError(f"{variant}: expected two modules (the rank's two chunks), got {len(modules)}")
        params = [p for m in modules for p in m.parameters()]
        if not params:
            raise ValueError(f"{variant}: the modules have no parameters to take the device from")
        self.variant = variant
        self.modules = modules
        self.batch_dim = batch_dim
        self.comm = PipeComm(process_group, rank_mapping, params[0].device)
        shapes = p2p_tensor_shapes if p2p_tensor_shapes is not None else _compat_defaults["shapes"]
        self.shapes = None if shapes is None else [tuple(s) for s in shapes]
        self.dtype = p2p_tensor_dtype if p2p_tensor_dtype is not None else _compat_defaults["dtype"]
        self.reduce_mirror_grads = reduce_mirror_grads
        self.overlap = overlap

    @property
    def pp_size(self) -> int:
        return self.comm.size

    @property
    def rank(self) -> int:
        return self.comm.rank

    def schedule(self, num_chunks: int, training: bool) -> List[Op]:
        """This rank's op list for a step of num_chunks micro-batches (the forward-only list when not training)."""
        ops = build_schedule(self.variant, self.rank, self.pp_size, num_chunks)
        return ops if training else forward_only(ops)

    def run(self, num_chunks: int, data: Dict[int, List[Tuple]], labels: Dict[int, List[Tuple]],
            criterion: Optional[Callable], return_outputs: bool, ops: List[Op]) -> _Step:
        if self.shapes is None or self.dtype is None:
            raise ValueError("p2p tensor shapes and dtype are unset: call set_p2p_tensor_shapes and "
                             "set_p2p_tensor_dtype before constructing, or the instance's methods of those names")
        training = torch.is_grad_enabled()
        lay = layout(self.variant, self.pp_size, num_chunks)
        step = _Step(lay, self.rank, self.modules, self.comm, self.shapes, self.dtype, training, data, labels,
                     criterion, return_outputs, self.reduce_mirror_grads, overlap=self.overlap)
        mirrored = training and self.reduce_mirror_grads and any(isinstance(o, ReduceMirrorGrads) for o in ops)
        params = [p for m in self.modules for p in m.parameters() if p.requires_grad]
        carried = {}
        if mirrored:   # exchange this step's gradients only; earlier ones are added back afterwards
            for p in params:
                if p.grad is not None:
                    carried[p], p.grad = p.grad, None
        try:
            step.run(ops)
        finally:
            for p, g in carried.items():
                if p.grad is not None:
                    g.add_(p.grad)
                p.grad = g
        step.finish()
        return step


class DualPipe(nn.Module):
    """DeepSeek's DualPipe: rank r holds modules[0] = stage r and modules[1] = stage PP-1-r (two copies of each
    stage across the pipeline); half the micro-batches enter at rank 0 and half at rank PP-1.

    step(*inputs, num_chunks, criterion, labels, return_outputs) as DeepSeek's: inputs on the first and last ranks
    (the first rank's feed the forward stream, the last rank's the reverse one), labels there too, crossed: the first
    rank's labels belong to the last rank's inputs and vice versa. Returns (loss, outputs): the stacked per-micro-batch
    losses (and the outputs, concatenated along batch_dim) of the stream that ENDS on this rank (first rank: the last
    rank's inputs); (None, None) on the other ranks. Forward-only when autograd is disabled (torch.no_grad()).
    The mirrored copies' gradients: as DeepSeek's, left unreduced by step() (the caller sums stage s's copies on
    ranks s and PP-1-s, as DeepSeek's example does); reduce_mirror_grads=True makes step() sum them (exchanged
    with the mirror rank, both copies bit-identical), for code that does not. Default False so that code ported
    from DeepSeek's package, which does its own sum, is not summed twice.
    overlap: interleave each forward&backward pair as the paper's Figure 4 where the chunks expose sub-stages
    (pipeline/overlap.py; e.g. a LayerStack of DeepSeek-V3 MoE layers); other chunks run F then B either way.
    """

    def __init__(self, modules: Tuple[nn.Module, nn.Module], batch_dim: int = 0,
                 process_group: Optional[dist.ProcessGroup] = None, rank_mapping: Optional[List[int]] = None, *,
                 p2p_tensor_shapes: Optional[Sequence[Tuple[int, ...]]] = None,
                 p2p_tensor_dtype: Optional[torch.dtype] = None, reduce_mirror_grads: bool = False,
                 overlap: bool = True):
        super().__init__()
        self.module = nn.ModuleList(modules)
        self._engine = _Engine("dualpipe", self.module, batch_dim, process_group, rank_mapping, p2p_tensor_shapes,
                               p2p_tensor_dtype, reduce_mirror_grads, overlap)
        if self._engine.pp_size % 2:
            raise ValueError(f"DualPipe needs an even number of ranks, got {self._engine.pp_size}")

    def set_p2p_tensor_shapes(self, shapes: Sequence[Tuple[int, ...]]) -> None:
        self._engine.shapes = [tuple(s) for s in shapes]

    def set_p2p_tensor_dtype(self, dtype: torch.dtype) -> None:
        self._engine.dtype = dtype

    def schedule(self, num_chunks: int, training: bool = True) -> List[Op]:
        return self._engine.schedule(num_chunks, training)

    def step(self, *inputs: Optional[torch.Tensor], num_chunks: int = 0, criterion: Optional[Callable] = None,
             labels: Sequence[Optional[torch.Tensor]] = (), return_outputs: bool = False):
        eng = self._engine
        p = eng.pp_size
        first, last = eng.rank == 0, eng.rank == p - 1
        training = torch.is_grad_enabled()
        if training and (first or last) and criterion is None:
            raise ValueError("DualPipe.step: training needs a criterion on the first and last ranks")
        ops = self.schedule(num_chunks, training)     # validates num_chunks
        half = num_chunks // 2
        data, labs = {}, {}
        if first:
            data[0], labs[1] = _scatter(inputs, half, eng.batch_dim), _scatter(labels, half, eng.batch_dim)
        if last:
            data[1], labs[0] = _scatter(inputs, half, eng.batch_dim), _scatter(labels, half, eng.batch_dim)
        st = eng.run(num_chunks, data, labs, criterion, return_outputs, ops)
        if not (first or last):
            return None, None
        ends_here = 1 if first else 0
        loss = torch.stack(st.losses[ends_here]) if criterion is not None else None
        outputs = None
        if return_outputs:
            outputs = _gather([st.results[ends_here][mb] for mb in range(half)], eng.batch_dim)
        return loss, outputs


class DualPipeV(nn.Module):
    """DeepSeek's DualPipeV ("cut-in-half" DualPipe): rank r holds modules[0] = stage r and modules[1] = stage
    2*PP-1-r; all micro-batches enter at rank 0 and their loss is computed there (the V turns at rank PP-1).

    step(*inputs, num_chunks, criterion, labels, return_outputs) as DeepSeek's: inputs, labels and criterion on the
    first rank only, which gets (loss, outputs) back; (None, None) elsewhere. Forward-only under torch.no_grad().
    overlap: as DualPipe's.
    """

    def __init__(self, modules: Tuple[nn.Module, nn.Module], batch_dim: int = 0,
                 process_group: Optional[dist.ProcessGroup] = None, rank_mapping: Optional[List[int]] = None, *,
                 p2p_tensor_shapes: Optional[Sequence[Tuple[int, ...]]] = None,
                 p2p_tensor_dtype: Optional[torch.dtype] = None, overlap: bool = True):
        super().__init__()
        self.module = nn.ModuleList(modules)
        self._engine = _Engine("dualpipev", self.module, batch_dim, process_group, rank_mapping, p2p_tensor_shapes,
                               p2p_tensor_dtype, reduce_mirror_grads=False, overlap=overlap)

    def set_p2p_tensor_shapes(self, shapes: Sequence[Tuple[int, ...]]) -> None:
        self._engine.shapes = [tuple(s) for s in shapes]

    def set_p2p_tensor_dtype(self, dtype: torch.dtype) -> None:
        self._engine.dtype = dtype

    def schedule(self, num_chunks: int, training: bool = True) -> List[Op]:
        return self._engine.schedule(num_chunks, training)

    def step(self, *inputs: Optional[torch.Tensor], num_chunks: int = 0, criterion: Optional[Callable] = None,
             labels: Sequence[Optional[torch.Tensor]] = (), return_outputs: bool = False):
        eng = self._engine
        first = eng.rank == 0
        training = torch.is_grad_enabled()
        if training and first and criterion is None:
            raise ValueError("DualPipeV.step: training needs a criterion on the first rank")
        ops = self.schedule(num_chunks, training)
        data, labs = {}, {}
        if first:
            data[0], labs[0] = _scatter(inputs, num_chunks, eng.batch_dim), _scatter(labels, num_chunks, eng.batch_dim)
        st = eng.run(num_chunks, data, labs, criterion, return_outputs, ops)
        if not first:
            return None, None
        loss = torch.stack(st.losses[0]) if criterion is not None else None
        outputs = None
        if return_outputs:
            outputs = _gather([st.results[0][mb] for mb in range(num_chunks)], eng.batch_dim)
        return loss, outputs
