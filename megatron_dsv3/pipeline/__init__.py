"""Pipeline schedules (DeepSeek-V3 section 3.2.1): op lists per rank (schedule.py), their simulator (simulate.py),
and the executors that run them with P2P (dualpipe.py: DualPipe, DualPipeV, drop-ins for deepseek-ai/DualPipe)."""
from megatron_dsv3.pipeline.dualpipe import DualPipe, DualPipeV, set_p2p_tensor_dtype, set_p2p_tensor_shapes

__all__ = ["DualPipe", "DualPipeV", "set_p2p_tensor_shapes", "set_p2p_tensor_dtype"]
