"""Run the op lists of every rank against a cost model: step time, bubble, peak activations; deadlock detection.

Semantics (those the executor implements, DualPipe's `_commit_and_wait_comm`):
  * a rank runs its list in order, one compute op at a time; costs are per op: F, B (full; a split B costs B - W),
    W, FB (the overlapped pair, F + B when nothing overlaps), ReduceMirrorGrads;
  * a maximal run of communication ops between two compute ops is one batch, posted when the previous compute ends
    and waited for before the next one starts; a message posted at t arrives at t + comm. Sends are eager by
    default (buffered, complete at once); rendezvous=True makes a send complete only once the peer has posted the
    matching receive (NCCL's behaviour for large messages), which exposes orderings that deadlock there;
  * data dependencies are checked, not assumed: F(mb) at hop i needs the activation of hop i-1 (received, or
    computed earlier on this rank at DualPipeV's turn); B(mb) needs its own F and the gradient of hop i+1 (received,
    or computed earlier here); W needs its split B; a send needs the op that produced its tensor; each tensor is
    sent to, and received from, the hop the layout says. A violation raises ScheduleError; a state where no rank can
    move and some have ops left raises DeadlockError naming what each waits for.

What is counted:
  * busy(r): the sum of rank r's compute costs; step time: the last op's end over all ranks (all start at 0);
    bubble(r) = step time - busy(r): idle time inside the step, the quantity of the paper's Table 2;
  * activations(r): micro-batch chunks whose F has started on rank r and whose weight gradient is not yet done
    (the end of its full B, or of the W of a split B: W still reads the saved inputs). peak_activations counts them
    in chunks, peak_activations_stage in units of one 1/PP stage (x layout.stage_size, for comparing variants);
    peak_activations_b releases at the end of B instead (the paper's / ZB's accounting when W's extra is small).

`python -m megatron_dsv3.pipeline.simulate --table` prints docs/pipeline_schedules.md's table.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_dsv3.pipeline.schedule import (B, COMM_OPS, FB, F, Layout, Op, RecvActivation, RecvGrad,
                                             ReduceMirrorGrads, SendActivation, SendGrad, W, build_all)

__all__ = ["Costs", "SimResult", "ScheduleError", "DeadlockError", "simulate", "table_rows", "format_table"]


class ScheduleError(ValueError):
    """An op list that breaks a data dependency or a send/receive pairing."""


class DeadlockError(RuntimeError):
    """Some rank waits forever."""


@dataclass(frozen=True)
class Costs:
    """Time of one op on one chunk of one micro-batch (any unit)."""
    F: float = 1.0        # forward chunk
    B: float = 2.0        # full backward chunk (input + weights)
    W: float = 1.0        # backward for weights; backward for input alone = B - W
    FB: float = 3.0       # overlapped forward & backward pair (F + B: no overlap gain)
    comm: float = 0.0     # P2P latency from post to arrival
    reduce: float = 0.0   # DualPipe's mirrored-gradient all-reduce

    def scaled(self, s: float) -> "Costs":
        """Costs of a chunk holding s of the model that these costs describe (communication unchanged)."""
        return Costs(self.F * s, self.B * s, self.W * s, self.FB * s, self.comm, self.reduce * s)


@dataclass
class SimResult:
    step_time: float
    busy: List[float]
    bubble: List[float]
    peak_activations: List[int]           # chunks, released at the end of the weight gradient
    peak_activations_b: List[int]         # chunks, released at the end of B (backward for input)
    stage_size: float
    timeline: List[List[Tuple[float, float, Op]]] = field(repr=False, default_factory=list)  # (start, end, op)

    @property
    def max_bubble(self) -> float:
        return max(self.bubble)

    @property
    def peak_activations_stage(self) -> List[float]:
        return [a * self.stage_size for a in self.peak_activations]


def _key(lay: Layout, kind: str, rank: int, chunk: int, mb: int):
    """A tensor's identity: (kind, stream, micro-batch, hop that produces it)."""
    s, i = lay.hop(rank, chunk)
    return kind, s, mb, i


