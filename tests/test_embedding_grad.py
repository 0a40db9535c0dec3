"""The word embedding's gradient added row by row into its buffer (embedding_grad.py), against float64 and torch."""
import pytest
import torch
import torch.nn.functional as F

from megatron_dsv3.embedding_grad import (accumulate_rows_reference, accumulate_rows_triton, embedding_row_grad)


def _case(seed, T=37, V=50, H=300, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V // 3, (T,), generator=g)                  # many repeats, most rows untouched
    ids[5] = V - 1
    grad = torch.randn(T, H, generator=g) * torch.logspace(-3, 3, H)[None, :]
    buf = torch.randn(V, H, generator=g)
    return ids.to(device), grad.to(device, dtype), buf.to(device, dtype)


def _float64_rows(buf, ids, grad):
    want = buf.double().cpu()                                            # compared on the host
    want.index_add_(0, ids.cpu().long(), grad.double().cpu())
    return want


@pytest.mark.parametrize("one_id", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_kernel_against_float64(triton_device, dtype, one_id):
    """Triton (the interpreter on CPU) and the reference: each touched row = old + the float32 sum of its tokens'
    rows, rounded once (bf16: within one rounding of float64; float32: within float32 sums), untouched rows
    bit-identical, two runs bit-equal (no atomics), H spanning several chunks with a ragged end."""
    ids, grad, buf = _case(0, dtype=dtype, device=triton_device)
    if one_id:                                                           # one run of every token (a padding id)
        ids = torch.full_like(ids, 7)
    want = _float64_rows(buf, ids, grad)
    touched = torch.zeros(buf.shape[0], dtype=torch.bool)
    touched[ids.cpu().long()] = True
    for fn, fixed_order in ((lambda b: accumulate_rows_triton(b, ids, grad, block_h=128, rows=4), True),
                            (lambda b: accumulate_rows_reference(b, ids, grad), triton_device == "cpu")):
        runs = []
        for _ in range(2):
            b = buf.clone()
            fn(b)
            runs.append(b)
        if fixed_order:          # the reference's index_add_ adds with atomics on CUDA: only the kernel is fixed there
            assert torch.equal(runs[0], runs[1])
        got = runs[0].cpu()
        assert torch.equal(got[~touched], buf.cpu()[~touched])
        tol = dict(rtol=1e-5, atol=1e-3) if dtype == torch.float32 else dict(rtol=8e-3, atol=8e-3)
        torch.testing.assert_close(got[touched].double(), want[touched].to(dtype).double(), **tol)


def test_lookup_gradient_dense_first_then_rows_into_the_buffer():
    """No buffer: torch's dense gradient (bit-equal to F.embedding's). Then .grad exists: the rows are added into
    that same storage; a float32 main_grad with megatron's flag: added there, the flag set, the dummy returned."""
    ids, grad, _ = _case(1)
    w = torch.randn(50, 300, requires_grad=True)
    ids2 = ids.view(1, -1)
    embedding_row_grad(ids2, w).backward(grad.view(1, -1, 300))
    w_ref = w.detach().clone().requires_grad_()
    F.embedding(ids2, w_ref).backward(grad.view(1, -1, 300))
    assert torch.equal(w.grad, w_ref.grad)
    first, ptr = w.grad.clone(), w.grad.data_ptr()
    embedding_row_grad(ids2, w).backward(2 * grad.view(1, -1, 300))
    assert w.grad.data_ptr() == ptr
    torch.testing.assert_close(w.grad, 3 * first, rtol=1e-5, atol=1e-4)
    w.grad = None
    w.main_grad = torch.full(w.shape, 0.5)
    w.grad_added_to_main_grad = False
    embedding_row_grad(ids2, w).backward(grad.view(1, -1, 300))
    assert w.grad_added_to_main_grad
    torch.testing.assert_close(w.main_grad, 0.5 + first, rtol=1e-5, atol=1e-4)


def test_input_gradient_only_pass_leaves_the_buffer_alone():
    """DualPipe's B pass (autograd.grad for another input) adds nothing; a later backward adds once."""
    ids, grad, _ = _case(2)
    w = torch.randn(50, 300, requires_grad=True)
    w.grad = torch.zeros_like(w)
    x = torch.randn(300, requires_grad=True)
    out = embedding_row_grad(ids, w) * x
    torch.autograd.grad(out, x, grad, retain_graph=True)
    assert not w.grad.any()
    out.backward(grad)
    ref = torch.zeros(50, 300, dtype=torch.float64).index_add_(0, ids, (grad * x.detach()).double())
    torch.testing.assert_close(w.grad.double(), ref, rtol=1e-5, atol=1e-4)


def test_vocab_parallel_embedding_swap_same_outputs_and_grads(mcore_single):
    """The class assigned to megatron-core's VocabParallelEmbedding instance: same output and weight gradient as
    megatron-core's own forward (TP=1), two accumulating steps; eval mode takes megatron-core's forward."""
    from megatron.core.tensor_parallel.layers import VocabParallelEmbedding
    from megatron_dsv3.config import DSV3Config
    from megatron_dsv3.embedding_grad import VocabParallelEmbeddingRowGrad
    tc = DSV3Config.from_preset("tiny").to_transformer_config()
    torch.manual_seed(0)
    ref = VocabParallelEmbedding(64, 32, init_method=torch.nn.init.normal_, config=tc)
    ours = VocabParallelEmbedding(64, 32, init_method=torch.nn.init.normal_, config=tc)
    ours.load_state_dict(ref.state_dict())
    ours.__class__ = VocabParallelEmbeddingRowGrad
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    gy = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(4))
    for _ in range(2):
        a, b = ref(ids), ours(ids)
        assert torch.equal(a, b)
        a.backward(gy)
        b.backward(gy)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-6, atol=1e-6)
    ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(ids), ref(ids))


@pytest.mark.skipif(torch.cuda.is_available(), reason="megatron DDP puts its gradient buffers on "
                    "torch.cuda.current_device() where CUDA exists, and this gloo harness builds the model on the CPU")
def test_model_step_with_row_gradients_equals_dense(monkeypatch):
    """DSV3Model.embedding_row_grad under megatron DDP: one step of 4 micro-batches of the tiny model with MTP (the
    embedding used twice per micro-batch, megatron's zero_out_wgrad case) gives the same gradients as the dense
    lookup for every parameter (float32, sums reordered)."""
    from megatron_dsv3.model import DSV3Model
    from megatron_dsv3.testing import single_process
    from tests.model import test_parallel as T
    batches = T._batches()
    grads = {}
    for rows in (False, True):
        monkeypatch.setattr(DSV3Model, "embedding_row_grad", rows)
        with single_process(seed=11):
            from megatron_dsv3.model import build_model
            state = {k: v.clone() for k, v in build_model(T._config(), device="cpu").state_dict().items()
                     if not k.endswith("_extra_state")}
            grads[rows] = T.train_step(0, None, state, batches)["grads"]
    emb = "embedding.word_embeddings.weight"
    assert grads[True][emb].abs().max() > 0
    for k, want in grads[False].items():
        torch.testing.assert_close(grads[True][k], want, rtol=1e-5, atol=1e-5 * float(want.abs().max()), msg=k)
