"""FP8 training as the paper's section 3.3. quant.py is the plain-torch reference every fast path is tested against."""
from megatron_dsv3.fp8.quant import (E4M3_MAX, TILE, block_scale_shape, dequantize_blocks, dequantize_columns,
                                     dequantize_tiles, dequantized_matmul, padded_group_offsets, quantize_blocks,
                                     quantize_columns, quantize_columns_grouped, quantize_tiles,
                                     quantize_tiles_and_transpose)
from megatron_dsv3.fp8.kernels import (quantize_columns_grouped_fast, quantize_tiles_and_transpose_fast,
                                       quantize_tiles_fast)
from megatron_dsv3.fp8.gemm import fp8_gemm, fp8_gemm_emulated, fp8_grouped_gemm, fp8_grouped_wgrad

__all__ = ["E4M3_MAX", "TILE", "quantize_tiles", "dequantize_tiles", "quantize_columns", "dequantize_columns",
           "quantize_blocks", "dequantize_blocks", "block_scale_shape", "dequantized_matmul",
           "quantize_tiles_and_transpose", "quantize_columns_grouped", "padded_group_offsets",
           "fp8_gemm", "fp8_gemm_emulated", "fp8_grouped_gemm", "fp8_grouped_wgrad",
           "quantize_tiles_fast", "quantize_tiles_and_transpose_fast", "quantize_columns_grouped_fast"]
