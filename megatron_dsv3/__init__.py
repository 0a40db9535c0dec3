"""megatron_dsv3: DeepSeek-V3's training system as megatron-core module specs and schedules.

Public API (stable names): DSV3Config, get_decoder_block_spec, get_mtp_block_spec, build_model,
and the subpackages checkpoint, fp8, pipeline, training. Imports of megatron-core are deferred
until a name that needs it is used, so reading configs stays cheap.
"""
from megatron_dsv3.config import (DSV3Config, FP8Config, MLAConfig, MoEConfig, MTPConfig, ParallelConfig,
                                  YaRNConfig)

__version__ = "0.1.0"
__all__ = ["DSV3Config", "MLAConfig", "MoEConfig", "MTPConfig", "FP8Config", "ParallelConfig", "YaRNConfig",
           "get_decoder_block_spec", "get_mtp_block_spec", "build_model",
           "checkpoint", "fp8", "pipeline", "training"]

_SUBPACKAGES = {"checkpoint", "fp8", "pipeline", "training", "mla", "moe", "mtp"}


def __getattr__(name):
    import importlib
    if name in ("get_decoder_block_spec", "get_mtp_block_spec"):
        return getattr(importlib.import_module("megatron_dsv3.specs"), name)
    if name == "build_model":
        return importlib.import_module("megatron_dsv3.model").build_model
    if name in _SUBPACKAGES:
        return importlib.import_module(f"megatron_dsv3.{name}")
    raise AttributeError(f"module 'megatron_dsv3' has no attribute {name!r}")
