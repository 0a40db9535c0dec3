"""Datasets and micro-batches: megatron-core's BlendedMegatronDatasetBuilder(GPTDataset) over indexed
datasets, read in the order of a global sample counter so that a resumed run sees the same batches.

Global batch g covers samples [consumed, consumed + gbs) of the train split. Micro-batch m of data-parallel
rank r holds samples consumed + m*mbs*dp + r*mbs ... + mbs (Megatron-LM's pretraining sampler), so the
global batch is the same set of samples for every data-parallel size.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import torch


def parse_blend(paths: Optional[Sequence[str]]):
    """['p1', 'p2'] or ['w1', 'p1', 'w2', 'p2'] -> megatron's blend (prefixes, weights or None)."""
    if not paths:
        return None
    paths = list(paths)
    try:
        float(paths[0])
        weighted = True
    except ValueError:
        weighted = False
    if weighted:
        if len(paths) % 2:
            raise ValueError(f"--data-path with weights needs pairs 'weight prefix', got {paths}")
        return [paths[i + 1] for i in range(0, len(paths), 2)], [float(paths[i]) for i in range(0, len(paths), 2)]
    return paths, None


def build_datasets(blend, tokenizer, seq_length: int, seed: int, split: str, num_samples: List[int],
                   cache_dir: Optional[str] = None, fim_rate: float = 0.0, fim_spm_rate: float = 0.0):
    """(train, valid, test) GPTDatasets (None where a split is empty). Collective: call on every rank.
    fim_rate > 0: documents in fill-in-middle form at that rate, before packing (training/fim.py)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    kw = dict(random_seed=seed, sequence_length=seq_length, blend=blend, split=split, tokenizer=tokenizer,
              reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
              path_to_cache=cache_dir, mmap_bin_files=True)
    if fim_rate > 0:
        from megatron_dsv3.training.fim import FIMGPTDataset, FIMGPTDatasetConfig
        tokenizer.fim_ids()                      # a tokenizer without FIM tokens: say so before any index is built
        cls, cfg = FIMGPTDataset, FIMGPTDatasetConfig(**kw, fim_rate=fim_rate, fim_spm_rate=fim_spm_rate)
    else:
        cls, cfg = GPTDataset, GPTDatasetConfig(**kw)
    return BlendedMegatronDatasetBuilder(cls, num_samples, lambda: True, cfg).build()


def micro_batches(dataset, consumed: int, global_batch: int, micro_batch: int, dp_rank: int, dp_size: int,
                  device) -> List[Dict[str, torch.Tensor]]:
    """This data-parallel rank's micro-batches of the global batch that starts at sample `consumed`."""
    n_micro = global_batch // (micro_batch * dp_size)
    out = []
    for m in range(n_micro):
        start = consumed + m * micro_batch * dp_size + dp_rank * micro_batch
        samples = [dataset[(start + i) % len(dataset)] for i in range(micro_batch)]
        batch = {}
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            batch[key] = torch.stack([torch.as_tensor(s[key]) for s in samples]).to(device, non_blocking=True)
        out.append(batch)
    return out


def default_blend(tokenizer, cache_dir: Optional[str]):
    """The built-in docstring corpus (built by rank 0 once; the other ranks wait)."""
    import torch.distributed as dist

    from megatron_dsv3.training.corpus import default_data_prefix
    prefix = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        prefix = default_data_prefix(tokenizer, cache_dir, workers=max(1, min(2, os.cpu_count() or 1)))
    if dist.is_initialized():
        box = [prefix]
        dist.broadcast_object_list(box, src=0)
        prefix = box[0]
    return [prefix], None