def simulate(lay: Layout, lists: Sequence[Sequence[Op]], costs: Costs = Costs(), rendezvous: bool = False) -> SimResult:
    p = lay.pp_size
    if len(lists) != p:
        raise ScheduleError(f"{len(lists)} op lists for {p} ranks")
    pos = [0] * p
    clock = [0.0] * p
    busy = [0.0] * p
    timeline: List[List[Tuple[float, float, Op]]] = [[] for _ in range(p)]
    done: List[Dict] = [dict() for _ in range(p)]     # local facts: ("F"|"B"|"W"|"BW", chunk, mb) -> end time
    posted_batch: List[Optional[int]] = [None] * p       # index of the batch end if this rank's batch is posted
    sends: Dict = {}                                     # tensor key -> (post time, sender)
    recvs: Dict = {}                                     # tensor key -> (post time, receiver)
    received: set = set()
    live = [0] * p
    live_b = [0] * p
    peak = [0] * p
    peak_b = [0] * p
    reduce_posted: Dict[int, float] = {}

    def fail(r: int, msg: str):
        raise ScheduleError(f"{lay.variant} PP={p} rank {r} op #{pos[r]} ({lists[r][pos[r]]}): {msg}")

    def need(r: int, fact, what: str):
        if fact not in done[r]:
            fail(r, f"needs {what}, which this rank has not done yet")

    def check_f(r: int, mb: int, c: int):
        if (("F", c, mb)) in done[r]:
            fail(r, "forward done twice")
        prev = lay.prev_hop(r, c)
        if prev is None:
            return
        if prev[0] == r:
            need(r, ("F", prev[1], mb), f"F({mb}, chunk {prev[1]}) (local hop)")
        elif _key(lay, "act", r, c, mb) not in received:
            fail(r, "its activation was not received")

    def check_b(r: int, mb: int, c: int):
        if ("B", c, mb) in done[r]:
            fail(r, "backward done twice")
        need(r, ("F", c, mb), f"its own F({mb}, chunk {c})")
        nxt = lay.next_hop(r, c)
        if nxt is None:
            return
        if nxt[0] == r:
            need(r, ("B", nxt[1], mb), f"B({mb}, chunk {nxt[1]}) (local hop)")
        elif _key(lay, "grad", r, c, mb) not in received:
            fail(r, "its output gradient was not received")

    def compute(r: int, op: Op):
        start = clock[r]
        frees = 0   # activations released at the end of this op (weight gradient done)
        frees_b = 0
        adds = 0
        if isinstance(op, F):
            check_f(r, op.mb, op.chunk)
            cost, adds = costs.F, 1
            facts = [("F", op.chunk, op.mb)]
        elif isinstance(op, B):
            check_b(r, op.mb, op.chunk)
            cost = costs.B - costs.W if op.split_w else costs.B
            facts = [("B", op.chunk, op.mb)] + ([] if op.split_w else [("BW", op.chunk, op.mb)])
            frees_b, frees = 1, 0 if op.split_w else 1
        elif isinstance(op, W):
            if ("BW", op.chunk, op.mb) in done[r]:
                fail(r, "weight gradient done twice")
            need(r, ("B", op.chunk, op.mb), f"its split B({op.mb}, chunk {op.chunk})")
            cost, frees = costs.W, 1
            facts = [("BW", op.chunk, op.mb)]
        elif isinstance(op, FB):
            check_f(r, op.f_mb, op.f_chunk)
            check_b(r, op.b_mb, op.b_chunk)
            cost, adds, frees, frees_b = costs.FB, 1, 1, 1
            facts = [("F", op.f_chunk, op.f_mb), ("B", op.b_chunk, op.b_mb), ("BW", op.b_chunk, op.b_mb)]
        else:
            raise ScheduleError(f"unknown op {op!r}")
        live[r] += adds
        live_b[r] += adds
        peak[r] = max(peak[r], live[r])
        peak_b[r] = max(peak_b[r], live_b[r])
        live[r] -= frees
        live_b[r] -= frees_b
        end = start + cost
        for fact in facts:
            done[r][fact] = end
        clock[r] = end
        busy[r] += cost
        timeline[r].append((start, end, op))

    def batch_end(r: int) -> int:
        j = pos[r]
        while j < len(lists[r]) and isinstance(lists[r][j], COMM_OPS):
            j += 1
        return j

    def comm_key(r: int, op) -> Tuple:
        if isinstance(op, (SendActivation, RecvActivation)):
            kind = "act"
            hop = lay.next_hop(r, op.chunk) if isinstance(op, SendActivation) else lay.prev_hop(r, op.chunk)
        else:
            kind = "grad"
            hop = lay.prev_hop(r, op.chunk) if isinstance(op, SendGrad) else lay.next_hop(r, op.chunk)
        if hop is None or hop[0] != op.peer or hop[0] == r:
            fail(r, f"the layout's peer for this tensor is {None if hop is None else hop[0]} (local hops send nothing)")
        # the key names the tensor by the hop that consumes it
        if isinstance(op, SendActivation):
            return _key(lay, "act", hop[0], hop[1], op.mb)
        if isinstance(op, RecvActivation):
            return _key(lay, "act", r, op.chunk, op.mb)
        if isinstance(op, SendGrad):
            return _key(lay, "grad", hop[0], hop[1], op.mb)
        return _key(lay, "grad", r, op.chunk, op.mb)

    def step_batch(r: int) -> bool:
        j = batch_end(r)
        ops = lists[r][pos[r]:j]
        if posted_batch[r] is None:
            for op in ops:
                k = comm_key(r, op)
                if isinstance(op, (SendActivation, SendGrad)):
                    need(r, ("F", op.chunk, op.mb) if isinstance(op, SendActivation) else ("B", op.chunk, op.mb),
                         "the op that produces the tensor it sends")
                    if k in sends:
                        fail(r, "tensor sent twice")
                    sends[k] = (clock[r], r)
                else:
                    if k in recvs:
                        fail(r, "tensor received twice")
                    recvs[k] = (clock[r], r)
            posted_batch[r] = j
        finish = clock[r]
        for op in ops:
            k = comm_key(r, op)
            if isinstance(op, (RecvActivation, RecvGrad)):
                if k not in sends:
                    return False
                finish = max(finish, sends[k][0] + costs.comm)
            elif rendezvous:
                if k not in recvs:
                    return False
                finish = max(finish, max(sends[k][0], recvs[k][0]) + costs.comm)
        for op in ops:
            if isinstance(op, (RecvActivation, RecvGrad)):
                received.add(comm_key(r, op))
        clock[r] = finish
        posted_batch[r] = None
        pos[r] = j
        return True

    def step_reduce(r: int, op: ReduceMirrorGrads) -> bool:
        if lay.variant != "dualpipe" or op.peer != p - 1 - r:
            fail(r, f"mirror of rank {r} is {p - 1 - r} (DualPipe only)")
        for c in range(lay.chunks):
            for mb in range(lay.microbatches[lay.hop(r, c)[0]]):
                need(r, ("BW", c, mb), f"every weight gradient of chunk {c} (mb {mb})")
        reduce_posted.setdefault(r, clock[r])
        if op.peer not in reduce_posted:
            return False
        start = max(reduce_posted[r], reduce_posted[op.peer])
        clock[r] = start + costs.reduce
        busy[r] += costs.reduce
        timeline[r].append((start, clock[r], op))
        pos[r] += 1
        return True

    def advance(r: int) -> bool:
        if pos[r] >= len(lists[r]):
            return False
        op = lists[r][pos[r]]
        if isinstance(op, COMM_OPS):
            return step_batch(r)
        if isinstance(op, ReduceMirrorGrads):
            return step_reduce(r, op)
        compute(r, op)
        pos[r] += 1
        return True

    moved = True
    while moved:
        moved = False
        for r in range(p):
            while advance(r):
                moved = True
    stuck = [r for r in range(p) if pos[r] < len(lists[r])]
    if stuck:
        waits = "; ".join(f"rank {r} at op #{pos[r]} {lists[r][pos[r]]}" for r in stuck)
        raise DeadlockError(f"{lay.variant} PP={p}: no rank can move; {waits}")
    unmatched = sorted(set(sends) ^ received)
    if unmatched:
        raise ScheduleError(f"{lay.variant} PP={p}: sends without receives (or the reverse): {unmatched[:5]}")
    for r in range(p):
        for s, route in enumerate(lay.routes):
            for c in [c for (rr, c) in route if rr == r]:
                for mb in range(lay.microbatches[s]):
                    for kind in ("F", "B", "BW"):
                        if (kind, c, mb) not in done[r]:
                            raise ScheduleError(f"{lay.variant} PP={p} rank {r}: {kind} of mb {mb} on chunk {c} "
                                                f"never runs")
    step = max(clock)
    return SimResult(step, busy, [step - b for b in busy], peak, peak_b, lay.stage_size, timeline)


