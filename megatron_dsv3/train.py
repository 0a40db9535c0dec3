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


# User mistakes (a flag, a path, a file's contents): one `error: ...` line and exit status 2. Everything else is a
# bug and keeps its traceback. --debug / MEGATRON_DSV3_DEBUG=1 shows tracebacks for user mistakes too.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               FileExistsError)


def _debug(argv) -> bool:
    return "--debug" in (argv if argv is not None else sys.argv[1:]) or os.environ.get("MEGATRON_DSV3_DEBUG") == "1"


def error_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    rank, world = os.environ.get("RANK"), int(os.environ.get("WORLD_SIZE", "1"))
    return f"error: {text}" if world == 1 or rank is None else f"[rank {rank}] error: {text}"


def main(argv=None) -> int:
    if "torch" not in sys.modules:
        # megatron-core's MoE helpers are torch.compile-wrapped; compiling costs more than it saves on CPU
        import torch
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    quiet_megatron()
    import torch.distributed as dist
    try:
        from megatron_dsv3.training.arguments import parse_args
        from megatron_dsv3.training.loop import run
        args = parse_args(argv)
        run(args)
    except USER_ERRORS as e:
        if _debug(argv):
            raise
        print(error_line(e), file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            from megatron.core import parallel_state as ps
            ps.destroy_model_parallel()
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
