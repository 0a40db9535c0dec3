"""Computation-communication overlap inside DualPipe's forward & backward pair (DeepSeek-V3 section 3.2.1, Figure 4).

Design note.
  * Sub-stages. A layer that exposes `LayerStages` runs as the paper's four pieces: ATTENTION (norms, MLA, residual,
    router, dispatch plan), DISPATCH (permute + all-to-all of the rows and their gates), MLP (routed experts on the
    received rows, gate-scaled, + the shared expert), COMBINE (all-to-all back + unpermute, a plain sum), then a
    small OUTPUT (shared + routed + residual).
    Our DeepSeek-V3 layer (megatron-core's TransformerLayer with MLA and DeepSeekMoE) provides them through the MoE
    seams (`DSV3LayerStages`); any other layer is one opaque compute piece.
  * Autograd segments. Every tensor crossing from one piece to the next is detached into a fresh leaf; an
    all-to-all is cut between its post and its wait (`Pending.cut`). So each segment's backward is its own
    `torch.autograd.backward(roots, leaf grads)` call and can be scheduled anywhere after the later segments'. The
    backward of a wait posts the reverse all-to-all (moe/dispatch.py `_Wait`), the backward of a post waits for it.
  * The pair. `ChunkRun.forward()` and `ChunkRun.backward()` are generators that yield right after posting a
    communication; `run_interleaved` alternates them, the backward first, which gives Figure 4's order for a
    forward layer i (micro-batch A) against a backward layer j (micro-batch B):

        compute  | B: out/combine-recv | A: ATTN | B: MLP   | A: MLP   | B: ATTN  | A: out, next ATTN ...
        comm     |        COMBINE(B) ->| DISPATCH(F) ->| DISPATCH(B) ->| COMBINE(F) ->| COMBINE(B, j-1) ...

    Each handle is waited at the start of the segment that reads it, i.e. after the other micro-batch has computed
    one piece: one micro-batch's all-to-all runs behind the other's computation. A chunk without any LayerStages
    (plain MLP stages) is not run here: dualpipe.py does F then B.
  * Zero-bubble split. backward(split_w=True) computes per segment the gradients of its input leaves only
    (`autograd.grad`, graph retained); weight() then runs each compute segment's backward for the parameters. The
    communication halves hold no parameters (LayerStages contract), so W never re-enters an all-to-all.
  * Norm recompute (section 3.2.2; DSV3Config.recompute_norms, megatron-core's selective "layernorm" recompute).
    megatron-core's CheckpointWithoutOutput refills a discarded norm output from a hook that refuses
    `autograd.grad` and `backward(inputs=)`, which the split backward uses. So while a layer with those flags runs
    as pieces, `_NormRecompute` turns its flags off and puts its norms behind `_NormFn` (y = norm(x) without a
    graph, only x kept; backward recomputes norm(x) and differentiates it), and a saved-tensors hook replaces every
    tensor autograd would keep that shares y's storage (the MLA down-projections', router's and shared expert's
    inputs, views included) by a recipe: recompute norm(x) without a graph (bit-identical: the same call) and
    rebuild the view. The pre-MLP norm output also crosses cuts (the shared expert and the dispatch read it), so its
    storage is freed once the MLP piece has read it; the segments keep it as an autograd handle only.
  * Devices. CPU: gloo's async work runs on its own threads while this thread computes. GPU (not run here): NCCL
    runs async_op collectives on ProcessGroupNCCL's own stream, and `Work.wait()` makes the current (compute) stream
    wait for it without blocking the host, so the host order above is the stream order. Each post is issued right
    after the segment that produces its input, so the NCCL stream waits for exactly that compute and nothing that
    the other micro-batch enqueues later. The one host sync per MoE layer is DispatchPlan's split sizes (inside
    ATTENTION): on GPU it drains the compute stream there (a launch gap, not a communication wait).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Protocol, Sequence, runtime_checkable

import weakref
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn

__all__ = ["LayerStages", "DSV3LayerStages", "LayerStack", "ChunkRun", "run_interleaved", "overlap_pieces",
           "layer_stages", "layer_piece", "ORDERS"]

# the order in which the two sides of a pair start: Figure 4 (backward first), forward first, or no overlap at all
ORDERS = ("figure4", "forward_first", "sequential")


@runtime_checkable
class LayerStages(Protocol):
    """One layer as Figure 4's sub-stages. `state` holds plain tensors (the executor's detached leaves) and
    non-tensor metadata; each method returns new entries or a Pending (moe/dispatch.py) whose wait() gives a tensor
    or a tuple of tensors (the dispatched rows and their gates; a list of leaves once cut). The executor names the
    waited results "dispatched" and "combined". dispatch() and combine(), and what their wait() runs, must hold no
    parameters (weight-gradient deferral skips them)."""

    def attention(self, state: Dict[str, Any]) -> Dict[str, Any]: ...   # state["hidden"] -> entries
    def dispatch(self, state: Dict[str, Any]): ...                      # -> Pending: rows for this rank's experts
    def mlp(self, state: Dict[str, Any]) -> Dict[str, Any]: ...         # state["dispatched"] -> entries
    def combine(self, state: Dict[str, Any]): ...                       # -> Pending: expert outputs at their tokens
    def output(self, state: Dict[str, Any]) -> torch.Tensor: ...        # state["combined"] -> the layer output


# ---- section 3.2.2's norm recompute, in a form the split backward can run -----------------------------------
_NORM_FLAGS = (("recompute_input_layernorm", "input_layernorm"), ("recompute_pre_mlp_layernorm", "pre_mlp_layernorm"))


class _NormFn(torch.autograd.Function):
    """y = norm(x) without a graph; keeps x only. Backward recomputes norm(x) with a graph and returns the
    gradients of x and the norm's parameters (so autograd.grad and backward(inputs=) route them as usual)."""

    @staticmethod
    def forward(ctx, norm, x, *params):
        ctx.norm, ctx.params = norm, params
        ctx.save_for_backward(x)
        return norm(x)                                      # grad mode is off in a Function's forward

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        need = ctx.needs_input_grad[1:]
        with torch.enable_grad():
            xr = x.detach().requires_grad_(need[0])
            wanted = [t for t, n in zip((xr,) + ctx.params, need) if n]
            got = iter(torch.autograd.grad(ctx.norm(xr), wanted, grad, allow_unused=True) if wanted else ())
        return (None,) + tuple(next(got) if n else None for n in need)


