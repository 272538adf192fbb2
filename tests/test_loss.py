"""selfkd's loss and sampling filters against the reference implementations (TRL, transformers).

TRL's `GKDTrainer.generalized_jsd_loss` (trl 1.16) divides both logit sets by its
`temperature` argument before log_softmax, i.e. the same (ms-swift) semantics as selfkd, so the
temperature is passed to both unchanged. (TRL's trainer itself calls it at the default T = 1.)
"""

import os

import pytest
import torch
import torch.nn.functional as F
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.gkd import GKDTrainer  # noqa: E402

import loss  # noqa: E402
from loss import chunked_jsd_loss_sum, generalized_jsd, jsd_loss_sum, sft_loss_sum  # noqa: E402
from generate import filter_logits, sample_next  # noqa: E402

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]
TEMPERATURES = [0.5, 1.0, 2.0]


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def logits_and_labels(dtype, seed=0, batch=3, seq=7, vocab=64):
    g = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(batch, seq, vocab, generator=g)).to(dtype)
    teacher = (3 * torch.randn(batch, seq, vocab, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    labels[0, :3] = -100  # a prompt
    labels[2, -2:] = -100  # padding
    return student, teacher, labels


# fp64: both sides agree to rounding (1e-10); fp32: 1e-5 relative.
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_matches_trl_value_and_grad(beta, temperature, dtype, tol):
    student, teacher, labels = logits_and_labels(dtype)

    s_ref = student.clone().requires_grad_()
    ref = GKDTrainer.generalized_jsd_loss(s_ref, teacher, labels=labels, beta=beta,
                                          temperature=temperature, reduction="batchmean")
    ref.backward()

    s = student.clone().requires_grad_()
    loss_sum, n = jsd_loss_sum(s, teacher, labels != -100, beta, temperature)
    (loss_sum / n).backward()  # batchmean

    assert n == int((labels != -100).sum())
    assert rel(loss_sum / n, ref) <= tol
    assert rel(s.grad, s_ref.grad) <= tol
    assert (s.grad[labels == -100] == 0).all()


@pytest.mark.parametrize("beta", BETAS)
def test_extreme_logits_stay_finite_and_correct(beta):
    """Log-ratios beyond the exp range (|log q/p| ~ 1000) take the overflow-free branches."""
    student, teacher, labels = logits_and_labels(torch.float64, seed=1)
    teacher[..., :5] -= 1000.0  # tokens the teacher rules out and the student does not
    student[..., 5:10] -= 1000.0  # and vice versa; the other tokens overlap and carry gradient
    mask = labels != -100

    s_ref = student.clone().requires_grad_()
    ref = GKDTrainer.generalized_jsd_loss(s_ref, teacher, labels=labels, beta=beta)
    ref.backward()

    s = student.float().requires_grad_()
    loss_sum, n = jsd_loss_sum(s, teacher.float(), mask, beta, 1.0)
    (loss_sum / n).backward()
    assert torch.isfinite(loss_sum) and torch.isfinite(s.grad).all()
    assert rel(loss_sum / n, ref) <= 1e-5
    assert rel(s.grad, s_ref.grad) <= 1e-5


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_nonnegative_in_bf16(beta, temperature):
    """bf16 logits, student ~ teacher: every single-token divergence is >= 0.

    ms-swift computed the divergence in bf16 and logged a negative JSD. On these inputs the
    textbook formula (TRL's) is negative for ~half the rows in bf16 at both noise levels, and
    still for ~half the rows in fp32 at noise 0.002 (just off the self-distillation fixed point).
    """
    g = torch.Generator().manual_seed(2)
    teacher = (4 * torch.randn(48, 2000, generator=g)).bfloat16()
    for noise in (0.02, 0.002):
        student = (teacher.float() + noise * torch.randn(48, 2000, generator=g)).bfloat16()
        for row in range(teacher.shape[0]):
            one = slice(row, row + 1)
            loss_sum, _ = jsd_loss_sum(student[one], teacher[one], torch.ones(1, dtype=torch.bool),
                                          beta, temperature)
            assert loss_sum >= 0, (noise, row, float(loss_sum))


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_identical_inputs_give_exact_zero(beta, temperature):
    """The self-distillation fixed point: loss and gradient are exactly 0, not rounding noise."""
    torch.manual_seed(3)
    for dtype in (torch.bfloat16, torch.float32):
        logits = (5 * torch.randn(2, 9, 300)).to(dtype)
        mask = torch.ones(2, 9, dtype=torch.bool)
        s = logits.clone().requires_grad_()
        loss_sum, _ = jsd_loss_sum(s, logits, mask, beta, temperature)
        loss_sum.backward()
        assert loss_sum.item() == 0.0
        assert (s.grad == 0).all()

    hidden = torch.randn(20, 32, dtype=torch.bfloat16)
    weight = torch.randn(300, 32, dtype=torch.bfloat16)
    h = hidden.clone().requires_grad_()
    loss_sum, _ = chunked_jsd_loss_sum(h, hidden, weight, torch.ones(20, dtype=torch.bool),
                                          beta, temperature, chunk_size=6)
    loss_sum.backward()
    assert loss_sum.item() == 0.0
    assert (h.grad == 0).all()


def hidden_inputs(dtype, n=40, hidden=16, vocab=100, seed=4):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, hidden, generator=g).to(dtype)
    ht = (hs.double() + 0.5 * torch.randn(n, hidden, generator=g)).to(dtype)
    weight = torch.randn(vocab, hidden, generator=g).to(dtype)
    mask = torch.rand(n, generator=g) < 0.8
    return hs, ht, weight, mask


@pytest.mark.parametrize("chunk_size", [1, 7, 8, 40, 64])  # 8 and 40 divide the 40 rows
@pytest.mark.parametrize("beta", BETAS)
def test_chunked_matches_unchunked(beta, chunk_size):
    hs, ht, weight, mask = hidden_inputs(torch.float64)

    h_ref = hs.clone().requires_grad_()
    ref, n_ref = jsd_loss_sum(F.linear(h_ref, weight), F.linear(ht, weight), mask, beta, 2.0)
    ref.backward()

    h = hs.clone().requires_grad_()
    loss_sum, n = chunked_jsd_loss_sum(h, ht, weight, mask, beta, 2.0, chunk_size=chunk_size)
    loss_sum.backward()

    assert n == n_ref
    assert rel(loss_sum, ref) <= 1e-12
    assert rel(h.grad, h_ref.grad) <= 1e-12


@pytest.mark.parametrize("rows_per_block", [1, 3, 64])  # CPU default 2; GPUs use 64
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_row_blocking_does_not_change_the_result(beta, rows_per_block, monkeypatch):
    hs, ht, weight, mask = hidden_inputs(torch.float64)
    h_ref = hs.clone().requires_grad_()
    ref, _ = chunked_jsd_loss_sum(h_ref, ht, weight, mask, beta, 2.0, chunk_size=16)
    ref.backward()

    monkeypatch.setitem(loss.ROWS_PER_BLOCK, "cpu", rows_per_block)
    h = hs.clone().requires_grad_()
    loss_sum, _ = chunked_jsd_loss_sum(h, ht, weight, mask, beta, 2.0, chunk_size=16)
    loss_sum.backward()
    assert rel(loss_sum, ref) <= 1e-12
    assert rel(h.grad, h_ref.grad) <= 1e-12


def test_chunked_bf16_matches_autograd_through_bf16_logits():
    """bf16 model: logits in bf16 as an lm_head would give them, the divergence in fp32."""
    hs, ht, weight, mask = hidden_inputs(torch.bfloat16)
    hs, ht, mask = hs.view(4, 10, -1), ht.view(4, 10, -1), mask.view(4, 10)  # [B, T, H]

    h_ref = hs.clone().requires_grad_()
    ref = GKDTrainer.generalized_jsd_loss(F.linear(h_ref, weight).float(),
                                          F.linear(ht, weight).float(),
                                          labels=torch.where(mask, 0, -100), beta=0.5,
                                          temperature=2.0, reduction="sum")
    ref.backward()

    h = hs.clone().requires_grad_()
    loss_sum, _ = chunked_jsd_loss_sum(h, ht, weight, mask, 0.5, 2.0, chunk_size=7)
    loss_sum.backward()
    assert h.grad.dtype == torch.bfloat16
    assert rel(loss_sum, ref) <= 1e-4
    assert rel(h.grad.float(), h_ref.grad.float()) <= 1e-2  # bf16 gradients: one rounding apart


@pytest.mark.parametrize("beta", BETAS)
def test_fp32_accurate_near_the_fixed_point(beta):
    """Student just off the teacher (logit gap ~0.003): fp32 against TRL's formula in fp64.

    The divergence is 3e-7 to 1e-6 per token while log-probs are ~-12, so the textbook sum
    p*(log p - log m) cancels away most digits in fp32: TRL's own fp32 loss is 3% to 105% off.
    selfkd's terms carry the small gap explicitly: loss within 1e-4. The gradient's floor is the
    fp32 log-softmax itself (~6e-7 absolute per log-prob against a gap of ~1.5e-3), so 1e-3.
    The fp64 reference starts from the same fp32-rounded logits.
    """
    g = torch.Generator().manual_seed(5)
    teacher = (3 * torch.randn(24, 3000, generator=g)).double()
    student = (teacher + 0.003 * torch.randn(24, 3000, generator=g, dtype=torch.float64)).float().double()
    labels = torch.zeros(24, dtype=torch.long)

    def trl(dtype):
        s = student.to(dtype).detach().requires_grad_()
        loss = GKDTrainer.generalized_jsd_loss(s, teacher.to(dtype), labels=labels, beta=beta,
                                               temperature=2.0, reduction="sum")
        loss.backward()
        return loss, s.grad

    ref, ref_grad = trl(torch.float64)
    s = student.float().detach().requires_grad_()
    loss_sum, _ = jsd_loss_sum(s, teacher.float(), torch.ones(24, dtype=torch.bool), beta, 2.0)
    loss_sum.backward()
    assert rel(loss_sum, ref) <= 1e-4
    assert rel(s.grad, ref_grad) <= 1e-3
    trl32, _ = trl(torch.float32)
    assert rel(trl32, ref) > 100 * rel(loss_sum, ref)  # the regime where the textbook sum fails


def test_no_grad_and_empty_mask():
    hs, ht, weight, mask = hidden_inputs(torch.float32)
    h = hs.clone().requires_grad_()
    with_grad, _ = chunked_jsd_loss_sum(h, ht, weight, mask, 0.5, 1.0, chunk_size=16)
    with torch.no_grad():
        without, _ = chunked_jsd_loss_sum(h, ht, weight, mask, 0.5, 1.0, chunk_size=16)
    assert without.grad_fn is None and torch.equal(with_grad.detach(), without)

    empty = torch.zeros_like(mask)
    loss_sum, n = chunked_jsd_loss_sum(h, ht, weight, empty, 0.5, 1.0)
    loss_sum.backward()  # still part of the graph: every rank can call backward
    assert n == 0 and loss_sum.item() == 0.0 and (h.grad == 0).all()


def test_frozen_lm_head_required():
    hs, ht, weight, mask = hidden_inputs(torch.float32)
    with pytest.raises(ValueError, match="frozen"):
        chunked_jsd_loss_sum(hs, ht, weight.requires_grad_(), mask, 0.5, 1.0)


@pytest.mark.parametrize("bad", [dict(beta=1.5), dict(beta=-0.1), dict(temperature=0.0)])
def test_bad_loss_arguments(bad):
    s, t, labels = logits_and_labels(torch.float32)
    args = dict(beta=0.5, temperature=1.0) | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        jsd_loss_sum(s, t, labels != -100, **args)


@pytest.mark.parametrize("chunk_size", [5, 40, 512])
def test_sft_loss_sum_matches_cross_entropy(chunk_size):
    hs, _, weight, mask = hidden_inputs(torch.float64)
    targets = torch.randint(0, weight.shape[0], mask.shape, generator=torch.Generator().manual_seed(5))

    h_ref = hs.clone().requires_grad_()
    ref = F.cross_entropy(F.linear(h_ref, weight), torch.where(mask, targets, -100),
                          reduction="sum")
    ref.backward()

    h = hs.clone().requires_grad_()
    loss = sft_loss_sum(h, weight, targets, mask, chunk_size=chunk_size)
    loss.backward()
    assert rel(loss, ref) <= 1e-12
    assert rel(h.grad, h_ref.grad) <= 1e-12


# ---- sampling filters ----


def hf_filter(logits, top_k, top_p):
    if top_k > 0:
        logits = TopKLogitsWarper(top_k)(None, logits)
    if top_p < 1.0:
        logits = TopPLogitsWarper(top_p)(None, logits)
    return logits


@pytest.mark.parametrize("top_k", [0, 1, 5, 50, 100])
@pytest.mark.parametrize("top_p", [1.0, 0.99, 0.9, 0.5, 0.1])
def test_filter_matches_transformers(top_k, top_p):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(6)) * 2
    assert torch.equal(filter_logits(logits, top_k, top_p), hf_filter(logits.clone(), top_k, top_p))


