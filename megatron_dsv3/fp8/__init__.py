"""FP8 training as the paper's section 3.3. quant.py is the plain-torch reference every fast path is tested against."""
from megatron_dsv3.fp8.quant import (E4M3_MAX, TILE, block_scale_shape, dequantize_blocks, dequantize_columns,
                                     dequantize_tiles, dequantized_matmul, quantize_blocks, quantize_columns,
                                     quantize_tiles)

__all__ = ["E4M3_MAX", "TILE", "quantize_tiles", "dequantize_tiles", "quantize_columns", "dequantize_columns",
           "quantize_blocks", "dequantize_blocks", "block_scale_shape", "dequantized_matmul"]