# ---- the docs table ---------------------------------------------------------------------------------------------
PAPER_COSTS = Costs(F=1.0, B=2.0, W=1.0, FB=3.0)   # DeepSeek's Figure 5 cells: F 1, B 2, B-for-input 1, W 1, F&B 3


def table_rows(pp: int = 16, microbatches: int = 40, costs: Costs = PAPER_COSTS):
    """One row per variant on `pp` ranks, `microbatches` per step (DualPipe: half per direction), costs per 1/pp
    of the model (chunks holding less scale them); plus DualPipeV on pp/2 ranks holding the same pp stages (the
    DualPipe README's comparison at equal stage count, microbatches/2 micro-batches)."""
    half = (pp // 2 - 1) * (costs.FB + costs.B - 3 * costs.W)
    runs = [
        ("1F1B", "1f1b", pp, microbatches, f"(PP-1)(F+B) = {(pp - 1) * (costs.F + costs.B):g}"),
        ("interleaved 1F1B, v=2", "interleaved", pp, -(-microbatches // pp) * pp,
         f"(PP-1)(F+B)/v = {(pp - 1) * (costs.F + costs.B) / 2:g}"),
        ("ZB1P", "zb1p", pp, microbatches, f"(PP-1)(F+B-2W) = {(pp - 1) * (costs.F + costs.B - 2 * costs.W):g}"),
        ("DualPipe", "dualpipe", pp, microbatches, f"(PP/2-1)(F&B+B-3W) = {half:g}"),
        ("DualPipeV", "dualpipev", pp, microbatches,
         f"(PP-1)(F&B+B-3W)/2 = {(pp - 1) * (costs.FB + costs.B - 3 * costs.W) / 2:g}"),
        (f"DualPipeV on PP/2={pp // 2} ranks", "dualpipev", pp // 2, microbatches // 2,
         f"(PP/2-1)(F&B+B-3W) = {half:g}"),
    ]
    rows = []
    for name, variant, ranks, m, formula in runs:
        lay, lists = build_all(variant, ranks, m)
        res = simulate(lay, lists, costs.scaled(lay.stage_size * pp / ranks))
        unit = lay.stage_size * pp / ranks  # chunk size in 1/pp of the model
        rows.append(dict(name=name, ranks=ranks, stages=sum(map(len, lay.routes)) // lay.param_copies, microbatches=m,
                         step=res.step_time, bubble_max=max(res.bubble), bubble_min=min(res.bubble),
                         formula=formula, params=lay.chunks * unit, copies=lay.param_copies,
                         act=max(res.peak_activations) * unit, act_b=max(res.peak_activations_b) * unit,
                         act_r0=res.peak_activations[0] * unit))
    return rows


def format_table(rows) -> str:
    head = ("| schedule | ranks | stages | micro-batches | step time | bubble per rank (max / min) | Table 2 formula "
            "| parameter copies | parameters per rank | peak activations per rank (at W / at B) |")
    lines = [head, "|" + "---|" * 10]
    for x in rows:
        lines.append(f"| {x['name']} | {x['ranks']} | {x['stages']} | {x['microbatches']} | {x['step']:g} "
                     f"| {x['bubble_max']:g} / {x['bubble_min']:g} | {x['formula']} | {x['copies']}x | {x['params']:g} "
                     f"| {x['act']:g} / {x['act_b']:g} |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", action="store_true", help="print the comparison table of docs/pipeline_schedules.md")
    ap.add_argument("--pp", type=int, default=16)
    ap.add_argument("--microbatches", type=int, default=40, help="per step (DualPipe: both directions)")
    ap.add_argument("--fb", type=float, default=PAPER_COSTS.FB, help="cost of an overlapped F&B pair")
    ap.add_argument("--comm", type=float, default=0.0)
    args = ap.parse_args(argv)
    if not args.table:
        ap.error("nothing to do: pass --table")
    costs = Costs(PAPER_COSTS.F, PAPER_COSTS.B, PAPER_COSTS.W, args.fb, args.comm)
    print(f"PP={args.pp}, {args.microbatches} micro-batches per step, costs per 1/{args.pp} of the model: "
          f"F={costs.F:g} B={costs.B:g} W={costs.W:g} F&B={costs.FB:g} comm={costs.comm:g}\n")
    print(format_table(table_rows(args.pp, args.microbatches, costs)))


if __name__ == "__main__":
    main()
