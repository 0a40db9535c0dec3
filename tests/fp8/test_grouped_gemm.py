"""The Triton grouped FP8 GEMMs (fp8/grouped_gemm.py: Fprop/Dgrad and Wgrad) against the float64 product of the dequantised operands, expert
by expert, and against gemm.py's grouped GEMM (the emulation on CPU, cuBLAS per expert on the H200). Runs on CPU
through Triton's interpreter (fixture triton_device).

Bound: tests/fp8/test_gemm.py's (float32 accumulation of K products with a per-128 promotion, bf16 output rounding;
on CUDA the tensor core's in-chunk accumulator). The experts' weights differ in scale by 100x, so a row computed
with its neighbour expert's weight, a tile spanning two experts, a wrong K block's scale or a missing tail zero is off
by O(1) and fails."""
import pytest
import torch

from megatron_dsv3.fp8 import quant
from megatron_dsv3.fp8.gemm import fp8_grouped_gemm, fp8_grouped_wgrad
from megatron_dsv3.fp8.grouped_gemm import (TileSchedule, fp8_grouped_gemm_triton, fp8_grouped_wgrad_triton,
                                            tile_schedule)

from tests.fp8.test_gemm import _bound, check_expert_wgrad


def _case(counts, N, K, tail=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    E = len(counts)
    offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)
    R = int(offs[-1]) + tail if E else tail
    x = torch.randn(R, K, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, K, dtype=torch.float64)
    w = torch.randn(E, N, K, generator=g, dtype=torch.float64) * torch.logspace(-1, 1, max(E, 1))[:E, None, None]
    qa, sa = quant.quantize_tiles(x)
    qs = [quant.quantize_blocks(we) for we in w]
    qw = torch.stack([q for q, _ in qs]) if E else torch.empty(0, N, K, dtype=quant.FP8)
    sw = torch.stack([s for _, s in qs]) if E else torch.empty(0, -(-N // 128), -(-K // 128))
    return qa, sa, qw, sw, offs


def _check_against_float64(out, qa, sa, qw, sw, offs, out_dtype):
    a = 0
    for e, b in enumerate(offs.tolist()):
        if b > a:
            exact = quant.dequantized_matmul(qa[a:b], sa[a:b], qw[e], sw[e])
            bound = _bound(qa[a:b], sa[a:b], qw[e], sw[e], "blocks", out_dtype)
            err = (out[a:b].double() - exact).abs()
            assert (err <= bound).all(), f"expert {e}: max err/bound {(err / bound).max():.3g}"
        a = b
    assert (out[a:] == 0).all()                                      # rows past the last expert


@pytest.mark.parametrize("counts, N, K, tail, block_m", [
    ([70, 0, 130, 1, 64], 200, 200, 5, 64),      # ragged, an empty expert, a 1-row expert, N and K off the grid, tail
    ([0, 128, 96], 128, 384, 0, 128),            # first expert empty, exact tiles, 3 K blocks
    ([33], 136, 128, 40, 32),                    # one expert and a tail longer than it
])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_triton_grouped_gemm_matches_float64_and_gemm_py(triton_device, counts, N, K, tail, block_m, out_dtype):
    qa, sa, qw, sw, offs = _case(counts, N, K, tail)
    dev = triton_device
    sa_mm = sa.t().contiguous().t()                                 # the quantisers' (1, R) scale layout
    out = fp8_grouped_gemm_triton(qa.to(dev), sa_mm.to(dev), qw.to(dev), sw.to(dev), offs.to(dev), out_dtype,
                                  block_m=block_m).cpu()
    assert out.shape == (qa.shape[0], N) and out.dtype == out_dtype
    _check_against_float64(out, qa, sa, qw, sw, offs, out_dtype)
    ref = fp8_grouped_gemm(qa.to(dev), sa.to(dev), qw.to(dev), sw.to(dev), offs.to(dev), out_dtype).cpu()
    # the same arithmetic up to the order of the float32 sums inside a chunk (and a bf16 rounding it may flip); on
    # CUDA the reference is cuBLAS, whose in-chunk accumulation is narrower than float32 (~5.5e-4 relative,
    # bench/results_fp8.md; seen 8.6e-5 of max |ref| on the H200 for the N = 136 case), while the Triton kernel is
    # the one checked against float64 above
    tol = 1e-5 if out_dtype == torch.float32 else 2 ** -7
    atol = (1e-5 if dev == "cpu" else 1e-3) * ref.float().abs().max().item()
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=atol)


@pytest.mark.parametrize("group_m", [1, 2, 3, 8])
def test_grouped_program_order_gives_the_same_bits(triton_device, group_m):
    """group_m > 0 (groups of row tiles sweeping every column tile: L2 reuse) against the 2-D order: every program
    still computes one tile of one expert, bit for bit the same; groups that do not divide the tiles, the tail and
    the programs past the last tile included."""
    qa, sa, qw, sw, offs = [t.to(triton_device) for t in _case([70, 0, 130, 1, 64], 200, 200, tail=5)]
    want = fp8_grouped_gemm_triton(qa, sa, qw, sw, offs, torch.float32, block_m=32, group_m=0)
    got = fp8_grouped_gemm_triton(qa, sa, qw, sw, offs, torch.float32, block_m=32, group_m=group_m)
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="group_m"):
        fp8_grouped_gemm_triton(qa, sa, qw, sw, offs, group_m=-1)


