"""The decode step sampling runs: static shapes (Thinker.decode_step over the whole KV cache),
only the routed experts, compiled or not (generate.CompiledStep). Held to the whole-sequence
forward, to the per-expert loop, and compiled to eager, token for token."""
import os
import shutil
from dataclasses import replace

import pytest
import torch

from generate import CompiledStep, generate
from hf_models import left_padded_batch
from lora import inject_lora, lora_disabled, lora_parameters
from model_qwen3omni import KVCache, SparseMoE, Thinker
from tiny import init_random_, tiny_thinker_config


def small_model(layers=2, vocab=512, seed=0):
    """The tiny thinker's text part (8 experts top-2), LoRA on everything with B random, eval mode."""
    cfg = replace(tiny_thinker_config(), num_hidden_layers=layers, vocab_size=vocab, audio_config=None,
                  vision_config=None)
    model = Thinker(cfg)
    init_random_(model, seed, std=0.15)
    inject_lora(model, rank=4, alpha=8, dropout=0.0, targets="ALL", seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in lora_parameters(model):
            if name.endswith("B"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_decode_steps_equal_the_whole_sequence_forward():
    """Each static decode step (the whole cache under the key mask, written at a position tensor)
    gives the logits of the full forward at that position, for left-padded rows."""
    model = small_model()
    ids, mask = left_padded_batch(512, [9, 6, 3], seed=3)
    extra = torch.randint(0, 510, (3, 5), generator=torch.Generator().manual_seed(4))
    full_ids, full_mask = torch.cat([ids, extra], 1), torch.cat([mask, torch.ones_like(extra)], 1)
    P, L = ids.shape[1], ids.shape[1] + 7  # the cache longer than needed: unwritten slots stay masked
    with torch.no_grad():
        want = model(full_ids, full_mask)  # [B, P + 5, V]
        cache = KVCache(model.cfg, 3, L, torch.float32, "cpu")
        model(ids, mask, cache)
        key_valid = torch.zeros(3, L, dtype=torch.bool)
        key_valid[:, :P] = mask.bool()
        pos, index = mask.sum(-1, keepdim=True) - 1, torch.tensor([P])
        for t in range(5):
            pos = pos + 1
            got = model.lm_head(model.decode_step(extra[:, t:t + 1], pos, cache, index, key_valid))
            torch.testing.assert_close(got, want[:, P + t], rtol=1e-5, atol=1e-5)
            index += 1
    assert key_valid[:, P:P + 5].all() and not key_valid[:, P + 5:].any()


def test_routed_experts_equal_the_per_expert_loop():
    """A few tokens (N * K <= E) go each through its own experts, the weights and LoRA indexed out
    of the stacks (forward_routed): the per-expert loop's outputs and LoRA gradients (the spec)."""
    model = small_model(layers=1)
    moe = next(m for m in model.modules() if isinstance(m, SparseMoE))
    experts, (N, K, H) = moe.experts, (4, moe.top_k, model.cfg.hidden_size)
    assert N * K <= experts.num_experts  # 4 * 2 <= 8: SparseMoE takes the routed path
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, H, generator=g)
    ids = torch.stack([torch.randperm(experts.num_experts, generator=g)[:K] for _ in range(N)])  # [N, K]
    lora = [p for name, p in experts.named_parameters() if name.startswith("lora.")]
    assert len(lora) == 4

    def spec():
        w, rows = experts.per_expert(), []
        for n in range(N):
            for e in ids[n].tolist():
                gate, up = experts.project(x[n:n + 1], e, "gate_up_proj", w).chunk(2, dim=-1)
                rows.append(experts.project(torch.nn.functional.silu(gate) * up, e, "down_proj", w))
        return torch.cat(rows).view(N, K, H)

    routed, want = experts.forward_routed(x, ids), spec()
    torch.testing.assert_close(routed, want, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(routed.square().sum(), lora), torch.autograd.grad(want.square().sum(), lora)):
        assert (a - b).norm() <= 1e-6 * b.norm(), ((a - b).norm() / b.norm()).item()  # fp32 sums in other orders
    # and the whole block: each token's output does not depend on the others, so the same tokens
    # among enough others to take the loop path give the same rows
    tokens = torch.randn(1, N, H, generator=g)
    with torch.no_grad():
        alone = moe(tokens)
        among = moe(torch.cat([tokens, torch.randn(1, 8, H, generator=g)], 1))[:, :N]
    torch.testing.assert_close(alone, among, rtol=1e-5, atol=1e-6)


def sample(model, ids, mask, step=None, temperature=0.0, check_every=1, teacher=False, position_ids=None):
    g = torch.Generator().manual_seed(11)
    ctx = lora_disabled(model) if teacher else torch.no_grad()
    with ctx:
        return generate(model, ids, mask, 12, eos_ids=[7], pad_id=0, temperature=temperature, top_k=50,
                        top_p=0.9, generator=g, banned_ids=[3], step=step, check_every=check_every,
                        position_ids=position_ids)


def test_asking_for_finished_rows_every_8_tokens_changes_nothing_but_the_steps_run():
    """generate asks whether every row has stopped at each token on CPU and every 8 on a GPU (a host
    sync per token would starve it): both answers give the same tokens and mask, with rows that stop
    early, greedy and sampled."""
    model = small_model()
    ids, mask = left_padded_batch(512, [7, 4], seed=6)

    def run(check_every, eos, temperature):
        with torch.no_grad():
            return generate(model, ids, mask, 12, eos_ids=[eos], pad_id=0, temperature=temperature,
                            generator=torch.Generator().manual_seed(3), check_every=check_every)

    for temperature in (0.0, 1.0):
        free = run(1, 511, temperature)[0]
        eos = int(free[1, 2])  # row 1 stops at its third token (row 0 too, if it meets it)
        every, eighth = run(1, eos, temperature), run(8, eos, temperature)
        assert all(torch.equal(a, b) for a, b in zip(every, eighth)), temperature
        assert every[1][1].sum() <= 3 and every[0].shape[1] <= 12


def media_like_positions(mask):
    """[3, B, P] positions as a prompt with an image has them (rope_index): the three axes apart for
    a stretch of 'patches', then equal again; what decode steps continue from on all three axes."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    pos3 = torch.stack([pos, pos, pos]).clone()
    pos3[1, :, -4:-2] += 1  # height and width of a 2 x 2 patch grid
    pos3[2, :, -3:-1] += 1
    return pos3


def compiled_equals_eager(model, ids, mask, cases):
    """Each case (temperature, teacher, position_ids): the compiled step's tokens are the eager step's,
    finished rows asked about every 8 tokens instead of every one."""
    lines = []
    step = CompiledStep(model, lines.append)
    for temperature, teacher, position_ids in cases:
        eager = sample(model, ids, mask, temperature=temperature, teacher=teacher, position_ids=position_ids)
        compiled = sample(model, ids, mask, step, temperature, check_every=8, teacher=teacher,
                          position_ids=position_ids)
        assert all(torch.equal(a, b) for a, b in zip(eager, compiled)), (temperature, teacher)
        assert 3 not in eager[0]  # banned
    if has_cpp_compiler():
        assert len(lines) == 1 and lines[0].startswith("--compile_decode: decode step compiled in "), lines
        assert step.compiled is not None  # it did not fall back
    else:  # inductor cannot compile here: the eager tokens, after one line
        assert len(lines) == 1 and lines[0].startswith("--compile_decode: torch.compile failed"), lines


def has_cpp_compiler() -> bool:
    return any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c)


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_tokens():
    """torch.compile of the decode step (inductor on this CPU), greedy and sampled: every token equal
    to the eager step's. Slow: a cold compile is ~16 s, and the default suite compiles once already
    (test_what_runs.py, under ZeRO-3)."""
    model = small_model(layers=1)
    ids, mask = left_padded_batch(512, [7, 4], seed=6)
    compiled_equals_eager(model, ids, mask, [(0.0, False, None), (1.0, False, None)])


@pytest.mark.slow
def test_compiled_decode_gives_the_eager_tokens_for_the_teacher_and_media_positions():
    """The teacher (LoRA off: another graph) and 3-D positions (media prompts: another graph)."""
    model = small_model(layers=1)
    ids, mask = left_padded_batch(512, [7, 4], seed=6)
    pos3 = media_like_positions(mask)
    compiled_equals_eager(model, ids, mask, [(0.0, True, None), (1.0, True, None), (1.0, False, pos3)])
    with torch.no_grad():  # the positions matter
        assert not torch.equal(sample(model, ids, mask, temperature=1.0, position_ids=pos3)[0],
                               sample(model, ids, mask, temperature=1.0)[0])


def test_a_failing_compile_decodes_eagerly_after_one_line(monkeypatch):
    model = small_model()
    ids, mask = left_padded_batch(512, [5, 5], seed=7)

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("inductor: no working C++ compiler\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    lines = []
    step = CompiledStep(model, lines.append)
    tokens = sample(model, ids, mask, step, temperature=1.0)
    assert lines == ["--compile_decode: torch.compile failed (RuntimeError: inductor: no working C++ compiler); "
                     "decoding eagerly"]
    assert all(torch.equal(a, b) for a, b in zip(tokens, sample(model, ids, mask, temperature=1.0)))
