"""Pipeline schedules as data: (variant, rank, PP size, micro-batches) -> the ordered operations of that rank.

DeepSeek-V3 technical report, section 3.2.1 and Table 2; deepseek-ai/DualPipe's `step()`. Pure Python: no torch,
no torch.distributed. `simulate.py` runs these lists against a cost model; the executor performs them.

Operations (the paper's terms, Table 2's letters):
    F(mb, chunk)                 forward chunk
    B(mb, chunk, split_w)        backward chunk; split_w=True: "backward for input" only, its W comes later
                                 (zero-bubble deferral); split_w=False: the full backward (input and weights)
    W(mb, chunk)                 "backward for weights" of a split B (DualPipe's FIFO order, made explicit)
    FB(f_mb, f_chunk, b_mb, b_chunk)   "overlapped forward & backward": F of one micro-batch and the full B of
                                 another, interleaved so each one's all-to-all hides behind the other's compute
    SendActivation / RecvActivation(mb, chunk, peer)   a chunk's output to / its input from the peer rank
    SendGrad / RecvGrad(mb, chunk, peer)               the gradient of a chunk's input to / of its output from peer
    ReduceMirrorGrads(peer)      DualPipe only: sum this rank's stage-s gradients with the mirrored copy of stage s
                                 on `peer` (both copies then hold the same gradient and stay equal after the step)

`chunk` is the rank's local model chunk (0 or 1; 0..v-1 for interleaved 1F1B). Where a chunk sits in the model is
the `Layout`'s business: `layout.routes` lists, per micro-batch stream, the (rank, chunk) hops in forward order.
    1f1b, zb1p    one stream; rank r holds stage r
    interleaved   one stream; chunk c of rank r is stage c*PP + r (Megatron's virtual pipeline)
    dualpipe      two streams: "forward" (stream 0, enters at rank 0) through chunk 0 = stage r, and "reverse"
                  (stream 1, enters at rank PP-1) through chunk 1 = stage PP-1-r. Half of the micro-batches feed
                  each end and are numbered 0..M/2-1 within their stream; stream = chunk.
    dualpipev     one stream along the V: chunk 0 = stage r (down the ranks), chunk 1 = stage 2*PP-1-r (back up);
                  the turn at rank PP-1 passes activations and gradients locally (no send/recv ops)

Communication semantics the lists are written for (DualPipe's `_commit_and_wait_comm`): a maximal run of
communication ops between two compute ops is ONE batch: all of it is posted together when the previous compute
ends, and all of it is waited for before the next compute starts. The list order inside a batch is the posting
order (NCCL matches p2p per peer pair in order). Sends are placed exactly where DualPipe places them, including
the ones it holds back one chunk (a middle rank's last warm-up F1 output; a non-middle rank's F0 output in step 2).

The DualPipe phases (step 1..8 as in DeepSeek's `step()`; DualPipeV is the same skeleton "cut in half": DualPipe
on PP ranks runs, on its half-rank h = min(r, PP-1-r), what DualPipeV runs on rank h of PP/2 ranks, with local
phase 0/1 meaning chunk 0/1 in the first half and chunk 1/0 in the second):
    1 nF0        warm-up forwards of the rank's own-end chunk
    2 nF0F1      forwards alternating both chunks
    3 nB1W1F1    first backwards, weight gradients right away (zero bubble)
    4 nF0B1F1B0  steady state: overlapped F&B pairs
    5 nB1F1B0    one stream runs dry: B then a pair
    6 nB1B0      cool-down backwards, W deferred for the second half of them
    7 nWB0       deferred W's fill the gaps between the last backwards
    8 nW         the remaining W's
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple, Union

__all__ = [
    "F", "B", "W", "FB", "SendActivation", "RecvActivation", "SendGrad", "RecvGrad", "ReduceMirrorGrads",
    "Op", "COMPUTE_OPS", "COMM_OPS", "VARIANTS", "Layout", "layout", "build_schedule", "build_all",
    "forward_only",
]

VARIANTS = ("1f1b", "interleaved", "zb1p", "dualpipe", "dualpipev")


# ---- operations -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class F:
    """Forward chunk of micro-batch `mb` through local chunk `chunk`."""
    mb: int
    chunk: int


@dataclass(frozen=True)
class B:
    """Backward chunk; split_w: backward for input only (its W follows later), else input and weights."""
    mb: int
    chunk: int
    split_w: bool = False


@dataclass(frozen=True)
class W:
    """Backward for weights of an earlier split B(mb, chunk)."""
    mb: int
    chunk: int


@dataclass(frozen=True)
class FB:
    """Overlapped forward & backward: F(f_mb, f_chunk) with the full B(b_mb, b_chunk) (weights included)."""
    f_mb: int
    f_chunk: int
    b_mb: int
    b_chunk: int


@dataclass(frozen=True)
class SendActivation:
    """Output of F(mb, chunk) to `peer` (the next hop of this chunk)."""
    mb: int
    chunk: int
    peer: int


@dataclass(frozen=True)
class RecvActivation:
    """Input of F(mb, chunk) from `peer` (the previous hop of this chunk)."""
    mb: int
    chunk: int
    peer: int


@dataclass(frozen=True)
class SendGrad:
    """Gradient of the input of chunk `chunk` for micro-batch `mb`, to `peer` (the previous hop)."""
    mb: int
    chunk: int
    peer: int


@dataclass(frozen=True)
class RecvGrad:
    """Gradient of the output of chunk `chunk` for micro-batch `mb`, from `peer` (the next hop)."""
    mb: int
    chunk: int
    peer: int


@dataclass(frozen=True)
class ReduceMirrorGrads:
    """DualPipe: all-reduce (sum) over {this rank, peer} of the gradients of the two copies of each stage.

    Rank r's chunk 0 (stage r) is mirrored by chunk 1 of rank PP-1-r, and its chunk 1 (stage PP-1-r) by chunk 0 of
    rank PP-1-r; after this op both copies hold the sum. Last op of a DualPipe list; the executor may start it
    earlier (per chunk, once its last B/W is done) to overlap it with the remaining work.
    """
    peer: int


Op = Union[F, B, W, FB, SendActivation, RecvActivation, SendGrad, RecvGrad, ReduceMirrorGrads]
COMPUTE_OPS = (F, B, W, FB)
COMM_OPS = (SendActivation, RecvActivation, SendGrad, RecvGrad)


# ---- where the chunks sit ---------------------------------------------------------------------------------------
Hop = Tuple[int, int]  # (rank, chunk)


@dataclass(frozen=True)
class Layout:
    """Placement of model chunks: routes[s] = the (rank, chunk) hops of stream s in forward order.

    stage_size: the fraction of the model in one chunk, in units of 1/PP of it (1 for 1F1B/ZB1P/DualPipe; 1/v for
    interleaved and 1/2 for DualPipeV on the same PP ranks), so activations and costs compare across variants.
    microbatches[s]: how many micro-batches stream s carries.
    """
    variant: str
    pp_size: int
    chunks: int
    routes: Tuple[Tuple[Hop, ...], ...]
    microbatches: Tuple[int, ...]
    stage_size: float
    param_copies: int  # copies of each parameter across the pipeline (DualPipe: 2)

    def hop(self, rank: int, chunk: int) -> Tuple[int, int]:
        """(stream, position along the stream) of this rank's chunk."""
        for s, route in enumerate(self.routes):
            for i, h in enumerate(route):
                if h == (rank, chunk):
                    return s, i
        raise ValueError(f"{self.variant}: rank {rank} has no chunk {chunk}")

    def prev_hop(self, rank: int, chunk: int) -> Optional[Hop]:
        s, i = self.hop(rank, chunk)
        return self.routes[s][i - 1] if i > 0 else None

    def next_hop(self, rank: int, chunk: int) -> Optional[Hop]:
        s, i = self.hop(rank, chunk)
        return self.routes[s][i + 1] if i + 1 < len(self.routes[s]) else None


