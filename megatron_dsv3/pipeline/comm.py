"""Point-to-point between pipeline ranks, with the process group, rank mapping and device passed in.

Replaces deepseek-ai/DualPipe's `comm.py`, which keeps the tensor shapes and dtype in module globals and allocates
receive buffers on "cuda". Here a `PipeComm` belongs to one executor instance: receive buffers take the shapes and
dtype it was given and the device of the modules' parameters, so the same code runs on gloo (CPU) and NCCL (GPU).

Peers are addressed by pipeline rank (what `schedule.py`'s ops name); `rank_mapping[group_rank] = pipeline rank`
as in DeepSeek's constructor. A batch (`PipeComm.batch()`) collects sends and receives and posts them all with one
`batch_isend_irecv` when committed, then waits for all of them: the communication semantics schedule.py's op
lists are written for.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

__all__ = ["PipeComm", "CommBatch"]


class CommBatch:
    """Sends and receives posted together; `commit()` posts them in the order added and waits for all."""

    def __init__(self, comm: "PipeComm"):
        self.comm = comm
        self.ops: List[dist.P2POp] = []

    def __len__(self) -> int:
        return len(self.ops)

    def send(self, tensors: Sequence[torch.Tensor], peer: int) -> None:
        for t in tensors:
            self.ops.append(dist.P2POp(dist.isend, t.detach().contiguous(), self.comm.global_rank(peer),
                                       self.comm.group))

    def recv(self, shapes: Sequence[Tuple[int, ...]], dtype: torch.dtype, peer: int) -> List[torch.Tensor]:
        bufs = [torch.empty(s, dtype=dtype, device=self.comm.device) for s in shapes]
        for b in bufs:
            self.ops.append(dist.P2POp(dist.irecv, b, self.comm.global_rank(peer), self.comm.group))
        return bufs

    def commit(self) -> None:
        if self.ops:
            for req in dist.batch_isend_irecv(self.ops):
                req.wait()
        self.ops = []


class PipeComm:
    """Pipeline-rank addressing over `group` (None: the default group) on `device`."""

    def __init__(self, group: Optional[dist.ProcessGroup], rank_mapping: Optional[Sequence[int]],
                 device: torch.device):
        self.group = group if group is not None else dist.group.WORLD
        self.size = dist.get_world_size(self.group)
        mapping = list(range(self.size)) if rank_mapping is None else list(rank_mapping)
        if sorted(mapping) != list(range(self.size)):
            raise ValueError(f"rank_mapping must be a permutation of range({self.size}), got {mapping}")
        self.rank = mapping[dist.get_rank(self.group)]
        group_rank_of = {pp: g for g, pp in enumerate(mapping)}
        self._global = [dist.get_global_rank(self.group, group_rank_of[pp]) for pp in range(self.size)]
        self.device = torch.device(device)

    def global_rank(self, pp_rank: int) -> int:
        return self._global[pp_rank]

    def batch(self) -> CommBatch:
        return CommBatch(self)
