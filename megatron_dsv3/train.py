"""`python -m megatron_dsv3.train` / `dsv3-train`: the standalone trainer.

    python -m megatron_dsv3.train --preset tiny                         # one CPU process, built-in corpus
    torchrun --nproc_per_node 8 -m megatron_dsv3.train --preset dsv2-lite --expert-model-parallel-size 8 \
        --train-iters ... --global-batch-size ... --data-path ... --tokenizer /path/to/tokenizer
Flags: `--help` (Megatron-LM's names: --tensor-model-parallel-size, --micro-batch-size, --save, --load, ...).
"""
from __future__ import annotations

import os
import sys
import warnings


def quiet_megatron() -> None:
    """megatron-core's notices that say nothing to a user of this package (no TE/apex on CPU, our MLP specs)."""
    import logging
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*not installed.*")
    warnings.filterwarnings("ignore", message=".*cuda_graph_scope.*|.*full scope is deprecated.*")
    warnings.filterwarnings("ignore", message=".*non-leaf Tensor.*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.getLogger("megatron.core.transformer.transformer_layer").setLevel(logging.ERROR)


def main(argv=None) -> int:
    if "torch" not in sys.modules:
        # megatron-core's MoE helpers are torch.compile-wrapped; compiling costs more than it saves on CPU
        import torch
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    quiet_megatron()
    from megatron_dsv3.training.arguments import parse_args
    from megatron_dsv3.training.loop import run
    args = parse_args(argv)
    import torch.distributed as dist
    try:
        run(args)
    finally:
        if dist.is_initialized():
            from megatron.core import parallel_state as ps
            ps.destroy_model_parallel()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
