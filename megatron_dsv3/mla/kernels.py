"""MLA's query/key/value assembly in one pass (V3 eqs. 3-5, 8-9), beside its plain-torch reference.

Between the up-projections and core attention, MLA only moves data and rotates the rope slices:

    q   [T, n, d_h + d_h^R]  (the q up-projection's output, per head [q^C | q^R before rope])
    kv  [T, n, d_h + d_v]    (the kv up-projection's output, per head [k^C | v])
    k_r [T, d_h^R]           (the decoupled rope key before rope, shared by all heads)
 -> query [T, n, d_h + d_h^R] = [q^C | RoPE(q^R)]                                   eq. 8-9
    key   [T, n, d_h + d_h^R] = [k^C | RoPE(k_r) for every head]                    eq. 3-4
    value [T, n, d_v]         = v                                                   eq. 5
(T = s*b tokens in [s, b] order; cos/sin [s, b|1, d_h^R/2] carry YaRN's attention factor.)

In plain torch that is two rope passes of several elementwise kernels, two `cat`s whose inputs are strided views
(one a broadcast over heads), and in backward the same again plus the sum of the rope key's gradient over heads:
measured on the H200 at V3 width, ~2 ms per layer in the cats alone; and the rope's saved views keep the whole q
up-projection output alive for backward. The kernel reads each input once and writes each output once (forward
~0.74 GB per layer at 4096 tokens, ~0.2 ms at the copy rate), in backward also once: d q, d kv = [dk^C | dv] per
head, and d k_r summed over heads in float32 registers (no atomics: one program owns a token). It saves nothing
but cos/sin for backward, and `value` is its own tensor, so neither up-projection output outlives the forward.
An in-place form (the query in q's own storage, value a view of kv) was measured on the H200 (2026-11-30) and lost:
MLA 12.73 vs 12.55 ms and +0.13 GiB peak (kv kept whole where value is kept), so it was removed.

`assemble_qkv_reference` is the plain-torch form (what MLASelfAttention always computed); tests compare the two
on CUDA and, through Triton's interpreter, on CPU.
"""
from __future__ import annotations

from typing import Tuple

import torch

from megatron_dsv3.mla.rope import apply_rope

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:  # CPU machines without Triton: the reference is used
    HAVE_TRITON = False

__all__ = ["assemble_qkv", "assemble_qkv_reference", "assemble_qkv_triton"]


