"""Triton quantisers (megatron_dsv3/fp8/kernels.py) against quant.py, bit for bit: the e4m3 bytes and the float32
scales must be identical (no tolerance: the kernels follow the reference's arithmetic order exactly). On machines
without CUDA they run under Triton's interpreter (fixture triton_device), so shapes stay small."""
import pytest
import torch

from megatron_dsv3.fp8 import kernels, quant

# the interpreter evaluates 0/0 and inf/inf of the NaN/inf tiles in numpy, which warns, and so does _scale's
# 448 * 2^120 (= inf, rightly: no amax is above it) for the tile of -3e38
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")]

if kernels.HAVE_TRITON:
    import triton
    import triton.language as tl

    from megatron_dsv3.fp8.kernels import _qdiv, _recip

    @triton.jit
    def _qdiv_kernel(x_ptr, s_ptr, out_ptr, N, POW2: tl.constexpr, HW: tl.constexpr, B: tl.constexpr):
        o = tl.program_id(0) * B + tl.arange(0, B)
        m = o < N
        a, sa, y = _recip(tl.load(s_ptr + o, mask=m, other=1.0))
        tl.store(out_ptr + o, _qdiv(tl.load(x_ptr + o, mask=m, other=0.0), a, sa, y, POW2, HW), mask=m)


def _qdiv_elementwise(x, s, pow2):
    """kernels._qdiv(x, *kernels._recip(s)) elementwise (x, s float32 [N]): the column quantiser's x / s."""
    out = torch.empty_like(x)
    _qdiv_kernel[(triton.cdiv(x.numel(), 1024),)](x, s, out, x.numel(), POW2=pow2, HW=x.is_cuda, B=1024)
    return out


