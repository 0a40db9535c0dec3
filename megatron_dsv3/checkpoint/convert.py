"""HF <-> Megatron conversion, driven by the table in mapping.py.

Design:
* `load_hf(model, path)` pulls: for every tensor in the rank's `model.state_dict()` it looks up the row,
  reads the HF tensors that rank needs (only its PP stage's layers and its EP rank's experts; of a
  tensor split on dim 0 over TP only the rank's rows, of others the whole tensor, then cut), dequantising
  FP8 on the fly, and copies them in. One HF tensor (plus its float32 dequantised copy) in memory at a time.
* HF -> Megatron (`hf_to_mcore`) runs one process per rank of the target layout (gloo; spawned here, or
  the ranks of torchrun), builds the rank's model with `build_model` (no random init), `load_hf`s it and
  saves with megatron-core `dist_checkpointing` (torch_dist). We write only that format: it stores global
  tensors with their shard layout, so the checkpoint loads into ANY later TP/PP/EP (megatron-core
  reshards on load; it is also Megatron-LM's default `--ckpt-format torch_dist`, loadable with
  `--finetune --no-load-optim --no-load-rng`: not tested here, Megatron-LM is not installed). The legacy
  per-rank `mp_rank_XX` format would pin the layout and make users re-convert per layout, so it is not
  written. The converting layout only decides how much memory each process needs (the model /
  (TP*PP*EP) plus one HF tensor).
  Directory: out/latest_checkpointed_iteration.txt ("release"), out/release/ (the dist checkpoint with
  {"model": ..., "checkpoint_version": 3.0, "iteration": 0} as Megatron-LM writes), out/dsv3_config.json.
* Megatron -> HF (`mcore_to_hf`) builds the model at a layout of choice (default 1x1x1 in one process;
  PP/EP/TP to spread a big model), loads the dist checkpoint, and each rank streams the tensors it owns
  (TP parts all-gathered to TP rank 0; experts written by their EP rank) into its own safetensors shards;
  rank 0 names the shards and writes the index and config.json (DSV3Config.to_hf(); FP8 adds the published
  quantization_config). FP8 export quantises the rows marked fp8 in the table, as published.
* Everything is written into a temporary directory beside the target and renamed when complete.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import zipfile
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from megatron_dsv3.compat import dist_checkpoint_writer_processes
from megatron_dsv3.checkpoint import mapping as M
from megatron_dsv3.checkpoint.fp8 import quantize_blockwise
from megatron_dsv3.checkpoint.safetensors_io import (SCALE_SUFFIX, CheckpointError, HFCheckpoint,
                                                     ShardedSafetensorsWriter, check_output_dir, commit_dir,
                                                     output_dir, temp_dir_beside, write_index)

RELEASE = "release"
CONFIG_FILE = "dsv3_config.json"
EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16, "fp8": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------
# Ranks
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ranks:
    tp_rank: int = 0
    tp: int = 1
    pp_rank: int = 0
    pp: int = 1
    ep_rank: int = 0
    ep: int = 1
    dp_rank: int = 0            # data-parallel rank of non-expert params
    edp_rank: int = 0           # data-parallel rank of expert params

    @classmethod
    def current(cls) -> "Ranks":
        """From megatron-core's parallel_state (all zeros / ones when it is not initialised)."""
        from megatron.core import parallel_state as ps
        if not ps.model_parallel_is_initialized():
            return cls()
        return cls(ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
                   ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size(),
                   ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size(),
                   ps.get_data_parallel_rank(), ps.get_expert_data_parallel_rank())


def unwrap(model):
    """The DSV3Model inside megatron's wrappers (DDP, Float16Module: `.module`) or a one-chunk list."""
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise ValueError("load_hf/export take one model chunk at a time: call them per virtual pipeline chunk")
        model = model[0]
    while not hasattr(model, "dsv3_config") and hasattr(model, "module"):
        model = model.module
    return model


def model_config(model, fallback=None):
    """The DSV3Config a model was built with."""
    for attr in ("dsv3_config", "cfg", "config_dsv3"):
        c = getattr(model, attr, None)
        if c is not None and hasattr(c, "pipeline_layers"):
            return c
    if fallback is None:
        raise ValueError("cannot find the model's DSV3Config (model.dsv3_config); pass config=")
    return fallback


def _layout_config(cfg, ranks: Ranks):
    if cfg.parallel.expert_tensor_parallel_size != 1:
        raise ValueError("checkpoint conversion supports expert_tensor_parallel_size 1 only "
                         "(experts whole per EP rank)")
    return cfg


def _global_namer(model, cfg, ranks: Ranks):
    """local state-dict name -> global name. Decoder layers are numbered per model chunk; their global
    index is the TransformerLayer's layer_number - 1 (megatron adds the PP/VPP offset, uneven stages too)."""
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    numbers = {i: layer.layer_number - 1 for i, layer in enumerate(layers or [])
               if getattr(layer, "layer_number", None) is not None}

    def name(local: str) -> str:
        parsed = M.decoder_layer(local)
        if parsed is None:
            return local
        i, rest = parsed
        return f"decoder.layers.{numbers[i]}.{rest}" if i in numbers else M.global_name(local, cfg, ranks.pp_rank)
    return name


