"""The harness itself: ranks see their parallel groups, results come back, failures fail loudly."""
import pytest
import torch

from megatron_dsv3.testing import DistributedTestError, run_distributed


def _report(rank, scale):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return {"rank": rank, "sum": t.item() * scale, "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(), "ep": ps.get_expert_model_parallel_world_size(),
            "tp_rank": ps.get_tensor_model_parallel_rank(), "cuda_dev": str(torch.cuda.current_device())}


def _fail_on_one(rank):
    if rank == 1:
        raise RuntimeError("boom on rank one")
    import torch.distributed as dist
    dist.barrier()  # rank 0 would wait forever: the harness must not


def test_run_distributed_groups_and_failures():
    out = run_distributed(_report, 4, tp=2, pp=2, scale=2.0, timeout=120)
    assert [o["rank"] for o in out] == [0, 1, 2, 3]
    assert all(o["sum"] == 12.0 for o in out)
    assert all(o["tp"] == 2 and o["pp"] == 2 for o in out)
    assert [o["tp_rank"] for o in out] == [0, 1, 0, 1]
    if not torch.cuda.is_available():
        assert all(o["cuda_dev"] == "cpu" for o in out)  # the shim is applied in every rank
    with pytest.raises(DistributedTestError, match="boom on rank one"):
        run_distributed(_fail_on_one, 2, timeout=60)


def test_single_process_fixture(mcore_single):
    from megatron.core import parallel_state as ps
    assert ps.model_parallel_is_initialized()
    assert ps.get_tensor_model_parallel_world_size() == 1
