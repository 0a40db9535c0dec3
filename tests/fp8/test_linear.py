"""FP8Linear (fp8/linear.py): Fprop, Dgrad and Wgrad against float64 products of the dequantised operands.

Reference for each GEMM: the operands quantised with the tiling the paper's Figure 6 prescribes (x, dy in 1x128
tiles; W in 128x128 blocks; x, dy in 128x1 tiles for Wgrad), dequantised exactly and multiplied in float64. The FP8
GEMM differs from that only by its float32 accumulation: relative error ~K * 2^-24 of the largest output, bounded
here by 1e-5 (K <= 400). A wrong tiling (say Wgrad in 1x128 tiles, or a transposed block grid) changes the result by
the quantisation error itself, ~1e-2: the bound tells the two apart. Against the unquantised float64 product the FP8
result may differ by the e4m3 rounding (2^-4 relative per element; ~3% in Frobenius norm for random data).
"""
import pytest
import torch

from megatron_dsv3.fp8.linear import (FP8ColumnParallelLinear, FP8DuplicatedLinear, FP8RowParallelLinear, fp8_linear)
from megatron_dsv3.fp8.quant import (dequantize_blocks, dequantize_columns, dequantize_tiles, quantize_blocks,
                                     quantize_columns, quantize_tiles)

ACC = 1e-5        # float32 accumulation, relative to the largest |output|
QUANT = 0.06      # e4m3 quantisation, relative Frobenius error of a product of two quantised random operands


def deq_tiles(t):
    return dequantize_tiles(*quantize_tiles(t.double()), dtype=torch.float64)


def deq_blocks(t):
    return dequantize_blocks(*quantize_blocks(t.double()), dtype=torch.float64)


def deq_columns(t):
    return dequantize_columns(*quantize_columns(t.double()), dtype=torch.float64)


def references(x2, w, dy2):
    """float64: y = q(x) q(W)^T, dx = q(dy) q(W^T)^T (W^T blocks), dW = qc(dy)^T qc(x) (128x1 tiles)."""
    y = deq_tiles(x2) @ deq_blocks(w).T
    dx = deq_tiles(dy2) @ deq_blocks(w.T.contiguous()).T
    dw = deq_columns(dy2).T @ deq_columns(x2)
    return y, dx, dw


def close(got, ref, rel):
    err = (got.double() - ref).abs().max().item()
    assert err <= rel * ref.abs().max().item(), (err, ref.abs().max().item())