def _state(model) -> Dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}


def _check_same_model(hf_cfg, cfg) -> None:
    """The HF checkpoint and the model must describe the same network (layouts may differ)."""
    keys = [("num_layers",), ("hidden_size",), ("num_attention_heads",), ("vocab_size",),
            ("mla", "q_lora_rank"), ("mla", "kv_lora_rank"), ("mla", "qk_nope_head_dim"), ("mla", "qk_rope_head_dim"),
            ("mla", "v_head_dim"), ("moe", "num_experts"), ("moe", "num_shared_experts"),
            ("moe", "expert_ffn_hidden_size"), ("moe", "dense_ffn_hidden_size"), ("moe", "first_k_dense_replace"),
            ("moe", "expert_bias")]
    if cfg.mtp.num_layers > hf_cfg.mtp.num_layers:      # fewer is fine: MTP dropped (drop_mtp)
        raise CheckpointError(f"the model has {cfg.mtp.num_layers} MTP layer(s), the checkpoint's config.json "
                              f"{hf_cfg.mtp.num_layers}")
    for path in keys:
        a, b = hf_cfg, cfg
        for p in path:
            a, b = getattr(a, p), getattr(b, p)
        if a != b:
            raise CheckpointError(f"the checkpoint's config.json has {'.'.join(path)} = {a}, the model {b}")


# ---------------------------------------------------------------------------------------------------
# HF -> a built model (this rank's part)
# ---------------------------------------------------------------------------------------------------
def load_hf(model, path, config=None, ranks: Optional[Ranks] = None, strict: bool = True,
            check_shared_copies: bool = True, show_progress: bool = False) -> Dict[str, List[str]]:
    """Load a Hugging Face DeepSeek-V2/V3 checkpoint (BF16/FP32 or FP8) into `model` for this rank.

    Returns {"loaded": HF names read, "unused": HF names of the checkpoint this rank did not need}.
    strict: every tensor of the model must come from the checkpoint."""
    ckpt = path if isinstance(path, HFCheckpoint) else HFCheckpoint(path)
    model = unwrap(model)
    ranks = ranks or Ranks.current()
    cfg = _layout_config(model_config(model, config or ckpt.config), ranks)
    _check_same_model(ckpt.config, cfg)
    rows, global_name = M.table(cfg), _global_namer(model, cfg, ranks)
    shapes = M.expected_hf_shapes(ckpt.config)
    loaded: List[str] = []

    def read(name: str, rows=None) -> torch.Tensor:
        if name not in ckpt:
            hint = ""
            if name.startswith(f"model.layers.{cfg.num_layers}."):
                hint = " (a checkpoint without its MTP layer: build the model with MTPConfig.num_layers=0)"
            raise CheckpointError(f"{ckpt.path}: tensor {name!r} is missing from the checkpoint{hint}")
        loaded.append(name)
        return ckpt.get(name, expected_shape=shapes[name], rows=rows)

    state = _state(model)
    bar = None
    if show_progress:
        from tqdm import tqdm
        bar = tqdm(total=len(state), desc=f"loading HF tensors (rank TP{ranks.tp_rank} PP{ranks.pp_rank} "
                                          f"EP{ranks.ep_rank})", unit="tensor")
    with torch.no_grad():
        for local, dst in state.items():
            if bar is not None:
                bar.update(1)
            row = rows.get(global_name(local))
            if row is None:
                if strict:
                    raise CheckpointError(f"model tensor {local!r} has no row in the HF mapping table")
                continue
            split = row.entry.split
            if split in (M.EXPERT_FC1, M.EXPERT_FC2):
                experts = M.local_experts(cfg, ranks.ep_rank, ranks.ep)
                if dst.shape[0] != len(experts):
                    raise CheckpointError(f"{local}: the model holds {dst.shape[0]} experts on this rank, the layout "
                                          f"implies {len(experts)}")
                for j, g in enumerate(experts):
                    part = M.expert_part(split, [read(n) for n in row.hf_names([g])])
                    _copy(dst[j], part, local)
            else:
                _copy(dst, _tp_part(row, split, read, shapes, ranks, dst), local)
        if check_shared_copies and ranks.tp_rank == 0 and ranks.dp_rank == 0:
            _check_copies(ckpt, cfg, loaded)
    if bar is not None:
        bar.close()
    consumed = set(loaded) | {n + SCALE_SUFFIX for n in loaded}
    return {"loaded": loaded, "unused": [k for k in ckpt.keys() if k not in consumed]}


