"""Op lists of megatron_dsv3/pipeline/schedule.py checked for every PP size, and run by simulate.py against the
DeepSeek-V3 paper's Table 2 (costs of its Figure 5: F=1, B=2, W=1, F&B=3; exact arithmetic on halves, so `==`)."""
from collections import Counter

import pytest

from megatron_dsv3.pipeline.schedule import (B, F, FB, RecvActivation, RecvGrad, ReduceMirrorGrads, SendActivation,
                                             SendGrad, W, build_all, build_schedule, forward_only, layout)
from megatron_dsv3.pipeline.simulate import (PAPER_COSTS, Costs, DeadlockError, ScheduleError, format_table,
                                             simulate, table_rows)

PPS = (2, 4, 8, 16)
DUAL = ("dualpipe", "dualpipev")


def _microbatches(variant, pp):
    """Per step. DualPipe: PP, 2*PP and 20 per direction (DeepSeek needs >= PP per direction); DualPipeV and the
    1F1B family: 2*PP, 2*PP+2 (odd per V-turn half), 4*PP, 40."""
    if variant == "dualpipe":
        return sorted({2 * pp, 4 * pp, 40, 2 * pp + 2})
    if variant == "interleaved":
        return sorted({pp, 2 * pp, 4 * pp})
    return sorted({2 * pp, 2 * pp + 2, 4 * pp, 40})


CASES = [(v, pp, m) for v in ("dualpipe", "dualpipev", "1f1b", "zb1p", "interleaved") for pp in PPS
         for m in _microbatches(v, pp)]


def _compute_units(op):
    """(kind, chunk, mb) facts an op performs: F, B (input gradient), BW (weight gradient)."""
    if isinstance(op, F):
        return [("F", op.chunk, op.mb)]
    if isinstance(op, B):
        return [("B", op.chunk, op.mb)] + ([] if op.split_w else [("BW", op.chunk, op.mb)])
    if isinstance(op, W):
        return [("BW", op.chunk, op.mb)]
    if isinstance(op, FB):
        return [("F", op.f_chunk, op.f_mb), ("B", op.b_chunk, op.b_mb), ("BW", op.b_chunk, op.b_mb)]
    return []


@pytest.mark.parametrize("variant,pp,m", CASES)
def test_lists_complete_ordered_and_matched(variant, pp, m):
    lay, lists = build_all(variant, pp, m)
    sends, recvs = Counter(), Counter()
    for r, ops in enumerate(lists):
        seen = Counter()
        position = {}
        for i, op in enumerate(ops):
            for unit in _compute_units(op):
                seen[unit] += 1
                position[unit] = i
        expected = {(kind, c, mb) for s, route in enumerate(lay.routes) for (rr, c) in route if rr == r
                    for mb in range(lay.microbatches[s]) for kind in ("F", "B", "BW")}
        # every op exactly once per (micro-batch, stage, kind)
        assert set(seen) == expected and all(n == 1 for n in seen.values()), (variant, pp, m, r)
        for kind, c, mb in expected:
            if kind == "B":   # forward precedes backward on every stage; weight gradient not before it
                assert position[("F", c, mb)] < position[("B", c, mb)] <= position[("BW", c, mb)]
        for op in ops:
            s, i = lay.hop(r, op.chunk) if hasattr(op, "chunk") else (None, None)
            if isinstance(op, SendActivation):
                sends[("act", s, op.mb, i + 1, r, op.peer)] += 1
            elif isinstance(op, RecvActivation):
                recvs[("act", s, op.mb, i, op.peer, r)] += 1
            elif isinstance(op, SendGrad):
                sends[("grad", s, op.mb, i - 1, r, op.peer)] += 1
            elif isinstance(op, RecvGrad):
                recvs[("grad", s, op.mb, i, op.peer, r)] += 1
        if variant == "dualpipe":
            assert ops[-1] == ReduceMirrorGrads(pp - 1 - r)
    assert sends == recvs and max(sends.values()) == 1   # sends match receives, one to one
    simulate(lay, lists, PAPER_COSTS)                    # and the run completes (no deadlock)


