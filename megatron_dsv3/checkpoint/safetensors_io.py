"""Streaming reader and writer for Hugging Face sharded safetensors checkpoints.

Reader: `HFCheckpoint(path)` reads config.json (DSV3Config.from_hf, which refuses anything but
DeepSeek-V2/V3) and `model.safetensors.index.json` (or a single `model.safetensors`), checks that every
shard exists and every index entry is in its shard, and returns ONE tensor per `get()`, FP8 weights
dequantised block by block on the fly. Each read opens the shard with `safetensors.safe_open` and closes
it again: safe_open memory-maps the file and every page a read touches stays in the process's RSS while
the map is open (measured: reading a 1 GiB file tensor by tensor under one open handle grew RSS by
1.2 GB; reopening per tensor kept it flat). Peak memory is therefore one tensor plus its float32 copy.

Writer: `ShardedSafetensorsWriter(dir)` takes tensors one at a time and streams their bytes to disk
(safetensors' own `save_file` needs the whole shard in memory): each shard file starts with space kept
for its header, data goes behind it as it arrives, and the header is filled in when the shard closes. `finish()`
names the shards `model-0000i-of-0000N.safetensors` and writes the index. Files written by several
ranks are merged with `write_index`.

`output_dir(target, overwrite)`: everything is written into a temporary directory beside the target and
renamed onto it only when complete, so a failure never leaves a half-written checkpoint.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from typing import Dict, Iterable, List, Optional, Tuple

import torch

from megatron_dsv3.checkpoint.fp8 import dequantize_blockwise, scale_shape

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
SCALE_SUFFIX = "_scale_inv"  # "x.weight" -> "x.weight_scale_inv"

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
           torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted; the message names the file and the tensor."""


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------
class HFCheckpoint:
    """A Hugging Face DeepSeek-V2/V3 checkpoint directory, read one tensor at a time."""

    def __init__(self, path: str):
        from megatron_dsv3.config import DSV3Config
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path}: not a directory (expected a Hugging Face checkpoint directory)")
        cfg_file = os.path.join(self.path, "config.json")
        if not os.path.exists(cfg_file):
            raise CheckpointError(f"{self.path}: no config.json")
        with open(cfg_file) as f:
            try:
                self.hf_config = json.load(f)
            except ValueError as e:
                raise CheckpointError(f"{cfg_file}: not valid JSON: {e}") from e
        if not isinstance(self.hf_config, dict):
            raise CheckpointError(f"{cfg_file}: expected a JSON object, got {type(self.hf_config).__name__}")
        try:
            self.config = DSV3Config.from_hf(self.hf_config)
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"{cfg_file}: not a DeepSeek-V2/V3 config: {e}") from e
        q = self.hf_config.get("quantization_config") or {}
        self.fp8 = q.get("quant_method") == "fp8"
        self.block = int((q.get("weight_block_size") or [128, 128])[0])
        self._meta: Dict[Tuple[str, str], Tuple[Tuple[int, ...], str]] = {}
        self.weight_map = self._read_weight_map()
        self._check_shards()

    # -- index ------------------------------------------------------------------------------------
    def _read_weight_map(self) -> Dict[str, str]:
        index = os.path.join(self.path, INDEX)
        if os.path.exists(index):
            with open(index) as f:
                try:
                    return dict(json.load(f)["weight_map"])
                except (ValueError, KeyError, TypeError) as e:
                    raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
        single = os.path.join(self.path, SINGLE)
        if os.path.exists(single):
            return {k: SINGLE for k in self._keys_of(SINGLE)}
        raise CheckpointError(f"{self.path}: neither {INDEX} nor {SINGLE} found")

    def _keys_of(self, fname: str) -> List[str]:
        """Tensor names of one shard; records each tensor's shape and dtype (header only, no data read)."""
        from safetensors import safe_open
        full = os.path.join(self.path, fname)
        try:
            with safe_open(full, "pt") as f:
                keys = list(f.keys())
                for k in keys:
                    sl = f.get_slice(k)
                    self._meta[(fname, k)] = (tuple(sl.get_shape()), sl.get_dtype())
                return keys
        except Exception as e:  # safetensors raises SafetensorError / OSError on a damaged file
            raise CheckpointError(f"{full}: cannot read safetensors file (truncated or corrupt?): {e}") from e

    def _check_shards(self) -> None:
        files = sorted(set(self.weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(self.path, f))]
        if missing:
            raise CheckpointError(f"{self.path}: shard file(s) listed in {INDEX} are missing: {', '.join(missing)}")
        by_file: Dict[str, List[str]] = {}
        for k, v in self.weight_map.items():
            by_file.setdefault(v, []).append(k)
        for fname in files:
            have = set(self._keys_of(fname))
            absent = [k for k in by_file[fname] if k not in have]
            if absent:
                raise CheckpointError(f"{os.path.join(self.path, fname)}: {len(absent)} tensor(s) the index places in "
                                      f"this file are not in it, e.g. {absent[0]!r}")
        for k in self.weight_map:
            if k.endswith(SCALE_SUFFIX) and k[: -len(SCALE_SUFFIX)] not in self.weight_map:
                raise CheckpointError(f"{self.path}: scale {k!r} has no weight {k[: -len(SCALE_SUFFIX)]!r}")
            if self.stored_dtype(k).startswith("F8") and k + SCALE_SUFFIX not in self.weight_map:
                raise CheckpointError(f"{self.file_of(k)}: FP8 weight {k!r} has no scale {k + SCALE_SUFFIX!r}")

    # -- tensors ----------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def keys(self) -> List[str]:
        return list(self.weight_map)

    def file_of(self, name: str) -> str:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in the checkpoint")
        return os.path.join(self.path, self.weight_map[name])

    def raw(self, name: str) -> torch.Tensor:
        """The tensor as stored (FP8 stays FP8). The shard is opened for this read only (see module doc)."""
        from safetensors import safe_open
        fname = self.file_of(name)
        try:
            with safe_open(fname, "pt") as f:
                return f.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{fname}: cannot read tensor {name!r} (truncated or corrupt file?): {e}") from e

    def shape(self, name: str) -> Tuple[int, ...]:
        self.file_of(name)
        return self._meta[(self.weight_map[name], name)][0]

    def stored_dtype(self, name: str) -> str:
        """safetensors dtype string as stored, e.g. "BF16", "F8_E4M3"."""
        self.file_of(name)
        return self._meta[(self.weight_map[name], name)][1]

    def is_fp8(self, name: str) -> bool:
        return name + SCALE_SUFFIX in self.weight_map

    def _rows(self, name: str, r0: Optional[int], r1: Optional[int]) -> torch.Tensor:
        """Rows r0:r1 of a stored tensor (all when r0 is None), reading only those bytes."""
        from safetensors import safe_open
        fname = self.file_of(name)
        try:
            with safe_open(fname, "pt") as f:
                return f.get_tensor(name) if r0 is None else f.get_slice(name)[r0:r1]
        except Exception as e:
            raise CheckpointError(f"{fname}: cannot read tensor {name!r} (truncated or corrupt file?): {e}") from e

    def get(self, name: str, dtype: Optional[torch.dtype] = None, expected_shape: Optional[Tuple[int, ...]] = None,
            rows: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """One tensor in `dtype` (None: as stored, FP8 dequantised to float32), shape-checked.

        rows=(r0, r1): only those rows are read (a TP rank's part of a dim-0 split); FP8 weights need r0 on a
        block boundary for that, else the whole tensor is read and cut."""
        shape = self.shape(name)
        if expected_shape is not None and shape != tuple(expected_shape):
            raise CheckpointError(f"{self.file_of(name)}: tensor {name!r} has shape {shape}, but config.json "
                                  f"implies {tuple(expected_shape)}")
        r0, r1 = rows if rows is not None else (None, None)
        if not self.stored_dtype(name).startswith("F8"):
            t = self._rows(name, r0, r1)
            return t if dtype is None else t.to(dtype)
        scale_name = name + SCALE_SUFFIX
        if scale_name not in self.weight_map:
            raise CheckpointError(f"{self.file_of(name)}: FP8 weight {name!r} has no scale {scale_name!r}")
        if self.shape(scale_name) != scale_shape(shape, self.block):
            raise CheckpointError(f"{self.file_of(scale_name)}: {scale_name!r} has shape {self.shape(scale_name)}; "
                                  f"{name!r} {shape} needs {scale_shape(shape, self.block)}")
        b = self.block
        if r0 is not None and r0 % b == 0:
            t = dequantize_blockwise(self._rows(name, r0, r1), self._rows(scale_name, r0 // b, -(-r1 // b)), b)
        else:
            t = dequantize_blockwise(self._rows(name, None, None), self._rows(scale_name, None, None), b)
            t = t if r0 is None else t[r0:r1].contiguous()
        return t if dtype is None else t.to(dtype)


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------
def _entry_json(name: str, dtype: torch.dtype, shape, begin: int, end: int) -> str:
    return json.dumps({name: {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [begin, end]}},
                      separators=(",", ":"))[1:-1]


def _header(entries: List[str], reserve: int) -> bytes:
    """8-byte length + JSON header padded with spaces to exactly `reserve` bytes (a multiple of 8)."""
    raw = ("{" + ",".join(['"__metadata__":{"format":"pt"}'] + entries) + "}").encode()
    assert len(raw) <= reserve
    return struct.pack("<Q", reserve) + raw + b" " * (reserve - len(raw))


class ShardedSafetensorsWriter:
    """Writes tensors one by one into shards of at most `max_shard_bytes` (a tensor larger than that gets
    a shard of its own). Memory: one tensor's bytes at a time; disk: each byte written once.

    A shard file starts with `header_reserve` bytes kept for its header: data is written behind it as
    tensors arrive, and the header (padded with spaces, which safetensors allows and itself uses for
    alignment) is filled in when the shard closes. A shard also closes early when its header would
    outgrow the reserve."""

    def __init__(self, directory: str, max_shard_bytes: int = 5 * 2 ** 30, prefix: str = "part",
                 header_reserve: Optional[int] = None):
        self.dir, self.max, self.prefix = directory, max_shard_bytes, prefix
        if header_reserve is None:
            header_reserve = min(2 ** 20, max(8192, max_shard_bytes // 64))
        self.reserve = header_reserve // 8 * 8
        os.makedirs(directory, exist_ok=True)
        self.parts: List[Tuple[str, List[str], int]] = []   # (file, names, bytes)
        self._entries: List[str] = []                        # JSON fragments of the open shard's header
        self._names_in_shard: List[str] = []
        self._header_len = 64                                # braces + metadata + commas, generously
        self._file = None
        self._size = 0
        self.total_bytes = 0
        self._names = set()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name!r} written twice")
        self._names.add(name)
        t = tensor.detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if self._entries and self._size + nbytes > self.max:
            self._close_shard()
        entry = _entry_json(name, t.dtype, tuple(t.shape), self._size, self._size + nbytes)
        if self._entries and self._header_len + len(entry) + 1 > self.reserve:
            self._close_shard()
            entry = _entry_json(name, t.dtype, tuple(t.shape), 0, nbytes)
        if len(entry) + 64 > self.reserve:
            raise ValueError(f"tensor {name!r}: its header entry does not fit header_reserve={self.reserve}")
        if self._file is None:
            self._fname = f"{self.prefix}-{len(self.parts):05d}.safetensors"
            self._file = open(os.path.join(self.dir, self._fname), "wb")
            self._file.seek(8 + self.reserve)
        if nbytes:
            self._file.write(t.view(-1).view(torch.uint8).numpy())  # the buffer itself, no bytes copy
        self._entries.append(entry)
        self._names_in_shard.append(name)
        self._header_len += len(entry) + 1
        self._size += nbytes
        self.total_bytes += nbytes

    def _close_shard(self) -> None:
        if not self._entries:
            return
        self._file.seek(0)
        self._file.write(_header(self._entries, self.reserve))
        self._file.close()
        self.parts.append((self._fname, self._names_in_shard, self._size))
        self._entries, self._names_in_shard, self._file, self._size, self._header_len = [], [], None, 0, 64

    def close(self) -> List[Tuple[str, List[str], int]]:
        """Flush the last shard; returns [(file, tensor names, bytes)] for `write_index`."""
        self._close_shard()
        return self.parts

    def finish(self) -> Dict[str, str]:
        """close() and name the shards model-0000i-of-0000N.safetensors with an index (single writer)."""
        return write_index(self.dir, self.close())


def write_index(directory: str, parts: Iterable[Tuple[str, List[str], int]]) -> Dict[str, str]:
    """Rename part files to the Hugging Face shard names and write model.safetensors.index.json."""
    parts = list(parts)
    n = len(parts)
    weight_map, total = {}, 0
    for i, (fname, names, nbytes) in enumerate(parts):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(directory, fname), os.path.join(directory, final))
        weight_map.update({k: final for k in names})
        total += nbytes
    with open(os.path.join(directory, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    return weight_map


# ---------------------------------------------------------------------------------------------------
# All or nothing
# ---------------------------------------------------------------------------------------------------
def check_output_dir(target: str, overwrite: bool) -> None:
    if os.path.lexists(target) and not overwrite:
        raise FileExistsError(f"output directory {target} exists; pass overwrite=True (--overwrite) to replace it")


def temp_dir_beside(target: str) -> str:
    target = os.path.abspath(target)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.tmp-", dir=parent)
    os.chmod(tmp, 0o777 & ~_umask())      # mkdtemp makes 0700; the directory it becomes follows the umask
    return tmp


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def commit_dir(tmp: str, target: str, overwrite: bool) -> None:
    """Move a completed temporary directory onto the target (replacing it when overwrite)."""
    target = os.path.abspath(target)
    check_output_dir(target, overwrite)
    old = None
    if os.path.lexists(target):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=os.path.dirname(target))
        os.rmdir(old)
        os.replace(target, old)
    os.replace(tmp, target)
    if old:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def output_dir(target: str, overwrite: bool = False):
    """Yields a temporary directory beside `target`; renamed onto it on success, removed on failure."""
    check_output_dir(target, overwrite)
    tmp = temp_dir_beside(target)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit_dir(tmp, target, overwrite)
