"""FP8 128x128 block quantisation as published (megatron_dsv3/checkpoint/fp8.py)."""
import pytest
import torch

from megatron_dsv3.checkpoint.fp8 import E4M3_MAX, dequantize_blockwise, quantize_blockwise, scale_shape


def _ref_dequant(q, s, block=128):
    # float64 loop over blocks; the e4m3 x fp32 product is exact in float64, so one rounding to float32
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            sl = (slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block))
            out[sl] = q[sl].double() * float(s[i, j])
    return out.float()


def test_dequantize_matches_blockwise_reference_exactly():
    torch.manual_seed(0)
    q = (torch.randn(300, 260) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)   # 3x3 blocks, partial edges
    s = torch.rand(scale_shape(q.shape)) * 1e-3
    assert scale_shape(q.shape) == (3, 3)
    assert torch.equal(dequantize_blockwise(q, s, rows_per_step=128), _ref_dequant(q, s))


def test_quantize_is_amax_over_448_per_block():
    torch.manual_seed(1)
    w = torch.randn(300, 200) * torch.logspace(-3, 1, 300)[:, None]            # blocks of different ranges
    q, s = quantize_blockwise(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            assert s[i, j] == blk.abs().max() / E4M3_MAX                          # the published scale
            qb = q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
            assert qb.abs().max() == E4M3_MAX                                      # block max -> +-448
    d = dequantize_blockwise(q, s)
    # e4m3: 3 mantissa bits -> relative rounding <= 2^-4, subnormal spacing 2^-9 (in units of the scale)
    s_full = s.repeat_interleave(128, 0)[:300].repeat_interleave(128, 1)[:, :200]
    assert ((d - w).abs() <= w.abs() * 2 ** -4 + s_full * 2 ** -9).all()


def test_fp8_checkpoint_round_trips_bit_exactly():
    """q, s -> float32 -> q, s for published-style blocks (max |q| = 448) with arbitrary float32 scales,
    including the ~10% where amax/448 in float32 is one ulp off the original scale."""
    torch.manual_seed(2)
    nb = 64
    q0, _ = quantize_blockwise(torch.randn(nb * 128, 2 * 128 - 40))
    s0 = (torch.rand(nb, 2, dtype=torch.float64) * 10 ** torch.empty(nb, 2, dtype=torch.float64).uniform_(-8, 2)).float()
    d = dequantize_blockwise(q0, s0)
    naive = torch.nn.functional.pad(d, (0, 40)).abs().view(nb, 128, 2, 128).amax((1, 3)) / E4M3_MAX
    assert (naive != s0).sum() > 0          # the naive recomputation would not round-trip
    q1, s1 = quantize_blockwise(d)
    assert torch.equal(s1, s0)
    assert torch.equal(q1.view(torch.uint8), q0.view(torch.uint8))


def test_zero_block_gets_unit_scale():
    w = torch.zeros(130, 5)
    w[129, 4] = 3.0
    q, s = quantize_blockwise(w)
    assert s[0, 0] == 1.0 and s[1, 0] == 3.0 / E4M3_MAX
    assert torch.equal(dequantize_blockwise(q, s), w)


def test_quantize_blockwise_is_the_package_quantiser_banded():
    """One quantiser (STYLE 13): the converter's output is megatron_dsv3.fp8.quantize_blocks', whatever the band."""
    from megatron_dsv3.fp8 import quantize_blocks
    torch.manual_seed(3)
    w = torch.randn(700, 300).bfloat16()
    q0, s0 = quantize_blocks(w)
    for rows_per_step in (128, 256, 1024):
        q, s = quantize_blockwise(w, rows_per_step=rows_per_step)
        assert torch.equal(s, s0) and torch.equal(q.view(torch.uint8), q0.view(torch.uint8))


def test_non_finite_weight_is_refused():
    w = torch.randn(300, 130)
    w[260, 3] = float("nan")
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_blockwise(w)
    w[260, 3] = float("inf")
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_blockwise(w)