@pytest.mark.parametrize("variant", DUAL + ("1f1b", "zb1p"))
@pytest.mark.parametrize("pp", PPS)
def test_no_deadlock_with_rendezvous_sends(variant, pp):
    """NCCL-like sends (complete only once the peer posted the receive), with a communication latency."""
    lay, lists = build_all(variant, pp, 40 if pp < 16 else 48)
    simulate(lay, lists, Costs(comm=0.25), rendezvous=True)


@pytest.mark.parametrize("fb", (3.0, 2.5, 2.0))
@pytest.mark.parametrize("pp", PPS)
def test_dualpipe_bubble_is_table_2(pp, fb):
    """(PP/2-1)(F&B+B-3W) on every rank, at the paper's costs and with overlap gains (F&B < F+B)."""
    costs = Costs(F=1, B=2, W=1, FB=fb)
    for m in _microbatches("dualpipe", pp):
        res = simulate(*build_all("dualpipe", pp, m), costs)
        assert max(res.bubble) == (pp // 2 - 1) * (fb + costs.B - 3 * costs.W), (pp, m, res.bubble)


@pytest.mark.parametrize("pp", PPS)
def test_dualpipev_bubble_is_dualpipe_cut_in_half(pp):
    """DualPipeV on PP ranks (2*PP stages) = DualPipe on 2*PP ranks: (2PP/2-1)(F&B+B-3W) in its chunk costs."""
    for fb in (3.0, 2.5):
        costs = Costs(F=1, B=2, W=1, FB=fb)
        for m in _microbatches("dualpipev", pp):
            res = simulate(*build_all("dualpipev", pp, m), costs)
            assert max(res.bubble) == (pp - 1) * (fb + costs.B - 3 * costs.W), (pp, m, res.bubble)


@pytest.mark.parametrize("variant", DUAL)
@pytest.mark.parametrize("pp", PPS)
def test_peak_activations_at_most_pp_plus_1(variant, pp):
    """Paper: PP+1 micro-batch activations per device for DualPipe (PP = its stages); DualPipeV: 2*PP+1 chunks of
    half a stage. Counted until the weight gradient is done (conservative)."""
    stages = pp if variant == "dualpipe" else 2 * pp
    for m in _microbatches(variant, pp):
        res = simulate(*build_all(variant, pp, m), PAPER_COSTS)
        assert max(res.peak_activations) == stages + 1, (variant, pp, m, res.peak_activations)


@pytest.mark.parametrize("pp", PPS)
def test_1f1b_and_zb1p_bubbles_are_table_2(pp):
    c = PAPER_COSTS
    for m in (pp, 2 * pp, 40):
        one = simulate(*build_all("1f1b", pp, m), c)
        zb = simulate(*build_all("zb1p", pp, m), c)
        assert one.bubble == [(pp - 1) * (c.F + c.B)] * pp
        assert zb.bubble == [(pp - 1) * (c.F + c.B - 2 * c.W)] * pp
        assert max(one.peak_activations) == max(zb.peak_activations) == min(pp, m)   # ZB-H1 keeps 1F1B's memory
    inter = simulate(*build_all("interleaved", pp, 2 * pp), c.scaled(0.5))
    assert max(inter.bubble) == (pp - 1) * (c.F + c.B) / 2


def test_dualpipe_rank_0_matches_deepseeks_figure():
    """The opening of device 0 in DeepSeek's PP=8, 20-micro-batch figure: 6 F0, then F0 F1 alternating (step 2),
    B1 W F1 three times (step 3), then the overlapped pairs."""
    ops = [op for op in build_schedule("dualpipe", 0, 8, 20) if not hasattr(op, "peer")]
    assert ops[:8] == [F(i, 0) for i in range(7)] + [F(0, 1)]
    assert ops[8:11] == [B(0, 1, split_w=True), W(0, 1), F(1, 1)]
    assert ops[17] == FB(7, 0, 3, 1) and ops[18] == FB(4, 1, 0, 0)


def test_broken_lists_are_caught():
    """The simulator is not a rubber stamp: a swapped F/B, a missing receive, a wrong peer, a dropped W, and two
    ranks each waiting for the other are all refused."""
    lay, lists = build_all("dualpipe", 4, 8)

    def broken(r, edit):
        out = [list(x) for x in lists]
        out[r] = edit(out[r])
        return out

    i = next(n for n, op in enumerate(lists[1]) if isinstance(op, B))   # rank 1 runs a backward before its forward
    j = lists[1].index(F(lists[1][i].mb, lists[1][i].chunk))
    swap = broken(1, lambda ops: ops[:j] + [ops[i]] + ops[j + 1:i] + [ops[j]] + ops[i + 1:])
    with pytest.raises(ScheduleError, match="its own F"):
        simulate(lay, swap, PAPER_COSTS)
    k = lists[1].index(RecvActivation(0, 0, 0))   # rank 1 never receives mb 0's activation
    with pytest.raises(ScheduleError):
        simulate(lay, broken(1, lambda ops: ops[:k] + ops[k + 1:]), PAPER_COSTS)
    wrong_peer = broken(1, lambda ops: ops[:k] + [RecvActivation(0, 0, 2)] + ops[k + 1:])
    with pytest.raises(ScheduleError, match="peer"):
        simulate(lay, wrong_peer, PAPER_COSTS)
    w = next(n for n, op in enumerate(lists[0]) if isinstance(op, W))
    with pytest.raises(ScheduleError, match="never runs|every weight gradient"):
        simulate(lay, broken(0, lambda ops: ops[:w] + ops[w + 1:]), PAPER_COSTS)
    # deadlock: rank 0 receives the gradient of mb 0 before it has sent mb 0's activation forward
    lay1, one = build_all("1f1b", 2, 2)
    send = one[0].index(SendActivation(0, 0, 1))
    recv = one[0].index(RecvGrad(0, 0, 1))
    r0 = one[0][:send] + [one[0][recv], F(1, 0), one[0][send]] + [op for n, op in enumerate(one[0][send + 1:], send + 1)
                                                                 if n != recv and op != F(1, 0)]
    with pytest.raises(DeadlockError, match="rank 0"):
        simulate(lay1, [r0, one[1]], PAPER_COSTS)


def test_rendezvous_exposes_a_send_send_cycle():
    """Both DualPipe ends send first and receive only after another forward: buffered (eager) sends get through,
    NCCL-like sends that wait for the peer's receive deadlock, and the simulator says so."""
    lay = layout("dualpipe", 2, 4)
    r0 = [F(0, 0), SendActivation(0, 0, 1), F(1, 0), RecvActivation(0, 1, 1), F(0, 1)]
    r1 = [F(0, 1), SendActivation(0, 1, 0), F(1, 1), RecvActivation(0, 0, 0), F(0, 0)]
    with pytest.raises(ScheduleError, match="never runs"):   # eager: runs to the end (the lists are partial)
        simulate(lay, [r0, r1], PAPER_COSTS)
    with pytest.raises(DeadlockError, match="rank 0 .*SendActivation.*rank 1 .*SendActivation"):
        simulate(lay, [r0, r1], PAPER_COSTS, rendezvous=True)


def test_forward_only_lists_run():
    lay, lists = build_all("dualpipev", 4, 8)
    fwd = [forward_only(ops) for ops in lists]
    assert all(not isinstance(op, (B, W, FB, SendGrad, RecvGrad)) for ops in fwd for op in ops)
    assert sum(isinstance(op, F) for op in fwd[2]) == 16


def test_layout_and_arguments():
    assert layout("dualpipe", 4, 8).routes == (((0, 0), (1, 0), (2, 0), (3, 0)), ((3, 1), (2, 1), (1, 1), (0, 1)))
    assert layout("dualpipev", 2, 4).routes == (((0, 0), (1, 0), (1, 1), (0, 1)),)
    for bad in (("dualpipe", 3, 12), ("dualpipe", 4, 6), ("dualpipe", 4, 9), ("dualpipev", 4, 7), ("zb", 2, 4),
                ("interleaved", 4, 6)):
        with pytest.raises(ValueError):
            layout(*bad)


def test_docs_table_is_the_simulators():
    """docs/pipeline_schedules.md holds exactly what `python -m megatron_dsv3.pipeline.simulate --table` prints."""
    import pathlib
    doc = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "pipeline_schedules.md").read_text()
    rows = table_rows(16, 40, PAPER_COSTS)
    assert format_table(rows) in doc
    by = {x["name"]: x for x in rows}
    assert by["DualPipe"]["bubble_max"] == 14 and by["DualPipe"]["act"] == 17   # (16/2-1)(3+2-3), PP+1
    assert by["ZB1P"]["bubble_max"] == 15 and by["1F1B"]["bubble_max"] == 45
