"""The GKD loss: the generalized Jensen-Shannon divergence between teacher and student.

Read top to bottom:
  1. the spec        generalized_jsd: the paper's formula in a dozen lines, per token
  2. the kernels     jsd_loss_sum (logits), chunked_jsd_loss_sum (hidden states + lm_head),
                     sft_loss_sum: the same values, fast and memory-lean; tests hold them to the spec
  3. CPU devices     row blocks and held buffers, the speed tricks that pay only on CPU

The trainer uses the kernels; the spec is what they compute.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------
# 1. The spec
# ----------------------------------------------------------------------------------------------


def generalized_jsd(student_logits, teacher_logits, beta: float, temperature: float):
    """Generalized JSD (Agarwal et al. 2024, "On-Policy Distillation of Language Models"), per
    token: [..., V] logits -> [...]. P = teacher, Q = student, both softmax(logits / T):
        M = beta * P + (1 - beta) * Q
        JSD_beta = beta * KL(P || M) + (1 - beta) * KL(Q || M)
    beta = 0 and 1 are the limits forward KL(P || Q) and reverse KL(Q || P) (the formula itself
    is 0 there). Gradients flow to the student only."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # at least fp32
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().to(dtype) / temperature, dim=-1)
    if beta == 0.0:
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    if beta == 1.0:
        return (log_q.exp() * (log_q - log_p)).sum(-1)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1 - beta)]), dim=0)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return beta * kl_pm + (1 - beta) * kl_qm


# ----------------------------------------------------------------------------------------------
# 2. The kernels
# ----------------------------------------------------------------------------------------------
#
# The spec above is what the kernels below compute; they differ in how.
#
# Temperature: both logit sets are divided by T before log_softmax, as ms-swift does (TRL's
# trainer calls its loss at T = 1 and uses T only for sampling). Gradients get the 1/T factor.
#
# Numerics. Everything is computed in (at least) fp32. Instead of the usual
# sum p*(log p - log m), which subtracts nearly equal logs and can come out slightly negative
# (ms-swift logged a negative JSD in bf16), each KL is summed from terms that are each >= 0:
#   KL(X||M) = sum_v x*phi(r),  r = log(m/x),  phi(r) = e^r - 1 - r >= 0,  x*(e^r - 1) = m - x.
# Everything is built from d = log Q - log P, exactly 0 where student and teacher agree, so at
# the self-distillation fixed point (identical logits) the loss and its gradient are exactly 0:
#   a = |d|,  x = expm1(-a) = lo/hi - 1 in (-1, 0],  hi = max(p, q),  lo = min(p, q).
# For 0 < beta < 1, split each token's two KL terms by which distribution is larger there:
# c = 1-beta where P is the larger (d <= 0), beta where Q is; m lies between lo and hi:
#   larger:  m/hi - 1 = c*x = y,  log(m/hi) = L = log1p(y)     -> term hi*(y - L)
#   smaller: m - lo = (1-c)*hi*(-x),  log(m/lo) = L + a          -> term (1-c)*hi*(-x) - lo*(L + a)
#   JSD_beta = sum (1-c)*term_hi + c*term_lo   (= beta*KL(P||M) + (1-beta)*KL(Q||M), term by term).
# No e^a appears, so nothing overflows however far apart the distributions are. term_hi is
# >= 0 by rounding (y >= log1p(y)); term_lo's two products are both O(a), and it is clamped at
# its bound 0. beta = 0 and 1 use the same pieces: q - p = -sign(d)*hi*x.
#
# Speed (CPU). The cost is passes over [rows, V] and transcendentals per element (an exp costs
# as much as ten multiplies), not FLOPs. So: three per element (one exp per distribution, the
# softmax keeping exp(z - max) for both q and log q, then expm1 and log1p); in-place ops on
# preallocated buffers (a fresh 100 MB tensor page-faults on every use); and blocks of 2 rows,
# whose ~10 buffers stay in cache across the ~40 passes. On GPU, blocks of 64 rows (launches).
#
# Gradients. The gradient w.r.t. the student logits z has a closed form (q = softmax(z / T)),
# exactly 0 where d == 0:
#   beta = 0:      dL/dz = (q - p) / T
#   beta = 1:      dL/dz = q * (d - KL(Q||P)) / T
#   0 < beta < 1:  dL/dz = -(1-beta) * q * (log(M/Q) + KL(Q||M)) / T,  log(M/Q) = L + relu(-d)
# so the losses compute it in the same pass as the value and hand it to autograd through
# _PrecomputedGrad, instead of letting autograd save the [rows, V] intermediates (or
# recomputing them under torch.utils.checkpoint). The chunked versions keep only the gradient
# w.r.t. the hidden states [N, H], and their backward does not touch lm_head at all (under
# ZeRO-3 it need not be gathered a second time).