def test_grouped_wide_column_tiles(triton_device):
    """block_n = 256 (two B scale blocks per program: a scale per column) within the float64 bound, and equal to
    block_n = 128 (one scalar scale) up to the order of the float32 sums inside a chunk (the interpreter's dot is a
    BLAS matmul whose order follows the tile shape); N off the 256 grid (200, 328) masks the second block."""
    for N in (200, 328):
        case = _case([70, 0, 130, 1, 64], N, 256, tail=5)
        qa, sa, qw, sw, offs = [t.to(triton_device) for t in case]
        want = fp8_grouped_gemm_triton(qa, sa, qw, sw, offs, torch.float32, block_m=32)
        got = fp8_grouped_gemm_triton(qa, sa, qw, sw, offs, torch.float32, block_m=32, block_n=256)
        _check_against_float64(got.cpu(), *case, torch.float32)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    with pytest.raises(ValueError, match="block_n"):
        fp8_grouped_gemm_triton(qa, sa, qw, sw, offs, block_n=192)


def test_triton_grouped_gemm_no_experts_with_rows_and_no_rows(triton_device):
    qa, sa, qw, sw, offs = _case([0, 0], 128, 128, tail=7)
    out = fp8_grouped_gemm_triton(qa.to(triton_device), sa.to(triton_device), qw.to(triton_device),
                                  sw.to(triton_device), offs.to(triton_device))
    assert out.shape == (7, 128) and (out == 0).all()
    qa, sa, qw, sw, offs = _case([0, 0], 128, 128, tail=0)
    assert fp8_grouped_gemm_triton(qa.to(triton_device), sa.to(triton_device), qw.to(triton_device),
                                   sw.to(triton_device), offs.to(triton_device)).shape == (0, 128)


