"""CUDA path of ParameterEMA without megatron-core: closed form (bf16 and fp32 params) and the training thread's
stall per update against a synthetic step (matmuls + in-place parameter change on the default stream)."""
import sys, os, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
from megatron_dsv3.training.ema import ParameterEMA

def closed_form(dtype):
    torch.manual_seed(0)
    m = torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(4)]).cuda().to(dtype)
    d, T = 0.8, 4
    ema = ParameterEMA([m], d)
    snaps = [[p.detach().double().cpu() for p in m.parameters()]]
    for _ in range(T):
        ema.before_optimizer_step()
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        ema.update()
        snaps.append([p.detach().double().cpu() for p in m.parameters()])
    ema.wait()
    err = 0.0
    for i, e in enumerate(ema.ema[0]):
        want = d ** T * snaps[0][i] + sum((1 - d) * d ** (T - k) * snaps[k][i] for k in range(1, T + 1))
        err = max(err, float((e.double() - want).abs().max()))
    live = [p.detach().clone() for p in m.parameters()]
    with ema.swapped_in():
        pass
    same = all(torch.equal(a, b) for a, b in zip(live, m.parameters()))
    print(f"{dtype}: closed form max err {err:.2e} | pinned {ema.ema[0][0].is_pinned()} | restored exactly {same}")

def stall(n_layers=48, width=4096):
    m = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(n_layers)]).cuda().bfloat16()
    n = sum(p.numel() for p in m.parameters())
    x = torch.randn(8192, width, device="cuda", dtype=torch.bfloat16)
    def step():
        y = x
        for _ in range(3):
            for l in m:
                y = l(y)
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(0.9999)
    for variant in ("plain", "ema"):
        ema = ParameterEMA([m], 0.999) if variant == "ema" else None
        ts, st = [], []
        for i in range(13):
            torch.cuda.synchronize(); t0 = time.perf_counter()
            if ema: s0 = time.perf_counter(); ema.before_optimizer_step(); st.append(time.perf_counter() - s0)
            step()
            if ema: s0 = time.perf_counter(); ema.update(); st.append(time.perf_counter() - s0)
            torch.cuda.synchronize()
            if i >= 3: ts.append(time.perf_counter() - t0)
        if ema:
            ema.wait(); t0 = time.perf_counter(); ema.update(); ema.wait(); full = time.perf_counter() - t0
        ts.sort()
        print(f"{variant}: {n/1e6:.0f}M bf16 params | median step {ts[len(ts)//2]*1e3:.1f} ms"
              + (f" | stall/step {sum(st[6:])/10*1e3:.2f} ms | one update sync {full*1e3:.1f} ms" if ema else ""))

closed_form(torch.float32); closed_form(torch.bfloat16); stall()