def layout(variant: str, pp_size: int, num_microbatches: int, virtual_chunks: int = 2) -> Layout:
    """The chunk placement of `variant` on `pp_size` ranks; validates the (variant, PP, micro-batches) choice."""
    p, m = pp_size, num_microbatches
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if p < 1 or m < 1:
        raise ValueError(f"pp_size and num_microbatches must be >= 1, got pp_size={p}, num_microbatches={m}")
    down = tuple((r, 0) for r in range(p))
    if variant in ("1f1b", "zb1p"):
        if variant == "zb1p" and m < p:
            raise ValueError(f"zb1p needs num_microbatches >= pp_size, got num_microbatches={m}, pp_size={p}")
        return Layout(variant, p, 1, (down,), (m,), 1.0, 1)
    if variant == "interleaved":
        v = virtual_chunks
        if v < 2 or m % p:
            # a short last group of micro-batches deadlocks this table (the simulator shows it)
            raise ValueError(f"interleaved needs virtual_chunks >= 2 and num_microbatches % pp_size == 0, got "
                             f"virtual_chunks={v}, num_microbatches={m}, pp_size={p}")
        route = tuple((r, c) for c in range(v) for r in range(p))
        return Layout(variant, p, v, (route,), (m,), 1.0 / v, 1)
    if variant == "dualpipe":
        if p % 2 or m % 2 or m < 2 * p:
            raise ValueError(f"dualpipe needs an even pp_size and an even num_microbatches >= 2*pp_size (half enter at "
                             f"each end), got pp_size={p}, num_microbatches={m}")
        reverse = tuple((r, 1) for r in reversed(range(p)))
        return Layout(variant, p, 2, (down, reverse), (m // 2, m // 2), 1.0, 2)
    if m < 2 * p:
        raise ValueError(f"dualpipev needs num_microbatches >= 2*pp_size, got num_microbatches={m}, pp_size={p}")
    up = tuple((r, 1) for r in reversed(range(p)))
    return Layout(variant, p, 2, (down + up,), (m,), 0.5, 1)


# ---- emitting one rank's list -----------------------------------------------------------------------------------
class _Program:
    """One rank's op list under construction. Per chunk, micro-batches are received, computed and sent in order, so
    a counter per (kind, chunk) names the micro-batch; communication with a local hop (DualPipeV's turn) or with no
    hop (first/last stage) emits nothing."""

    def __init__(self, lay: Layout, rank: int):
        self.lay, self.rank = lay, rank
        self.ops: List[Op] = []
        self.count: Dict[Tuple[str, int], int] = {}
        self.w_fifo: deque = deque()  # split B's whose W is still owed, oldest first (DualPipe's WeightGradStore)

    def _next(self, kind: str, chunk: int) -> int:
        n = self.count.get((kind, chunk), 0)
        self.count[(kind, chunk)] = n + 1
        return n

    def _remote(self, hop: Optional[Hop]) -> bool:
        return hop is not None and hop[0] != self.rank

    def recv_f(self, c: int) -> None:
        hop = self.lay.prev_hop(self.rank, c)
        if self._remote(hop):
            self.ops.append(RecvActivation(self._next("recv_f", c), c, hop[0]))

    def send_f(self, c: int) -> None:
        hop = self.lay.next_hop(self.rank, c)
        if self._remote(hop):
            self.ops.append(SendActivation(self._next("send_f", c), c, hop[0]))

    def recv_b(self, c: int) -> None:
        hop = self.lay.next_hop(self.rank, c)
        if self._remote(hop):
            self.ops.append(RecvGrad(self._next("recv_b", c), c, hop[0]))

    def send_b(self, c: int) -> None:
        hop = self.lay.prev_hop(self.rank, c)
        if self._remote(hop):
            self.ops.append(SendGrad(self._next("send_b", c), c, hop[0]))

    def forward(self, c: int, recv: bool = True, send: bool = True) -> None:
        if recv:
            self.recv_f(c)
        self.ops.append(F(self._next("f", c), c))
        if send:
            self.send_f(c)

    def backward(self, c: int, split_w: bool = False, recv: bool = True, send: bool = True) -> None:
        if recv:
            self.recv_b(c)
        mb = self._next("b", c)
        self.ops.append(B(mb, c, split_w))
        if split_w:
            self.w_fifo.append((mb, c))
        if send:
            self.send_b(c)

    def weight(self) -> None:
        mb, c = self.w_fifo.popleft()
        self.ops.append(W(mb, c))

    def forward_backward(self, cf: int, cb: int, recv_f: bool = True) -> None:
        if recv_f:
            self.recv_f(cf)
        self.recv_b(cb)
        self.ops.append(FB(self._next("f", cf), cf, self._next("b", cb), cb))
        self.send_f(cf)
        self.send_b(cb)


def _dualpipe_steps(prog: _Program, n: int, h: int, m: int, chunk_of_phase: Tuple[int, int]) -> None:
    """DeepSeek's step() phases 1-8 on a pipeline of n ranks (DualPipe: its half of PP/2 ranks; DualPipeV: the PP
    ranks) at position h with m micro-batches per stream. The rank at h = n-1 is where the streams turn (DualPipe's
    middle ranks, DualPipeV's last rank)."""
    f0, f1 = chunk_of_phase
    turn = h == n - 1
    for _ in range((n - h - 1) * 2):                             # 1: nF0
        prog.forward(f0)
    prog.recv_f(f0)                                              # 2: nF0F1
    for i in range(h + 1):
        prog.forward(f0, recv=False, send=turn)
        prog.recv_f(f0)
        prog.forward(f1, send=(not turn) or i < h)
        if not turn:
            prog.send_f(f0)
    for _ in range(n - h - 1):                                   # 3: nB1W1F1, zero bubble
        prog.backward(f1, split_w=True)
        prog.recv_f(f1)
        prog.weight()
        prog.forward(f1, recv=False)
    for i in range(m - 2 * n + h + 1):                           # 4: nF0B1F1B0, the steady state
        if i == 0 and turn:
            # DeepSeek: these two are not overlapped, to shorten the bubble at the turn
            prog.forward(f0, recv=False, send=False)
            prog.send_f(f1)
            prog.backward(f1, send=False)
            prog.send_f(f0)
            prog.send_b(f1)
        else:
            prog.forward_backward(f0, f1, recv_f=i > 0)
        prog.forward_backward(f1, f0)
    for _ in range(n - h - 1):                                   # 5: nB1F1B0
        prog.backward(f1)
        prog.forward_backward(f1, f0)
    split = False                                                # 6: nB1B0, second half zero bubble
    for i in range(h + 1):
        if i == (h + 1) // 2 and h % 2 == 1:
            split = True
        prog.backward(f1, split_w=split)
        if i == (h + 1) // 2 and h % 2 == 0:
            split = True
        prog.backward(f0, split_w=split)
    for _ in range(n - h - 1):                                   # 7: nWB0
        prog.weight()
        prog.backward(f0, split_w=True)
    for _ in range(h + 1):                                       # 8: nW
        prog.weight()
    assert not prog.w_fifo, "every deferred W is run"


def _one_f_one_b(prog: _Program, p: int, m: int, zero_bubble: bool) -> None:
    """1F1B: p-r-1 warm-up forwards, F/B pairs, cool-down backwards. zero_bubble (ZB-H1, the paper's ZB1P): every
    backward is split, and rank r keeps the W's of its last r backwards pending (W of the k-th B runs right after
    the (k+r)-th), so the later ranks, whose 1F1B idles at the start, push their backwards up the pipeline sooner
    and the first ranks' cool-down gaps disappear; the pending W's run after the last backward. Peak activations
    stay at 1F1B's p - r: a pending W's micro-batch replaces one 1F1B would still hold in its warm-up."""
    r = prog.rank
    warmup = min(p - r - 1, m)
    for _ in range(warmup):
        prog.forward(0)
    for k in range(m):
        if k + warmup < m:
            prog.forward(0)
        prog.backward(0, split_w=zero_bubble)
        while zero_bubble and len(prog.w_fifo) > r:
            prog.weight()
    while prog.w_fifo:
        prog.weight()


def _interleaved(prog: _Program, p: int, m: int, v: int) -> None:
    """Megatron's interleaved 1F1B (its schedule table): micro-batches in groups of p; a group goes through chunk 0,
    then chunk 1, ...; backwards in the same order with the chunks reversed. Warm-up 2(p-r-1) + (v-1)p forwards,
    then 1F1B over the m*v virtual ops."""
    r, total = prog.rank, m * v
    order = [(mb, c) for g in range(0, m, p) for c in range(v) for mb in range(g, g + p)]
    warmup = min(2 * (p - r - 1) + (v - 1) * p, total)
    for k in range(warmup):
        prog.forward(order[k][1])
    for k in range(warmup, total):
        prog.forward(order[k][1])
        prog.backward(v - 1 - order[k - warmup][1])
    for k in range(total - warmup, total):
        prog.backward(v - 1 - order[k][1])


def build_schedule(variant: str, rank: int, pp_size: int, num_microbatches: int,
                   virtual_chunks: int = 2) -> List[Op]:
    """The ordered operations of `rank`. num_microbatches counts the whole step (DualPipe: both directions, as
    DeepSeek's num_chunks; half enter at rank 0, half at rank PP-1)."""
    lay = layout(variant, pp_size, num_microbatches, virtual_chunks)
    if not 0 <= rank < pp_size:
        raise ValueError(f"rank must be in [0, pp_size={pp_size}), got {rank}")
    prog = _Program(lay, rank)
    p, m = pp_size, num_microbatches
    if variant in ("1f1b", "zb1p"):
        _one_f_one_b(prog, p, m, zero_bubble=variant == "zb1p")
    elif variant == "interleaved":
        _interleaved(prog, p, m, virtual_chunks)
    elif variant == "dualpipe":
        second_half = rank >= p // 2
        _dualpipe_steps(prog, p // 2, min(rank, p - 1 - rank), m // 2, (int(second_half), int(not second_half)))
        prog.ops.append(ReduceMirrorGrads(p - 1 - rank))
    else:
        _dualpipe_steps(prog, p, rank, m, (0, 1))
    return prog.ops


def build_all(variant: str, pp_size: int, num_microbatches: int,
              virtual_chunks: int = 2) -> Tuple[Layout, List[List[Op]]]:
    """The layout and every rank's list."""
    lay = layout(variant, pp_size, num_microbatches, virtual_chunks)
    return lay, [build_schedule(variant, r, pp_size, num_microbatches, virtual_chunks) for r in range(pp_size)]


def forward_only(ops: List[Op]) -> List[Op]:
    """The evaluation list: forwards and their activation traffic only (a pair keeps its forward)."""
    out: List[Op] = []
    for op in ops:
        if isinstance(op, FB):
            out.append(F(op.f_mb, op.f_chunk))
        elif isinstance(op, (F, SendActivation, RecvActivation)):
            out.append(op)
    return out
