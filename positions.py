"""Multimodal positions (MRoPE indices): one (time, height, width) position per token of a prompt
with media, exactly as transformers 5.24's Qwen3-Omni rope_index computes them.

A prompt with media, e.g. "text <|vision_start|> image_pad x N <|vision_end|> <|audio_start|>
audio_pad x M <|audio_end|> text", gets one (time, height, width) position per token. Walking the
real (non-pad) tokens of a row with a cursor `cur` (the next free position):
  text-like token (text and the start/end markers):   (cur, cur, cur); cur += 1
  image, grid (1, gh, gw) patches -> (gh/2) x (gw/2) tokens in row-major order:
      (cur, cur + h, cur + w);                         cur = max over the block + 1
  video, grid (gt, gh, gw), `spg` seconds per 2-frame slice -> t, then h, then w:
      (cur + t*spg*13, cur + h, cur + w);              cur = max over the block + 1
  audio, n tokens (13 per second of sound):   (cur + k, cur + k, cur + k); cur += n
so audio and video share one clock (13 ticks per second) and text after a block continues past it.
The time step t*spg*13 is float32 and not rounded: positions are float32, as in transformers 5.24.

Audio in video (use_audio_in_video): "<|vision_start|><|audio_start|> V..A..V..A.. <|audio_end|>
<|vision_end|>", the two start markers at cur, cur+1, then video and audio tokens interleaved by
time (the processor emits a video token while its time <= the next audio token's), each keeping
its own positions from base cur+2; the two end markers continue from the max of the block's LAST
same-modality run + 1 (transformers' rule: usually the block max, lower when a wide video outlasts
its audio in position).

rope_delta (per row) = max position + 1 - number of real tokens. Generated tokens continue after
the prompt's last position on all three axes (see `generate`; as transformers' generate), which is
cumsum(mask) - 1 + rope_delta when the prompt ends in text after its largest position (not after
such a "lower" audio-in-video end: there rope_delta would jump ahead, transformers' generate does not).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from model_qwen3omni import ThinkerConfig


def rope_index(input_ids, attention_mask, cfg: ThinkerConfig, *, image_grid_thw=None, video_grid_thw=None,
               video_second_per_grid=None, audio_token_counts=None, use_audio_in_video: bool = False):
    """3-D MRoPE positions of prompts with media (transformers' `get_rope_index`, as a pure function).

    input_ids, attention_mask [B, S] (any padding side; None = no padding).
    image_grid_thw [n_img, 3], video_grid_thw [n_vid, 3]: patch grids (t, h, w) in prompt order over the
        whole batch (row 0's media first); video_second_per_grid [n_vid]: seconds per temporal grid step
        (temporal_patch_size / fps; 2.0 with the processor's default fps).
    audio_token_counts [n_audio] (optional): tokens per audio clip, checked against the placeholder runs
        (transformers takes frame counts instead; 13 tokens per 100 frames, towers.audio_token_count). Audio
        blocks are read from the ids, so the counts are not needed to place them.
    use_audio_in_video: the videos are audio-in-video blocks; must match the ids.
    Returns positions float32 [3, B, S] (pads 0) and rope_deltas float32 [B, 1].

    Without image and video grids (text or audio only) every axis is cumsum(mask) - 1, pads 1, as in
    transformers' 1-D branch. Placeholder runs that do not fit their grid raise ValueError.
    """
    B, S = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    real = attention_mask == 1
    if image_grid_thw is None and video_grid_thw is None:
        for name in ("image", "video"):
            n = int((input_ids[real] == cfg.placeholder_id(name)).sum())
            if n:
                raise ValueError(f"{name}: the prompts hold {n} placeholder tokens but no {name}_grid_thw was given")
        if audio_token_counts is not None:
            n = int((input_ids[real] == cfg.audio_token_id).sum())
            want = int(torch.as_tensor(audio_token_counts).sum())
            if n != want:
                raise ValueError(f"audio: the prompts hold {n} placeholder tokens but audio_token_counts add up to "
                                 f"{want}")
        pos = attention_mask.float().cumsum(-1) - 1
        pos = pos.masked_fill(attention_mask == 0, 1)
        deltas = pos.max(-1, keepdim=True)[0] + 1 - attention_mask.sum(-1, keepdim=True)
        return pos[None].expand(3, -1, -1), deltas
    media = _MediaQueue(cfg, image_grid_thw, video_grid_thw, video_second_per_grid, audio_token_counts,
                        use_audio_in_video)
    positions = torch.zeros(3, B, S, dtype=torch.float32, device=device)
    deltas = []
    for b in range(B):
        ids = input_ids[b][real[b]].tolist()
        row = _row_positions(ids, cfg, media)  # [3, n] float32
        positions[:, b, real[b]] = row.to(device)
        deltas.append(row.max() + 1 - len(ids) if len(ids) else torch.tensor(0.0))
    media.check_all_used()
    return positions, torch.stack(deltas).view(B, 1).to(device)


class _MediaQueue:
    """The grids / lengths of the batch's media, consumed in prompt order by `_row_positions`."""

    def __init__(self, cfg, image_grid_thw, video_grid_thw, video_second_per_grid, audio_token_counts,
                 use_audio_in_video):
        as_rows = lambda g: [] if g is None else [tuple(int(v) for v in r) for r in torch.as_tensor(g).view(-1, 3)]
        self.grids = {"image": as_rows(image_grid_thw), "video": as_rows(video_grid_thw)}
        self.spg = None if video_second_per_grid is None else \
            torch.as_tensor(video_second_per_grid).detach().cpu().float().view(-1)
        if self.grids["video"] and (self.spg is None or len(self.spg) < len(self.grids["video"])):
            raise ValueError(f"video: {len(self.grids['video'])} videos need video_second_per_grid for each, got "
                             f"{None if self.spg is None else len(self.spg)}")
        self.audio = None if audio_token_counts is None else \
            [int(n) for n in torch.as_tensor(audio_token_counts).view(-1)]
        self.used = {"image": 0, "video": 0, "audio": 0}
        self.use_audio_in_video = use_audio_in_video
        self.merge, self.pps = cfg.spatial_merge_size, cfg.position_id_per_seconds

    def next_grid(self, kind, n_tokens):
        """The next image/video grid; checks that the placeholder run has prod(grid)/merge^2 tokens."""
        i = self.used[kind]
        if i >= len(self.grids[kind]):
            raise ValueError(f"{kind}: the prompts hold more {kind} blocks than the {len(self.grids[kind])} rows "
                             f"of {kind}_grid_thw")
        self.used[kind] += 1
        t, h, w = self.grids[kind][i]
        need = t * h * w // self.merge ** 2
        if n_tokens != need:
            raise ValueError(f"{kind} {i}: grid {t}x{h}x{w} needs {need} placeholder tokens, the prompt holds "
                             f"{n_tokens}")
        return i, (t, h, w)

    def next_audio(self, n_tokens):
        i = self.used["audio"]
        self.used["audio"] += 1
        if self.audio is not None:
            if i >= len(self.audio):
                raise ValueError(f"audio: the prompts hold more audio blocks than the {len(self.audio)} "
                                 "audio_token_counts")
            if self.audio[i] != n_tokens:
                raise ValueError(f"audio {i}: {self.audio[i]} tokens expected, the prompt holds {n_tokens} "
                                 "placeholder tokens")

    def check_all_used(self):
        for kind, grids in self.grids.items():
            if self.used[kind] != len(grids):
                raise ValueError(f"{kind}: {len(grids)} {kind}_grid_thw rows but {self.used[kind]} {kind} blocks "
                                 "in the prompts")
        if self.audio is not None and self.used["audio"] != len(self.audio):
            raise ValueError(f"audio: {len(self.audio)} audio_token_counts but {self.used['audio']} audio blocks "
                             "in the prompts")

    def vision_positions(self, kind, i, grid, base):
        """Positions [3, t*h*w/merge^2] of one image/video, tokens in (t, h, w) order, from `base`.
        Same float32 operations as transformers (time steps t*spg*13 for video, t*1*13 for images)."""
        t, h, w = grid
        h, w = h // self.merge, w // self.merge
        if kind == "video":
            t_step = torch.arange(t) * self.spg[i] * self.pps
        else:
            t_step = (torch.arange(t) * 1 * self.pps).float()
        tt = t_step.view(-1, 1).expand(-1, h * w).flatten()
        hh = torch.arange(h).view(1, -1, 1).expand(t, -1, w).flatten().float()
        ww = torch.arange(w).view(1, 1, -1).expand(t, h, -1).flatten().float()
        return torch.stack([tt, hh, ww]) + base


def _run_length(ids, start, token_ids) -> int:
    """How many consecutive tokens from `start` are in `token_ids`."""
    end = start
    while end < len(ids) and ids[end] in token_ids:
        end += 1
    return end - start


def _row_positions(ids: list[int], cfg: ThinkerConfig, media: _MediaQueue):
    """The streaming rule above for one row's real tokens -> float32 [3, len(ids)].

    Built from runs exactly as transformers builds them (text run, start marker(s), block, end
    marker(s)), with the cursor a float32 scalar, so fractional video times round identically."""
    vs, as_ = cfg.vision_start_token_id, cfg.audio_start_token_id
    img, vid, aud = cfg.image_token_id, cfg.video_token_id, cfg.audio_token_id
    pieces = []  # [3, k] position runs in token order

    def run(n, start):  # n text-like tokens from `start`: [3, n]
        return torch.arange(n, dtype=torch.float32).expand(3, n) + start

    def after_last():  # the cursor after the last run: its max + 1
        return pieces[-1].max() + 1 if pieces else torch.tensor(0.0)

    n, i = len(ids), 0  # i: first token not placed yet
    starts = [j for j, t in enumerate(ids) if (t == vs or t == as_) and j + 1 < n]
    for j in starts:
        if j < i:
            continue  # an <|audio_start|> inside an audio-in-video block
        nxt = ids[j + 1]
        if ids[j] == vs and nxt in (img, vid):
            kind, bos = ("image" if nxt == img else "video"), 1
        elif ids[j] == vs and nxt == as_ and j + 2 < n and ids[j + 2] in (aud, vid):
            kind, bos = "audio_in_video", 2
        elif ids[j] == as_ and nxt == aud:
            kind, bos = "audio", 1
        else:
            continue  # a lone marker: plain text
        if kind in ("video", "audio_in_video") and (kind == "audio_in_video") != media.use_audio_in_video:
            raise ValueError(f"video: found a {'plain video' if kind == 'video' else 'audio-in-video'} block with "
                             f"use_audio_in_video={media.use_audio_in_video}")
        cur = after_last()
        if j > i:  # text before the block
            pieces.append(run(j - i, cur))
            cur = cur + (j - i)
        pieces.append(run(bos, cur))  # <|vision_start|> / <|audio_start|> (both, for audio in video)
        cur = cur + bos
        k = j + bos  # first placeholder
        if kind == "audio":
            m = _run_length(ids, k, (aud,))
            media.next_audio(m)
            block = run(m, cur)
            last = block
        elif kind in ("image", "video"):
            m = _run_length(ids, k, (img if kind == "image" else vid,))
            idx, grid = media.next_grid(kind, m)
            block = media.vision_positions(kind, idx, grid, cur)
            last = block
        else:  # audio in video: video and audio tokens interleaved, each on its own positions
            m = _run_length(ids, k, (aud, vid))
            is_video = torch.tensor([t == vid for t in ids[k:k + m]])
            idx, grid = media.next_grid("video", int(is_video.sum()))
            media.next_audio(m - int(is_video.sum()))
            block = torch.empty(3, m)
            block[:, is_video] = media.vision_positions("video", idx, grid, cur)
            block[:, ~is_video] = run(m - int(is_video.sum()), cur)
            # the end markers follow the block's last same-modality run (transformers appends the
            # leftover of whichever modality outlasts the other as one piece and continues from it)
            other = (is_video != is_video[-1]).nonzero()
            last = block[:, int(other[-1]) + 1:] if len(other) else block
        pieces.append(block)
        eos = bos
        if k + m + eos > n:
            raise ValueError(f"{kind.split('_')[0]}: a block at token {j} is not closed by its end marker(s)")
        pieces.append(run(eos, last.max() + 1))  # <|vision_end|> / <|audio_end|>
        i = k + m + eos
    if i < n:
        pieces.append(run(n - i, after_last()))
    return torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0)
