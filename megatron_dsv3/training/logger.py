"""Console lines, the progress bar and TensorBoard scalars (written by the last rank only, which holds
the loss), plus the throughput numbers: tokens/s, TFLOP/s per device and MFU."""
from __future__ import annotations

import math
from typing import Dict, Optional

import torch

# dense BF16 peak TFLOP/s per device (vendor data sheets, without sparsity)
PEAK_TFLOPS = {"H200": 989.5, "H100": 989.5, "H800": 989.5, "H20": 148.0, "A100": 312.0, "A800": 312.0,
               "B200": 2250.0, "GB200": 2500.0, "L40S": 362.0}


def device_peak_tflops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for k in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if k in name:
            return PEAK_TFLOPS[k]
    return None


def flops_per_token(cfg, seq_length: int) -> float:
    """Training FLOPs (forward + backward) per token: accounting.flops_per_token when the accounting module
    has it, else 6 x activated matmul parameters plus the causal attention scores (and MTP)."""
    from megatron_dsv3 import accounting
    fn = getattr(accounting, "flops_per_token", None)
    if fn is not None:
        try:
            return float(fn(cfg, seq_length))
        except TypeError:
            return float(fn(cfg))
    counts = accounting.parameter_counts(cfg)
    m = cfg.mla
    matmul = counts["activated"] - counts["embedding"]                                   # the head stays
    attn = 0.5 * seq_length * cfg.num_attention_heads * (m.qk_head_dim + m.v_head_dim) * 2   # QK^T and PV, causal
    layers = cfg.num_layers + cfg.mtp.num_layers
    mtp = counts["mtp_activated"] + cfg.mtp.num_layers * counts["output_layer"]
    return 6.0 * (matmul + mtp) + 3.0 * attn * layers


class TrainLogger:
    def __init__(self, tensorboard_dir: Optional[str], enabled: bool, progress_total: int = 0,
                 progress: bool = True, initial: int = 0):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if enabled and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=tensorboard_dir)
        if enabled and progress and progress_total:
            from tqdm import tqdm
            self.bar = tqdm(total=progress_total, initial=initial, desc="train", unit="step", dynamic_ncols=True,
                            mininterval=0.5)

    def scalars(self, step: int, values: Dict[str, float]) -> None:
        if self.writer is None:
            return
        for k, v in values.items():
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                self.writer.add_scalar(k, v, step)

    def step(self, postfix: Optional[dict] = None) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def print(self, line: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