class _Recipe:
    """What a saved view of a norm output is replaced by: the norm, its input, and the view's geometry."""
    __slots__ = ("norm", "x", "x_version", "size", "stride", "offset")

    def __init__(self, norm, x, x_version, t):
        self.norm, self.x, self.x_version = norm, x, x_version
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()

    def rebuild(self) -> torch.Tensor:
        if self.x._version != self.x_version:
            raise RuntimeError("a recomputed norm's input was modified in place between forward and backward")
        with torch.no_grad():
            y = self.norm(self.x)                           # the forward's call (_NormFn), so the same bits
        return y.as_strided(self.size, self.stride, self.offset)


class _RecomputedNorm(nn.Module):
    """Stands in for a layer's norm module while its pieces run (an nn.Module: megatron-core 0.19 checks)."""

    def __init__(self, norm: nn.Module, owner: "_NormRecompute"):
        super().__init__()
        object.__setattr__(self, "norm", norm)              # not a submodule: the layer's names stay its own
        object.__setattr__(self, "owner", owner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NormFn.apply(self.norm, x, *self.norm.parameters())
        self.owner.register(y, self.norm, x)
        return y


class _NormRecompute:
    """A layer's norm outputs kept out of autograd's saved tensors (module doc, "Norm recompute"). Outputs are
    recognised by storage (data pointer) while the output tensor itself lives (a weak reference: a freed
    storage's address may be reused)."""

    def __init__(self, layer: nn.Module, flags):
        self.layer, self.flags = layer, list(flags)
        self.stand_ins = {name: _RecomputedNorm(getattr(layer, name), self) for _, name in self.flags}
        self.outputs: Dict[int, tuple] = {}                 # storage address -> (weakref(y), version, norm, x, x_version)

    @classmethod
    def of(cls, layer: nn.Module) -> Optional["_NormRecompute"]:
        flags = [(f, n) for f, n in _NORM_FLAGS if getattr(layer, f, False)]
        return cls(layer, flags) if flags else None

    def register(self, y: torch.Tensor, norm, x: torch.Tensor) -> None:
        if y.is_contiguous() and y.storage_offset() == 0 and y.untyped_storage().nbytes() > 0:
            self.outputs[y.untyped_storage().data_ptr()] = (weakref.ref(y), y._version, norm, x, x._version)

    def _pack(self, t: torch.Tensor):
        try:
            entry = self.outputs.get(t.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):      # tensors without a storage
            return t
        if entry is None:
            return t
        y = entry[0]()
        if y is None or t.dtype != y.dtype or t._version != entry[1]:
            return t
        return _Recipe(entry[2], entry[3], entry[4], t)

    @staticmethod
    def _unpack(packed):
        return packed.rebuild() if isinstance(packed, _Recipe) else packed

    @contextmanager
    def active(self):
        """While the layer's pieces run: megatron-core's flags off, the norms behind _NormFn, the hook on."""
        modules = self.layer._modules
        for flag, name in self.flags:
            modules[name] = self.stand_ins[name]
            setattr(self.layer, flag, False)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            for flag, name in self.flags:
                modules[name] = self.stand_ins[name].norm
                setattr(self.layer, flag, True)
            self.outputs = {k: e for k, e in self.outputs.items() if e[0]() is not None}

    def release(self, y: torch.Tensor) -> None:
        """Frees a norm output that the cuts still reference (every saved copy of it is a recipe)."""
        key = y.untyped_storage().data_ptr()
        if key in self.outputs:
            del self.outputs[key]
            y.untyped_storage().resize_(0)


class DSV3LayerStages:
    """megatron-core's TransformerLayer (our MLA as self_attention, DeepSeekMoE as mlp) as LayerStages: the same
    calls as TransformerLayer.forward -> DeepSeekMoE.forward, cut at the MoE seams. With megatron-core's norm
    recompute flags, the norms are recomputed by _NormRecompute instead (module doc)."""

    def __init__(self, layer: nn.Module, **layer_kwargs):
        # layer_kwargs: what TransformerBlock passes every layer of this forward (attention_mask, rotary_pos_emb)
        self.layer, self.moe, self.kwargs = layer, layer.mlp, layer_kwargs
        self.norms = _NormRecompute.of(layer)

    def _recompute(self):
        return nullcontext() if self.norms is None else self.norms.active()

    def attention(self, state):
        with self._recompute():
            h1, _ = self.layer._forward_attention(state["hidden"], **self.kwargs)   # input norm, MLA, residual
            u = self.layer.pre_mlp_layernorm(h1)                               # [s, b, h]
            x, topk_idx, gates = self.moe.route(u)                             # [T', h], [T', k], [T', k]
        return {"residual": h1, "normed": u, "tokens": x, "gates": gates, "plan": self.moe.plan(topk_idx)}

    def dispatch(self, state):
        with self._recompute():
            return self.moe.dispatch(state["tokens"], state["plan"], state["gates"], async_op=True)

    def mlp(self, state):
        with self._recompute():
            out = {"routed": self.moe.compute_experts(state["dispatched"], state["plan"]),
                   "shared": self.moe.shared(state["normed"])}
        if self.norms is not None:                         # the last read of u (and of its view, the tokens)
            self.norms.release(state["normed"])
        return out

    def combine(self, state):
        return self.moe.combine(state["routed"], state["plan"], async_op=True)

    def output(self, state):
        out = self.moe.finish(state["combined"], state["shared"], state["normed"].shape)
        with self._recompute():                            # _forward_post_mlp with the flags off
            return self.layer._forward_post_mlp((out, None), state["residual"])


def layer_stages(layer: nn.Module, **layer_kwargs) -> Optional[LayerStages]:
    """The sub-stages of a layer: its own `overlap_stages(**layer_kwargs)`, ours for a TransformerLayer whose mlp is
    DeepSeekMoE, else None (the layer runs as one piece). Layers with megatron-core options that reach across the
    cut (MLP recompute, activation offloading) are not split; the norms' selective recompute is done our way.
    layer_kwargs: the layer's forward arguments besides the hidden states (attention_mask, rotary_pos_emb)."""
    own = getattr(layer, "overlap_stages", None)
    if own is not None:
        return own(**layer_kwargs)
    from megatron_dsv3.moe.layer import DeepSeekMoE
    mlp = getattr(layer, "mlp", None)
    if not (isinstance(mlp, DeepSeekMoE) and hasattr(layer, "_forward_attention")
            and hasattr(layer, "_forward_post_mlp")):
        return None
    if any(getattr(layer, flag, False) for flag in ("recompute_mlp", "offload_attn_norm", "offload_mlp_norm")):
        return None
    return DSV3LayerStages(layer, **layer_kwargs)


class _Whole:
    """A layer without sub-stages: one compute piece (megatron-core layers return (hidden, context)). As a piece
    (recompute=True), a layer with megatron-core's norm recompute flags recomputes them our way (module doc)."""

    def __init__(self, layer: nn.Module, recompute: bool = False, **layer_kwargs):
        self.layer, self.kwargs = layer, layer_kwargs
        self.norms = _NormRecompute.of(layer) if recompute else None

    def __call__(self, *inputs):
        with nullcontext() if self.norms is None else self.norms.active():
            out = self.layer(*inputs, **self.kwargs)
        return out[0] if isinstance(out, tuple) and len(out) == 2 and not isinstance(out[1], torch.Tensor) else out


def layer_piece(layer: nn.Module, **layer_kwargs):
    """One layer as a piece of a chunk: its LayerStages, else the whole layer as one compute piece."""
    return layer_stages(layer, **layer_kwargs) or _Whole(layer, recompute=True, **layer_kwargs)


class LayerStack(nn.Module):
    """A pipeline chunk made of layers (hidden [s, b, h] -> hidden), e.g. DeepSeek-V3 TransformerLayers: plain
    forward() for everything else, overlap_pieces() for the overlapped F&B."""

    def __init__(self, layers: Sequence[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden = _Whole(layer)(hidden)
        return hidden

    def overlap_pieces(self) -> List[Any]:
        return [layer_piece(layer) for layer in self.layers]


def overlap_pieces(module: nn.Module) -> Optional[List[Any]]:
    """The chunk's pieces (LayerStages or callables) when at least one layer has sub-stages, else None."""
    fn = getattr(module, "overlap_pieces", None)
    if fn is None:
        return None
    pieces = list(fn())
    return pieces if any(isinstance(p, LayerStages) for p in pieces) else None


# ---- the recorded forward of one micro-batch through one chunk -------------------------------------------------
@dataclass
class _Segment:
    kind: str                                  # "compute" | "send" (up to a post) | "recv" (from a wait)
    roots: List[torch.Tensor]                  # the segment's graph outputs
    leaves: List[torch.Tensor]                 # their detached stand-ins, read by later segments
    inputs: List[torch.Tensor] = field(default_factory=list)   # leaves it may read (for input-only backward)


def _leaves_of(values) -> List[torch.Tensor]:
    """The grad-requiring leaves among values (a dict or a sequence), one level of lists/tuples inside included
    (the dispatched rows and their gates are a list of leaves)."""
    vs = values.values() if isinstance(values, dict) else values
    flat = [t for v in vs for t in (v if isinstance(v, (list, tuple)) else (v,))]
    return [v for v in flat if isinstance(v, torch.Tensor) and v.requires_grad and v.is_leaf]


class ChunkRun:
    """Forward of one micro-batch through a chunk's pieces, segment by segment, and its backward.

    `inputs`: the chunk's input tensors as the caller made them (leaves; requires_grad where a gradient is
    wanted). After forward(), `outputs` are leaves standing for the chunk's outputs: the caller's loss or the
    gradients it received start the backward from them."""

    def __init__(self, pieces: Sequence[Any], inputs: Sequence[torch.Tensor]):
        self.pieces, self.inputs = list(pieces), list(inputs)
        self.segments: List[_Segment] = []
        self.outputs: Optional[List[torch.Tensor]] = None
        self._deferred: List[tuple] = []       # (roots, grads) of the compute segments, for weight()

    def _cut(self, kind: str, value, reads) -> Any:
        """Detach the grad-requiring tensors of value (a tensor, list or dict) into leaves; record the segment."""
        roots, leaves = [], []

        def leaf(t):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                lf = t.detach().requires_grad_()
                roots.append(t)
                leaves.append(lf)
                return lf
            return t
        if isinstance(value, dict):
            out = {k: leaf(v) for k, v in value.items()}
        elif isinstance(value, (list, tuple)):
            out = [leaf(v) for v in value]
        else:
            out = leaf(value)
        self.segments.append(_Segment(kind, roots, leaves, _leaves_of(reads)))
        return out

    def _send(self, pending, reads):
        """Record the segment up to a post; returns (pending, what its wait reads besides the state)."""
        in_flight, leaf = pending.cut()
        if in_flight.requires_grad:
            self.segments.append(_Segment("send", [in_flight], [leaf], _leaves_of(reads)))
        return pending, [leaf]

    def forward(self) -> Iterator[None]:
        """Runs the pieces; yields right after each all-to-all is posted."""
        values = list(self.inputs)
        for piece in self.pieces:
            if isinstance(piece, LayerStages):
                (hidden,) = values
                st: Dict[str, Any] = {"hidden": hidden}
                st.update(self._cut("compute", piece.attention(st), st))
                sent, leaf = self._send(piece.dispatch(st), st)
                yield
                st["dispatched"] = self._cut("recv", sent.wait(), list(st.values()) + leaf)
                st.update(self._cut("compute", piece.mlp(st), st))
                sent, leaf = self._send(piece.combine(st), st)
                yield
                st["combined"] = self._cut("recv", sent.wait(), list(st.values()) + leaf)
                values = [self._cut("compute", piece.output(st), st)]
            else:
                out = piece(*values)
                values = self._cut("compute", list(out) if isinstance(out, (list, tuple)) else [out], values)
        self.outputs = values

    def run_forward(self) -> List[torch.Tensor]:
        for _ in self.forward():
            pass
        return self.outputs

    def backward(self, roots: Sequence[torch.Tensor], grads: Sequence[Optional[torch.Tensor]],
                 split_w: bool = False) -> Iterator[None]:
        """From the caller's roots (a loss, or self.outputs with their gradients) down to the input leaves, segment
        by segment in reverse; yields right after each reverse all-to-all is posted. split_w: input gradients
        only, the parameters' later in weight()."""
        self._step(list(roots), list(grads), self.outputs, "compute", split_w)
        for seg in reversed(self.segments):
            pairs = [(r, lf.grad) for r, lf in zip(seg.roots, seg.leaves) if lf.grad is not None]
            if pairs:
                self._step([r for r, _ in pairs], [g for _, g in pairs], seg.inputs, seg.kind, split_w)
                if seg.kind == "recv":
                    yield
        self.segments = []

    def run_backward(self, roots, grads, split_w: bool = False) -> None:
        for _ in self.backward(roots, grads, split_w):
            pass

    def _step(self, roots, grads, inputs, kind, split_w) -> None:
        if not split_w:
            torch.autograd.backward(roots, grads)       # into the input leaves and the parameters (AccumulateGrad)
            return
        if inputs:
            gs = torch.autograd.grad(roots, inputs, grads, retain_graph=True, allow_unused=True)
            for x, g in zip(inputs, gs):
                if g is not None:
                    x.grad = g if x.grad is None else x.grad + g
        if kind == "compute":
            self._deferred.append((roots, grads))

    def weight(self, params: Sequence[torch.Tensor]) -> None:
        """The parameters' gradients of a backward(split_w=True), in the same segment order."""
        params = list(params)
        for roots, grads in self._deferred:
            if params:
                torch.autograd.backward(roots, grads, inputs=params)
        self._deferred = []


def run_interleaved(forward: Optional[Iterator[None]], backward: Optional[Iterator[None]],
                    order: str = "figure4") -> None:
    """Drive the two generators of an F&B pair: alternately, each until its next posted communication
    ("figure4": the backward first; "forward_first"), or one after the other ("sequential": F then B)."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    gens = [g for g in ((backward, forward) if order == "figure4" else (forward, backward)) if g is not None]
    if order == "sequential":
        for g in gens:
            for _ in g:
                pass
        return
    while gens:
        g = gens.pop(0)
        try:
            next(g)
        except StopIteration:
            continue
        gens.append(g)