def test_tile_schedule_keeps_each_tile_in_one_expert():
    offs = torch.tensor([70, 70, 200, 201], dtype=torch.int32)
    starts, ends, tile_end = tile_schedule(offs, rows=210, block_m=64)
    assert starts.tolist() == [0, 70, 70, 200, 201] and ends.tolist() == [70, 70, 200, 201, 210]
    assert tile_end.tolist() == [2, 2, 5, 6, 7]                    # 2 + 0 + ceil(130/64) + 1 + tail 1
    assert int(tile_end[-1]) <= -(-210 // 64) + len(offs) + 1     # the launch grid's bound


def test_shapes_are_checked():
    qa, sa, qw, sw, offs = _case([10, 20], 128, 256)
    with pytest.raises(ValueError, match="shapes"):
        fp8_grouped_gemm_triton(qa, sa[:, :1], qw, sw, offs)
    with pytest.raises(ValueError, match="offs"):
        fp8_grouped_gemm_triton(qa, sa, qw, sw, offs[:1])
    with pytest.raises(TypeError):
        fp8_grouped_gemm_triton(qa.float(), sa, qw, sw, offs)


def test_fp8_experts_through_the_triton_grouped_gemm(triton_device, monkeypatch):
    """FP8Config.grouped_gemm = "triton" end to end in the experts (Fprop h1, y; Dgrad da, dx; Wgrad): the same outputs and
    gradients as the host loop up to the float32 summation order (bf16 outputs: a rounding flip, 2^-7 relative)."""
    from megatron_dsv3.fp8 import grouped_gemm
    from megatron_dsv3.fp8.experts import fp8_expert_mlp

    launches, schedules = [], []
    orig = grouped_gemm.fp8_grouped_gemm_triton
    monkeypatch.setattr(grouped_gemm, "fp8_grouped_gemm_triton", lambda *a, **k: (launches.append(1), orig(*a, **k))[1])
    orig_s = grouped_gemm.tile_schedule
    monkeypatch.setattr(grouped_gemm, "tile_schedule", lambda *a, **k: (schedules.append(1), orig_s(*a, **k))[1])
    wgrads = []
    orig_w = grouped_gemm.fp8_grouped_wgrad_triton
    monkeypatch.setattr(grouped_gemm, "fp8_grouped_wgrad_triton", lambda *a, **k: (wgrads.append(1), orig_w(*a, **k))[1])
    g = torch.Generator().manual_seed(5)
    E, h, f = 3, 256, 128
    counts = torch.tensor([90, 0, 40])
    w1 = torch.randn(E, h, 2 * f, generator=g).bfloat16().to(triton_device).requires_grad_()
    w2 = torch.randn(E, f, h, generator=g).bfloat16().to(triton_device).requires_grad_()
    x0 = torch.randn(130, h, generator=g).bfloat16().to(triton_device)
    dy = torch.randn(130, h, generator=g).bfloat16().to(triton_device)
    res = {}
    for backend in ("host_loop", "triton"):
        x = x0.clone().requires_grad_()
        y = fp8_expert_mlp(x, counts.to(triton_device), w1, w2, grouped_gemm=backend)
        y.backward(dy)
        res[backend] = [t.detach().float().cpu() for t in (y, x.grad, w1.grad, w2.grad)]
        w1.grad = w2.grad = None
    for a, b in zip(res["triton"], res["host_loop"]):
        scale = b.abs().max().item()
        assert ((a - b).abs() <= 2 ** -7 * b.abs() + 1e-3 * scale).all(), ((a - b).abs().max().item(), scale)
    assert len(launches) == 4                               # h1, y (Fprop), da, dx (Dgrad): all four through it
    assert len(wgrads) == 2                                 # dW1, dW2
    assert len(schedules) == 1                              # their row-tile schedule made once for the layer


def test_a_schedule_made_for_other_rows_is_refused(triton_device):
    qa, sa, qw, sw, offs = [t.to(triton_device) for t in _case([70, 0, 130], 128, 128, tail=5)]
    sched = TileSchedule.of(offs, qa.shape[0])
    want = fp8_grouped_gemm_triton(qa, sa, qw, sw, offs, torch.float32)
    assert torch.equal(fp8_grouped_gemm_triton(qa, sa, qw, sw, offs, torch.float32, schedule=sched), want)
    with pytest.raises(ValueError, match="schedule was made for 205 rows in tiles of 64, this GEMM has 205 rows in "
                                         "tiles of 32"):
        fp8_grouped_gemm_triton(qa, sa, qw, sw, offs, block_m=32, schedule=sched)


@pytest.mark.gpu
def test_triton_grouped_gemm_makes_no_host_sync():
    """The point of the device-side schedule: CUDA's sync debug mode raises on any synchronising call."""
    qa, sa, qw, sw, offs = [t.cuda() for t in _case([100, 0, 300, 7], 256, 512, tail=9)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = fp8_grouped_gemm_triton(qa, sa, qw, sw, offs)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    _check_against_float64(out.cpu(), qa.cpu(), sa.cpu(), qw.cpu(), sw.cpu(), offs.cpu(), torch.bfloat16)


@pytest.mark.gpu
def test_fp8_experts_make_no_host_sync():
    """The whole FP8 expert block on the Triton path, forward and backward (with a .grad to add into), under CUDA's
    sync debug mode: the row tiles' bound, the device-side GEMM schedules and the in-place Wgrad read nothing back."""
    from megatron_dsv3.fp8.experts import fp8_expert_mlp
    g = torch.Generator().manual_seed(9)
    counts = torch.tensor([90, 0, 300, 7]).cuda()
    x = torch.randn(397, 256, generator=g).bfloat16().cuda().requires_grad_()
    s = torch.rand(397, generator=g).cuda().requires_grad_()
    w1 = (0.1 * torch.randn(4, 256, 512, generator=g)).bfloat16().cuda().requires_grad_()
    w2 = (0.1 * torch.randn(4, 256, 256, generator=g)).bfloat16().cuda().requires_grad_()
    dy = torch.randn(397, 256, generator=g).bfloat16().cuda()
    for w in (w1, w2):
        w.grad = torch.zeros_like(w)
    fp8_expert_mlp(x, counts, w1, w2, grouped_gemm="triton", row_scale=s).backward(dy)   # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fp8_expert_mlp(x, counts, w1, w2, grouped_gemm="triton", row_scale=s).backward(dy)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("counts", [[70, 0, 200, 1], [0, 0, 128]])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_triton_grouped_wgrad_matches_float64_and_gemm_py(triton_device, counts, out_dtype):
    """dW[e] = dy_e^T x_e over expert e's tokens in 128x1 tiles restarting at its first token; an expert without
    tokens gets zeros (the output starts as garbage: torch.empty). Bound: test_gemm's wgrad bound."""
    g = torch.Generator().manual_seed(11)
    N, K = 200, 136
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    R = int(offs[-1]) + 3
    x = torch.randn(R, K, generator=g, dtype=torch.float64)
    dy = torch.randn(R, N, generator=g, dtype=torch.float64) * torch.logspace(-2, 2, R, dtype=torch.float64)[:, None]
    dqt, dst, offs_p = quant.quantize_columns_grouped(dy, offs)
    xqt, xst, _ = quant.quantize_columns_grouped(x, offs)
    dev = triton_device
    out = torch.full((len(counts), N, K), float("nan"), dtype=out_dtype, device=dev)
    dw = fp8_grouped_wgrad_triton(dqt.to(dev), dst.t().contiguous().t().to(dev), xqt.to(dev), xst.to(dev),
                                  offs_p.to(dev), out_dtype, out=out)
    assert dw is out
    dw = dw.cpu()
    ref = fp8_grouped_wgrad(dqt.to(dev), dst.to(dev), xqt.to(dev), xst.to(dev), offs_p.to(dev), out_dtype).cpu()
    a = 0
    for e, b in enumerate(offs.tolist()):
        if b == a:
            assert (dw[e] == 0).all()
            continue
        check_expert_wgrad(dw[e], dy[a:b], x[a:b], out_dtype, 2.0 ** -9 if dev == "cuda" else 0.0, f"expert {e}")
        a = b
    tol = 1e-5 if out_dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(dw.float(), ref.float(), rtol=tol, atol=1e-5 * ref.float().abs().max().item())
    for bm, bn in ((64, 256), (256, 128)):     # other program tiles: the same up to the in-chunk sum order
        other = fp8_grouped_wgrad_triton(dqt.to(dev), dst.to(dev), xqt.to(dev), xst.to(dev), offs_p.to(dev),
                                         out_dtype, block_m=bm, block_n=bn).cpu()
        torch.testing.assert_close(other.float(), dw.float(), rtol=tol, atol=1e-6 * dw.float().abs().max().item())


@pytest.mark.parametrize("backend", ["triton", "host_loop"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_wgrad_accumulates_into_the_buffer(triton_device, backend, out_dtype):
    """accumulate=True: buf[e] += dW[e], each element old + new in FP32 rounded once (bit-equal to that sum of the
    fresh FP32 result), an expert without tokens untouched; without out it refuses."""
    g = torch.Generator().manual_seed(12)
    N, K, counts = 136, 200, [70, 0, 130]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    R = int(offs[-1])
    dqt, dst, offs_p = quant.quantize_columns_grouped(torch.randn(R, N, generator=g), offs)
    xqt, xst, _ = quant.quantize_columns_grouped(torch.randn(R, K, generator=g), offs)
    dev = triton_device if backend == "triton" else "cpu"
    ops = [t.to(dev) for t in (dqt, dst, xqt, xst, offs_p)]
    fresh = fp8_grouped_wgrad(*ops, torch.float32, backend=backend).cpu()
    before = torch.randn(len(counts), N, K, generator=g).to(out_dtype)
    buf = before.clone().to(dev)
    got = fp8_grouped_wgrad(*ops, out_dtype, out=buf, backend=backend, accumulate=True)
    assert got is buf
    want = (before.float() + fresh).to(out_dtype)
    assert torch.equal(buf.cpu()[1], before[1])                       # the empty expert: left as it was
    assert torch.equal(buf.cpu(), want)
    with pytest.raises(ValueError, match="accumulate=True needs out"):
        fp8_grouped_wgrad(*ops, out_dtype, backend=backend, accumulate=True)
