"""Hugging Face DeepSeek-V2/V3 (BF16 and FP8) <-> megatron-core checkpoints; see mapping.py for THE table."""
from megatron_dsv3.checkpoint.fp8 import dequantize_blockwise, quantize_blockwise
from megatron_dsv3.checkpoint.safetensors_io import CheckpointError, HFCheckpoint, ShardedSafetensorsWriter


def __getattr__(name):  # the converters import megatron-core: only when used
    import importlib
    conv = importlib.import_module("megatron_dsv3.checkpoint.convert")
    if hasattr(conv, name):
        return getattr(conv, name)
    raise AttributeError(f"module 'megatron_dsv3.checkpoint' has no attribute {name!r}")


__all__ = ["load_hf", "hf_to_mcore", "mcore_to_hf", "hf_to_hf", "load_mcore", "save_mcore", "iter_hf_tensors",
           "HFCheckpoint", "ShardedSafetensorsWriter", "CheckpointError", "quantize_blockwise", "dequantize_blockwise"]