def rel_fro(got, ref):
    return ((got.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("x_shape, N", [((200, 320), 192),        # ragged: M, K and N all off the 128 grid
                                        ((7, 3, 256), 384),        # [s, b, K] input, aligned K
                                        ((130, 128), 40)])         # N < one block
def test_fp8_linear_fprop_dgrad_wgrad_against_float64(x_shape, N):
    g = torch.Generator().manual_seed(0)
    K = x_shape[-1]
    x = torch.randn(*x_shape, generator=g).requires_grad_()
    w = (torch.randn(N, K, generator=g) * 0.05).requires_grad_()
    x[..., 5].data.mul_(40)                                       # an outlier channel: what the tiles are for
    y = fp8_linear(x, w)
    assert y.shape == (*x_shape[:-1], N) and y.dtype == x.dtype
    dy = torch.randn(*y.shape, generator=g)
    y.backward(dy)
    x2, dy2 = x.detach().reshape(-1, K), dy.reshape(-1, N)
    ry, rdx, rdw = references(x2, w.detach(), dy2)
    close(y.reshape(-1, N), ry, ACC)
    close(x.grad.reshape(-1, K), rdx, ACC)
    close(w.grad, rdw, ACC)
    assert w.grad.dtype == w.dtype
    # and against the exact, unquantised product: within the e4m3 rounding, not beyond
    x64, w64, dy64 = x2.double(), w.detach().double(), dy2.double()
    assert rel_fro(y.reshape(-1, N), x64 @ w64.T) < QUANT
    assert rel_fro(x.grad.reshape(-1, K), dy64 @ w64) < QUANT
    assert rel_fro(w.grad, dy64.T @ x64) < QUANT


def test_wgrad_uses_token_tiles_not_feature_tiles():
    """The Wgrad reference with 1x128 (feature) tiles instead of 128x1 (token) tiles is measurably different: the test
    above would catch the wrong tiling (what makes its ACC bound meaningful)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 256, generator=g)
    x[:, 3] *= 100
    dy = torch.randn(256, 128, generator=g)
    right = deq_columns(dy).T @ deq_columns(x)
    wrong = deq_tiles(dy).T @ deq_tiles(x)
    assert (right - wrong).abs().max() > 100 * ACC * right.abs().max()


def test_bf16_input_bf16_output_and_master_weight_dtype():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 256, generator=g).bfloat16().requires_grad_()
    w = (torch.randn(128, 256, generator=g) * 0.05).requires_grad_()       # FP32 master weight
    y = fp8_linear(x, w)
    y.backward(torch.ones_like(y))
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    ry, rdx, rdw = references(x.detach().float(), w.detach(), torch.ones(64, 128))
    close(y, ry, 2 ** -8)                                             # + the bf16 rounding of the output
    close(x.grad, rdx, 2 ** -8)
    close(w.grad, rdw, ACC)                                           # FP32 accumulation, FP32 result


def test_backward_keeps_only_the_fp8_transposed_input():
    """What autograd holds for backward: the e4m3 input copy [K, M] + its scales and the weight (a parameter, not a
    copy): no float copy of the input."""
    x = torch.randn(256, 384).bfloat16().requires_grad_()
    w = torch.randn(128, 384, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fp8_linear(x, w)
    kinds = sorted((str(t.dtype), tuple(t.shape)) for t in saved if t is not w)
    assert kinds == [("torch.float32", (384, 2)), ("torch.float8_e4m3fn", (384, 256))], kinds


def test_gradient_accumulation_into_main_grad():
    """gradient_accumulation_fusion: the FP32 weight gradient is added to main_grad (megatron's DDP buffer)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 128, generator=g)
    w = torch.randn(64, 128, generator=g, dtype=torch.float32).bfloat16().requires_grad_()
    w.main_grad = torch.full((64, 128), 0.5)
    w.grad_added_to_main_grad = False
    dy = torch.randn(32, 64, generator=g)
    fp8_linear(x, w, wgrad_into_main_grad=True).backward(dy)
    _, _, rdw = references(x, w.detach().float(), dy)
    close(w.main_grad - 0.5, rdw, ACC)
    assert w.grad_added_to_main_grad


def test_gradient_accumulation_into_an_existing_grad():
    """Without megatron's DDP: the first backward returns dW (written by the GEMM in W's dtype), later ones add
    theirs in FP32 into the .grad already there (one add, rounded once) and return nothing, so .grad is the sum."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 128, generator=g)
    w = torch.randn(64, 128, generator=g).bfloat16().requires_grad_()
    dys = [torch.randn(32, 64, generator=g) for _ in range(3)]
    want = torch.zeros(64, 128, dtype=torch.float64)
    for i, dy in enumerate(dys):
        fp8_linear(x, w).backward(dy)
        want += references(x, w.detach().float(), dy)[2]
        assert w.grad.dtype == torch.bfloat16
        close(w.grad.float(), want, 2 ** -7)                        # a double-counted step is off by a whole dW


def test_split_backward_adds_the_weight_gradient_once():
    """DualPipe's split backward with gradient_accumulation_fusion: the B pass (autograd.grad to the input) must not
    touch main_grad, the W pass (backward(inputs=[w])) adds dW once; the sum equals one plain backward's."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(32, 128, generator=g, requires_grad=True)
    w = torch.randn(64, 128, generator=g, dtype=torch.float32).bfloat16().requires_grad_()
    w.main_grad = torch.zeros(64, 128)
    w.grad_added_to_main_grad = False
    dy = torch.randn(32, 64, generator=g)
    y = fp8_linear(x * 1, w, wgrad_into_main_grad=True)
    (dx,) = torch.autograd.grad(y, x, dy, retain_graph=True)
    assert not w.grad_added_to_main_grad and float(w.main_grad.abs().max()) == 0.0
    torch.autograd.backward(y, dy, inputs=[w])
    _, rdx, rdw = references(x.detach(), w.detach().float(), dy)
    close(dx, rdx, ACC)
    close(w.main_grad, rdw, ACC)


def test_modules_are_drop_ins_for_the_bf16_linears(mcore_single):
    """Same parameters and init as megatron-core's Column/RowParallelLinear and our DuplicatedLinear; the output
    equals fp8_linear on the module's weight, close to the BF16 module's."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_dsv3 import DSV3Config
    from megatron_dsv3.mla.linear import DuplicatedLinear

    tc = DSV3Config.from_preset("tiny").to_transformer_config()
    x = torch.randn(8, 2, 128)
    pairs = [(ColumnParallelLinear, FP8ColumnParallelLinear, dict(bias=False, gather_output=False)),
             (RowParallelLinear, FP8RowParallelLinear, dict(bias=False, input_is_parallel=True, skip_bias_add=True)),
             (DuplicatedLinear, FP8DuplicatedLinear, dict(bias=False))]
    for bf16_cls, fp8_cls, kw in pairs:
        torch.manual_seed(0)
        ref = bf16_cls(128, 256, config=tc, init_method=tc.init_method, **kw)
        torch.manual_seed(0)
        mod = fp8_cls(128, 256, config=tc, init_method=tc.init_method, **kw)
        assert isinstance(mod, bf16_cls)
        assert {k: v.shape for k, v in mod.state_dict().items() if v is not None} == \
               {k: v.shape for k, v in ref.state_dict().items() if v is not None}
        torch.testing.assert_close(mod.weight, ref.weight, rtol=0, atol=0)
        out, bias = mod(x)
        assert bias is None
        torch.testing.assert_close(out, fp8_linear(x, mod.weight), rtol=0, atol=0)
        assert rel_fro(out, ref(x)[0].double()) < QUANT
        out.sum().backward()
        assert mod.weight.grad is not None and mod.weight.grad.shape == mod.weight.shape


@pytest.mark.gpu
def test_fp8_linear_on_cuda_matches_the_float64_reference():
    """The CUDA path (Triton quantisers + cuBLAS block-scaled GEMMs) against the same float64 references, BF16
    activations: the output and dx carry BF16's rounding (2^-8); dW is FP32 but cuBLAS accumulates inside each
    128-chunk of K narrower than float32 (5.5e-4 relative whatever K, measured on the H200, bench/results_fp8.md;
    2.3e-4 of the largest dW here): 2^-10."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1000, 640, generator=g).bfloat16()             # ragged M, K = 5 tiles
    w = torch.randn(384, 640, generator=g) * 0.05
    dy = torch.randn(1000, 384, generator=g).bfloat16()
    xc, wc = x.cuda().requires_grad_(), w.cuda().requires_grad_()
    y = fp8_linear(xc, wc)
    y.backward(dy.cuda())
    ry, rdx, rdw = references(x.float(), w, dy.float())
    close(y.cpu(), ry, 2 ** -7)
    close(xc.grad.cpu(), rdx, 2 ** -7)
    close(wc.grad.cpu(), rdw, 2 ** -10)
