"""FP8 GEMMs (megatron_dsv3/fp8/gemm.py) against float64 products of the dequantised operands (quant.py).

On CPU this checks the emulation (the path FP8Linear's CPU tests take); on CUDA the same tests check cuBLAS's
block-scaled GEMM. Tolerances: the exact value is deq(A) deq(B)^T (float64, exact for e4m3 x float32 products);
a float32 accumulation of K products plus a per-128 scaling adds at most ~(K + K/128 + 3) u sum|a_k b_k|
(u = 2^-24) per entry, a bf16 output one more rounding, 2^-9 relative. cuBLAS sums each 128-chunk in the tensor
core's narrower accumulator before promoting it to FP32 (bench/results_fp8.md: 5.5e-4 relative on all-positive
products, flat in K), so on CUDA the bound adds 2^-9 sum|a_k b_k| (measured errors are below 2e-4 of it). A wrong
scale, tile or expert boundary is off by O(1) relative to either bound and fails.
"""
import math

import pytest
import torch

from megatron_dsv3.fp8 import quant
from megatron_dsv3.fp8.gemm import (fp8_gemm, fp8_gemm_emulated, fp8_grouped_gemm, fp8_grouped_wgrad)

U32 = 2.0 ** -24
DEV = "cuda" if torch.cuda.is_available() else "cpu"
CHUNK_ERR = 2.0 ** -9 if DEV == "cuda" else 0.0       # the tensor core's in-chunk accumulation (see above)


def _operands(M, N, K, b_scaling, seed=0, device=DEV):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=g, dtype=torch.float64) * torch.logspace(-2, 2, K, dtype=torch.float64)
    b = torch.randn(N, K, generator=g, dtype=torch.float64)
    qa, sa = quant.quantize_tiles(a)
    qb, sb = quant.quantize_blocks(b) if b_scaling == "blocks" else quant.quantize_tiles(b)
    return [t.to(device) for t in (qa, sa, qb, sb)]


def _bound(qa, sa, qb, sb, b_scaling, out_dtype):
    """Per-entry bound on |fp8_gemm - exact| (see the module docstring)."""
    K = qa.shape[1]
    A = quant.dequantize_tiles(qa.cpu(), sa.cpu(), dtype=torch.float64).abs()
    B = (quant.dequantize_blocks(qb.cpu(), sb.cpu(), dtype=torch.float64) if b_scaling == "blocks" else
         quant.dequantize_tiles(qb.cpu(), sb.cpu(), dtype=torch.float64)).abs()
    mag = A @ B.T
    bound = (K + math.ceil(K / 128) + 3) * U32 * mag + CHUNK_ERR * mag
    if out_dtype != torch.float32:
        exact = quant.dequantized_matmul(qa.cpu(), sa.cpu(), qb.cpu(), sb.cpu(), b_scaling=b_scaling).abs()
        bound = bound + 2.0 ** -8 * (exact + bound)                 # bf16: relative 2^-9, doubled for the margin
    return bound + 1e-30