def _qdiv_pairs(n, pow2, seed=0):
    """n (x, s) float32 pairs as the quantisers meet them, the hard ones for a division done as a multiply: s as
    quant's scales make them (2^-149 .. 2^120, powers of 2 with pow2, 2% inf, 2% NaN), |x| <= ~512 s, a sixth each
    of: quotients next to float32 midpoints (where an ulp of error shows in the float32 bits), next to e4m3 rounding
    boundaries (where it shows in the e4m3 byte), uniform over 40 binades, subnormal x, signed zeros, +-448 s;
    inf x with half the inf scales."""
    g = torch.Generator().manual_seed(seed)

    def ri(lo, hi):
        return torch.randint(lo, hi, (n,), generator=g).double()

    e = ri(-149, 120)
    s = 2.0 ** e if pow2 else (1 + torch.rand(n, generator=g, dtype=torch.float64)) * 2.0 ** e
    s = torch.clamp(s.float(), min=2.0 ** -149)
    s = torch.where(torch.rand(n, generator=g) < 0.02, float("inf"), s)
    s = torch.where(torch.rand(n, generator=g) < 0.02, float("nan"), s)
    sd = s.double()
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    f32_mid = (ri(2 ** 23, 2 ** 24) + 0.5) * 2.0 ** (ri(-30, 9) - 23)
    e4m3_edge = torch.where(torch.rand(n, generator=g) < 0.2, ri(0, 8) + 0.5, ri(8, 16) + 0.5) * 2.0 ** ri(-9, 6)
    e4m3_x = (e4m3_edge * sd * sign).float()
    e4m3_x = torch.nextafter(e4m3_x, torch.where(torch.rand(n, generator=g) < 0.5, 0.0, float("inf")).float())
    kinds = torch.stack([
        (f32_mid * sd * sign).float(),
        e4m3_x,
        ((torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * 449 * 2.0 ** -ri(0, 40) * sd).float(),
        (ri(-2 ** 23, 2 ** 23) * 2.0 ** -149).float(),
        torch.where(torch.rand(n, generator=g) < 0.5, -0.0, 0.0),
        (448 * sd * sign).float()])
    x = kinds[torch.randint(0, len(kinds), (n,), generator=g), torch.arange(n)]
    x = torch.where(torch.isinf(s) & (torch.rand(n, generator=g) < 0.5), float("inf") * sign.float(), x)
    return torch.where(torch.isinf(x) & ~torch.isinf(s), 0.0, x), s


def _bytes(q):
    b = q.view(torch.uint8).clone()
    b[b == 0xFF] = 0x7F          # e4m3fn's NaN either sign: which one a NaN gets is the hardware's choice
    return b


def _same(got, ref):
    assert got.shape == ref.shape and got.dtype == ref.dtype
    if got.dtype == quant.FP8:
        mism = (_bytes(got) != _bytes(ref)).sum().item()
        assert mism == 0, f"{mism} e4m3 bytes differ"
    else:
        assert torch.equal(got.isnan(), ref.isnan())
        assert torch.equal(got.nan_to_num(), ref.nan_to_num()), f"max diff {(got - ref).abs().nan_to_num().max()}"


def _hard_input(M, K, dtype, device, seed=0):
    """Random data over 12 binades with what the edge cases of quant.py's docstring need: an all-zero tile, one
    tile whose amax underflows amax/448, a NaN, an inf, a 1e4 outlier, a tile of subnormal-scale values; and
    signed zeros, a -3e38 outlier and a row scaled by 1e20 (scales near the top of float32's range)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.logspace(-6, 6, K)[None, :].roll(seed, 1)
    x[torch.rand(M, K, generator=g) < 0.02] = -0.0          # e4m3 0x80, which an fma or x * 0 may turn into +0
    if M > 20 and K > 130:
        x[:, 128:256] = 0                        # zero tiles (rows) and zero column tiles
        x[3, 5] = float("nan")
        x[9, K - 1] = float("inf")
        x[12, 3] = 1e4
        x[20, :128] = 1e-44                      # amax / 448 underflows: scale 2^-149
        x[21, :128] = 3e-37                      # a subnormal scale (pow2: through the exponent bits); a normal
        #                                          bf16 input (Triton's interpreter mis-converts bf16 subnormals)
        x[15, 70] = -3e38                        # near float32's top: a row tile's and a column tile's scale ~2^119
    if M > 100:
        x[100] *= 1e20                           # a row of large values (column tiles of mixed magnitude)
    return x.to(dtype).to(device)


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K", [(130, 300), (1, 7), (64, 256)])
def test_quantize_tiles_bit_exact(triton_device, M, K, dtype, pow2):
    from megatron_dsv3.fp8.kernels import quantize_tiles_triton
    x = _hard_input(M, K, dtype, triton_device)
    q, s = quantize_tiles_triton(x, pow2)
    rq, rs = quant.quantize_tiles(x, pow2_scales=pow2)
    _same(q, rq)
    _same(s, rs)


def test_quantize_tiles_leading_dims_and_strides(triton_device):
    from megatron_dsv3.fp8.kernels import quantize_tiles_triton
    x = _hard_input(6, 200, torch.float32, triton_device, seed=3)
    x3 = x.view(2, 3, 200)
    for got, ref in zip(quantize_tiles_triton(x3), quant.quantize_tiles(x3)):
        _same(got, ref)
    xs = _hard_input(6, 400, torch.float32, triton_device, seed=4)[:, 50:250]      # a strided row view
    for got, ref in zip(quantize_tiles_triton(xs, True), quant.quantize_tiles(xs, pow2_scales=True)):
        _same(got, ref)


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])      # float32: the block kernel's GPU bug was
@pytest.mark.parametrize("M,K", [(130, 300), (128, 128), (5, 140),      # float32-only (test_weight_block_dispatch...)
                                 (300, 200), (1, 128)])
def test_quantize_tiles_and_transpose_bit_exact(triton_device, M, K, pow2, dtype):
    """The reference's bytes and scales, in the GEMM's scale layout, at ragged shapes in both dims (NaN, zero
    tiles, outliers: _hard_input)."""
    from megatron_dsv3.fp8.kernels import quantize_tiles_and_transpose_triton
    x = _hard_input(M, K, dtype, triton_device, seed=1)
    q, s, qt, st = quantize_tiles_and_transpose_triton(x, pow2)
    assert qt.shape == (K, M) and st.shape == (K, -(-M // 128))
    assert s.stride() == (1, M) and st.stride() == (1, K)
    rq, rs = quant.quantize_tiles(x, pow2_scales=pow2)
    rqt, rst = quant.quantize_tiles(x.t().contiguous(), pow2_scales=pow2)         # independent of quant's helper
    for got, ref in ((q, rq), (s, rs), (qt, rqt), (st, rst)):
        _same(got, ref)


@pytest.mark.parametrize("pow2", [False, True])
def test_division_free_quotient_is_the_correctly_rounded_division(triton_device, pow2):
    """The column quantiser's x / s without a division (kernels._qdiv): the float32 quotient bit for bit torch's
    correctly rounded x / s wherever |x / s| >= 2^-12 (below, e4m3 is +-0 either way and an ulp may differ), the
    same e4m3 byte (after the clamp) for every pair, NaN exactly where the division gives NaN. Under the
    interpreter this also checks kernels._fma's exact emulation: with a float32 a * b + c in its place about 4,000
    of these quotients and 200 of their e4m3 bytes come out wrong."""
    x, s = _qdiv_pairs(1 << 16, pow2)
    got = _qdiv_elementwise(x.to(triton_device), s.to(triton_device), pow2).cpu()
    ref = x / s
    nan = ref.isnan()
    assert torch.equal(got.isnan(), nan)
    big = (ref.abs() >= 2.0 ** -12) & ~nan
    off = got.view(torch.int32) != ref.view(torch.int32)
    assert int((off & big).sum()) == 0, f"{int((off & big).sum())} of {int(big.sum())} quotients off"
    e4m3 = [_bytes(t.clamp(-448, 448).to(quant.FP8)) for t in (got, ref)]
    assert torch.equal(e4m3[0], e4m3[1]), f"{int((e4m3[0] != e4m3[1]).sum())} e4m3 bytes differ"


@pytest.mark.parametrize("pow2", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("counts", [(5, 115, 0, 10), (128, 2), (0, 0), (140,),
                                    (0, 1, 129, 0, 40, 1),       # empty first expert, 1 row, 129 rows (2 tiles)
                                    (129, 128, 1, 42)])          # every row of x
def test_quantize_columns_grouped_bit_exact(triton_device, counts, dtype, pow2):
    """Per-expert 128x1 column tiles against quant.py: the same bytes, zeros in the padding."""
    from megatron_dsv3.fp8.kernels import quantize_columns_grouped_triton
    x = _hard_input(300, 300, dtype, triton_device, seed=2)
    offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32).to(triton_device)
    qt, st, offs_p = quantize_columns_grouped_triton(x, offs, pow2)
    rqt, rst, roffs_p = quant.quantize_columns_grouped(x, offs, pow2_scales=pow2)
    assert torch.equal(offs_p, roffs_p)
    _same(qt, rqt)
    _same(st, rst)


@pytest.mark.parametrize("pow2", [False, True])
def test_column_kernel_int64_addressing_gives_the_same_bytes(triton_device, monkeypatch, pow2):
    """The column kernel takes int64 offsets only where one can pass 2^31 (x or qt of > 2^31 elements, too large for
    a test): with the threshold at 0 every launch takes that path, and must give the reference's bytes."""
    monkeypatch.setattr(kernels, "_I32_MAX", 0)
    x = _hard_input(300, 200, torch.bfloat16, triton_device, seed=6)
    for got, ref in zip(kernels.quantize_tiles_and_transpose_triton(x, pow2),
                        quant.quantize_tiles_and_transpose(x, pow2_scales=pow2)):
        _same(got, ref)
    offs = torch.tensor([0, 1, 129, 0, 40, 1], dtype=torch.int64).cumsum(0).to(torch.int32).to(triton_device)
    for got, ref in zip(kernels.quantize_columns_grouped_triton(x, offs, pow2),
                        quant.quantize_columns_grouped(x, offs, pow2_scales=pow2)):
        _same(got, ref)


def test_quantize_columns_grouped_reuses_its_row_tiles(triton_device, monkeypatch):
    """The FP8 experts make grouped_row_tiles once a layer (the host read) and hand it to the four column
    quantisations: with it given, the kernel reads nothing back and gives the same bytes for another input."""
    from megatron_dsv3.fp8 import kernels
    offs = torch.tensor([5, 120, 120, 150], dtype=torch.int32, device=triton_device)
    row_tiles = kernels.grouped_row_tiles(offs)
    monkeypatch.setattr(kernels, "grouped_row_tiles", lambda *a: pytest.fail("row tiles made again"))
    for seed, cols in ((3, 300), (4, 128)):
        x = _hard_input(150, cols, torch.float32, triton_device, seed=seed)
        got = kernels.quantize_columns_grouped_triton(x, offs, True, row_tiles=row_tiles)
        for g, r in zip(got, quant.quantize_columns_grouped(x, offs, pow2_scales=True)):
            _same(g, r)


@pytest.mark.parametrize("counts, rows", [([5, 115, 0, 30], 150), ([0, 0, 129, 1], 140), ([128, 128], 256)])
def test_bounded_row_tiles_need_no_host_read_and_give_the_same_operands(triton_device, counts, rows):
    """bounded_row_tiles (what the FP8 experts use): made on the meta device (any read of offs back to the host
    would raise), its column quantisation equals the exact layout's on the exact columns, zero columns (scale 1)
    after them, and the same padded offsets."""
    from megatron_dsv3.fp8 import kernels
    offs = torch.tensor(counts, dtype=torch.int64).cumsum(0).to(torch.int32)
    meta = kernels.bounded_row_tiles(offs.to("meta"), rows)
    E, J = len(counts), -(-rows // 128) + len(counts)
    assert [tuple(t.shape) for t in meta[:3]] == [(E,), (J,), (J,)] and meta[3] == 128 * J
    x = _hard_input(rows, 300, torch.float32, triton_device, seed=5)
    offs = offs.to(triton_device)
    qt, st, offs_p = kernels.quantize_columns_grouped_triton(x, offs, True,
                                                             row_tiles=kernels.bounded_row_tiles(offs, rows))
    rqt, rst, roffs_p = quant.quantize_columns_grouped(x, offs, pow2_scales=True)
    Rp = rqt.shape[1]
    assert torch.equal(offs_p, roffs_p) and qt.shape[1] == 128 * J >= Rp
    _same(qt[:, :Rp], rqt)
    _same(st[:, :Rp // 128], rst)
    assert not qt[:, Rp:].view(torch.uint8).any() and bool((st[:, Rp // 128:] == 1).all())


def test_dispatchers_use_the_reference_off_cuda():
    from megatron_dsv3.fp8 import kernels
    x = _hard_input(40, 150, torch.float32, "cpu")
    for got, ref in zip(kernels.quantize_tiles_and_transpose_fast(x, True),
                        quant.quantize_tiles_and_transpose(x, pow2_scales=True)):
        _same(got, ref)
    for got, ref in zip(kernels.quantize_tiles_fast(x), quant.quantize_tiles(x)):
        _same(got, ref)


@pytest.mark.parametrize("shape", [(200, 300), (128, 256), (3, 130, 260)])
@pytest.mark.parametrize("pow2", [False, True])
def test_quantize_blocks_triton_bit_exact_with_its_transpose(triton_device, shape, pow2):
    """quantize_blocks_triton = quant.quantize_blocks per weight (bytes and scales), with a zero block, NaN, inf,
    underflowing and subnormal-scale blocks; the transposed copy = the reference's bytes and scales transposed."""
    from megatron_dsv3.fp8.kernels import quantize_blocks_triton
    w = _hard_input(shape[-2] * (shape[0] if len(shape) == 3 else 1), shape[-1], torch.bfloat16, "cpu")
    w = w.view(shape).to(triton_device)
    q, s, qt, st = quantize_blocks_triton(w, pow2_scales=pow2, transpose=True)
    ws = w if w.dim() == 3 else w[None]
    qs, ss, qts, sts = (q, s, qt, st) if w.dim() == 3 else (q[None], s[None], qt[None], st[None])
    for e in range(ws.shape[0]):
        rq, rs = quant.quantize_blocks(ws[e].cpu(), pow2_scales=pow2)
        _same(qs[e].cpu(), rq)
        _same(ss[e].cpu(), rs)
        _same(qts[e].cpu(), rq.t().contiguous())
        _same(sts[e].cpu(), rs.t().contiguous())
    q2, s2 = quantize_blocks_triton(w, pow2_scales=pow2)
    _same(q2.cpu(), q.cpu())
    qt3, st3 = quantize_blocks_triton(w, pow2_scales=pow2, transpose=True, straight=False)   # W^T's blocks alone
    _same(qt3.cpu(), qt.cpu())
    _same(st3.cpu(), st.cpu())
    with pytest.raises(ValueError, match="straight=False needs transpose=True"):
        quantize_blocks_triton(w, straight=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_block_dispatch_on_cuda_is_bit_exact(dtype):
    """What the FP8 layers call for their weights (both copies), for the weight dtypes training uses: float32 input
    once came back with wrong bytes and NaNs from the Triton kernel on the H200 (bf16 was exact), which broke every
    FP8 GEMM of float32 parameters; the dispatcher now sends float32 to the reference."""
    from megatron_dsv3.fp8 import kernels
    w = (torch.randn(3, 256, 384, generator=torch.Generator().manual_seed(3)) * 0.05).to(dtype)
    q, s, qt, st = kernels.quantize_blocks_and_transpose_fast(w.cuda())
    (q1, s1), (qt1, st1) = kernels.quantize_blocks_fast(w.cuda()), kernels.quantize_blocks_transposed_fast(w.cuda())
    for e in range(3):
        rq, rs = quant.quantize_blocks(w[e])
        for a, b in ((q, rq), (s, rs), (qt, rq.t()), (st, rs.t()), (q1, rq), (s1, rs), (qt1, rq.t()), (st1, rs.t())):
            _same(a[e].cpu(), b.contiguous())
    q2, s2 = kernels.quantize_blocks_fast(w[1].cuda())
    _same(q2.cpu(), quant.quantize_blocks(w[1])[0])


@pytest.mark.parametrize("shape", [(40, 150), (3, 8, 256), (130, 384)])
@pytest.mark.parametrize("pow2, dtype", [(True, torch.bfloat16), (False, torch.float32), (True, torch.float32),
                                         (False, torch.bfloat16)])
def test_dequantize_tiles_triton_equals_the_reference(triton_device, shape, pow2, dtype):
    """One pass instead of the reference's float32 temporaries: the same values (bit for bit where no rounding is
    left: float32 output, or power-of-2 scales, whose products e4m3 x 2^n bf16 holds exactly); with bf16 output
    and free scales within one bf16 rounding (Triton's interpreter truncates float32 -> bf16, a GPU rounds to
    nearest as torch: exact there). Includes a zero tile, NaN, subnormal e4m3 codes and the scales' (1, M) layout."""
    from megatron_dsv3.fp8.kernels import dequantize_tiles_triton, quantize_tiles_fast
    x = _hard_input(int(torch.tensor(shape[:-1]).prod()), shape[-1], torch.float32, "cpu").view(shape)
    q, s = quant.quantize_tiles(x, pow2_scales=pow2)
    q = q.clone()
    q.view(torch.uint8).view(-1)[:8] = torch.tensor([0x00, 0x80, 0x01, 0x81, 0x07, 0x7F, 0xFF, 0x08],
                                                     dtype=torch.uint8)       # zeros, subnormals, NaN, 2^-6
    ref = quant.dequantize_tiles(q, s, dtype=dtype)
    if len(shape) == 2:
        s = s.t().contiguous().t()                                 # the quantisers' GEMM layout
    got = dequantize_tiles_triton(q.to(triton_device), s.to(triton_device), dtype).cpu()
    assert got.dtype == dtype and got.shape == ref.shape
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(got), nan)
    keep = ~nan
    if dtype == torch.bfloat16 and triton_device == "cpu":
        # the interpreter also mis-converts float32 subnormals to bf16 (the underflowing tile's e4m3 x 2^-149)
        keep &= (q.float() * s.repeat_interleave(128, -1)[..., :shape[-1]]).abs() >= 2 ** -126
    if dtype == torch.float32 or pow2 or triton_device == "cuda":
        assert torch.equal(got[keep].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           ref[keep].view(torch.int16 if dtype == torch.bfloat16 else torch.int32))
    else:
        torch.testing.assert_close(got[keep].float(), ref[keep].float(), rtol=2 ** -7, atol=0)


@pytest.mark.parametrize("shape", [(3, 256, 384), (128, 128), (2, 0, 128)])
@pytest.mark.parametrize("dtype", [quant.FP8, torch.float32])
def test_transpose_last2_triton_gives_torchs_bits(triton_device, shape, dtype):
    """The 'fprop' weight cache's Dgrad copy (weight_cache.transposed_blocks): e4m3 bytes and float32 scales
    transposed in [128, 128] tiles (stacks of experts included), bit for bit torch's transpose; shapes that are not
    whole tiles go to torch (transpose_last2) or are refused (the kernel)."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(shape, generator=g) * 100).clamp(-448, 448).to(dtype).to(triton_device)
    ref = x.transpose(-2, -1).contiguous()
    bits = (lambda t: t.view(torch.uint8)) if dtype == quant.FP8 else (lambda t: t)
    for got in (kernels.transpose_last2_triton(x), kernels.transpose_last2(x)):
        assert got.shape == ref.shape and got.dtype == dtype and got.is_contiguous()
        assert torch.equal(bits(got), bits(ref))
    ragged = x[..., :100] if x.shape[-1] else x
    assert torch.equal(bits(kernels.transpose_last2(ragged)), bits(ragged.transpose(-2, -1).contiguous()))
    with pytest.raises(ValueError, match="1- or 4-byte"):
        kernels.transpose_last2_triton(torch.zeros(128, 128, dtype=torch.bfloat16))
    if x.shape[-1]:
        with pytest.raises(ValueError, match="multiples of 128"):
            kernels.transpose_last2_triton(ragged)
