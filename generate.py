"""Decoding: logits filters (top-k, top-p), sampling by inverting the CDF, and `generate`, the
KV-cache loop that every sampler of selfkd runs (on-policy completions, --seq_kd, the generate
command): a prefill, then one static-shape `Thinker.decode_step` per token, compiled or not
(`CompiledStep`).
"""

from __future__ import annotations

import time

import torch

from model_qwen3omni import KVCache, MediaInputs, Thinker

def filter_logits(logits, top_k=0, top_p=1.0):
    """Set logits outside the top-k, then outside the top-p nucleus, to -inf. [B, V] -> [B, V]

    Same semantics as transformers' TopKLogitsWarper then TopPLogitsWarper with
    min_tokens_to_keep=1 (ties with the k-th logit are kept; the nucleus is the smallest set
    whose mass reaches top_p).
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)  # [B, V] ascending
        mass_below = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
        drop = mass_below <= 1 - top_p  # the tail holding at most 1 - top_p of the mass
        drop[..., -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample_next(logits, temperature, top_k=0, top_p=1.0, generator=None, u=None):
    """Next token ids [B] from logits [B, V].

    temperature 0 or None: greedy argmax. Otherwise divide by the temperature (in fp32),
    filter (top-k, then top-p) and draw by inverting the CDF with one uniform per row: `u` [B, 1]
    in [0, 1), else drawn from `generator` (torch.multinomial draws one random number per
    vocabulary entry: 152064 per row per decode step).
    """
    if not temperature:
        return logits.argmax(dim=-1)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = filter_logits(logits.float() / temperature, top_k, top_p)  # [B, V]
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)  # [B, V]
    if u is None:
        u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device)
    u = u * cdf[:, -1:]  # [B, 1]
    ids = torch.searchsorted(cdf, u, right=True).squeeze(-1)  # first index whose cdf exceeds u
    return ids.clamp(max=cdf.shape[-1] - 1)  # [B]


CACHE_ROUND = 64  # cache lengths of a compiled decode step: multiples of this


class CompiledStep:
    """`model.decode_step` under torch.compile, for generate(step=...): `--compile_decode`.

    One graph for the whole step (the routed experts, attention over the static cache, no host
    sync), so on CPU inductor fuses its ~580 eager ops into ~60 kernels, and on a GPU mode
    reduce-overhead replays it as a CUDA graph. torch compiles again for each new kind of call
    (student or teacher, another batch size; after a second cache length it makes that length
    dynamic). The first compilation's seconds go to `log`, once. Where compiling fails (no C++
    compiler for inductor, an op it cannot trace), one log line says so and every step runs
    eagerly from then on: same tokens, only slower."""

    def __init__(self, model: Thinker, log=print):
        self.model, self.log, self.timed = model, log, False
        cuda = next(model.parameters()).is_cuda
        # fullgraph: a graph break (an op or hook dynamo cannot trace) fails here, loudly, rather
        # than leaving the step in pieces that recompile per layer
        self.compiled = torch.compile(model.decode_step, fullgraph=True, mode="reduce-overhead" if cuda else None)

    def __call__(self, *args):
        if self.compiled is None:
            return self.model.decode_step(*args)
        start = time.perf_counter()
        try:
            out = self.compiled(*args)
        except Exception as e:  # noqa: BLE001 - whatever torch.compile raises, the step still runs eagerly
            self.compiled = None
            first = (str(e).strip().splitlines() or [""])[0][:200]
            self.log(f"--compile_decode: torch.compile failed ({type(e).__name__}: {first}); decoding eagerly")
            return self.model.decode_step(*args)
        if not self.timed:
            self.timed = True
            self.log(f"--compile_decode: decode step compiled in {time.perf_counter() - start:.1f} s")
        return out


@torch.no_grad()
def generate(model: Thinker, prompt_ids, prompt_mask, max_new_tokens: int, eos_ids, pad_id: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, generator=None, banned_ids=(),
             all_done=None, media=None, position_ids=None, media_inputs: MediaInputs | None = None,
             step=None, check_every: int | None = None):
    """KV-cache decoding from left-padded prompts [B, P]: one prefill forward over the prompts, then
    one `Thinker.decode_step` per token, all in the same static shapes (`step`, e.g. a
    `CompiledStep`, replaces it).

    Each token: `sample_next` (greedy at temperature 0) over the logits with `banned_ids` at -inf.
    The uniforms of the draws come from `generator` all at once, one per row and token: a run
    consumes the same random numbers however early its rows stop.

    Media prompts: `media_inputs` (the prompts' MediaInputs; the towers run once, positions from
    rope_index), or their parts `media` (MediaEmbeds list) and `position_ids` [3, B, P], go to the
    prefill; each generated token then takes the previous position + 1 on all three axes (the
    prompt's last position + 1 + i for the i-th, as transformers' generate does). That is
    cumsum(mask) - 1 + rope_delta whenever the prompt's last token holds the row's largest
    position, i.e. prompts ending in text, except after the audio-in-video case noted at rope_index.
    Text and audio-only prompts without position_ids: 1-D positions, the prompt's real tokens + i.

    A row stops at its first eos. Whether every row has stopped is asked of the device every
    `check_every` tokens (default: every token on CPU, where asking costs nothing; every 8 on a
    GPU, which a host sync per token would starve), so up to check_every - 1 steps run past the
    end. `all_done(local_done: bool) -> bool` lets data-parallel ranks agree on when to stop:
    under ZeRO-3 every rank must run the same number of forward calls.
    Returns completion ids [B, C] (pad after the first eos) and a mask [B, C] that is 1 up to and
    including the first eos; C <= max_new_tokens is the steps until every row stopped.
    """
    B, P = prompt_ids.shape
    device = prompt_ids.device
    check_every = check_every or (1 if device.type == "cpu" else 8)
    # a compiled step sees the cache length as a shape: rounded up, prompts of many lengths share it
    length = P + max_new_tokens if step is None else -(-(P + max_new_tokens) // CACHE_ROUND) * CACHE_ROUND
    cache = KVCache(model.cfg, B, length, next(model.parameters()).dtype, device)
    if media_inputs is not None:
        media, position_ids = model.resolve_media(prompt_ids, prompt_mask, media_inputs, media, position_ids)
    prefill = {k: v for k, v in (("media", media), ("position_ids", position_ids)) if v is not None}
    hidden = model(prompt_ids, prompt_mask, cache, return_hidden=True, **prefill)  # [B, P, H]
    logits = model.lm_head(hidden[:, -1])  # [B, V]: only the last position needs logits

    # the decode steps' state, all on the device and updated in place
    key_valid = torch.zeros(B, length, dtype=torch.bool, device=device)  # [B, L]
    key_valid[:, :P] = prompt_mask.bool()
    pos = (position_ids[..., -1:] if position_ids is not None  # [3, B, 1] or [B, 1]
           else prompt_mask.long().sum(-1, keepdim=True) - 1)  # the last prompt token's
    index = torch.tensor([P], device=device)  # where the next token's k, v go
    u = torch.rand(max_new_tokens, B, 1, generator=generator, device=device) if temperature else None
    eos = torch.tensor(list(eos_ids), device=device)
    banned = torch.tensor(list(banned_ids), dtype=torch.long, device=device)
    tokens = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)  # [B, C]
    alive = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    if step is not None and device.type == "cuda":  # CUDA graphs may keep these in place between replays
        for t in (*cache.k, *cache.v, key_valid, index):
            torch._dynamo.mark_static_address(t, guard=False)
    step = step or model.decode_step
    for i in range(max_new_tokens):
        nxt = sample_next(logits.float().index_fill_(1, banned, float("-inf")), temperature, top_k, top_p,
                          u=None if u is None else u[i])  # [B]
        alive[:, i] = ~finished
        tokens[:, i] = torch.where(finished, pad_id, nxt)
        finished |= torch.isin(nxt, eos)
        if i + 1 == max_new_tokens:
            break
        if (i + 1) % check_every == 0:
            done = bool(finished.all())
            if all_done(done) if all_done is not None else done:
                break
        pos = pos + 1
        logits = model.lm_head(step(tokens[:, i:i + 1], pos, cache, index, key_valid))
        index += 1
    C = int(alive.any(0).sum())  # steps until every row had stopped (later ones are all pads)
    return tokens[:, :C], alive[:, :C]
