"""The Qwen3-Omni-30B-A3B thinker's two encoders (audio tower, vision tower), in plain PyTorch.

Read top to bottom: configs -> the shared windowed attention -> audio tower -> vision tower.
Both reproduce transformers 5.24 (`Qwen3OmniMoeAudioEncoder`, `Qwen3OmniMoeVisionEncoder`) op for op, with
SDPA attention (bit-identical to its "sdpa" path in fp32 and bf16; its "eager" path rounds the softmax
probabilities to the activation dtype first, which differs at bf16 rounding level), and their parameter names
are the released checkpoint's after `thinker.audio_tower.` / `thinker.visual.`.

Audio tower (Whisper-like, 0.65 B). Input: 128-bin log-mel frames at 100 frames/s, all clips of a batch
concatenated along time. Each clip is cut into 1 s chunks (100 frames; the last one shorter); three stride-2
3x3 convolutions over (mel, time) turn a chunk into 13 tokens; positions are sinusoids that restart at 0 in
every chunk. The 32 pre-LN transformer layers attend bidirectionally inside windows of 8 s (104 tokens) of
one clip, never across clips. A 2-layer head projects to the LM width (2048). A clip of n frames gives
`audio_token_count(n)` tokens, which replace its `<|audio_pad|>` placeholders in order.

Vision tower (SigLIP-like ViT, 0.54 B). Input: 16x16 patches, each flattened over (channel, 2 frames, 16, 16)
= 1536 values (an image is its own frame twice), listed per image/video, per 2-frame temporal slice, in 2x2
merge-block order. A linear patch embedding, a learned 48x48 position grid resampled bilinearly to each
frame's grid, and 2-D rotary (row, column) in the attention; each temporal slice attends only to itself.
After the last of the 27 blocks a merger concatenates each 2x2 block of patches into one token
(4 x 1152 -> 2048). "Deepstack": the outputs of blocks 8, 16 and 24 go through their own mergers and are
added to the LM's hidden states at the visual token positions after its first three layers.

Both towers are plain nn.Modules with no distributed code. Every parameter's values are read only inside
the forward of the module that owns it (elsewhere at most its `.dtype`), so DeepSpeed ZeRO-3 can partition
them like the LM (its hooks gather a module's own parameters around that module's forward).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

from media import audio_token_count  # tokens per clip: 13 per 100-frame chunk (the processor's count too)


# ----------------------------------------------------------------------------------------------
# Configs


def _block(cfg: dict, key: str, model_type: str, source: str) -> dict:
    """The `key` block of a full Qwen3-Omni config, a thinker config, or `cfg` itself if it is the
    block; its model_type (when written) must be `model_type`."""
    cfg = cfg.get("thinker_config", cfg)
    cfg = cfg.get(key, cfg)
    found = cfg.get("model_type", model_type)
    if found != model_type:
        raise ValueError(f"{source}: {key.split('_')[0]} model_type {found!r} is not {model_type}")
    return cfg


@dataclass
class AudioConfig:
    """`thinker_config.audio_config`. Defaults are the released 30B-A3B values."""

    num_mel_bins: int = 128
    d_model: int = 1280
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    downsample_hidden_size: int = 480  # conv channels
    output_dim: int = 2048  # = the LM's hidden size (class default 3584)
    n_window: int = 50  # chunks of 2 * n_window = 100 frames (1 s)
    n_window_infer: int = 800  # attention windows of n_window_infer frames (8 s = 104 tokens)
    conv_chunksize: int = 500  # chunks per conv call: bounds memory only
    max_source_positions: int = 1500  # sinusoid table rows (only 13 are ever used)

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config") -> "AudioConfig":
        """Accepts the `audio_config` block (or a full / thinker config holding it); unknown keys are ignored."""
        cfg = _block(cfg, "audio_config", "qwen3_omni_moe_audio_encoder", source)
        c = cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg})
        if cfg.get("activation_function", "gelu") != "gelu":
            raise ValueError(f"{source}: audio activation_function {cfg['activation_function']!r} is not "
                             "supported (only gelu)")
        if cfg.get("attention_dropout", 0.0):
            raise ValueError(f"{source}: audio attention_dropout must be 0 (dropout is not implemented)")
        # transformers hard-codes 13 tokens per full chunk, which only holds for 100-frame chunks
        if c.n_window != 50:
            raise ValueError(f"{source}: audio n_window {c.n_window} is not supported (only 50)")
        if c.n_window_infer < 2 * c.n_window or c.n_window_infer % (2 * c.n_window):
            raise ValueError(f"{source}: audio n_window_infer {c.n_window_infer} must be a positive multiple "
                             f"of 2 * n_window = {2 * c.n_window}")
        if c.d_model % c.encoder_attention_heads:
            raise ValueError(f"{source}: audio d_model {c.d_model} is not divisible by "
                             f"encoder_attention_heads {c.encoder_attention_heads}")
        return c

    def to_hf_dict(self) -> dict:
        """The `audio_config` block of the released config.json (what Qwen3OmniMoeAudioEncoderConfig reads).
        `scale_embedding` and the dropouts are written as released; transformers never applies them here."""
        return dict(asdict(self), model_type="qwen3_omni_moe_audio_encoder", activation_function="gelu",
                    scale_embedding=False, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                    initializer_range=0.02)


@dataclass
class VisionConfig:
    """`thinker_config.vision_config`. Defaults are the released 30B-A3B values."""

    depth: int = 27
    hidden_size: int = 1152
    num_heads: int = 16  # head_dim 72
    intermediate_size: int = 4304
    in_channels: int = 3
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304  # a 48 x 48 learned grid
    out_hidden_size: int = 2048  # = the LM's hidden size (class default 3584)
    deepstack_visual_indexes: list[int] = field(default_factory=lambda: [8, 16, 24])
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, cfg: dict, source: str = "config") -> "VisionConfig":
        """Accepts the `vision_config` block (or a full / thinker config holding it); unknown keys are ignored."""
        cfg = _block(cfg, "vision_config", "qwen3_omni_moe_vision_encoder", source)
        known = {f.name for f in fields(cls)} - {"rope_theta"}
        c = cls(**{k: v for k, v in cfg.items() if k in known})
        c.deepstack_visual_indexes = list(c.deepstack_visual_indexes)
        rope = cfg.get("rope_parameters") or {}  # absent in the released file: axial, theta 10000
        if rope.get("rope_type", "axial") != "axial":
            raise ValueError(f"{source}: vision rope_type {rope['rope_type']!r} is not supported (only axial)")
        c.rope_theta = float(rope.get("rope_theta", cls.rope_theta))
        if cfg.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
            raise ValueError(f"{source}: vision hidden_act {cfg['hidden_act']!r} is not supported "
                             "(only gelu_pytorch_tanh)")
        if not isinstance(c.patch_size, int) or not isinstance(c.temporal_patch_size, int):
            raise ValueError(f"{source}: vision patch_size / temporal_patch_size must be integers")
        if c.hidden_size % c.num_heads or c.head_dim % 4:
            raise ValueError(f"{source}: vision head_dim (hidden_size / num_heads) must be an integer divisible "
                             "by 4 (2-D rotary)")
        if math.isqrt(c.num_position_embeddings) ** 2 != c.num_position_embeddings:
            raise ValueError(f"{source}: vision num_position_embeddings {c.num_position_embeddings} is not a square")
        if any(not 0 <= i < c.depth for i in c.deepstack_visual_indexes):
            raise ValueError(f"{source}: vision deepstack_visual_indexes {c.deepstack_visual_indexes} must lie in "
                             f"[0, depth={c.depth})")
        return c

    def to_hf_dict(self) -> dict:
        """The `vision_config` block of the released config.json (what Qwen3OmniMoeVisionEncoderConfig reads)."""
        d = asdict(self)
        d.update(model_type="qwen3_omni_moe_vision_encoder", hidden_act="gelu_pytorch_tanh", initializer_range=0.02,
                 rope_parameters={"rope_type": "axial", "rope_theta": d.pop("rope_theta")})
        return d


# ----------------------------------------------------------------------------------------------
# Windowed attention (both towers)


def window_groups(lengths: list[int], device) -> list[torch.Tensor]:
    """Token indices of consecutive attention windows of the given lengths, grouped by length:
    one [n_windows, L] index tensor per distinct L, so equal-length windows run as one batch."""
    starts: dict[int, list[int]] = {}
    s = 0
    for n in lengths:
        starts.setdefault(n, []).append(s)
        s += n
    return [torch.tensor(ss, device=device)[:, None] + torch.arange(n, device=device) for n, ss in starts.items()]


def windowed_attention(q, k, v, groups: list[torch.Tensor]):
    """q, k, v [S, H, D] -> [S, H, D]: non-causal attention of each token within its own window only
    (transformers runs the same SDPA/eager call once per window, `cu_seqlens`)."""
    out = torch.empty_like(q)
    scale = q.shape[-1] ** -0.5  # passed explicitly, like transformers (SDPA's own default may round differently)
    for idx in groups:  # idx [n, L]
        qw, kw, vw = (t[idx].transpose(1, 2) for t in (q, k, v))  # [n, H, L, D]
        out[idx] = F.scaled_dot_product_attention(qw, kw, vw, scale=scale).transpose(1, 2)
    return out


# ----------------------------------------------------------------------------------------------
# Audio tower


def sinusoids(length: int, channels: int) -> torch.Tensor:
    """Whisper's fixed position table [length, channels] in fp32: sin half first, then cos."""
    inv = torch.exp(-(math.log(10000) / (channels // 2 - 1)) * torch.arange(channels // 2).float())
    angle = torch.arange(length)[:, None] * inv[None, :]  # [length, channels / 2]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)


class AudioAttention(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.n_heads = cfg.encoder_attention_heads
        d = cfg.d_model
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(d, d) for _ in range(3))  # all with bias (k too)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x, windows):
        S = x.shape[0]
        q, k, v = (p(x).view(S, self.n_heads, -1) for p in (self.q_proj, self.k_proj, self.v_proj))  # [S, H, D]
        return self.out_proj(windowed_attention(q, k, v, windows).reshape(S, -1))


class AudioLayer(nn.Module):
    """Pre-LN transformer layer (LayerNorm eps 1e-5, erf GELU)."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.self_attn = AudioAttention(cfg)
        self.self_attn_layer_norm = nn.LayerNorm(cfg.d_model)
        self.fc1 = nn.Linear(cfg.d_model, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, cfg.d_model)
        self.final_layer_norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x, windows):
        x = x + self.self_attn(self.self_attn_layer_norm(x), windows)
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:  # as transformers: keep fp16 activations finite
            big = torch.finfo(torch.float16).max - 1000
            x = x.clamp(-big, big)
        return x


class AudioEncoder(nn.Module):
    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        c, d = cfg.downsample_hidden_size, cfg.d_model
        self.conv2d1 = nn.Conv2d(1, c, 3, stride=2, padding=1)
        self.conv2d2 = nn.Conv2d(c, c, 3, stride=2, padding=1)
        self.conv2d3 = nn.Conv2d(c, c, 3, stride=2, padding=1)
        mel_out = (((cfg.num_mel_bins + 1) // 2 + 1) // 2 + 1) // 2  # mel bins after the 3 convs: 128 -> 16
        self.conv_out = nn.Linear(c * mel_out, d, bias=False)
        self.layers = nn.ModuleList(AudioLayer(cfg) for _ in range(cfg.encoder_layers))
        self.ln_post = nn.LayerNorm(d)
        self.proj1 = nn.Linear(d, d)
        self.proj2 = nn.Linear(d, cfg.output_dim)
        self.register_buffer("positions", torch.empty(cfg.max_source_positions, d), persistent=False)
        self.init_buffers()

    def init_buffers(self):
        """Fill the sinusoid table; call again after building on the meta device and `to_empty`."""
        self.positions.copy_(sinusoids(self.cfg.max_source_positions, self.cfg.d_model))

    def forward(self, features, feature_lens):
        """features [mel, sum(T_i)] (all clips concatenated along time), feature_lens [n_clips] frame counts
        -> [sum(audio_token_count(T_i)), output_dim], the clips' tokens in order."""
        clip_lens = [int(n) for n in feature_lens.tolist()]
        if sum(clip_lens) != features.shape[1]:
            raise ValueError(f"feature_lens add up to {sum(clip_lens)} frames, features have {features.shape[1]}")
        # 1. chunks of 100 frames (last one per clip shorter), zero-padded to the longest chunk of the CALL:
        # transformers pads that way, and padding reaches the last valid outputs of a short chunk through
        # the convs (gelu(bias) != 0), so a clip's tokens depend on that length; we match it.
        chunk = 2 * self.cfg.n_window
        chunk_lens = [min(chunk, n - s) for n in clip_lens for s in range(0, n, chunk)]
        x = pad_sequence(features.T.split(chunk_lens), batch_first=True)  # [N, Tm, mel]
        x = x.transpose(1, 2).unsqueeze(1).to(self.conv2d1.weight.dtype)  # [N, 1, mel, Tm]; .dtype is kept by ZeRO-3
        # 2. conv stack over (mel, time), in slices of conv_chunksize chunks to bound memory
        convs = []
        for part in x.split(self.cfg.conv_chunksize):
            part = F.gelu(self.conv2d1(part))
            part = F.gelu(self.conv2d2(part))
            convs.append(F.gelu(self.conv2d3(part)))
        x = torch.cat(convs)  # [N, 480, 16, T'], T' = 13 for 100-frame chunks
        N, C, Fm, T = x.shape
        x = self.conv_out(x.permute(0, 3, 1, 2).reshape(N, T, C * Fm))  # [N, T', 480*16] -> [N, T', d]
        # 3. positions restart at 0 in every chunk; the table is cast to the activation dtype before the add
        x = x + self.positions[:T].to(x.dtype)
        # 4. drop the outputs that only saw padding: [sum of tokens, d], chunks in order
        valid = torch.tensor([audio_token_count(n) for n in chunk_lens], device=x.device)
        x = x[torch.arange(T, device=x.device) < valid[:, None]]
        # 5. attention windows: per clip, consecutive runs of 13 * (n_window_infer / 100) tokens
        # (transformers' window is max-tokens-per-chunk * ratio; when that max is below 13 every clip is
        # shorter than 1 s and is one window either way)
        window = 13 * (self.cfg.n_window_infer // chunk)
        lengths = [min(window, n - s) for n in map(audio_token_count, clip_lens) for s in range(0, n, window)]
        windows = window_groups(lengths, x.device)
        for layer in self.layers:
            x = layer(x, windows)
        return self.proj2(F.gelu(self.proj1(self.ln_post(x))))


# ----------------------------------------------------------------------------------------------
# Vision tower


def patch_coordinates(grid_thw: torch.Tensor, merge: int):
    """(row, col) of every patch in input order, and its frame's (height, width) in patches; all [P] int64.
    Order: per image/video, per temporal slice, 2x2 merge blocks row-major, the block's 4 patches row-major."""
    rows, cols, heights, widths = [], [], [], []
    for t, h, w in grid_thw.tolist():
        r = torch.arange(h, device=grid_thw.device)[:, None].expand(h, w)
        c = torch.arange(w, device=grid_thw.device)[None, :].expand(h, w)
        for lst, a in ((rows, r), (cols, c)):  # [h, w] -> [h/m, w/m, m, m] -> flat, once per temporal slice
            lst.append(a.reshape(h // merge, merge, w // merge, merge).transpose(1, 2).flatten().repeat(t))
        heights.append(torch.full((t * h * w,), h, device=grid_thw.device))
        widths.append(torch.full((t * h * w,), w, device=grid_thw.device))
    return torch.cat(rows), torch.cat(cols), torch.cat(heights), torch.cat(widths)


def bilinear_taps(pos, size, side: int):
    """Resample a `side`-long axis to `size` points, align_corners=True: for each target `pos`, the 2 source
    taps [P, 2] and their weights [P, 2] (fp32). Same float ops as transformers' vision_utils."""
    src = pos.to(torch.float32) * (side - 1) / torch.clamp(size - 1, min=1)
    lo = torch.floor(src)
    offsets = torch.arange(2, device=pos.device)
    taps = (lo.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - lo[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


def rotate_fp32(x, cos, sin):
    """Rotary (rotate-half) on x [P, H, D] in fp32, cast back; cos, sin [P, D] fp32."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]).to(x.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        # kernel = stride: a linear map of each patch's 1536 values. Kept a Conv3d (not a matmul on
        # weight.view(out, -1)) because that is what transformers runs: a matmul rounds differently.
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k)

    def forward(self, x):  # [P, C*T*16*16] -> [P, hidden]
        c = self.cfg
        x = x.view(-1, c.in_channels, c.temporal_patch_size, c.patch_size, c.patch_size)
        return self.proj(x.to(self.proj.weight.dtype)).view(-1, c.hidden_size)  # only .dtype: ZeRO-3 keeps it


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.n_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, cos, sin, windows):
        P = x.shape[0]
        q, k, v = self.qkv(x).view(P, 3, self.n_heads, -1).unbind(1)  # [P, H, D] each
        q, k = rotate_fp32(q, cos, sin), rotate_fp32(k, cos, sin)
        return self.proj(windowed_attention(q, k, v, windows).reshape(P, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    """Pre-LN ViT block (LayerNorm eps 1e-6, tanh GELU)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, windows):
        x = x + self.attn(self.norm1(x), cos, sin, windows)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Each 2x2 block of patches (4 consecutive rows) -> one LM-width token: [P, hidden] -> [P/4, out].
    The final merger normalises each patch (LN over hidden) before concatenating the 4; the deepstack
    mergers normalise the concatenation (LN over 4 * hidden)."""

    def __init__(self, cfg: VisionConfig, norm_after_concat: bool):
        super().__init__()
        self.width = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.norm_after_concat = norm_after_concat
        self.ln_q = nn.LayerNorm(self.width if norm_after_concat else cfg.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(),  # erf GELU here
                                 nn.Linear(self.width, cfg.out_hidden_size))

    def forward(self, x):
        if self.norm_after_concat:
            return self.mlp(self.ln_q(x.view(-1, self.width)))
        return self.mlp(self.ln_q(x).view(-1, self.width))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, norm_after_concat=False)
        self.merger_list = nn.ModuleList(PatchMerger(cfg, norm_after_concat=True)
                                         for _ in cfg.deepstack_visual_indexes)

    def position_embedding(self, rows, cols, heights, widths):
        """The learned square grid resampled bilinearly (align_corners=True) to each frame's grid: [P, hidden]
        fp32. 4 taps in the order (r0,c0), (r0,c1), (r1,c0), (r1,c1); weights, products and sum in fp32."""
        side = math.isqrt(self.cfg.num_position_embeddings)
        r_taps, r_w = bilinear_taps(rows, heights, side)
        c_taps, c_w = bilinear_taps(cols, widths, side)
        idx = (r_taps[:, :, None] * side + c_taps[:, None, :]).reshape(-1, 4)  # [P, 4] table rows
        w = (r_w[:, :, None] * c_w[:, None, :]).reshape(-1, 4)  # [P, 4]
        return (self.pos_embed(idx) * w[:, :, None]).sum(1)  # looked up through the module (ZeRO-3)

    def rotary(self, rows, cols):
        """2-D rotary cos, sin [P, head_dim] in fp32, laid out [row freqs, col freqs, row freqs, col freqs].
        inv_freq is recomputed in fp32 each call, so casting the module never touches it."""
        half = self.cfg.head_dim // 2
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float, device=rows.device)
                                                  / half))  # [head_dim / 4]
        freqs = torch.stack([rows, cols], dim=-1)[..., None].float() * inv_freq  # [P, 2, head_dim / 4]
        freqs = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)  # [P, head_dim / 2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, head_dim]
        return emb.cos(), emb.sin()

    def forward(self, pixel_values, grid_thw):
        """pixel_values [P, C*T*16*16], grid_thw [n, 3] (t, h, w in patches) -> (embeds [P/4, out_hidden],
        deepstack: one [P/4, out_hidden] per deepstack index, in block order)."""
        if pixel_values.shape[0] != int(grid_thw.prod(-1).sum()):
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} patches, grid_thw describes "
                             f"{int(grid_thw.prod(-1).sum())}")
        m = self.cfg.spatial_merge_size
        if (grid_thw[:, 1:] % m).any():
            raise ValueError(f"grid heights and widths must be multiples of spatial_merge_size {m}: "
                             f"{grid_thw.tolist()}")
        rows, cols, heights, widths = patch_coordinates(grid_thw, m)
        x = self.patch_embed(pixel_values)  # [P, hidden]
        x = x + self.position_embedding(rows, cols, heights, widths).to(x.dtype)  # same for every temporal slice
        cos, sin = self.rotary(rows, cols)
        # attention windows: one per temporal slice of each image/video
        windows = window_groups([h * w for t, h, w in grid_thw.tolist() for _ in range(t)], x.device)
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, windows)
            if i in self.cfg.deepstack_visual_indexes:
                deepstack.append(self.merger_list[self.cfg.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deepstack
