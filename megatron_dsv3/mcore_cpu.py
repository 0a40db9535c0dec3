"""The one place that lets megatron-core's own (CUDA-bound) parts run on a CPU-only torch.

Our modules never need this: they take the device from their inputs. megatron-core 0.16-0.19
calls CUDA unconditionally in parts we reuse (measured with megatron-core 0.16.1, torch 2.13 CPU;
see shared/cpu-megatron.md for the line numbers):

* `torch.cuda.current_device()` - tensor_parallel/layers.py, mappings.py, p2p_communication.py,
  param_and_grad_buffer.py, state_dict_saver.py, distrib_optimizer.py  -> the CPU device;
* the CUDA RNG tracker (tensor_parallel/random.py: get/set_rng_state, manual_seed, fork)
  -> the CPU generator;
* `torch.cuda.synchronize`, `Stream`, `Event`, `current_stream` (p2p_communication.py,
  dist_checkpointing's async writer, MoE token dispatcher) -> no-ops;
* `device="cuda"` in factory calls and `.cuda()` (schedules.py `total_num_tokens`, optimizer.py
  `_scale_one`, clip_grads.py, utils.py, tensor_parallel/data.py) -> CPU, through a TorchFunctionMode;
* `param.type() == 'torch.cuda.FloatTensor'` checks (optimizer.py, distrib_optimizer.py,
  clip_grads.py) -> answered with the CUDA type name (opt-in, `tensor_type=True`);
* two megatron-core 0.16.1 bugs without Transformer Engine (moe_utils.te_general_gemm NameError,
  MLA's HAVE_TE on a MagicMock) and the alltoall dispatcher's numpy split sizes.

Apply it in EVERY process that runs megatron-core on CPU (each spawned rank, each torchrun
worker): a pytest fixture patches only the pytest process. It is a no-op where CUDA is available.
"""
from __future__ import annotations

import contextlib

import torch

_applied = False
_mode = None


def _is_cuda(d) -> bool:
    if isinstance(d, torch.device):
        return d.type == "cuda"
    if isinstance(d, str):
        return d.startswith("cuda")
    return False


class _CudaToCpuMode(torch.overrides.TorchFunctionMode):
    """device='cuda' in factory calls -> cpu; Tensor.cuda()/.to('cuda') -> no-ops;
    optionally Tensor.type() answers 'torch.cuda.*' for megatron's optimizer type checks."""

    def __init__(self, tensor_type: bool):
        super().__init__()
        self.tensor_type = tensor_type

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.tensor_type and func is torch.Tensor.type and len(args) == 1 and not kwargs:
            t = func(*args)
            return "torch.cuda." + t[len("torch."):] if t.startswith("torch.") and not t.startswith("torch.cuda.") else t
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu") + tuple(args[2:])
        return func(*args, **kwargs)


class _FakeEvent:
    def synchronize(self): pass
    def wait(self, stream=None): pass
    def record(self, stream=None): pass
    def query(self): return True


class _FakeStream:
    def __init__(self, *a, **k): pass
    def wait_stream(self, other): pass
    def wait_event(self, ev): pass
    def record_event(self, ev=None): return ev or _FakeEvent()
    def synchronize(self): pass
    def query(self): return True


def apply_cpu_shim(factory: bool = True, tensor_type: bool = True, force: bool = False) -> bool:
    """Patch torch.cuda / megatron-core for CPU. Returns False (and does nothing) when CUDA exists, unless `force`
    (a process that runs on the CPU on a GPU host, the trainer's --cpu: megatron-core's DDP buffers and the like
    would otherwise land on the GPU)."""
    global _applied, _mode
    if torch.cuda.is_available() and not force:
        return False
    if factory and _mode is None:
        _mode = _CudaToCpuMode(tensor_type)
        _mode.__enter__()
    if _applied:
        return True
    _applied = True
    cpu = torch.device("cpu")
    c = torch.cuda
    c.current_device = lambda: cpu
    c.get_rng_state = lambda device="cuda": torch.get_rng_state()
    c.set_rng_state = lambda s, device="cuda": torch.set_rng_state(s)
    # torch.manual_seed itself calls torch.cuda.manual_seed_all: leave that one alone
    c.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    c.synchronize = lambda device=None: None
    c.random.get_rng_state = c.get_rng_state
    cur = _FakeStream()
    c.Stream = _FakeStream
    c.Event = lambda *a, **k: _FakeEvent()
    c.current_stream = lambda device=None: cur
    c.default_stream = lambda device=None: cur
    c.stream = lambda s=None: contextlib.nullcontext()

    import megatron.core.tensor_parallel.random as R
    R._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    R._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: torch.set_rng_state(new_state)

    import megatron.core.transformer.moe.moe_utils as MU
    if not hasattr(MU, "te_general_gemm"):
        MU.te_general_gemm = None
    try:
        import megatron.core.transformer.multi_latent_attention as MLA
        if MLA.TELinear is None or type(MLA.TELinear).__name__ == "MagicMock":
            MLA.HAVE_TE = False
    except Exception:  # pragma: no cover - module layout differs by release
        pass
    import megatron.core.transformer.moe.token_dispatcher as TD
    orig = MU.maybe_move_tensor_to_cpu

    def _mv(tensor, as_numpy=False, record_stream=False):
        if torch.is_tensor(tensor) and not tensor.is_cuda and as_numpy:
            return tensor.numpy()
        return orig(tensor, as_numpy=as_numpy, record_stream=record_stream)

    MU.maybe_move_tensor_to_cpu = _mv
    TD.maybe_move_tensor_to_cpu = _mv
    return True
