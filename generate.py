"""Decoding: logits filters (top-k, top-p), sampling by inverting the CDF, and `generate`, the
KV-cache loop that every sampler of selfkd runs (on-policy completions, --seq_kd, the generate
command).
"""

from __future__ import annotations

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


def sample_next(logits, temperature, top_k=0, top_p=1.0, generator=None):
    """Next token ids [B] from logits [B, V].

    temperature 0 or None: greedy argmax. Otherwise divide by the temperature (in fp32),
    filter (top-k, then top-p) and draw by inverting the CDF with one uniform per row from
    `generator` (torch.multinomial draws one random number per vocabulary entry: 152064 per
    row per decode step).
    """
    if not temperature:
        return logits.argmax(dim=-1)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    logits = filter_logits(logits.float() / temperature, top_k, top_p)  # [B, V]
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)  # [B, V]
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]  # [B, 1]
    ids = torch.searchsorted(cdf, u, right=True).squeeze(-1)  # first index whose cdf exceeds u
    return ids.clamp(max=cdf.shape[-1] - 1)  # [B]


def greedy(logits):
    return logits.argmax(dim=-1)


@torch.no_grad()
def generate(model: Thinker, prompt_ids, prompt_mask, max_new_tokens: int, eos_ids, pad_id: int,
             pick_next=greedy, all_done=None, media=None, position_ids=None,
             media_inputs: MediaInputs | None = None):
    """KV-cache decoding from left-padded prompts [B, P].

    Media prompts: `media_inputs` (the prompts' MediaInputs; the towers run once, positions from
    rope_index), or their parts `media` (MediaEmbeds list) and `position_ids` [3, B, P], go to the
    prefill; each generated token then takes the previous position + 1 on all three axes (the
    prompt's last position + 1 + i for the i-th, as transformers' generate does). That is
    cumsum(mask) - 1 + rope_delta whenever the prompt's last token holds the row's largest
    position, i.e. prompts ending in text, except after the audio-in-video case noted at rope_index.
    Text and audio-only prompts without position_ids: the unchanged 1-D path.

    `pick_next(logits [B, V]) -> ids [B]` chooses each token (greedy by default). A row stops at
    its first eos. `all_done(local_done: bool) -> bool` lets data-parallel ranks agree on when to
    stop: under ZeRO-3 every rank must run the same number of forward calls, so a rank whose rows
    are finished keeps stepping until every rank is.
    Returns completion ids [B, C] (pad after the first eos) and a mask [B, C] that is 1 up to and
    including the first eos; C <= max_new_tokens.
    """
    B, P = prompt_ids.shape
    first = next(model.parameters())
    cache = KVCache(model.cfg, B, P + max_new_tokens, first.dtype, prompt_ids.device)
    eos = torch.tensor(list(eos_ids), device=prompt_ids.device)
    mask = prompt_mask
    if media_inputs is not None:
        media, position_ids = model.resolve_media(prompt_ids, prompt_mask, media_inputs, media, position_ids)

    def next_logits(ids, **media_kw):  # only the last position needs logits: [B, V], not [B, T, V]
        return model.lm_head(model(ids, mask, cache, return_hidden=True, **media_kw)[:, -1])

    prefill = {k: v for k, v in (("media", media), ("position_ids", position_ids)) if v is not None}
    logits = next_logits(prompt_ids, **prefill)
    step_pos = None if position_ids is None else position_ids[..., -1:]  # [3, B, 1] (or [B, 1])
    finished = torch.zeros(B, dtype=torch.bool, device=prompt_ids.device)
    tokens, alive = [], []
    for _ in range(max_new_tokens):
        nxt = pick_next(logits.float())  # [B]
        alive.append(~finished)
        tokens.append(torch.where(finished, torch.full_like(nxt, pad_id), nxt))
        finished = finished | torch.isin(nxt, eos)
        done = bool(finished.all())
        if (all_done(done) if all_done is not None else done) or len(tokens) == max_new_tokens:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        if step_pos is None:
            logits = next_logits(tokens[-1][:, None])
        else:
            step_pos = step_pos + 1
            logits = next_logits(tokens[-1][:, None], position_ids=step_pos)
    return torch.stack(tokens, 1), torch.stack(alive, 1).long()
