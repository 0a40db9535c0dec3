"""The model on CUDA (skipped without a GPU): HF parity in float32, and a bf16 step with MTP."""
import pytest
import torch

from megatron_dsv3.config import DSV3Config
from megatron_dsv3.model import build_model
from megatron_dsv3.mtp import mtp_loss_report, set_mtp_backward_scale
from tests.model.common import hf_model, hf_to_ours, load_full, rel_err, small_config


@pytest.mark.gpu
def test_cuda_logits_match_hf(mcore_single):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = small_config("yarn")
    hf = hf_model(cfg)
    ours = build_model(cfg).eval()
    load_full(ours, hf_to_ours(hf.state_dict(), cfg.num_layers))
    hf, ours = hf.cuda(), ours.cuda()
    ids = torch.randint(0, cfg.vocab_size, (2, 40), device="cuda")
    with torch.no_grad():
        want, got = hf(input_ids=ids).logits, ours(ids)
    assert got.device.type == "cuda" and rel_err(got, want) < 1e-4


@pytest.mark.gpu
def test_cuda_bf16_step_with_mtp(mcore_single):
    cfg = DSV3Config.from_preset("tiny").replace(params_dtype="bfloat16")
    model = build_model(cfg).cuda()
    set_mtp_backward_scale(1.0)
    ids = torch.randint(0, cfg.vocab_size, (2, 64), device="cuda")
    loss = model(ids, labels=torch.roll(ids, -1, 1), loss_mask=torch.ones(2, 64, device="cuda"))
    loss.mean().backward()
    report = mtp_loss_report(model)
    assert torch.isfinite(loss).all() and set(report) == {1} and 5.0 < report[1] < 7.0   # ~ln(384) at init
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