def assemble_qkv_reference(q: torch.Tensor, kv: torch.Tensor, k_rope: torch.Tensor, cos: torch.Tensor,
                           sin: torch.Tensor, d_nope: int, interleaved: bool
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [s, b, n, d_h + d_h^R], kv [s, b, n, d_h + d_v], k_rope [s, b, d_h^R], cos/sin [s, b|1, 1, d_h^R/2]
    -> query, key [s, b, n, d_h + d_h^R], value [s, b, n, d_v] (a view of kv)."""
    s, b, n, _ = q.shape
    d_rope = q.shape[-1] - d_nope
    q_nope, q_rope = torch.split(q, [d_nope, d_rope], dim=-1)                     # [s, b, n, d_h], [.., d_h^R]
    k_nope, v = torch.split(kv, [d_nope, kv.shape[-1] - d_nope], dim=-1)          # [s, b, n, d_h], [.., d_v]
    q_rope = apply_rope(q_rope, cos, sin, interleaved)                            # eq. 8
    k_rope = apply_rope(k_rope.unsqueeze(2), cos, sin, interleaved)               # [s, b, 1, d_h^R]  eq. 3
    query = torch.cat((q_nope, q_rope), dim=-1)                                   # eq. 9
    key = torch.cat((k_nope, k_rope.expand(s, b, n, d_rope)), dim=-1)             # eq. 4: k^R shared by all heads
    return query, key, v


if HAVE_TRITON:
    @triton.jit
    def _rope_pairs(x_ptr, hoffs, hmask, i, INTERLEAVED: tl.constexpr, HALF: tl.constexpr):
        """Load the pairs (x1, x2) [H, HALF] of the rope slice whose start is x_ptr + hoffs[:, None]."""
        if INTERLEAVED:
            o1, o2 = 2 * i, 2 * i + 1
        else:
            o1, o2 = i, i + HALF
        m = hmask[:, None] & (i < HALF)[None, :]
        x1 = tl.load(x_ptr + hoffs[:, None] + o1[None, :], mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + hoffs[:, None] + o2[None, :], mask=m, other=0.0).to(tl.float32)
        return x1, x2

    @triton.jit
    def _qkv_fwd_kernel(q_ptr, kv_ptr, kr_ptr, cos_ptr, sin_ptr, query_ptr, key_ptr, value_ptr,
                        B, kr_stride, cs_sstride, cs_bstride,
                        N: tl.constexpr, DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr,
                        BN: tl.constexpr, BDN: tl.constexpr, BDV: tl.constexpr, BHALF: tl.constexpr,
                        INTERLEAVED: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)                         # token (s, b) in [s, b] order
        HALF: tl.constexpr = DR // 2
        DQK: tl.constexpr = DN + DR
        i = tl.arange(0, BHALF)
        hm = i < HALF
        cs_off = (t // B) * cs_sstride + (t % B) * cs_bstride     # cos/sin row of (s, b); cs_bstride 0: broadcast
        c = tl.load(cos_ptr + cs_off + i, mask=hm, other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + cs_off + i, mask=hm, other=0.0).to(tl.float32)
        # the shared rope key, rotated once per token
        if INTERLEAVED:
            r1 = tl.load(kr_ptr + t * kr_stride + 2 * i, mask=hm, other=0.0).to(tl.float32)
            r2 = tl.load(kr_ptr + t * kr_stride + 2 * i + 1, mask=hm, other=0.0).to(tl.float32)
        else:
            r1 = tl.load(kr_ptr + t * kr_stride + i, mask=hm, other=0.0).to(tl.float32)
            r2 = tl.load(kr_ptr + t * kr_stride + i + HALF, mask=hm, other=0.0).to(tl.float32)
        kr_a = r1 * c - r2 * sn
        kr_b = r2 * c + r1 * sn
        dn = tl.arange(0, BDN)
        dv = tl.arange(0, BDV)
        for h0 in tl.static_range(0, N, BN):
            h = h0 + tl.arange(0, BN)
            hmask = h < N
            qrow = t * (N * DQK) + h * DQK                        # [BN] start of each head's q / query row
            kvrow = t * (N * (DN + DV)) + h * (DN + DV)
            vrow = t * (N * DV) + h * DV
            mn = hmask[:, None] & (dn < DN)[None, :]
            x = tl.load(q_ptr + qrow[:, None] + dn[None, :], mask=mn, other=0.0)
            tl.store(query_ptr + qrow[:, None] + dn[None, :], x, mask=mn)
            x = tl.load(kv_ptr + kvrow[:, None] + dn[None, :], mask=mn, other=0.0)
            tl.store(key_ptr + qrow[:, None] + dn[None, :], x, mask=mn)
            mv = hmask[:, None] & (dv < DV)[None, :]
            x = tl.load(kv_ptr + kvrow[:, None] + DN + dv[None, :], mask=mv, other=0.0)
            tl.store(value_ptr + vrow[:, None] + dv[None, :], x, mask=mv)
            x1, x2 = _rope_pairs(q_ptr, qrow + DN, hmask, i, INTERLEAVED, HALF)
            mr = hmask[:, None] & hm[None, :]
            # rotated pairs are stored [x1 cos - x2 sin | x2 cos + x1 sin] (rope.apply_rope's output layout)
            tl.store(query_ptr + qrow[:, None] + DN + i[None, :],
                     (x1 * c[None, :] - x2 * sn[None, :]).to(query_ptr.dtype.element_ty), mask=mr)
            tl.store(query_ptr + qrow[:, None] + DN + HALF + i[None, :],
                     (x2 * c[None, :] + x1 * sn[None, :]).to(query_ptr.dtype.element_ty), mask=mr)
            ka = tl.zeros([BN, BHALF], dtype=tl.float32) + kr_a[None, :]
            kb = tl.zeros([BN, BHALF], dtype=tl.float32) + kr_b[None, :]
            tl.store(key_ptr + qrow[:, None] + DN + i[None, :], ka.to(key_ptr.dtype.element_ty), mask=mr)
            tl.store(key_ptr + qrow[:, None] + DN + HALF + i[None, :], kb.to(key_ptr.dtype.element_ty), mask=mr)

    @triton.jit
    def _qkv_bwd_kernel(dquery_ptr, dkey_ptr, dvalue_ptr, cos_ptr, sin_ptr, dq_ptr, dkv_ptr, dkr_ptr,
                        B, cs_sstride, cs_bstride,
                        N: tl.constexpr, DN: tl.constexpr, DR: tl.constexpr, DV: tl.constexpr,
                        BN: tl.constexpr, BDN: tl.constexpr, BDV: tl.constexpr, BHALF: tl.constexpr,
                        INTERLEAVED: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        HALF: tl.constexpr = DR // 2
        DQK: tl.constexpr = DN + DR
        i = tl.arange(0, BHALF)
        hm = i < HALF
        cs_off = (t // B) * cs_sstride + (t % B) * cs_bstride
        c = tl.load(cos_ptr + cs_off + i, mask=hm, other=0.0).to(tl.float32)
        sn = tl.load(sin_ptr + cs_off + i, mask=hm, other=0.0).to(tl.float32)
        if INTERLEAVED:
            o1, o2 = 2 * i, 2 * i + 1
        else:
            o1, o2 = i, i + HALF
        dn = tl.arange(0, BDN)
        dv = tl.arange(0, BDV)
        acc_a = tl.zeros([BHALF], dtype=tl.float32)               # d k_r, summed over heads (eq. 4's sharing)
        acc_b = tl.zeros([BHALF], dtype=tl.float32)
        for h0 in tl.static_range(0, N, BN):
            h = h0 + tl.arange(0, BN)
            hmask = h < N
            qrow = t * (N * DQK) + h * DQK
            kvrow = t * (N * (DN + DV)) + h * (DN + DV)
            vrow = t * (N * DV) + h * DV
            mn = hmask[:, None] & (dn < DN)[None, :]
            x = tl.load(dquery_ptr + qrow[:, None] + dn[None, :], mask=mn, other=0.0)
            tl.store(dq_ptr + qrow[:, None] + dn[None, :], x, mask=mn)
            x = tl.load(dkey_ptr + qrow[:, None] + dn[None, :], mask=mn, other=0.0)
            tl.store(dkv_ptr + kvrow[:, None] + dn[None, :], x, mask=mn)
            mv = hmask[:, None] & (dv < DV)[None, :]
            x = tl.load(dvalue_ptr + vrow[:, None] + dv[None, :], mask=mv, other=0.0)
            tl.store(dkv_ptr + kvrow[:, None] + DN + dv[None, :], x, mask=mv)
            mr = hmask[:, None] & hm[None, :]
            # rope's transpose: (da, db) = d[x1 cos - x2 sin | x2 cos + x1 sin] -> dx1 = da cos + db sin,
            # dx2 = db cos - da sin
            da = tl.load(dquery_ptr + qrow[:, None] + DN + i[None, :], mask=mr, other=0.0).to(tl.float32)
            db = tl.load(dquery_ptr + qrow[:, None] + DN + HALF + i[None, :], mask=mr, other=0.0).to(tl.float32)
            tl.store(dq_ptr + qrow[:, None] + DN + o1[None, :],
                     (da * c[None, :] + db * sn[None, :]).to(dq_ptr.dtype.element_ty), mask=mr)
            tl.store(dq_ptr + qrow[:, None] + DN + o2[None, :],
                     (db * c[None, :] - da * sn[None, :]).to(dq_ptr.dtype.element_ty), mask=mr)
            ka = tl.load(dkey_ptr + qrow[:, None] + DN + i[None, :], mask=mr, other=0.0).to(tl.float32)
            kb = tl.load(dkey_ptr + qrow[:, None] + DN + HALF + i[None, :], mask=mr, other=0.0).to(tl.float32)
            acc_a += tl.sum(ka, axis=0)
            acc_b += tl.sum(kb, axis=0)
        tl.store(dkr_ptr + t * DR + o1, (acc_a * c + acc_b * sn).to(dkr_ptr.dtype.element_ty), mask=hm)
        tl.store(dkr_ptr + t * DR + o2, (acc_b * c - acc_a * sn).to(dkr_ptr.dtype.element_ty), mask=hm)


def _launch_meta(n: int, d_nope: int, d_rope: int, d_v: int, heads_per_block: int) -> dict:
    np2 = triton.next_power_of_2
    return dict(N=n, DN=d_nope, DR=d_rope, DV=d_v, BN=max(1, min(np2(n), heads_per_block)), BDN=np2(d_nope),
                BDV=np2(d_v), BHALF=np2(max(1, d_rope // 2)))


# heads per loop step and warps, tuned on the H200 at V3 width (bf16, 4096 tokens, 128 heads; bench data 2026-11-29):
# forward 288 us (16 heads, 8 warps; 32 heads: 304), backward 418 us (8 heads, 4 warps; 32 heads: 651)
_FWD = dict(heads=16, num_warps=8)
_BWD = dict(heads=8, num_warps=4)


class _AssembleQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, kv, k_rope, cos, sin, d_nope, interleaved):
        s, b, n, dqk = q.shape
        d_rope, d_v = dqk - d_nope, kv.shape[-1] - d_nope
        q, kv = q.contiguous(), kv.contiguous()
        if k_rope.stride(-1) != 1 or k_rope.stride(0) != b * k_rope.stride(1):
            k_rope = k_rope.contiguous()
        cos_r = cos.reshape(cos.shape[0], cos.shape[1], -1).contiguous()             # [s, b|1, d_h^R/2]
        sin_r = sin.reshape(sin.shape[0], sin.shape[1], -1).contiguous()
        cs = (cos_r.stride(0), cos_r.stride(1) if cos_r.shape[1] == b and b > 1 else 0)  # 0: broadcast over b
        query = torch.empty_like(q)
        key = torch.empty_like(q)
        value = torch.empty(s, b, n, d_v, dtype=kv.dtype, device=kv.device)
        if s * b:
            meta = _launch_meta(n, d_nope, d_rope, d_v, _FWD["heads"])
            _qkv_fwd_kernel[(s * b,)](q, kv, k_rope, cos_r, sin_r, query, key, value, b, k_rope.stride(1), *cs,
                                      INTERLEAVED=interleaved, num_warps=_FWD["num_warps"], **meta)
        ctx.save_for_backward(cos_r, sin_r)
        ctx.meta = (s, b, n, d_nope, d_rope, d_v, interleaved, cs, k_rope.dtype)
        return query, key, value

    @staticmethod
    def backward(ctx, dquery, dkey, dvalue):
        cos_r, sin_r = ctx.saved_tensors
        s, b, n, d_nope, d_rope, d_v, interleaved, cs, kr_dtype = ctx.meta
        dquery = dquery.contiguous() if dquery is not None else torch.zeros(s, b, n, d_nope + d_rope,
                                                                           dtype=cos_r.dtype, device=cos_r.device)
        dkey = dkey.contiguous() if dkey is not None else torch.zeros_like(dquery)
        dvalue = dvalue.contiguous() if dvalue is not None else torch.zeros(s, b, n, d_v, dtype=dquery.dtype,
                                                                           device=dquery.device)
        dq = torch.empty_like(dquery)
        dkv = torch.empty(s, b, n, d_nope + d_v, dtype=dkey.dtype, device=dkey.device)
        dkr = torch.empty(s, b, d_rope, dtype=kr_dtype, device=dkey.device)
        if s * b:
            meta = _launch_meta(n, d_nope, d_rope, d_v, _BWD["heads"])
            _qkv_bwd_kernel[(s * b,)](dquery, dkey, dvalue, cos_r, sin_r, dq, dkv, dkr, b, *cs,
                                      INTERLEAVED=interleaved, num_warps=_BWD["num_warps"], **meta)
        return dq, dkv, dkr, None, None, None, None


def assemble_qkv_triton(q, kv, k_rope, cos, sin, d_nope: int, interleaved: bool):
    """The Triton path on any device (CPU tensors under TRITON_INTERPRET=1); same contract as the reference, except
    that value is its own contiguous tensor, and cos/sin must not require grad."""
    return _AssembleQKV.apply(q, kv, k_rope, cos.detach(), sin.detach(), d_nope, interleaved)


def assemble_qkv(q, kv, k_rope, cos, sin, d_nope: int, interleaved: bool):
    """The kernel on CUDA (bf16/fp16/fp32), the reference elsewhere."""
    if HAVE_TRITON and q.is_cuda and q.dtype != torch.float64 and not cos.requires_grad:
        return assemble_qkv_triton(q, kv, k_rope, cos, sin, d_nope, interleaved)
    return assemble_qkv_reference(q, kv, k_rope, cos, sin, d_nope, interleaved)