def test_filter_ties_and_hand_built():
    ties = torch.tensor([[1.0, 2.0, 2.0, 3.0, 0.0]])
    assert torch.equal(filter_logits(ties, top_k=2), hf_filter(ties.clone(), 2, 1.0))
    assert torch.isfinite(filter_logits(ties, top_k=2)).sum() == 3  # ties with the k-th are kept

    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()  # fp32, as sampling runs
    kept = lambda p: torch.isfinite(filter_logits(logits, top_p=p))[0].tolist()  # noqa: E731
    assert kept(0.8) == [True, True, False, False]  # 0.5 + 0.3 reaches 0.8 exactly
    assert kept(0.81) == [True, True, True, False]
    assert kept(0.5) == [True, False, False, False]
    assert kept(1e-6) == [True, False, False, False]  # at least one token
    for p in (0.8, 0.81, 0.5, 1e-6):
        assert torch.equal(filter_logits(logits, top_p=p), hf_filter(logits.clone(), 0, p))


def test_sample_next_greedy_seeded_and_filtered():
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(7))
    for t in (0, 0.0, None):
        assert torch.equal(sample_next(logits, t, top_k=5, top_p=0.5), logits.argmax(-1))

    draw = lambda seed, **kw: sample_next(logits, 1.0, generator=torch.Generator().manual_seed(seed), **kw)  # noqa: E731
    assert torch.equal(draw(0), draw(0))
    assert not torch.equal(draw(0), draw(1))

    top2 = logits.topk(2).indices
    ids = draw(3, top_k=2)
    assert (ids[:, None] == top2).any(-1).all()

    ids = draw(4, top_p=1e-6)  # nucleus of one token: sampling is greedy
    assert torch.equal(ids, logits.argmax(-1))


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
def test_kernels_equal_the_spec(beta, temperature):
    """The fast kernels against loss.generalized_jsd (the paper's formula), fp64: value and the
    gradient w.r.t. the student logits and hidden states agree to rounding."""
    hs, ht, weight, mask = hidden_inputs(torch.float64)
    h_spec = hs.clone().requires_grad_()
    spec = generalized_jsd(F.linear(h_spec, weight), F.linear(ht, weight), beta, temperature)[mask].sum()
    spec.backward()

    h_logits = hs.clone().requires_grad_()
    from_logits, n = jsd_loss_sum(F.linear(h_logits, weight), F.linear(ht, weight), mask, beta, temperature)
    from_logits.backward()
    h_chunked = hs.clone().requires_grad_()
    chunked, _ = chunked_jsd_loss_sum(h_chunked, ht, weight, mask, beta, temperature, chunk_size=7)
    chunked.backward()
    assert n == int(mask.sum())
    for value, grad in ((from_logits, h_logits.grad), (chunked, h_chunked.grad)):
        assert rel(value, spec) <= 1e-12
        assert rel(grad, h_spec.grad) <= 1e-10


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.5, 6, 1.0),
                                                     (1.0, 0, 0.8), (2.0, 8, 0.9)])
def test_sample_next_draws_from_the_filtered_softmax(temperature, top_k, top_p):
    """Chi-square goodness of fit: 20000 draws over a 12-token vocabulary against the exact
    distribution softmax(filter(logits / T)). The bound is the 0.999 quantile of chi-square
    with (support - 1) degrees of freedom (at most 11: 31.26), so a correct sampler fails once
    in a thousand seeds; the seed is fixed, so the test is deterministic."""
    logits = torch.randn(1, 12, generator=torch.Generator().manual_seed(11)) * 1.5
    expected = torch.softmax(filter_logits(logits / temperature, top_k, top_p), dim=-1)[0].double()
    n = 20000
    g = torch.Generator().manual_seed(12)
    draws = sample_next(logits.expand(n, -1), temperature, top_k, top_p, generator=g)
    counts = torch.bincount(draws, minlength=12).double()
    support = expected > 0
    assert counts[~support].sum() == 0  # nothing outside the filtered support
    chi2 = ((counts[support] - n * expected[support]) ** 2 / (n * expected[support])).sum().item()
    quantile_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12,
                    9: 27.88, 10: 29.59, 11: 31.26}
    assert chi2 < quantile_999[int(support.sum()) - 1], chi2