def _tp_part(row, split, read, shapes, ranks: Ranks, dst: torch.Tensor) -> torch.Tensor:
    """This TP rank's part of a non-expert row. Dim-0 splits read only the rank's rows (M.shard's result,
    without reading the rest); other splits read whole tensors and cut them with M.shard."""
    names = row.hf_names()
    tp, r = ranks.tp, ranks.tp_rank
    if tp > 1 and split in (M.COLUMN, M.GLU) and all(shapes[n][0] % tp == 0 for n in names):
        parts = [read(n, rows=(r * shapes[n][0] // tp, (r + 1) * shapes[n][0] // tp)) for n in names]
        return torch.cat(parts) if split == M.GLU else parts[0]       # GLU: [gate_r; up_r]
    if tp > 1 and split == M.VOCAB:
        n, k = names[0], dst.shape[0]                                 # k = padded vocab / tp
        vocab = shapes[n][0]
        r0, r1 = min(r * k, vocab), min((r + 1) * k, vocab)
        t = read(n, rows=(r0, r1)) if r1 > r0 else dst.new_zeros(0, *dst.shape[1:])
        return torch.cat([t, t.new_zeros(k - t.shape[0], *t.shape[1:])]) if t.shape[0] < k else t
    padded = dst.shape[0] * tp if split == M.VOCAB else None
    return M.shard(split, [read(n) for n in names], r, tp, padded)


def _copy(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise CheckpointError(f"{name}: the checkpoint gives shape {tuple(src.shape)} on this rank, the model has "
                              f"{tuple(dst.shape)} (config.json and the model's config disagree)")
    dst.copy_(src)


def _check_copies(ckpt: HFCheckpoint, cfg, loaded: List[str]) -> None:
    """HF's MTP layers repeat embed_tokens / shared_head.head: they must equal the main ones (MTP shares them)."""
    for copy, main in M.mtp_shared_copies(cfg).items():
        if copy in ckpt and main in loaded and main in ckpt:
            if not torch.equal(ckpt.get(copy), ckpt.get(main)):
                raise CheckpointError(f"{ckpt.path}: {copy!r} differs from {main!r}; DeepSeek's MTP shares the "
                                      f"embedding and output head with the main model, so they must be equal")
            loaded.append(copy)


# ---------------------------------------------------------------------------------------------------
# A built model (this rank's part) -> HF tensors
# ---------------------------------------------------------------------------------------------------
def _gather_tp(t: torch.Tensor, ranks: Ranks) -> List[torch.Tensor]:
    if ranks.tp == 1:
        return [t]
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    parts = [torch.empty_like(t) for _ in range(ranks.tp)]
    dist.all_gather(parts, t.contiguous(), group=ps.get_tensor_model_parallel_group())
    return parts


def iter_hf_tensors(model, config=None, ranks: Optional[Ranks] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every tensor this rank writes, in the model's dtype.

    Collective under TP > 1 (every TP rank must iterate). Writers: non-expert tensors TP rank 0 of DP
    rank 0 (the embedding only on the first stage); experts expert-DP rank 0 of each EP rank.
    The MTP layers' copies of embedding and head are emitted with the main ones."""
    model = unwrap(model)
    ranks = ranks or Ranks.current()
    cfg = _layout_config(model_config(model, config), ranks)
    rows, global_name = M.table(cfg), _global_namer(model, cfg, ranks)
    copies: Dict[str, List[str]] = {}
    for copy, main in M.mtp_shared_copies(cfg).items():
        copies.setdefault(main, []).append(copy)
    for local, t in _state(model).items():
        row = rows.get(global_name(local))
        if row is None:
            raise CheckpointError(f"model tensor {local!r} has no row in the HF mapping table")
        t = t.detach()
        split = row.entry.split
        if split in (M.EXPERT_FC1, M.EXPERT_FC2):
            if ranks.edp_rank != 0:     # expert TP is 1: each EP rank's experts are whole on it
                continue
            for j, g in enumerate(M.local_experts(cfg, ranks.ep_rank, ranks.ep)):
                yield from zip(row.hf_names([g]), M.expert_hf(split, t[j]))
            continue
        if row.ours.startswith("embedding.") and ranks.pp_rank != 0:
            continue  # the last stage's copy (for MTP) is not the one written
        parts = _gather_tp(t, ranks) if split != M.REPLICATED else [t]
        if ranks.tp_rank != 0 or ranks.dp_rank != 0:
            continue
        for name, full in zip(row.hf_names(), M.merge(split, parts, rows=cfg.vocab_size)):
            yield name, full
            for copy in copies.get(name, ()):
                yield copy, full


def _fp8_names(cfg) -> set:
    out = set()
    for r in M.model_tensors(cfg):
        if r.entry.fp8:
            experts = range(cfg.moe.num_experts) if r.entry.split in (M.EXPERT_FC1, M.EXPERT_FC2) else None
            out.update(r.hf_names(experts))
    return out


def write_hf_tensors(writer: ShardedSafetensorsWriter, tensors: Iterator[Tuple[str, torch.Tensor]], cfg,
                     dtype: str = "bf16", progress=None) -> None:
    """Cast (or FP8-quantise, as published) each tensor and stream it to the writer."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    fp8 = _fp8_names(cfg) if dtype == "fp8" else set()
    keep = {n: r.entry.dtype for r in M.model_tensors(cfg) if r.entry.dtype is not None for n in r.hf_names()}
    for name, t in tensors:
        if name in fp8:
            q, s = quantize_blockwise(t)
            writer.add(name, q)
            writer.add(name + SCALE_SUFFIX, s)
        else:
            writer.add(name, t.to(keep.get(name, EXPORT_DTYPES[dtype])))
        if progress is not None:
            progress.update(1)


def hf_config_dict(cfg, dtype: str) -> dict:
    """config.json for an export in `dtype` (FP8: with the published quantization_config)."""
    cfg = cfg.replace(fp8={"param_fp8": dtype == "fp8"})
    d = cfg.to_hf()
    if dtype != "fp8":
        d.pop("quantization_config", None)
    name = {"bf16": "bfloat16", "fp8": "bfloat16", "fp32": "float32", "fp16": "float16"}[dtype]
    keys = [k for k in ("torch_dtype", "dtype") if k in d] or ["torch_dtype"]
    for k in keys:
        d[k] = name
    return d


# ---------------------------------------------------------------------------------------------------
# Running on the ranks of a layout
# ---------------------------------------------------------------------------------------------------
def world_size_for(tp: int, pp: int, ep: int) -> int:
    """Smallest world with these sizes (megatron-core carves EP out of TP x DP; expert TP = 1)."""
    return pp * (tp * ep // math.gcd(tp, ep))


def max_local_ranks() -> int:
    """Most processes a conversion starts on this host by itself (more: use torchrun over several hosts)."""
    return max(8, os.cpu_count() or 1)


def workers_layout(cfg, workers: int) -> Tuple[int, int, int]:
    """(TP, PP, EP) that spreads a model over `workers` processes: experts first (EP = the largest divisor of
    the expert count that divides `workers`), then pipeline stages. Only memory per process and speed
    depend on it: the dist checkpoint written is the same for every layout."""
    if workers < 1:
        raise ValueError(f"--workers must be at least 1, got {workers}")
    ep = math.gcd(workers, cfg.moe.num_experts) if cfg.moe.num_experts else 1
    pp = workers // ep
    if pp > cfg.num_layers:
        raise ValueError(f"--workers {workers}: the model has {cfg.moe.num_experts} experts and {cfg.num_layers} "
                         f"layers, so at most {ep * cfg.num_layers} workers in a layout that divides it "
                         f"(experts x pipeline stages); choose a multiple of a divisor of the expert count")
    try:
        target_config(cfg, 1, pp, ep, cfg.params_dtype)
    except ValueError as e:
        raise ValueError(f"--workers {workers} (as {pp} pipeline stage(s) x {ep} expert ranks) does not divide "
                         f"the model: {e}") from e
    return 1, pp, ep


def _run(fn, tp: int, pp: int, ep: int, **kwargs):
    """fn(rank, **kwargs) on every rank of the layout: in this process when torch.distributed is already
    up (torchrun) or the layout is 1x1x1, else on gloo ranks started here (at most max_local_ranks())."""
    import torch.distributed as dist
    from megatron_dsv3 import launch
    if dist.is_available() and dist.is_initialized():
        from megatron.core import parallel_state as ps
        if not ps.model_parallel_is_initialized():
            launch.init_parallel_state(tp, pp, ep)
        return [fn(dist.get_rank(), **kwargs)]
    world = world_size_for(tp, pp, ep)
    if world == 1:
        with launch.single_process(tp, pp, ep):
            return [fn(0, **kwargs)]
    if world > max_local_ranks():
        raise ValueError(f"a conversion at TPxPPxEP={tp}x{pp}x{ep} would start {world} processes on this host "
                         f"(at most {max_local_ranks()}); the output is layout-free: use fewer workers")
    return launch.run_ranks(fn, world, tp=tp, pp=pp, ep=ep, timeout=kwargs.pop("timeout", 3600), **kwargs)


def _launched() -> bool:
    """True under torchrun (or any caller that set up torch.distributed): every rank runs the converter."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def _is_rank0() -> bool:
    return not _launched() or torch.distributed.get_rank() == 0


def _shared_temp_dir(out: str) -> str:
    if not _launched():
        return temp_dir_beside(out)
    obj = [temp_dir_beside(out) if _is_rank0() else None]
    torch.distributed.broadcast_object_list(obj, src=0)
    return obj[0]


@contextlib.contextmanager
def _output_dir_on_all_ranks(out: str, overwrite: bool):
    """safetensors_io.output_dir for a conversion run by several ranks: one temporary directory shared by
    all, renamed onto `out` by rank 0 when the body succeeds (then every rank waits for it), removed on failure."""
    tmp = _shared_temp_dir(out)
    try:
        yield tmp
        if _is_rank0():
            commit_dir(tmp, out, overwrite)
    except BaseException:
        if _is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if _launched():
        torch.distributed.barrier()


def _all_gather(obj) -> list:
    import torch.distributed as dist
    if dist.get_world_size() == 1:
        return [obj]
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, obj)
    return every


def _build_model(cfg):
    from megatron.core import parallel_state as ps
    from megatron_dsv3.mcore_cpu import apply_cpu_shim
    from megatron_dsv3.model import build_model
    apply_cpu_shim()
    # on the host (the converter streams tensors through host memory), no random init: every tensor is
    # overwritten by a strict load (load_hf / load_mcore)
    return build_model(cfg, pre_process=ps.is_pipeline_first_stage(ignore_virtual=True),
                       post_process=ps.is_pipeline_last_stage(ignore_virtual=True), device="cpu", init=False)


def reading_config(cfg, tp: int = 1, pp: int = 1, ep: int = 1, params_dtype: Optional[str] = None):
    """A (training) config at a plain layout for reading a checkpoint out: a dist checkpoint reshards on
    load, so SP/CP/VPP/uneven stages of the training run do not matter; FP8 compute is off (the
    high-precision parameters are what is read)."""
    return cfg.replace(params_dtype=params_dtype or cfg.params_dtype, fp8={"enabled": False},
                       parallel=dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     expert_model_parallel_size=ep, expert_tensor_parallel_size=1,
                                     context_parallel_size=1, sequence_parallel=False,
                                     num_layers_in_first_pipeline_stage=None, num_layers_in_last_pipeline_stage=None,
                                     virtual_pipeline_model_parallel_size=None, pipeline_schedule="1f1b"))


def target_config(hf_cfg, tp: int = 1, pp: int = 1, ep: int = 1, params_dtype: str = "bfloat16", **parallel):
    """The HF config at a layout; raises ValueError (from DSV3Config) if the layout does not divide it."""
    return hf_cfg.replace(params_dtype=params_dtype,
                          parallel=dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                        expert_model_parallel_size=ep, **parallel))


# ---------------------------------------------------------------------------------------------------
# HF -> Megatron dist checkpoint
# ---------------------------------------------------------------------------------------------------
def save_mcore(model, directory: str, cfg) -> None:
    """dist_checkpointing.save of the model into directory/release (collective)."""
    from megatron.core import dist_checkpointing
    import torch.distributed as dist
    release = os.path.join(directory, RELEASE)
    if dist.get_rank() == 0:
        os.makedirs(release, exist_ok=True)
        with open(os.path.join(directory, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write(RELEASE)
        with open(os.path.join(directory, CONFIG_FILE), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2)
    dist.barrier()
    sd = {"model": model_sharded_state_dict(model), "checkpoint_version": 3.0, "iteration": 0}
    with dist_checkpoint_writer_processes():
        dist_checkpointing.save(sd, release)


def model_sharded_state_dict(model) -> dict:
    """The model's sharded state dict as saved and loaded here. MTPBlock defines its own sharded_state_dict
    (megatron-core's default recursion would save a plain ModuleList's TP/EP parts as whole tensors), so
    this is megatron-core's own method; kept as the one name the trainer's checkpointing calls."""
    return model.sharded_state_dict()


def resolve_mcore_dir(directory: str) -> str:
    """The dist checkpoint directory a path names: ours / Megatron-LM's (latest_checkpointed_iteration.txt:
    "release" or an iteration), the trainer's (`latest`: an iteration, see training/checkpointing.py), or a
    dist checkpoint directory itself."""
    d = directory
    for tracker in ("latest_checkpointed_iteration.txt", "latest"):
        t = os.path.join(directory, tracker)
        if os.path.isfile(t):
            it = open(t).read().strip()
            d = os.path.join(directory, RELEASE if it == RELEASE else f"iter_{int(it):07d}")
            break
    if not os.path.exists(os.path.join(d, "metadata.json")):
        raise CheckpointError(f"{directory}: not a megatron-core dist checkpoint (no metadata.json in {d})")
    return d


def check_dist_checkpoint(d: str) -> None:
    """Cheap integrity check of a dist checkpoint directory before megatron-core reads it, so that a damaged
    file is named: metadata.json parses, torch's .metadata unpickles, every .distcp file it lists exists
    and is long enough for the bytes it is said to hold."""
    meta = os.path.join(d, "metadata.json")
    try:
        with open(meta) as f:
            json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{meta}: not valid JSON (truncated or corrupt?): {e}") from e
    from torch.distributed.checkpoint import FileSystemReader
    md_file = os.path.join(d, ".metadata")
    if not os.path.exists(md_file):
        raise CheckpointError(f"{md_file}: missing (not a complete torch_dist checkpoint)")
    try:
        md = FileSystemReader(d).read_metadata()
    except Exception as e:
        raise CheckpointError(f"{md_file}: cannot read (truncated or corrupt?): {e}") from e
    common = os.path.join(d, "common.pt")
    if os.path.exists(common) and not zipfile.is_zipfile(common):      # torch.save writes a zip archive
        raise CheckpointError(f"{common}: not a torch.save file (truncated or corrupt?)")
    need: Dict[str, int] = {}
    for info in (getattr(md, "storage_data", None) or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for fname, n in sorted(need.items()):
        path = os.path.join(d, fname)
        if not os.path.exists(path):
            raise CheckpointError(f"{path}: missing (listed in {md_file})")
        size = os.path.getsize(path)
        if size < n:
            raise CheckpointError(f"{path}: truncated ({size} bytes; {md_file} places data up to byte {n})")


def _read_dist(what: str, d: str, fn):
    """fn() reading the dist checkpoint in `d`; damage megatron-core/torch report in their own words
    (EOFError, AssertionError, CheckpointException, UnpicklingError...) becomes one CheckpointError."""
    check_dist_checkpoint(d)
    try:
        return fn()
    except CheckpointError:
        raise
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise CheckpointError(f"{d}: cannot read the {what} of the dist checkpoint (a corrupt file?): "
                              f"{type(e).__name__}: {msg[-1] if msg else ''}") from e


def load_mcore(model, directory: str) -> None:
    """Load the model's tensors from a dist checkpoint (see resolve_mcore_dir) at the model's layout.
    The "model"/"model0" nesting of a state dict is not part of the stored keys, so training checkpoints
    (with optimizer state, which is not read) load the same way."""
    from megatron.core import dist_checkpointing
    model = unwrap(model)
    d = resolve_mcore_dir(directory)
    loaded = _read_dist("tensors", d, lambda: dist_checkpointing.load({"model": model_sharded_state_dict(model)}, d))
    model.load_state_dict(loaded["model"], strict=True)


def has_ema(directory: str) -> bool:
    """Whether a trainer checkpoint holds the EMA of the parameters (saved with --ema-decay)."""
    from megatron.core import dist_checkpointing
    d = resolve_mcore_dir(directory)
    common = _read_dist("common state (common.pt)", d, lambda: dist_checkpointing.load_common_state_dict(d))
    return bool((common.get("train_state") or {}).get("has_ema"))


@torch.no_grad()
def load_mcore_ema(model, directory: str) -> None:
    """Overwrite the model's parameters with the EMA a trainer checkpoint holds (training/ema.py: the model's
    sharded tensors under `ema.<key>`), at the model's layout. Buffers (expert bias) stay as load_mcore set them."""
    from megatron.core import dist_checkpointing
    from megatron_dsv3.training.ema import ema_sharded_state_dict
    model = unwrap(model)
    d = resolve_mcore_dir(directory)
    params = dict(model.named_parameters())
    target = {n: torch.empty(p.shape, dtype=torch.float32) for n, p in params.items()}
    loaded = _read_dist("EMA tensors", d, lambda: dist_checkpointing.load(
        {"ema0": ema_sharded_state_dict(model, target)}, d))
    for n, p in params.items():
        p.copy_(loaded["ema0"][n])


def read_mcore_config(directory: str):
    """The DSV3Config of a dist checkpoint: dsv3_config.json (hf_to_mcore) or the trainer's train_state."""
    from megatron.core import dist_checkpointing
    from megatron_dsv3.config import DSV3Config
    p = os.path.join(directory, CONFIG_FILE)
    if os.path.exists(p):
        try:
            with open(p) as f:
                return DSV3Config.from_dict(json.load(f))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{p}: not a DSV3Config written by the converter: {e}") from e
    d = resolve_mcore_dir(directory)
    common = _read_dist("common state (common.pt)", d, lambda: dist_checkpointing.load_common_state_dict(d))
    cfg = (common.get("train_state") or {}).get("config")
    if cfg is None:
        raise CheckpointError(f"{directory}: no {CONFIG_FILE} and no train_state.config in the checkpoint; "
                              f"cannot tell which model it holds")
    return DSV3Config.from_dict(cfg)


def _hf_to_mcore_rank(rank: int, hf_path: str, out: str, cfg_dict: dict, show_progress: bool = False) -> dict:
    from megatron_dsv3.config import DSV3Config
    cfg = DSV3Config.from_dict(cfg_dict)
    model = _build_model(cfg)
    info = load_hf(model, hf_path, config=cfg, show_progress=show_progress and rank == 0)
    save_mcore(model, out, cfg)
    n = sum(t.numel() for t in _state(model).values())
    return _all_gather({"rank": rank, "numel": n, "loaded": len(info["loaded"]), "unused": info["unused"]})


def source_params_dtype(ckpt: HFCheckpoint) -> str:
    """The parameter dtype an HF checkpoint holds: config.json's `torch_dtype` (or `dtype`, as transformers 5
    writes it); FP8 checkpoints and configs that name none: bfloat16 (as transformers' torch_dtype="auto")."""
    if ckpt.fp8:
        return "bfloat16"
    name = ckpt.hf_config.get("torch_dtype") or ckpt.hf_config.get("dtype") or "bfloat16"
    name = str(name).replace("torch.", "")
    if name not in ("bfloat16", "float32", "float16"):
        raise CheckpointError(f"{os.path.join(ckpt.path, 'config.json')}: torch_dtype {name!r} is not one of "
                              f"bfloat16, float32, float16; pass --dtype")
    return name


def hf_to_mcore(hf_path: str, out: str, tp: int = 1, pp: int = 1, ep: int = 1, params_dtype: Optional[str] = None,
                overwrite: bool = False, allow_unused: bool = False, show_progress: bool = False,
                drop_mtp: bool = False, workers: Optional[int] = None) -> dict:
    """Convert an HF checkpoint into a megatron-core dist checkpoint (layout-free: it loads at any TP/PP/EP).

    The work runs in one process unless `workers` (a layout chosen by workers_layout) or an explicit work
    layout TP x PP x EP spreads it; under torchrun the ranks of the job do it. params_dtype None: the
    checkpoint's own (source_params_dtype). drop_mtp: build the model without MTP (for checkpoints whose
    files lack the MTP layer)."""
    check_output_dir(out, overwrite)
    ckpt = HFCheckpoint(hf_path)          # validates config.json, index, shards before any work
    params_dtype = params_dtype or source_params_dtype(ckpt)
    if workers is None and _launched():
        workers = torch.distributed.get_world_size()
    if workers is not None:
        tp, pp, ep = workers_layout(ckpt.config, workers)
    cfg = target_config(ckpt.config, tp, pp, ep, params_dtype)
    if drop_mtp:
        cfg = cfg.replace(mtp={"num_layers": 0})
    _check_full_checkpoint(ckpt, cfg, allow_unused)
    with _output_dir_on_all_ranks(out, overwrite) as tmp:
        results = _run(_hf_to_mcore_rank, tp, pp, ep, hf_path=os.path.abspath(hf_path), out=tmp,
                       cfg_dict=cfg.to_dict(), show_progress=show_progress)[0]
        unused = set.intersection(*[set(r["unused"]) for r in results]) - set(M.mtp_shared_copies(ckpt.config))
        if drop_mtp:
            unused -= set(_mtp_tensors(ckpt, cfg))
            unused -= {n + SCALE_SUFFIX for n in _mtp_tensors(ckpt, cfg)}
        if unused and not allow_unused:
            raise CheckpointError(f"{hf_path}: {len(unused)} checkpoint tensor(s) map to nothing in the model, "
                                  f"e.g. {sorted(unused)[:3]}")
    return {"out": out, "world_size": len(results), "layout": (tp, pp, ep), "params_dtype": params_dtype,
            "tensors_per_rank": [r["loaded"] for r in results], "numel_per_rank": [r["numel"] for r in results],
            "hf_tensors": len(ckpt.keys())}


def _mtp_tensors(ckpt: HFCheckpoint, cfg) -> List[str]:
    prefixes = tuple(f"model.layers.{cfg.num_layers + k}." for k in range(ckpt.config.mtp.num_layers))
    return [k for k in ckpt.keys() if prefixes and k.startswith(prefixes)]


def _check_full_checkpoint(ckpt: HFCheckpoint, cfg, allow_unused: bool = False) -> None:
    """Every tensor `cfg` implies is present with its shape (FP8 weights with scales: HFCheckpoint), and,
    unless allow_unused, every tensor of the checkpoint has a place in the model (an MTP layer the target
    config drops, drop_mtp, is skipped knowingly)."""
    shapes = M.expected_hf_shapes(cfg)
    copies = M.mtp_shared_copies(cfg)
    missing = [n for n in shapes if n not in ckpt and n not in copies]
    if missing:
        hint = ""
        if cfg.mtp.num_layers and not _mtp_tensors(ckpt, cfg):
            hint = (f" (config.json says num_nextn_predict_layers={cfg.mtp.num_layers} but the files hold no MTP "
                    f"layer, as transformers' save_pretrained writes them: convert with drop_mtp=True / --no-mtp)")
        raise CheckpointError(f"{ckpt.path}: {len(missing)} tensor(s) the config implies are missing from the "
                              f"index, e.g. {missing[0]!r}{hint}")
    dropped = set(_mtp_tensors(ckpt, cfg)) if cfg.mtp.num_layers < ckpt.config.mtp.num_layers else set()
    unknown = sorted(k for k in ckpt.keys() if k not in shapes and k not in dropped and not (
        k.endswith(SCALE_SUFFIX) and k[: -len(SCALE_SUFFIX)] in shapes))
    if unknown and not allow_unused:
        raise CheckpointError(f"{ckpt.path}: {len(unknown)} checkpoint tensor(s) map to nothing in the model, "
                              f"e.g. {unknown[:3]}")
    for n, shp in shapes.items():
        if n not in ckpt:
            continue
        got = ckpt.shape(n)
        if got != shp:
            raise CheckpointError(f"{ckpt.file_of(n)}: tensor {n!r} has shape {got}, but config.json implies {shp}")


# ---------------------------------------------------------------------------------------------------
# Megatron dist checkpoint -> HF
# ---------------------------------------------------------------------------------------------------
def _mcore_to_hf_rank(rank: int, mcore_path: str, out: str, cfg_dict: dict, dtype: str,
                      max_shard_bytes: int, show_progress: bool, ema: bool = False) -> list:
    from megatron_dsv3.config import DSV3Config
    cfg = DSV3Config.from_dict(cfg_dict)
    model = _build_model(cfg)
    load_mcore(model, mcore_path)
    if ema:
        load_mcore_ema(model, mcore_path)
    writer = ShardedSafetensorsWriter(out, max_shard_bytes, prefix=f"part-r{rank:05d}")
    bar = None
    if show_progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(desc="writing HF tensors (rank 0)", unit="tensor")
    write_hf_tensors(writer, iter_hf_tensors(model, cfg), cfg, dtype, progress=bar)
    if bar is not None:
        bar.close()
    return [p for ps in _all_gather(writer.close()) for p in ps]


EXPORT_OF_PARAMS = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16", "float64": "fp32"}


def mcore_to_hf(mcore_path: str, out: str, dtype: Optional[str] = None, tp: int = 1, pp: int = 1, ep: int = 1,
                overwrite: bool = False, max_shard_bytes: int = 5 * 2 ** 30, show_progress: bool = False,
                workers: Optional[int] = None, ema: bool = False) -> dict:
    """Convert a dist checkpoint written by hf_to_mcore (or training) into HF safetensors + config.json.
    dtype None: the checkpoint's params_dtype. One process unless `workers` or a work layout TP x PP x EP.
    ema: write the EMA of the parameters a trainer checkpoint saved with --ema-decay instead of the weights."""
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype must be one of {sorted(EXPORT_DTYPES)}, got {dtype!r}")
    check_output_dir(out, overwrite)
    src = read_mcore_config(mcore_path)
    if ema and not has_ema(mcore_path):
        raise CheckpointError(f"{mcore_path}: the checkpoint holds no EMA of the parameters (train with "
                              f"--ema-decay to save one); leave out --ema to export the weights")
    dtype = dtype or EXPORT_OF_PARAMS[src.params_dtype]
    if workers is None and _launched():
        workers = torch.distributed.get_world_size()
    if workers is not None:
        tp, pp, ep = workers_layout(src, workers)
    cfg = reading_config(src, tp, pp, ep, "float32" if dtype == "fp32" else src.params_dtype)
    with _output_dir_on_all_ranks(out, overwrite) as tmp:
        parts = _run(_mcore_to_hf_rank, tp, pp, ep, mcore_path=os.path.abspath(mcore_path), out=tmp,
                     cfg_dict=cfg.to_dict(), dtype=dtype, max_shard_bytes=max_shard_bytes,
                     show_progress=show_progress, ema=ema)[0]
        if _is_rank0():
            write_index(tmp, parts)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(hf_config_dict(cfg, dtype), f, indent=2)
    return {"out": out, "tensors": sum(len(p[1]) for p in parts), "files": len(parts),
            "bytes": sum(p[2] for p in parts), "dtype": dtype, "world_size": world_size_for(tp, pp, ep), "ema": ema}


# ---------------------------------------------------------------------------------------------------
# HF -> HF (re-shard / re-quantise), no model: the pure streaming path
# ---------------------------------------------------------------------------------------------------
def hf_to_hf(hf_path: str, out: str, dtype: Optional[str] = None, overwrite: bool = False,
             max_shard_bytes: int = 5 * 2 ** 30, show_progress: bool = False) -> dict:
    """Rewrite an HF checkpoint in another dtype (e.g. FP8 -> BF16 for engines without FP8, or BF16 -> FP8
    with published-style scales) and shard size, one tensor at a time. dtype None: the source's."""
    check_output_dir(out, overwrite)
    ckpt = HFCheckpoint(hf_path)
    dtype = dtype or ("fp8" if ckpt.fp8 else EXPORT_OF_PARAMS[source_params_dtype(ckpt)])
    cfg = ckpt.config
    _check_full_checkpoint(ckpt, cfg)
    shapes = M.expected_hf_shapes(cfg)
    names = [n for n in shapes if n in ckpt]
    bar = None
    if show_progress:
        from tqdm import tqdm
        bar = tqdm(total=len(names), desc="re-writing HF tensors", unit="tensor")
    try:
        with output_dir(out, overwrite) as tmp:
            writer = ShardedSafetensorsWriter(tmp, max_shard_bytes)
            write_hf_tensors(writer, ((n, ckpt.get(n)) for n in names), cfg, dtype, progress=bar)
            weight_map = writer.finish()
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(hf_config_dict(cfg, dtype), f, indent=2)
    finally:
        if bar is not None:
            bar.close()
    return {"out": out, "tensors": len(weight_map), "files": len(set(weight_map.values())),
            "bytes": writer.total_bytes, "dtype": dtype}