WORK_BUFFERS = 7  # [k, V] buffers one block of _jsd_block_ works in (its docstring lists them)


def _softmax_and_log_(z: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    """softmax(z) into prob, log_softmax(z) into z itself: one exp per element. [k, V]"""
    z.sub_(z.amax(-1, keepdim=True))
    total = torch.exp(z, out=prob).sum(-1, keepdim=True)  # [k, 1]
    prob.div_(total)
    return z.sub_(total.log_())


def _jsd_block_(s, t, beta: float, inv_t: float, need_grad: bool, ws) -> torch.Tensor:
    """Generalized JSD of a block of rows -> loss_sum []; dL/ds is written into s.

    s, t: [k, V] student / teacher logits already divided by T, in the compute dtype; both are
    overwritten. ws: WORK_BUFFERS buffers shaped like s: 0 q, 1 p (later lo), 2 |d|, 3 hi,
    4-6 the temporaries of the KL terms.
    """
    q, p = ws[0], ws[1]
    d = _softmax_and_log_(s, q).sub_(_softmax_and_log_(t, p))  # [k, V] log(Q/P), in s
    a = torch.abs(d, out=ws[2])
    x = torch.neg(a, out=t).expm1_()  # expm1(-|d|) = lo/hi - 1
    hi = torch.maximum(p, q, out=ws[3])
    if beta in (0.0, 1.0):
        p_minus_q = torch.sign(d, out=ws[4]).mul_(hi).mul_(x)  # accurate where p ~ q
        if beta == 0.0:  # forward KL(P||Q) = sum (q - p) - p*d
            loss = torch.addcmul(p_minus_q, p, d, out=ws[5]).neg_().clamp_(min=0).sum()
            if need_grad:
                torch.mul(p_minus_q, -inv_t, out=s)  # (q - p) / T
            return loss
        kl = p_minus_q.addcmul_(q, d).clamp_(min=0).sum(-1, keepdim=True)  # KL(Q||P) [k, 1]
        if need_grad:
            d.sub_(kl).mul_(q).mul_(inv_t)  # q * (d - KL) / T
        return kl.sum()
    lo = torch.minimum(p, q, out=p)
    if beta == 0.5:  # the default: both terms weigh the same
        w = 0.5
        y = torch.mul(x, 0.5, out=ws[4])
    else:
        w = torch.sign(d, out=ws[5]).mul_(0.5 - beta).add_(0.5)  # term_hi's weight 1-c
        y = torch.addcmul(x, x, w, value=-1, out=ws[4])  # c*x
    # the clamp acts only when beta or 1-beta is below fp32 resolution (c rounds to 1)
    L = torch.log1p(y, out=ws[6]).clamp_(min=math.log(min(beta, 1.0 - beta)))  # log(m/hi)
    if need_grad:
        v = torch.sub(L, d.clamp_(max=0), out=s)  # log(M/Q) = L + relu(-d); d is used up
        kl_qm = torch.linalg.vecdot(q, v).neg_().unsqueeze(-1)  # [k, 1] KL(Q||M) = -sum q*v
        v.add_(kl_qm).mul_(q).mul_(-(1.0 - beta) * inv_t)
    term_hi = y.sub_(L).mul_(hi)  # hi * (y - L)
    term_lo = x.mul_(hi).mul_(w).neg_().addcmul_(lo, L.add_(a), value=-1).clamp_(min=0)
    return term_hi.sub_(term_lo).mul_(w).add_(term_lo).sum()  # w*term_hi + (1-w)*term_lo


def _jsd_rows(student_logits, teacher_logits, beta: float, temperature: float, need_grad: bool):
    """Generalized JSD summed over rows -> (loss_sum [], dL/d student_logits [c, V] or None).

    student_logits, teacher_logits: [c, V], any float dtype. Both are overwritten: the gradient
    is returned in student_logits' storage (in its dtype, as autograd would cast it).
    """
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    rows, vocab = student_logits.shape
    k = max(1, min(rows, ROWS_PER_BLOCK.get(student_logits.device.type, GPU_ROWS_PER_BLOCK)))
    # the block's work buffers, then two for fp32 copies of lower-precision input rows
    ws = torch.empty(WORK_BUFFERS + 2, k, vocab, dtype=dtype, device=student_logits.device)
    inv_t = 1.0 / temperature
    loss = torch.zeros((), dtype=dtype, device=student_logits.device)
    for start in range(0, rows, k):
        n = min(k, rows - start)
        s_rows, t_rows = student_logits[start:start + n], teacher_logits[start:start + n]
        # work in place on fp32 rows; copy lower-precision rows into the two spare buffers
        s = s_rows if s_rows.dtype == dtype else ws[-2, :n].copy_(s_rows)
        t = t_rows if t_rows.dtype == dtype else ws[-1, :n].copy_(t_rows)
        loss += _jsd_block_(s.mul_(inv_t), t.mul_(inv_t), beta, inv_t, need_grad, ws[:, :n])
        if need_grad and s is not s_rows:
            s_rows.copy_(s)
    return loss, (student_logits if need_grad else None)


class _PrecomputedGrad(torch.autograd.Function):
    """Passes `loss` through; its gradient w.r.t. `x` is the already computed `grad_x`.

    `x` is an input only to connect the loss to the graph. Backward scales grad_x by the
    incoming scalar (e.g. 1 / tokens in the batch, or DeepSpeed's loss scaling).
    """

    @staticmethod
    def forward(ctx, x, loss, grad_x):
        ctx.save_for_backward(grad_x)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_x,) = ctx.saved_tensors
        return grad_x * grad_loss.to(grad_x.dtype), None, None