@pytest.mark.parametrize("b_scaling", ["blocks", "tiles"])
@pytest.mark.parametrize("M,N,K", [(130, 200, 300), (64, 256, 512), (1, 1, 128), (17, 129, 7)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm_matches_float64(M, N, K, b_scaling, out_dtype):
    qa, sa, qb, sb = _operands(M, N, K, b_scaling)
    out = fp8_gemm(qa, sa, qb, sb, out_dtype)
    assert out.shape == (M, N) and out.dtype == out_dtype
    exact = quant.dequantized_matmul(qa.cpu(), sa.cpu(), qb.cpu(), sb.cpu(), b_scaling=b_scaling)
    err = (out.cpu().double() - exact).abs()
    bound = _bound(qa, sa, qb, sb, b_scaling, out_dtype)
    assert (err <= bound).all(), f"max err/bound {(err / bound).max():.3g}"


@pytest.mark.parametrize("b_scaling", ["blocks", "tiles"])
def test_float64_output_is_the_exact_product(b_scaling):
    # float64 out: every step exact except the float64 sums (1e-12 relative on K = 300)
    qa, sa, qb, sb = _operands(40, 140, 300, b_scaling, device="cpu")
    out = fp8_gemm(qa, sa, qb, sb, torch.float64)
    exact = quant.dequantized_matmul(qa, sa, qb, sb, b_scaling=b_scaling)
    torch.testing.assert_close(out, exact, rtol=1e-12, atol=1e-12 * exact.abs().max().item())


def test_emulation_promotes_per_128_chunk():
    """The scales are applied per 128 chunk: a K = 256 operand whose two chunks have scales 2^20 apart still gives
    the exact product (no single combined scale could), and swapping A's two chunk scales changes it."""
    qa, sa, qb, sb = _operands(8, 16, 256, "blocks", device="cpu")
    sa = sa.clone()
    sa[:, 1] *= 2.0 ** 20
    exact = quant.dequantized_matmul(qa, sa, qb, sb)
    out = fp8_gemm_emulated(qa, sa, qb, sb, torch.float32).double()
    assert ((out - exact).abs() <= _bound(qa, sa, qb, sb, "blocks", torch.float32)).all()
    swapped = fp8_gemm_emulated(qa, sa.flip(1).contiguous(), qb, sb, torch.float32).double()
    assert (swapped - exact).abs().max() > 1e-3 * exact.abs().max()


def test_shapes_are_checked():
    qa, sa, qb, sb = _operands(8, 256, 300, "blocks", device="cpu")
    with pytest.raises(ValueError, match="b_scale has shape"):
        fp8_gemm(qa, sa, qb, sb[:1])                               # neither blocks [2, 3] nor tiles [256, 3]
    with pytest.raises(ValueError, match="a_scale has shape"):
        fp8_gemm(qa, sa[:, :2], qb, sb)
    with pytest.raises(ValueError, match="contraction dims differ"):
        fp8_gemm(qa[:, :256], sa[:, :2], qb, sb)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fp8_gemm(qa.float(), sa, qb, sb)
    with pytest.raises(TypeError, match="float32"):
        fp8_gemm(qa, sa.double(), qb, sb)


def _grouped_case(R=300, K=200, N=136, counts=(5, 128, 0, 100, 60), seed=1):
    g = torch.Generator().manual_seed(seed)
    E = len(counts)
    offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)
    assert offs[-1] <= R
    x = torch.randn(R, K, generator=g)
    w = torch.randn(E, N, K, generator=g) * torch.linspace(0.1, 10, E)[:, None, None]
    return x, w, offs


@pytest.mark.parametrize("K", [200, 512])                 # 512: CUDA's per-expert fast path, 200: padded
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_matches_per_expert_float64(out_dtype, K):
    x, w, offs = _grouped_case(K=K)
    qa, sa = quant.quantize_tiles(x)
    qw, sw = zip(*(quant.quantize_blocks(we) for we in w))
    qw, sw = torch.stack(qw), torch.stack(sw)
    out = fp8_grouped_gemm(qa.to(DEV), sa.to(DEV), qw.to(DEV), sw.to(DEV), offs.to(DEV), out_dtype).cpu()
    assert out.shape == (x.shape[0], w.shape[1])
    a = 0
    for e, b in enumerate(offs.tolist()):
        exact = quant.dequantized_matmul(qa[a:b], sa[a:b], qw[e], sw[e])
        bound = _bound(qa[a:b], sa[a:b], qw[e], sw[e], "blocks", out_dtype)
        assert ((out[a:b].double() - exact).abs() <= bound).all(), f"expert {e}"
        a = b
    assert (out[a:] == 0).all()                                      # rows past the last expert


def test_grouped_gemm_checks_offsets():
    x, w, offs = _grouped_case()
    qa, sa = quant.quantize_tiles(x)
    qw, sw = zip(*(quant.quantize_blocks(we) for we in w))
    qw, sw = torch.stack(qw), torch.stack(sw)
    with pytest.raises(ValueError, match="one cumulative end per expert"):
        fp8_grouped_gemm(qa, sa, qw, sw, offs[:-1])
    with pytest.raises(ValueError, match="non-decreasing"):
        fp8_grouped_gemm(qa, sa, qw, sw, offs.flip(0))
    with pytest.raises(ValueError, match="b_scale has shape"):
        fp8_grouped_gemm(qa, sa, qw, sw[:, :1], offs)


def test_columns_grouped_layout():
    """quantize_columns_grouped = quantize_columns of each expert's rows, transposed, at 128-aligned columns,
    zero padded (scale 1.0), bit for bit."""
    x, _, offs = _grouped_case()
    qt, st, offs_p = quant.quantize_columns_grouped(x, offs)
    assert offs_p.tolist() == [128, 256, 256, 384, 512]
    assert qt.shape == (x.shape[1], 512) and st.shape == (x.shape[1], 4)
    a = a_p = 0
    for b, b_p in zip(offs.tolist(), offs_p.tolist()):
        n = b - a
        if n:
            q, s = quant.quantize_columns(x[a:b])                       # [n, K], [ceil(n/128), K]
            assert torch.equal(qt[:, a_p:a_p + n].view(torch.uint8), q.t().view(torch.uint8))
            assert torch.equal(st[:, a_p // 128:b_p // 128], s.t())
        assert (qt[:, a_p + n:b_p].float() == 0).all()
        a, a_p = b, b_p


def check_expert_wgrad(dw_e, dy_e, x_e, out_dtype, chunk_err: float, msg: str) -> None:
    """dW_e against the independent reference: dy_e and x_e quantised per 128x1 column tile on their own,
    dequantised in float64, dy_e^T x_e; bound: FP32 accumulation over the expert's n tokens plus one promotion per
    128, the tensor core's in-chunk error (chunk_err), and one rounding of a 16-bit output."""
    qd, sd = quant.quantize_columns(dy_e)
    qx, sx = quant.quantize_columns(x_e)
    D = quant.dequantize_columns(qd, sd, dtype=torch.float64)
    X = quant.dequantize_columns(qx, sx, dtype=torch.float64)
    exact, mag = D.T @ X, D.abs().T @ X.abs()
    n = dy_e.shape[0]
    bound = (n + math.ceil(n / 128) + 3) * U32 * mag + chunk_err * mag
    if out_dtype != torch.float32:
        bound = bound + 2.0 ** -8 * (exact.abs() + bound)
    assert ((dw_e.double() - exact).abs() <= bound + 1e-30).all(), msg


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_grouped_wgrad_matches_per_expert_float64(out_dtype):
    x, w, offs = _grouped_case()
    g = torch.Generator().manual_seed(7)
    dy = torch.randn(x.shape[0], w.shape[1], generator=g) * 1e-3
    dqt, dst, offs_p = quant.quantize_columns_grouped(dy, offs)
    xqt, xst, _ = quant.quantize_columns_grouped(x, offs)
    dw = fp8_grouped_wgrad(dqt.to(DEV), dst.to(DEV), xqt.to(DEV), xst.to(DEV), offs_p.to(DEV), out_dtype).cpu()
    assert dw.shape == (len(offs), dy.shape[1], x.shape[1]) and dw.dtype == out_dtype
    a = 0
    for e, b in enumerate(offs.tolist()):
        if b == a:
            assert (dw[e] == 0).all()
            continue
        check_expert_wgrad(dw[e], dy[a:b], x[a:b], out_dtype, CHUNK_ERR, f"expert {e}")
        # and the FP8 product is close to the unquantised one (e4m3: ~2^-4 per element, averaged over n tokens)
        true = dy[a:b].double().T @ x[a:b].double()
        assert (dw[e].double() - true).norm() < 0.05 * true.norm()
        a = b