def _check_jsd_args(beta: float, temperature: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_mask(mask: torch.Tensor, shape: torch.Size) -> None:
    if mask.dtype != torch.bool or mask.shape != shape:
        raise ValueError(f"mask must be bool of shape {tuple(shape)}, got {mask.dtype} "
                         f"{tuple(mask.shape)}")


def _wants_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def jsd_loss_sum(student_logits, teacher_logits, mask, beta=0.5, temperature=1.0):
    """Generalized JSD summed over the valid tokens -> (loss_sum [], num_tokens int).

    student_logits, teacher_logits: [..., V] any float dtype (computed in >= fp32);
    mask: [...] bool, True where the token carries loss. The teacher gets no gradient.
    Divide loss_sum by the completion tokens of the whole accumulated batch ("batchmean").
    """
    _check_jsd_args(beta, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    _check_mask(mask, student_logits.shape[:-1])
    s = student_logits[mask]  # [n, V]
    t = teacher_logits.detach()[mask]  # [n, V], a copy: _jsd_rows may overwrite it
    need_grad = _wants_grad(s)
    loss, grad = _jsd_rows(s.detach().clone(), t, beta, temperature, need_grad)
    if need_grad:
        loss = _PrecomputedGrad.apply(s, loss, grad)
    return loss, s.shape[0]


def _chunked_linear_loss(hiddens, weight, chunk_size: int, chunk_loss, need_grad: bool):
    """Sum over row chunks of chunk_loss(logits..., rows), logits_i = hiddens[i][rows] @ weight.T.

    chunk_loss returns (loss_sum, dL/d logits_0 or None) and may overwrite the logits. The
    gradient is folded into dL/d hiddens[0] right away, so only one chunk of [c, V] logits per
    hidden exists, in buffers reused across chunks. Chunks are balanced (640 rows at 512 -> 2 x
    320): the logits matmul is faster with more rows. -> (loss_sum [], dL/dhiddens[0] [n, H] or None)
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    n = hiddens[0].shape[0]
    chunks = max(1, math.ceil(n / chunk_size))
    rows_per_chunk = max(1, math.ceil(n / chunks))
    buffers = [_scratch(f"logits{i}", (rows_per_chunk, weight.shape[0]), weight.dtype, weight.device)
               for i in range(len(hiddens))]
    loss = hiddens[0].new_zeros((), dtype=torch.promote_types(weight.dtype, torch.float32))
    grad_hidden = torch.empty_like(hiddens[0]) if need_grad else None  # [n, H]
    for start in range(0, n, rows_per_chunk):
        rows = slice(start, min(n, start + rows_per_chunk))
        logits = [torch.mm(h[rows], weight.t(), out=buf[:rows.stop - start])  # [c, V]
                  for h, buf in zip(hiddens, buffers)]
        chunk_sum, grad_logits = chunk_loss(*logits, rows)
        loss += chunk_sum
        if need_grad:
            torch.mm(grad_logits.to(weight.dtype), weight, out=grad_hidden[rows])  # [c, H]
    return loss, grad_hidden


def _check_hidden_args(student_hidden, lm_head_weight, mask) -> None:
    if lm_head_weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("lm_head weight must be frozen (requires_grad=False): the chunked loss "
                         "computes gradients w.r.t. the hidden states only")
    if student_hidden.shape[-1] != lm_head_weight.shape[-1]:
        raise ValueError(f"hidden size {student_hidden.shape[-1]} does not match lm_head weight "
                         f"{tuple(lm_head_weight.shape)} ([V, H] expected)")
    _check_mask(mask, student_hidden.shape[:-1])


def chunked_jsd_loss_sum(student_hidden, teacher_hidden, lm_head_weight, mask, beta,
                            temperature, chunk_size=1024):
    """jsd_loss_sum of the logits hidden @ lm_head_weight.T, chunk by chunk.

    student_hidden, teacher_hidden: [..., H] final hidden states (teacher: no grad);
    lm_head_weight: [V, H], frozen; mask: [...] bool. -> (loss_sum [], num_tokens int)
    Extra memory: two [chunk_size, V] logits buffers in the weight's dtype (1.2 GB at 1024 x
    152064 in fp32, 0.6 GB in bf16) plus a few fp32 row blocks; the [n, V] logits never exist
    whole. lm_head_weight is read in this call only, never in backward: under ZeRO-3 gather it
    around this call alone.
    """
    _check_jsd_args(beta, temperature)
    _check_hidden_args(student_hidden, lm_head_weight, mask)
    if teacher_hidden.shape != student_hidden.shape:
        raise ValueError(f"student hidden {tuple(student_hidden.shape)} and teacher hidden "
                         f"{tuple(teacher_hidden.shape)} differ in shape")
    hs = student_hidden[mask]  # [n, H]
    ht = teacher_hidden.detach()[mask]  # [n, H]
    need_grad = _wants_grad(hs)

    def chunk_loss(student_logits, teacher_logits, rows):
        return _jsd_rows(student_logits, teacher_logits, beta, temperature, need_grad)

    with torch.no_grad():
        loss, grad = _chunked_linear_loss((hs.detach(), ht), lm_head_weight, chunk_size, chunk_loss,
                                          need_grad)
    if need_grad:
        loss = _PrecomputedGrad.apply(hs, loss, grad)
    return loss, hs.shape[0]


def sft_loss_sum(student_hidden, lm_head_weight, target_ids, mask, chunk_size=1024):
    """Cross-entropy (temperature 1) summed over the valid tokens, chunked -> loss_sum [].

    student_hidden: [..., H]; lm_head_weight: [V, H] frozen; target_ids: [...] the token each
    position predicts; mask: [...] bool.
    """
    _check_hidden_args(student_hidden, lm_head_weight, mask)
    hs = student_hidden[mask]  # [n, H]
    targets = target_ids[mask].unsqueeze(-1)  # [n, 1]
    need_grad = _wants_grad(hs)

    def chunk_loss(logits, rows):
        logp = torch.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype,
                                                                           torch.float32))
        loss = -logp.gather(-1, targets[rows]).sum()
        if not need_grad:
            return loss, None
        minus_one = torch.full(targets[rows].shape, -1.0, dtype=logp.dtype, device=logp.device)
        return loss, logp.exp_().scatter_add_(-1, targets[rows], minus_one)  # softmax - one_hot

    with torch.no_grad():
        loss, grad = _chunked_linear_loss((hs.detach(),), lm_head_weight, chunk_size, chunk_loss,
                                          need_grad)
    if need_grad:
        loss = _PrecomputedGrad.apply(hs, loss, grad)
    return loss


# ----------------------------------------------------------------------------------------------
# 3. CPU devices
# ----------------------------------------------------------------------------------------------
#
# On CPU the loss is bound by memory traffic, not arithmetic: two tricks keep the working set in
# cache and avoid page faults. Neither changes a value (tests run every block size in fp64).

# Rows per block in _jsd_rows. On CPU 2 rows keep the block's buffers (WORK_BUFFERS + 2 rows of
# V floats, ~11 MB at V = 152064) in L2/L3 across the ~40 passes; on GPU 64 rows give each kernel
# launch enough work.
ROWS_PER_BLOCK = {"cpu": 2}
GPU_ROWS_PER_BLOCK = 64

_CPU_SCRATCH: dict[tuple[str, torch.dtype], torch.Tensor] = {}


def _scratch(name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised buffer that the caller fully overwrites and does not keep.

    On CPU it is kept between calls and grown when needed: glibc hands large frees back to the
    OS, and faulting the pages of a fresh 0.4 GB logits buffer in again costs ~0.1 s per matmul.
    On GPU the caching allocator already reuses memory, and a held buffer would only raise the peak.
    """
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    buf = _CPU_SCRATCH.get((name, dtype))
    if buf is None or buf.numel() < numel:
        _CPU_SCRATCH.pop((name, dtype), None)  # free the old one before allocating the new one
        buf = _CPU_SCRATCH[(name, dtype)] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)
